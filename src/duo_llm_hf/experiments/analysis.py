"""Figures of the study: perplexity against budget, routing heatmaps, token difficulty.

Every function takes plain tensors / dicts produced by the oracle and router stages and writes one file; none of
them recomputes a route or a loss (DESIGN.md: analysis reads the outputs of stages 2 and 3).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..models.routes import BIG, CHOICE_NAMES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_budget(
    curves: Mapping[str, Mapping[int, float]], n_layers: int, path: str | Path, title: str = ""
) -> Path:
    """Perplexity against the number of BIG layers per token, one line per method (the paper's Fig. 4b)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        ks = sorted(int(k) for k in points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=method)
    ax.set_xlabel(f"BIG layers per token (of {n_layers})")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title or "Perplexity against budget")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_method_bars(
    values: Mapping[str, float], path: str | Path, title: str = "", ylabel: str = "perplexity"
) -> Path:
    """One bar per method (the paper's Fig. 4a oracle vs best-of-100 vs router, and Fig. 4c budgets)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(values)
    bars = ax.bar(range(len(names)), [values[n] for n in names], color=plt.cm.tab10.colors[: len(names)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_usage_heatmaps(
    usage: Mapping[str, torch.Tensor], path: str | Path, title: str = "", choice: int = BIG, max_positions: int = 64
) -> Path:
    """Heatmaps of one choice's usage, layer x token position, one panel per entry (Fig. 2 and Fig. 3).

    ``usage[name]`` has shape ``[choices, layers, positions]`` (fractions or counts per position); the panel shows
    the fraction of tokens at each position that took ``choice`` in each layer.
    """
    plt = _pyplot()
    names = list(usage)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        fractions = usage_fraction(usage[name], choice)[:, :max_positions]
        image = ax.imshow(fractions.numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("token position")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"fraction {CHOICE_NAMES[choice]}")
    fig.suptitle(title)
    return _save(fig, path, tight=False)


def plot_router_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    references: Mapping[str, float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Held-out perplexity against training steps, one line per router (``[[step, ppl], ...]``), with horizontal
    reference lines (fixed and oracle at the same budget): whether a router converged, and where to."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    for i, (label, value) in enumerate(references.items()):
        ax.axhline(value, color="grey", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=label)
    ax.set_xlabel("router training step")
    ax.set_ylabel("held-out perplexity (hard routing)")
    ax.set_yscale("log")
    ax.set_title(title or "Router training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def usage_fraction(usage: torch.Tensor, choice: int = BIG) -> torch.Tensor:
    """``[layers, positions]`` fraction of tokens taking ``choice`` from ``[choices, layers, positions]`` usage."""
    usage = usage.double()
    total = usage.sum(0).clamp_min(1e-12)
    return (usage[choice] / total).float()


def layer_preference(usage: torch.Tensor, choice: int = BIG) -> torch.Tensor:
    """Fraction of tokens taking ``choice`` in each layer, over all positions: ``[layers]``."""
    usage = usage.double()
    return (usage[choice].sum(-1) / usage.sum(0).sum(-1).clamp_min(1e-12)).float()


def plot_token_difficulty(
    tokens: Sequence[str], scores: Mapping[str, Sequence[float]], path: str | Path, per_line: int = 16
) -> Path:
    """Held-out text with each token coloured by a score, one panel per score (the paper's Fig. 5 and 6)."""
    plt = _pyplot()
    n_lines = max(1, math.ceil(len(tokens) / per_line))
    fig, axes = plt.subplots(len(scores), 1, figsize=(12, 0.32 * n_lines * len(scores) + 1.2), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], scores.items(), strict=True):
        colours = _colours(values)
        for i, (token, colour) in enumerate(zip(tokens, colours, strict=True)):
            row, col = divmod(i, per_line)
            ax.text(
                col / per_line,
                1 - (row + 0.5) / n_lines,
                _visible(token)[:10],
                fontsize=7,
                family="monospace",
                va="center",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0},
            )
        ax.set_axis_off()
        ax.set_title(name, fontsize=10, loc="left")
    return _save(fig, path)


def token_difficulty_html(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], title: str) -> str:
    """A self-contained HTML page with the text coloured by each score (hover shows the value)."""
    sections = []
    for name, values in scores.items():
        spans = "".join(
            f'<span title="{v:.3f}" style="background:{_css(c)}">{html.escape(t)}</span>'
            for t, v, c in zip(tokens, values, _colours(values), strict=True)
        )
        sections.append(f"<h2>{html.escape(name)}</h2><pre class=text>{spans}</pre>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}pre.text{white-space:pre-wrap;line-height:1.6}"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Blue: low, red: high (scaled per panel).</p>" + "".join(sections) + "</body></html>"
    )


def _colours(values: Sequence[float]) -> list[tuple[float, float, float, float]]:
    plt = _pyplot()
    values = torch.as_tensor(list(values), dtype=torch.float64)
    low, high = values.min().item(), values.max().item()
    scaled = (values - low) / max(high - low, 1e-12)
    return [plt.cm.coolwarm(float(v)) for v in scaled]


def _css(colour: tuple[float, float, float, float]) -> str:
    r, g, b = (round(255 * c) for c in colour[:3])
    return f"rgb({r},{g},{b})"


def _visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t") or " "


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
