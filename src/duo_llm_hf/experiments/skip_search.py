"""The BIG-or-SKIP study's oracle beyond its exact budgets: a beam over the levels below all-BIG, started from the
exact loss table, on the first holdout's blocks.

Level ``m`` (FFNs skipped per token) evaluates every pattern one move below a pattern the beam kept at level
``m - 1`` (`oracle.search.one_move_below`); the beam keeps the ``width`` patterns lowest in mean loss and the
``width`` that are the per-token oracle's choice for the most tokens (`oracle.search.beam_rows`), and starts from
every pattern of the last exact level. At a level the study reports, ``search_best_of_k`` patterns drawn uniformly
from the whole budget (`oracle.spaces.sample_budget`) join the searched ones, so best-of-K stays exact over its K
draws. The oracle of a searched level is the per-token minimum over the patterns searched and *fixed* the searched
pattern lowest in mean loss: each an upper bound on the exact figure. `table_beam_gap` measures by how much, by
running the same beam one step inside the exact table, where every pattern's loss is known.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.routes import BIG, SKIP
from ..oracle.search import SearchSettings, beam_rows, one_move_below, sample_seed
from ..oracle.spaces import LayerBudget, PatternSet, pattern_index, sample_budget
from ..utils.files import atomic_save_tensors
from . import skip_analysis as sa

LEVEL_FILE = "level.safetensors"
# Blocks per prefix-tree walk (and per saved batch file) of a loss table.
TABLE_BATCH = 4
CHOICES = (BIG, SKIP)


def batched_pattern_losses(model, blocks: torch.LongTensor, space, folder: Path) -> torch.Tensor:
    """The losses ``[patterns, blocks, positions]`` of every pattern of ``space``, ``TABLE_BATCH`` blocks per
    prefix-tree walk; each batch is saved under ``folder/batches`` as it finishes (a killed run keeps them) and
    the folder is removed once the whole table is returned."""
    from ..oracle.engine import pattern_losses

    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(blocks), TABLE_BATCH):
        path = folder / "batches" / f"batch_{start // TABLE_BATCH:05d}.safetensors"
        if not path.is_file():
            _, losses = pattern_losses(model, blocks[start : start + TABLE_BATCH].to(device), space)
            atomic_save_tensors({"losses": losses.cpu().contiguous()}, path)
        parts.append(load_file(path)["losses"])
    return torch.cat(parts, 1)


def remove_batches(folder: Path) -> None:
    """Remove the batch files of `batched_pattern_losses` once their table is saved whole."""
    shutil.rmtree(folder / "batches", ignore_errors=True)


def kept_for_next_level(losses: torch.Tensor, mask: torch.Tensor, search: SearchSettings) -> torch.Tensor:
    """The rows of ``losses`` (``[P, N, T]``, one row per searched pattern) that the beam keeps (`beam_rows`)."""
    sums = (losses.double() * mask.double()).sum((-2, -1))
    winners = losses.argmin(0)[mask.bool()]
    won = torch.bincount(winners, minlength=losses.shape[0])
    return beam_rows(sums, won, search)


def _rows_of(patterns: torch.Tensor, wanted: torch.Tensor, choices: tuple[int, ...]) -> torch.Tensor:
    """Row of each pattern of ``wanted`` in ``patterns`` (every one must be there)."""
    have, want = pattern_index(patterns, choices), pattern_index(wanted, choices)
    order = torch.argsort(have)
    rows = order[torch.searchsorted(have[order], want)]
    if not torch.equal(have[rows], want):
        raise ValueError("beam: a candidate pattern is missing from the exact table.")
    return rows


def table_beam_gap(table: dict, mask: torch.Tensor, search: SearchSettings, choices: tuple[int, ...] = CHOICES) -> dict:
    """The beam's measured gap at the table's last exact level ``m``: the beam kept at level ``m - 1`` (every
    pattern of which the table holds) and its candidates one move below, whose losses the table holds too, against
    every pattern of level ``m``. Per method (``oracle``, ``fixed``), both perplexities and their ratio
    (searched / exact, >= 1); also the patterns searched against the budget's size."""
    losses, patterns = table["losses"], table["patterns"]
    moved = sa.moved_counts(patterns)
    top = int(moved.max())
    if top < 2:
        raise ValueError("beam gap: the exact table must hold at least 2 layers moved off all-BIG.")
    level = (moved == top - 1).nonzero().flatten()
    beam = patterns[level[kept_for_next_level(losses[level], mask, search)]]
    searched = _rows_of(patterns, one_move_below(beam, choices), choices)
    exact = (moved == top).nonzero().flatten()
    gap = {"moved": top, "patterns_searched": len(searched), "budget_size": len(exact)}
    found, best = _oracle_and_fixed(losses[searched], mask), _oracle_and_fixed(losses[exact], mask)
    for method in ("oracle", "fixed"):
        gap[method] = {"searched": found[method], "exact": best[method], "ratio": found[method] / best[method]}
    return gap


