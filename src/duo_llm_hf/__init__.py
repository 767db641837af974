"""duo-llm-hf: the Duo-LLM framework (big / small / skip routed FFNs, oracle, routers) on Hugging Face.

The names below load on first use (``duo_llm_hf.DuoLlamaForCausalLM``, ``from duo_llm_hf import ...``), so that
``import duo_llm_hf`` and ``duo-llm --help`` import neither torch nor transformers. Loading the models (any of these
names, or ``import duo_llm_hf.models``) registers `duo_llama` and `duo_opt` with `AutoConfig` / `AutoModel` /
`AutoModelForCausalLM`, and marks the classes for `register_for_auto_class`, so a folder written by
`save_pretrained` also loads with `trust_remote_code=True` where this package is not installed (which is how the
plain `lm_eval --model hf` command evaluates it; see `duo_llm_hf.integrations.lm_eval`).
"""

import importlib

# Each public name and the module that defines it, imported when the name is first asked for.
_LAZY = {
    **dict.fromkeys(["DuoLlamaConfig"], ".models.configuration_duo_llama"),
    **dict.fromkeys(["DuoOPTConfig"], ".models.configuration_duo_opt"),
    # `budget_loss` and `parse_budget_fractions`: the 0.1 names of `usage_loss` and `parse_target_usage`.
    **dict.fromkeys(
        ["budget_loss", "parse_budget_fractions", "parse_target_usage", "token_losses", "usage_loss"], ".models.losses"
    ),
    **dict.fromkeys(
        ["DuoCausalLMOutputWithPast", "DuoLlamaForCausalLM", "DuoLlamaModel", "DuoLlamaPreTrainedModel"],
        ".models.modeling_duo_llama",
    ),
    **dict.fromkeys(["DuoOPTForCausalLM", "DuoOPTModel", "DuoOPTPreTrainedModel"], ".models.modeling_duo_opt"),
    **dict.fromkeys(
        [
            "DuoFFN",
            "DuoRouter",
            "TemperatureSchedule",
            "freeze_all_but_routers",
            "router_parameters",
            "router_probabilities",
            "set_ffn_dispatch",
            "set_router_temperature",
        ],
        ".models.routed_ffn",
    ),
    **dict.fromkeys(
        [
            "BIG",
            "CHOICE_NAMES",
            "ROUTING_MODES",
            "SKIP",
            "SMALL",
            "UNIFORM_PATTERNS",
            "RouteSampler",
            "parse_pattern",
            "parse_routing",
            "pattern_to_str",
            "realised_fractions",
            "route_fractions",
        ],
        ".models.routes",
    ),
    **dict.fromkeys(["ROUTER_SETTINGS"], ".training.router_settings"),
    **dict.fromkeys(["FlopCount", "dense_intermediate_size", "flops_per_token", "pattern_flops"], ".utils.flops"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".models", __name__)  # registers the Auto classes before any model is used
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
    "freeze_all_but_routers",
    "realised_fractions",
    "router_parameters",
    "router_probabilities",
    "set_ffn_dispatch",
    "set_router_temperature",
    "dense_intermediate_size",
    "flops_per_token",
    "parse_target_usage",
    "parse_pattern",
    "parse_routing",
    "pattern_flops",
    "pattern_to_str",
    "route_fractions",
    "token_losses",
    "usage_loss",
]
