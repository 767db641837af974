"""The paper's ablations of stage 1 training (Section 3.4, Fig. 8): Duo against dense, scratch against frozen-big.

One call, `run_ablation` (``python eval/ablation.py --preset cpu --out DIR``; later ``duo-llm ablation``), trains
every model the figure needs with `duo_llm_hf.training.train.train`, evaluates them, and writes the table and the plots:

- (a), (b) Duo against dense. One Duo model is trained from scratch with random routing at p_big = 0.5 (the
  paper's stage 1) and evaluated under random routing at each p_big in {0, 0.25, 0.5, 0.75, 1} (p_big = 0: every
  token on the small FFNs, 1: every token on the big ones). Against it, one dense Llama per p_big whose FFN inner
  size gives the Duo model's forward FLOPs at that p_big (`training.dense_baseline_config`: inner size
  ``p_big * big + (1 - p_big) * small``, rounded to an integer), trained on the same tokens (same corpus, batch
  order and number of steps).
- (c) From scratch against frozen-big, at equal total tokens. Frozen-big first trains a dense model with the big
  FFN size, then freezes it, adds small FFNs and trains only those, with random routing at the Duo model's
  p_big. The paper trains the big model on 200B tokens and the small modules on 100B more, and calls the total,
  300B, equal to the from-scratch run's 300B. Tokens are counted the same way here: the dense pre-training gets
  ``frozen_pretrain_fraction`` (default 2/3) of the token budget and the small-module stage the rest, and the
  table's token column for frozen-big is their sum, the pre-training included. (Tokens are those fed to the
  model, not per module: in both methods a big FFN only sees the tokens routed to it once small FFNs exist.)
  The small-module stage draws its batches in a new seeded order (seed + 1) from the same corpus, as the
  trainer has no data offset; it may therefore repeat some pre-training text, where the paper's 100B tokens were
  new ones. The frozen-big model is evaluated at every p_big like the Duo model.

Every run uses one tokenizer (trained once on the training corpus), the same seed and the same micro-batch, so
a token budget is the same number of optimizer steps for each; ``train_tokens`` is rounded up to whole steps.

Metrics: held-out perplexity on an English and a code holdout (the paper holds out C4 and Python code; the
``cpu`` preset uses the built-in corpus' holdouts, and perplexity is the meaningful metric at that scale);
ARC-Easy accuracy and HellaSwag length-normalised accuracy, zero-shot, through lm-evaluation-harness (`duo`
model for Duo models under random routing at the p_big, `hf` for dense ones). The benchmark data is chosen by
``lm_eval_tasks``: ``hub`` (the harness's `arc_easy` / `hellaswag`, which read the Hub), ``local`` (the same task
definitions on a local copy in ``lm_eval_data``, see `lm_eval_model`), ``fixtures`` (the few hand-written examples
shipped for tests: a smoke test of the code path, labelled so in every output, never benchmark scores) or
``none``.

Outputs in ``out``: ``results.md``, ``results.json``, ``results.csv`` (one row per model and p_big), ``fig8.png``
(top row: the paper's three panels on the benchmarks; bottom row: the same comparisons on held-out perplexity),
``runs/<name>/`` (each trained model, a ``save_pretrained`` folder with its tokenizer), ``tokenizer/`` and
``evals/<run>/<setting>.json``. A re-run reuses every finished training run and evaluation and resumes an
interrupted run from its newest checkpoint; a finished run made with other arguments is an error (use a new
``out``). Under ``accelerate launch`` the training runs use every process (DDP/FSDP as the accelerate config
says), the holdout evaluation is sharded, the harness uses its data parallelism, and the main process writes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig

from ..data.corpus import HOLDOUTS, TEXT_COLUMN, iter_texts, load_corpus, pack_corpus, parse_corpus_spec
from ..data.tokenization import has_tokenizer, load_tokenizer, train_bpe_tokenizer
from ..training.checkpointing import CHECKPOINTS_DIR, list_checkpoints
from ..training.loop import reset_accelerate_state
from ..training.train import (
    RESUMABLE_CHANGES,
    TrainArguments,
    dense_baseline_config,
    duo_config_from_args,
    evaluate_perplexity,
    train,
)
from ..utils.arguments import HfArgumentParser, check_integer_fields, check_output_dir
from ..utils.errors import MissingDependencyError, MissingFileError, UsageError
from ..utils.files import atomic_target, atomic_write_text
from ..utils.flops import flops_per_token
from ..utils.loading import is_duo_model, load_complete_model
from ..utils.processes import process_state
from ..utils.run_files import OVERWRITE_FLAG, TRAIN_RESULTS_FILE, TRAINING_ARGS_FILE, FingerprintMismatch
from .analysis import _pyplot

logger = logging.getLogger(__name__)

P_BIGS = (0.0, 0.25, 0.5, 0.75, 1.0)
BENCHMARK_SOURCES = ("hub", "local", "fixtures", "none")
# The paper's metrics: ARC-Easy accuracy, HellaSwag length-normalised accuracy.
BENCHMARK_METRICS = {"arc_easy": "acc", "hellaswag": "acc_norm"}
BENCHMARK_NAMES = {"arc_easy": "ARC-Easy", "hellaswag": "HellaSwag"}
# The splits the official tasks score (a local copy must hold them).
BENCHMARK_FILES = {"arc_easy": "arc_easy/test.jsonl", "hellaswag": "hellaswag/validation.jsonl"}
KINDS = {
    "duo": "Duo, from scratch",
    "dense": "dense, equal FLOPs",
    "frozen-big": "Duo, frozen big",
    "big-pretrain": "dense big (frozen-big stage 1)",
}

# Values of each preset; every one can be changed by its flag (``--train-override`` for other training fields).
_OFFLINE = dict(
    dataset="builtin", holdout_english="builtin", holdout_code="builtin", holdout_english_column=None,
    holdout_code_column=None, streaming=False, mixed_precision=None, gradient_accumulation_steps=1,
    lm_eval_tasks="fixtures",
    # Training blocks are short; RoPE positions up to 256 let the harness score longer benchmark items whole.
    max_position_embeddings=256,
    # One thread: these models are too small to gain from more, and threads fight on a shared machine.
    threads=1,
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: seconds.
    "tiny": dict(
        _OFFLINE, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128, small_intermediate_size=8,
        vocab_size=300, block_size=16, batch_size=4, train_tokens=6 * 4 * 16, learning_rate=3e-3,
        warmup_fraction=0.1, builtin_max_chars=3000, tokenizer_train_chars=3000, eval_blocks=2, checkpoint_every=0,
        lm_eval_batch_size=8,
    ),
    # 10-20 minutes on 2 shared CPU cores (README), offline: 8 small models on the built-in corpus, 0.8M tokens
    # each (800 steps; the 3M characters of corpus make 0.93M tokens, so no run repeats data).
    "cpu": dict(
        _OFFLINE, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, small_intermediate_size=32,
        vocab_size=2048, block_size=64, batch_size=16, train_tokens=800 * 16 * 64, learning_rate=3e-3,
        warmup_fraction=0.05, builtin_max_chars=3_000_000, tokenizer_train_chars=2_000_000, eval_blocks=128,
        checkpoint_every=100, lm_eval_batch_size=16,
    ),
    # The paper's model (Section 3.1: 12 Llama-2 layers, hidden 2560, FFNs 10240 and 640) and 300B tokens, on
    # GPUs with `accelerate launch` (8 GPUs x 8 blocks x 2048 tokens x 16 accumulation = 2.1M tokens per step).
    # One Hub corpus (FineWeb) stands for the paper's FineWeb + Dolma Wiki/Flan + Stack-v2 mixture; the code
    # holdout is CodeParrot's Python validation set (the paper's: 1,024 MIT-licensed GitHub Python files).
    "paper": dict(
        hidden_size=2560, num_layers=12, num_heads=20, intermediate_size=10240, small_intermediate_size=640,
        vocab_size=32000, block_size=2048, batch_size=8, gradient_accumulation_steps=16,
        train_tokens=300_000_000_000, learning_rate=3e-4, warmup_fraction=0.01, mixed_precision="bf16",
        dataset="hf:HuggingFaceFW/fineweb", holdout_english="hf:allenai/c4:en@validation",
        holdout_code="hf:codeparrot/codeparrot-clean-valid@train", holdout_english_column=None,
        holdout_code_column="content", builtin_max_chars=None, streaming=True, tokenizer_train_chars=1_000_000_000,
        eval_blocks=1024, checkpoint_every=1000, lm_eval_tasks="hub", lm_eval_batch_size=32, threads=None,
    ),
}  # fmt: skip

# Training fields the ablation sets itself for each run; --train-override may not change them.
CONTROLLED_TRAIN_FIELDS = frozenset(
    {
        "output_dir",
        "mode",
        "p_big",
        "p_skip",
        "init_from",
        "tokenizer",
        "max_steps",
        "num_epochs",
        "resume_from",
        "holdout_english",
        "holdout_code",
        "eval_every",
        "warmup_steps",
        "run_name",
        "progress",
        "seed",
    }
)
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


@dataclass
class AblationArguments:
    """Arguments of the ablation (each is also a flag, ``--name-with-dashes``). Unset values come from the preset."""

    out: str = field(metadata={"help": "Output folder: trained runs, evaluations, table and plots."})
    preset: Literal["tiny", "cpu", "paper"] = field(
        default="cpu",
        metadata={
            "help": "tiny (tests, seconds), cpu (10-20 min on 2 CPU cores, built-in corpus), paper (the "
            "paper's 1.4B model and 300B tokens, Hub corpora, GPUs with accelerate launch)."
        },
    )
    p_bigs: str = field(
        default="0,0.25,0.5,0.75,1", metadata={"help": "p_big values of the comparison, comma-separated."}
    )
    train_p_big: float = field(
        default=0.5, metadata={"help": "p_big of the random routing the Duo and frozen-big models train with."}
    )
    frozen_pretrain_fraction: float = field(
        default=2 / 3,
        metadata={"help": "Share of the token budget frozen-big spends pre-training the dense big model (paper: 2/3)."},
    )
    train_tokens: int | None = field(default=None, metadata={"help": "Token budget of each model."})
    hidden_size: int | None = field(default=None, metadata={"help": "Hidden size."})
    num_layers: int | None = field(default=None, metadata={"help": "Decoder layers."})
    num_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Big FFN inner size."})
    small_intermediate_size: int | None = field(default=None, metadata={"help": "Small FFN inner size."})
    vocab_size: int | None = field(default=None, metadata={"help": "Size of the BPE tokenizer trained here."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per block (sequence length)."})
    batch_size: int | None = field(default=None, metadata={"help": "Blocks per micro-batch and process."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": "Micro-batches per step."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate."})
    warmup_fraction: float | None = field(default=None, metadata={"help": "Warm-up share of each run's steps."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Training precision (default: the preset's, else accelerate's)."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Training corpus: builtin, a local file/folder, or hf:NAME[:CONFIG][@SPLIT]."}
    )
    holdout_english: str | None = field(default=None, metadata={"help": "English holdout corpus (or none)."})
    holdout_code: str | None = field(default=None, metadata={"help": "Code holdout corpus (or none)."})
    holdout_english_column: str | None = field(
        default=None, metadata={"help": "Text column of the English holdout (default: the training one)."}
    )
    holdout_code_column: str | None = field(
        default=None, metadata={"help": "Text column of the code holdout (default: the training one)."}
    )
    builtin_max_chars: int | None = field(
        default=None, metadata={"help": "Cap each split of the built-in corpus at this many characters."}
    )
    streaming: bool | None = field(default=None, metadata={"help": "Stream the corpora (Hub scale)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "An existing tokenizer folder (default: train a BPE into OUT/tokenizer)."}
    )
    eval_blocks: int | None = field(default=None, metadata={"help": "Blocks of each holdout evaluated."})
    seed: int = field(default=0, metadata={"help": "Seed of weights and data order of every run."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the random routes at evaluation."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Retrain the runs in --out that were trained with other arguments, another tokenizer or source "
            "model (without it that is refused; finished runs with the same settings are always reused)."
        },
    )
    train_override: str | None = field(
        default=None,
        metadata={
            "help": "Other training fields for every run, KEY=VALUE,... (e.g. weight_decay=0.05,lr_scheduler=linear)."
        },
    )
    lm_eval_tasks: Literal["hub", "local", "fixtures", "none"] | None = field(
        default=None,
        metadata={
            "help": "Benchmark data: hub (official tasks, Hub data), local (the same tasks on --lm-eval-data), "
            "fixtures (a few hand-written examples: a smoke test, not benchmark scores), none."
        },
    )
    lm_eval_data: str | None = field(
        default=None,
        metadata={"help": "Folder with arc_easy/test.jsonl and hellaswag/validation.jsonl in the Hub schema."},
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "Score only the first N examples of each task."})
    lm_eval_batch_size: int | None = field(default=None, metadata={"help": "Batch size of the harness."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: the preset's)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where the benchmark data comes from, and how its columns are labelled."""

    source: str
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 8

    @property
    def enabled(self) -> bool:
        return self.source != "none"

    def task_names(self) -> dict[str, str]:
        """Benchmark -> the lm-eval task that scores it."""
        if self.source == "hub":
            return {name: name for name in BENCHMARK_METRICS}
        from ..integrations.lm_eval import LOCAL_TASKS

        return {name: LOCAL_TASKS[name] for name in BENCHMARK_METRICS}

    def resolved_data_dir(self) -> str | None:
        if self.source == "fixtures":
            from ..integrations.lm_eval import FIXTURE_DATA_DIR

            return str(FIXTURE_DATA_DIR)
        return self.data_dir

    def note(self, counts: Mapping[str, int]) -> str:
        """What the benchmark columns were computed on; says plainly when they are not benchmark scores."""
        sizes = ", ".join(f"{BENCHMARK_NAMES[b]} n={counts[b]}" for b in BENCHMARK_METRICS if b in counts)
        limit = f", first {self.limit} examples" if self.limit else ""
        if self.source == "fixtures":
            return (
                f"fixture smoke set ({sizes}): the hand-written test examples shipped with lm_eval_model, a check "
                "of the code path; NOT benchmark scores and not comparable to the paper"
            )
        if self.source == "local":
            return f"official task definitions on the local copy in {self.data_dir} ({sizes}{limit}), zero-shot"
        return f"official lm-eval tasks, Hub data ({sizes}{limit}), zero-shot"

    def short_label(self, counts: Mapping[str, int]) -> str:
        """Suffix of the benchmark column names."""
        if self.source == "fixtures":
            return "[fixture smoke set, n=" + "/".join(str(counts[b]) for b in BENCHMARK_METRICS if b in counts) + "]"
        if self.limit:
            return f"[first {self.limit}]"
        return "[local data]" if self.source == "local" else ""


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


