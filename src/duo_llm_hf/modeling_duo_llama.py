"""DuoLlama: Llama decoder layers whose FFN is a routed pair of a big and a small `LlamaMLP`.

Attention, RMSNorm, rotary embedding and the MLP blocks are the transformers Llama modules, imported, not copied.
Each token in each layer goes to the small module, the big one, or skips the FFN; the route tensor
``[batch, seq, layers]`` says which, and the model returns the routes it took.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_duo_llama import DuoLlamaConfig
from .losses import mean_loss, token_losses
from .routing import DispatchPlan, DuoFFN, RouteSampler, check_routes, dispatch_plans, validate_route_fields

# Keys of a dense Llama checkpoint that become the big path of a Duo model, and back.
_DENSE_MLP, _BIG_MLP = ".mlp.", ".mlp.big."


@dataclass
class DuoModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the routes taken, `[batch, seq, layers]`."""

    routes: torch.LongTensor | None = None


@dataclass
class DuoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the routes taken and, when labels are given, the per-token losses.

    `token_losses[b, t]` is the cross-entropy of predicting `labels[b, t + 1]` (0 where there is no target);
    `loss` is their mean over positions with a target.
    """

    routes: torch.LongTensor | None = None
    token_losses: torch.FloatTensor | None = None


def small_mlp_config(config: DuoLlamaConfig) -> SimpleNamespace:
    """The fields `LlamaMLP` reads, with the small inner size."""
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        intermediate_size=config.small_intermediate_size,
        hidden_act=config.hidden_act,
        mlp_bias=config.mlp_bias,
    )


class DuoLlamaDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer whose MLP is a `DuoFFN`.

    `attend` and `merge` split the layer around its FFN so that the oracle can run the attention of a prefix
    once and every FFN choice on it.
    """

    def __init__(self, config: DuoLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = DuoFFN(
            big=LlamaMLP(config), small=LlamaMLP(small_mlp_config(config)), dispatch_mode=config.ffn_dispatch
        )
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the attention block; return the residual stream after it and the (normalised) FFN input."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states, self.post_attention_layernorm(hidden_states)

    def merge(self, residual: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
        """Add the FFN output to the residual stream."""
        return residual + ffn_output

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        route_plan: DispatchPlan | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Return the layer output and the route taken (`route`, or the router's choice when it is None).

        `route_plan`: the route's grouping for the fast dispatch, when the model made it for all layers.
        """
        residual, ffn_input = self.attend(hidden_states, attention_mask, position_embeddings, past_key_values, **kwargs)
        ffn_output, route = self.mlp(ffn_input, route, route_plan)
        return self.merge(residual, ffn_output), route


class DuoLlamaPreTrainedModel(PreTrainedModel):
    config_class = DuoLlamaConfig
    config: DuoLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DuoLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class DuoLlamaModel(DuoLlamaPreTrainedModel):
    """The DuoLlama decoder stack; `forward` resolves the routes for the routing mode and runs every layer."""

    def __init__(self, config: DuoLlamaConfig):
        super().__init__(config)
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

    def resolve_routes(
        self, routes: torch.Tensor | None, routing: str | None, batch_size: int, seq_len: int, device: torch.device
    ) -> torch.LongTensor | None:
        """The route tensor for this call: the given `routes`, or one made by the routing mode.

        `None` for learned routing, where each layer's router decides from its FFN input.
        """
        config = self.config
        mode = routing or ("explicit" if routes is not None else config.routing_mode)
        if routes is not None:
            check_routes(routes, config, batch_size, seq_len)
            return routes.to(device=device, dtype=torch.long)
        shape = (batch_size, seq_len, config.num_hidden_layers)
        if mode == "random":
            return self.route_sampler.sample(shape, device)
        if mode == "fixed":
            if config.fixed_pattern is None:
                raise ValueError("routing='fixed' needs config.fixed_pattern; set it with model.set_routing('fixed', pattern).")
            return torch.tensor(config.fixed_pattern, device=device).expand(shape)
        if mode == "learned":
            return None
        if mode == "explicit":
            raise ValueError("routing_mode='explicit' needs a route tensor: call the model with routes=[batch, seq, layers].")
        raise ValueError(f"routing={mode!r} is not a routing mode of {type(self).__name__}; use random, fixed or explicit.")

    def embed(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Token embeddings and the keyword arguments every layer's `attend` takes (mask, rotary embeddings)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
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
        """The final norm, applied to the last layer's output."""
        return self.norm(hidden_states)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        routes: torch.LongTensor | None = None,
        routing: str | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DuoModelOutputWithPast:
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        hidden_states, layer_kwargs = self.embed(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
        batch_size, seq_len = hidden_states.shape[:2]
        routes = self.resolve_routes(routes, routing, batch_size, seq_len, hidden_states.device)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        all_hidden_states = [] if output_hidden_states else None

        # Group the rows of every layer by choice once per forward (one host sync), for the fast dispatch.
        plans = dispatch_plans(routes) if routes is not None and self.config.ffn_dispatch == "fast" else None
        routes_taken = []
        for layer_idx, decoder_layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, route = decoder_layer(
                hidden_states,
                None if routes is None else routes[..., layer_idx],
                past_key_values=past_key_values,
                route_plan=None if plans is None else plans[layer_idx],
                **layer_kwargs,
                **kwargs,
            )
            routes_taken.append(route)

        hidden_states = self.finalize(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return DuoModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            routes=torch.stack(routes_taken, dim=-1),
        )


class DuoLlamaForCausalLM(DuoLlamaPreTrainedModel, GenerationMixin):
    """DuoLlama with a language-modelling head.

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

    def __init__(self, config: DuoLlamaConfig):
        super().__init__(config)
        self.model = DuoLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        routes: torch.LongTensor | None = None,
        routing: str | None = None,
        **kwargs,
    ) -> DuoCausalLMOutputWithPast:
        r"""
        routes (`torch.LongTensor` of shape `[batch, seq, layers]`, *optional*):
            Explicit choice codes (`SMALL`, `BIG`, `SKIP`) for every token and layer; must be allowed by
            `config.route_options`. Overrides the routing mode.
        routing (`str`, *optional*):
            Routing mode for this call (`random`, `fixed`, `explicit`), instead of `config.routing_mode`.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routes=routes,
            routing=routing,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = per_token = None
        if labels is not None:
            per_token, mask = token_losses(logits, labels)
            loss = mean_loss(per_token, mask, num_items_in_batch)
        return DuoCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            routes=outputs.routes,
            token_losses=per_token,
        )

    def set_routing(
        self,
        mode: str,
        fixed_pattern: list[int | str] | str | None = None,
        route_probs: dict[str, float] | None = None,
        route_seed: int | None = None,
    ) -> DuoLlamaForCausalLM:
        """Change the routing mode (and its pattern, probabilities or seed), validated like the config."""
        config = self.config
        previous = {k: getattr(config, k) for k in ("routing_mode", "fixed_pattern", "route_probs", "route_seed")}
        config.routing_mode = mode
        if fixed_pattern is not None:
            config.fixed_pattern = fixed_pattern
        if route_probs is not None:
            config.route_probs = route_probs
        if route_seed is not None:
            config.route_seed = route_seed
        try:
            validate_route_fields(config)
        except ValueError:
            for key, value in previous.items():
                setattr(config, key, value)
            raise
        self.model.route_sampler = RouteSampler(config.route_probs, config.route_seed)
        return self

    @classmethod
    def from_dense(
        cls, dense: LlamaForCausalLM, small_intermediate_size: int | None = None, **duo_kwargs
    ) -> DuoLlamaForCausalLM:
        """Build a Duo model whose attention, norms, embeddings and big FFNs are `dense`'s weights.

        The small FFNs are freshly initialised. `duo_kwargs` are Duo config fields (`route_options`,
        `routing_mode`, ...). With every route on BIG the Duo logits equal `dense`'s logits.
        """
        if not isinstance(dense, LlamaForCausalLM) or dense.config.model_type != "llama":
            raise TypeError(
                f"from_dense needs a transformers LlamaForCausalLM (model_type 'llama'), got {type(dense).__name__}; "
                "for a Duo model, take its big path with to_dense() first."
            )
        fields = {k: v for k, v in dense.config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED}
        config = DuoLlamaConfig(**fields, small_intermediate_size=small_intermediate_size, **duo_kwargs)
        config._attn_implementation = dense.config._attn_implementation
        duo = cls(config).to(dtype=dense.dtype, device=dense.device)
        state = {k.replace(_DENSE_MLP, _BIG_MLP): v for k, v in dense.state_dict().items()}
        missing, unexpected = duo.load_state_dict(state, strict=False)
        not_small = [k for k in missing if ".mlp.small." not in k]
        if unexpected or not_small:
            raise ValueError(f"from_dense: weights do not match a Duo model (missing {not_small}, unexpected {unexpected}).")
        return duo

    def to_dense(self) -> LlamaForCausalLM:
        """Export the all-big path as a plain `LlamaForCausalLM` (the small FFNs are dropped)."""
        duo_only = {"small_intermediate_size", "route_options", "routing_mode", "route_probs", "fixed_pattern", "route_seed"}
        fields = {k: v for k, v in self.config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED | duo_only}
        config = LlamaConfig(**fields)
        config._attn_implementation = self.config._attn_implementation
        dense = LlamaForCausalLM(config).to(dtype=self.dtype, device=self.device)
        state = {
            k.replace(_BIG_MLP, _DENSE_MLP): v for k, v in self.state_dict().items() if ".mlp.small." not in k
        }
        dense.load_state_dict(state, strict=True)
        return dense


_CONFIG_KEYS_NOT_COPIED = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"}

__all__ = ["DuoLlamaForCausalLM", "DuoLlamaModel", "DuoLlamaPreTrainedModel"]
