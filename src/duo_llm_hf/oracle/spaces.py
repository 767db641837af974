"""Route spaces: the sets of patterns the oracle searches, and the budgets that carve them into classes.

A *pattern* is one choice code per layer. Patterns over the allowed choices ``choices`` (codes in canonical
order) are numbered in mixed radix, layer 0 the most significant digit and digit ``i`` the ``i``-th allowed
choice: with ``choices = (SMALL, BIG)`` pattern ``sssB`` is index 1 and ``Bsss`` is index 8. The numbering is the
order of a depth-first walk of the prefix tree, and every tie between patterns is broken towards the lowest index.

A :class:`LayerBudget` selects patterns by how many layers take each choice (the paper counts budgets in BIG layers),
optionally depending on the token's position (the paper's Fig. 4c). A :class:`RouteSpace` holds the budgets of
one oracle run; it enumerates the union of their patterns once, and the reducers report every budget from that
single enumeration.

Like the rest of `duo_llm_hf.oracle`, it belongs to the installed package, not to a saved model's remote code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..models.routes import (
    BIG,
    CHOICE_CODES,
    CHOICE_LETTERS,
    CHOICE_NAMES,
    allowed_codes,
    choice_code,
    choice_values,
)

# Enumerating more patterns than this would not fit in memory, and evaluating them would never finish.
MAX_PATTERNS = 1 << 24
# The prefix tree is cut into at least this many units (subtrees) to share between processes.
SPLIT_UNITS = 64
# `sample_budget` enumerates budgets of at most this many patterns and samples larger ones without enumerating.
ENUMERATE_SAMPLES = 1 << 16


@dataclass(frozen=True)
class LayerBudget:
    """Which patterns a token may take: exact counts of some choices, optionally a BIG count that varies with position.

    ``counts``: ``((code, count), ...)``; a pattern belongs to the budget when, for each entry, exactly ``count``
    of its layers take ``code``. Choices not listed are free; no entry at all means every pattern.
    ``big_schedule``: breakpoints of the number of BIG layers along the sequence, e.g. ``(6, 2)``: 6 BIG layers
    at the first position falling linearly to 2 at the last (the paper's Fig. 4c); at position ``t`` only patterns
    with that many BIG layers are allowed. Positions are those of the evaluated block (0 .. seq_len - 1).
    """

    counts: tuple[tuple[int, int], ...] = ()
    big_schedule: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        """Short name used in reports and result files: ``all``, ``big=4``, ``big=6,skip=6``, ``big=6:2``."""
        parts = [f"{CHOICE_NAMES[code]}={count}" for code, count in self.counts]
        if self.big_schedule is not None:
            parts.append("big=" + ":".join(str(k) for k in self.big_schedule))
        return ",".join(parts) or "all"

    def matches(self, counts: torch.Tensor) -> torch.Tensor:
        """Whether patterns with these choice counts (``[..., 3]``, indexed by code) can ever take this budget."""
        ok = torch.ones(counts.shape[:-1], dtype=torch.bool, device=counts.device)
        for code, count in self.counts:
            ok &= counts[..., code] == count
        if self.big_schedule is not None:
            ok &= (counts[..., BIG] >= min(self.big_schedule)) & (counts[..., BIG] <= max(self.big_schedule))
        return ok

    def big_at(self, seq_len: int) -> torch.Tensor | None:
        """The number of BIG layers required at each position (``[seq_len]``), or None when it does not vary."""
        if self.big_schedule is None:
            return None
        points = torch.tensor(self.big_schedule, dtype=torch.float64)
        where = torch.linspace(0, len(points) - 1, seq_len, dtype=torch.float64) if seq_len > 1 else torch.zeros(1)
        low = where.floor().long().clamp_max(len(points) - 2) if len(points) > 1 else torch.zeros_like(where).long()
        frac = where - low
        value = points[low] * (1 - frac) + points[(low + 1).clamp_max(len(points) - 1)] * frac
        # Round half up, so that the schedule does not depend on banker's rounding.
        return torch.floor(value + 0.5).long()

    def fractions(self, num_layers: int) -> dict[int, float]:
        """The share of ``num_layers`` layers each counted choice takes (``{code: fraction}``): the budget targets
        of a router that should spend this layer budget (``big=4`` of 12 layers: ``{BIG: 4 / 12}``).

        The inverse is `layer_budget_of_fractions`. A position schedule has no single fraction: a ValueError.
        """
        if self.big_schedule is not None:
            raise ValueError(f"budget {self.label!r} varies with position; it has no single fraction of layers.")
        return {code: count / num_layers for code, count in self.counts}

    def allowed(self, counts: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``[m, seq_len]``: which of ``m`` patterns (choice counts ``[m, 3]``) the budget allows at each position."""
        ok = self.matches(counts)[:, None].expand(-1, seq_len)
        big = self.big_at(seq_len)
        if big is None:
            return ok
        return ok & (counts[:, BIG, None] == big.to(counts.device)[None, :])


def parse_layer_budget(spec: LayerBudget | int | str | Mapping | Sequence | None) -> LayerBudget:
    """Parse one budget.

    Accepted forms: ``None`` or ``"all"`` (every pattern); ``4`` or ``"4"`` (exactly 4 BIG layers);
    ``{"big": 6, "skip": 6}`` or ``"big=6,skip=6"`` (exact counts per choice); ``"6:2"``, ``"big=6:2"`` or
    ``(6, 2)`` (BIG layers falling from 6 at the first position to 2 at the last); a :class:`LayerBudget`.
    """
    if spec is None or isinstance(spec, LayerBudget):
        return spec or LayerBudget()
    if isinstance(spec, bool):
        raise ValueError(f"budget: {spec!r} is not a budget; give a BIG count, counts per choice or 'all'.")
    if isinstance(spec, int):
        return LayerBudget(counts=((BIG, spec),))
    if isinstance(spec, Mapping):
        return _counts_budget(spec, spec)
    if isinstance(spec, (tuple, list)):
        return _schedule_budget(spec, spec)
    if not isinstance(spec, str):
        raise ValueError(f"budget: {spec!r} is not a budget; give a BIG count, counts per choice or 'all'.")
    text = spec.strip().lower()
    if text in ("all", ""):
        return LayerBudget()
    if text.lstrip("-").isdigit():
        return LayerBudget(counts=((BIG, int(text)),))
    if "=" not in text:
        return _schedule_budget(text.split(":"), spec)
    counts, schedule = [], None
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if ":" in value:
            if choice_code(name, "budget") != BIG:
                raise ValueError(f"budget: {spec!r}: only the BIG count can vary with position ('big=6:2').")
            if schedule is not None:
                raise ValueError(f"budget: {spec!r} names 'big' twice; give each choice once.")
            schedule = _schedule_budget(value.split(":"), spec).big_schedule
        else:
            counts.append((name, _int(value, spec)))
    budget = _counts_budget(counts, spec)
    if schedule is not None and any(code == BIG for code, _ in budget.counts):
        raise ValueError(f"budget: {spec!r} names 'big' twice (a count and a schedule); give each choice once.")
    return LayerBudget(counts=budget.counts, big_schedule=schedule)


class UnevenLayerBudget(ValueError):
    """Fractions of the layers that are not whole numbers of layers (`layer_budget_of_fractions`)."""

    def __init__(self, fractions: Mapping[int, float], num_layers: int, layers: Mapping[int, float]):
        self.fractions, self.num_layers, self.layers = dict(fractions), num_layers, dict(layers)
        uneven = {CHOICE_NAMES[code]: count for code, count in self.layers.items() if not _whole(count)}
        named = {CHOICE_NAMES[code]: fraction for code, fraction in self.fractions.items()}
        super().__init__(f"budget {named} of {num_layers} layers is {uneven} layers, not whole numbers")

    @property
    def nearest(self) -> LayerBudget:
        """The layer budget with every count rounded to the nearest whole number."""
        return LayerBudget(counts=tuple(sorted((code, round(count)) for code, count in self.layers.items())))


def layer_budget_of_fractions(fractions: Mapping[int, float], num_layers: int) -> LayerBudget:
    """The layer budget that gives each choice its fraction of ``num_layers`` layers (``{BIG: 0.5}`` of 4 layers:
    ``big=2``); the inverse of `LayerBudget.fractions`. `UnevenLayerBudget` when a count is not a whole number."""
    layers = {code: fraction * num_layers for code, fraction in fractions.items()}
    if not all(_whole(count) for count in layers.values()):
        raise UnevenLayerBudget(fractions, num_layers, layers)
    return LayerBudget(counts=tuple(sorted((code, round(count)) for code, count in layers.items())))


def _whole(count: float) -> bool:
    return abs(count - round(count)) <= 1e-6


def _int(value, spec) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"budget: {spec!r}: {value!r} is not a whole number of layers.") from None


