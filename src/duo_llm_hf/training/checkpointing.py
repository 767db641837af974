"""Atomic, resumable, validated training checkpoints on top of ``accelerator.save_state``.

A checkpoint is the folder ``<checkpoints>/step_<N>``. It is written under a temporary name
(``.tmp-step_<N>``) and renamed only once every process has finished writing, so a crash mid-write never
leaves a folder that looks complete; leftover temporary folders are ignored and cleaned up.

What a checkpoint holds, and how it is read back safely (a checkpoint folder may come from anyone):

- Accelerate's files: the model (safetensors), the optimizer, scheduler and RNG states (``optimizer.bin``,
  ``scheduler.bin``, ``random_states_<i>.pkl``: torch pickles, which Accelerate reads with
  ``torch.load(weights_only=True)``, i.e. tensors, numbers, strings and numpy arrays only, never code).
- The run's own states as JSON: ``train_state.json`` (the `TrainState`, the run's id, arguments and fingerprint,
  and the size of every other file) and one ``<name>.json`` per further state (e.g. the route samplers). Nothing is
  registered with ``accelerator.register_for_checkpointing``, whose ``custom_checkpoint_<i>.pkl`` files Accelerate
  unpickles with ``weights_only=False``.
- ``train_state.json`` is written last: it marks the checkpoint complete. It lists the size (``files``) and the
  sha256 (``sha256``) of every other file; a file whose content differs from its hash is never loaded.

`validate_checkpoint` runs before anything is loaded: a ``custom_checkpoint_*.pkl``, a file the checkpoint did not
write, a symbolic link, or a pickle that holds more than plain data is refused (`UnsafeCheckpointError`); a missing,
truncated, changed (its sha256 differs) or unreadable file makes the checkpoint invalid (`CorruptCheckpointError`),
and ``--resume-from latest`` then falls back to the newest valid one with a warning.

Saving, cleaning up and pruning never follow a link (`utils.run_folder`): a link inside the checkpoints folder is
refused before each save; the checkpoints folder itself may be a link (to keep checkpoints on another disk).

Why not Accelerate's own naming and rotation (``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)``, which the run's `Accelerator` is otherwise configured with, for its project and logging folders):
``save_state`` then writes straight into ``checkpoint_<i>``, so a crash mid-write leaves a folder that looks
complete; it deletes the oldest checkpoints *before* writing the new one, so that crash also loses a good one; it
prunes every ``checkpoint_*`` folder, those of another run in the same folder too; it numbers saves, not optimizer
steps (a resumed run re-saving a step it already saved is refused); and a ``load_state()`` without a folder takes
the newest one unvalidated. Here a checkpoint is written under a temporary name and renamed once complete, named by
its step, validated before loading, and pruning removes only the run's own older checkpoints, after the new one
exists.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from accelerate.utils.other import load as accelerate_load

from ..models.routes import RouteSampler
from ..utils.errors import UsageError, unpickler_reason
from ..utils.files import TMP_PREFIX, temporary_path
from ..utils.run_files import file_hash
from ..utils.run_folder import refuse_links, remove_path
from ..utils.schema import TRAIN_STATE_SCHEMA, read_state_file

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # a run's checkpoints, in its output_dir
CHECKPOINT_PREFIX = "step_"
LATEST = "latest"
STATE_FILE = "train_state.json"  # written last: the completion marker, with the size and sha256 of every other file
HASHES_KEY = "sha256"  # in STATE_FILE: {file: sha256 of its content}
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# Files Accelerate unpickles with weights_only=False: a checkpoint holding one is refused, whatever it claims.
_UNSAFE_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class CorruptCheckpointError(UsageError):
    """A checkpoint with a missing, truncated or unreadable file (an earlier valid checkpoint may be used)."""


class UnsafeCheckpointError(UsageError):
    """A checkpoint holding a file it did not write, or a pickle that is not plain data: never loaded."""


class TrainingDiverged(UsageError):
    """The loss or the trained weights became non-finite: the run stops, keeping its last good checkpoint."""


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, the epoch, and the micro-batches used in that epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: Mapping) -> None:
        for key in asdict(self):
            setattr(self, key, int(state[key]))


class RouteSamplerState:
    """The random-route sampler of every process, as plain JSON data (seed and generator state per process).

    The main process writes the checkpoint's files; this object gathers each process's sampler state into that
    one file and gives each process its own state back on load. ``get_sampler`` is called each time, since
    ``set_routing`` replaces the model's sampler.
    """

    def __init__(self, get_sampler, accelerator: Accelerator):
        self.get_sampler = get_sampler
        self.accelerator = accelerator

    def state_dict(self) -> dict:
        state = self.get_sampler().state_dict()
        mine = {"seed": int(state["seed"]), "rng_state": state["rng_state"].tolist()}
        return {"per_process": gather_object([mine])}

    def load_state_dict(self, state: Mapping) -> None:
        per_process = state["per_process"]
        if len(per_process) != self.accelerator.num_processes:
            raise UsageError(
                f"The checkpoint holds route sampler states of {len(per_process)} processes but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        mine = per_process[self.accelerator.process_index]
        sampler: RouteSampler = self.get_sampler()
        sampler.load_state_dict({"seed": mine["seed"], "rng_state": torch.tensor(mine["rng_state"], dtype=torch.uint8)})


def restore_train_state(
    accelerator: Accelerator, resume_dir: str | Path | None, states: Mapping[str, object] | None = None
) -> TrainState:
    """The run's `TrainState`, and ``states`` (name -> object with ``load_state_dict``), loaded from ``resume_dir``.

    ``resume_dir`` must have passed `validate_checkpoint` (`resolve_resume` does that). Accelerate loads the model,
    optimizer, scheduler and RNG states; the `TrainState` and ``states`` come from the checkpoint's JSON files.
    Without ``resume_dir`` the run starts at step 0.
    """
    state = TrainState()
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        accelerator.load_state(str(resume_dir))
        state.load_state_dict(json.loads((resume_dir / STATE_FILE).read_text()))
        for name, obj in (states or {}).items():
            obj.load_state_dict(json.loads((resume_dir / f"{name}.json").read_text()))
        accelerator.print(f"Resumed from {resume_dir} at step {state.global_step}")
    return state


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a complete checkpoint folder, or None for any other path (a link is never a checkpoint)."""
    path = Path(path)
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and path.is_dir() and not path.is_symlink() else None


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def _check_pickle(path: Path) -> None:
    """Read a torch pickle as Accelerate will (weights_only): refuse one that holds more than plain data."""
    try:
        accelerate_load(path, map_location="cpu")
    except pickle.UnpicklingError as err:  # weights_only met a global it does not allow: code, or a foreign object
        raise UnsafeCheckpointError(
            f"{path} holds a pickle that is not plain data ({unpickler_reason(err)}); refusing to load it (a "
            "checkpoint from elsewhere can run code when unpickled). Remove that checkpoint, or resume from another."
        ) from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, a short read: the file is damaged
        raise CorruptCheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}).") from None


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose size is what the header says."""
    try:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({err}).") from None
    if path.stat().st_size != 8 + header_size + end:
        raise CorruptCheckpointError(
            f"{path} has {path.stat().st_size} bytes, its header says {8 + header_size + end} (truncated?)."
        )


def validate_checkpoint(folder: str | Path) -> dict:
    """Check a checkpoint folder before anything in it is loaded; return its ``train_state.json``.

    Raises `UnsafeCheckpointError` for a ``custom_checkpoint_*.pkl`` (which Accelerate would unpickle with
    ``weights_only=False``), for a file the checkpoint did not write (not in its ``train_state.json``), for a
    symbolic link, and for a pickle that is not plain data; `CorruptCheckpointError` for a missing or unreadable
    ``train_state.json`` and a listed file that is missing, has another size or sha256 than was written, or does
    not parse.
    """
    folder = Path(folder)
    entries = sorted(folder.rglob("*"))
    for path in entries:
        if path.is_symlink():
            raise UnsafeCheckpointError(
                f"{path} is a symbolic link; checkpoints of this trainer hold none. Refusing to load it."
            )
    present = {p.relative_to(folder).as_posix(): p for p in entries if p.is_file()}
    for name, path in present.items():
        if _UNSAFE_RE.match(Path(name).name):
            raise UnsafeCheckpointError(
                f"{path}: checkpoints of this trainer hold no custom_checkpoint_*.pkl (Accelerate would unpickle it "
                "and run any code in it); refusing to resume from a checkpoint holding one."
            )
    state_path = folder / STATE_FILE
    try:
        meta = read_state_file(state_path, TRAIN_STATE_SCHEMA, CorruptCheckpointError)
        files = meta["files"]
        hashes = meta[HASHES_KEY]  # missing in checkpoints of older versions: their content cannot be checked
        if not isinstance(hashes, dict):
            raise TypeError(f"{HASHES_KEY} is not a mapping of file names to hashes")
        TrainState().load_state_dict(meta)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{state_path} is missing: the checkpoint is incomplete.") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(
            f"{state_path} is damaged or was written by an older version ({type(err).__name__}: {err})."
        ) from None
    unexpected = sorted(set(present) - set(files) - {STATE_FILE})
    if unexpected:
        raise UnsafeCheckpointError(
            f"{folder / unexpected[0]} is not one of the files this checkpoint wrote ({STATE_FILE} lists them); "
            "refusing to load a checkpoint that holds files from elsewhere."
        )
    for name, size in sorted(files.items()):
        path = folder / name
        if name not in present:
            raise CorruptCheckpointError(f"{path} is missing from the checkpoint.")
        if name.endswith(_PICKLE_SUFFIXES):
            _check_pickle(path)  # first: a replaced file is refused as unsafe, not skipped as damaged
        if path.stat().st_size != size:
            raise CorruptCheckpointError(f"{path} has {path.stat().st_size} bytes, {size} were written (truncated?).")
        if file_hash(path) != hashes.get(name):
            raise CorruptCheckpointError(
                f"{path} is not the file this checkpoint wrote (its sha256 differs from the one in {STATE_FILE})."
            )
        if name.endswith(".safetensors"):
            _check_safetensors(path)
        elif name.endswith(".json"):
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise CorruptCheckpointError(f"{path} is not valid JSON ({err}).") from None
    return meta


def resolve_resume(resume_from: str | None, checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, validated (`validate_checkpoint`): ``None``, a checkpoint folder, or ``latest``.

    ``latest`` is the newest valid checkpoint: a damaged newer one is named in a warning and skipped; an unsafe one
    stops the run; when every checkpoint is damaged the run stops naming each. With no checkpoint yet ``latest`` is
    None, so a preempted job can always be restarted with ``--resume-from latest``. A folder given by name is used
    only if it is valid.
    """
    if resume_from is None:
        return None
    if resume_from == LATEST:
        found = list_checkpoints(checkpoints_dir)
        problems = []
        for folder in reversed(found):
            try:
                validate_checkpoint(folder)
            except CorruptCheckpointError as err:
                logger.warning("Skipping the damaged checkpoint %s: %s", folder, err)
                problems.append(str(err))
                continue
            if problems:
                logger.warning("Resuming from %s, the newest valid checkpoint.", folder)
            return folder
        if problems:
            raise CorruptCheckpointError(
                f"no valid checkpoint in {checkpoints_dir}: {' '.join(problems)} Delete the damaged checkpoints to "
                "start over."
            )
        return None
    path = Path(resume_from).expanduser()
    if not path.is_dir():
        raise UsageError(f"resume_from: {resume_from!r} is not a checkpoint folder (or use 'latest').")
    if path.name.startswith(TMP_PREFIX):
        raise UsageError(f"resume_from: {resume_from!r} is an unfinished checkpoint (a crash interrupted it).")
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"resume_from: {resume_from!r} is not a checkpoint written by this trainer (no {STATE_FILE}).")
    validate_checkpoint(path)
    return path


