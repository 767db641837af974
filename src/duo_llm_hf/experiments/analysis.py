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


# ----------------------------------------------------------------------------------------------------
# One style for every figure (the study's and the ablation's): constrained layout so that titles, axis labels,
# colorbars and legends never overlap or get clipped, a light grid, plain tick labels, a tight box when saved.


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.0), **kwargs):
    """``(fig, axes)`` with constrained layout; ``axes`` is always 2-D (``squeeze=False``)."""
    return _pyplot().subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kwargs)


def style_axes(ax, grid: str = "both") -> None:
    """Light grid behind the data (``grid``: "x", "y", "both" or "" for none), no top/right frame."""
    if grid:
        ax.grid(alpha=0.3, axis=grid)
        ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)


def plain_log_axis(ax, values: Sequence[float], which: str = "y") -> None:
    """Log scale on ``ax``'s ``which`` axis with ticks written as plain numbers (``50``, not ``5x10^1``).

    Matplotlib labels a log axis that spans less than a decade with its minor ticks in scientific notation; here
    the ticks are round linear steps inside one decade and 1-2-5 steps over several, and minor ticks carry no label.
    """
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    positive = [v for v in values if v > 0 and math.isfinite(v)]
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    if positive and max(positive) / min(positive) < 10:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    plain = ScalarFormatter(useOffset=False, useMathText=False)
    plain.set_scientific(False)
    axis.set_major_formatter(plain)  # one number of decimals for all ticks (296.8, 297.0, 297.2)
    axis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (tight box: nothing drawn outside the axes is cut off) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.1, pil_kwargs={"optimize": True})
    _pyplot().close(fig)
    return path


# Line style per method, so that curves lying on top of each other (a router on fixed) stay distinguishable.
_METHOD_STYLES = (
    {"marker": "o", "ls": "-"},
    {"marker": "s", "ls": "--"},
    {"marker": "^", "ls": "-"},
    {"marker": "D", "ls": ":"},
    {"marker": "v", "ls": "-."},
)


def plot_ppl_vs_budget(
    curves: Mapping[str, Mapping[int, float]], n_layers: int, path: str | Path, title: str = ""
) -> Path:
    """Perplexity against the number of BIG layers per token, one line per method (the paper's Fig. 4b)."""
    fig, axes = new_figure(figsize=(7.2, 4.2))
    ax = axes[0, 0]
    for i, (method, points) in enumerate(curves.items()):
        ks = sorted(int(k) for k in points)
        style = _METHOD_STYLES[i % len(_METHOD_STYLES)]
        # Earlier methods drawn wider: a curve equal to an earlier one (best-of-K = oracle) leaves it visible.
        width = max(1.2, 3.0 - 0.5 * i)
        ax.plot(ks, [points[k] for k in ks], lw=width, ms=2 * width + 2, label=method, **style)
    ax.set_xlabel(f"BIG layers per token (of {n_layers})")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    plain_log_axis(ax, [v for points in curves.values() for v in points.values()])
    ax.set_xticks(range(0, n_layers + 1, max(1, math.ceil((n_layers + 1) / 13))))
    ax.set_title(title or "Perplexity against budget", fontsize=11)
    style_axes(ax)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_method_values(
    values: Mapping[str, float], path: str | Path, title: str = "", label: str = "perplexity (lower is better)"
) -> Path:
    """One dot per method with its value and how far it lies above the lowest (the paper's Fig. 4a and 4c).

    Dots rather than bars: the axis spans the values instead of starting at 0, so that differences of a few
    percent between methods are visible, and a dot does not suggest that its length means anything.
    """
    names = list(values)
    fig, axes = new_figure(figsize=(7.2, 0.42 * len(names) + 1.3))
    ax = axes[0, 0]
    rows = list(range(len(names)))[::-1]  # first method on top
    colours = _pyplot().cm.tab10.colors
    low, high = min(values.values()), max(values.values())
    for row, name in zip(rows, names, strict=True):
        value = values[name]
        ax.plot([value], [row], "o", ms=8, color=colours[names.index(name) % len(colours)])
        above = 100 * (value / low - 1)
        note = "lowest" if value == low else f"+{above:.{1 if above >= 0.1 else 3}f}%"  # never a bare "+0.0%"
        ax.annotate(f"{value:.3f} ({note})", (value, row), xytext=(8, 0), textcoords="offset points", va="center")
    span = (high - low) or abs(high) * 0.05 or 1.0
    ax.set_xlim(low - 0.15 * span, high + 0.6 * span)  # room for the value written right of the highest dot
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_yticks(rows, names)
    ax.set_xlabel(label)
    ax.set_title(title, fontsize=11)
    style_axes(ax, grid="x")
    ax.tick_params(axis="y", labelsize=9, length=0)
    return save_figure(fig, path)


