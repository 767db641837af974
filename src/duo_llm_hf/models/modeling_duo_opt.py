"""DuoOPT: OPT decoder layers whose FFN is a routed pair of a big and a small OPT feed-forward block.

The paper's pretrained-model study (Appendix A) adds small FFNs to OPT-1.3B. Attention and learned positional
embeddings are the transformers OPT modules, imported, not copied; LayerNorm placement follows
`do_layer_norm_before` both ways (pre-norm like OPT-1.3B, post-norm like OPT-350M), and `project_in` /
`project_out` exist when `word_embed_proj_dim != hidden_size`. The routed FFN and its router are in
`routed_ffn.py`; the output classes, route resolution and the conversion from and to OPT in `modeling_duo.py`,
shared with DuoLlama; the layer, stack and causal-LM forwards, which run this file's pieces (`attend`, `merge`,
`embed`, `finalize`) the same way for every Duo architecture, in `modeling_duo_forward.py`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, OPTForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.opt.modeling_opt import OPTAttention, OPTLearnedPositionalEmbedding

from .configuration_duo_opt import DuoOPTConfig
from .modeling_duo import (
    DuoCausalLMMixin,
    DuoCausalLMOutputWithPast,
    DuoModelOutputWithPast,
    make_duo_ffn,
)
from .modeling_duo_forward import DuoCausalLMForward, DuoDecoderLayer, DuoModelForward
from .routes import RouteSampler, validate_route_fields


class DuoOPTMLP(nn.Module):
    """OPT's feed-forward block with a given inner size: fc1 -> activation -> fc2 -> dropout.

    The same computation as the fc1/fc2 part of `OPTDecoderLayer`; DuoOPT builds its big (`ffn_dim`) and small
    (`small_intermediate_size`) FFNs from it, as DuoLlama builds its FFNs with `DuoLlamaMLP`.
    """

    def __init__(self, config: DuoOPTConfig, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, intermediate_size, bias=config.enable_bias)
        self.fc2 = nn.Linear(intermediate_size, config.hidden_size, bias=config.enable_bias)
        self.activation_fn = ACT2FN[config.activation_function]
        self.dropout = config.dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        return nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)


class DuoOPTDecoderLayer(DuoDecoderLayer):
    """An OPT decoder layer whose FFN is a `DuoFFN` of two `DuoOPTMLP`s.

    `attend` runs the attention block and returns the residual stream and the FFN input (the pre-FFN
    LayerNorm applied when `do_layer_norm_before`); `merge` adds the FFN output and, for post-norm OPT,
    applies the post-FFN LayerNorm, so a skipped FFN still gets the norm, as a zero FFN output would.
    """

    def __init__(self, config: DuoOPTConfig, layer_idx: int):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = OPTAttention(config=config, layer_idx=layer_idx)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        affine = config.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=affine)
        big = DuoOPTMLP(config, config.ffn_dim)
        small = DuoOPTMLP(config, config.small_intermediate_size)
        self.mlp = make_duo_ffn(config, big=big, small=small)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=affine)

    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the attention block; return the residual stream after it and the FFN input."""
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            cache=cache,
            position_ids=position_ids,
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
            return hidden_states, hidden_states
        return hidden_states, self.final_layer_norm(hidden_states)

    def merge(self, residual: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
        """Add the FFN output to the residual stream (then the post-FFN LayerNorm for post-norm OPT)."""
        hidden_states = residual + ffn_output
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class DuoOPTPreTrainedModel(PreTrainedModel):
    config_class = DuoOPTConfig
    config: DuoOPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DuoOPTDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # output_hidden_states / output_attentions: transformers' output hooks record the layer outputs (the initial
    # hidden state is the embeddings, the last one the final norm's output) and the attention weights (eager).
    _can_record_outputs = {"hidden_states": DuoOPTDecoderLayer, "attentions": OPTAttention}
    # A stage-1 checkpoint loaded with routing="learned" has no router weights: they start fresh
    # (initialised like any linear layer), the expected start of router training, so not reported as missing.
    _keys_to_ignore_on_load_missing = [r"\.mlp\.router\."]


class DuoOPTModel(DuoModelForward, DuoOPTPreTrainedModel):
    """The DuoOPT decoder stack; `forward` (`DuoModelForward`'s) resolves the routes for the routing mode and runs
    every layer.

    It holds what `OPTDecoder` holds (token and learned position embeddings, optional `project_in` /
    `project_out`, the final LayerNorm of pre-norm OPT) with the layers directly under `layers`, as
    DuoLlama does.
    """

    def __init__(self, config: DuoOPTConfig):
        super().__init__(config)
        # from_pretrained(..., routing="learned") sets overrides after the config validated itself.
        validate_route_fields(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        hidden, proj = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, proj, self.padding_idx)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, hidden)
        self.project_in = nn.Linear(proj, hidden, bias=False) if proj != hidden else None
        self.project_out = nn.Linear(hidden, proj, bias=False) if proj != hidden else None
        # As in OPTDecoder: `_remove_final_layer_norm` only serves checkpoints fine-tuned before transformers
        # 4.20.1; post-norm OPT has no final LayerNorm.
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            affine = config.layer_norm_elementwise_affine
            self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(
            [DuoOPTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
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
        """Token plus learned position embeddings, and the keyword arguments every layer's `attend` takes.

        Positions count the non-padding tokens (OPT's convention), so a left-padded row gets the same
        positions as the unpadded one. The start of `forward`, kept apart because the oracle engine starts its
        prefix tree from it too.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_seen = cache.get_seq_length() if cache is not None else 0
        batch_size, seq_len = inputs_embeds.shape[:2]
        position_mask = attention_mask
        if position_mask is None:
            position_mask = torch.ones(batch_size, past_seen + seq_len, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = torch.cumsum(position_mask, dim=1)
            position_ids = (position_ids * position_mask - 1).long()[:, past_seen:]
        # The 2-D mask stays None when there is no padding, so that SDPA can use its is_causal path.
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
        )
        position_embeds = self.embed_positions(position_mask, past_seen, position_ids=position_ids)
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden_states = inputs_embeds + position_embeds.to(inputs_embeds.device)
        return hidden_states, {"attention_mask": causal_mask, "position_ids": position_ids}

    def finalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm (pre-norm OPT) and `project_out`, applied to the last layer's output (by `forward`,
        and by the oracle at its leaves)."""
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class DuoOPTForCausalLM(DuoCausalLMMixin, DuoCausalLMForward, DuoOPTPreTrainedModel, GenerationMixin):
    """DuoOPT with a language-modelling head (tied to the token embeddings, as in OPT).

    `DuoOPTForCausalLM.from_dense(dense, small_intermediate_size=None, **duo_kwargs)` converts a transformers
    `OPTForCausalLM` (model_type `opt`), e.g. `OPTForCausalLM.from_pretrained("facebook/opt-1.3b")`: its
    attention, norms, embeddings and projections are kept, each layer's fc1/fc2 become the big FFN, and the small
    FFNs (`ffn_dim // 16` by default) are freshly initialised. `to_dense()` exports the all-big path back as an
    `OPTForCausalLM`.

    ```python
    >>> import torch
    >>> from transformers import OPTConfig, OPTForCausalLM
    >>> from duo_llm_hf import BIG, DuoOPTForCausalLM
    >>> opt = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2,
    ...                                num_attention_heads=4, vocab_size=128))
    >>> duo = DuoOPTForCausalLM.from_dense(opt.eval()).eval()
    >>> ids = torch.randint(3, 128, (1, 8))
    >>> out = duo(ids, labels=ids, routes=torch.full((1, 8, 2), BIG))
    >>> torch.allclose(out.logits, opt(ids).logits, atol=1e-5)
    True
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # from_dense / to_dense: the decoder level of OPTForCausalLM is flattened into the model, and each layer's
    # fc1/fc2 become the big FFN of the Duo layer.
    dense_class = OPTForCausalLM
    _dense_to_duo_keys = {"model.decoder.": "model.", ".fc1.": ".mlp.big.fc1.", ".fc2.": ".mlp.big.fc2."}
    _duo_to_dense_keys = {"model.": "model.decoder.", ".mlp.big.": "."}
    _other_dense_hint = "For Llama-family models use DuoLlamaForCausalLM.from_dense"

    def __init__(self, config: DuoOPTConfig):
        super().__init__(config)
        self.model = DuoOPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "DuoCausalLMOutputWithPast",
    "DuoModelOutputWithPast",
    "DuoOPTDecoderLayer",
    "DuoOPTForCausalLM",
    "DuoOPTMLP",
    "DuoOPTModel",
    "DuoOPTPreTrainedModel",
]
