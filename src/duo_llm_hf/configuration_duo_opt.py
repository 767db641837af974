"""Configuration of DuoOPT: an OPT model whose every layer has a big and a small FFN sharing one attention."""

from __future__ import annotations

from transformers import OPTConfig

from .routing import validate_route_fields


class DuoOPTConfig(OPTConfig):
    r"""Configuration of a [`DuoOPTForCausalLM`]: every [`~transformers.OPTConfig`] field plus the Duo fields.

    The big FFN's inner size is OPT's `ffn_dim`; `intermediate_size` is an alias of it (as in Llama configs),
    so the routing, FLOP and budget code reads one name for every Duo model.

    Args:
        small_intermediate_size (`int`, *optional*):
            Inner size of the small FFN, in 1..`ffn_dim`. Defaults to `ffn_dim // 16`.
        route_options (`list[str]`, defaults to `["small", "big"]`):
            The choices a token may take in a layer: a non-empty subset of `small`, `big`, `skip`.
        routing_mode (`str`, defaults to `"random"`):
            How routes are chosen when `forward` is given none: `random` (sampled from `route_probs` with
            `route_seed`), `fixed` (`fixed_pattern` for every token), `explicit` (the caller passes
            `routes=`), `learned` (the per-layer router decides).
        route_probs (`dict[str, float]`, *optional*):
            Probability of each allowed choice for random routing; defaults to uniform (p_big = 0.5 over
            small/big, the paper's stage 1).
        fixed_pattern (`list[int | str]` or `str`, *optional*):
            One choice per layer, for `routing_mode="fixed"`; codes, names or letters (`"sBsB"`). Stored as
            codes.
        route_seed (`int`, defaults to 0):
            Seed of the random route sampler.
        use_router (`bool`, defaults to `False`):
            Give every layer a learned router (`layers[i].mlp.router`). Always on with
            `routing_mode="learned"`; a model that has routers keeps them (and their weights) in every mode.
        router_temperature (`float`, defaults to 1.0):
            Softmax temperature tau of the routers, `P = softmax(logits / tau)`.
        ffn_dispatch (`str`, defaults to `"fast"`):
            Implementation of the routed FFN's dispatch: `fast` or `reference` (same outputs; see
            `DuoLlamaConfig`).

    OPT's `layerdrop` must be 0: a Duo layer always runs its attention, and dropping FFNs is what the `skip`
    route does.

    ```python
    >>> from duo_llm_hf import DuoOPTConfig, DuoOPTForCausalLM
    >>> config = DuoOPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=4, num_attention_heads=4,
    ...                       vocab_size=128, routing_mode="fixed", fixed_pattern="sBsB")
    >>> model = DuoOPTForCausalLM(config)
    ```
    """

    model_type = "duo_opt"
    attribute_map = {"intermediate_size": "ffn_dim"}

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
        if self.layerdrop:
            raise ValueError(
                f"layerdrop: {self.layerdrop!r} is not supported by DuoOPT; set layerdrop=0 (to drop FFNs "
                "per token, allow the 'skip' route in route_options)."
            )
        validate_route_fields(self)


__all__ = ["DuoOPTConfig"]
