"""What every Duo model (DuoLlama, DuoOPT) shares besides its forward: the output classes, route resolution for
the routing modes, the oracle routing call, the routed FFN builder, `set_routing`, and `from_dense` / `to_dense`.

Each model file (`modeling_duo_llama.py`, `modeling_duo_opt.py`) writes out its own layer and embeddings; the
forwards, the same for both, are in `modeling_duo_forward.py` and call these. Like every module of
`duo_llm_hf.models`, this file is copied next to a saved model for ``trust_remote_code``, so it imports only torch,
transformers and the files next to it.

The model forwards follow transformers' own Llama: the KV cache is the `cache` argument and output field (the
name `generate` passes; `past_key_values` still works with transformers' FutureWarning, as for
`LlamaForCausalLM`), `output_hidden_states` / `output_attentions` are captured by transformers' output hooks
(`capture_outputs`, `_can_record_outputs` of the model class) and `return_dict=False` returns a tuple. Router
outputs follow Mixtral's: `router_logits` (here stacked, `[batch, seq, layers, 3]` in the choice-code layout, float32,
`-inf` for choices a router does not allow; `P = softmax(router_logits / tau)` with the routers' temperature) and,
with `output_router_logits=True` and a `config.router_target_usage`, the usage loss as `aux_loss`, added to `loss` times
`config.router_aux_loss_coef`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_duo import DUO_CONFIG_FIELDS
from .routed_ffn import DuoFFN, DuoRouter, router_parameters, router_temperature
from .routes import ROUTING_MODES, UNIFORM_PATTERNS, RouteSampler, allowed_codes, check_routes, validate_route_fields

# transformers 5.24 renamed the KV cache argument of its attention modules from `past_key_values` to `cache`; an
# older transformers would take our `cache=` as an unknown keyword and silently decode without the cache.
if "cache" not in inspect.signature(create_causal_mask).parameters:
    raise ImportError(
        f"Duo models need transformers>=5.24 (the KV cache argument is named `cache`), found "
        f"{transformers.__version__}; upgrade with: pip install 'transformers>=5.24,<6'."
    )

# Keys of the parts a dense model does not have: the small FFNs and the routers.
DUO_ONLY_KEYS = (".mlp.small.", ".mlp.router.")
# Config keys that name a model class, a file or where the weights came from (`conversion`, written by
# `duo-llm convert`), not the architecture: never copied between dense and Duo.
CONFIG_KEYS_NOT_COPIED = frozenset(
    {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "conversion"}
)
# The FFN weights of a Duo layer: a checkpoint without them is dense, and loading it would leave them random.
DUO_FFN_KEYS = (".mlp.big.", ".mlp.small.")
# The `from_pretrained` keywords that say where a config is (for reading its model_type before the weights).
CONFIG_LOCATION_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class CheckpointMismatchError(ValueError):
    """`from_pretrained` of a checkpoint that would leave Duo FFNs randomly initialised: a dense checkpoint (convert
    it with `duo-llm convert`), or an incomplete one."""


@dataclass
class DuoModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the routes taken, `[batch, seq, layers]`, and the router logits.

    `router_logits` (`[batch, seq, layers, 3]`, indexed by choice code) is set when the routers decided
    (learned routing) or were asked (`output_router_logits=True`), else None.
    """

    routes: torch.LongTensor | None = None
    router_logits: torch.FloatTensor | None = None


