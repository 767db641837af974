"""Routes: choice codes, route validation, random route sampling and the routed FFN.

A *route* tensor has shape ``[batch, seq_len, num_layers]`` and holds one choice code per token and layer; one
vector of ``num_layers`` codes is a *pattern*. This module is shared by every Duo model (Llama, OPT) and is copied
next to the modeling file when a model is saved with ``trust_remote_code`` support, so it imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SMALL = 0
BIG = 1
SKIP = 2
CHOICE_NAMES = ("small", "big", "skip")
CHOICE_CODES = {name: code for code, name in enumerate(CHOICE_NAMES)}
# One letter per choice, for patterns printed in reports: "sBB-" = small, big, big, skip.
CHOICE_LETTERS = ("s", "B", "-")
ROUTING_MODES = ("random", "fixed", "explicit", "learned")
# Implementations of DuoFFN.dispatch: the grouped fast path and the straightforward one it is checked against.
DISPATCH_MODES = ("fast", "reference")


def choice_code(choice: int | str, field: str = "choice") -> int:
    """Return the code of a choice given by name (``"big"``) or code (``BIG``); raise a clear error otherwise."""
    if isinstance(choice, str) and choice.lower() in CHOICE_CODES:
        return CHOICE_CODES[choice.lower()]
    if isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < len(CHOICE_NAMES):
        return choice
    raise ValueError(
        f"{field}: {choice!r} is not a route choice; use one of {list(CHOICE_NAMES)} "
        f"or the codes SMALL={SMALL}, BIG={BIG}, SKIP={SKIP}."
    )


def pattern_to_str(pattern: Iterable[int]) -> str:
    """Render a pattern as letters, e.g. ``[SMALL, BIG, SKIP] -> "sB-"``."""
    return "".join(CHOICE_LETTERS[int(c)] for c in pattern)


def parse_pattern(pattern: str | Sequence[int | str], field: str = "pattern") -> list[int]:
    """Parse a pattern given as letters (``"sBB-"``), names or codes into a list of codes."""
    if isinstance(pattern, str):
        letters = {letter: code for code, letter in enumerate(CHOICE_LETTERS)}
        letters.update({"b": BIG, "S": SMALL})
        bad = [ch for ch in pattern if ch not in letters]
        if bad:
            raise ValueError(
                f"{field}: {pattern!r} has letters {bad} that are not choices; use s (small), B (big), - (skip)."
            )
        return [letters[ch] for ch in pattern]
    return [choice_code(c, field) for c in pattern]


def validate_route_fields(config) -> None:
    """Validate and normalise the Duo routing fields of a config in place.

    Every error names the field, the bad value and what is allowed. Normalised forms: ``route_options`` is a
    list of names in canonical order (small, big, skip), ``route_probs`` a dict over ``route_options``,
    ``fixed_pattern`` a list of codes.
    """
    n_layers = config.num_hidden_layers
    big_size = config.intermediate_size
    # The big inner size may be stored under another name (DuoOPT: ffn_dim, aliased by attribute_map).
    big_name = getattr(config, "attribute_map", {}).get("intermediate_size", "intermediate_size")

    if config.small_intermediate_size is None:
        config.small_intermediate_size = max(1, big_size // 16)
    small = config.small_intermediate_size
    if not isinstance(small, int) or isinstance(small, bool) or not 1 <= small <= big_size:
        raise ValueError(
            f"small_intermediate_size: {small!r} is not allowed; it must be an integer in 1..{big_size} "
            f"({big_name}), by default {big_name} // 16."
        )

    options = config.route_options
    if isinstance(options, str) or not options:
        raise ValueError(
            f"route_options: {options!r} is not allowed; give a non-empty list of choices from {list(CHOICE_NAMES)}."
        )
    codes = sorted({choice_code(c, "route_options") for c in options})
    config.route_options = [CHOICE_NAMES[c] for c in codes]

    if config.routing_mode not in ROUTING_MODES:
        raise ValueError(
            f"routing_mode: {config.routing_mode!r} is not a routing mode; use one of {list(ROUTING_MODES)}."
        )

    config.route_probs = _normalised_route_probs(config.route_probs, config.route_options)

    if config.fixed_pattern is not None:
        pattern = parse_pattern(config.fixed_pattern, "fixed_pattern")
        if len(pattern) != n_layers:
            raise ValueError(
                f"fixed_pattern: {config.fixed_pattern!r} has {len(pattern)} choices but the model has "
                f"{n_layers} layers (num_hidden_layers); give one choice per layer."
            )
        outside = sorted({CHOICE_NAMES[c] for c in pattern} - set(config.route_options))
        if outside:
            raise ValueError(
                f"fixed_pattern: {config.fixed_pattern!r} uses {outside}, which route_options "
                f"{config.route_options} does not allow."
            )
        config.fixed_pattern = pattern
    elif config.routing_mode == "fixed":
        raise ValueError(
            "fixed_pattern: None is not allowed with routing_mode='fixed'; give one choice per layer."
        )

    seed = config.route_seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"route_seed: {seed!r} is not allowed; it must be a non-negative integer.")

    dispatch = getattr(config, "ffn_dispatch", "fast")
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"ffn_dispatch: {dispatch!r} is not allowed; use one of {list(DISPATCH_MODES)}.")

    _validate_router_fields(config)


def _validate_router_fields(config) -> None:
    # Getattr defaults: configs of other Duo models may not declare the router fields.
    use_router = getattr(config, "use_router", False)
    if not isinstance(use_router, bool):
        raise ValueError(f"use_router: {use_router!r} is not allowed; it must be True or False.")
    # Learned routing needs routers; a model that has them keeps them (and their weights) in every mode.
    config.use_router = use_router or config.routing_mode == "learned"
    tau = getattr(config, "router_temperature", 1.0)
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(
            f"router_temperature: {tau!r} is not allowed; it must be a finite number > 0 "
            f"(P = softmax(logits / tau))."
        )
    config.router_temperature = float(tau)


def _normalised_route_probs(probs: Mapping[str, float] | None, options: list[str]) -> dict[str, float]:
    if probs is None:
        # The paper's stage 1: p_big = 0.5 over small/big; otherwise uniform over the allowed choices.
        return {name: 1.0 / len(options) for name in options}
    if not isinstance(probs, Mapping):
        raise ValueError(
            f"route_probs: {probs!r} is not allowed; give a dict such as {{'small': 0.5, 'big': 0.5}}."
        )
    out = {}
    for key, value in probs.items():
        name = CHOICE_NAMES[choice_code(key, "route_probs")]
        if name not in options:
            raise ValueError(
                f"route_probs: {dict(probs)!r} gives a probability to {name!r}, which route_options {options} does "
                f"not allow."
            )
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"route_probs: {name!r} has probability {value!r}; probabilities must be finite and >= 0."
            )
        out[name] = float(value)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"route_probs: {dict(probs)!r} sums to {total:g}; the probabilities must sum to 1.")
    return {name: out.get(name, 0.0) for name in options}


def allowed_codes(config) -> list[int]:
    """The codes of the config's ``route_options``, in canonical order."""
    return [CHOICE_CODES[name] for name in config.route_options]


