"""What the training loops share: the run's Accelerator, the optimizer step of a micro-batch, the step's bookkeeping.

Stage 1 (`train.train`) and the router training (`routers.train_router`) each write their loop out, as
accelerate's ``run_clm_no_trainer.py`` does: data, model, the loss of a micro-batch, what is logged and evaluated.
The pieces here are the steps in which the two loops do the same thing: `accelerated_run` (the Accelerator with
its trackers, and the clean-up after the run), `backward_and_step` (backward, clipping, optimizer and scheduler
step inside ``accelerator.accumulate``), `StepMeter` (the losses averaged over an optimizer step's micro-batches
and over a log window, the step and token counts of the run's `TrainState`, the throughput), `progress_bar` and
`record_step` (an optimizer step's loss checked, kept and shown), the run's start
(`start_or_resume`: never over a finished run unless asked; `run_identity`: a resumed run must have the fingerprint of
the run it continues). The checkpoint side (`TrainState`, `restore_train_state`, `save_checkpoint_if_due`, and the
divergence checks `check_finite_loss`, `check_finite_weights`) is in `checkpointing`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from ..utils.errors import RunInterrupted, UsageError
from ..utils.processes import is_main_process
from ..utils.run_files import (
    CONFIG_FILE,
    OVERWRITE_FLAG,
    TRAIN_RESULTS_FILE,
    check_fingerprint,
    refuse_overwrite,
)
from ..utils.schema import FINISHED_RUN_SCHEMA, read_state_file
from .arguments import current_names
from .checkpointing import (
    CHECKPOINTS_DIR,
    LATEST,
    TrainState,
    check_finite_loss,
    list_checkpoints,
    new_run_id,
    read_checkpoint_state,
    resolve_resume,
)
from .tracking import make_trackers

logger = logging.getLogger(__name__)


@contextmanager
def accelerated_run(args, resume_dir: Path | None = None, **accelerator_kwargs) -> Iterator[Accelerator]:
    """The `Accelerator` of a training run that writes to ``args.output_dir`` (created by the main process).

    ``args`` (a training arguments dataclass) gives the precision, the gradient accumulation, the trackers
    (``report_to``, ``run_name``; they log to ``<output_dir>/logs``) and ``progress`` (off: `datasets`' progress
    bars are off during the run). ``accelerator_kwargs`` go to `Accelerator` (e.g. ``kwargs_handlers``). When
    ``args.resume_from`` is ``latest`` and ``resume_dir`` is None (no checkpoint yet), a warning says that the run
    starts from step 0. On exit, also on an error, the trackers end and Accelerate's process-wide state is reset
    (`finish_trackers`, `reset_accelerate_state`), so a later run in the same process starts clean.
    """
    output_dir = Path(args.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=make_trackers(args.report_to, args.run_name, project.logging_dir) or None,
        project_config=project,
        **accelerator_kwargs,
    )
    import datasets  # here, not at the top: `training_step` runs where `datasets` is not installed (the device check)

    bars_were_on = datasets.is_progress_bar_enabled()
    if not args.progress:
        datasets.disable_progress_bars()
    try:
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir is None and args.resume_from == LATEST and accelerator.is_main_process:
            logger.warning(
                "resume_from='latest': no checkpoint in %s yet; starting from step 0.", output_dir / CHECKPOINTS_DIR
            )
        yield accelerator
    except KeyboardInterrupt:
        raise RunInterrupted(_stopped_at(output_dir)) from None
    finally:
        finish_trackers(accelerator)
        reset_accelerate_state()
        if bars_were_on:
            datasets.enable_progress_bars()


def _stopped_at(output_dir: Path) -> str:
    """Where an interrupted run stopped: its folder and the checkpoint a resumed run continues from."""
    checkpoints = list_checkpoints(output_dir / CHECKPOINTS_DIR)
    last = f"its last checkpoint is {checkpoints[-1].name}" if checkpoints else "before its first checkpoint"
    return f"in {output_dir}, {last}"


def tracker_config(args, extra: dict) -> dict:
    """The run configuration for the trackers: the arguments (a dataclass) and ``extra``, as plain values."""
    values = {**dataclasses.asdict(args), **extra}
    return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in values.items()}


def finish_trackers(accelerator: Accelerator) -> None:
    """End a run's trackers. Unlike ``accelerator.end_training()`` this keeps the process group: the study and the
    ablation train several runs (and evaluate) in one multi-process launch."""
    for tracker in accelerator.trackers:
        tracker.finish()


def reset_accelerate_state() -> None:
    """Clear Accelerate's process-wide state at the end of a run (the process group stays up)."""
    # Accelerate keeps process-wide singletons; a later run in the same process (tests, the study) may use
    # other settings (precision, accumulation), so the run leaves them clean. The process group stays up.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def training_step(
    accelerator: Accelerator, model, batch: dict, optimizer, scheduler, trainable: list, max_grad_norm: float
) -> torch.Tensor:
    """One micro-batch of causal language modelling: loss, backward, and (when Accelerate syncs) clip + optimizer +
    scheduler (`backward_and_step`).

    Call it inside ``accelerator.accumulate(model)``; returns the (un-scaled) loss.
    """
    ids = batch["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    backward_and_step(accelerator, loss, optimizer, scheduler, trainable, max_grad_norm, may_reach_nothing=True)
    return loss


def backward_and_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    optimizer,
    scheduler,
    params: list,
    max_grad_norm: float,
    may_reach_nothing: bool = False,
) -> None:
    """Backward of a micro-batch's loss; when Accelerate syncs, clip ``params`` to ``max_grad_norm`` (0: off).

    ``may_reach_nothing``: a loss that no trained parameter reached (random routes that are all BIG, as at p_big 1
    at the start of a finetuning schedule) is no error: the micro-batch has nothing to learn and adds no gradient.

    Then the optimizer and scheduler step and the gradients are zeroed: inside ``accelerator.accumulate(model)``
    the prepared optimizer and scheduler only act on the micro-batch that ends an optimizer step.
    """
    if loss.requires_grad or not may_reach_nothing:
        accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class StepMeter:
    """The running averages of a training loop, per optimizer step and per log window, and the run's counts.

    ``names`` name the values a micro-batch reports (e.g. ``train/loss``). `add` takes them after each micro-batch;
    `step`, once an optimizer step is done, averages them over its micro-batches and the processes, counts the
    step and its tokens (``tokens_per_micro_batch``, over all processes) into the run's `TrainState`, and returns
    them; `log_metrics` gives the means over the steps since the last log, with the run's position, and starts a
    new window. Time spent evaluating or saving is not throughput: `restart_clock` after it.
    """

    def __init__(self, accelerator: Accelerator, names: Sequence[str], tokens_per_micro_batch: int):
        self.accelerator = accelerator
        self.names = list(names)
        self.tokens_per_micro_batch = tokens_per_micro_batch
        self.micro_sums = torch.zeros(len(self.names), device=accelerator.device)
        self.micro_batches = 0
        self.log_sums = torch.zeros(len(self.names), dtype=torch.float64, device=accelerator.device)
        self.log_steps = 0
        self.log_tokens = 0
        self.restart_clock()

    def add(self, *values: torch.Tensor) -> None:
        """The values of one micro-batch (scalar tensors, in the order of ``names``)."""
        self.micro_sums += torch.stack([value.detach() for value in values]).float()
        self.micro_batches += 1

    def step(self, state: TrainState) -> dict[str, float]:
        """Count an optimizer step into ``state``; its values, averaged over its micro-batches and the processes."""
        state.global_step += 1
        tokens = self.tokens_per_micro_batch * self.micro_batches
        state.tokens_seen += tokens
        values = self.accelerator.reduce(self.micro_sums / self.micro_batches, "mean").double()
        self.micro_sums.zero_()
        self.micro_batches = 0
        self.log_sums += values
        self.log_steps += 1
        self.log_tokens += tokens
        return dict(zip(self.names, values.tolist()))

    def tokens_per_second(self) -> float:
        """Training throughput of the log window so far."""
        return self.log_tokens / max(time.perf_counter() - self.log_start, 1e-9)

    def log_metrics(self, state: TrainState, scheduler) -> dict[str, float]:
        """The window's mean of each value, the learning rate, the throughput, tokens and epoch; starts a new window."""
        means = (self.log_sums / self.log_steps).tolist()
        metrics = {
            **dict(zip(self.names, means)),
            "train/lr": scheduler.get_last_lr()[0],
            "train/tokens_per_second": self.tokens_per_second(),
            "train/tokens": state.tokens_seen,
            "train/epoch": state.epoch,
        }
        self.log_sums.zero_()
        self.log_steps = self.log_tokens = 0
        self.restart_clock()
        return metrics

    def restart_clock(self) -> None:
        """Measure the throughput from now on (after an evaluation or a checkpoint)."""
        self.log_start = time.perf_counter()


