"""The learned router of the paper's stage 3: a linear map per layer, temperature softmax, budget loss.

Each layer's `DuoFFN` holds a `DuoRouter` (``layers[i].mlp.router``) when ``config.use_router`` is set
(always in ``routing_mode="learned"``). The router sees the FFN input (the post-attention normalised hidden
state) and gives one logit per allowed choice; ``P = softmax(logits / tau)``. In training mode the FFN output
is the soft mixture ``sum_x P_x * H_x``; in evaluation mode each token takes the argmax choice and only that
module runs. The paper writes that the temperature is "increased" to make assignments hard; with
``P = softmax(logits / tau)`` that is a *decreasing* ``tau`` (an increasing inverse temperature), which is
what `TemperatureSchedule` anneals.

Router probabilities use one layout everywhere: ``[..., 3]`` indexed by choice code (``SMALL``, ``BIG``,
``SKIP``), 0 for a choice the router does not allow, so ``probs[..., BIG]`` is P_big whatever the options. The
model returns them as ``router_probs`` of shape ``[batch, seq, layers, 3]``.

This file is copied next to a saved model for ``trust_remote_code``, so it imports only the stdlib, torch and
its sibling ``routing``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .routes import CHOICE_CODES, CHOICE_NAMES, choice_code

SCHEDULE_KINDS = ("constant", "linear", "exponential", "cosine")

# The paper's three router settings (its Fig. 7 and Appendix A): allowed choices, target fraction per choice.
# With two choices one target is enough (the other is its complement), as in the paper's budget loss.
ROUTER_SETTINGS: dict[str, dict] = {
    "small70-big30": {"route_options": ["small", "big"], "budget": {"big": 0.3}},
    "big50-skip50": {"route_options": ["big", "skip"], "budget": {"big": 0.5}},
    "big50-small30-skip20": {
        "route_options": ["small", "big", "skip"],
        "budget": {"small": 0.3, "big": 0.5, "skip": 0.2},
    },
}


class DuoRouter(nn.Linear):
    """Per-layer linear router: FFN input ``[..., hidden]`` -> one logit per allowed choice.

    A plain `nn.Linear` (weight ``[n_choices, hidden]`` and bias), so it is initialised, saved and loaded like
    any linear layer of the model. ``choices`` are the allowed codes in canonical order; logit ``i`` belongs
    to ``choices[i]``. ``temperature`` (tau > 0) only shapes the probabilities; the argmax route ignores it.
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

    def full_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits in the choice-code layout ``[..., 3]`` (float32; ``-inf`` for choices not allowed)."""
        logits = super().forward(hidden_states).float()
        # Built from column views, not an index tensor, so no host-to-device copy happens per call.
        excluded = logits.new_full(logits.shape[:-1], float("-inf"))
        columns = [
            logits[..., self.choices.index(code)] if code in self.choices else excluded
            for code in range(len(CHOICE_NAMES))
        ]
        return torch.stack(columns, dim=-1)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """Return ``(probs, route)``: ``softmax(logits / tau)`` (``[..., 3]``, float32) and argmax codes."""
        logits = self.full_logits(hidden_states)
        return torch.softmax(logits / self.temperature, dim=-1), logits.argmax(dim=-1)

    def extra_repr(self) -> str:
        names = [CHOICE_NAMES[c] for c in self.choices]
        return f"{super().extra_repr()}, choices={names}, temperature={self.temperature:g}"


def parse_budget(
    budget: float | Mapping[str | int, float], route_options: Sequence[str] | None = None
) -> dict[int, float]:
    """Normalise a budget to ``{choice code: target fraction}``.

    A number is the target fraction of BIG (the paper's budget); a mapping gives a target per choice (names or
    codes). Targets lie in [0, 1]; a mapping over every allowed choice must sum to 1; with ``route_options``,
    every choice must be allowed.
    """
    if isinstance(budget, Mapping):
        if not budget:
            raise ValueError("budget: {} is empty; give a BIG fraction such as 0.3 or a target per choice.")
        targets = {choice_code(k, "budget"): v for k, v in budget.items()}
    else:
        targets = {CHOICE_CODES["big"]: budget}
    for code, value in targets.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"budget: target {value!r} for {CHOICE_NAMES[code]!r} must be a number in [0, 1].")
    if route_options is not None:
        allowed = {choice_code(c, "route_options") for c in route_options}
        outside = sorted(CHOICE_NAMES[c] for c in targets if c not in allowed)
        if outside:
            raise ValueError(
                f"budget: {dict(budget) if isinstance(budget, Mapping) else budget!r} sets targets for "
                f"{outside}, which route_options {list(route_options)} does not allow."
            )
        if set(targets) == allowed and abs(sum(targets.values()) - 1.0) > 1e-6:
            named = {CHOICE_NAMES[c]: v for c, v in targets.items()}
            raise ValueError(
                f"budget: targets {named} cover every allowed choice and must sum to 1 (they sum to "
                f"{sum(targets.values()):g})."
            )
    return {code: float(v) for code, v in sorted(targets.items())}


def budget_loss(
    router_probs: torch.Tensor,
    budget: float | Mapping[str | int, float],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The paper's budget loss, per sequence, averaged over the batch.

    ``router_probs``: ``[batch, seq, layers, 3]`` (the model's ``router_probs``, choice-code layout);
    ``mask``: ``[batch, seq]``, True for the tokens that count (e.g. the attention mask; padding excluded).
    For sequence ``b`` and each choice ``x`` with a target ``budget_x`` (see `parse_budget`; a number is the
    BIG target):

    .. math::
        f_{b,x} = \frac{1}{L\,|T_b|} \sum_{t \in T_b} \sum_{l=1}^{L} P_{b,t,l,x}, \qquad
        \mathcal{L}_{budget} = \frac{1}{B'} \sum_{b} \sum_{x} (f_{b,x} - budget_x)^2

    where ``T_b`` are the counted tokens of sequence ``b`` and ``B'`` the number of sequences with at least
    one counted token (a batch with none gives 0). With one target (BIG) this is the paper's
    ``(sum_l P_{l,big} / L - budget)^2`` with P_big averaged over the sequence's tokens before the square (a
    budget per sequence: single tokens may spend more or less); with several choices it is one such term per
    choice. It is 0 exactly when every sequence's mean usage meets its targets.
    """
    if router_probs.dim() != 4 or router_probs.shape[-1] != len(CHOICE_NAMES):
        raise ValueError(
            f"router_probs: expected shape [batch, seq, layers, {len(CHOICE_NAMES)}], got {tuple(router_probs.shape)}."
        )
    targets = parse_budget(budget)
    batch, seq = router_probs.shape[:2]
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=router_probs.device)
    elif tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match [batch, seq] = {[batch, seq]}.")
    weights = mask.to(router_probs.device, router_probs.dtype)
    tokens = weights.sum(1)  # [B]
    # Mean over layers first, then over the sequence's counted tokens.
    per_token = router_probs.mean(dim=2)  # [B, T, 3]
    usage = (per_token * weights[..., None]).sum(1) / tokens.clamp_min(1)[:, None]  # [B, 3]
    codes = list(targets)
    target = torch.tensor([targets[c] for c in codes], device=usage.device, dtype=usage.dtype)
    per_sequence = ((usage[:, codes] - target) ** 2).sum(-1)  # [B]
    has_tokens = tokens > 0
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp_min(1)


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
            f"with routing_mode='learned'."
        )
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    return params


