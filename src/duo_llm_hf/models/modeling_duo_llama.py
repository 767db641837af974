"""DuoLlama: Llama decoder layers whose FFN is a routed pair of a big and a small `LlamaMLP`.

Attention, RMSNorm, rotary embedding and the MLP blocks are the transformers Llama modules, imported, not copied.
Each token in each layer goes to the small module, the big one, or skips the FFN; the route tensor
``[batch, seq, layers]`` says which, and the model returns the routes it took. The routed FFN and its router are in
`routed_ffn.py`; the output classes, route resolution and the conversion from and to Llama in `modeling_duo.py`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .configuration_duo_llama import DuoLlamaConfig
from .losses import budget_loss, mean_loss, token_losses
from .modeling_duo import (
    DuoCausalLMMixin,
    DuoCausalLMOutputWithPast,
    DuoModelOutputWithPast,
    make_duo_ffn,
    oracle_forward,
    resolve_routes,
)
from .routed_ffn import DispatchPlan, dispatch_plans, router_temperature
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


class DuoLlamaDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer whose MLP is a `DuoFFN`.

    `attend` and `merge` split the layer around its FFN so that the oracle can run the attention of a prefix
    once and every FFN choice on it; `forward` chains them.
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: torch.LongTensor | None,
        cache: Cache | None = None,
        dispatch_plan: DispatchPlan | None = None,
        output_router_logits: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor | None]:
        """Return the layer output, the route taken and the router logits (`[batch, seq, 3]`, or None).

        `route`: the choice code of each token (`[batch, seq]`), or None for learned routing: the route taken is
        then the argmax of the router logits. `dispatch_plan`: the route's grouping for the fast dispatch, when the
        model made it for all layers. `kwargs`: the attention's (mask, positions).
        """
        residual, ffn_input = self.attend(hidden_states, cache=cache, **kwargs)
        ffn_output, router_logits = self.mlp(ffn_input, route, dispatch_plan, output_router_logits)
        if route is None:
            route = router_logits.argmax(dim=-1)
        return self.merge(residual, ffn_output), route, router_logits


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
    # A stage-1 checkpoint loaded with routing_mode="learned" has no router weights: they start fresh
    # (initialised like any linear layer), the expected start of router training, so not reported as missing.
    _keys_to_ignore_on_load_missing = [r"\.mlp\.router\."]


class DuoLlamaModel(DuoLlamaPreTrainedModel):
    """The DuoLlama decoder stack; `forward` resolves the routes for the routing mode and runs every layer."""

    def __init__(self, config: DuoLlamaConfig):
        super().__init__(config)
        # from_pretrained(..., routing_mode="learned") sets overrides after the config validated itself.
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        routes: torch.LongTensor | None = None,
        routing: str | None = None,
        output_router_logits: bool = False,
        **kwargs,
    ) -> DuoModelOutputWithPast:
        # Unlike transformers' Llama, no cache by default in training mode: a training step never decodes.
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        hidden_states, layer_kwargs = self.embed(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        batch_size, seq_len = hidden_states.shape[:2]
        routes = resolve_routes(
            self.config, self.route_sampler, routes, routing, batch_size, seq_len, hidden_states.device, past_seen
        )

        # The fast dispatch groups the rows of every layer by choice once per forward (one host sync).
        fast = self.layers[0].mlp.dispatch_mode == "fast"
        plans = dispatch_plans(routes) if routes is not None and fast else None
        routes_taken, router_logits = [], []
        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states, route, logits = decoder_layer(
                hidden_states,
                None if routes is None else routes[..., layer_idx],
                cache=cache,
                dispatch_plan=None if plans is None else plans[layer_idx],
                output_router_logits=output_router_logits,
                **layer_kwargs,
                **kwargs,
            )
            routes_taken.append(route)
            router_logits.append(logits)

        return DuoModelOutputWithPast(
            last_hidden_state=self.finalize(hidden_states),
            cache=cache if use_cache else None,
            routes=torch.stack(routes_taken, dim=-1),
            router_logits=None if router_logits[0] is None else torch.stack(router_logits, dim=2),
        )


class DuoLlamaForCausalLM(DuoCausalLMMixin, DuoLlamaPreTrainedModel, GenerationMixin):
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        routes: torch.LongTensor | None = None,
        routing: str | None = None,
        budget=None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> DuoCausalLMOutputWithPast:
        r"""
        routes (`torch.LongTensor` of shape `[batch, seq, layers]`, *optional*):
            Explicit choice codes (`SMALL`, `BIG`, `SKIP`) for every token and layer; must be allowed by
            `config.route_options`. Overrides the routing mode. With a `cache`, either the routes of this call's
            tokens or routes from position 0 covering at least them (what `generate(ids, routes=...)` needs: the
            prompt length + `max_new_tokens` positions); the model takes the slice at the cache position.
        routing (`str`, *optional*):
            Routing for this call (`routes.ROUTING_MODES`: `random`, `fixed`, `explicit`, `learned`, `oracle`; or
            a uniform pattern, `all-small` / `all-big` / `all-skip`), instead of `config.routing_mode`. Under
            `learned`, training mode mixes the module outputs
            with the router probabilities and evaluation mode runs each token's argmax choice only. `oracle` needs
            `labels`: every token takes the pattern with its lowest loss under `budget` (the prefix-tree search of
            `duo_llm_hf.oracle.engine`, without gradients); `routes` and `token_losses` are the oracle's, `loss`
            their mean, `logits` each token's under its own route. Extra keywords for `oracle`: `causal=True` (the
            causally consistent oracle: later tokens see the keys and values of the routes chosen for earlier
            ones), `chunk_tokens` (memory), `route_options` (a subset of the model's).
        budget (`int`, `str` or `dict`, *optional*):
            The oracle's budget, in layers: None (every pattern), a BIG count (`4`), counts per choice
            (`{"big": 6, "skip": 6}`), or a BIG count that falls with the position (`"6:2"`).
        output_router_logits (`bool`, *optional*, defaults to `config.output_router_logits`):
            Return `router_logits` also when the routes are given (`routes=` or a non-learned mode): each router's
            logits on the FFN input of the given route (teacher forcing); and, when `config.router_budget` is set,
            the budget loss as `aux_loss`, added to `loss` times `config.router_aux_loss_coef`.
        """
        if routing == "oracle":
            return oracle_forward(self, input_ids, labels, budget, attention_mask=attention_mask, **kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs: DuoModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routes=routes,
            routing=routing,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = per_token = aux_loss = None
        if labels is not None:
            per_token, mask = token_losses(logits, labels)
            loss = mean_loss(per_token, mask, num_items_in_batch)
        if output_router_logits and self.config.router_budget is not None and outputs.router_logits is not None:
            seq_len = outputs.router_logits.shape[1]
            token_mask = attention_mask[:, -seq_len:] if attention_mask is not None else None
            aux_loss = budget_loss(
                outputs.router_logits, self.config.router_budget, token_mask, router_temperature(self)
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return DuoCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routes=outputs.routes,
            token_losses=per_token,
            router_logits=outputs.router_logits,
        )


__all__ = [
    "DuoCausalLMOutputWithPast",
    "DuoLlamaDecoderLayer",
    "DuoLlamaForCausalLM",
    "DuoLlamaMLP",
    "DuoLlamaModel",
    "DuoLlamaPreTrainedModel",
    "DuoModelOutputWithPast",
]
