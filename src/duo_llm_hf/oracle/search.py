"""Approximate search of the oracle, for budgets too large to enumerate: a beam over the levels below all-BIG.

Exact search (`oracle.engine`) evaluates every pattern of a budget. At 30 layers a budget that moves ``m`` layers
off all-BIG holds C(30, m) patterns over BIG/SKIP (27,405 at m = 4, 5.9 million at m = 8): past m = 3 that is too
slow on a CPU. A budget that fixes the BIG count at ``n - j`` lies ``j`` *moves* below all-BIG (a move turns one
BIG layer into another allowed choice), so the beam walks the levels ``j = 1 .. m``:

- level ``j`` evaluates, exactly and on every block, the *candidates*: every pattern one move below a pattern kept
  at level ``j - 1`` (all-BIG at level 0, so level 1 holds every single move and is exact), restricted to patterns
  that can still reach a requested budget; plus, at a requested budget, best-of-K's K patterns drawn uniformly
  from the *whole* budget (`spaces.sample_budget`), so best-of-K stays exact over its K random patterns;
- the patterns kept for level ``j + 1`` are the ``width`` with the lowest mean loss and, for ``beam``, also the
  ``width`` that are the per-token oracle's choice for the most tokens (ties to the lowest pattern index);
  ``greedy`` keeps the one pattern with the lowest mean loss (the classic greedy layer pruning).

Every level is an ordinary oracle run over a `PatternSet` (the patterns searched), so the definitions of the
oracle hold with "every pattern of the budget" read as "every pattern searched": the whole sequence follows each
pattern; a token's oracle loss is the minimum over the searched patterns; *fixed* is the searched pattern with the
lowest mean loss; the causal oracle chooses among the searched patterns. Each is therefore an upper bound on the
exact figure (a search can only miss patterns), and `search_gap` measures by how much where exact is feasible.
Levels are saved under ``<output_dir>/levels/level_XX`` and resume batch by batch like any oracle run; the levels
of the requested budgets are joined into one `OracleResult` whose ``meta["search"]`` says how it was searched.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.routes import BIG, CHOICE_NAMES
from ..utils.errors import UsageError
from ..utils.processes import process_state
from ..utils.run_files import ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE
from .arguments import SEARCH_METHODS
from .results import OracleResult
from .run import run_oracle_study, study_space
from .spaces import LayerBudget, PatternSet, budget_count_vectors, pattern_index, sample_budget, uniform_classes

LEVELS_DIR = "levels"
# Methods whose perplexity a search can miss (best-of-K is exact over its K draws whatever the search).
GAP_METHODS = ("oracle", "fixed", "causal_oracle")


@dataclass(frozen=True)
class SearchSettings:
    """How the oracle searches a budget: ``exact`` (every pattern), ``beam`` (``width`` patterns kept per level
    by mean loss, and ``width`` by tokens won) or ``greedy`` (one pattern kept per level, by mean loss)."""

    method: str = "exact"
    width: int = 8

    def __post_init__(self):
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"search {self.method!r} is not one of {list(SEARCH_METHODS)}.")
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise ValueError(f"beam width {self.width!r}: keep at least one pattern per level.")

    @property
    def approximate(self) -> bool:
        return self.method != "exact"

    def describe(self) -> dict:
        """JSON-ready: the method and, when approximate, what it keeps per level."""
        if not self.approximate:
            return {"method": "exact"}
        keep = ["mean_loss"] if self.method == "greedy" else ["mean_loss", "tokens_won"]
        return {"method": self.method, "width": 1 if self.method == "greedy" else self.width, "keep_by": keep}


def search_space(config, budgets: Sequence, route_options: Sequence | None = None) -> PatternSet:
    """The budgets of an approximate search on a model (checked, nothing enumerated), with the all-BIG / all-small
    patterns for token difficulty. Every budget must fix the BIG count (``big=26``, ``big=26,skip=4``)."""
    space = PatternSet.from_config(config, budgets, route_options=route_options)
    extra = uniform_classes(space.num_layers, space.choices).values()
    space = PatternSet(space.num_layers, space.choices, space.budgets, extra_classes=list(extra))
    for budget in space.budgets:
        budget_level(budget, space.num_layers)
    if len(space.choices) < 2 or BIG not in space.choices:
        raise ValueError("an approximate search moves layers off BIG: the route options need big and another choice.")
    return space


def budget_level(budget: LayerBudget, num_layers: int) -> int:
    """How many moves below all-BIG a budget lies: ``num_layers`` minus its BIG count."""
    big = dict(budget.counts).get(BIG)
    if big is None or budget.big_schedule is not None:
        raise ValueError(
            f"budget {budget.label!r}: an approximate search takes budgets that fix the number of BIG layers, "
            f"e.g. big={num_layers - 4} (4 layers moved off BIG); search 'all', 'classes' or schedules exactly."
        )
    return num_layers - big


def one_move_below(beam: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
    """Every pattern (``[P, layers]``, ascending index) one move below a pattern of ``beam``: one of its BIG layers
    turned into another allowed choice."""
    children = []
    for code in (c for c in choices if c != BIG):
        for layer in range(beam.shape[1]):
            rows = beam[beam[:, layer] == BIG].clone()
            rows[:, layer] = code
            children.append(rows)
    patterns = torch.cat(children)
    _, first = _unique_first(pattern_index(patterns, choices))
    return patterns[first]


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of ``ids`` and the position of one occurrence of each."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    position = torch.full((len(unique),), len(ids), dtype=torch.long)
    position.scatter_reduce_(0, inverse, torch.arange(len(ids)), reduce="amin")
    return unique, position


def can_reach(patterns: torch.Tensor, budgets: Sequence[LayerBudget], num_layers: int, choices) -> torch.Tensor:
    """Which patterns can still become a pattern of one of ``budgets`` by further moves (moves only add non-BIG
    choices: every non-BIG count must stay within one of the budgets' count vectors)."""
    counts = torch.nn.functional.one_hot(patterns.long(), len(CHOICE_NAMES)).sum(-2)
    other = [c for c in range(len(CHOICE_NAMES)) if c != BIG]
    ok = torch.zeros(len(patterns), dtype=torch.bool)
    for budget in budgets:
        targets = budget_count_vectors(num_layers, choices, budget)
        ok |= (counts[:, None, other] <= targets[None, :, other]).all(-1).any(-1)
    return ok


def next_beam(result: OracleResult, search: SearchSettings, later: Sequence[LayerBudget]) -> torch.Tensor:
    """The patterns a level keeps for the next one: among its searched patterns that can reach a ``later`` budget,
    the ``width`` lowest by mean loss and (``beam``) the ``width`` that win the most tokens."""
    space = result.space
    ranks = (space.members.any(0) & can_reach(space.patterns, later, space.num_layers, space.choices)).nonzero()
    ranks = ranks.squeeze(1)
    mask = result.tensors["token_mask"].bool()
    won = torch.bincount(space.ranks(result.tensors["oracle_index"][:, mask].reshape(-1)), minlength=space.size)
    keep = beam_rows(result.tensors["pattern_loss_sum"][ranks], won[ranks], search)
    return space.patterns[ranks[keep]]


def beam_rows(loss_sums: torch.Tensor, won: torch.Tensor, search: SearchSettings) -> torch.Tensor:
    """The rows (ascending) of the candidates a beam keeps, given each one's summed loss and the tokens it wins as
    the per-token oracle's choice: the ``width`` lowest by loss and, for ``beam``, the ``width`` that win the most
    tokens (tokens won > 0); ``greedy`` keeps the one lowest by loss. Ties go to the lowest row."""
    width = 1 if search.method == "greedy" else search.width
    # A stable sort breaks ties towards the lowest row (rows ascend with the pattern index).
    keep = set(torch.argsort(loss_sums, stable=True)[:width].tolist())
    if search.method == "beam":
        order = torch.argsort(-won, stable=True)[:width]
        keep |= set(order[won[order] > 0].tolist())
    return torch.tensor(sorted(keep), dtype=torch.long)


def sample_seed(seed: int, budget: LayerBudget) -> int:
    """The seed of one budget's best-of-K draw: a stable function of the run's seed and the budget's label."""
    return (seed * 1_000_003 + zlib.crc32(budget.label.encode())) % (1 << 63)


@torch.no_grad()
def run_beam_study(
    model,
    input_ids: torch.LongTensor,
    budgets: PatternSet,
    output_dir: str | Path,
    search: SearchSettings,
    *,
    batch_size: int = 8,
    best_of_k: int = 0,
    seed: int = 0,
    causal: bool = False,
    chunk_tokens: int | None = None,
    model_id: str = "",
    data_id: str = "",
    stop_after_batches: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> OracleResult | None:
    """The approximate oracle study (see the module docstring) of every budget of ``budgets`` (`search_space`).

    Takes the arguments of `run.run_oracle_study`; ``stop_after_batches`` counts the batches of each level.
    Returns the joined result on the main process once every level is done (saved to ``output_dir`` like an exact
    run), else None.
    """
    state = process_state()
    num_layers, choices = budgets.num_layers, budgets.choices
    levels = [budget_level(b, num_layers) for b in budgets.budgets]
    output_dir = Path(output_dir)
    if overwrite and state.is_main_process:
        shutil.rmtree(output_dir / LEVELS_DIR, ignore_errors=True)
        for name in (ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE):
            (output_dir / name).unlink(missing_ok=True)
    state.wait_for_everyone()
    beam = torch.full((1, num_layers), BIG, dtype=torch.long)
    found: dict[int, OracleResult] = {}
    searched = pattern_tokens = 0
    for level in range(1, max(levels) + 1):
        asked = [b for b, j in zip(budgets.budgets, levels) if j == level]
        later = [b for b, j in zip(budgets.budgets, levels) if j >= level]
        level_budgets = asked or [LayerBudget(counts=((BIG, num_layers - level),))]
        candidates = one_move_below(beam, choices)
        candidates = candidates[can_reach(candidates, later, num_layers, choices)]
        in_level = torch.stack([b.matches(_counts(candidates)) for b in level_budgets]).any(0)
        candidates = candidates[in_level]
        k = best_of_k if asked else 0
        samples = [sample_budget(num_layers, choices, b, k, sample_seed(seed, b)) for b in asked] if k else []
        if not len(candidates) and not samples:
            raise UsageError(
                f"the beam kept no pattern that reaches budget {level_budgets[0].label!r}; widen --beam-width or "
                "draw best-of-K patterns."
            )
        space = PatternSet(
            num_layers, choices, level_budgets, candidates, samples=samples, sample_k=k, sample_seed=seed if k else 0,
            extra_classes=budgets.extra_classes,
        )
        level_dir = output_dir / LEVELS_DIR / f"level_{level:02d}"
        run_oracle_study(
            model, input_ids, space, level_dir, batch_size=batch_size, best_of_k=k, seed=seed,
            causal=causal and bool(asked), chunk_tokens=chunk_tokens, model_id=model_id, data_id=data_id,
            stop_after_batches=stop_after_batches, progress=progress, search={**search.describe(), "level": level},
        )
        state.wait_for_everyone()
        if not (level_dir / ORACLE_RESULTS_FILE).is_file():
            return None  # stopped after `stop_after_batches`: the same call continues this level
        result = OracleResult.load(level_dir)
        searched += int(space.members.any(0).sum())
        pattern_tokens += result.meta["pattern_tokens"]
        if asked:
            found[level] = result
        if level < max(levels):
            beam = next_beam(result, search, [b for b, j in zip(budgets.budgets, levels) if j > level])
    if not state.is_main_process:
        return None
    meta = {**search.describe(), "levels": max(levels), "patterns_searched_all_levels": searched}
    joined = join_levels(budgets, [found[j] for j in levels], meta)
    joined.meta["pattern_tokens"] = pattern_tokens
    joined.save(output_dir)
    return joined


def _counts(patterns: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(patterns.long(), len(CHOICE_NAMES)).sum(-2)


def join_levels(budgets: PatternSet, parts: Sequence[OracleResult], search: Mapping) -> OracleResult:
    """One result for every budget of ``budgets`` from the level results that hold them (``parts[g]`` holds budget
    ``g``): its space is the union of their searched patterns, its tensors theirs, ``meta["search"]`` = ``search``."""
    labels = budgets.labels
    members = [p.space.members[p.space.budget_index(label)] for label, p in zip(labels, parts)]
    first = parts[0]
    k, seed = first.meta.get("best_of_k", 0), first.meta.get("seed", 0)
    samples = []
    if k:
        samples = [p.space.patterns[p.space.sampled[p.space.budget_index(lab)]] for lab, p in zip(labels, parts)]
    space = PatternSet(
        budgets.num_layers, budgets.choices, budgets.budgets,
        torch.cat([p.space.patterns[m] for p, m in zip(parts, members)]),
        samples=samples, sample_k=k, sample_seed=seed if k else 0, extra_classes=budgets.extra_classes,
    )
    tensors = {"input_ids": first.tensors["input_ids"], "token_mask": first.tensors["token_mask"]}
    for name in ("oracle", "best_of_k", "causal"):
        for part in ("loss", "index"):
            key = f"{name}_{part}"
            if key in first.tensors:
                rows = [p.tensors[key][p.space.budget_index(lab)] for lab, p in zip(labels, parts)]
                tensors[key] = torch.stack(rows)
    sums = torch.zeros(space.size, dtype=torch.float64)
    for part in {id(p): p for p in parts}.values():
        inside = torch.isin(part.space.indices, space.indices)
        sums[space.ranks(part.space.indices[inside])] = part.tensors["pattern_loss_sum"][inside]
    tensors["pattern_loss_sum"] = sums
    tensors["schedule_loss_sum"] = torch.zeros(0, space.size, dtype=torch.float64)
    tensors["uniform_loss"] = first.tensors["uniform_loss"]
    if k:
        tensors["best_of_k_samples"] = space.sample(k, seed)
    meta = {key: value for key, value in first.meta.items() if key != "search"}
    return OracleResult(space, tensors, {**meta, "search": dict(search)})


def search_gap(approximate: OracleResult, exact: OracleResult) -> dict[str, dict]:
    """The measured gap of an approximate search to the exact one on the same blocks, per budget both hold.

    Per budget: ``patterns_searched`` / ``budget_size``, whether the approximate ``fixed`` pattern is the exact one
    (``fixed_pattern_found``), and per method of `GAP_METHODS` (those both results hold) the two perplexities and
    their ``ratio`` (approximate / exact, >= 1 up to float rounding: a search can only miss patterns). Best-of-K is
    left out: it is exact over its K random patterns whatever the search.
    """
    if not torch.equal(approximate.tensors["input_ids"], exact.tensors["input_ids"]):
        raise UsageError("search gap: the two oracle runs evaluated different token blocks; run both on the same data.")
    common = [label for label in approximate.budgets if label in exact.budgets]
    if not common:
        raise UsageError(
            f"search gap: no budget in common (approximate {approximate.budgets}, exact {exact.budgets})."
        )
    gap = {}
    for label in common:
        g = approximate.space.budget_index(label)
        row = {
            "patterns_searched": int(approximate.space.members[g].sum()),
            "budget_size": approximate.space.budget_full_sizes()[g],
            "fixed_pattern_found": approximate.fixed_pattern(label) == exact.fixed_pattern(label),
        }
        for method in GAP_METHODS:
            try:
                a, e = approximate.perplexity(method, label), exact.perplexity(method, label)
            except KeyError:
                continue
            row[method] = {"approximate": a, "exact": e, "ratio": a / e}
        gap[label] = row
    return gap


def largest_gap(gap: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per method, the largest ratio of a `search_gap` and its budget: the figure to print next to approximate
    results at budgets where exact search is out of reach (``{"oracle": {"ratio": 1.2, "budget": "big=27"}}``)."""
    out = {}
    for method in GAP_METHODS:
        rows = [(row[method]["ratio"], label) for label, row in gap.items() if method in row]
        if rows:
            ratio, label = max(rows)
            out[method] = {"ratio": ratio, "budget": label}
    return out


def gap_table(gap: Mapping[str, Mapping]) -> str:
    """`search_gap` as a text table: per budget, patterns searched of the budget, and per method the approximate
    and exact perplexities with their ratio."""
    methods = [m for m in GAP_METHODS if any(m in row for row in gap.values())]
    head = f"{'budget':<14} {'searched':>19} " + " ".join(f"{m + ' approx/exact (ratio)':>36}" for m in methods)
    lines = [head]
    for label, row in gap.items():
        share = f"{row['patterns_searched']:,}/{row['budget_size']:,}"
        cells = []
        for m in methods:
            cell = row.get(m)
            cells.append(f"{cell['approximate']:>12.3f} / {cell['exact']:>9.3f} ({cell['ratio']:.4f})" if cell else "")
        lines.append(f"{label:<14} {share:>19} " + " ".join(f"{c:>36}" for c in cells))
    return "\n".join(lines)


def run_search(
    model,
    input_ids: torch.LongTensor,
    space,
    output_dir: str | Path,
    search: SearchSettings = SearchSettings(),
    gap_from: str | Path | None = None,
    **kwargs,
) -> OracleResult | None:
    """Run the oracle study with ``search``: exact (`run.run_oracle_study` over ``space``, a `RouteSpace`) or
    approximate (`run_beam_study` over ``space``, a `search_space`). ``gap_from``: the folder of an exact run on
    the same blocks; its `search_gap` goes to the result's ``meta["search_gap"]`` (saved with it)."""
    if search.approximate:
        result = run_beam_study(model, input_ids, space, output_dir, search, **kwargs)
    else:
        result = run_oracle_study(model, input_ids, space, output_dir, search=search.describe(), **kwargs)
    if result is not None and gap_from is not None:
        result.meta["search_gap"] = search_gap(result, OracleResult.load(gap_from))
        result.save(output_dir)
    return result


def route_space_for(config, budgets: Sequence, route_options: Sequence | None, search: SearchSettings):
    """The space a search needs: the enumerated `run.study_space` (exact) or the checked budgets (approximate)."""
    if search.approximate:
        return search_space(config, budgets, route_options)
    return study_space(config, budgets, route_options)


__all__ = [
    "SearchSettings",
    "beam_rows",
    "budget_level",
    "gap_table",
    "join_levels",
    "largest_gap",
    "next_beam",
    "one_move_below",
    "route_space_for",
    "run_beam_study",
    "run_search",
    "search_gap",
    "sample_seed",
    "search_space",
]
