"""The routed FFN of a Duo layer: a big and a small FFN, the learned router, and the dispatch of tokens to them.

Like Mixtral's sparse MoE block, `DuoFFN` takes the FFN input and returns ``(hidden_states, router_logits)``; the
decoder layer derives the route taken (the given route, or the argmax of the logits under learned routing). Each
token runs only the module it is routed to (SKIP runs neither), so compute falls with the route.

The learned router of the paper's stage 3 (`DuoRouter`, ``layers[i].mlp.router`` when ``config.use_router``) is a
linear map of the FFN input to one logit per allowed choice; ``P = softmax(logits / tau)``. In training mode the
FFN output is the soft mixture ``sum_x P_x * H_x``; in evaluation mode each token takes the argmax choice and only
that module runs. The paper writes that the temperature is "increased" to make assignments hard; with
``P = softmax(logits / tau)`` that is a *decreasing* ``tau``, which `TemperatureSchedule` anneals.

Router logits use one layout everywhere: ``[..., 3]`` indexed by choice code (``SMALL``, ``BIG``, ``SKIP``), float32,
``-inf`` for a choice the router does not allow, so ``router_probabilities(logits, tau)[..., BIG]`` is P_big whatever
the options. The model returns them as ``router_logits`` of shape ``[batch, seq, layers, 3]``.

The router temperature and the dispatch implementation are run-time state, not config fields: module attributes
set by `set_router_temperature` and `set_ffn_dispatch`. This file is copied next to a saved model for
``trust_remote_code``, so it imports only the stdlib, torch and the files next to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .routes import BIG, CHOICE_NAMES, SMALL, choice_code

# Implementations of DuoFFN.dispatch: the grouped fast path and the straightforward one it is checked against.
DISPATCH_MODES = ("fast", "reference")
SCHEDULE_KINDS = ("constant", "linear", "exponential", "cosine")


class DuoRouter(nn.Linear):
    """Per-layer linear router: FFN input ``[..., hidden]`` -> logits ``[..., 3]`` in the choice-code layout.

    A plain `nn.Linear` (weight ``[n_choices, hidden]`` and bias), so it is initialised, saved and loaded like
    any linear layer of the model. ``choices`` are the allowed codes in canonical order; row ``i`` of the weight
    belongs to ``choices[i]``. ``temperature`` (tau > 0, run-time state set by `set_router_temperature`) only
    shapes the probabilities; the argmax route ignores it.
    """

    def __init__(self, hidden_size: int, choices: Sequence[int], temperature: float = 1.0):
        choices = tuple(sorted({choice_code(c, "router choices") for c in choices}))
        if len(choices) < 2:
            raise ValueError(
                f"router choices: {[CHOICE_NAMES[c] for c in choices]} leaves nothing to decide; a router "
                f"needs at least two route_options."
            )
        super().__init__(hidden_size, len(choices), bias=True)
        self.choices = choices
        self.temperature = float(temperature)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits in the choice-code layout ``[..., 3]`` (float32; ``-inf`` for choices not allowed)."""
        logits = super().forward(hidden_states).float()
        # Built from column views, not an index tensor, so no host-to-device copy happens per call.
        excluded = logits.new_full(logits.shape[:-1], float("-inf"))
        columns = [
            logits[..., self.choices.index(code)] if code in self.choices else excluded
            for code in range(len(CHOICE_NAMES))
        ]
        return torch.stack(columns, dim=-1)

    def extra_repr(self) -> str:
        names = [CHOICE_NAMES[c] for c in self.choices]
        return f"{super().extra_repr()}, choices={names}, temperature={self.temperature:g}"


