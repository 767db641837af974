"""duo-llm-hf: the Duo-LLM framework (big / small / skip routed FFNs, oracle, routers) on Hugging Face.

Importing the package registers `duo_llama` and `duo_opt` with `AutoConfig` / `AutoModel` /
`AutoModelForCausalLM`, and marks the classes for `register_for_auto_class`, so a folder written by
`save_pretrained` also loads with `trust_remote_code=True` where this package is not installed. It also makes
sure the `duo` lm-eval model is registered once lm-evaluation-harness loads its models (`_duo_llm_hf_lm_eval`;
the installed `.pth` file does the same at interpreter start, so the plain `lm_eval` command knows `duo` too).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import _duo_llm_hf_lm_eval  # noqa: F401  (the lm-eval hook, for processes that skipped the .pth)

from .configuration_duo_llama import DuoLlamaConfig
from .configuration_duo_opt import DuoOPTConfig
from .flops import FlopCount, dense_intermediate_size, flops_per_token, pattern_flops
from .losses import token_losses
from .modeling_duo_llama import (
    DuoCausalLMOutputWithPast,
    DuoLlamaForCausalLM,
    DuoLlamaModel,
    DuoLlamaPreTrainedModel,
)
from .modeling_duo_opt import DuoOPTForCausalLM, DuoOPTModel, DuoOPTPreTrainedModel
from .router import (
    ROUTER_SETTINGS,
    DuoRouter,
    TemperatureSchedule,
    budget_loss,
    freeze_all_but_routers,
    realised_fractions,
    router_parameters,
    set_router_temperature,
)
from .routing import (
    BIG,
    CHOICE_NAMES,
    SKIP,
    SMALL,
    DuoFFN,
    RouteSampler,
    parse_pattern,
    pattern_to_str,
    route_fractions,
)

AutoConfig.register(DuoLlamaConfig.model_type, DuoLlamaConfig, exist_ok=True)
AutoModel.register(DuoLlamaConfig, DuoLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(DuoLlamaConfig, DuoLlamaForCausalLM, exist_ok=True)
DuoLlamaConfig.register_for_auto_class()
DuoLlamaModel.register_for_auto_class("AutoModel")
DuoLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(DuoOPTConfig.model_type, DuoOPTConfig, exist_ok=True)
AutoModel.register(DuoOPTConfig, DuoOPTModel, exist_ok=True)
AutoModelForCausalLM.register(DuoOPTConfig, DuoOPTForCausalLM, exist_ok=True)
DuoOPTConfig.register_for_auto_class()
DuoOPTModel.register_for_auto_class("AutoModel")
DuoOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


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
    "DuoRouter",
    "RouteSampler",
    "TemperatureSchedule",
    "budget_loss",
    "freeze_all_but_routers",
    "realised_fractions",
    "router_parameters",
    "set_router_temperature",
    "dense_intermediate_size",
    "flops_per_token",
    "parse_pattern",
    "pattern_flops",
    "pattern_to_str",
    "route_fractions",
    "token_losses",
]