@dataclass
class DuoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the routes taken, the per-token losses, the router logits and `aux_loss`.

    `token_losses[b, t]` is the cross-entropy of predicting `labels[b, t + 1]` (0 where there is no target);
    `loss` is their mean over positions with a target (plus `router_aux_loss_coef * aux_loss` when `aux_loss` is
    set). `router_logits` (`[batch, seq, layers, 3]`, float32, indexed by choice code, `-inf` for choices not
    allowed) is set under learned routing and with `output_router_logits=True`; `aux_loss` is the usage loss of
    `config.router_target_usage`, set with `output_router_logits=True` when the config has a target usage.
    """

    aux_loss: torch.FloatTensor | None = None
    routes: torch.LongTensor | None = None
    token_losses: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None


def make_duo_ffn(config, big: torch.nn.Module, small: torch.nn.Module) -> DuoFFN:
    """A `DuoFFN` of `big` and `small`, with a router when the config has routers (`use_router`)."""
    router = DuoRouter(config.hidden_size, allowed_codes(config)) if config.use_router else None
    return DuoFFN(big=big, small=small, router=router)


def resolve_routes(
    config,
    route_sampler: RouteSampler,
    routes: torch.Tensor | None,
    routing: str | None,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    past_seen: int = 0,
) -> torch.LongTensor | None:
    """The route tensor for the `seq_len` tokens of a call (after `past_seen` cached ones): the given `routes`
    (see `routes_of_call`), or one made by the routing (`routing`, else `config.routing`): a routing mode or a
    uniform pattern (`all-small`, `all-big`, `all-skip`: every token on that choice in every layer).

    With a KV cache, each call routes only its new tokens: random routing draws their routes from the sampler (a
    cached decoding step draws one token's routes; `routes` of the output returns them, and a full forward given
    those routes reproduces the cached run), fixed routing repeats the pattern. `None` for learned routing, where
    each layer's router decides from the token's FFN input.
    """
    mode = routing or ("explicit" if routes is not None else config.routing)
    if routes is not None:
        routes = routes_of_call(routes, past_seen, seq_len)
        check_routes(routes, config, batch_size, seq_len)
        return routes.to(device=device, dtype=torch.long)
    shape = (batch_size, seq_len, config.num_hidden_layers)
    if mode == "random":
        return route_sampler.sample(shape, device)
    if mode in UNIFORM_PATTERNS:
        routes = torch.full(shape, UNIFORM_PATTERNS[mode], dtype=torch.long, device=device)
        check_routes(routes, config, batch_size, seq_len)
        return routes
    if mode == "fixed":
        if config.pattern is None:
            raise ValueError(
                "routing='fixed' needs config.pattern; set it with model.set_routing('fixed', pattern)."
            )
        return torch.tensor(config.pattern, device=device).expand(shape)
    if mode == "learned":
        if not config.use_router:
            raise ValueError("routing='learned' needs routers; add them with set_routing('learned').")
        return None
    if mode == "explicit":
        raise ValueError(
            "routing='explicit' needs a route tensor: call the model with routes=[batch, seq, layers]."
        )
    raise ValueError(
        f"routing={mode!r} is not a routing of {config.model_type}; use a mode {list(ROUTING_MODES)} or a uniform "
        f"pattern {list(UNIFORM_PATTERNS)}."
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


def oracle_forward(model, input_ids, labels, budget, attention_mask=None, **kwargs) -> DuoCausalLMOutputWithPast:
    """`forward(routing="oracle")`: every token takes the pattern with its lowest loss under `budget`.

    The prefix-tree search of `duo_llm_hf.oracle.engine` (without gradients), which is part of the package, not of
    the files a saved model ships for remote code; `routes` and `token_losses` are the oracle's, `loss` their
    mean, `logits` each token's under its own route.
    """
    try:
        from duo_llm_hf.oracle.engine import oracle_routing
    except ImportError as error:
        raise ImportError(
            "routing='oracle' needs the duo-llm-hf package (the oracle engine): pip install duo-llm-hf."
        ) from error

    found = oracle_routing(model, input_ids, labels, budget, attention_mask=attention_mask, **kwargs)
    return DuoCausalLMOutputWithPast(
        loss=found.loss, logits=found.logits, routes=found.routes, token_losses=found.token_losses
    )


class DuoCausalLMMixin:
    """`set_routing`, the router accessors and the conversion from and to the dense architecture (`from_dense` /
    `to_dense`) of a Duo causal LM; its forward is `modeling_duo_forward.DuoCausalLMForward`'s.

    The model class provides `config_class`, `config`, `model` (a Duo decoder stack with `route_sampler`),
    `lm_head`, and for the conversion: `dense_class` (the transformers causal LM it converts, e.g.
    `LlamaForCausalLM`), `_dense_to_duo_keys` / `_duo_to_dense_keys` (the state-dict key renames, applied in
    order) and `_other_dense_hint` (what `from_dense` tells the caller who passed another architecture).
    """

    dense_class: type[PreTrainedModel]
    _dense_to_duo_keys: Mapping[str, str]
    _duo_to_dense_keys: Mapping[str, str]
    _other_dense_hint: str

    def set_routing(
        self,
        routing: str | None = None,
        pattern: list[int | str] | str | None = None,
        route_probs: dict[str, float] | None = None,
        route_seed: int | None = None,
        *,
        mode: str | None = None,
        fixed_pattern: list[int | str] | str | None = None,
    ):
        """Change the routing (and its pattern, probabilities or seed), validated like the config.

        `routing="learned"` on a model without routers adds freshly initialised ones (`config.use_router`).
        `mode=` and `fixed_pattern=` are the 0.1 names of `routing=` and `pattern=`, still taken with a
        FutureWarning until 0.3.
        """
        for old, new, value in (("mode", "routing", mode), ("fixed_pattern", "pattern", fixed_pattern)):
            if value is not None:
                warnings.warn(f"set_routing({old}=...) is now {new}=...", FutureWarning, stacklevel=2)
        routing = mode if routing is None else routing
        pattern = fixed_pattern if pattern is None else pattern
        if routing is None:
            raise TypeError("set_routing() needs the routing, e.g. set_routing('fixed', pattern='sBsB').")
        config = self.config
        previous = {k: getattr(config, k) for k in DUO_CONFIG_FIELDS}
        config.routing = routing
        if pattern is not None:
            config.pattern = pattern
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
        temperature = router_temperature(self)  # new routers join the others' temperature
        for layer in self.model.layers:
            if layer.mlp.router is None:
                router = DuoRouter(config.hidden_size, allowed_codes(config), temperature)
                self._init_weights(router)
                layer.mlp.router = router.to(device=self.device, dtype=self.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses a dense checkpoint instead of loading it with random FFNs.

        A dense Llama or OPT checkpoint (a folder or Hub name whose config is not this Duo model's, a GGUF file,
        or weights without the Duo FFNs) raises a one-line `CheckpointMismatchError` (a `ValueError`) naming
        `duo-llm convert`, which converts it exactly (`from_dense` in Python); so does a checkpoint that lacks some
        FFN weights (incomplete, or its config changed). Everything else is transformers' `from_pretrained`.
        """
        name = os.fspath(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        if kwargs.get("gguf_file"):
            gguf_path = os.path.join(name, kwargs["gguf_file"]) if name else kwargs["gguf_file"]
            raise CheckpointMismatchError(dense_checkpoint_message(cls, gguf_path, "gguf"))
        model_type = None if kwargs.get("config") is not None else checkpoint_model_type(name, kwargs)
        if model_type is not None and model_type != cls.config_class.model_type:
            raise CheckpointMismatchError(dense_checkpoint_message(cls, name, model_type))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        missing_ffns = sorted(key for key in info["missing_keys"] if any(part in key for part in DUO_FFN_KEYS))
        big_ffns = [key for key in model.state_dict() if DUO_FFN_KEYS[0] in key]
        if missing_ffns and set(big_ffns) <= set(missing_ffns):  # not one big FFN weight: dense weights
            raise CheckpointMismatchError(dense_checkpoint_message(cls, name, None, missing_ffns))
        if missing_ffns:
            raise CheckpointMismatchError(
                f"{cls.__name__}.from_pretrained: the weights in {name} do not match its config.json "
                f"({model.config.num_hidden_layers} layers): missing {missing_ffns[0]} and {len(missing_ffns) - 1} "
                "more Duo FFN tensors, which would be randomly initialised. The checkpoint is incomplete or its "
                "config was changed; load a complete folder written by save_pretrained."
            )
        return (model, info) if want_info else model

    def router_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of every layer's router (empty without routers)."""
        return list(router_parameters(self))

    @classmethod
    def from_dense(cls, dense: PreTrainedModel, small_intermediate_size: int | None = None, **duo_kwargs):
        """Build a Duo model whose attention, norms, embeddings and big FFNs are `dense`'s weights.

        `dense` is a `cls.dense_class` (see the model class for which checkpoints convert). The small FFNs (inner
        size `small_intermediate_size`, by default the big FFN's // 16) are freshly initialised. `duo_kwargs` are
        Duo config fields (`route_options`, `routing`, ...). With every route on BIG the Duo logits equal
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


def checkpoint_model_type(name: str | None, kwargs: Mapping) -> str | None:
    """The `model_type` in the config of checkpoint `name` (`from_pretrained` keywords `kwargs`), or None when it
    cannot be read here (transformers' own loading then says why)."""
    if name is None:
        return None
    location = {key: kwargs[key] for key in CONFIG_LOCATION_KWARGS if key in kwargs}
    try:
        config_dict, _ = transformers.PreTrainedConfig.get_config_dict(name, **location)
    except (OSError, ValueError):
        return None
    return config_dict.get("model_type")


def dense_checkpoint_message(cls, name: str | None, model_type: str | None, missing: list[str] | None = None) -> str:
    """Why `cls.from_pretrained(name)` refuses a dense checkpoint, and the command that converts it exactly."""
    if missing:
        found = f"has no weights for the Duo FFNs ({len(missing)} tensors, e.g. {missing[0]})"
    elif model_type == "gguf":
        found = "is a GGUF file, a dense checkpoint"
    else:
        found = f"is a {model_type!r} checkpoint, not a {cls.config_class.model_type!r} one"
    return (
        f"{cls.__name__}.from_pretrained: {name} {found}; loading it would leave FFNs randomly initialised. "
        f"Convert a dense Llama or OPT checkpoint exactly with `duo-llm convert {name or 'SOURCE'} --output-dir DIR` "
        f"(in Python: {cls.__name__}.from_dense(dense_model)) and load DIR."
    )


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
    "CheckpointMismatchError",
    "DUO_CONFIG_FIELDS",
    "DuoCausalLMMixin",
    "DuoCausalLMOutputWithPast",
    "DuoModelOutputWithPast",
    "big_path_state",
    "dense_config_fields",
    "load_dense_into_duo",
    "make_duo_ffn",
    "oracle_forward",
    "rename_keys",
    "resolve_routes",
    "routes_of_call",
]
