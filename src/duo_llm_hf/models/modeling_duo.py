"""What every Duo model (DuoLlama, DuoOPT) shares around its architecture-specific blocks.

A Duo model provides, per architecture, only `embed` (token and position embeddings plus the keyword arguments
its layers take), decoder layers with `attend` / `mlp` (a `DuoFFN`) / `merge`, `finalize` (final norm and
projection), `lm_head` and its dense counterpart with the key renames between the two. The rest is here, once: the
output classes, route resolution for the routing modes, the layer loop, the causal-LM loss and output assembly,
`set_routing`, and `from_dense` / `to_dense`. Like `routing.py`, this file is copied next to a saved model for
``trust_remote_code``, so it imports only torch and transformers.

The model forwards follow transformers' own Llama: the KV cache is the `cache` argument and output field (the
name `generate` passes; `past_key_values` still works with transformers' FutureWarning, as for
`LlamaForCausalLM`), `output_hidden_states` / `output_attentions` are captured by transformers' output hooks
(`capture_outputs`, `_can_record_outputs` of the model class) and `return_dict=False` returns a tuple.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .configuration_duo import DUO_CONFIG_FIELDS
from .losses import mean_loss, token_losses
from .router import DuoRouter, router_parameters
from .routes import (
    DispatchPlan,
    DuoFFN,
    RouteSampler,
    allowed_codes,
    check_routes,
    dispatch_plans,
    validate_route_fields,
)

# transformers 5.24 renamed the KV cache argument of its attention modules from `past_key_values` to `cache`; an
# older transformers would take our `cache=` as an unknown keyword and silently decode without the cache.
if "cache" not in inspect.signature(create_causal_mask).parameters:
    raise ImportError(
        f"Duo models need transformers>=5.24 (the KV cache argument is named `cache`), found "
        f"{transformers.__version__}; upgrade with: pip install 'transformers>=5.24,<6'."
    )

# Keys of the parts a dense model does not have: the small FFNs and the routers.
DUO_ONLY_KEYS = (".mlp.small.", ".mlp.router.")
# Config keys that name a model class or a file, not the architecture: never copied between dense and Duo.
CONFIG_KEYS_NOT_COPIED = frozenset({"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"})


@dataclass
class DuoModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the routes taken, `[batch, seq, layers]`, and the router probabilities.

    `router_probs` (`[batch, seq, layers, 3]`, indexed by choice code) is set when the routers decided
    (learned routing) or were asked (`output_router_probs=True`), else None.
    """

    routes: torch.LongTensor | None = None
    router_probs: torch.FloatTensor | None = None


@dataclass
class DuoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the routes taken and, when labels are given, the per-token losses.

    `token_losses[b, t]` is the cross-entropy of predicting `labels[b, t + 1]` (0 where there is no target);
    `loss` is their mean over positions with a target. `router_probs` (`[batch, seq, layers, 3]`, float32,
    indexed by choice code: `router_probs[..., BIG]` is P_big) is set under learned routing (budget loss) and
    with `output_router_probs=True`.
    """

    routes: torch.LongTensor | None = None
    token_losses: torch.FloatTensor | None = None
    router_probs: torch.FloatTensor | None = None


def make_duo_ffn(config, big: torch.nn.Module, small: torch.nn.Module) -> DuoFFN:
    """A `DuoFFN` of `big` and `small`, with a router when the config asks for one (`use_router`)."""
    router = None
    if config.use_router:
        router = DuoRouter(config.hidden_size, allowed_codes(config), config.router_temperature)
    return DuoFFN(big=big, small=small, router=router, dispatch_mode=getattr(config, "ffn_dispatch", "fast"))


class DuoDecoderLayerMixin:
    """`forward` of a Duo decoder layer, built from the layer's `attend`, `mlp` (a `DuoFFN`) and `merge`.

    `attend` and `merge` split the layer around its FFN so that the oracle can run the attention of a prefix
    once and every FFN choice on it.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: torch.LongTensor | None,
        cache: Cache | None = None,
        route_plan: DispatchPlan | None = None,
        output_router_probs: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor | None]:
        """Return the layer output, the route taken (`route`, or the router's choice when it is None) and the
        router probabilities (`[batch, seq, 3]`, None when the route was given).

        With `output_router_probs` and a given route, a layer with a router still returns what its router says
        about the FFN input of that route (teacher forcing, as when a router learns the oracle's choices).
        `kwargs` are the layer keyword arguments made by the model's `embed` (attention mask, positions).
        `route_plan` is the route's grouping for the fast dispatch, when the model made it for all layers.
        """
        residual, ffn_input = self.attend(hidden_states, cache=cache, **kwargs)
        if route is None:
            ffn_output, route, router_probs = self.mlp.forward_learned(ffn_input)
        else:
            (ffn_output, route), router_probs = self.mlp(ffn_input, route, route_plan), None
            if output_router_probs and self.mlp.router is not None:
                router_probs = self.mlp.router(ffn_input)[0]
        return self.merge(residual, ffn_output), route, router_probs


