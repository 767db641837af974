"""Markdown tables, the one writer of the study report, the ablation, the router comparison and the model card."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

ALIGNMENTS = {"": "---", "right": "---:"}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``header`` and ``rows`` (cells printed with `str`).

    ``align`` gives each column's alignment, ``""`` (the renderer's default) or ``"right"``. A ``|`` inside a cell is
    escaped, as a route pattern of a position schedule (``"Bsss|BBss"``) would otherwise split the cell.
    """
    align = align or [""] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(f"{ALIGNMENTS[a]}|" for a in align)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["markdown_table"]