def _counts_budget(counts: Mapping | Sequence[tuple], spec) -> LayerBudget:
    """Exact counts per choice, from a mapping or ``(choice, count)`` pairs; a choice named twice is refused."""
    items = counts.items() if isinstance(counts, Mapping) else counts
    pairs = choice_values(items, "budget", spec)
    whole = {code: v if isinstance(v, int) and not isinstance(v, bool) else _int(v, spec) for code, v in pairs.items()}
    return LayerBudget(counts=tuple(sorted(whole.items())))


def _schedule_budget(points: Sequence, spec) -> LayerBudget:
    values = tuple(_int(v, spec) for v in points)
    if len(values) < 2:
        raise ValueError(f"budget: {spec!r}: a position schedule needs at least two BIG counts, e.g. '6:2'.")
    return LayerBudget(big_schedule=values)


def class_budgets(num_layers: int, choices: Sequence[int]) -> list[LayerBudget]:
    """One budget per count class of the space: every split of ``num_layers`` among the allowed choices.

    With two choices one of which is BIG the class is named by its BIG count (``big=0`` .. ``big=n``);
    otherwise by the counts of every allowed choice (``small=3,big=4,skip=5``).
    """
    choices = tuple(sorted(choices))
    budgets = []
    for vector in _count_vectors(num_layers, choices):
        if len(choices) == 2 and BIG in choices:
            budgets.append(LayerBudget(counts=((BIG, vector[BIG]),)))
        else:
            budgets.append(LayerBudget(counts=tuple((code, vector[code]) for code in choices)))
    return budgets


