"""The one Markdown table writer (duo_llm_hf.utils.tables) and the study's Spearman correlation."""

from __future__ import annotations

import torch

from duo_llm_hf.experiments.report import spearman
from duo_llm_hf.utils.tables import markdown_table


def test_markdown_table_aligns_and_escapes_pipes():
    text = markdown_table(["k", "pattern", "ppl"], [[1, "Bsss|BBss", "2.50"]], align=["", "", "right"])
    assert text.splitlines() == ["| k | pattern | ppl |", "|---|---|---:|", "| 1 | Bsss\\|BBss | 2.50 |"]
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_spearman_gives_tied_values_their_average_rank():
    # Ranks (1.5, 1.5, 3) against (1, 2, 3): Pearson of the ranks is sqrt(3) / 2 (ties broken by position gave 1).
    assert abs(spearman(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) - 3**0.5 / 2) < 1e-12
    assert abs(spearman(torch.arange(5.0), -torch.arange(5.0)) + 1) < 1e-12