@dataclass
class AblationResult:
    """What `run_ablation` produced: the table rows and the files written."""

    out: str
    rows: list[dict[str, Any]]
    files: dict[str, str]
    trained: list[str]  # runs trained (or resumed) by this call
    reused: list[str]  # finished runs found and reused
    seconds: float


# ----------------------------------------------------------------------------------------------------
# Arguments and the plan


def build_arg_parser(**kwargs) -> HfArgumentParser:
    """The command-line parser of `AblationArguments` (kwargs go to `argparse.ArgumentParser`)."""
    kwargs.setdefault("prog", "duo-llm ablation")
    kwargs.setdefault(
        "description",
        "The paper's Fig. 8 ablations: Duo vs dense at equal FLOPs, scratch vs frozen-big. Flags shown with "
        "default None take the preset's value (duo_llm_hf.experiments.ablation.PRESETS).",
    )
    return HfArgumentParser(AblationArguments, **kwargs)


def parse_ablation_args(argv: Sequence[str] | None = None) -> AblationArguments:
    """Parse command-line arguments into `AblationArguments` (a parse error is a `UsageError`)."""
    (args,) = build_arg_parser().parse(argv)
    return args


def parse_p_bigs(text: str) -> list[float]:
    """``"0,0.25,1"`` -> ``[0.0, 0.25, 1.0]``: distinct probabilities, sorted."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"p_bigs: {item!r} is not a number; give probabilities like 0,0.25,0.5,0.75,1.") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UsageError(f"p_bigs: {item} is not a probability in [0, 1].")
        values.append(value)
    if not values or len(set(values)) != len(values):
        raise UsageError(f"p_bigs: {text!r} must list distinct probabilities, e.g. 0,0.25,0.5,0.75,1.")
    return sorted(values)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainArguments)


def parse_train_override(text: str | None) -> dict[str, Any]:
    """``"weight_decay=0.05,lr_scheduler=linear"`` -> training fields, converted to their types and checked."""
    if not text:
        return {}
    types_ = _field_types()
    overrides: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(
                f"train_override: {item!r} is not KEY=VALUE; write e.g. weight_decay=0.05,warmup_steps=10."
            )
        if key not in types_:
            raise UsageError(f"train_override: {key!r} is not a training argument (see training/train_duo.py --help).")
        if key in CONTROLLED_TRAIN_FIELDS:
            raise UsageError(
                f"train_override: {key!r} is set by the ablation for each run; use the ablation's own flags "
                "(--train-tokens, --train-p-big, --seed, --warmup-fraction, --holdout-*, --tokenizer)."
            )
        overrides[key] = _convert(raw.strip(), types_[key], key)
    return overrides


def _convert(raw: str, annotation, key: str):
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if raw.lower() == "none" and type(None) in typing.get_args(annotation):
        return None
    for option in options:
        try:
            if option is bool:
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                continue
            if option in (int, float, str):
                return option(raw)
            if typing.get_origin(option) is Literal and raw in typing.get_args(option):
                return raw
        except ValueError:
            continue
    raise UsageError(f"train_override: {key}={raw!r} does not fit the field's type {annotation}.")


def resolve_settings(args: AblationArguments) -> dict[str, Any]:
    """The preset's values with every flag the user set laid over them."""
    if args.preset not in PRESETS:
        raise UsageError(f"preset: {args.preset!r} is not a preset; use one of {sorted(PRESETS)}.")
    settings = dict(PRESETS[args.preset])
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    settings.update(
        preset=args.preset,
        p_bigs=args.p_bigs,
        train_p_big=args.train_p_big,
        frozen_pretrain_fraction=args.frozen_pretrain_fraction,
        tokenizer=args.tokenizer,
        seed=args.seed,
        eval_seed=args.eval_seed,
        train_override=args.train_override,
        lm_eval_data=args.lm_eval_data,
        lm_eval_limit=args.lm_eval_limit,
        progress=args.progress,
    )
    if args.lm_eval_data is not None and args.lm_eval_tasks is None:
        settings["lm_eval_tasks"] = "local"  # giving the data implies using it
    return settings


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
    benchmarks = _benchmark_spec(settings)

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

    def train_args(name: str, mode: str, p_big: float, run_steps: int, seed: int | None = None, **extra):
        return TrainArguments(
            output_dir=str(out / "runs" / name),
            mode=mode,
            p_big=p_big,
            tokenizer=tokenizer,
            max_steps=run_steps,
            warmup_steps=math.ceil(warmup_fraction * run_steps),
            seed=settings["seed"] if seed is None else seed,
            run_name=name,
            **common,
            **extra,
        )

    budget = steps * tokens_per_step
    runs = [PlannedRun("duo", "duo", train_p_big, train_args("duo", "random", train_p_big, steps), budget, budget)]
    for p in p_bigs:
        name = f"dense_p{p:g}"
        runs.append(PlannedRun(name, "dense", p, train_args(name, "dense", p, steps), budget, budget))
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
        PlannedRun("frozen_big", "frozen-big", train_p_big, frozen_args, budget - pre_tokens, budget, "big_pretrain")
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
    checked = dataclasses.replace(args, init_from=None, mode="random" if args.mode == "frozen-big" else args.mode)
    checked = dataclasses.replace(checked, tokenizer=None)
    checked.validate()