def _count_vectors(num_layers: int, choices: Sequence[int]) -> list[tuple[int, int, int]]:
    """Every ``(n_small, n_big, n_skip)`` with counts only on ``choices`` summing to ``num_layers``."""
    vectors = []

    def fill(i: int, left: int, acc: list[int]) -> None:
        if i == len(choices) - 1:
            acc[choices[i]] = left
            vectors.append(tuple(acc))
            return
        for n in range(left, -1, -1):
            acc[choices[i]] = n
            fill(i + 1, left - n, list(acc))

    fill(0, num_layers, [0] * len(CHOICE_NAMES))
    return sorted(vectors, key=lambda v: tuple(v[c] for c in choices[::-1]))


def pattern_index(patterns: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
    """Index of each pattern (``[..., layers]`` codes) in the mixed-radix numbering over ``choices``."""
    lookup = torch.full((len(CHOICE_NAMES),), -1, dtype=torch.long, device=patterns.device)
    lookup[list(choices)] = torch.arange(len(choices), device=patterns.device)
    digits = lookup[patterns.long()]
    if (digits < 0).any():
        raise ValueError(f"pattern_index: the patterns use codes outside the space's choices {list(choices)}.")
    weights = len(choices) ** torch.arange(patterns.shape[-1] - 1, -1, -1, device=patterns.device)
    return (digits * weights).sum(-1)


def index_to_pattern(index: torch.Tensor, choices: Sequence[int], num_layers: int) -> torch.Tensor:
    """The patterns (``[..., num_layers]`` codes) of pattern indices over ``choices``; inverse of `pattern_index`."""
    base = len(choices)
    weights = base ** torch.arange(num_layers - 1, -1, -1, device=index.device)
    digits = (index.long()[..., None] // weights) % base
    return torch.tensor(list(choices), device=index.device)[digits]


def choice_counts(patterns: torch.Tensor) -> torch.Tensor:
    """How many layers of each pattern (``[..., layers]``) take each choice: ``[..., 3]`` indexed by code."""
    return torch.nn.functional.one_hot(patterns.long(), len(CHOICE_NAMES)).sum(-2)


class RouteSpace:
    """The patterns an oracle run searches: the union of its budgets over the allowed choices.

    Args:
        num_layers: layers per pattern.
        choices: the allowed choices (names or codes); a choice the model does not allow is an error when the
            space is built with :meth:`from_config`.
        budgets: budget specs (see :func:`parse_layer_budget`); ``"classes"`` expands to every count class
            (:func:`class_budgets`). Default: ``["all"]``.
        extra_classes: count vectors (``(n_small, n_big, n_skip)``) enumerated in addition to the budgets (used to
            evaluate the all-small and all-big patterns for token difficulty); they belong to no budget.

    Attributes: ``patterns`` (``[P, layers]`` codes in index order), ``indices`` (``[P]``), ``counts`` (``[P, 3]``),
    ``members`` (``[budgets, P]``: the patterns each budget can use), ``budgets``, ``choices``, ``num_layers``.
    """

    def __init__(
        self,
        num_layers: int,
        choices: Sequence[int | str],
        budgets: Sequence | None = None,
        extra_classes: Sequence[Sequence[int]] = (),
    ):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"route space: num_layers={num_layers!r}; a pattern needs at least one layer.")
        if isinstance(choices, str) or not choices:
            raise ValueError(f"route space: choices={choices!r}; give a non-empty list such as ['small', 'big'].")
        self.num_layers = num_layers
        self.choices = tuple(sorted({choice_code(c, "route space choices") for c in choices}))
        if budgets is None:
            specs = ["all"]
        elif isinstance(budgets, (str, int, Mapping, LayerBudget)):
            specs = [budgets]
        else:
            specs = list(budgets)
        parsed: list[LayerBudget] = []
        for spec in specs:
            if isinstance(spec, str) and spec.strip().lower() == "classes":
                parsed += class_budgets(num_layers, self.choices)
            else:
                parsed.append(parse_layer_budget(spec))
        if not parsed:
            raise ValueError("route space: no budget given; use 'all', a BIG count, counts per choice or 'classes'.")
        seen = set()
        self.budgets = tuple(b for b in parsed if not (b in seen or seen.add(b)))
        for budget in self.budgets:
            self._check_budget(budget)

        self.extra_classes = tuple(tuple(int(n) for n in v) for v in extra_classes)
        vectors = torch.tensor(_count_vectors(num_layers, self.choices), dtype=torch.long)
        wanted = torch.stack([b.matches(vectors) for b in self.budgets]).any(0)
        for extra in self.extra_classes:
            wanted |= (vectors == torch.tensor(list(extra), dtype=torch.long)).all(-1)
        self.target_counts = vectors[wanted]
        self.unconstrained = bool(wanted.all())
        self._enumerate()
        self.members = torch.stack([b.matches(self.counts) for b in self.budgets])
        for budget, members in zip(self.budgets, self.members):
            self._check_not_empty(budget, members)

    @classmethod
    def from_config(
        cls, config, budgets: Sequence | None = None, route_options: Sequence[int | str] | None = None, **kwargs
    ) -> RouteSpace:
        """The route space of a Duo model: its layers, and its ``route_options`` (or a subset of them)."""
        allowed = allowed_codes(config)
        choices = allowed if route_options is None else [choice_code(c, "route_options") for c in route_options]
        outside = sorted({CHOICE_NAMES[c] for c in choices} - {CHOICE_NAMES[c] for c in allowed})
        if outside:
            raise ValueError(
                f"route space: {outside} is not in the model's route_options {config.route_options}; the model "
                "was not trained to take that choice."
            )
        return cls(config.num_hidden_layers, choices, budgets, **kwargs)

    def _check_budget(self, budget: LayerBudget) -> None:
        n, names = self.num_layers, [CHOICE_NAMES[c] for c in self.choices]
        for code, count in budget.counts:
            if code not in self.choices:
                raise ValueError(
                    f"budget {budget.label!r} counts {CHOICE_NAMES[code]} layers, but the route space allows only "
                    f"{names}; add {CHOICE_NAMES[code]} to the route options or drop it from the budget."
                )
            if not 0 <= count <= n:
                raise ValueError(
                    f"budget {budget.label!r}: {count} {CHOICE_NAMES[code]} layers is impossible with "
                    f"{n} layers; use 0..{n}."
                )
        fixed = sum(count for _, count in budget.counts)
        if fixed > n:
            raise ValueError(f"budget {budget.label!r} fixes {fixed} layers, but patterns have only {n} layers.")
        if budget.big_schedule is not None:
            if BIG not in self.choices:
                raise ValueError(
                    f"budget {budget.label!r} schedules BIG layers, but the route space allows only {names}."
                )
            if any(code == BIG for code, _ in budget.counts):
                raise ValueError(f"budget {budget.label!r} gives the BIG count twice (a count and a schedule).")
            bad = [k for k in budget.big_schedule if not 0 <= k <= n - fixed]
            if bad:
                raise ValueError(
                    f"budget {budget.label!r}: BIG counts {bad} are impossible with {n} layers "
                    f"({fixed} fixed by other counts); use 0..{n - fixed}."
                )

    def _check_not_empty(self, budget: LayerBudget, members: torch.Tensor) -> None:
        names = [CHOICE_NAMES[c] for c in self.choices]
        if not members.any():
            raise ValueError(
                f"budget {budget.label!r} selects no pattern of {self.num_layers} layers over {names}: the "
                "counts cannot be met (every layer must take one of the allowed choices)."
            )
        if budget.big_schedule is not None:
            have = set(self.counts[members, BIG].tolist())
            missing = sorted(set(range(min(budget.big_schedule), max(budget.big_schedule) + 1)) - have)
            if missing:
                raise ValueError(
                    f"budget {budget.label!r}: no pattern over {names} has {missing} BIG layers together with "
                    "the other counts of the budget."
                )

    def _enumerate(self) -> None:
        """List the patterns of the space in index order, growing the prefix tree and pruning dead prefixes."""
        prefixes = torch.zeros(1, 0, dtype=torch.long)
        self.prefix_counts = [1]
        codes = torch.tensor(self.choices, dtype=torch.long)
        for depth in range(self.num_layers):
            children = torch.cat(
                [prefixes.repeat_interleave(len(codes), 0), codes.repeat(len(prefixes))[:, None]], dim=1
            )
            prefixes = children[self.feasible(children)]
            if len(prefixes) > MAX_PATTERNS:
                raise ValueError(
                    f"route space: more than {MAX_PATTERNS:,} prefixes at depth {depth + 1}; this space is too "
                    "large to enumerate. Add a budget or allow fewer choices."
                )
            self.prefix_counts.append(len(prefixes))
        self.patterns = prefixes
        self.indices = pattern_index(prefixes, self.choices)
        self.counts = choice_counts(prefixes)

    def feasible(self, prefixes: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Which prefixes (``[m, depth]`` codes) can still become a pattern of the space (or of ``targets``)."""
        if targets is None and self.unconstrained:
            return torch.ones(len(prefixes), dtype=torch.bool)
        targets = self.target_counts if targets is None else targets
        have = choice_counts(prefixes).to(targets.device)
        return (have[:, None, :] <= targets[None, :, :]).all(-1).any(-1)

    @property
    def size(self) -> int:
        """Number of patterns enumerated (the union of the budgets, plus any extra classes)."""
        return len(self.indices)

    def budget_sizes(self) -> list[int]:
        """Number of patterns each budget can use (summed over its position classes for a schedule)."""
        return self.members.sum(1).tolist()

    def budget_full_sizes(self) -> list[int]:
        """Number of patterns of ``num_layers`` layers over the space's choices in each budget: all of them are
        enumerated here (a `PatternSet` searches only some of them)."""
        return self.budget_sizes()

    def budget_index(self, budget) -> int:
        """Position of a budget (spec or label) among the space's budgets."""
        wanted = budget if isinstance(budget, str) and budget in self.labels else parse_layer_budget(budget).label
        if wanted not in self.labels:
            raise KeyError(f"budget {wanted!r} is not in this route space; it has {list(self.labels)}.")
        return self.labels.index(wanted)

    @property
    def labels(self) -> list[str]:
        return [b.label for b in self.budgets]

    def ranks(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions in ``patterns`` of the given pattern indices (which must belong to the space)."""
        ranks = torch.searchsorted(self.indices, indices.cpu())
        if (ranks >= self.size).any() or (self.indices[ranks.clamp_max(self.size - 1)] != indices.cpu()).any():
            raise ValueError("route space: some pattern indices are not in this space.")
        return ranks

    @property
    def split_depth(self) -> int:
        """Depth where the prefix tree is cut into units to share between processes: the first with at least
        `SPLIT_UNITS` prefixes (the leaves when there is none). A function of the space only, not of the number of
        processes, so that the walk of every unit is the same however the units are shared."""
        return next((d for d, n in enumerate(self.prefix_counts) if n >= SPLIT_UNITS), self.num_layers)

    def partition(self, world_size: int) -> list[torch.Tensor]:
        """Split the space between ``world_size`` processes by units (prefixes at `split_depth`), balancing their
        leaf counts. Returns one ``[R, depth]`` tensor of prefixes (codes) per process; every pattern lies under
        exactly one of them. The split is a pure function of the space and ``world_size``: every process computes
        the same one. More processes than units leave some without work.
        """
        depth = self.split_depth
        prefix_ids = pattern_index(self.patterns[:, :depth], self.choices) if depth else torch.zeros_like(self.indices)
        unique, leaves = torch.unique_consecutive(prefix_ids, return_counts=True)
        first = torch.cumsum(leaves, 0) - leaves
        loads = [0] * world_size
        owned: list[list[int]] = [[] for _ in range(world_size)]
        # Largest subtrees first, each to the least-loaded process (lowest rank on ties): deterministic.
        order = sorted(range(len(unique)), key=lambda i: (-int(leaves[i]), i))
        for i in order:
            rank = min(range(world_size), key=lambda r: (loads[r], r))
            loads[rank] += int(leaves[i])
            owned[rank].append(i)
        return [self.patterns[first[sorted(o)], :depth] if o else self.patterns[:0, :depth] for o in owned]

    def sample(self, k: int, seed: int) -> torch.Tensor:
        """Best-of-K samples: ``[budgets, P]`` mask of ``k`` patterns drawn without replacement from each budget
        (from each of its position classes for a schedule), with a seeded generator; all of them when fewer."""
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.zeros_like(self.members)
        for g, budget in enumerate(self.budgets):
            classes = [self.members[g]]
            if budget.big_schedule is not None:
                ks = range(min(budget.big_schedule), max(budget.big_schedule) + 1)
                classes = [self.members[g] & (self.counts[:, BIG] == k) for k in ks]
            for members in classes:
                ranks = members.nonzero().squeeze(1)
                pick = torch.randperm(len(ranks), generator=generator)[:k]
                chosen[g, ranks[pick]] = True
        return chosen

    def describe(self) -> dict:
        """JSON-ready description: layers, choices, budgets with their sizes, patterns enumerated."""
        return {
            "num_layers": self.num_layers,
            "route_options": [CHOICE_NAMES[c] for c in self.choices],
            "budgets": self.labels,
            "budget_sizes": dict(zip(self.labels, self.budget_sizes())),
            "budget_full_sizes": dict(zip(self.labels, self.budget_full_sizes())),
            "patterns_enumerated": self.size,
            "full_space_size": len(self.choices) ** self.num_layers,
        }

    def pattern_str(self, index: int) -> str:
        """Letters of the pattern with this index (``sB-``)."""
        codes = index_to_pattern(torch.tensor(index), self.choices, self.num_layers)
        return "".join(CHOICE_LETTERS[c] for c in codes.tolist())

    def __repr__(self) -> str:
        names = [CHOICE_NAMES[c] for c in self.choices]
        return f"RouteSpace(num_layers={self.num_layers}, choices={names}, budgets={self.labels}, size={self.size})"


def uniform_classes(num_layers: int, choices: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    """Count vectors of the all-small and all-big patterns that ``choices`` allows (for token difficulty)."""
    out = {}
    for name in ("small", "big"):
        code = CHOICE_CODES[name]
        if code in choices:
            vector = [0, 0, 0]
            vector[code] = num_layers
            out[name] = tuple(vector)
    return out



def budget_size(num_layers: int, choices: Sequence[int], budget: LayerBudget) -> int:
    """How many patterns of ``num_layers`` layers over ``choices`` a budget (without a position schedule) holds,
    counted without enumerating them: the multinomial coefficient of each count vector it matches."""
    if budget.big_schedule is not None:
        raise ValueError(f"budget {budget.label!r} varies with position; count its position classes one by one.")
    vectors = _count_vectors(num_layers, tuple(sorted(choices)))
    matching = budget.matches(torch.tensor(vectors, dtype=torch.long)).tolist()
    return sum(_multinomial(num_layers, v) for v, ok in zip(vectors, matching) if ok)


def budget_count_vectors(num_layers: int, choices: Sequence[int], budget: LayerBudget) -> torch.Tensor:
    """The count vectors (``[V, 3]``, indexed by code) of the patterns over ``choices`` a budget holds."""
    vectors = torch.tensor(_count_vectors(num_layers, tuple(sorted(choices))), dtype=torch.long)
    return vectors[budget.matches(vectors)]


def _multinomial(n: int, counts: Sequence[int]) -> int:
    out = math.factorial(n)
    for c in counts:
        out //= math.factorial(c)
    return out


def sample_budget(num_layers: int, choices: Sequence[int], budget: LayerBudget, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct patterns (``[k, num_layers]`` codes, ascending index) drawn uniformly without replacement from
    the whole budget, seeded; every pattern of the budget when it holds at most ``k``. Small budgets are enumerated;
    large ones are sampled without enumerating them (a count vector with probability proportional to its number of
    patterns, then a random arrangement of its choices), so a budget of millions of patterns costs nothing."""
    choices = tuple(sorted(choices))
    size = budget_size(num_layers, choices, budget)
    generator = torch.Generator().manual_seed(seed)
    if size <= ENUMERATE_SAMPLES:
        patterns = RouteSpace(num_layers, choices, [budget]).patterns
        return patterns[torch.randperm(len(patterns), generator=generator)[:k].sort().values]
    vectors = [v for v in _count_vectors(num_layers, choices) if bool(budget.matches(torch.tensor(v)))]
    weights = torch.tensor([float(_multinomial(num_layers, v)) for v in vectors], dtype=torch.float64)
    found: dict[int, torch.Tensor] = {}
    while len(found) < k:
        vector = vectors[int(torch.multinomial(weights, 1, generator=generator))]
        codes = torch.tensor([c for c in choices for _ in range(vector[c])], dtype=torch.long)
        pattern = codes[torch.randperm(num_layers, generator=generator)]
        found.setdefault(int(pattern_index(pattern[None], choices)), pattern)
    return torch.stack([found[i] for i in sorted(found)])


class PatternSet(RouteSpace):
    """A route space given by its patterns instead of enumerated: the candidates an approximate search chose.

    Budgets mean what they mean in `RouteSpace`, over the given patterns only: a budget's members are the given
    patterns with its counts, so the oracle of a budget is the minimum over the patterns searched, and `fixed` the
    best of them. ``samples``: per budget, the patterns best-of-K drew from the whole budget (`sample_budget`), with
    ``sample_k`` and ``sample_seed`` the K and seed that drew them; they join the searched patterns and `sample`
    returns them. ``extra_classes`` may only name uniform patterns (all layers on one choice). Position schedules
    are refused. Given no patterns at all, it holds the checked budgets of a search that has not started.
    """

    def __init__(
        self,
        num_layers: int,
        choices: Sequence[int | str],
        budgets: Sequence,
        patterns: torch.Tensor | Sequence = (),
        samples: Sequence[torch.Tensor] = (),
        sample_k: int = 0,
        sample_seed: int = 0,
        extra_classes: Sequence[Sequence[int]] = (),
    ):
        self._given = torch.as_tensor(patterns, dtype=torch.long).reshape(-1, num_layers)
        self._samples = [torch.as_tensor(s, dtype=torch.long).reshape(-1, num_layers) for s in samples]
        self.sample_k, self.sample_seed = sample_k, sample_seed
        super().__init__(num_layers, choices, budgets, extra_classes)
        if self._samples and len(self._samples) != len(self.budgets):
            raise ValueError(f"pattern set: {len(self._samples)} sample sets for {len(self.budgets)} budgets.")
        self.sampled = torch.zeros_like(self.members)
        for g, drawn in enumerate(self._samples):
            if len(drawn):
                self.sampled[g, self.ranks(pattern_index(drawn, self.choices))] = True
        self._prefix_ids: dict[int, torch.Tensor] = {}

    def _check_budget(self, budget: LayerBudget) -> None:
        if budget.big_schedule is not None:
            raise ValueError(f"budget {budget.label!r} varies with position; a pattern set takes fixed counts only.")
        super()._check_budget(budget)

    def _check_not_empty(self, budget: LayerBudget, members: torch.Tensor) -> None:
        if budget_size(self.num_layers, self.choices, budget) == 0:
            super()._check_not_empty(budget, members)

    def _enumerate(self) -> None:
        rows = [self._given, *self._samples]
        for vector in self.extra_classes:
            used = [c for c, n in enumerate(vector) if n]
            if len(used) != 1 or vector[used[0]] != self.num_layers:
                raise ValueError(f"pattern set: extra class {list(vector)} is not a uniform pattern.")
            rows.append(torch.full((1, self.num_layers), used[0], dtype=torch.long))
        patterns = torch.cat(rows)
        indices = torch.unique(pattern_index(patterns, self.choices))  # sorted
        self.patterns = index_to_pattern(indices, self.choices, self.num_layers)
        self.indices = indices
        self.counts = choice_counts(self.patterns)
        wanted = (self.counts[:, None, :] == self.target_counts[None]).all(-1).any(-1)
        if not bool(wanted.all()):
            bad = self.pattern_str(int(self.indices[~wanted][0]))
            raise ValueError(f"pattern set: pattern {bad} is in none of the budgets {self.labels}.")
        self.prefix_counts = [
            len(torch.unique(pattern_index(self.patterns[:, :d], self.choices))) for d in range(self.num_layers + 1)
        ]

    def feasible(self, prefixes: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Which prefixes lead to a pattern of the set (whose counts are among ``targets`` when given)."""
        depth = prefixes.shape[1]
        if targets is None:
            if depth not in self._prefix_ids:
                self._prefix_ids[depth] = torch.unique(pattern_index(self.patterns[:, :depth], self.choices))
            known = self._prefix_ids[depth]
        else:
            keep = (self.counts[:, None, :] == targets.cpu()[None]).all(-1).any(-1)
            known = pattern_index(self.patterns[keep, :depth], self.choices)
        return torch.isin(pattern_index(prefixes.cpu(), self.choices), known)

    def budget_full_sizes(self) -> list[int]:
        return [budget_size(self.num_layers, self.choices, b) for b in self.budgets]

    def sample(self, k: int, seed: int) -> torch.Tensor:
        """The best-of-K patterns drawn when the set was built (``[budgets, P]``); K and seed must be theirs."""
        if (k, seed) != (self.sample_k, self.sample_seed):
            raise ValueError(
                f"pattern set: its best-of-K patterns were drawn with K={self.sample_k}, seed={self.sample_seed}, "
                f"not K={k}, seed={seed}."
            )
        return self.sampled.clone()

    def pattern_strings(self, mask: torch.Tensor | None = None) -> list[str]:
        """Letters of the patterns (those under ``mask``, ``[P]``), in index order."""
        chosen = self.indices if mask is None else self.indices[mask]
        return [self.pattern_str(int(i)) for i in chosen]

    def __repr__(self) -> str:
        names = [CHOICE_NAMES[c] for c in self.choices]
        return f"PatternSet(num_layers={self.num_layers}, choices={names}, budgets={self.labels}, size={self.size})"
