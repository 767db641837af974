"""The study's holdouts: a holdout added to a finished study runs only its own stages; a holdout whose content
changed is refused, or with overwrite only its stages are redone; every other stage is kept as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from duo_llm_hf.experiments.study import run_study
from duo_llm_hf.utils.errors import UsageError
from duo_llm_hf.utils.run_files import STAGE_DONE_FILE

# Stage 1 and the oracle only (no routers, no causal oracle): what the holdouts change.
SMALL = dict(router_kinds=(), causal_budget=None, builtin_holdouts=False, progress=False)


def _markers(out: Path) -> dict[str, float]:
    """Each finished stage's marker and when it was written."""
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob(STAGE_DONE_FILE)}


@pytest.mark.slow
def test_holdouts_added_or_changed_keep_the_other_stages(tmp_path):
    out = tmp_path / "study"
    mine, other = tmp_path / "mine.txt", tmp_path / "other.txt"
    mine.write_text("The router decides, the oracle knows the next word. " * 60)
    other.write_text("Every token takes a route through small and big layers. " * 60)

    run_study(out, "tiny", holdouts={"mine": str(mine)}, **SMALL)
    first = _markers(out)
    assert set(first) == {"model", "oracle/mine", "oracle_skip/mine"}

    run_study(out, "tiny", holdouts={"mine": str(mine), "other": str(other)}, **SMALL)
    second = _markers(out)
    assert {k: second[k] for k in first} == first  # stage 1 and mine's oracles were reused
    assert set(second) - set(first) == {"oracle/other", "oracle_skip/other"}

    mine.write_text(mine.read_text() + "One sentence more. ")
    with pytest.raises(UsageError, match=r"--holdout mine: its content changed since its stages ran .*oracle/mine"):
        run_study(out, "tiny", holdouts={"mine": str(mine), "other": str(other)}, **SMALL)
    assert _markers(out) == second

    run_study(out, "tiny", holdouts={"mine": str(mine), "other": str(other)}, overwrite=True, **SMALL)
    third = _markers(out)
    redone = {k for k in third if third[k] != second[k]}
    assert redone == {"oracle/mine", "oracle_skip/mine"}