def _benchmark_spec(settings: dict[str, Any]) -> BenchmarkSpec:
    source, data_dir = settings["lm_eval_tasks"], settings["lm_eval_data"]
    if source not in BENCHMARK_SOURCES:
        raise UsageError(f"lm_eval_tasks: {source!r} is not a benchmark source; use one of {list(BENCHMARK_SOURCES)}.")
    if data_dir is not None and source != "local":
        raise UsageError(
            f"lm_eval_data is only read with --lm-eval-tasks local (got --lm-eval-tasks {source}); drop one of them."
        )
    if source == "local":
        if data_dir is None:
            raise UsageError("--lm-eval-tasks local needs --lm-eval-data DIR, the folder of the local benchmark copy.")
        folder = Path(data_dir).expanduser()
        missing = [str(folder / f) for f in BENCHMARK_FILES.values() if not (folder / f).is_file()]
        if missing:
            raise MissingFileError(
                f"lm_eval_data: {data_dir!r} lacks {missing}; it must hold the Hub splits as jsonl "
                "(see README 'Benchmarks with lm-evaluation-harness')."
            )
        data_dir = str(folder.resolve())
    if source != "none":
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise MissingDependencyError(
                "The benchmarks need lm-evaluation-harness: pip install -e .[eval], or pass --lm-eval-tasks none."
            )
    return BenchmarkSpec(source, data_dir, settings["lm_eval_limit"], settings["lm_eval_batch_size"])