def progress_bar(args, accelerator: Accelerator, state: TrainState, total_steps: int, desc: str) -> tqdm:
    """The run's bar of optimizer steps, from the step it resumes at; shown by the main process unless
    ``args.progress`` is off."""
    return tqdm(
        total=total_steps,
        initial=state.global_step,
        desc=desc,
        disable=not (args.progress and accelerator.is_main_process),
    )


def record_step(
    meter: StepMeter, state: TrainState, losses: dict[int, float], checkpoints_dir: Path, progress: tqdm
) -> dict[str, float]:
    """Close an optimizer step: count it (`StepMeter.step`), stop a diverged run (`check_finite_loss`), keep its
    loss in ``losses`` by step and advance the ``progress`` bar. Returns the step's values."""
    values = meter.step(state)
    check_finite_loss(values["train/loss"], state.global_step, checkpoints_dir)
    losses[state.global_step] = values["train/loss"]
    progress.update(1)
    return values


# What a finished run leaves in its output_dir: save_pretrained's config.json first, train_results.json last.
FINISHED_FILES = (TRAIN_RESULTS_FILE, CONFIG_FILE)


def start_or_resume(args, what: str = "training run") -> Path | None:
    """The validated checkpoint a run resumes from (`checkpointing.resolve_resume`), or None for a fresh start.

    A fresh start (no ``resume_from``, or ``latest`` with no checkpoint yet) into an ``output_dir`` that holds a
    finished run or an earlier run's checkpoints is refused unless ``args.overwrite_output_dir``: it would replace
    that run's model, or its checkpoints of the same steps. With it, the earlier checkpoints are moved apart first
    (`keep_earlier_checkpoints`), so that ``checkpoints/`` never holds two runs. Resuming into an ``output_dir``
    whose finished run, or whose checkpoints, are another run's than the checkpoint's is refused too (a resumed
    finished run may be extended); with the flag, those checkpoints are moved apart as well. Call it holding the
    run folder's lock (`utils.run_folder.run_lock`).
    """
    output_dir = Path(args.output_dir)
    resume_dir = resolve_resume(args.resume_from, output_dir / CHECKPOINTS_DIR)
    if resume_dir is not None:
        finished = _finished_run_id(output_dir)
        resumed = (read_checkpoint_state(resume_dir) or {}).get("run_id")
        if finished is not None and finished != resumed and not args.overwrite_output_dir:
            raise UsageError(
                f"{output_dir} holds a finished {what} other than the one {resume_dir} continues; resume into "
                f"another output folder, or pass {OVERWRITE_FLAG} to replace it."
            )
        others = [p for p in list_checkpoints(output_dir / CHECKPOINTS_DIR) if _run_id(p) != resumed]
        if others and not args.overwrite_output_dir:
            raise UsageError(
                f"{output_dir} holds checkpoints of another {what} than the one {resume_dir} continues "
                f"({others[-1].name}); resume into another output folder, or pass {OVERWRITE_FLAG} to move them to "
                "checkpoints/run-<their run id>/."
            )
        if others and is_main_process():
            keep_earlier_checkpoints(output_dir / CHECKPOINTS_DIR, others)
        return resume_dir
    refuse_overwrite(output_dir, FINISHED_FILES, args.overwrite_output_dir, what)
    earlier = list_checkpoints(output_dir / CHECKPOINTS_DIR)
    if earlier and not args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir} holds checkpoints of an earlier {what} ({earlier[-1].name}); continue it with "
            f"--resume-from latest, or pass {OVERWRITE_FLAG} to start a new run there (the earlier run's "
            "checkpoints are moved to checkpoints/run-<its run id>/)."
        )
    if earlier and is_main_process():
        keep_earlier_checkpoints(output_dir / CHECKPOINTS_DIR, earlier)
    return None


