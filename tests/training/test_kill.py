"""kill -9 of the real commands in the middle of their work, then the same command again: the result is bit for bit
the uninterrupted run's (the resumed part redoes the same computation on the same batches, routes and RNG states).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from tests.helpers import save_model_folder, tiny_llama_kwargs, train_duo_argv

CLI = [sys.executable, "-m", "duo_llm_hf.cli"]
TIMEOUT = 300


def run(argv: list[str]) -> None:
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_when(argv: list[str], ready: Callable[[], bool], sig: int) -> subprocess.CompletedProcess:
    """Start the command, send it ``sig`` as soon as ``ready()`` holds (polled), and return how it ended (the
    command must still be running then)."""
    # A shell starts background jobs with SIGINT ignored, and a child inherits that: give the command the default
    # disposition a terminal's foreground process has, so that the suite run in the background tests the same.
    process = subprocess.Popen(
        [*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"the command ended before the signal: {process.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "the command never reached the moment to signal it"
            time.sleep(0.02)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_when(argv: list[str], ready: Callable[[], bool]) -> None:
    """SIGKILL the command as soon as ``ready()`` holds (`signal_when`)."""
    assert signal_when(argv, ready, signal.SIGKILL).returncode == -signal.SIGKILL


def assert_same_tensors(a: Path, b: Path) -> None:
    expected, got = load_file(a), load_file(b)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_train_killed_then_rerun_equals_the_uninterrupted_run(tmp_path):
    # --resume-from latest starts afresh in an empty folder, so the first and the repeated command are the same.
    flags = dict(max_steps=30, checkpoint_every=5, resume_from="latest")
    run(["train", *train_duo_argv(tmp_path / "straight", tmp_path / "cache", **flags)])

    killed = tmp_path / "killed"
    argv = ["train", *train_duo_argv(killed, tmp_path / "cache", **flags)]
    kill_when(argv, lambda: (killed / "checkpoints" / "step_10").is_dir())
    assert not (killed / "model.safetensors").exists()
    run(argv)
    assert_same_tensors(tmp_path / "straight" / "model.safetensors", killed / "model.safetensors")


def batches_done(folder: Path) -> int:
    try:
        return json.loads((folder / "oracle_state.json").read_text())["batches_done"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_oracle_killed_then_rerun_equals_the_uninterrupted_run(tmp_path, builtin_tokenizer):
    torch.manual_seed(0)
    config = DuoLlamaConfig(
        **tiny_llama_kwargs(vocab_size=len(builtin_tokenizer), num_hidden_layers=5, pad_token_id=None),
        small_intermediate_size=8,
    )
    model = save_model_folder(tmp_path / "model", DuoLlamaForCausalLM(config), builtin_tokenizer)
    data = tmp_path / "holdout.txt"
    data.write_text("The oracle looks at every route a token can take under a budget. " * 60)

    def argv(out: Path) -> list[str]:
        return [
            "oracle", "--model", model, "--data", str(data), "--block-size", "16", "--num-blocks", "12",
            "--batch-size", "1", "--budget", "all", "--output-dir", str(out), "--no-progress",
        ]

    run(argv(tmp_path / "straight"))
    killed = tmp_path / "killed"
    kill_when(argv(killed), lambda: batches_done(killed) >= 2)
    assert not (killed / "oracle_results.safetensors").exists()
    run(argv(killed))
    assert_same_tensors(tmp_path / "straight" / "oracle_results.safetensors", killed / "oracle_results.safetensors")