def set_router_temperature(model: nn.Module, temperature: float) -> None:
    """Set the softmax temperature of every router (and ``config.router_temperature`` when present)."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: {temperature!r} is not allowed; it must be a finite number > 0.")
    for router in routers(model):
        router.temperature = float(temperature)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "router_temperature"):
        config.router_temperature = float(temperature)


def realised_fractions(usage: torch.Tensor) -> dict[str, object]:
    """Realised fraction of each choice, overall and per layer, from usage counts ``[3, layers, positions]``.

    ``usage`` is `routing.route_usage` of the routes taken (summed over batches). Returns
    ``{"overall": {name: fraction}, "per_layer": [{name: fraction}, ...]}`` over the counted (token, layer)
    pairs: plain floats, ready for a JSON report.
    """
    per_layer = usage.double().sum(-1)  # [3, L]
    overall = per_layer.sum(-1)  # [3]

    def named(counts: torch.Tensor) -> dict[str, float]:
        total = counts.sum().clamp_min(1)
        return {name: (counts[code] / total).item() for code, name in enumerate(CHOICE_NAMES)}

    return {
        "overall": named(overall),
        "per_layer": [named(per_layer[:, layer]) for layer in range(per_layer.shape[1])],
    }


__all__ = [
    "ROUTER_SETTINGS",
    "DuoRouter",
    "TemperatureSchedule",
    "budget_loss",
    "freeze_all_but_routers",
    "parse_budget",
    "realised_fractions",
    "router_parameters",
    "routers",
    "set_router_temperature",
]
