"""Several CPU processes (torchrun + ACCELERATE_USE_CPU=1, see `duo_llm_hf.utils.processes`): stage 1 training.

The oracle study's two-process test is in test_oracle_study.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import train_duo_argv

ROOT = Path(__file__).resolve().parents[2]


def launch_cpu_processes(script: Path, args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    """Run `script args` in `n` CPU processes of one torch.distributed group; fails the test if the run fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port]
    done = subprocess.run([*command, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_process_training_shares_the_work_and_resumes_exactly(tmp_path):
    """Two processes train on twice the tokens per step, each drawing its own routes; a run resumed from the
    step-3 checkpoint ends with the uninterrupted run's weights."""
    def args(out: Path) -> list[str]:
        return train_duo_argv(out, tmp_path / "cache", builtin_max_chars=3000, max_steps=6, checkpoint_every=3)

    script = ROOT / "training" / "train_duo.py"
    done = launch_cpu_processes(script, args(tmp_path / "full"))
    assert done.stdout.count("Saved the model to") == 1  # the main process reports
    results = json.loads((tmp_path / "full" / "train_results.json").read_text())
    assert results["global_step"] == 6 and results["tokens_seen"] == 6 * 2 * (2 * 16)

    step_3 = tmp_path / "full" / "checkpoints" / "step_3"
    samplers = json.loads((step_3 / "route_samplers.json").read_text())["per_process"]
    assert len(samplers) == 2 and samplers[0] != samplers[1]  # one route stream each

    shutil.copytree(step_3, tmp_path / "resumed" / "checkpoints" / "step_3")
    launch_cpu_processes(script, [*args(tmp_path / "resumed"), "--resume-from", "latest"])
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    # Resumed: the same batches, routes and world size run the same computation, so bit for bit.
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    at_step_3 = load_file(step_3 / "model.safetensors")
    assert not all(torch.equal(at_step_3[k], full[k]) for k in full)  # the resumed run did train steps 4 to 6


QUIET_CHECK = """
import logging, sys, warnings
if sys.argv[1] == "before":  # imported first, as a script importing its command: the switches still apply
    import datasets
from duo_llm_hf.utils.processes import quiet_libraries
quiet_libraries()
import datasets, transformers
from huggingface_hub.utils import are_progress_bars_disabled
print(datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled(),
      not are_progress_bars_disabled())
warnings.warn("a library warning")
logging.getLogger("duo_llm_hf.training").warning("our warning")
"""
QUIET_ENV = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
ASKED = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "0"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "imported", "bars", "warns"),
    [
        ({}, "before", "False False False", True),  # the libraries' bars are off
        ({"RANK": "0", **ASKED}, "before", "True True True", True),  # unless the user asks for them
        # A process other than the main one prints neither bars nor warnings (`duo-llm` switches before importing).
        ({"RANK": "1", **ASKED}, "after", "False False False", False),
    ],
)
def test_library_bars_are_off_and_only_the_main_process_prints(env, imported, bars, warns):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", *QUIET_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", QUIET_CHECK, imported],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == bars
    assert ("a library warning" in done.stderr and "our warning" in done.stderr) is warns
    assert warns or done.stderr == ""
