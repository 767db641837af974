"""The GPU check (benchmarks/device_check.py) as the device machine runs it, tested on the CPU.

One dry run (every part at tiny sizes) serves the tests below: it runs where `datasets` and `lm_eval` cannot be
imported (the device image has neither), with the carry of `make device-wheels` installed into a folder first on
``PYTHONPATH``, as the device call installs it (docs/gpu.md). When no package index can be reached, the carry is
skipped with the reason, and the dry run runs on this environment's own transformers. The version guard is tested
against a fake older transformers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import device_versions  # noqa: E402
import device_wheels  # noqa: E402

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
PARTS = ["environment", "matmul", "correctness", "training", "oracle", "real_depth", "inference", "fsdp"]
PINNED = device_versions.pinned_versions()["transformers"]


def is_pure(wheel: Path) -> bool:
    """A wheel that runs on any Python 3 and platform (``py3-none-any``)."""
    _, _, _, tags = device_wheels.parse_wheel_filename(wheel.name)
    return all(tag.abi == "none" and tag.platform == "any" for tag in tags)


def runs_on_the_device(wheel: Path) -> bool:
    """A binary wheel built for the device: CPython 3.12 (or the stable ABI of an older 3.x), Linux x86-64."""
    _, _, _, tags = device_wheels.parse_wheel_filename(wheel.name)
    python = {"cp312", *(f"cp3{minor}" for minor in range(2, 12))}
    return any(
        tag.interpreter in python
        and (tag.abi == "cp312" or tag.abi == "abi3")
        and tag.platform in device_wheels.PLATFORMS
        for tag in tags
    )


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> dict:
    """The carry built by `device_wheels.build_carry` into a temp folder, its pure-Python wheels installed with
    ``--target`` as the device command installs them (``files``, ``site``, ``total_bytes``, ``fits``); or
    ``{"skipped": reason}`` when pip cannot download the pinned transformers in seconds (no index reachable)."""
    dest, site = tmp_path_factory.mktemp("whl"), tmp_path_factory.mktemp("site")
    try:  # the probe: the carry's first wheel, with a short timeout; the build below finds it downloaded
        device_wheels.pip_download("transformers", PINNED, dest, timeout=5)
    except device_wheels.DownloadFailed as err:
        return {"skipped": f"the package index cannot be reached: {err}"}
    built = device_wheels.build_carry(dest)
    wheels = sorted(dest.glob("*.whl"))
    pure = [str(w) for w in wheels if is_pure(w)]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
         str(site), *pure],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return {**built, "files": wheels, "site": site}


@pytest.fixture(scope="module")
def dry_run(carry, tmp_path_factory) -> dict:
    """The dry run of every part, with the carry's folder first on PYTHONPATH when there is one."""
    out = tmp_path_factory.mktemp("device-check")
    paths = [str(carry["site"])] if "site" in carry else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO / "src")]), "OMP_NUM_THREADS": "1"}
    script = str(BENCHMARKS / "device_check.py")
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, script, "--dry-run", "--output-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"report": json.loads((out / "device_check.json").read_text()), "out": out}


@pytest.mark.slow
def test_device_check_dry_run_runs_every_part_without_datasets(dry_run):
    report, out = dry_run["report"], dry_run["out"]
    assert report["dry_run"]
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "done", (name, part.get("traceback", part["status"]))
    parts = {name: part["result"] for name, part in report["parts"].items()}
    assert parts["correctness"]["all_passed"], parts["correctness"]["checks"]
    training = parts["training"]
    assert {"eager", "compiled"} <= training.keys() and training["eager"]["tokens_per_second"]["duo"] > 0
    assert parts["oracle"]["measured_speedup"] > 0 and parts["oracle"]["projected_paper_oracle_hours_one_gpu"] > 0
    assert {"batch_1", "batch_32"} <= parts["inference"].keys()
    assert parts["fsdp"]["returncode"] == 0 and parts["fsdp"]["passed"], parts["fsdp"]
    assert "| correctness | done |" in (out / "device_check.md").read_text()