# checkpoints/run-<run id>/: an earlier run's checkpoints, kept apart by --overwrite-output-dir.
EARLIER_RUN_PREFIX = "run-"


def keep_earlier_checkpoints(checkpoints_dir: Path, checkpoints: list[Path]) -> None:
    """Move an earlier run's ``step_<N>`` checkpoints into ``checkpoints/run-<run id>/`` (their own run's id, read
    from each; ``run-unknown`` when unreadable), where ``--resume-from latest`` and pruning never look: the new run
    then starts in a ``checkpoints/`` that holds only its own (also a run resumed from a checkpoint elsewhere). Each
    move is a rename, so a kill midway loses none."""
    for folder in checkpoints:
        run_id = _run_id(folder) or "unknown"
        if not run_id.replace("-", "").isalnum():  # a name from a file: never a path
            run_id = "unknown"
        target = checkpoints_dir / f"{EARLIER_RUN_PREFIX}{run_id}" / folder.name
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            raise UsageError(
                f"cannot keep the earlier run's checkpoint {folder} apart: {target} exists already; move or delete "
                "one of them."
            )
        folder.rename(target)
        logger.warning("%s: the earlier run's checkpoint %s is kept as %s.", OVERWRITE_FLAG, folder.name, target)


def _run_id(checkpoint: Path) -> str:
    """The run id a checkpoint carries ("" when unreadable)."""
    return str((read_checkpoint_state(checkpoint) or {}).get("run_id") or "")


