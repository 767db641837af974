"""The arguments of the training commands, as groups of dataclass fields that each command composes.

Each field is also a command-line flag (``--name-with-dashes`` and ``--name_with_underscores``), parsed by the
project's `DataclassArgumentParser` (`utils.arguments.parse_arguments`). The groups:

- `RunArguments`: where a run writes, its evaluation, logging and checkpoints, and resuming;
- `DataArguments`: the training and holdout corpora, the block size and an existing tokenizer;
- `ModelArguments`: the model stage 1 trains (from scratch or ``--init-from``) and its random routes;
- `OptimizationArguments`: batch, AdamW, learning-rate schedule, length of the run, precision, seed.

Stage 1 (`TrainArguments`) takes all four; the router training (`router_arguments.RouterTrainArguments`) takes
the run, data and optimisation groups with its own defaults (`with_default`) and its router fields; the Appendix A
finetuning (`FinetuneArguments`, run by `finetune`) is stage 1 in frozen-big mode. A run is an instance of one flat
dataclass, so ``dataclasses.asdict(args)`` is its ``training_args.json`` and the base of its fingerprint.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, InitVar, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import BUILTIN
from ..utils.arguments import (
    build_parser,
    check_choices,
    check_float_fields,
    check_folder,
    check_integer_fields,
    check_output_dir,
    deprecation,
    parse_arguments,
)
from ..utils.errors import MissingDependencyError, MissingFileError, UsageError

# Only light modules above: ``--help`` builds its parser from these dataclasses without torch, transformers or
# datasets, which the checks (`validate`) import when a command runs.
MODES = ("scratch", "frozen-big", "dense")
# Spellings of 0.1 that still work, with a deprecation line, until 0.3: the training mode ``random`` (a name of the
# routing vocabulary) is ``scratch``, and these fields were renamed (old -> new). `loop.run_identity` reads them in the
# fingerprint of a checkpoint written before, so such a run resumes.
RENAMED_MODES = {"random": "scratch"}
RENAMED_FIELDS = {"eval_routes": "eval_routings", "budget": "target_usage"}
# What --report-to may name: our own trackers, then Accelerate's (`accelerate.utils.LoggerType`, 1.16; a test keeps
# the two lists equal, so the help, the check and Accelerate agree).
OUR_TRACKERS = ("auto", "jsonl", "none")
ACCELERATE_TRACKERS = (
    "all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab",
)  # fmt: skip
REPORT_TO_CHOICES = OUR_TRACKERS + ACCELERATE_TRACKERS

def with_default(group: type, name: str, default=MISSING, help: str | None = None):
    """The field ``name`` of ``group`` for a command whose default (or, with ``help``, meaning) differs.

    Declared in a subclass, it keeps the field's place, type and help text: only what differs is written there.
    """
    source = group.__dataclass_fields__[name]
    metadata = {**source.metadata, **({"help": help} if help is not None else {})}
    return field(default=source.default if default is MISSING else default, metadata=metadata)


@dataclass(kw_only=True)
class RunArguments:
    """Where a run writes, how it is evaluated, logged and checkpointed, and how it resumes."""

    output_dir: str = field(metadata={"help": "Folder for the final model, tokenizer, checkpoints and logs."})
    eval_every: int = field(
        default=200,
        metadata={"help": "Evaluate held-out perplexity every N steps (0: end).", "aliases": ["eval_steps"]},
    )
    eval_blocks: int = field(default=64, metadata={"help": "Blocks of each holdout set to evaluate."})
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Eval batch size (default --batch-size)."}
    )
    log_every: int = field(
        default=10, metadata={"help": "Log training metrics every N steps.", "aliases": ["logging_steps"]}
    )
    report_to: str = field(
        default="auto",
        metadata={
            "help": "Trackers, comma-separated: auto (jsonl + tensorboard if installed), jsonl, none, or "
            f"Accelerate's {', '.join(ACCELERATE_TRACKERS)} (installed)."
        },
    )
    run_name: str = field(default="train_duo", metadata={"help": "Run name for the trackers."})
    checkpoint_every: int = field(
        default=500, metadata={"help": "Save a checkpoint every N steps (0: never).", "aliases": ["save_steps"]}
    )
    checkpoints_to_keep: int | None = field(
        default=2,
        metadata={
            # transformers keeps every checkpoint unless --save_total_limit is given; a given N means the same here
            "help": "Keep only the newest N checkpoints (default: 2; transformers' --save_total_limit keeps all).",
            "aliases": ["save_total_limit"],
        },
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder to resume from, or 'latest' (newest in output_dir).",
            "aliases": ["resume_from_checkpoint"],
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds a finished run or an earlier run's checkpoints: "
            "the finished model and its files are replaced; the earlier checkpoints are kept, moved to "
            "checkpoints/run-<its run id>/ (where --resume-from latest never looks). Without it that is refused."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})


@dataclass(kw_only=True)
class DataArguments:
    """The training corpus, the holdout corpora, how text becomes blocks, and an existing tokenizer."""

    dataset: str = field(
        default=BUILTIN,
        metadata={
            "help": "Training corpus: builtin, a local file/folder (.txt .jsonl .json .csv .parquet), or "
            "hf:NAME[:CONFIG][@SPLIT] (Hub)."
        },
    )
    holdout_english: str = field(
        default=BUILTIN, metadata={"help": "English holdout corpus (same syntax; 'none' to skip)."}
    )
    holdout_code: str = field(
        default=BUILTIN, metadata={"help": "Code holdout corpus (same syntax; 'none' to skip)."}
    )
    text_column: str = field(
        default="text", metadata={"help": "Column holding the text in json/csv/parquet/Hub data."}
    )
    # Each holdout is its own dataset, with its own schema (the paper preset's code holdout keeps its text in
    # `content`); None reads --text-column.
    holdout_english_column: str | None = field(
        default=None, metadata={"help": "Text column of the English holdout (default --text-column)."}
    )
    holdout_code_column: str | None = field(
        default=None, metadata={"help": "Text column of the code holdout (default --text-column)."}
    )
    sample_by: Literal["document", "paragraph", "line"] = field(
        default="document", metadata={"help": "How plain-text files are cut into documents."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training corpus (needs --max-steps)."}
    )
    shuffle_buffer: int = field(
        default=10_000, metadata={"help": "Shuffle buffer (blocks) of a streamed corpus."}
    )
    builtin_max_chars: int | None = field(
        default=None,
        metadata={"help": "Cap each built-in split at this many characters (quick runs, tests)."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder of `datasets` (default: HF's)."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training block (sequence length)."})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Existing tokenizer folder. Default: train a byte-level BPE on the training corpus "
            "(frozen-big: the tokenizer in --init-from)."
        },
    )


@dataclass(kw_only=True)
class ModelArguments:
    """The model a stage 1 run trains, its random routes, and the tokenizer it trains when none is given."""

    mode: Literal["scratch", "frozen-big", "dense"] = field(
        default="scratch",
        metadata={
            "help": "scratch: a Duo model from scratch with random routing (stage 1). frozen-big: start from "
            "--init-from, freeze it, train only the small FFNs. dense: a LlamaForCausalLM whose FFN inner "
            "size matches the Duo model's FLOPs at --p-big.",
            "deprecated_values": RENAMED_MODES,
        },
    )
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of a trained tokenizer."})
    tokenizer_train_chars: int = field(
        default=50_000_000,
        metadata={"help": "Characters of the training corpus the tokenizer is trained on."},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "frozen-big: a dense Llama or OPT model, or a Duo model (its big path); a local folder or a "
            "Hub name (e.g. facebook/opt-1.3b)."
        },
    )
    hidden_size: int = field(default=256, metadata={"help": "Hidden size."})
    num_layers: int = field(default=8, metadata={"help": "Decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_kv_heads: int | None = field(
        default=None, metadata={"help": "Key/value heads (default: --num-heads)."}
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "Big FFN inner size (default 4 x hidden)."}
    )
    small_intermediate_size: int | None = field(
        default=None, metadata={"help": "Small FFN inner size (default: big // 16)."}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Positions of the model (default: --block-size)."}
    )
    p_big: float = field(
        default=0.5,
        metadata={
            "help": "Probability of the big FFN under random routing, route_probs['big'] (dense: FLOP-matched at it)."
        },
    )
    p_skip: float = field(
        default=0.0, metadata={"help": "Probability of skipping the FFN, route_probs['skip']; small gets the rest."}
    )
    route_seed: int | None = field(
        default=None, metadata={"help": "Seed of the random routes (default: --seed)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each layer's big and small FFN (dynamic shapes); see BENCHMARKS.md."},
    )
    eval_routings: str = field(
        default="random,all-big,all-small",
        metadata={
            "help": "Duo routings to evaluate, comma-separated: random (fixed seed), all-big, all-small, all-skip.",
            "deprecated_aliases": ["eval_routes"],
        },
    )

    eval_routes: InitVar[str | None] = None  # the 0.1 name of eval_routings, as a Python keyword

    def __post_init__(self, eval_routes: str | None) -> None:
        if eval_routes is not None:
            self.eval_routings = renamed_keyword(type(self).__name__, "eval_routes", eval_routes)

    def eval_routing_list(self) -> list[str]:
        return [r.strip() for r in self.eval_routings.split(",") if r.strip()]

    def route_probs(self) -> dict[str, float]:
        """Random-routing probabilities: big = p_big, skip = p_skip, small = the rest."""
        probs = {"small": max(0.0, 1.0 - self.p_big - self.p_skip), "big": self.p_big}
        if self.p_skip > 0:
            probs["skip"] = self.p_skip
        return probs

    def route_probs_at(self, step: int, total_steps: int) -> dict[str, float]:
        """Random-routing probabilities of optimizer step ``step`` of ``total_steps``: here `route_probs` at every
        step (`FinetuneArguments` may start p_big elsewhere)."""
        return self.route_probs()


@dataclass(kw_only=True)
class OptimizationArguments:
    """Batches, AdamW and its learning-rate schedule, the length of the run, precision and the seed."""

    batch_size: int = field(
        default=16,
        metadata={"help": "Blocks per micro-batch and process.", "aliases": ["per_device_train_batch_size"]},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    lr_scheduler: str = field(
        default="cosine",
        metadata={"help": "transformers scheduler name, after warm-up.", "aliases": ["lr_scheduler_type"]},
    )
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    fused_optimizer: bool = field(
        default=True, metadata={"help": "Use torch's fused AdamW kernel where it runs (CPU, CUDA)."}
    )
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (default: --num-epochs)."})
    num_epochs: int = field(
        default=1,
        metadata={
            "help": "Epochs over the training blocks, when no --max-steps (whole epochs).",
            "aliases": ["num_train_epochs"],
        },
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={
            "help": "no, fp16 or bf16 (default: the accelerate config's, else no).",
            "value_flags": {"bf16": "bf16", "fp16": "fp16"},
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of weights, data order and (by default) routes."})


@dataclass(kw_only=True)
class TrainArguments(OptimizationArguments, ModelArguments, DataArguments, RunArguments):
    """Arguments of a stage 1 training run: every group (each field is also a flag, ``--name-with-dashes``)."""

    # The command's name and description in --help and errors (`build_parser`); unannotated, so not fields.
    prog = "duo-llm train"
    description = "Stage 1 training of a Duo-LLM model (or its dense baseline) with Accelerate."

    def validate(self) -> None:
        """Check every argument and the paths they name, before any work is done; raise `UsageError`."""
        check_output_dir(self)
        positive = (
            "block_size",
            "batch_size",
            "gradient_accumulation_steps",
            "hidden_size",
            "num_layers",
            "num_heads",
            "eval_blocks",
            "log_every",
            "num_epochs",
            "tokenizer_train_chars",
            "shuffle_buffer",
        )
        optional = (
            "max_steps",
            "eval_batch_size",
            "num_kv_heads",
            "intermediate_size",
            "small_intermediate_size",
            "max_position_embeddings",
            "builtin_max_chars",
            "checkpoints_to_keep",
        )
        non_negative = ("eval_every", "checkpoint_every", "warmup_steps")
        check_integer_fields(
            self, positive=positive, optional=optional, non_negative=non_negative, seeds=("seed", "route_seed")
        )
        if self.block_size < 2:
            raise UsageError(f"block_size: {self.block_size} must be at least 2 tokens.")
        if self.mode in RENAMED_MODES:  # a script of 0.1 that builds the arguments in Python
            deprecation(self.prog, f"mode {self.mode!r}", f"mode {RENAMED_MODES[self.mode]!r}")
            self.mode = RENAMED_MODES[self.mode]
        if self.mode not in MODES:
            raise UsageError(f"mode: {self.mode!r} is not a training mode; use one of {list(MODES)}.")
        from ..data.tokenization import MIN_VOCAB_SIZE

        if not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB_SIZE:
            raise UsageError(
                f"vocab_size: {self.vocab_size!r} is too small; a byte-level BPE tokenizer needs at least "
                f"{MIN_VOCAB_SIZE} tokens (256 bytes + the end-of-text token)."
            )
        if self.mode != "frozen-big":
            check_model_shape(self)
        if not (
            0.0 <= self.p_big <= 1.0 and 0.0 <= self.p_skip <= 1.0 and self.p_big + self.p_skip <= 1.0 + 1e-9
        ):
            raise UsageError(
                f"p_big={self.p_big!r}, p_skip={self.p_skip!r}: each must be in [0, 1] and together at most "
                "1 (the small FFN gets 1 - p_big - p_skip)."
            )
        routings = check_choices(self, "eval_routings", eval_routings())
        if "all-skip" in routings and self.p_skip == 0:
            raise UsageError(
                "eval_routings: 'all-skip' needs a model that allows skipping (train with --p-skip > 0)."
            )
        check_init_source(self)
        positions = self.max_position_embeddings
        if positions is not None and self.block_size > positions:
            raise UsageError(
                f"block_size {self.block_size} is longer than max_position_embeddings {positions}; use a "
                "block size <= the model's positions."
            )
        check_run_fields(self)
        check_data_fields(self)


def _hidden(name: str):
    """A from-scratch field of `ModelArguments` that a finetuning run takes from the checkpoint instead: no flag,
    its stage 1 default (kept in ``training_args.json`` and the fingerprint, as stage 1 writes them)."""
    default = ModelArguments.__dataclass_fields__[name].default
    return field(default=default, init=False, repr=False)


@dataclass(kw_only=True)
class FinetuneArguments(TrainArguments):
    """Arguments of the Appendix A finetuning run: `TrainArguments` in frozen-big mode, plus where the small FFNs
    start (``small_init``, ``distill_steps``; `small_init.start_small_ffns`), a p_big schedule (``p_big_start``)
    and LoRA.

    The model's shape and vocabulary come from the checkpoint and its tokenizer, so the from-scratch flags
    (``--hidden-size``, ``--vocab-size``, ...) do not exist here.
    """

    prog = "duo-llm finetune"
    description = (
        "Finetune a pretrained OPT as a Duo-LLM model (the paper's Appendix A): frozen pretrained weights, small "
        "FFNs trained with random routing, optional LoRA on the attention."
    )

    mode: str = field(default="frozen-big", init=False)
    init_from: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model-name-or-path", "--model_name_or_path"],
            "help": "The pretrained OPT model (or a Llama-family one): a Hub name such as facebook/opt-1.3b, or a "
            "local folder written by save_pretrained. Its tokenizer is loaded from the same place.",
        },
    )
    vocab_size: int = _hidden("vocab_size")
    tokenizer_train_chars: int = _hidden("tokenizer_train_chars")
    hidden_size: int = _hidden("hidden_size")
    num_layers: int = _hidden("num_layers")
    num_heads: int = _hidden("num_heads")
    num_kv_heads: int | None = _hidden("num_kv_heads")
    intermediate_size: int | None = _hidden("intermediate_size")
    max_position_embeddings: int | None = _hidden("max_position_embeddings")
    run_name: str = with_default(RunArguments, "run_name", "finetune_duo")
    lora: bool = field(
        default=False,
        metadata={"help": "Also train LoRA adapters (peft) on the attention projections; merged on save."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names for LoRA (default: the attention projections, "
            "q_proj,k_proj,v_proj,out_proj for OPT and q_proj,k_proj,v_proj,o_proj for Llama)."
        },
    )

    small_init: str = field(
        default="random",
        metadata={
            "help": "How each small FFN starts: random (fresh weights), slice-weight (the big FFN's top neurons by "
            "weight norms) or slice-activation (by mean |activation| on training blocks x output weight norm)."
        },
    )
    distill_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of local distillation before training: each small FFN learns its big FFN's output on "
            "the all-BIG run's FFN inputs (MSE per layer; --batch-size blocks per step)."
        },
    )
    distill_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the distillation."})
    p_big_start: float | None = field(
        default=None,
        metadata={
            "help": "p_big of the first step; it moves linearly to --p-big over --p-big-decay-fraction of the run "
            "(default: --p-big throughout)."
        },
    )
    p_big_decay_fraction: float = field(
        default=0.5,
        metadata={"help": "Fraction of the optimizer steps over which p_big goes from its start to --p-big."},
    )

    def validate(self) -> None:
        """`TrainArguments.validate`, then the small FFNs' start (init, distillation, p_big schedule) and the LoRA
        flags (and, when LoRA is on, that peft is installed)."""
        if not self.init_from:
            raise UsageError(
                "init_from: give the pretrained model, e.g. --init-from facebook/opt-1.3b (Hub) or a local folder."
            )
        super().validate()
        check_small_start(self)
        check_integer_fields(self, positive=("lora_r",))
        check_float_fields(self, positive=("lora_alpha",), fractions=("lora_dropout",))
        if self.lora_target_modules is not None and not self.lora_target_list():
            raise UsageError("lora_target_modules: name at least one module (or leave it out for the attention).")
        if not self.lora:
            return
        if importlib.util.find_spec("peft") is None:
            raise MissingDependencyError("--lora needs peft: pip install 'duo-llm-hf[peft]' (or pip install peft).")
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            raise UsageError(
                "--lora is not supported under FSDP (the adapters are merged on one full copy of the model); "
                "use DDP or one process (a Duo OPT-1.3B fits one GPU)."
            )

    def route_probs_at(self, step: int, total_steps: int) -> dict[str, float]:
        """Random-routing probabilities of optimizer step ``step`` of ``total_steps``: p_big moves linearly from
        ``p_big_start`` to ``p_big`` over the first ``p_big_decay_fraction`` of the steps, then stays; small and
        skip share the rest in the ratio of `route_probs`."""
        probs = self.route_probs()
        if self.p_big_start is None:
            return probs
        decay_steps = max(1, round(self.p_big_decay_fraction * total_steps))
        progress = min(1.0, step / decay_steps)
        p_big = self.p_big_start + (self.p_big - self.p_big_start) * progress
        rest = 1.0 - self.p_big
        # small's and skip's shares of what big leaves (all small when p_big is 1 and nothing is left to share)
        shares = {name: p / rest if rest > 0 else float(name == "small") for name, p in probs.items() if name != "big"}
        return {**{name: (1.0 - p_big) * share for name, share in shares.items()}, "big": p_big}

    def lora_target_list(self) -> list[str] | None:
        """The LoRA target module names, or None for the architecture's attention projections."""
        if self.lora_target_modules is None:
            return None
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