def router_probabilities(router_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The routers' probabilities ``P = softmax(logits / tau)`` (``[..., 3]``; 0 for choices not allowed)."""
    return torch.softmax(router_logits / temperature, dim=-1)


class DuoFFN(nn.Module):
    """A routed FFN: a big and a small module side by side, and optionally a learned router.

    Dispatch gathers the tokens of each module, runs the module on those rows only, and scatters the result
    back; SKIP rows stay 0. ``dispatch_mode`` picks the implementation: ``"fast"`` (one sorted gather of the rows,
    each module on a contiguous slice, in-place scatter into one output buffer, no per-module ``nonzero``; a layer
    whose rows all take one choice runs that module on every row without gathering) or ``"reference"`` (the
    straightforward gather/run/scatter per module, kept to check the fast path against). Both give the same
    outputs.
    """

    def __init__(
        self, big: nn.Module, small: nn.Module, router: DuoRouter | None = None, dispatch_mode: str = "fast"
    ):
        super().__init__()
        if dispatch_mode not in DISPATCH_MODES:
            raise ValueError(
                f"dispatch_mode: {dispatch_mode!r} is not a dispatch mode; use one of {list(DISPATCH_MODES)}."
            )
        self.big = big
        self.small = small
        self.router = router
        self.dispatch_mode = dispatch_mode

    def forward(
        self,
        hidden_states: torch.Tensor,
        route: torch.Tensor | None = None,
        dispatch_plan: DispatchPlan | None = None,
        output_router_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the routed FFN; return its output and the router logits (``[..., 3]``, or None).

        ``hidden_states``: ``[..., hidden]``; ``route``: the choice code of each row (shape
        ``hidden_states.shape[:-1]``), or None for learned routing: the router decides, and its logits are
        returned (training mode: the soft mixture of the allowed modules, so gradients reach the router;
        evaluation mode: each row runs its argmax choice only). With a given route the logits are returned only
        when ``output_router_logits`` and the FFN has a router: what it says about this input (teacher forcing).
        ``dispatch_plan``: the route's `DispatchPlan` when the caller made it already (one for all layers).
        """
        if route is not None:
            router_logits = None
            if output_router_logits and self.router is not None:
                router_logits = self.router(hidden_states)
            return self.dispatch(hidden_states, route, dispatch_plan), router_logits
        if self.router is None:
            raise ValueError(
                "DuoFFN got no route and has no router: pass routes, use a routing mode that makes them "
                "(random, fixed), or add routers with model.set_routing('learned')."
            )
        router_logits = self.router(hidden_states)
        if self.training:
            return self.mix(hidden_states, router_probabilities(router_logits, self.router.temperature)), router_logits
        return self.dispatch(hidden_states, router_logits.argmax(dim=-1)), router_logits

    def module_for(self, choice: int) -> nn.Module | None:
        """The module that serves a choice code (``None`` for SKIP)."""
        return {BIG: self.big, SMALL: self.small}.get(choice)

    def run_choice(self, hidden_states: torch.Tensor, choice: int) -> torch.Tensor:
        """Output of one choice for every row of ``hidden_states`` (the oracle runs each choice on a prefix)."""
        module = self.module_for(choice)
        return torch.zeros_like(hidden_states) if module is None else module(hidden_states)

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


def uses_fast_dispatch(model: nn.Module) -> bool:
    """Whether the model's routed FFNs use the fast dispatch (then the model plans all layers at once)."""
    return all(module.dispatch_mode == "fast" for module in model.modules() if isinstance(module, DuoFFN))


def set_ffn_dispatch(model: nn.Module, mode: str) -> nn.Module:
    """Switch every `DuoFFN` of ``model`` to the ``"fast"`` or the ``"reference"`` dispatch (a test switch)."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"ffn_dispatch: {mode!r} is not allowed; use one of {list(DISPATCH_MODES)}.")
    for module in model.modules():
        if isinstance(module, DuoFFN):
            module.dispatch_mode = mode
    return model


def compile_ffns(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the big and small FFN of every `DuoFFN` in ``model`` (in place), with dynamic shapes; in a
    model without one (the dense baseline), each decoder layer's ``mlp``.

    Only the FFNs, not the whole model: the dispatch's token counts per route change at every forward, which the
    FFNs see as one dynamic dimension; the routing and the rest of the layer stay eager. Whether it pays depends
    on the device (BENCHMARKS.md, "torch.compile"). ``backend`` is torch.compile's (``"eager"`` traces without
    generating code: a quick check of the path).
    """
    duo_ffns = [module for module in model.modules() if isinstance(module, DuoFFN)]
    for module in duo_ffns:
        for ffn in (module.big, module.small):
            if ffn is not None:
                ffn.compile(dynamic=True, backend=backend)
    if not duo_ffns:
        for module in model.modules():
            if isinstance(getattr(module, "mlp", None), nn.Module):
                module.mlp.compile(backend=backend)
    return model


def routers(model: nn.Module) -> list[DuoRouter]:
    """The model's routers, in layer order (empty when it has none)."""
    return [module for module in model.modules() if isinstance(module, DuoRouter)]


def router_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of every router of the model (what stage 3 trains)."""
    for router in routers(model):
        yield from router.parameters()


def freeze_all_but_routers(model: nn.Module) -> list[nn.Parameter]:
    """Freeze the Duo weights (``requires_grad=False``) and leave only the routers trainable; return those.

    Raises when the model has no router (add them with ``model.set_routing("learned")``).
    """
    params = list(router_parameters(model))
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no routers to train; call model.set_routing('learned') or load it "
            f"with routing='learned'."
        )
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    return params


def router_temperature(model: nn.Module) -> float:
    """The softmax temperature of the model's routers (1.0 without routers; `set_router_temperature` sets all)."""
    found = routers(model)
    return found[0].temperature if found else 1.0


def set_router_temperature(model: nn.Module, temperature: float) -> None:
    """Set the softmax temperature of every router of ``model`` (run-time state: the config does not keep it)."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: {temperature!r} is not allowed; it must be a finite number > 0.")
    for router in routers(model):
        router.temperature = float(temperature)


@dataclass(frozen=True)
class TemperatureSchedule:
    """Router temperature over training steps, from ``start`` (step 0) to ``end`` (step ``steps`` and after).

    ``kind``: ``constant`` (always ``start``), ``linear``, ``exponential`` (geometric: ``start *
    (end / start) ** (step / steps)``) or ``cosine``. Annealing to a small ``end`` makes the softmax, and so
    the training-time mixture, nearly one-hot: the assignment becomes hard.
    """

    start: float = 1.0
    end: float = 0.1
    steps: int = 1000
    kind: str = "exponential"

    def __post_init__(self):
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"TemperatureSchedule {name}: {value!r} is not allowed; temperatures must be > 0.")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"TemperatureSchedule steps: {self.steps!r} is not allowed; use an integer >= 0.")
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"TemperatureSchedule kind: {self.kind!r} is not one of {list(SCHEDULE_KINDS)}.")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.start)
        frac = 1.0 if self.steps == 0 else min(max(step / self.steps, 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** frac
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * frac))


__all__ = [
    "DISPATCH_MODES",
    "DispatchPlan",
    "DuoFFN",
    "DuoRouter",
    "TemperatureSchedule",
    "compile_ffns",
    "dispatch_plans",
    "freeze_all_but_routers",
    "router_parameters",
    "router_probabilities",
    "router_temperature",
    "routers",
    "set_ffn_dispatch",
    "set_router_temperature",
    "uses_fast_dispatch",
]
