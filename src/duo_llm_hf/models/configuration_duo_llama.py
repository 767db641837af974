"""Configuration of DuoLlama: a Llama model whose every layer has a big and a small FFN sharing one attention."""

from __future__ import annotations

from transformers import LlamaConfig

from .configuration_duo import DuoConfigMixin


class DuoLlamaConfig(DuoConfigMixin, LlamaConfig):
    r"""Configuration of a [`DuoLlamaForCausalLM`]: every [`~transformers.LlamaConfig`] field plus the Duo fields
    (the small FFN's size, the route options and routing, the routers and their target usage), documented and
    validated in [`~configuration_duo.DuoConfigMixin`].

    ```python
    >>> from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
    >>> config = DuoLlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
    ...                         num_attention_heads=4, vocab_size=128, routing="fixed", pattern="sBsB")
    >>> model = DuoLlamaForCausalLM(config)
    ```
    """

    model_type = "duo_llama"


__all__ = ["DuoLlamaConfig"]
