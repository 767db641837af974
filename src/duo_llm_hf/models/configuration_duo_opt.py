"""Configuration of DuoOPT: an OPT model whose every layer has a big and a small FFN sharing one attention."""

from __future__ import annotations

from transformers import OPTConfig

from .configuration_duo import DuoConfigMixin


class DuoOPTConfig(DuoConfigMixin, OPTConfig):
    r"""Configuration of a [`DuoOPTForCausalLM`]: every [`~transformers.OPTConfig`] field plus the Duo fields
    (the small FFN's size, the route options and routing, the routers and their target usage), documented and
    validated in [`~configuration_duo.DuoConfigMixin`].

    The big FFN's inner size is OPT's `ffn_dim`; `intermediate_size` is an alias of it (as in Llama configs),
    so the routing, FLOP and budget code reads one name for every Duo model: `small_intermediate_size` is in
    1..`ffn_dim` and defaults to `ffn_dim // 16`.

    OPT's `layerdrop` must be 0: a Duo layer always runs its attention, and dropping FFNs is what the `skip`
    route does.

    ```python
    >>> from duo_llm_hf import DuoOPTConfig, DuoOPTForCausalLM
    >>> config = DuoOPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=4, num_attention_heads=4,
    ...                       vocab_size=128, routing="fixed", pattern="sBsB")
    >>> model = DuoOPTForCausalLM(config)
    ```
    """

    model_type = "duo_opt"
    attribute_map = {"intermediate_size": "ffn_dim"}

    def __post_init__(self, **kwargs):
        if self.layerdrop:
            raise ValueError(
                f"layerdrop: {self.layerdrop!r} is not supported by DuoOPT; set layerdrop=0 (to drop FFNs "
                "per token, allow the 'skip' route in route_options)."
            )
        super().__post_init__(**kwargs)


__all__ = ["DuoOPTConfig"]
