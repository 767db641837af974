"""The fields every Duo config (DuoLlamaConfig, DuoOPTConfig) adds to its dense architecture's config.

transformers v5 configs are dataclasses: each config subclass is made a dataclass of its own fields plus the fields
of every dataclass base, so the Duo fields are declared once here, as a dataclass mixed in before the dense config
class. Like every module of `duo_llm_hf.models`, this file is copied next to a saved model for
``trust_remote_code``, so it imports only the stdlib, torch and the files next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .losses import parse_budget_fractions
from .routes import validate_route_fields

# Keys that configs saved by older versions hold and this one drops on load: run-time state, now set on the modules
# (`routed_ffn.set_router_temperature`, `routed_ffn.set_ffn_dispatch`).
RUN_TIME_KEYS = ("router_temperature", "ffn_dispatch")


@dataclass(repr=False, eq=False, kw_only=True)
class DuoConfigMixin:
    r"""The Duo fields of a config, validated after the dense architecture's fields (`validate_route_fields`).

    Args:
        small_intermediate_size (`int`, *optional*):
            Inner size of the small FFN, in 1..`intermediate_size` (the big FFN's). Defaults to
            `intermediate_size // 16`.
        route_options (`list[str]`, defaults to `["small", "big"]`):
            The choices a token may take in a layer: a non-empty subset of `small`, `big`, `skip`.
        routing_mode (`str`, defaults to `"random"`):
            How routes are chosen when `forward` is given none (`routes.CONFIG_ROUTING_MODES`): `random` (sampled
            from `route_probs` with `route_seed`), `fixed` (`fixed_pattern` for every token), `explicit` (the
            caller passes `routes=`), `learned` (the per-layer router decides). `forward(routing="oracle")` is
            per call only.
        route_probs (`dict[str, float]`, *optional*):
            Probability of each allowed choice for random routing; defaults to uniform (p_big = 0.5 over
            small/big, the paper's stage 1).
        fixed_pattern (`list[int | str]` or `str`, *optional*):
            One choice per layer, for `routing_mode="fixed"`; codes, names or letters (`"sBsB"`). Stored as codes.
        route_seed (`int`, defaults to 0):
            Seed of the random route sampler.
        use_router (`bool`, defaults to `False`):
            Whether every layer has a learned router (`layers[i].mlp.router`). Set by `routing_mode="learned"`
            (learned routing needs routers); a model that has routers keeps them (and their weights) in every
            mode. The routers' softmax temperature is run-time state (`routed_ffn.set_router_temperature`), as is
            the FFN dispatch implementation (`routed_ffn.set_ffn_dispatch`); older configs holding
            `router_temperature` / `ffn_dispatch` still load, without them.
        output_router_logits (`bool`, defaults to `False`):
            Return the routers' logits (`router_logits`) also when the routes are given, and the budget loss
            as `aux_loss` when `router_budget` is set (as Mixtral). Learned routing always returns the logits.
        router_budget (`float` or `dict[str, float]`, *optional*):
            The routers' budget, target fractions of the (token, layer) pairs (`losses.parse_budget_fractions`:
            a number is the BIG fraction). With `output_router_logits`, `aux_loss` is the budget loss and
            `loss` gets `router_aux_loss_coef * aux_loss` added.
        router_aux_loss_coef (`float`, defaults to 1.0):
            Weight of the budget loss in `loss` (the paper's alpha).
    """

    small_intermediate_size: int | None = None
    route_options: list | tuple = ("small", "big")
    routing_mode: str = "random"
    route_probs: dict | None = None
    fixed_pattern: list | str | None = None
    route_seed: int = 0
    use_router: bool = False
    output_router_logits: bool = False
    router_budget: float | dict | None = None
    router_aux_loss_coef: float = 1.0

    def __post_init__(self, **kwargs):
        for key in RUN_TIME_KEYS:
            kwargs.pop(key, None)
        super().__post_init__(**kwargs)
        validate_route_fields(self)
        if self.router_budget is not None:
            parse_budget_fractions(self.router_budget, self.route_options)


# The config fields a Duo model adds to its dense architecture's config.
DUO_CONFIG_FIELDS = tuple(field.name for field in fields(DuoConfigMixin))


__all__ = ["DUO_CONFIG_FIELDS", "RUN_TIME_KEYS", "DuoConfigMixin"]