class DuoModelMixin:
    """Route resolution and the layer loop of a Duo decoder stack.

    The model class provides `config`, `layers`, `route_sampler`, `embed(...) -> (hidden, layer_kwargs)` and
    `finalize(hidden)`. With a KV cache, each call routes only its new tokens: random routing draws their routes
    from the sampler (a cached decoding step draws one token's routes; `routes` of the output returns them, and a
    full forward given those routes reproduces the cached run), fixed routing repeats the pattern, learned routing
    lets each layer's router decide from the token's FFN input, and explicit routes are sliced at the cache
    position (`routes_of_call`).
    """

    def resolve_routes(
        self,
        routes: torch.Tensor | None,
        routing: str | None,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        past_seen: int = 0,
    ) -> torch.LongTensor | None:
        """The route tensor for the `seq_len` tokens of this call (after `past_seen` cached ones): the given
        `routes` (see `routes_of_call`), or one made by the routing mode.

        `None` for learned routing, where each layer's router decides from its FFN input.
        """
        config = self.config
        mode = routing or ("explicit" if routes is not None else config.routing_mode)
        if routes is not None:
            routes = routes_of_call(routes, past_seen, seq_len)
            check_routes(routes, config, batch_size, seq_len)
            return routes.to(device=device, dtype=torch.long)
        shape = (batch_size, seq_len, config.num_hidden_layers)
        if mode == "random":
            return self.route_sampler.sample(shape, device)
        if mode == "fixed":
            if config.fixed_pattern is None:
                raise ValueError(
                    "routing='fixed' needs config.fixed_pattern; set it with model.set_routing('fixed', pattern)."
                )
            return torch.tensor(config.fixed_pattern, device=device).expand(shape)
        if mode == "learned":
            if not config.use_router:
                raise ValueError("routing='learned' needs routers; add them with set_routing('learned').")
            return None
        if mode == "explicit":
            raise ValueError(
                "routing_mode='explicit' needs a route tensor: call the model with routes=[batch, seq, layers]."
            )
        raise ValueError(
            f"routing={mode!r} is not a routing mode of {type(self).__name__}; use random, fixed or explicit."
        )

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
        **kwargs,
    ) -> DuoModelOutputWithPast:
        # Unlike transformers' Llama, no cache by default in training mode: a training step never decodes.
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        hidden_states, layer_kwargs = self.embed(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        batch_size, seq_len = hidden_states.shape[:2]
        routes = self.resolve_routes(routes, routing, batch_size, seq_len, hidden_states.device, past_seen)

        # The fast dispatch groups the rows of every layer by choice once per forward (one host sync).
        fast = getattr(self.config, "ffn_dispatch", "fast") == "fast"
        plans = dispatch_plans(routes) if routes is not None and fast else None
        routes_taken, router_probs = [], []
        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states, route, probs = decoder_layer(
                hidden_states,
                None if routes is None else routes[..., layer_idx],
                cache=cache,
                route_plan=None if plans is None else plans[layer_idx],
                **layer_kwargs,
                **kwargs,
            )
            routes_taken.append(route)
            router_probs.append(probs)

        return DuoModelOutputWithPast(
            last_hidden_state=self.finalize(hidden_states),
            cache=cache if use_cache else None,
            routes=torch.stack(routes_taken, dim=-1),
            router_probs=None if router_probs[0] is None else torch.stack(router_probs, dim=2),
        )


def routes_of_call(routes: torch.Tensor, past_seen: int, seq_len: int) -> torch.Tensor:
    """The routes of the `seq_len` tokens of a call that follow `past_seen` cached tokens.

    `routes` covers either those tokens alone (`[batch, seq_len, layers]`) or the sequence from position 0 up to at
    least the last of them (`[batch, >= past_seen + seq_len, layers]`): `generate(ids, routes=...)` passes the same
    tensor, covering the prompt and every new token, at each step, and the model takes the step's slice. Positions
    are columns of the (left-padded) token tensor, as in the sequence `generate` returns.
    """
    if not isinstance(routes, torch.Tensor) or routes.dim() != 3 or routes.shape[1] == seq_len:
        return routes  # check_routes explains what is wrong with anything else
    if routes.shape[1] < past_seen + seq_len:
        raise ValueError(
            f"routes: covers {routes.shape[1]} positions, but this call needs the routes of positions {past_seen} to "
            f"{past_seen + seq_len - 1}; pass [batch, {seq_len}, layers] for its tokens, or routes from position 0 "
            "that cover the whole sequence (for generate: the prompt length + max_new_tokens)."
        )
    return routes[:, past_seen : past_seen + seq_len]


class DuoCausalLMMixin:
    """The causal-LM forward (logits, loss, per-token losses, routes), `set_routing` and the conversion from and
    to the dense architecture (`from_dense` / `to_dense`) of a Duo model.

    The model class provides `config_class`, `config`, `model` (a Duo decoder stack with `route_sampler`),
    `lm_head`, and for the conversion: `dense_class` (the transformers causal LM it converts, e.g.
    `LlamaForCausalLM`), `_dense_to_duo_keys` / `_duo_to_dense_keys` (the state-dict key renames, applied in
    order) and `_other_dense_hint` (what `from_dense` tells the caller who passed another architecture).
    """

    dense_class: type[PreTrainedModel]
    _dense_to_duo_keys: Mapping[str, str]
    _duo_to_dense_keys: Mapping[str, str]
    _other_dense_hint: str

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
        **kwargs,
    ) -> DuoCausalLMOutputWithPast:
        r"""
        routes (`torch.LongTensor` of shape `[batch, seq, layers]`, *optional*):
            Explicit choice codes (`SMALL`, `BIG`, `SKIP`) for every token and layer; must be allowed by
            `config.route_options`. Overrides the routing mode. With a `cache`, either the routes of this call's
            tokens or routes from position 0 covering at least them (what `generate(ids, routes=...)` needs: the
            prompt length + `max_new_tokens` positions); the model takes the slice at the cache position.
        routing (`str`, *optional*):
            Routing mode for this call (`random`, `fixed`, `explicit`, `learned`, `oracle`), instead of
            `config.routing_mode`. Under `learned`, training mode mixes the module outputs with the router
            probabilities and evaluation mode runs each token's argmax choice only. `oracle` needs `labels`:
            every token takes the pattern with its lowest loss under `budget` (the prefix-tree search of
            `duo_llm_hf.oracle.engine`, without gradients); `routes` and `token_losses` are the oracle's, `loss` their
            mean, `logits` each token's under its own route. Extra keywords for `oracle`: `causal=True` (the
            causally consistent oracle: later tokens see the keys and values of the routes chosen for earlier
            ones), `chunk_tokens` (memory), `route_options` (a subset of the model's).
            With `output_router_probs=True`, a model with routers returns `router_probs` also when the routes
            are given (`routes=` or a non-learned mode): each router's probabilities on the FFN input of the
            given route.
        budget (`int`, `str` or `dict`, *optional*):
            The oracle's budget: None (every pattern), a BIG count (`4`), counts per choice
            (`{"big": 6, "skip": 6}`), or a BIG count that falls with the position (`"6:2"`).
        """
        if routing == "oracle":
            try:  # the engine is part of the package, not of the files a saved model ships for remote code
                from duo_llm_hf.oracle.engine import oracle_routing
            except ImportError as error:
                raise ImportError(
                    "routing='oracle' needs the duo-llm-hf package (the oracle engine): pip install duo-llm-hf."
                ) from error

            found = oracle_routing(self, input_ids, labels, budget, attention_mask=attention_mask, **kwargs)
            return DuoCausalLMOutputWithPast(
                loss=found.loss, logits=found.logits, routes=found.routes, token_losses=found.token_losses
            )
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routes=routes,
            routing=routing,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = per_token = None
        if labels is not None:
            per_token, mask = token_losses(logits, labels)
            loss = mean_loss(per_token, mask, num_items_in_batch)
        return DuoCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routes=outputs.routes,
            token_losses=per_token,
            router_probs=outputs.router_probs,
        )

    def set_routing(
        self,
        mode: str,
        fixed_pattern: list[int | str] | str | None = None,
        route_probs: dict[str, float] | None = None,
        route_seed: int | None = None,
    ):
        """Change the routing mode (and its pattern, probabilities or seed), validated like the config.

        `mode="learned"` on a model without routers adds freshly initialised ones (`config.use_router`).
        """
        config = self.config
        previous = {k: getattr(config, k) for k in DUO_CONFIG_FIELDS}
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
        if config.use_router:
            self._add_missing_routers()
        return self

    def _add_missing_routers(self) -> None:
        config = self.config
        for layer in self.model.layers:
            if layer.mlp.router is None:
                router = DuoRouter(config.hidden_size, allowed_codes(config), config.router_temperature)
                self._init_weights(router)
                layer.mlp.router = router.to(device=self.device, dtype=self.dtype)

    def router_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of every layer's router (empty without routers)."""
        return list(router_parameters(self))

    @classmethod
    def from_dense(cls, dense: PreTrainedModel, small_intermediate_size: int | None = None, **duo_kwargs):
        """Build a Duo model whose attention, norms, embeddings and big FFNs are `dense`'s weights.

        `dense` is a `cls.dense_class` (see the model class for which checkpoints convert). The small FFNs (inner
        size `small_intermediate_size`, by default the big FFN's // 16) are freshly initialised. `duo_kwargs` are
        Duo config fields (`route_options`, `routing_mode`, ...). With every route on BIG the Duo logits equal
        `dense`'s logits.
        """
        dense_type = cls.dense_class.config_class.model_type
        model_type = getattr(getattr(dense, "config", None), "model_type", None)
        if not isinstance(dense, cls.dense_class) or model_type != dense_type:
            raise TypeError(
                f"from_dense needs a transformers {cls.dense_class.__name__} (model_type {dense_type!r}), got "
                f"{type(dense).__name__} (model_type {model_type!r}). {cls._other_dense_hint}; for a Duo model, "
                "take its big path with to_dense() first."
            )
        config = cls.config_class(
            **dense_config_fields(dense.config), small_intermediate_size=small_intermediate_size, **duo_kwargs
        )
        config._attn_implementation = dense.config._attn_implementation
        duo = cls(config).to(dtype=dense.dtype, device=dense.device)
        load_dense_into_duo(duo, rename_keys(dense.state_dict(), cls._dense_to_duo_keys))
        return duo

    def to_dense(self) -> PreTrainedModel:
        """Export the all-big path as a plain `dense_class` model (the small FFNs and the routers are dropped)."""
        config = self.dense_class.config_class(**dense_config_fields(self.config))
        config._attn_implementation = self.config._attn_implementation
        dense = self.dense_class(config).to(dtype=self.dtype, device=self.device)
        dense.load_state_dict(rename_keys(big_path_state(self), self._duo_to_dense_keys), strict=True)
        return dense


