"""The fields every Duo config (DuoLlamaConfig, DuoOPTConfig) adds to its dense architecture's config.

transformers v5 configs are dataclasses: each config subclass is made a dataclass of its own fields plus the fields
of every dataclass base, so the Duo fields are declared once here, as a dataclass mixed in before the dense config
class. Like `routing.py`, this file is copied next to a saved model for ``trust_remote_code``, so it imports only
the stdlib and the files next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .routes import validate_route_fields


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
            How routes are chosen when `forward` is given none: `random` (sampled from `route_probs` with
            `route_seed`), `fixed` (`fixed_pattern` for every token), `explicit` (the caller passes `routes=`),
            `learned` (the per-layer router decides).
        route_probs (`dict[str, float]`, *optional*):
            Probability of each allowed choice for random routing; defaults to uniform (p_big = 0.5 over
            small/big, the paper's stage 1).
        fixed_pattern (`list[int | str]` or `str`, *optional*):
            One choice per layer, for `routing_mode="fixed"`; codes, names or letters (`"sBsB"`). Stored as codes.
        route_seed (`int`, defaults to 0):
            Seed of the random route sampler.
        use_router (`bool`, defaults to `False`):
            Give every layer a learned router (`layers[i].mlp.router`). Always on with
            `routing_mode="learned"`; a model that has routers keeps them (and their weights) in every mode.
        router_temperature (`float`, defaults to 1.0):
            Softmax temperature tau of the routers, `P = softmax(logits / tau)`; annealed down during router
            training. Evaluation routes by the argmax, which tau does not change.
        ffn_dispatch (`str`, defaults to `"fast"`):
            Implementation of the routed FFN's dispatch: `fast` (grouped, one sort per layer) or `reference`
            (the straightforward gather/run/scatter per module). Both give the same outputs; change it at run
            time with `duo_llm_hf.models.routes.set_ffn_dispatch(model, mode)`.
    """

    small_intermediate_size: int | None = None
    route_options: list | tuple = ("small", "big")
    routing_mode: str = "random"
    route_probs: dict | None = None
    fixed_pattern: list | str | None = None
    route_seed: int = 0
    use_router: bool = False
    router_temperature: float = 1.0
    ffn_dispatch: str = "fast"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        validate_route_fields(self)


# The config fields a Duo model adds to its dense architecture's config.
DUO_CONFIG_FIELDS = tuple(field.name for field in fields(DuoConfigMixin))


__all__ = ["DUO_CONFIG_FIELDS", "DuoConfigMixin"]