# ----------------------------------------------------------------------------------------------------
# Training


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _comparable_args(values: Mapping[str, Any]) -> dict[str, Any]:
    # Paths inside the output folder may move with it; settings that do not change what a run computes may change.
    ignored = RESUMABLE_CHANGES | {"init_from", "tokenizer"}
    return {k: v for k, v in values.items() if k not in ignored}


def run_is_finished(run: PlannedRun, overwrite: bool = False) -> bool:
    """Whether a run's folder holds its final model.

    A final model trained with other arguments is refused, or with ``overwrite`` counts as not finished (retrained).
    """
    folder = Path(run.args.output_dir)
    results = _read_json(folder / TRAIN_RESULTS_FILE)
    if results is None:
        return False
    saved = _read_json(folder / TRAINING_ARGS_FILE) or {}
    planned = _comparable_args(dataclasses.asdict(run.args))
    saved = _comparable_args(saved)
    changed = sorted(k for k in planned if saved.get(k) != planned[k])
    if changed and not overwrite:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {planned[k]!r}" for k in changed)
        raise UsageError(
            f"{folder} holds a finished run '{run.name}' trained with other arguments ({detail}). Use a new --out "
            f"for other settings, or pass {OVERWRITE_FLAG} to retrain it."
        )
    return not changed


