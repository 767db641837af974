"""The plan of the ablation: every training run (Duo, FLOP-matched dense, frozen-big and its dense pre-training),
its arguments and token budget, resolved and checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.corpus import HOLDOUTS, TEXT_COLUMN, parse_corpus_spec
from ...training.arguments import TrainArguments
from ...utils.arguments import check_integer_fields, check_output_dir
from ...utils.errors import MissingFileError, UsageError
from ...utils.processes import process_state
from .arguments import (
    CONTROLLED_TRAIN_FIELDS,
    AblationArguments,
    _field_types,
    parse_p_bigs,
    parse_train_override,
    resolve_settings,
)
from .benchmarks import BenchmarkSpec, benchmark_spec

P_BIGS = (0.0, 0.25, 0.5, 0.75, 1.0)


KINDS = {
    "duo": "Duo, from scratch",
    "dense": "dense, equal FLOPs",
    "frozen-big": "Duo, frozen big",
    "big-pretrain": "dense big (frozen-big stage 1)",
}


# Preset keys that are ablation settings, not `TrainArguments` fields.
_ABLATION_ONLY = frozenset(
    {
        "train_tokens",
        "warmup_fraction",
        "holdout_english",
        "holdout_code",
        "holdout_english_column",
        "holdout_code_column",
        "lm_eval_tasks",
        "lm_eval_batch_size",
        "threads",
    }
)


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the ablation."""

    name: str
    kind: str  # a key of KINDS
    p_big: float  # training p_big (Duo, frozen-big) or the FLOP-matched p_big (dense; 1 for big-pretrain)
    args: TrainArguments
    tokens: int  # tokens this run trains on
    total_tokens: int  # tokens counted as the paper counts them (frozen-big: with its pre-training)
    depends_on: str | None = None

    @property
    def is_duo(self) -> bool:
        return self.kind in ("duo", "frozen-big")


@dataclass
class AblationPlan:
    """Everything `run_ablation` will do, resolved and checked before any work starts."""

    out: Path
    settings: dict[str, Any]  # the resolved ablation settings (preset + flags)
    p_bigs: list[float]
    steps: int  # optimizer steps of a full-budget run
    tokens_per_step: int
    runs: list[PlannedRun]
    benchmarks: BenchmarkSpec
    holdouts: dict[str, tuple[str, str]]  # holdout name -> (corpus spec, text column)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.settings["tokenizer"]) if self.settings["tokenizer"] else self.out / "tokenizer"

    def run(self, name: str) -> PlannedRun:
        return next(r for r in self.runs if r.name == name)

    def run_dir(self, run: PlannedRun | str) -> Path:
        return self.out / "runs" / (run if isinstance(run, str) else run.name)


