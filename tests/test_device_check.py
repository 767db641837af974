"""benchmarks/device_check.py --dry-run: every part of the GPU check, tiny, on CPU, where `datasets` and `lm_eval`
cannot be imported (the device image has neither)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs the script with an import hook that refuses datasets and lm_eval, as on the device machine.
BLOCKED_RUN = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "lm_eval"):
            raise ImportError(f"{name} is blocked: the device image does not have it")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_device_check_dry_run_runs_every_part_without_datasets(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "device_check.py")
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, script, "--dry-run", "--output-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry_run"]
    assert list(report["parts"]) == ["environment", "matmul", "correctness", "training", "oracle", "inference", "fsdp"]
    for name, part in report["parts"].items():
        assert part["status"] == "done", (name, part.get("traceback", part["status"]))
    parts = {name: part["result"] for name, part in report["parts"].items()}
    assert parts["correctness"]["all_passed"], parts["correctness"]["checks"]
    training = parts["training"]
    assert {"eager", "compiled"} <= training.keys() and training["eager"]["tokens_per_second"]["duo"] > 0
    assert parts["oracle"]["measured_speedup"] > 0 and parts["oracle"]["projected_paper_oracle_hours_one_gpu"] > 0
    assert {"batch_1", "batch_32"} <= parts["inference"].keys()
    assert parts["fsdp"]["returncode"] == 0 and parts["fsdp"]["passed"], parts["fsdp"]
    assert "| correctness | done |" in (tmp_path / "device_check.md").read_text()


@pytest.mark.slow
def test_device_check_refuses_unknown_parts(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "device_check.py"),
            "--output-dir",
            str(tmp_path),
            "--parts",
            "nope",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--parts: ['nope'] are not parts" in done.stderr