def prepare_tokenizer(plan: AblationPlan):
    """The tokenizer every run shares: the given one, the one already in OUT/tokenizer, or a new BPE."""
    folder = plan.tokenizer_dir
    state = process_state()
    settings = plan.settings
    with state.main_process_first():
        if not has_tokenizer(folder):
            logger.info(
                "Training a byte-level BPE tokenizer (vocab %d) on %s", settings["vocab_size"], settings["dataset"]
            )
            texts = load_corpus(
                settings["dataset"],
                "train",
                text_column=plan.runs[0].args.text_column,
                streaming=settings["streaming"],
                builtin_max_chars=settings["builtin_max_chars"],
                cache_dir=plan.runs[0].args.cache_dir,
            )
            tokenizer = train_bpe_tokenizer(
                iter_texts(texts, settings["tokenizer_train_chars"]), settings["vocab_size"]
            )
            if state.is_main_process:
                with atomic_target(folder) as tmp:
                    tokenizer.save_pretrained(tmp)
        tokenizer = load_tokenizer(folder)
    if settings["tokenizer"] is None and len(tokenizer) > settings["vocab_size"]:
        raise UsageError(
            f"{folder} holds a tokenizer of {len(tokenizer)} tokens, more than vocab_size {settings['vocab_size']}; "
            "use a new --out or pass --tokenizer."
        )
    return tokenizer


RUN_INFO = "ablation_run.json"  # in each run folder: training time, and the model it started from


def _stale_reason(plan: AblationPlan, run: PlannedRun, source) -> str | None:
    """Why a finished run no longer fits the plan (its source model retrained, another tokenizer), or None."""
    recorded = (_read_json(plan.run_dir(run) / RUN_INFO) or {}).get("init_from")
    if source is not None and recorded is not None and recorded != source:
        return f"was trained from an earlier '{run.depends_on}' model, which has been retrained since"
    if _read_json(plan.run_dir(run) / "tokenizer.json") != _read_json(plan.tokenizer_dir / "tokenizer.json"):
        return f"was trained with another tokenizer than {plan.tokenizer_dir}"
    return None


