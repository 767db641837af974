"""Trustworthy run folders: one writer per folder, no writes through links, no mixed runs, content hashes.

- One writer: a run holds an exclusive lock on its folder; a second writer is refused in one line naming the
  holder's PID (two real processes), and the lock of a killed run is taken over.
- No links: a link inside a run folder (not made by the project) is refused before anything is written through it,
  and a file outside the run stays untouched; the run folder and its ``checkpoints/`` may themselves be links.
- ``--overwrite-output-dir`` keeps the earlier run's checkpoints apart, under its run id.
- One flipped byte in a checkpoint's file, or in a finished oracle result, is found by its sha256 before loading.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM, cli
from duo_llm_hf.oracle.results import DamagedResultError, OracleResult
from duo_llm_hf.oracle.run import run_oracle_study
from duo_llm_hf.oracle.spaces import RouteSpace
from duo_llm_hf.training.checkpointing import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    resolve_resume,
    validate_checkpoint,
)
from duo_llm_hf.training.train import train
from duo_llm_hf.utils.errors import UsageError
from duo_llm_hf.utils.files import atomic_write_json
from duo_llm_hf.utils.run_files import file_hash
from duo_llm_hf.utils.run_folder import LOCK_FILE, ForeignLink, RunFolderBusy, held_locks, run_lock
from tests.helpers import tiny_llama_kwargs, tiny_train_args, train_duo_argv

CLI = [sys.executable, "-m", "duo_llm_hf.cli"]
TIMEOUT = 300
BASE = dict(max_steps=4, checkpoint_every=2, checkpoints_to_keep=None)

# Holds the lock of a folder (argv[1]) in another process until its stdin closes; prints "locked" once it holds it.
HOLDER = """
import sys
from duo_llm_hf.utils.run_folder import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests copy it before changing anything)."""
    tmp = tmp_path_factory.mktemp("base")
    return Path(train(tiny_train_args(tmp, "run", **BASE)).output_dir)


def copy_run(base: Path, tmp_path: Path, name: str = "copy") -> Path:
    folder = tmp_path / name
    shutil.copytree(base, folder)
    return folder


def args_for(folder: Path, **overrides):
    return tiny_train_args(folder.parent, folder.name, cache_dir=str(folder.parent / "cache"), **{**BASE, **overrides})


def flip_byte(path: Path, from_end: int = 1) -> None:
    """Flip every bit of one byte near the end of a file (in a safetensors file: the last tensor's data)."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (`HOLDER`); close its stdin to let it go."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    holder.stdout.close()


# ----------------------------------------------------------------------------------------------------
# 1. One writer per run folder


def test_a_held_folder_is_refused_naming_the_holders_pid(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another training run \(PID {holder.pid} holds"):
            train(args_for(folder))
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    finally:
        release(holder)
    assert not folder.exists()  # the holder made the folder, wrote nothing, and left nothing


# command -> (what its refusal calls the run, its flags given a model folder, a text file and the output folder)
WRITERS = {
    "oracle": (
        "oracle run",
        lambda model, text, out: ["--model", model, "--data", text, "--block-size", "16", "--output-dir", out],
    ),
    "train-router": (
        "router training run",
        lambda model, text, out: ["--model", model, "--output-dir", out, "--target-usage", "0.5", "--block-size", "16"],
    ),
    "finetune": (
        "training run",
        lambda model, text, out: ["--init-from", model, "--output-dir", out, "--block-size", "16"],
    ),
    "study": ("study", lambda model, text, out: ["--output-dir", out, "--preset", "tiny"]),
    "ablation": ("ablation", lambda model, text, out: ["--output-dir", out, "--preset", "tiny"]),
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_writing_command_refuses_a_held_folder(base, tmp_path, capsys, command):
    what, flags = WRITERS[command]
    text = tmp_path / "data.txt"
    text.write_text("The oracle picks the best route for every token. " * 40)
    folder = tmp_path / "out"
    holder = hold_lock(folder)
    try:
        assert cli.main([command, *flags(str(base), str(text), str(folder))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another {what} (PID {holder.pid} holds" in err[0], err
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
    finally:
        release(holder)


def test_the_lock_is_reentrant_in_a_process_and_released_after(tmp_path):
    folder = tmp_path / "study"
    with run_lock(folder):
        with run_lock(folder / "."):  # a stage of a study locking the study's folder again
            assert held_locks() == [os.path.realpath(folder)]
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
        (folder / "result.json").write_text("{}")
    assert held_locks() == [] and not (folder / LOCK_FILE).exists()
    assert (folder / "result.json").exists()  # a folder with work in it stays


def test_a_folder_that_cannot_be_made_is_one_usage_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder \\(a file is in its way\\)"), run_lock(tmp_path / "a_file"):
        pass
    with pytest.raises(UsageError, match="is not a folder"), run_lock(tmp_path / "a_file" / "run"):
        pass


def test_only_the_main_process_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path / "run"):
        assert held_locks() == [] and not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_real_training_processes_and_a_killed_ones_lock(tmp_path):
    """A second ``duo-llm train`` into a running one's folder exits 2 in one line naming the first's PID; once the
    first is killed (-9), its lock file stays behind and the next run takes it over."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        [*CLI, "train", *train_duo_argv(out, tmp_path / "cache", max_steps=100000, checkpoint_every=0)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _holds(out, first.pid):  # from its checks to its final save
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(
            [*CLI, "train", *train_duo_argv(out, tmp_path / "cache", seed=7)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"is in use by another training run (PID {first.pid} holds" in lines[0]
        assert first.poll() is None, "the refused run stopped the first one"
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        first.kill()
        first.stderr.close()
    assert (out / LOCK_FILE).read_text().strip() == str(first.pid)  # left behind by the kill
    train(args_for(out, max_steps=2, checkpoint_every=0))  # in this process: the next run takes the lock over
    assert (out / "train_results.json").exists() and not (out / LOCK_FILE).exists()


def _holds(folder: Path, pid: int) -> bool:
    try:
        return (folder / LOCK_FILE).read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------
# 2. No writes through links


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every run, with a sentinel file named like a file a checkpoint writes."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "model.safetensors").write_text("sentinel")
    return folder


def assert_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["model.safetensors"]
    assert (outside / "model.safetensors").read_text() == "sentinel"


def test_a_link_in_checkpoints_is_refused_before_any_write(tmp_path, outside, capsys):
    """A stale temporary checkpoint that is a link: the clean-up skipped it and ``save_state`` wrote through it."""
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / ".tmp-step_2").symlink_to(outside, target_is_directory=True)
    argv = ["train", *train_duo_argv(folder, tmp_path / "cache", max_steps=2, checkpoint_every=2)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".tmp-step_2 is a symbolic link inside the run folder" in err[0], err
    assert_untouched(outside)


@pytest.mark.parametrize(
    "link, target",
    [("checkpoints/.tmp-step_2", "."), ("model.safetensors", "model.safetensors")],
    ids=["checkpoint-save", "final-save"],
)
def test_a_link_made_during_the_run_stops_the_save(tmp_path, outside, link, target):
    folder = tmp_path / "run"

    def plant_link(state, metrics):
        if state.global_step == 1:
            (folder / link).parent.mkdir(exist_ok=True)
            (folder / link).symlink_to((outside / target).resolve())

    with pytest.raises(ForeignLink, match=f"{link} is a symbolic link"):
        train(args_for(folder), step_callback=plant_link)
    assert_untouched(outside)


def test_a_linked_model_file_in_a_run_folder_is_refused(base, tmp_path, outside):
    folder = copy_run(base, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ForeignLink, match="model.safetensors is a symbolic link"):
        train(args_for(folder, overwrite_output_dir=True))
    assert_untouched(outside)


def test_a_link_inside_a_checkpoint_is_refused_on_resume(base, tmp_path, outside):
    folder = copy_run(base, tmp_path)
    step = folder / "checkpoints" / "step_4"
    shutil.copy(step / "model.safetensors", outside / "copy.safetensors")
    (step / "model.safetensors").unlink()
    (step / "model.safetensors").symlink_to(outside / "copy.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="step_4/model.safetensors is a symbolic link"):
        validate_checkpoint(step)


def test_linked_run_folder_and_checkpoints_folder_are_allowed(tmp_path):
    """A user may put the whole run, or only its checkpoints, on another disk through a link."""
    disk = tmp_path / "other_disk"
    (disk / "checkpoints").mkdir(parents=True)
    (disk / "run").mkdir()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoints").symlink_to(disk / "checkpoints", target_is_directory=True)
    train(args_for(folder, max_steps=2, checkpoint_every=1, checkpoints_to_keep=1))
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step_2"]  # step_1 pruned through the link
    assert resolve_resume("latest", folder / "checkpoints") == folder / "checkpoints" / "step_2"

    (tmp_path / "linked").symlink_to(disk / "run", target_is_directory=True)
    train(args_for(tmp_path / "linked", max_steps=2, checkpoint_every=2))
    assert (disk / "run" / "checkpoints" / "step_2" / "train_state.json").exists()


def test_an_atomic_write_never_writes_through_a_link(tmp_path, outside):
    (tmp_path / ".tmp-summary.json").symlink_to(outside / "model.safetensors")
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    assert_untouched(outside)


# ----------------------------------------------------------------------------------------------------
# 3. --overwrite-output-dir never mixes two runs in one checkpoints/


def test_overwrite_keeps_the_earlier_runs_checkpoints_apart(base, tmp_path):
    folder = copy_run(base, tmp_path)
    earlier = json.loads((folder / "train_results.json").read_text())["run_id"]
    # The earlier run saved steps 2 and 4; the new run saves steps 2, 4 and 6 of its own.
    new = train(args_for(folder, max_steps=6, overwrite_output_dir=True))
    checkpoints = folder / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"run-{earlier}", "step_2", "step_4", "step_6"]
    assert sorted(p.name for p in (checkpoints / f"run-{earlier}").iterdir()) == ["step_2", "step_4"]
    assert file_hash(checkpoints / f"run-{earlier}" / "step_4" / "model.safetensors") == file_hash(
        base / "checkpoints" / "step_4" / "model.safetensors"
    )
    run_ids = {json.loads((p / "train_state.json").read_text())["run_id"] for p in checkpoints.glob("step_*")}
    assert len(run_ids) == 1 and earlier not in run_ids
    # --resume-from latest continues the new run.
    resumed = train(args_for(folder, max_steps=7, resume_from="latest"))
    assert resumed.global_step == 7 and sorted(resumed.losses) == [7] and new.global_step == 6


def test_resuming_another_runs_checkpoint_keeps_this_folders_checkpoints_apart(base, tmp_path):
    """A run resumed from a checkpoint elsewhere into a folder holding another run's (unfinished) checkpoints."""
    folder = tmp_path / "other"
    train(args_for(folder, max_steps=2, seed=5))
    other = json.loads((folder / "train_results.json").read_text())["run_id"]
    (folder / "train_results.json").unlink()
    (folder / "config.json").unlink()
    resume = dict(resume_from=str(base / "checkpoints" / "step_2"), max_steps=4)
    with pytest.raises(UsageError, match="holds checkpoints of another training run than the one .*step_2 continues"):
        train(args_for(folder, **resume))
    train(args_for(folder, **resume, overwrite_output_dir=True))
    checkpoints = folder / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"run-{other}", "step_4"]
    assert json.loads((checkpoints / "step_4" / "train_state.json").read_text())["run_id"] == json.loads(
        (base / "train_results.json").read_text()
    )["run_id"]


# ----------------------------------------------------------------------------------------------------
# 4. A training checkpoint's content is checked against its sha256


def test_a_flipped_byte_in_a_checkpoint_is_found_before_loading(base, tmp_path, caplog):
    folder = copy_run(base, tmp_path)
    state = json.loads((folder / "checkpoints" / "step_4" / "train_state.json").read_text())
    assert set(state["sha256"]) == set(state["files"])  # every file the checkpoint wrote has its hash
    flip_byte(folder / "checkpoints" / "step_4" / "model.safetensors")  # size and header unchanged
    with pytest.raises(CorruptCheckpointError, match="step_4/model.safetensors is not the file this checkpoint wrote"):
        resolve_resume(str(folder / "checkpoints" / "step_4"), folder / "checkpoints")
    # latest falls back to the newest intact checkpoint, naming the damaged one.
    result = train(args_for(folder, resume_from="latest", overwrite_output_dir=True))
    assert sorted(result.losses) == [3, 4]
    assert "Skipping the damaged checkpoint" in caplog.text and "step_4" in caplog.text


# ----------------------------------------------------------------------------------------------------
# 5. A finished oracle result is checked against its sha256


def test_a_flipped_byte_in_an_oracle_result_is_refused(tmp_path):
    torch.manual_seed(0)
    model = DuoLlamaForCausalLM(DuoLlamaConfig(**tiny_llama_kwargs(num_hidden_layers=2))).eval()
    blocks = torch.randint(3, 96, (2, 8))
    space = RouteSpace(2, ["small", "big"], ["all"])
    result = run_oracle_study(model, blocks, space, tmp_path / "oracle", batch_size=2, progress=False)
    assert OracleResult.load(tmp_path / "oracle").perplexity() == result.perplexity()
    flip_byte(tmp_path / "oracle" / "oracle_results.safetensors")
    with pytest.raises(DamagedResultError, match="oracle_results.safetensors is not the file this oracle run wrote"):
        OracleResult.load(tmp_path / "oracle")
    summary = json.loads((tmp_path / "oracle" / "oracle_summary.json").read_text())
    del summary["results_sha256"]  # a result that cannot be checked is not loaded either
    (tmp_path / "oracle" / "oracle_summary.json").write_text(json.dumps(summary))
    with pytest.raises(DamagedResultError, match="records no sha256"):
        OracleResult.load(tmp_path / "oracle")
