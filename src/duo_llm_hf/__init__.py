"""duo-llm-hf: the Duo-LLM framework (big / small / skip routed FFNs, oracle, routers) on Hugging Face.

Importing the package registers `duo_llama` and `duo_opt` with `AutoConfig` / `AutoModel` /
`AutoModelForCausalLM`, and marks the classes for `register_for_auto_class`, so a folder written by
`save_pretrained` also loads with `trust_remote_code=True` where this package is not installed (which is how the
plain `lm_eval --model hf` command evaluates it; see `duo_llm_hf.integrations.lm_eval`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.configuration_duo_llama import DuoLlamaConfig
from .models.configuration_duo_opt import DuoOPTConfig
from .models.losses import budget_loss, parse_budget_fractions, token_losses
from .models.modeling_duo_llama import (
    DuoCausalLMOutputWithPast,
    DuoLlamaForCausalLM,
    DuoLlamaModel,
    DuoLlamaPreTrainedModel,
)
from .models.modeling_duo_opt import DuoOPTForCausalLM, DuoOPTModel, DuoOPTPreTrainedModel
from .models.routed_ffn import (
    DuoFFN,
    DuoRouter,
    TemperatureSchedule,
    freeze_all_but_routers,
    router_parameters,
    router_probabilities,
    set_ffn_dispatch,
    set_router_temperature,
)
from .models.routes import (
    BIG,
    CHOICE_NAMES,
    ROUTER_SETTINGS,
    ROUTING_MODES,
    SKIP,
    SMALL,
    UNIFORM_PATTERNS,
    RouteSampler,
    parse_pattern,
    parse_routing,
    pattern_to_str,
    realised_fractions,
    route_fractions,
)
from .utils.flops import FlopCount, dense_intermediate_size, flops_per_token, pattern_flops

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


__version__ = "0.1.0"

__all__ = [
    "BIG",
    "CHOICE_NAMES",
    "SKIP",
    "SMALL",
    "DuoCausalLMOutputWithPast",
    "DuoFFN",
    "DuoLlamaConfig",
    "DuoLlamaForCausalLM",
    "DuoLlamaModel",
    "DuoLlamaPreTrainedModel",
    "DuoOPTConfig",
    "DuoOPTForCausalLM",
    "DuoOPTModel",
    "DuoOPTPreTrainedModel",
    "FlopCount",
    "ROUTER_SETTINGS",
    "ROUTING_MODES",
    "UNIFORM_PATTERNS",
    "DuoRouter",
    "RouteSampler",
    "TemperatureSchedule",
    "budget_loss",
    "freeze_all_but_routers",
    "realised_fractions",
    "router_parameters",
    "router_probabilities",
    "set_ffn_dispatch",
    "set_router_temperature",
    "dense_intermediate_size",
    "flops_per_token",
    "parse_budget_fractions",
    "parse_pattern",
    "parse_routing",
    "pattern_flops",
    "pattern_to_str",
    "route_fractions",
    "token_losses",
]