def train_runs(plan: AblationPlan, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Train every run not finished yet (resuming from its newest checkpoint); return (trained, reused).

    A finished run that no longer fits the plan (other arguments, its source model retrained, another tokenizer) is
    refused, or with ``overwrite`` retrained from scratch; so is an unfinished one whose checkpoints do not fit.
    """
    trained, reused = [], []
    for index, run in enumerate(plan.runs, 1):
        source = _jsonable(_model_fingerprint(plan.run_dir(run.depends_on))) if run.depends_on else None
        finished = run_is_finished(run, overwrite)
        stale = _stale_reason(plan, run, source) if finished else None
        if stale is not None and not overwrite:
            raise UsageError(
                f"{plan.run_dir(run)} {stale}; pass {OVERWRITE_FLAG} to train '{run.name}' again (runs compared in "
                "one table must share their tokenizer and source models)."
            )
        if finished and stale is None:
            reused.append(run.name)
            logger.info("[%d/%d] %s: finished earlier, reused", index, len(plan.runs), run.name)
            continue
        logger.info(
            "[%d/%d] training %s (%s, p_big %g, %d steps, %d tokens)",
            index, len(plan.runs), run.name, run.kind, run.p_big, run.args.max_steps, run.tokens,
        )  # fmt: skip
        start = time.perf_counter()
        checkpoints = list_checkpoints(plan.run_dir(run) / CHECKPOINTS_DIR)
        fresh = dataclasses.replace(run.args, resume_from=None, overwrite_output_dir=overwrite)
        try:
            train(dataclasses.replace(fresh, resume_from="latest") if checkpoints else fresh)
        except FingerprintMismatch:
            if not overwrite:
                raise
            train(fresh)  # the checkpoints are of an earlier plan: start over, as asked
        info = {"train_seconds": time.perf_counter() - start, "init_from": source}
        if process_state().is_main_process:
            atomic_write_text(plan.run_dir(run) / RUN_INFO, json.dumps(info, indent=2))
        trained.append(run.name)
    return trained, reused


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _model_fingerprint(folder: Path) -> dict[str, Any]:
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "train_results": _read_json(folder / TRAIN_RESULTS_FILE),
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
    }


def evaluation_points(plan: AblationPlan, run: PlannedRun) -> list[float | None]:
    """The p_big values a run is evaluated at (None: a dense model, evaluated once)."""
    return list(plan.p_bigs) if run.is_duo else [None]


def _setting_key(p_big: float | None) -> str:
    return "dense" if p_big is None else f"p_big={p_big:g}"


def perplexity_fingerprint(plan: AblationPlan, run: PlannedRun) -> dict[str, Any]:
    return {
        "model": _model_fingerprint(plan.run_dir(run)),
        "holdouts": {k: list(v) for k, v in plan.holdouts.items()},
        "eval_blocks": plan.settings["eval_blocks"],
        "block_size": plan.settings["block_size"],
        "builtin_max_chars": plan.settings["builtin_max_chars"],
        "eval_seed": plan.settings["eval_seed"],
    }


def benchmark_fingerprint(plan: AblationPlan, run: PlannedRun) -> dict[str, Any]:
    spec = plan.benchmarks
    return {
        "model": _model_fingerprint(plan.run_dir(run)),
        "source": spec.source,
        "data_dir": spec.resolved_data_dir(),
        "limit": spec.limit,
        "eval_seed": plan.settings["eval_seed"],
    }


def _holdout_loaders(plan: AblationPlan, tokenizer, accelerator) -> dict:
    from torch.utils.data import DataLoader

    loaders = {}
    args = plan.runs[0].args
    for name, (spec, column) in plan.holdouts.items():
        texts = load_corpus(
            spec,
            f"holdout_{name}",
            text_column=column,
            streaming=plan.settings["streaming"],
            builtin_max_chars=plan.settings["builtin_max_chars"],
            cache_dir=args.cache_dir,
        )
        blocks = pack_corpus(
            texts, tokenizer, plan.settings["block_size"], f"holdout_{name}", plan.settings["eval_blocks"]
        )
        loaders[name] = accelerator.prepare(DataLoader(blocks, batch_size=args.eval_batch_size or args.batch_size))
    return loaders


def _load_model(folder: Path, device):
    model = load_complete_model(folder, torch.float32, "ablation run")
    return model.to(device).eval()


def _route_probs(p_big: float) -> dict[str, float]:
    return {"small": 1.0 - p_big, "big": p_big}


def evaluate_holdouts(plan: AblationPlan, run: PlannedRun, points, loaders, accelerator) -> dict:
    """Held-out loss and perplexity of one model at each point (a p_big, or None for dense)."""
    model = _load_model(plan.run_dir(run), accelerator.device)
    seed = plan.settings["eval_seed"]
    results = {}
    for p_big in points:
        if p_big is not None:
            model.set_routing("random", route_probs=_route_probs(p_big), route_seed=seed)
        mode = "dense" if p_big is None else "random"
        metrics = evaluate_perplexity(model, loaders, accelerator, [mode], seed)
        results[p_big] = {
            f"{kind}_{name}": metrics[f"eval/{name}/{mode}/{kind}"] for name in loaders for kind in ("loss", "ppl")
        }
    del model
    return results


def benchmark_task_manager(spec: BenchmarkSpec):
    """The harness's `TaskManager` that knows the benchmark tasks of ``spec``."""
    from lm_eval.tasks import TaskManager

    from ..integrations.lm_eval import local_task_manager

    if spec.source == "hub":
        return TaskManager()
    return local_task_manager(spec.resolved_data_dir(), include_defaults=False)  # no index of the harness's tasks


def evaluate_benchmarks(plan: AblationPlan, run: PlannedRun, p_big: float | None, task_manager) -> dict | None:
    """ARC-Easy acc and HellaSwag acc_norm of one model at one point, through the harness (None off rank 0)."""
    import lm_eval

    spec = plan.benchmarks
    tasks = spec.task_names()
    model_args: dict[str, Any] = {"pretrained": str(plan.run_dir(run))}
    if p_big is None:
        model = "hf"
    else:
        model = "duo"
        model_args.update(routing="random", p_big=p_big, route_seed=plan.settings["eval_seed"])
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks.values()),
        task_manager=task_manager,
        batch_size=spec.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",
        limit=spec.limit,
        bootstrap_iters=1000,  # only the stderr of acc / acc_norm is asked for: the closed form, no resampling
        log_samples=False,
        random_seed=plan.settings["eval_seed"],
        numpy_random_seed=plan.settings["eval_seed"],
        torch_random_seed=plan.settings["eval_seed"],
    )
    if results is None:  # not the main process of a data-parallel evaluation
        return None
    metrics: dict[str, Any] = {"n": {}}
    for bench, task in tasks.items():
        metric = BENCHMARK_METRICS[bench]
        scores = results["results"][task]
        metrics[f"{bench}_{metric}"] = float(scores[f"{metric},none"])
        stderr = scores.get(f"{metric}_stderr,none")
        metrics[f"{bench}_{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        metrics["n"][bench] = int(results["n-samples"][task]["effective"])
    metrics["lm_eval"] = {"model": model, "model_args": model_args, "tasks": tasks, "versions": results.get("versions")}
    return metrics


def evaluate_runs(plan: AblationPlan, tokenizer) -> dict[str, dict[str, dict]]:
    """Evaluate every run at its points, reusing cached evaluations; returns run -> setting -> record."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    accelerator = Accelerator()
    loaders = task_manager = None
    records: dict[str, dict[str, dict]] = {}

    def save(path: Path, record: dict) -> None:  # each evaluation is kept as soon as it is done
        if accelerator.is_main_process:
            atomic_write_text(path, json.dumps(_jsonable(record), indent=2))

    try:
        for run in plan.runs:
            points = evaluation_points(plan, run)
            paths = {p: plan.out / "evals" / run.name / f"{_setting_key(p)}.json" for p in points}
            cached = {p: _read_json(path) or {} for p, path in paths.items()}
            ppl_fp = _jsonable(perplexity_fingerprint(plan, run))
            todo = [p for p in points if (cached[p].get("perplexity") or {}).get("fingerprint") != ppl_fp]
            if todo and plan.holdouts:
                logger.info("Held-out perplexity of %s at %s", run.name, [_setting_key(p) for p in todo])
                if loaders is None:
                    loaders = _holdout_loaders(plan, tokenizer, accelerator)
                for p, metrics in evaluate_holdouts(plan, run, todo, loaders, accelerator).items():
                    cached[p]["perplexity"] = {"fingerprint": ppl_fp, "metrics": metrics}
                    save(paths[p], cached[p])
            if plan.benchmarks.enabled:
                bench_fp = _jsonable(benchmark_fingerprint(plan, run))
                for p in points:
                    if (cached[p].get("benchmarks") or {}).get("fingerprint") == bench_fp:
                        continue
                    logger.info("Benchmarks of %s at %s", run.name, _setting_key(p))
                    task_manager = task_manager or benchmark_task_manager(plan.benchmarks)
                    [metrics] = broadcast_object_list([evaluate_benchmarks(plan, run, p, task_manager)])
                    cached[p]["benchmarks"] = {"fingerprint": bench_fp, "metrics": metrics}
                    save(paths[p], cached[p])
            accelerator.wait_for_everyone()
            records[run.name] = {_setting_key(p): cached[p] for p in points}
    finally:
        # The harness and this evaluation set Accelerate's process-wide state; later runs start clean.
        reset_accelerate_state()
    return records


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------------
# Table and plots


def model_flops(config, p_big: float | None, seq_len: int) -> float:
    """Forward FLOPs per token: a Duo model under random routing at ``p_big``, or a dense model (None)."""
    fractions = {"big": 1.0} if p_big is None else _route_probs(p_big)
    return flops_per_token(config, fractions, seq_len=seq_len).total


def planned_config(run: PlannedRun, vocab_size: int):
    """The model config a from-scratch run builds (Duo, or the FLOP-matched dense Llama)."""
    duo = duo_config_from_args(run.args, vocab_size)
    return dense_baseline_config(duo) if run.args.mode == "dense" else duo


def build_rows(plan: AblationPlan, records: Mapping[str, Mapping[str, dict]]) -> tuple[list[dict], dict[str, int]]:
    """One row per (model, point), in the order of the figure; and the benchmark example counts."""
    rows, counts = [], {}
    for run in plan.runs:
        config = AutoConfig.from_pretrained(plan.run_dir(run))
        is_duo = is_duo_model(config)
        timing = _read_json(plan.run_dir(run) / RUN_INFO) or {}
        results = _read_json(plan.run_dir(run) / TRAIN_RESULTS_FILE) or {}
        for key, record in records[run.name].items():
            p_big = None if key == "dense" else float(key.split("=")[1])
            ffn = (
                f"{config.intermediate_size}/{config.small_intermediate_size}"
                if is_duo
                else str(config.intermediate_size)
            )
            row: dict[str, Any] = {
                "model": KINDS[run.kind],
                "run": run.name,
                "p_big": p_big if p_big is not None else run.p_big,
                "ffn_inner": ffn,
                "train_tokens": run.total_tokens,
                "run_tokens": results.get("tokens_seen", run.tokens),
                "forward_flops_per_token": model_flops(config, p_big, plan.settings["block_size"]),
                "train_seconds": timing.get("train_seconds"),
            }
            for name in HOLDOUTS:
                metrics = (record.get("perplexity") or {}).get("metrics") or {}
                row[f"ppl_{name}"] = metrics.get(f"ppl_{name}")
                row[f"loss_{name}"] = metrics.get(f"loss_{name}")
            bench = (record.get("benchmarks") or {}).get("metrics") or {}
            for b, metric in BENCHMARK_METRICS.items():
                row[f"{b}_{metric}"] = bench.get(f"{b}_{metric}")
                row[f"{b}_{metric}_stderr"] = bench.get(f"{b}_{metric}_stderr")
            counts.update(bench.get("n") or {})
            rows.append(row)
    return rows, counts


def column_labels(plan: AblationPlan, counts: Mapping[str, int]) -> dict[str, str]:
    """Row key -> column title; the benchmark titles say what data they were computed on."""
    labels = {
        "model": "model",
        "run": "run",
        "p_big": "p_big",
        "ffn_inner": "FFN inner (big/small)",
        "train_tokens": "train tokens (total)",
        "forward_flops_per_token": "forward FLOPs/token",
    }
    for name in plan.holdouts:
        labels[f"ppl_{name}"] = f"ppl {name} (held-out)"
    if plan.benchmarks.enabled:
        suffix = plan.benchmarks.short_label(counts)
        for b, metric in BENCHMARK_METRICS.items():
            labels[f"{b}_{metric}"] = f"{BENCHMARK_NAMES[b]} {metric} {suffix}".strip()
    return labels


def _fmt(value, key: str) -> str:
    if value is None:
        return "-"
    if key == "forward_flops_per_token":
        return f"{value / 1e6:.2f}M" if value < 1e9 else f"{value / 1e9:.2f}G"
    if key == "train_tokens":
        return f"{value:,}"
    if key.startswith("ppl_"):
        return f"{value:.2f}"
    if key == "p_big":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[dict], labels: Mapping[str, str]) -> str:
    keys = list(labels)
    lines = ["| " + " | ".join(labels[k] for k in keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for row in rows:
        cells = []
        for k in keys:
            cell = _fmt(row.get(k), k)
            stderr = row.get(f"{k}_stderr")
            if stderr is not None and row.get(k) is not None:
                cell += f" ± {stderr:.3f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: Sequence[dict], labels: Mapping[str, str]) -> str:
    """Every row field; the columns that have a title are named by it (so benchmark columns carry their label)."""
    keys = list(rows[0]) if rows else list(labels)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([labels.get(k, k) for k in keys])
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
    return buffer.getvalue()


def plot_fig8(plan: AblationPlan, rows: Sequence[dict], counts: Mapping[str, int], path: Path, dpi: int = 72) -> Path:
    """The paper's Fig. 8 panels on the benchmarks (top row, if any) and on held-out perplexity (bottom row)."""
    plt = _pyplot()
    panels = []  # (title, y label, [(kind, key, label, style)])
    if plan.benchmarks.enabled:
        note = plan.benchmarks.short_label(counts)
        keys = {b: f"{b}_{m}" for b, m in BENCHMARK_METRICS.items()}
        for letter, (b, metric) in zip("ab", BENCHMARK_METRICS.items(), strict=True):
            title = f"({letter}) {BENCHMARK_NAMES[b]} {metric}\n{note}".strip()
            panels.append((title, metric, [("duo", keys[b], "Duo", {}), ("dense", keys[b], "dense, equal FLOPs", {})]))
        lines = []
        for b, colour in zip(BENCHMARK_METRICS, ("C0", "C1"), strict=True):
            lines.append(("duo", keys[b], f"{BENCHMARK_NAMES[b]}: from scratch", {"color": colour}))
            lines.append(("frozen-big", keys[b], f"{BENCHMARK_NAMES[b]}: frozen big", {"color": colour, "ls": "--"}))
        panels.append((f"(c) from scratch vs frozen big\n{note}".strip(), "accuracy", lines))
    if plan.holdouts:
        letters = iter("de")
        for name in list(plan.holdouts)[:2]:
            key = f"ppl_{name}"
            lines = [("duo", key, "Duo", {}), ("dense", key, "dense, equal FLOPs", {})]
            panels.append((f"({next(letters)}) held-out perplexity, {name}", "perplexity", lines))
        lines = []
        for name, colour in zip(plan.holdouts, ("C0", "C1"), strict=False):
            lines.append(("duo", f"ppl_{name}", f"{name}: from scratch", {"color": colour}))
            lines.append(("frozen-big", f"ppl_{name}", f"{name}: frozen big", {"color": colour, "ls": "--"}))
        panels.append(("(f) from scratch vs frozen big, perplexity", "perplexity", lines))
    n_rows = math.ceil(len(panels) / 3)
    fig, axes = plt.subplots(n_rows, 3, figsize=(12, 3.4 * n_rows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    for ax, (title, ylabel, lines) in zip(axes.flat, panels, strict=False):
        for kind, key, label, style in lines:
            points = sorted((r["p_big"], r[key]) for r in rows if r["model"] == KINDS[kind] and r.get(key) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=4, label=label, **style)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("p_big", fontsize=8)
        ax.set_xticks(plan.p_bigs)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    tokens = plan.steps * plan.tokens_per_step
    fig.suptitle(
        f"Fig. 8 ablations, preset '{plan.settings['preset']}', {tokens:,} training tokens per model. x: p_big of the "
        "random routing at evaluation (Duo, frozen big) or whose FLOPs a dense model matches.",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", pil_kwargs={"optimize": True})  # small enough to commit
    plt.close(fig)
    return path


def write_outputs(plan: AblationPlan, rows: list[dict], counts: dict[str, int], seconds: float) -> dict[str, str]:
    """results.md / .json / .csv and fig8.png in ``plan.out`` (atomically)."""
    labels = column_labels(plan, counts)
    note = plan.benchmarks.note(counts) if plan.benchmarks.enabled else "not evaluated (--lm-eval-tasks none)"
    for row in rows:
        row["benchmark_data"] = note if plan.benchmarks.enabled else None
    files = {name: plan.out / name for name in ("results.md", "results.json", "results.csv", "fig8.png")}
    tokens = plan.steps * plan.tokens_per_step
    header = [
        f"# Fig. 8 ablations (preset `{plan.settings['preset']}`)",
        "",
        f"Each model: {tokens:,} training tokens ({plan.steps} steps of {plan.tokens_per_step:,}); frozen-big counts "
        f"its dense pre-training in that total ({plan.run('big_pretrain').tokens:,} + "
        f"{plan.run('frozen_big').tokens:,}). Duo and frozen-big are evaluated under random routing at each p_big; "
        "each dense model has the FFN size whose FLOPs equal the Duo model's at its p_big.",
        "",
        f"Held-out perplexity: {', '.join(f'{k} = {v[0]}' for k, v in plan.holdouts.items()) or 'none'} "
        f"({plan.settings['eval_blocks']} blocks of {plan.settings['block_size']} tokens each).",
        f"Benchmarks: {note}.",
        "",
        markdown_table(rows, labels),
        "",
    ]
    atomic_write_text(files["results.md"], "\n".join(header))
    payload = {
        "preset": plan.settings["preset"],
        "settings": plan.settings,
        "p_bigs": plan.p_bigs,
        "tokens_per_model": tokens,
        "steps": plan.steps,
        "tokens_per_step": plan.tokens_per_step,
        "benchmark_data": note,
        "columns": labels,
        "rows": rows,
        "seconds_this_call": seconds,
    }
    atomic_write_text(files["results.json"], json.dumps(_jsonable(payload), indent=2))
    atomic_write_text(files["results.csv"], csv_table(rows, labels))
    with atomic_target(files["fig8.png"]) as tmp_png:
        plot_fig8(plan, rows, counts, tmp_png)
    return {name: str(path) for name, path in files.items()}


# ----------------------------------------------------------------------------------------------------
# The whole ablation


def run_ablation(args: AblationArguments) -> AblationResult:
    """Plan, train (or reuse), evaluate (or reuse) and write the table and plots; see the module docstring."""
    start = time.perf_counter()
    plan = plan_ablation(args)
    threads = torch.get_num_threads()
    if plan.settings["threads"]:
        torch.set_num_threads(plan.settings["threads"])
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        tokenizer = prepare_tokenizer(plan)
        trained, reused = train_runs(plan, args.overwrite_output_dir)
        records = evaluate_runs(plan, tokenizer)
        rows, counts = build_rows(plan, records)
        seconds = time.perf_counter() - start
        files: dict[str, str] = {}
        state = process_state()
        if state.is_main_process:
            files = write_outputs(plan, rows, counts, seconds)
        state.wait_for_everyone()
    finally:
        torch.set_num_threads(threads)
    return AblationResult(str(plan.out), rows, files, trained, reused, seconds)


def main(argv: Sequence[str] | None = None) -> AblationResult:
    """Command line: ``python eval/ablation.py --preset cpu --out runs/ablation`` (``--help`` for all flags)."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("duo_llm_hf").setLevel(logging.INFO)
    # The harness warns on every load of a local-data task (its custom_dataset hook); that is not news here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    result = run_ablation(parse_ablation_args(argv))
    state = process_state()
    if state.is_main_process:
        print(Path(result.files["results.md"]).read_text())
        print(f"Wrote {', '.join(result.files.values())} in {result.seconds:.0f} s "
              f"(trained {len(result.trained)} runs, reused {len(result.reused)}).")  # fmt: skip
    state.destroy_process_group()  # a multi-process launch ends here (no-op in one process)
    return result


__all__ = [
    "AblationArguments",
    "AblationPlan",
    "AblationResult",
    "BenchmarkSpec",
    "PRESETS",
    "P_BIGS",
    "PlannedRun",
    "build_arg_parser",
    "main",
    "model_flops",
    "parse_ablation_args",
    "plan_ablation",
    "planned_config",
    "run_ablation",
]
