"""The fields every Duo config (DuoLlamaConfig, DuoOPTConfig) adds to its dense architecture's config.

transformers v5 configs are dataclasses: each config subclass is made a dataclass of its own fields plus the fields
of every dataclass base, so the Duo fields are declared once here, as a dataclass mixed in before the dense config
class. Like every module of `duo_llm_hf.models`, this file is copied next to a saved model for
``trust_remote_code``, so it imports only the stdlib, torch and the files next to it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

from .losses import parse_target_usage
from .routes import validate_route_fields

# Keys that configs saved by older versions hold and this one drops on load: run-time state, now set on the modules
# (`routed_ffn.set_router_temperature`, `routed_ffn.set_ffn_dispatch`).
RUN_TIME_KEYS = ("router_temperature", "ffn_dispatch")
# Keys that configs saved by older versions hold under another name, and the field each is now: read on load (and
# as attributes) with a FutureWarning, until 0.3.
RENAMED_KEYS = {"routing_mode": "routing", "fixed_pattern": "pattern", "router_budget": "router_target_usage"}


def _renamed(old: str) -> str:
    new = RENAMED_KEYS[old]
    warnings.warn(
        f"Duo config key {old!r} is now {new!r}; the old name is read until 0.3.", FutureWarning, stacklevel=3
    )
    return new


def _old_name(old: str) -> property:
    """The attribute ``old``: reads and sets the field it was renamed to, with a FutureWarning."""
    return property(
        lambda self: getattr(self, _renamed(old)),
        lambda self, value: setattr(self, _renamed(old), value),
        doc=f"Deprecated name of `{RENAMED_KEYS[old]}` (removed in 0.3).",
    )


@dataclass(repr=False, eq=False, kw_only=True)
class DuoConfigMixin:
    r"""The Duo fields of a config, validated after the dense architecture's fields (`validate_route_fields`).

    Args:
        small_intermediate_size (`int`, *optional*):
            Inner size of the small FFN, in 1..`intermediate_size` (the big FFN's). Defaults to
            `intermediate_size // 16`.
        route_options (`list[str]`, defaults to `["small", "big"]`):
            The choices a token may take in a layer: a non-empty subset of `small`, `big`, `skip`.
        routing (`str`, defaults to `"random"`):
            How routes are chosen when `forward` is given none (`routes.CONFIG_ROUTING_MODES`): `random` (sampled
            from `route_probs` with `route_seed`), `fixed` (`pattern` for every token), `explicit` (the caller
            passes `routes=`), `learned` (the per-layer router decides). `forward(routing="oracle")` is per call
            only. (`routing_mode` in 0.1: configs and code that use it still work, with a FutureWarning.)
        route_probs (`dict[str, float]`, *optional*):
            Probability of each allowed choice for random routing; defaults to uniform (p_big = 0.5 over
            small/big, the paper's stage 1).
        pattern (`list[int | str]` or `str`, *optional*):
            One choice per layer, for `routing="fixed"`; codes, names or letters (`"sBsB"`). Stored as codes.
            (`fixed_pattern` in 0.1.)
        route_seed (`int`, defaults to 0):
            Seed of the random route sampler.
        use_router (`bool`, defaults to `False`):
            Whether every layer has a learned router (`layers[i].mlp.router`). Set by `routing="learned"`
            (learned routing needs routers); a model that has routers keeps them (and their weights) in every
            mode. The routers' softmax temperature is run-time state (`routed_ffn.set_router_temperature`), as is
            the FFN dispatch implementation (`routed_ffn.set_ffn_dispatch`); older configs holding
            `router_temperature` / `ffn_dispatch` still load, without them.
        output_router_logits (`bool`, defaults to `False`):
            Return the routers' logits (`router_logits`) also when the routes are given, and the usage loss
            as `aux_loss` when `router_target_usage` is set (as Mixtral). Learned routing always returns the logits.
        router_target_usage (`float` or `dict[str, float]`, *optional*):
            The routers' target usage, target fractions of the (token, layer) pairs (`losses.parse_target_usage`:
            a number is the BIG fraction). With `output_router_logits`, `aux_loss` is the usage loss (the paper's
            budget loss) and `loss` gets `router_aux_loss_coef * aux_loss` added. (`router_budget` in
            0.1.)
        router_aux_loss_coef (`float`, defaults to 1.0):
            Weight of the usage loss in `loss` (the paper's alpha).
    """

    small_intermediate_size: int | None = None
    route_options: list | tuple = ("small", "big")
    routing: str = "random"
    route_probs: dict | None = None
    pattern: list | str | None = None
    route_seed: int = 0
    use_router: bool = False
    output_router_logits: bool = False
    router_target_usage: float | dict | None = None
    router_aux_loss_coef: float = 1.0

    def __post_init__(self, **kwargs):
        for key in RUN_TIME_KEYS:
            kwargs.pop(key, None)
        for old in RENAMED_KEYS:
            if old in kwargs:
                setattr(self, _renamed(old), kwargs.pop(old))
        super().__post_init__(**kwargs)
        validate_route_fields(self)
        if self.router_target_usage is not None:
            parse_target_usage(self.router_target_usage, self.route_options)

    # The old names as attributes (`config.routing_mode`, `from_pretrained(..., routing_mode="learned")`).
    routing_mode = _old_name("routing_mode")
    fixed_pattern = _old_name("fixed_pattern")
    router_budget = _old_name("router_budget")


# The config fields a Duo model adds to its dense architecture's config.
DUO_CONFIG_FIELDS = tuple(field.name for field in fields(DuoConfigMixin))


__all__ = ["DUO_CONFIG_FIELDS", "RENAMED_KEYS", "RUN_TIME_KEYS", "DuoConfigMixin"]