def _finished_run_id(output_dir: Path) -> str | None:
    """The run id in a finished run's ``train_results.json`` ("" for a run that recorded none), None if unfinished."""
    try:
        return read_state_file(output_dir / TRAIN_RESULTS_FILE, FINISHED_RUN_SCHEMA).get("run_id") or ""
    except FileNotFoundError:
        return None


def run_fingerprint(args, excluded: frozenset[str], **content) -> dict:
    """A run's fingerprint: its arguments except ``excluded`` (what may change on resume, and paths), plus
    ``content`` (content hashes standing in for the paths, the resolved precision, the process count)."""
    values = {k: v for k, v in dataclasses.asdict(args).items() if k not in excluded}
    return json.loads(json.dumps({**values, **content}))  # as a checkpoint's JSON gives it back (tuples -> lists)


def run_identity(resume_dir: Path | None, fingerprint: dict, what: str = "training run") -> dict:
    """The ``run_id`` and ``fingerprint`` a run writes into its checkpoints.

    A resumed run keeps the id of the run it continues, after checking that its fingerprint is that run's
    (`run_files.check_fingerprint`: a `UsageError` naming each setting that differs).
    """
    if resume_dir is None:
        return {"run_id": new_run_id(), "fingerprint": fingerprint}
    saved = read_checkpoint_state(resume_dir) or {}
    check_fingerprint(current_names(saved.get("fingerprint", {})), fingerprint, resume_dir, what)
    return {"run_id": saved["run_id"], "fingerprint": fingerprint}


__all__ = [
    "FINISHED_FILES",
    "StepMeter",
    "accelerated_run",
    "backward_and_step",
    "finish_trackers",
    "reset_accelerate_state",
    "run_fingerprint",
    "run_identity",
    "start_or_resume",
    "tracker_config",
    "training_step",
]
