"""Atomic, resumable training checkpoints on top of ``accelerator.save_state``.

A checkpoint is the folder ``<checkpoints>/step_<N>``. It is written under a temporary name
(``.tmp-step_<N>``) and renamed only once every process has finished writing, so a crash mid-write never
leaves a folder that looks complete; leftover temporary folders are ignored and cleaned up.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from .routing import RouteSampler

CHECKPOINTS_DIR = "checkpoints"  # a run's checkpoints, in its output_dir
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
LATEST = "latest"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, the epoch, and the micro-batches used in that epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class RouteSamplerState:
    """Checkpoints the random-route sampler of every process (``accelerator.register_for_checkpointing``).

    Accelerate writes registered objects from the main process only; this object gathers each process's
    sampler state into that one file and gives each process its own state back on load. ``get_sampler`` is
    called each time, since ``set_routing`` replaces the model's sampler.
    """

    def __init__(self, get_sampler, accelerator: Accelerator):
        self.get_sampler = get_sampler
        self.accelerator = accelerator

    def state_dict(self) -> dict:
        sampler: RouteSampler = self.get_sampler()
        return {"per_process": gather_object([sampler.state_dict()])}

    def load_state_dict(self, state: dict) -> None:
        per_process = state["per_process"]
        if len(per_process) != self.accelerator.num_processes:
            raise ValueError(
                f"The checkpoint holds route sampler states of {len(per_process)} processes but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        self.get_sampler().load_state_dict(per_process[self.accelerator.process_index])


def restore_train_state(accelerator: Accelerator, resume_dir: str | Path | None, *objects) -> TrainState:
    """The run's `TrainState`, registered for checkpointing with ``objects``, all loaded from ``resume_dir`` if given.

    ``objects`` are further states a checkpoint holds (e.g. a `RouteSamplerState`); the state comes first and they
    follow in the order given, the order a checkpoint's files are read back in. Without ``resume_dir`` the run
    starts at step 0.
    """
    state = TrainState()
    accelerator.register_for_checkpointing(state, *objects)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        accelerator.print(f"Resumed from {resume_dir} at step {state.global_step}")
    return state


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a complete checkpoint folder, or None for any other path."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match and Path(path).is_dir() else None


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def resolve_resume(resume_from: str | None, checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``None``, a checkpoint folder, or ``latest``.

    ``latest`` is the newest complete checkpoint, or None when there is none yet, so a preempted job can
    always be restarted with ``--resume-from latest``.
    """
    if resume_from is None:
        return None
    if resume_from == LATEST:
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(resume_from).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from: {resume_from!r} is not a checkpoint folder (or use 'latest').")
    if path.name.startswith(TMP_PREFIX):
        raise ValueError(
            f"resume_from: {resume_from!r} is an unfinished checkpoint (a crash interrupted it)."
        )
    if not (path / "train_state.json").is_file():
        raise ValueError(f"resume_from: {resume_from!r} is not a checkpoint written by this trainer.")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: str | Path,
    step: int,
    metadata: dict,
    keep: int | None = None,
) -> Path:
    """Write ``accelerator.save_state`` to ``step_<step>`` atomically; keep the newest ``keep`` checkpoints.

    Every process must call this (FSDP saves shards from each). ``metadata`` (JSON) is written next to the
    state as ``train_state.json``.
    """
    folder = Path(checkpoints_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "train_state.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        if final.exists():  # a re-run of a step after resuming from an older checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_checkpoint_if_due(accelerator, checkpoints_dir: str | Path, state: TrainState, args) -> bool:
    """Save a checkpoint (the run's state and arguments) when ``args.checkpoint_every`` says this step is due.

    ``args`` is the run's arguments dataclass (``checkpoint_every``, ``checkpoints_to_keep``). Returns whether it
    saved.
    """
    if not (args.checkpoint_every and state.global_step % args.checkpoint_every == 0):
        return False
    extra = {**state.state_dict(), "args": asdict(args)}
    save_checkpoint(accelerator, checkpoints_dir, state.global_step, extra, args.checkpoints_to_keep)
    return True