def read_checkpoint_state(folder: str | Path) -> dict | None:
    """A checkpoint's ``train_state.json`` (None if it cannot be read)."""
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def new_run_id() -> str:
    """A fresh run's id: its checkpoints carry it, so that pruning only ever removes the run's own."""
    return uuid.uuid4().hex


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: str | Path,
    step: int,
    metadata: dict,
    keep: int | None = None,
    states: Mapping[str, object] | None = None,
) -> Path:
    """Write ``accelerator.save_state`` to ``step_<step>`` atomically; keep the run's newest ``keep`` checkpoints.

    Every process must call this (FSDP saves shards from each; ``states`` gather from each). ``states`` (name ->
    object with ``state_dict``) are written as ``<name>.json``; ``metadata`` (JSON, with the run's ``run_id``), the
    size and sha256 of every file and the step go to ``train_state.json``, written last. Pruning removes only older
    checkpoints carrying the same ``run_id``: another run's checkpoints in the folder are never deleted. A link
    inside the checkpoints folder stops the run before anything is written (`run_folder.ForeignLink`).
    """
    folder = Path(checkpoints_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = temporary_path(final)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        refuse_links(folder)  # save_state, the clean-up and the pruning below would follow one
        for stale in folder.glob(f"{TMP_PREFIX}*"):
            remove_path(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    json_states = {name: obj.state_dict() for name, obj in (states or {}).items()}  # every process gathers
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, value in json_states.items():
            (tmp / f"{name}.json").write_text(json.dumps(value))
        written = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        files = {name: p.stat().st_size for name, p in written.items()}
        hashes = {name: file_hash(p) for name, p in written.items()}
        state = {**metadata, "files": files, HASHES_KEY: hashes}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        if final.exists():  # a re-run of a step after resuming from an older checkpoint
            remove_path(final)
        tmp.rename(final)
        if keep is not None:
            run_id = metadata["run_id"]
            own = [p for p in list_checkpoints(folder) if (read_checkpoint_state(p) or {}).get("run_id") == run_id]
            for old in own[:-keep]:
                try:
                    remove_path(old)
                except OSError as err:  # the new checkpoint is saved; a leftover old one costs only disk space
                    logger.warning("Could not remove the old checkpoint %s: %s", old, err)
    accelerator.wait_for_everyone()
    return final


def save_checkpoint_if_due(
    accelerator,
    checkpoints_dir: str | Path,
    state: TrainState,
    args,
    run: Mapping,
    states: Mapping | None = None,
    trained: Sequence[torch.Tensor] = (),
) -> bool:
    """Save a checkpoint (the run's state, arguments, ``run`` and ``states``) when ``args.checkpoint_every`` says
    this step is due; never one whose ``trained`` parameters are not all finite (`check_finite_weights`).

    ``args`` is the run's arguments dataclass (``checkpoint_every``, ``checkpoints_to_keep``); ``run`` holds the
    run's ``run_id`` and ``fingerprint``. Returns whether it saved.
    """
    if not (args.checkpoint_every and state.global_step % args.checkpoint_every == 0):
        return False
    check_finite_weights(accelerator, trained, state.global_step, checkpoints_dir)
    extra = {**state.state_dict(), **run, "args": asdict(args)}
    save_checkpoint(accelerator, checkpoints_dir, state.global_step, extra, args.checkpoints_to_keep, states)
    return True


def _last_good(checkpoints_dir: str | Path) -> str:
    found = list_checkpoints(checkpoints_dir)
    return f"the last good checkpoint, {found[-1]}, is kept" if found else "no checkpoint had been saved"


def check_finite_loss(loss: float, step: int, checkpoints_dir: str | Path) -> None:
    """Stop the run (`TrainingDiverged`) when an optimizer step's loss (the same on every process) is not finite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged: the loss of step {step} is {loss}, nothing more is saved "
            f"({_last_good(checkpoints_dir)}). Lower --learning-rate, or clip gradients with --max-grad-norm > 0."
        )


def check_finite_weights(
    accelerator: Accelerator, params: Sequence[torch.Tensor], step: int, checkpoints_dir: str | Path
) -> None:
    """Stop the run (`TrainingDiverged`) before it saves weights of which any is not finite (on any process)."""
    if not params:
        return
    bad = torch.stack([~torch.isfinite(p.detach()).all() for p in params]).sum().float()
    if accelerator.reduce(bad.to(accelerator.device), "sum").item() > 0:
        raise TrainingDiverged(
            f"training diverged: after step {step} some trained weights are not finite, nothing more is saved "
            f"({_last_good(checkpoints_dir)}). Lower --learning-rate, or clip gradients with --max-grad-norm > 0."
        )
