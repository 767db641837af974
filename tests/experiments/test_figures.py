"""The study's figures read as a reader needs: plain log ticks, a methods chart whose axis shows differences of a
few percent, heatmap titles and labels that neither overlap nor leave the figure, token text that flows."""

from __future__ import annotations

import pytest
import torch

from duo_llm_hf.experiments import analysis
from duo_llm_hf.experiments.report import fmt


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions would save, kept open and drawn (instead of written and closed)."""
    figures = []

    def keep(fig, path, dpi=110):
        fig.canvas.draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(analysis, "save_figure", keep)
    yield figures
    for fig in figures:
        analysis._pyplot().close(fig)


def _tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]


@pytest.mark.parametrize("low, high", [(296.46, 297.23), (44.9, 78.7), (10.0, 2500.0)])
def test_log_axis_ticks_are_plain_numbers(drawn, tmp_path, low, high):
    curves = {"oracle": {0: high, 1: low, 2: (low + high) / 2}, "fixed": {0: high, 1: high * 0.99, 2: high * 0.98}}
    analysis.plot_ppl_vs_budget(curves, 2, tmp_path / "ppl.png")
    ax = drawn[0].axes[0]
    assert ax.get_yscale() == "log"
    bottom, top = ax.get_ylim()
    labels = [t for t in ax.yaxis.get_ticklabels() if t.get_text() and bottom <= t.get_position()[1] <= top]
    assert len(labels) >= 2, _tick_labels(ax.yaxis)
    for text in _tick_labels(ax.yaxis):
        assert not any(s in text for s in ("10^", "times", "$", "e+", "e-")), text
        float(text.replace("\N{MINUS SIGN}", "-"))  # a plain number


def test_method_values_axis_spans_the_values_not_zero(drawn, tmp_path):
    values = {"oracle": 296.493, "best-of-20": 296.501, "fixed": 296.828, "router": 297.056}
    analysis.plot_method_values(values, tmp_path / "methods.png", "3 BIG layers of 6")
    ax = drawn[0].axes[0]
    left, right = ax.get_xlim()
    assert 0 < left < min(values.values()) and right > max(values.values())
    # The spread of the values takes a visible share of the axis (from 0 it would be 0.2% of it).
    assert (max(values.values()) - min(values.values())) / (right - left) > 0.4
    notes = " ".join(t.get_text() for t in ax.texts)
    assert all(fmt(v) in notes for v in values.values()) and "lowest" in notes and "+0.2%" in notes
    assert "+0.003%" in notes and "+0.0%" not in notes  # a small difference is not written as none
    top_down = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_down] == list(values)  # first method on top


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_heatmap_titles_and_labels_neither_overlap_nor_leave_the_figure(drawn, tmp_path):
    usage = torch.rand(3, 12, 64, generator=torch.Generator().manual_seed(0))
    panels = {f"oracle-supervised router k={k}": usage for k in (4, 6, 8)}
    analysis.plot_usage_heatmaps(panels, tmp_path / "usage.png", "oracle-supervised router: BIG usage (english)")
    fig = drawn[0]
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    suptitle = fig._suptitle.get_window_extent(renderer)
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3
    assert not any(_overlap(suptitle, t) for t in titles)
    assert not any(_overlap(a, b) for i, a in enumerate(titles) for b in titles[i + 1 :])
    for ax in fig.axes:  # every panel and the colorbar, with their tick labels, axis labels and titles
        box = ax.get_tightbbox(renderer)
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1


def test_token_text_flows_and_breaks_at_newlines():
    tokens = ["def", " f", "():", "\n", "    return", " 1", "\nx", " =", " f", "()"]
    placed = analysis._flow(tokens, line_chars=12)
    assert [row for row, _, _ in placed] == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert [col for _, col, _ in placed[:4]] == [0, 3, 5, 8]  # one after the other, by characters
    assert placed[3][2] == "\\n" and placed[6] == (2, 0, "\\nx")
    long = analysis._flow(["abcdef"] * 5, line_chars=12)
    assert [row for row, _, _ in long] == [0, 0, 1, 1, 2]