def dense_config_fields(config) -> dict:
    """The architecture fields of a config, without class/file keys and without the Duo fields."""
    dropped = CONFIG_KEYS_NOT_COPIED.union(DUO_CONFIG_FIELDS)
    return {k: v for k, v in config.to_dict().items() if k not in dropped}


def rename_keys(state: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A state dict with every occurrence of each `renames` key replaced by its value, in order."""
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def big_path_state(duo: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a Duo model without its small FFNs and routers: what its dense export holds."""
    return {k: v for k, v in duo.state_dict().items() if not any(part in k for part in DUO_ONLY_KEYS)}


def load_dense_into_duo(duo: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a renamed dense state dict into a Duo model; only the small FFNs may be left without weights."""
    missing, unexpected = duo.load_state_dict(state, strict=False)
    not_small = [k for k in missing if not any(part in k for part in DUO_ONLY_KEYS)]
    if unexpected or not_small:
        raise ValueError(
            f"from_dense: weights do not match a Duo model (missing {not_small}, unexpected {unexpected})."
        )


__all__ = [
    "CONFIG_KEYS_NOT_COPIED",
    "DUO_CONFIG_FIELDS",
    "DuoCausalLMMixin",
    "DuoCausalLMOutputWithPast",
    "DuoDecoderLayerMixin",
    "DuoModelMixin",
    "DuoModelOutputWithPast",
    "big_path_state",
    "dense_config_fields",
    "load_dense_into_duo",
    "make_duo_ffn",
    "rename_keys",
    "routes_of_call",
]
