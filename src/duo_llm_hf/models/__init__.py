"""The Duo models: configs, routes, the routed FFN with its router, one modeling file per architecture, losses.

Exactly the files `save_pretrained` copies next to a saved model for `trust_remote_code`, so they import only
torch, transformers and each other. Importing this package (which importing any of its modules does) registers
both Duo models with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_duo_llama import DuoLlamaConfig
from .configuration_duo_opt import DuoOPTConfig
from .modeling_duo_llama import DuoLlamaForCausalLM, DuoLlamaModel
from .modeling_duo_opt import DuoOPTForCausalLM, DuoOPTModel

# The Auto classes load both Duo models by model_type, and save_pretrained writes their auto_map (for
# trust_remote_code loads without this package imported).
for _config, _model, _causal_lm in (
    (DuoLlamaConfig, DuoLlamaModel, DuoLlamaForCausalLM),
    (DuoOPTConfig, DuoOPTModel, DuoOPTForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _causal_lm, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _causal_lm.register_for_auto_class("AutoModelForCausalLM")
del _config, _model, _causal_lm