def plot_usage_heatmaps(
    usage: Mapping[str, torch.Tensor], path: str | Path, title: str = "", choice: int = BIG, max_positions: int = 64
) -> Path:
    """Heatmaps of one choice's usage, layer x token position, one panel per entry (Fig. 2 and Fig. 3).

    ``usage[name]`` has shape ``[choices, layers, positions]`` (fractions or counts per position); the panel shows
    the fraction of tokens at each position that took ``choice`` in each layer.
    """
    names = list(usage)
    fig, axes = new_figure(1, len(names), figsize=(3.0 * len(names) + 1.2, 3.4), sharey=True)
    for i, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        fractions = usage_fraction(usage[name], choice)[:, :max_positions]
        image = ax.imshow(fractions.numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("token position", fontsize=9)
        layers = fractions.shape[0]
        ax.set_yticks(range(0, layers, max(1, math.ceil(layers / 8))))
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.set_ylabel("layer (0 = first)", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=f"fraction of tokens on {CHOICE_NAMES[choice]}")
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_router_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    references: Mapping[str, float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Held-out perplexity against training steps, one line per router (``[[step, ppl], ...]``), with horizontal
    reference lines (fixed and oracle at the same budget): whether a router converged, and where to."""
    fig, axes = new_figure(figsize=(6.4, 4.0))
    ax = axes[0, 0]
    values = [value for points in curves.values() for _, value in points] + list(references.values())
    for label, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    for i, (label, value) in enumerate(references.items()):
        ax.axhline(value, color="grey", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=label)
    ax.set_xlabel("router training step")
    ax.set_ylabel("held-out perplexity (hard routing)")
    if values:
        plain_log_axis(ax, values)
    ax.set_title(title or "Router training curves", fontsize=10)
    style_axes(ax)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path)


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
    tokens: Sequence[str], scores: Mapping[str, Sequence[float]], path: str | Path, line_chars: int = 110
) -> Path:
    """Held-out text with each token coloured by a score, one panel per score (the paper's Fig. 5 and 6).

    The text flows as it reads (monospace, ``line_chars`` characters a line, a new line after each newline token),
    so that the words can be read; each panel's title gives the values of its two colour ends.
    """
    placed = _flow(tokens, line_chars)
    n_lines = max(1, placed[-1][0] + 1) if placed else 1
    fontsize = 9
    char_width = 0.602 * fontsize / 72  # inches: DejaVu Sans Mono's advance width is 0.602 em
    line_height = 1.9 * fontsize / 72
    fig, axes = new_figure(
        len(scores), 1, figsize=(line_chars * char_width + 0.4, (n_lines * line_height + 0.45) * len(scores))
    )
    for ax, (name, values) in zip(axes[:, 0], scores.items(), strict=True):
        for (row, col, text), colour in zip(placed, _colours(values), strict=True):
            ax.text(
                col / line_chars,
                1 - (row + 0.5) / n_lines,
                text,
                fontsize=fontsize,
                family="DejaVu Sans Mono",
                va="center",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.6},
            )
        ax.set_axis_off()
        low, high = min(values), max(values)
        ax.set_title(f"{name}: blue = {low:.3g} (low), red = {high:.3g} (high)", fontsize=10, loc="left")
    return save_figure(fig, path)


def _flow(tokens: Sequence[str], line_chars: int) -> list[tuple[int, int, str]]:
    """``(line, column, text)`` of each token written one after the other, wrapping at ``line_chars``; a token
    that starts with a newline starts a line, one that ends with a newline ends its line."""
    placed, row, col = [], 0, 0
    for token in tokens:
        text = _visible(token)[:line_chars]
        if col and (col + len(text) > line_chars or (token.startswith("\n") and token.strip("\n"))):
            row, col = row + 1, 0
        placed.append((row, col, text))
        col += len(text)
        if token.endswith("\n"):
            row, col = row + 1, 0
    return placed


def token_difficulty_html(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], title: str) -> str:
    """A self-contained HTML page with the text coloured by each score (hover shows the value)."""
    sections = []
    for name, values in scores.items():
        spans = "".join(
            f'<span title="{v:.3f}" style="background:{_css(c)}">{html.escape(t)}</span>'
            for t, v, c in zip(tokens, values, _colours(values), strict=True)
        )
        ends = f"blue = {min(values):.3g} (low), red = {max(values):.3g} (high)"
        sections.append(f"<h2>{html.escape(name)}</h2><p>{ends}</p><pre class=text>{spans}</pre>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}pre.text{white-space:pre-wrap;line-height:1.6}"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Blue: low, red: high (scaled per panel); hover a token for its value.</p>"
        + "".join(sections)
        + "</body></html>"
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
