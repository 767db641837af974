"""The ablation's figure, ``fig8.png``: the paper's Fig. 8 panels on the benchmarks and on held-out perplexity."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..analysis import new_figure, save_figure, style_axes
from .benchmarks import BENCHMARK_CHANCE, BENCHMARK_METRICS, BENCHMARK_NAMES
from .plan import KINDS, AblationPlan


def plot_fig8(plan: AblationPlan, rows: Sequence[dict], counts: Mapping[str, int], path: Path, dpi: int = 72) -> Path:
    """The paper's Fig. 8 panels on the benchmarks (top row, if any) and on held-out perplexity (bottom row)."""
    panels = []  # (title, y label, [(kind, key, label, style)], chance levels)
    if plan.benchmarks.enabled:
        note = plan.benchmarks.short_label(counts)
        scored = plan.benchmarks.benchmarks
        keys = {b: f"{b}_{m}" for b, m in BENCHMARK_METRICS.items()}
        chance = {b: [BENCHMARK_CHANCE[b]] if b in BENCHMARK_CHANCE else [] for b in scored}
        for letter, (b, metric) in zip("ab", BENCHMARK_METRICS.items(), strict=True):
            if b not in scored:  # an empty slot keeps the paper's panel order and rows
                panels.append(None)
                continue
            title = f"({letter}) {BENCHMARK_NAMES[b]} {metric}\n{note}".strip()
            lines = [("duo", keys[b], "Duo", {}), ("dense", keys[b], "dense, equal FLOPs", {})]
            panels.append((title, metric, lines, chance[b]))
        lines = []
        for b, colour in zip(BENCHMARK_METRICS, ("C0", "C1"), strict=True):
            if b in scored:
                lines.append(("duo", keys[b], f"{BENCHMARK_NAMES[b]}: from scratch", {"color": colour}))
                lines.append(
                    ("frozen-big", keys[b], f"{BENCHMARK_NAMES[b]}: frozen big", {"color": colour, "ls": "--"})
                )
        levels = sorted({level for b in scored for level in chance[b]})
        panels.append((f"(c) from scratch vs frozen big\n{note}".strip(), "accuracy", lines, levels))
    if plan.holdouts:
        letters = iter("de")
        for name in list(plan.holdouts)[:2]:
            key = f"ppl_{name}"
            lines = [("duo", key, "Duo", {}), ("dense", key, "dense, equal FLOPs", {})]
            panels.append((f"({next(letters)}) held-out perplexity, {name}", "perplexity", lines, []))
        lines = []
        for name, colour in zip(plan.holdouts, ("C0", "C1"), strict=False):
            lines.append(("duo", f"ppl_{name}", f"{name}: from scratch", {"color": colour}))
            lines.append(("frozen-big", f"ppl_{name}", f"{name}: frozen big", {"color": colour, "ls": "--"}))
        panels.append(("(f) from scratch vs frozen big, perplexity", "perplexity", lines, []))
    n_rows = math.ceil(len(panels) / 3)
    fig, axes = new_figure(n_rows, 3, figsize=(12, 3.4 * n_rows + 0.6))
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel is None:
            ax.set_axis_off()
            continue
        title, ylabel, lines, chance_levels = panel
        for level in chance_levels:
            ax.axhline(level, color="grey", ls=":", lw=1, label=f"chance ({level:g})")
        for kind, key, label, style in lines:
            points = sorted((r["p_big"], r[key]) for r in rows if r["model"] == KINDS[kind] and r.get(key) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=4, label=label, **style)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("p_big", fontsize=8)
        ax.set_xticks(plan.p_bigs)
        style_axes(ax)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    tokens = plan.steps * plan.tokens_per_step
    fig.suptitle(
        f"Fig. 8 ablations, preset '{plan.settings['preset']}', {tokens:,} training tokens per model. x: p_big of the "
        "random routing at evaluation (Duo, frozen big) or whose FLOPs a dense model matches.",
        fontsize=9,
    )
    return save_figure(fig, path, dpi=dpi)  # dpi 72: small enough to commit