def check_routes(routes: torch.Tensor, config, batch_size: int, seq_len: int) -> None:
    """Check an explicit route tensor: shape ``[batch, seq, layers]``, integer dtype, allowed codes only."""
    n_layers = config.num_hidden_layers
    if not isinstance(routes, torch.Tensor):
        raise TypeError(
            f"routes: expected a torch.LongTensor of shape [batch, seq, layers], got {type(routes).__name__}."
        )
    if routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool:
        raise TypeError(
            f"routes: dtype {routes.dtype} is not allowed; use an integer tensor (torch.long) of choice codes."
        )
    expected = (batch_size, seq_len, n_layers)
    if tuple(routes.shape) != expected:
        raise ValueError(
            f"routes: shape {tuple(routes.shape)} does not match [batch, seq_len, num_layers] = {list(expected)}."
        )
    allowed = torch.tensor(allowed_codes(config), device=routes.device)
    bad = ~torch.isin(routes, allowed)
    if bad.any():
        found = sorted(set(routes[bad].tolist()))
        raise ValueError(
            f"routes: codes {found} are not allowed by route_options {config.route_options} "
            f"(codes {allowed.tolist()}; SMALL={SMALL}, BIG={BIG}, SKIP={SKIP})."
        )


def route_fractions(routes: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Fraction of (token, layer) pairs that took each choice; ``mask`` ([batch, seq]) selects the tokens."""
    if mask is not None:
        routes = routes[mask.bool()]
    counts = torch.bincount(routes.reshape(-1).long(), minlength=len(CHOICE_NAMES)).double()
    total = counts.sum().clamp_min(1)
    return {name: (counts[code] / total).item() for code, name in enumerate(CHOICE_NAMES)}


def route_usage(routes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.LongTensor:
    """Per-layer x per-position usage counts of each choice (the data of the paper's Fig. 2 and Fig. 3).

    ``routes``: ``[batch, seq, layers]`` choice codes (routes taken by any routing mode, or the oracle's
    argmin patterns); ``mask``: ``[batch, seq]``, True for the tokens to count (e.g. the attention mask).
    Returns counts of shape ``[3, layers, seq]``: ``usage[c, l, t]`` = number of sequences whose token at
    position ``t`` took choice code ``c`` (``SMALL``, ``BIG``, ``SKIP``) in layer ``l``. Positions are indices
    in the route tensor (position 0 = first token; use right padding). Counts add up over batches of the same
    length; `analysis.usage_fraction` turns them into the fraction of tokens per (layer, position).
    """
    if routes.dim() != 3:
        raise ValueError(f"routes: expected shape [batch, seq, layers], got {tuple(routes.shape)}.")
    one_hot = torch.nn.functional.one_hot(routes.long(), len(CHOICE_NAMES))  # [B, T, L, 3]
    if mask is not None:
        one_hot = one_hot * mask.to(one_hot.device).bool()[:, :, None, None]
    return one_hot.sum(0).permute(2, 1, 0).contiguous()


class RouteSampler:
    """Seeded sampler of random routes from the config's ``route_probs``.

    It owns its generator, so routes are reproducible for a given seed whatever else draws random numbers, and
    its ``state_dict`` is checkpointed (as JSON, `checkpointing.RouteSamplerState`) so a resumed run draws the
    same routes.
    """

    def __init__(self, probs: Mapping[str, float], seed: int = 0):
        names = [name for name, p in probs.items() if p > 0]
        # Explicit CPU tensors: models are built under a meta-device context when loaded with from_pretrained.
        self.codes = torch.tensor([CHOICE_CODES[n] for n in names], dtype=torch.long, device="cpu")
        cumulative = torch.tensor([probs[n] for n in names], dtype=torch.float64, device="cpu").cumsum(0)
        self.cumulative = (cumulative / cumulative[-1]).float()
        self.seed = seed
        # Routes are drawn on the CPU and moved to the device: the same seed gives the same routes anywhere.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.LongTensor:
        """Draw a route tensor of the given shape."""
        u = torch.rand(tuple(shape), generator=self.generator, device="cpu")
        index = torch.bucketize(u, self.cumulative, right=True).clamp_max(len(self.codes) - 1)
        return self.codes[index].to(device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["rng_state"])


@dataclass(frozen=True)
class DispatchPlan:
    """The rows of one layer grouped by choice: what the fast dispatch needs to gather, run and scatter.

    ``order`` lists the row indices sorted by choice code (SMALL rows, then BIG, then SKIP; stable);
    ``counts`` the number of rows of each code as Python ints, so slicing ``order`` needs no host-device
    synchronisation.
    """

    order: torch.LongTensor
    counts: tuple[int, int, int]

    @classmethod
    def from_route(cls, route: torch.Tensor) -> DispatchPlan:
        """The plan of one layer's route (any shape; rows in ``reshape(-1)`` order)."""
        return dispatch_plans(route.reshape(-1, 1))[0]


def dispatch_plans(routes: torch.Tensor) -> list[DispatchPlan]:
    """One `DispatchPlan` per layer of a route tensor ``[..., num_layers]``.

    One sort and one transfer of the counts to the host for all layers, instead of one ``nonzero`` per module
    and layer: on CUDA each of those synchronises the host with the device.
    """
    n_layers = routes.shape[-1]
    per_layer = routes.reshape(-1, n_layers).t().long()
    n_codes = len(CHOICE_NAMES)
    order = torch.argsort(per_layer, dim=1, stable=True)
    offsets = torch.arange(n_layers, device=routes.device).unsqueeze(1) * n_codes
    counts = torch.bincount((per_layer + offsets).reshape(-1), minlength=n_layers * n_codes)
    counts = counts.view(n_layers, n_codes).tolist()
    return [DispatchPlan(order[layer], tuple(counts[layer])) for layer in range(n_layers)]


def set_ffn_dispatch(model: nn.Module, mode: str) -> nn.Module:
    """Switch every `DuoFFN` of ``model`` (and ``config.ffn_dispatch``) to ``"fast"`` or ``"reference"``."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"ffn_dispatch: {mode!r} is not allowed; use one of {list(DISPATCH_MODES)}.")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "ffn_dispatch"):
        config.ffn_dispatch = mode
    for module in model.modules():
        if isinstance(module, DuoFFN):
            module.dispatch_mode = mode
    return model


class DuoFFN(nn.Module):
    """A routed FFN: a big and a small module side by side; each token runs only the module it is routed to.

    Tokens routed to ``SKIP`` run neither, so the FFN adds nothing for them. Dispatch gathers the tokens of each
    module, runs the module on those rows only, and scatters the result back: compute falls with the route.

    ``dispatch_mode`` picks the implementation: ``"fast"`` (one sorted gather of the rows, each module on a
    contiguous slice, in-place scatter into one output buffer, no per-module ``nonzero``; a layer whose rows
    all take one choice runs that module on every row without gathering) or ``"reference"`` (the
    straightforward gather/run/scatter per module, kept to check the fast path against). Both give the same
    outputs.
    """

    def __init__(
        self, big: nn.Module, small: nn.Module, router: nn.Module | None = None, dispatch_mode: str = "fast"
    ):
        super().__init__()
        if dispatch_mode not in DISPATCH_MODES:
            raise ValueError(
                f"dispatch_mode: {dispatch_mode!r} is not a dispatch mode; use one of {list(DISPATCH_MODES)}."
            )
        self.big = big
        self.small = small
        self.dispatch_mode = dispatch_mode
        # A learned router (router.DuoRouter): maps the FFN input to (probabilities [..., 3], argmax route).
        self.router = router

    def module_for(self, choice: int) -> nn.Module | None:
        """The module that serves a choice code (``None`` for SKIP)."""
        return {BIG: self.big, SMALL: self.small}.get(choice)

    def run_choice(self, hidden_states: torch.Tensor, choice: int) -> torch.Tensor:
        """Output of one choice for every row of ``hidden_states`` (used when all rows take the same choice)."""
        module = self.module_for(choice)
        return torch.zeros_like(hidden_states) if module is None else module(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: torch.Tensor | None = None,
        plan: DispatchPlan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the routed FFN; return its output and the route taken.

        ``hidden_states``: ``[..., hidden]``; ``route``: the choice code of each row, shape
        ``hidden_states.shape[:-1]``. A ``None`` route is learned routing: the router decides (see
        `forward_learned`, which also returns the router probabilities). ``plan``: the route's `DispatchPlan`
        when the caller made it already (one for all layers).
        """
        if route is None:
            output, route, _ = self.forward_learned(hidden_states)
            return output, route
        return self.dispatch(hidden_states, route, plan), route

    def forward_learned(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """Learned routing; return the output, the route taken (the router's argmax) and the probabilities.

        In training mode the output is the paper's soft mixture ``sum_x P_x * H_x`` over the allowed choices
        (every allowed module runs on every token, so gradients reach the router); in evaluation mode each
        token runs only its argmax choice (`dispatch`). Probabilities have shape ``[..., 3]``, indexed by
        choice code (0 for choices the router does not allow), in float32.
        """
        if self.router is None:
            raise ValueError(
                "DuoFFN got no route and has no router: pass routes, use a routing mode that makes them "
                "(random, fixed), or add routers with model.set_routing('learned')."
            )
        probs, route = self.router(hidden_states)
        if self.training:
            return self.mix(hidden_states, probs), route, probs
        return self.dispatch(hidden_states, route), route, probs

    def mix(self, hidden_states: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Soft mixture ``sum_x probs[..., x] * H_x`` of the module outputs (SKIP adds nothing)."""
        out = torch.zeros_like(hidden_states)
        for choice, module in ((BIG, self.big), (SMALL, self.small)):
            if choice in self.router.choices:
                out = out + probs[..., choice : choice + 1].to(hidden_states.dtype) * module(hidden_states)
        return out

    def dispatch(
        self, hidden_states: torch.Tensor, route: torch.Tensor, plan: DispatchPlan | None = None
    ) -> torch.Tensor:
        """Gather the rows of each choice, run its module on them only, scatter the outputs (SKIP rows stay 0)."""
        if self.dispatch_mode == "reference":
            return self.dispatch_reference(hidden_states, route)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        if plan is None:
            plan = DispatchPlan.from_route(route)
        n_small, n_big, n_skip = plan.counts
        if sum(plan.counts) != flat.shape[0]:
            raise ValueError(
                f"dispatch: the plan covers {sum(plan.counts)} rows but hidden_states has {flat.shape[0]}; "
                "make the plan from this layer's route."
            )
        for choice, count in enumerate(plan.counts):
            if count == flat.shape[0]:
                return self.run_choice(hidden_states, choice)
        # SMALL rows come first in the plan's order, then BIG; SKIP rows (last) are never gathered.
        rows = plan.order[: n_small + n_big]
        gathered = flat.index_select(0, rows)
        out = torch.zeros_like(flat) if n_skip else torch.empty_like(flat)
        for module, start, count in ((self.small, 0, n_small), (self.big, n_small, n_big)):
            if count:
                module_out = module(gathered[start : start + count])
                out.index_copy_(0, rows[start : start + count], module_out.to(out.dtype))
        return out.view_as(hidden_states)

    def dispatch_reference(self, hidden_states: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """The straightforward dispatch: for each module, find its rows, gather, run, scatter."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        flat_route = route.reshape(-1)
        out = torch.zeros_like(flat)
        for choice, module in ((BIG, self.big), (SMALL, self.small)):
            rows = (flat_route == choice).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if rows.numel() == flat.shape[0]:
                out = module(flat)
                break
            out = out.index_copy(0, rows, module(flat.index_select(0, rows)).to(out.dtype))
        return out.view_as(hidden_states)
