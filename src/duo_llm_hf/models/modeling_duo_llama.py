"""DuoLlama: Llama decoder layers whose FFN is a routed pair of a big and a small `LlamaMLP`.

Attention, RMSNorm, rotary embedding and the MLP blocks are the transformers Llama modules, imported, not copied.
Each token in each layer goes to the small module, the big one, or skips the FFN; the route tensor
``[batch, seq, layers]`` says which, and the model returns the routes it took. The routed FFN and its router are in
`routed_ffn.py`; the output classes, route resolution and the conversion from and to Llama in `modeling_duo.py`;
the layer, stack and causal-LM forwards, which run this file's pieces (`attend`, `merge`, `embed`, `finalize`) the
same way for every Duo architecture, in `modeling_duo_forward.py`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_duo_llama import DuoLlamaConfig
from .modeling_duo import (
    DuoCausalLMMixin,
    DuoCausalLMOutputWithPast,
    DuoModelOutputWithPast,
    make_duo_ffn,
)
from .modeling_duo_forward import DuoCausalLMForward, DuoDecoderLayer, DuoModelForward
from .routes import RouteSampler, validate_route_fields


class DuoLlamaMLP(nn.Module):
    """`LlamaMLP` with a given inner size, as transformers' `Qwen2MoeMLP(config, intermediate_size)`: the big FFN
    (`config.intermediate_size`) and the small one (`config.small_intermediate_size`) of a Duo layer.

    The same modules, names and computation as `LlamaMLP`, so a dense Llama's MLP weights load into the big FFN.
    """

    def __init__(self, config: DuoLlamaConfig, intermediate_size: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DuoLlamaDecoderLayer(DuoDecoderLayer):
    """A Llama decoder layer whose MLP is a `DuoFFN`.

    `attend` and `merge` split the layer around its FFN so that the oracle can run the attention of a prefix
    once and every FFN choice on it; `forward` (`DuoDecoderLayer`'s) chains them.
    """

    def __init__(self, config: DuoLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        big = DuoLlamaMLP(config, config.intermediate_size)
        small = DuoLlamaMLP(config, config.small_intermediate_size)
        self.mlp = make_duo_ffn(config, big=big, small=small)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the attention block; return the residual stream after it and the (normalised) FFN input."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states, self.post_attention_layernorm(hidden_states)

    def merge(self, residual: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
        """Add the FFN output to the residual stream."""
        return residual + ffn_output


class DuoLlamaPreTrainedModel(PreTrainedModel):
    config_class = DuoLlamaConfig
    config: DuoLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DuoLlamaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # output_hidden_states / output_attentions: transformers' output hooks record the layer outputs (the initial
    # hidden state is the embeddings, the last one the final norm's output) and the attention weights (eager).
    _can_record_outputs = {"hidden_states": DuoLlamaDecoderLayer, "attentions": LlamaAttention}
    # A stage-1 checkpoint loaded with routing="learned" has no router weights: they start fresh
    # (initialised like any linear layer), the expected start of router training, so not reported as missing.
    _keys_to_ignore_on_load_missing = [r"\.mlp\.router\."]


class DuoLlamaModel(DuoModelForward, DuoLlamaPreTrainedModel):
    """The DuoLlama decoder stack; `forward` (`DuoModelForward`'s) resolves the routes for the routing mode and runs
    every layer."""

    def __init__(self, config: DuoLlamaConfig):
        super().__init__(config)
        # from_pretrained(..., routing="learned") sets overrides after the config validated itself.
        validate_route_fields(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DuoLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.route_sampler = RouteSampler(config.route_probs, config.route_seed)
        self.gradient_checkpointing = False
        self.post_init()

    def embed(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Token embeddings and the keyword arguments every layer's `attend` takes (mask, rotary embeddings).

        The start of `forward`, kept apart because the oracle engine starts its prefix tree from it too.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        layer_kwargs = {
            "attention_mask": causal_mask,
            "position_embeddings": position_embeddings,
            "position_ids": position_ids,
        }
        return inputs_embeds, layer_kwargs

    def finalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The final norm, applied to the last layer's output (by `forward`, and by the oracle at its leaves)."""
        return self.norm(hidden_states)


class DuoLlamaForCausalLM(DuoCausalLMMixin, DuoCausalLMForward, DuoLlamaPreTrainedModel, GenerationMixin):
    """DuoLlama with a language-modelling head.

    `DuoLlamaForCausalLM.from_dense(dense, small_intermediate_size=None, **duo_kwargs)` converts a transformers
    `LlamaForCausalLM` (model_type `llama`: any Llama-family checkpoint that loads with
    `LlamaForCausalLM.from_pretrained`): its attention, norms, embeddings and head are kept, each layer's MLP
    becomes the big FFN, and the small FFNs (`intermediate_size // 16` by default) are freshly initialised.
    `to_dense()` exports the all-big path back as a `LlamaForCausalLM`.

    ```python
    >>> import torch
    >>> from duo_llm_hf import BIG, SMALL, DuoLlamaConfig, DuoLlamaForCausalLM
    >>> config = DuoLlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    ...                         num_attention_heads=4, vocab_size=128)
    >>> model = DuoLlamaForCausalLM(config)
    >>> ids = torch.randint(0, 128, (1, 8))
    >>> routes = torch.full((1, 8, 2), BIG)
    >>> out = model(ids, labels=ids, routes=routes)
    >>> out.token_losses.shape
    torch.Size([1, 8])
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # from_dense / to_dense: each layer's MLP of a dense Llama is the big FFN of the Duo layer.
    dense_class = LlamaForCausalLM
    _dense_to_duo_keys = {".mlp.": ".mlp.big."}
    _duo_to_dense_keys = {".mlp.big.": ".mlp."}
    _other_dense_hint = (
        "Llama-family checkpoints that load with LlamaForCausalLM.from_pretrained convert; other architectures "
        "do not (for OPT use DuoOPTForCausalLM.from_dense)"
    )

    def __init__(self, config: DuoLlamaConfig):
        super().__init__(config)
        self.model = DuoLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "DuoCausalLMOutputWithPast",
    "DuoLlamaDecoderLayer",
    "DuoLlamaForCausalLM",
    "DuoLlamaMLP",
    "DuoLlamaModel",
    "DuoLlamaPreTrainedModel",
    "DuoModelOutputWithPast",
]