@pytest.mark.slow
def test_device_check_real_depth_part_measures_every_moved_layer_count(dry_run):
    real = dry_run["report"]["parts"]["real_depth"]["result"]
    layers = real["shape"]["num_layers"]
    assert real["shape"]["num_kv_heads"] < real["shape"]["num_heads"]  # grouped KV heads, as SmolLM2's 9 / 3
    for moved in (1, 2, 3, 4):
        oracle = real["oracle"][f"big={layers - moved}"]
        assert oracle["moved_layers"] == moved and oracle["pattern_tokens_per_second"] > 0, oracle
        assert oracle["patterns"] == math.comb(layers, moved)  # the layers to skip, chosen among all
    training = real["training"]
    assert training["config"]["mixed_precision"] == "bf16" and training["config"]["tie_embeddings"]
    assert training["tokens_per_second"]["duo"] > 0
    assert f"| big={layers - 4} | 4 |" in (dry_run["out"] / "device_check.md").read_text()


@pytest.mark.slow
def test_device_check_runs_on_the_carried_transformers(carry, dry_run):
    if "skipped" in carry:
        pytest.skip(carry["skipped"])
    assert carry["fits"] and carry["total_bytes"] < 64 * 2**20
    names = [device_wheels.parse_wheel_filename(w.name)[0] for w in carry["files"]]
    assert "transformers" in names and len(names) == len(set(names))  # one version of each
    for wheel in carry["files"]:  # a binary wheel cannot run here: its name and tags must fit the device
        assert is_pure(wheel) or runs_on_the_device(wheel), wheel.name
    environment = dry_run["report"]["parts"]["environment"]["result"]
    assert environment["transformers"] == PINNED
    assert Path(environment["transformers_path"]).parent == carry["site"]


def test_runs_on_the_device_reads_wheel_tags():
    assert runs_on_the_device(Path("tokenizers-0.23.3-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"))
    assert runs_on_the_device(Path("numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"))
    assert not runs_on_the_device(Path("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl"))
    assert not runs_on_the_device(Path("numpy-2.4.6-cp312-cp312-macosx_14_0_arm64.whl"))
    assert is_pure(Path("transformers-5.24.0-py3-none-any.whl"))


def test_version_guard_names_the_missing_wheel():
    pins, ranges = device_versions.pinned_versions(), device_versions.dependency_ranges()
    good = {"torch": "2.11.0+cu130", "transformers": PINNED, "accelerate": "1.15.0"}
    assert device_versions.guard_problem(good, pins, ranges) is None
    old = device_versions.guard_problem({**good, "transformers": "5.17.0"}, pins, ranges)
    assert f"transformers=={PINNED}" in old and "5.17.0" in old
    broken = {**good, "transformers": None, "transformers_error": "ImportError: tokenizers>=0.23.1 is required"}
    assert "tokenizers>=0.23.1" in device_versions.guard_problem(broken, pins, ranges)
    torch_problem = device_versions.guard_problem({**good, "torch": "2.1.0"}, pins, ranges)
    assert torch_problem.startswith("torch is 2.1.0 here") and "torch==" in torch_problem


@pytest.mark.slow
def test_device_check_stops_in_seconds_on_an_older_transformers(tmp_path):
    fake = tmp_path / "fake" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "5.17.0"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO / "src")])}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "device_check.py"), "--dry-run", "--output-dir", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == device_versions.GUARD_EXIT_CODE, done.stderr[-2000:]
    assert "transformers 5.17.0" in done.stdout and "torch" in done.stdout  # the versions, first
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"transformers=={PINNED}" in lines[0] and "make device-wheels" in lines[0], lines
    assert not (tmp_path / "out" / "device_check.json").exists()  # stopped before the first part
    assert seconds < 60, seconds  # imports torch, then stops (minutes earlier than a part would fail)


@pytest.mark.slow
def test_device_check_refuses_unknown_parts(carry, tmp_path):
    # The version guard runs first, so the check runs as the device runs it: with the carry first on the path.
    paths = [str(carry["site"])] if "site" in carry else []
    if not paths and device_versions.guard_problem(
        device_versions.found_versions(), device_versions.pinned_versions(), device_versions.dependency_ranges()
    ):
        pytest.skip(f"this environment misses the pins and {carry['skipped']}")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "device_check.py"),
            "--output-dir",
            str(tmp_path),
            "--parts",
            "nope",
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO / "src")])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--parts: ['nope'] are not parts" in done.stderr