def plan_ablation(args: AblationArguments, num_processes: int | None = None) -> AblationPlan:
    """Resolve the preset and flags into the runs to train; check every input before any work is done.

    ``num_processes`` (default: the processes of this launch) turns the token budget into optimizer steps.
    """
    check_output_dir(args, "out")
    check_integer_fields(args, seeds=("seed", "eval_seed"))
    settings = resolve_settings(args)
    settings.update(parse_train_override(settings["train_override"]))
    out = Path(args.out).expanduser()
    p_bigs = parse_p_bigs(settings["p_bigs"])
    train_p_big = settings["train_p_big"]
    if not 0.0 < train_p_big < 1.0:
        raise UsageError(
            f"train_p_big: {train_p_big!r} must be strictly between 0 and 1, or one of the FFNs is never trained."
        )
    fraction = settings["frozen_pretrain_fraction"]
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"frozen_pretrain_fraction: {fraction!r} must be strictly between 0 and 1 (paper: 2/3).")
    warmup_fraction = settings["warmup_fraction"]
    if not 0.0 <= warmup_fraction < 1.0:
        raise UsageError(f"warmup_fraction: {warmup_fraction!r} must be in [0, 1).")
    for key in ("train_tokens", "lm_eval_batch_size"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise UsageError(f"{key}: {settings[key]!r} must be a positive integer.")
    for key in ("threads", "lm_eval_limit"):
        if settings[key] is not None and (not isinstance(settings[key], int) or settings[key] < 1):
            raise UsageError(f"{key}: {settings[key]!r} must be a positive integer (or left unset).")
    if settings["tokenizer"] is not None and not Path(settings["tokenizer"]).expanduser().is_dir():
        raise MissingFileError(f"tokenizer: {settings['tokenizer']!r} is not a tokenizer folder.")
    benchmarks = benchmark_spec(settings)

    if num_processes is None:
        num_processes = process_state().num_processes
    tokens_per_step = (
        settings["batch_size"] * settings["block_size"] * settings["gradient_accumulation_steps"] * num_processes
    )
    steps = math.ceil(settings["train_tokens"] / tokens_per_step)
    pretrain_steps = round(fraction * steps)
    if steps < 2 or not 0 < pretrain_steps < steps:
        raise UsageError(
            f"train_tokens: {settings['train_tokens']} tokens are {steps} optimizer step(s) of {tokens_per_step} "
            f"tokens; frozen-big needs a share of at least one step for each of its two stages. Raise --train-tokens."
        )

    common = {k: v for k, v in settings.items() if k in _field_types() and k not in _ABLATION_ONLY}
    common = {k: v for k, v in common.items() if k not in CONTROLLED_TRAIN_FIELDS}
    common = {"report_to": "jsonl", "checkpoints_to_keep": 1, **common}
    # The ablation evaluates every model itself, after training.
    common.update(holdout_english="none", holdout_code="none", eval_every=0, progress=settings["progress"])
    tokenizer = str(Path(settings["tokenizer"]).expanduser() if settings["tokenizer"] else out / "tokenizer")

    # What every run shares; each run is this preset with its own name, model kind, p_big, length and seed.
    preset = TrainArguments(output_dir=str(out / "runs"), tokenizer=tokenizer, seed=settings["seed"], **common)

    def train_args(name: str, mode: str, p_big: float, run_steps: int, **extra):
        return dataclasses.replace(
            preset,
            output_dir=str(out / "runs" / name),
            run_name=name,
            mode=mode,
            p_big=p_big,
            max_steps=run_steps,
            warmup_steps=math.ceil(warmup_fraction * run_steps),
            **extra,
        )

    tokens = steps * tokens_per_step  # the token budget of every run
    runs = [PlannedRun("duo", "duo", train_p_big, train_args("duo", "scratch", train_p_big, steps), tokens, tokens)]
    for p in p_bigs:
        name = f"dense_p{p:g}"
        runs.append(PlannedRun(name, "dense", p, train_args(name, "dense", p, steps), tokens, tokens))
    pre_tokens = pretrain_steps * tokens_per_step
    runs.append(
        PlannedRun(
            "big_pretrain", "big-pretrain", 1.0, train_args("big_pretrain", "dense", 1.0, pretrain_steps),
            pre_tokens, pre_tokens,
        )
    )  # fmt: skip
    frozen_args = train_args(
        "frozen_big",
        "frozen-big",
        train_p_big,
        steps - pretrain_steps,
        init_from=str(out / "runs" / "big_pretrain"),
        seed=settings["seed"] + 1,  # a fresh batch order for the small-module stage
    )
    runs.append(
        PlannedRun("frozen_big", "frozen-big", train_p_big, frozen_args, tokens - pre_tokens, tokens, "big_pretrain")
    )

    for run in runs:  # every run's arguments are checked now, before the first one trains
        _validate_run_args(run.args)

    columns = {"english": settings["holdout_english_column"], "code": settings["holdout_code_column"]}
    holdouts = {}
    for name in HOLDOUTS:
        spec = settings[f"holdout_{name}"]
        if parse_corpus_spec(spec, f"holdout_{name}", f"holdout_{name}").kind != "none":
            holdouts[name] = (spec, columns[name] or common.get("text_column", TEXT_COLUMN))
    return AblationPlan(out, settings, p_bigs, steps, tokens_per_step, runs, benchmarks, holdouts)


def _validate_run_args(args: TrainArguments) -> None:
    # frozen-big's init_from and the tokenizer do not exist before the runs that make them; check the rest.
    checked = dataclasses.replace(args, init_from=None, mode="scratch" if args.mode == "frozen-big" else args.mode)
    checked = dataclasses.replace(checked, tokenizer=None)
    checked.validate()


def route_probs(p_big: float) -> dict[str, float]:
    return {"small": 1.0 - p_big, "big": p_big}