def renamed_keyword(owner: str, old: str, value: Any) -> Any:
    """The value a script of 0.1 gave an arguments dataclass under a renamed keyword, with a FutureWarning."""
    warnings.warn(f"{owner}({old}=...) is now {RENAMED_FIELDS[old]}=... (removed in 0.3).", FutureWarning, stacklevel=4)
    return value


def current_names(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments saved by 0.1 (``training_args.json``, a checkpoint's fingerprint) under the names of now
    (`RENAMED_FIELDS`, `RENAMED_MODES`), so that its runs still compare equal to the same run asked for now."""
    values = {RENAMED_FIELDS.get(key, key): value for key, value in saved.items()}
    if values.get("mode") in RENAMED_MODES:
        values["mode"] = RENAMED_MODES[values["mode"]]
    return values


def eval_routings() -> tuple[str, ...]:
    """The routings a stage 1 model may be evaluated under (``--eval-routings``): names of the routing vocabulary
    (`models.routes.parse_routing`)."""
    from ..models.routes import UNIFORM_PATTERNS

    return ("random", *UNIFORM_PATTERNS)


def schedulers() -> list[str]:
    """What ``--lr-scheduler`` may name: transformers' schedulers (`get_scheduler`)."""
    from transformers import SchedulerType

    return [kind.value for kind in SchedulerType]


def check_init_source(args: TrainArguments) -> None:
    """``init_from`` is given exactly in frozen-big mode, names a supported model (a folder or a Hub name) long
    enough for the blocks, and a local one holds a tokenizer unless ``--tokenizer`` is given."""
    from ..data.tokenization import has_tokenizer
    from ..utils.loading import is_hub_id
    from .building import inspect_init_source

    if args.mode == "frozen-big" and not args.init_from:
        raise UsageError(
            "mode 'frozen-big' needs --init-from: a dense Llama folder or a Duo model folder."
        )
    if args.mode != "frozen-big" and args.init_from:
        raise UsageError(f"--init-from is for mode 'frozen-big' only (this run's mode is {args.mode!r}).")
    if args.init_from and not (Path(args.init_from).expanduser().is_dir() or is_hub_id(args.init_from)):
        raise MissingFileError(
            f"init_from: {args.init_from!r} is not a model folder (written by save_pretrained) nor a Hub "
            "model name."
        )
    if args.mode == "frozen-big":
        inspect_init_source(args.init_from, args.block_size)  # its config only: a supported model, long enough
    local_source = args.init_from and not is_hub_id(args.init_from)
    if local_source and args.tokenizer is None and not has_tokenizer(Path(args.init_from).expanduser()):
        raise MissingFileError(
            f"init_from {args.init_from!r} holds no tokenizer; pass --tokenizer with the tokenizer that "
            "model was trained with (a new one would not match its embeddings)."
        )


SMALL_INITS = ("random", "slice-weight", "slice-activation")


def check_small_start(args: FinetuneArguments) -> None:
    """The small FFNs' start of a finetuning run: an init of `SMALL_INITS`, distillation steps >= 0 at a positive
    learning rate, a p_big start in [0, 1] and a decay fraction in (0, 1]."""
    if args.small_init not in SMALL_INITS:
        raise UsageError(f"small_init: {args.small_init!r} is not an initialisation; use one of {list(SMALL_INITS)}.")
    check_integer_fields(args, non_negative=("distill_steps",))
    check_float_fields(args, positive=("distill_learning_rate",))
    start = args.p_big_start
    if start is not None and not (isinstance(start, (int, float)) and 0.0 <= start <= 1.0):
        raise UsageError(f"p_big_start: {start!r} must be a probability in [0, 1].")
    fraction = args.p_big_decay_fraction
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise UsageError(f"p_big_decay_fraction: {fraction!r} must be in (0, 1] (a fraction of the run's steps).")


def check_model_shape(args) -> None:
    """The from-scratch model's shape fits together: heads divide the hidden size, key/value heads the heads, the
    small FFN is not larger than the big one. ``args`` has `ModelArguments`' fields."""
    if args.hidden_size % args.num_heads:
        raise UsageError(
            f"hidden_size {args.hidden_size} is not a multiple of num_heads {args.num_heads}; every head needs the "
            "same width."
        )
    kv_heads = args.num_kv_heads or args.num_heads
    if args.num_heads % kv_heads:
        raise UsageError(f"num_kv_heads {kv_heads} does not divide num_heads {args.num_heads}.")
    big = args.intermediate_size or 4 * args.hidden_size
    if args.small_intermediate_size is not None and args.small_intermediate_size > big:
        raise UsageError(
            f"small_intermediate_size {args.small_intermediate_size} is larger than the big FFN's "
            f"intermediate_size {big}; the small FFN must be the smaller one."
        )


def check_run_fields(args) -> None:
    """Check the optimisation and naming fields every training run has (`OptimizationArguments`, `RunArguments`,
    ``text_column``): learning rate, weight decay, betas, clipping, the scheduler, and non-empty names."""
    check_float_fields(
        args,
        positive=("learning_rate",),
        non_negative=("weight_decay", "max_grad_norm"),
        fractions=("adam_beta1", "adam_beta2"),
    )
    if args.lr_scheduler not in schedulers():
        raise UsageError(f"lr_scheduler: {args.lr_scheduler!r} is not a scheduler; use one of {schedulers()}.")
    for name in ("run_name", "report_to", "text_column"):
        if not getattr(args, name).strip():
            raise UsageError(f"{name}: {getattr(args, name)!r} is empty; give a name (see --help).")
    for name in ("holdout_english_column", "holdout_code_column"):
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise UsageError(f"{name}: {value!r} is empty; give a column name, or leave it out for --text-column.")
    check_report_to(args)


def check_report_to(args) -> None:
    """``report_to`` names trackers of `REPORT_TO_CHOICES`, ``none`` alone, and only Accelerate trackers that are
    installed (Accelerate would otherwise drop a missing one without a word)."""
    names = check_choices(args, "report_to", REPORT_TO_CHOICES)
    if "none" in names and len(names) > 1:
        raise UsageError(f"report_to: {args.report_to!r} mixes 'none' with trackers; give one or the other.")
    wanted = [name for name in names if name in ACCELERATE_TRACKERS and name != "all"]
    if wanted:
        from accelerate.tracking import get_available_trackers

        available = {str(tracker) for tracker in get_available_trackers()}
        missing = [name for name in wanted if name not in available]
        if missing:
            raise MissingDependencyError(
                f"report_to: {missing[0]!r} is not installed; pip install {missing[0]}, or choose another tracker."
            )


def check_data_fields(args) -> None:
    """Check the `DataArguments` of a run (with ``max_steps``).

    The tokenizer folder, if given, holds a tokenizer; the datasets cache is not a file; a streamed corpus comes
    with ``max_steps``; the corpus specs parse (`data.parse_corpus_spec`) and the training corpus is not ``none``.
    """
    from ..data.corpus import parse_corpus_spec
    from ..data.tokenization import has_tokenizer

    if args.tokenizer is not None:
        folder = check_folder("tokenizer", args.tokenizer, "tokenizer folder")
        if not has_tokenizer(folder):
            raise MissingFileError(f"tokenizer: {args.tokenizer!r} is not a tokenizer folder (no tokenizer files).")
    if args.cache_dir is not None and Path(args.cache_dir).expanduser().is_file():
        raise UsageError(f"cache_dir: {args.cache_dir!r} is a file; give a folder for the datasets cache.")
    if args.streaming and args.max_steps is None:
        raise UsageError("streaming: a streamed corpus has no known length; give --max-steps.")
    if parse_corpus_spec(args.dataset, "train", "dataset").kind == "none":
        raise UsageError("dataset: 'none' is not a training corpus.")
    parse_corpus_spec(args.holdout_english, "holdout_english", "holdout_english")
    parse_corpus_spec(args.holdout_code, "holdout_code", "holdout_code")


__all__ = [
    "DataArguments",
    "FinetuneArguments",
    "MODES",
    "ModelArguments",
    "RENAMED_FIELDS",
    "RENAMED_MODES",
    "SMALL_INITS",
    "OptimizationArguments",
    "RunArguments",
    "TrainArguments",
    "build_parser",
    "check_data_fields",
    "check_init_source",
    "check_model_shape",
    "check_small_start",
    "check_report_to",
    "check_run_fields",
    "current_names",
    "eval_routings",
    "parse_arguments",
    "schedulers",
    "with_default",
]