def _oracle_and_fixed(losses: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Perplexity of the oracle and of the fixed pattern over every pattern of ``losses`` (`method_losses`)."""
    every = torch.ones(len(losses), dtype=torch.bool)
    methods = sa.method_losses(losses, every, mask, best_of_k=0, seed=0)
    return {m: math.exp(float(sa.masked_mean(methods[m], mask))) for m in ("oracle", "fixed")}


def search_stage(stages, model, holdout: str, blocks: torch.LongTensor, table: dict) -> dict:
    """``skip_search/<holdout>/level_XX/``: the beam's levels from the table's last exact level up to the largest
    of ``moved_search``, one stage per level (batches saved as they finish). Returns ``{"levels": {m: {"patterns",
    "losses", "sampled"}}, "gap": table_beam_gap, "search": settings}`` for the levels of ``moved_search``."""
    config = stages.config
    search = SearchSettings(config.search_method, config.search_width)
    mask = sa.token_mask(blocks)
    moved = sa.moved_counts(table["patterns"])
    rows = (moved == moved.max()).nonzero().flatten()
    start = {"patterns": table["patterns"][rows], "losses": table["losses"][rows]}

    def best_of_k(m: int) -> int:
        return config.search_best_of_k if m in config.moved_search else 0

    levels = search_levels(
        stages, model, blocks, start, CHOICES, max(config.moved_search), search,
        stages.out / "skip_search" / holdout, f"beam search, {{m}} FFNs skipped ({holdout}; {{size}} patterns)",
        best_of_k,
    )  # fmt: skip
    levels = {m: level for m, level in levels.items() if m in config.moved_search}
    return {"levels": levels, "gap": table_beam_gap(table, mask, search), "search": search.describe()}


def search_levels(
    stages,
    model,
    blocks: torch.LongTensor,
    start: dict,
    choices: tuple[int, ...],
    last: int,
    search: SearchSettings,
    folder: Path,
    label: str,
    best_of_k=lambda m: 0,
) -> dict[int, dict]:
    """The search's levels below ``start`` (the patterns and losses of one level: every pattern moving the same
    number of layers off all-BIG) down to ``last`` layers moved, over ``choices``: level ``m`` evaluates every
    pattern one move below a pattern kept at ``m - 1`` (`kept_for_next_level`), on every block, as its own stage
    in ``folder/level_XX`` (batches saved as they finish). ``best_of_k(m)`` patterns drawn uniformly from the
    whole budget join a level (0: none). ``label`` names a level's stage (``{m}``, ``{size}``). Returns
    ``{m: {"patterns", "losses", "sampled"}}`` for every level searched."""
    config = stages.config
    n = model.config.num_hidden_layers
    mask = sa.token_mask(blocks)
    patterns, losses = start["patterns"], start["losses"]
    levels = {}
    for m in range(int((patterns[0] != BIG).sum()) + 1, last + 1):
        candidates = one_move_below(patterns[kept_for_next_level(losses, mask, search)], choices)
        level_folder = folder / f"level_{m:02d}"
        k = best_of_k(m)
        budget = LayerBudget(counts=((BIG, n - m),))
        samples = [sample_budget(n, choices, budget, k, sample_seed(config.seed, budget))] if k else []
        seed = config.seed if k else 0
        space = PatternSet(n, choices, [budget], candidates, samples=samples, sample_k=k, sample_seed=seed)

        def work(level_folder=level_folder, space=space) -> dict:
            level_losses = batched_pattern_losses(model, blocks, space, level_folder)
            tensors = {"losses": level_losses, "patterns": space.patterns.clone(), "sampled": space.sampled[0].clone()}
            atomic_save_tensors(tensors, level_folder / LEVEL_FILE)
            remove_batches(level_folder)
            return {"patterns": space.size, "sampled": int(space.sampled.sum())}

        stages.run(label.format(m=m, size=space.size), level_folder, work)
        levels[m] = load_file(level_folder / LEVEL_FILE)
        patterns, losses = levels[m]["patterns"], levels[m]["losses"]
    return levels
