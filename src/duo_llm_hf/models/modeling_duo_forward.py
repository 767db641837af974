"""The forwards every Duo architecture shares: the decoder layer's, the decoder stack's and the causal LM's.

A Duo model file (`modeling_duo_llama.py`, `modeling_duo_opt.py`) writes out only what its architecture does
differently: the layer's `attend` (attention block, then the FFN input) and `merge` (adding the FFN output), the
stack's `embed` (token and position embeddings, the attention mask) and `finalize` (final norm and projections),
and the modules of each. The forwards below run those pieces in the same order for every architecture:

    embed -> for each layer: attend -> routed FFN (`DuoFFN`) -> merge -> finalize -> lm_head -> losses

Like every module of `duo_llm_hf.models`, this file is copied next to a saved model for ``trust_remote_code``, so it
imports only torch, transformers and the files next to it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .losses import mean_loss, token_losses, usage_loss
from .modeling_duo import DuoCausalLMOutputWithPast, DuoModelOutputWithPast, oracle_forward, resolve_routes
from .routed_ffn import DispatchPlan, dispatch_plans, router_temperature


class DuoDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer whose FFN is a `DuoFFN` (`self.mlp`).

    `attend` and `merge` (written by each architecture) split the layer around its FFN so that the oracle can run
    the attention of a prefix once and every FFN choice on it; `forward` chains them.
    """

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


class DuoModelForward:
    """The forward of a Duo decoder stack: resolve the routes for the routing mode and run every layer.

    The model class provides `config`, `layers` (`DuoDecoderLayer`s), `route_sampler`, and its `embed` and
    `finalize`.
    """

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
        # Unlike transformers' models, no cache by default in training mode: a training step never decodes.
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


class DuoCausalLMForward:
    """The forward of a Duo causal LM (the decoder stack `model`, then `lm_head` and the losses), and the
    `auto_map` a saved folder needs to load with `AutoModel` as well as `AutoModelForCausalLM`."""

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
            a uniform pattern, `all-small` / `all-big` / `all-skip`), instead of `config.routing`. Under
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
            logits on the FFN input of the given route (teacher forcing); and, when `config.router_target_usage` is set,
            the usage loss as `aux_loss`, added to `loss` times `config.router_aux_loss_coef`.
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
        if output_router_logits and self.config.router_target_usage is not None and outputs.router_logits is not None:
            seq_len = outputs.router_logits.shape[1]
            token_mask = attention_mask[:, -seq_len:] if attention_mask is not None else None
            aux_loss = usage_loss(
                outputs.router_logits, self.config.router_target_usage, token_mask, router_temperature(self)
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with an `AutoModel` entry (the decoder stack) next to the
        `AutoModelForCausalLM` one in the saved `auto_map`: transformers writes only the saved class's entry, and
        `AutoModel.from_pretrained(folder, trust_remote_code=True)` would not know the model type without it."""
        if self._auto_class is not None:
            stack = type(self.model)
            entry = f"{stack.__module__.rsplit('.', 1)[-1]}.{stack.__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": entry}
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["DuoCausalLMForward", "DuoDecoderLayer", "DuoModelForward"]
