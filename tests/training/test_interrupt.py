"""Ctrl-C (a real SIGINT to a real ``duo-llm train`` process): exit code 130 and one line that says where the run
stopped and the command that continues it, without a traceback; that command continues from the checkpoint."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import train_duo_argv
from tests.training.test_kill import signal_when


def interrupt_when(argv: list[str], ready) -> subprocess.CompletedProcess:
    """Ctrl-C: SIGINT to ``duo-llm ARGV`` as soon as ``ready()`` holds."""
    return signal_when(argv, ready, signal.SIGINT)


def newest_step(folder: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in (folder / "checkpoints").glob("step_*")]
    return max(steps, default=0)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_command_that_continues(tmp_path):
    out = tmp_path / "run"
    argv = ["train", *train_duo_argv(out, tmp_path / "cache", max_steps=100_000, checkpoint_every=5)]
    done = interrupt_when(argv, lambda: newest_step(out) >= 5)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    found = re.fullmatch(
        rf"duo-llm train: interrupted \(Ctrl-C\) in {re.escape(str(out))}, its last checkpoint is step_(\d+); "
        r"to continue, run: (duo-llm train .*)",
        lines[0],
    )
    assert found, lines[0]
    stopped_at = int(found.group(1))
    assert stopped_at == newest_step(out)
    resume = shlex.split(found.group(2))
    assert resume[2:] == [*argv[1:], "--resume-from", "latest"]

    # The printed command continues the run: it goes on from that checkpoint to later ones.
    again = interrupt_when(resume[1:], lambda: newest_step(out) > stopped_at)
    assert again.returncode == 130, again.stderr
    assert f"Resumed from {out / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in again.stdout
    later = re.search(r"its last checkpoint is step_(\d+)", again.stderr)
    assert later and int(later.group(1)) > stopped_at, again.stderr


def test_the_command_that_continues_replaces_an_earlier_resume_flag():
    from duo_llm_hf.utils.errors import resume_command

    assert resume_command("duo-llm train", ["--output-dir", "my run", "--resume-from", "runs/x/step_5"]) == (
        "duo-llm train --output-dir 'my run' --resume-from latest"
    )
    assert resume_command("duo-llm train-router", ["--resume_from=latest", "--max-steps", "9"]) == (
        "duo-llm train-router --max-steps 9 --resume-from latest"
    )
    assert resume_command("duo-llm oracle", ["--model", "m", "--resume-from", "x"]) == (
        "duo-llm oracle --model m --resume-from x"  # the oracle resumes when run again: its command as it was
    )
