"""Stage 1 training with Accelerate: random routing from scratch, frozen-big, and the dense baseline.

The paper's stage 1 trains a Duo model from scratch while every token in every layer goes to the big or the
small FFN at random (p_big = 0.5). Two comparisons are trained by the same loop: *frozen-big* (start from a
trained dense Llama or OPT, or the big path of a Duo model, freeze it and train only the small FFNs; the
paper's Fig. 8c, and its Appendix A recipe in `finetuning`) and the *dense baseline* (a plain
`LlamaForCausalLM` whose FFN inner size matches the Duo model's FLOPs at the given p_big; Fig. 8a/b).

The pieces are public so that later scripts (the router trainer, the ablations, the study) reuse them:
`TrainArguments` / `build_arg_parser`, `build_model`, `build_optimizer`, `build_scheduler`,
`evaluate_perplexity`, the checkpoint helpers in `checkpointing`, and `train` itself, which
``training/train_duo.py`` and the ``duo-llm train`` command call; `ModelHooks` lets a recipe change the model
it trains and saves. The steps its loop shares with the router training's (the run's Accelerator, the optimizer
step, the running averages) are in `train_loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    SchedulerType,
    get_scheduler,
)

from ..data.corpus import (
    BUILTIN,
    HOLDOUTS,
    EpochSampler,
    corpus_content_hash,
    iter_texts,
    load_corpus,
    pack_corpus,
    parse_corpus_spec,
)
from ..data.tokenization import MIN_VOCAB_SIZE, check_tokenizer_fits, has_tokenizer, load_tokenizer, train_bpe_tokenizer
from ..models.configuration_duo_llama import DuoLlamaConfig
from ..models.configuration_duo_opt import DuoOPTConfig
from ..models.losses import token_losses
from ..models.modeling_duo import dense_config_fields
from ..models.modeling_duo_llama import DuoLlamaForCausalLM
from ..models.modeling_duo_opt import DuoOPTForCausalLM
from ..models.routes import BIG, CHOICE_CODES, RouteSampler
from ..utils.arguments import (
    HfArgumentParser,
    check_choices,
    check_float_fields,
    check_folder,
    check_integer_fields,
    check_output_dir,
)
from ..utils.errors import MissingFileError, UsageError
from ..utils.files import atomic_write_json
from ..utils.flops import dense_intermediate_size, flops_per_token
from ..utils.loading import is_duo_model, load_complete_model
from ..utils.processes import process_state
from ..utils.run_files import CONFIG_FILE, TRAIN_RESULTS_FILE, TRAINING_ARGS_FILE, files_hash, folder_weights_hash
from .checkpointing import (
    CHECKPOINTS_DIR,
    RouteSamplerState,
    TrainState,
    check_finite_loss,
    check_finite_weights,
    restore_train_state,
    save_checkpoint_if_due,
)
from .loop import (
    StepMeter,
    accelerated_run,
    backward_and_step,
    run_fingerprint,
    run_identity,
    start_or_resume,
    tracker_config,
)

logger = logging.getLogger(__name__)

MODES = ("random", "frozen-big", "dense")
EVAL_ROUTES = ("random", "big", "small", "skip")
SCHEDULERS = [kind.value for kind in SchedulerType]  # what --lr-scheduler may name (transformers' get_scheduler)
SMALL_MODULE_KEY = ".mlp.small."
# frozen-big sources by model_type: the Duo class each becomes (a Duo source gives its big path, to_dense()).
FROZEN_BIG_SOURCES = {
    "llama": DuoLlamaForCausalLM,
    DuoLlamaConfig.model_type: DuoLlamaForCausalLM,
    "opt": DuoOPTForCausalLM,
    DuoOPTConfig.model_type: DuoOPTForCausalLM,
}
# A Hub model id, "name" or "org/name" (what `from_pretrained` downloads when no such local folder exists).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Arguments that may change when a run (stage 1, or the routers') is resumed: they do not change what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume_from",
        "report_to",
        "run_name",
        "progress",
        "log_every",
        "eval_every",
        "eval_blocks",
        "eval_batch_size",
        "eval_routes",
        "checkpoint_every",
        "checkpoints_to_keep",
        "cache_dir",
        "overwrite_output_dir",
    }
)
# A resumed run may run longer: the steps already done computed the same (README, "Resume, fingerprint, extend").
EXTENDABLE = frozenset({"max_steps", "num_epochs"})
# Paths that go into a run's fingerprint by their content (`content_fingerprint`), not by their name.
CONTENT_PATHS = frozenset({"dataset", "holdout_english", "holdout_code", "init_from", "tokenizer", "model"})
# A tokenizer's files (in a tokenizer or model folder), whose bytes define it.
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece")


@dataclass
class TrainArguments:
    """Arguments of a stage 1 training run (each is also a command-line flag, ``--name-with-dashes``)."""

    output_dir: str = field(metadata={"help": "Folder for the final model, tokenizer, checkpoints and logs."})
    mode: Literal["random", "frozen-big", "dense"] = field(
        default="random",
        metadata={
            "help": "random: a Duo model from scratch with random routing (stage 1). frozen-big: start from "
            "--init-from, freeze it, train only the small FFNs. dense: a LlamaForCausalLM whose FFN inner "
            "size matches the Duo model's FLOPs at --p-big."
        },
    )
    # Data
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
    # Tokenizer
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Existing tokenizer folder. Default: train a byte-level BPE on the training corpus "
            "(frozen-big: the tokenizer in --init-from)."
        },
    )
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of a trained tokenizer."})
    tokenizer_train_chars: int = field(
        default=50_000_000,
        metadata={"help": "Characters of the training corpus the tokenizer is trained on."},
    )
    # Model
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
        default=0.5, metadata={"help": "Probability of the big FFN (dense: FLOP-matched at it)."}
    )
    p_skip: float = field(
        default=0.0, metadata={"help": "Probability of skipping the FFN; small gets the rest."}
    )
    route_seed: int | None = field(
        default=None, metadata={"help": "Seed of the random routes (default: --seed)."}
    )
    # Optimisation
    batch_size: int = field(default=16, metadata={"help": "Blocks per micro-batch and process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "transformers scheduler name, after warm-up."}
    )
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    fused_optimizer: bool = field(
        default=True, metadata={"help": "Use torch's fused AdamW kernel where it runs (CPU, CUDA)."}
    )
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (default: --num-epochs)."})
    num_epochs: int = field(
        default=1, metadata={"help": "Epochs over the training blocks, when no --max-steps."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no, fp16 or bf16 (default: the accelerate config's, else no)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of weights, data order and (by default) routes."})
    # Evaluation, logging, checkpoints
    eval_every: int = field(
        default=200, metadata={"help": "Evaluate held-out perplexity every N steps (0: end)."}
    )
    eval_blocks: int = field(default=64, metadata={"help": "Blocks of each holdout set to evaluate."})
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Eval batch size (default --batch-size)."}
    )
    eval_routes: str = field(
        default="random,big,small",
        metadata={"help": "Duo routes to evaluate, comma-separated: random (fixed seed), big, small, skip."},
    )
    log_every: int = field(default=10, metadata={"help": "Log training metrics every N steps."})
    report_to: str = field(
        default="auto",
        metadata={"help": "Trackers: auto (jsonl + tensorboard if installed), jsonl, none, ..."},
    )
    run_name: str = field(default="train_duo", metadata={"help": "Run name for the trackers."})
    checkpoint_every: int = field(
        default=500, metadata={"help": "Save a checkpoint every N steps (0: never)."}
    )
    checkpoints_to_keep: int | None = field(
        default=2, metadata={"help": "Keep only the newest N checkpoints."}
    )
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to resume from, or 'latest' (newest in output_dir)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds a finished run or an earlier run's checkpoints "
            "(replaces the finished model; the earlier checkpoints are kept). Without it that is refused."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

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
        if self.mode not in MODES:
            raise UsageError(f"mode: {self.mode!r} is not a training mode; use one of {list(MODES)}.")
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
        routes = check_choices(self, "eval_routes", EVAL_ROUTES)
        if "skip" in routes and self.p_skip == 0:
            raise UsageError(
                "eval_routes: 'skip' needs a model that allows skipping (train with --p-skip > 0)."
            )
        if self.mode == "frozen-big" and not self.init_from:
            raise UsageError(
                "mode 'frozen-big' needs --init-from: a dense Llama folder or a Duo model folder."
            )
        if self.mode != "frozen-big" and self.init_from:
            raise UsageError(f"--init-from is for mode 'frozen-big' only (this run's mode is {self.mode!r}).")
        if self.init_from and not (Path(self.init_from).expanduser().is_dir() or is_hub_id(self.init_from)):
            raise MissingFileError(
                f"init_from: {self.init_from!r} is not a model folder (written by save_pretrained) nor a Hub "
                "model name."
            )
        if self.mode == "frozen-big":
            inspect_init_source(self.init_from, self.block_size)  # its config only: a supported model, long enough
        local_source = self.init_from and not is_hub_id(self.init_from)
        if local_source and self.tokenizer is None and not has_tokenizer(Path(self.init_from).expanduser()):
            raise MissingFileError(
                f"init_from {self.init_from!r} holds no tokenizer; pass --tokenizer with the tokenizer that "
                "model was trained with (a new one would not match its embeddings)."
            )
        positions = self.max_position_embeddings
        if positions is not None and self.block_size > positions:
            raise UsageError(
                f"block_size {self.block_size} is longer than max_position_embeddings {positions}; use a "
                "block size <= the model's positions."
            )
        check_run_fields(self)
        check_data_fields(self)

    def eval_route_list(self) -> list[str]:
        return [r.strip() for r in self.eval_routes.split(",") if r.strip()]

    def route_probs(self) -> dict[str, float]:
        """Random-routing probabilities: big = p_big, skip = p_skip, small = the rest."""
        probs = {"small": max(0.0, 1.0 - self.p_big - self.p_skip), "big": self.p_big}
        if self.p_skip > 0:
            probs["skip"] = self.p_skip
        return probs


def check_model_shape(args) -> None:
    """The from-scratch model's shape fits together: heads divide the hidden size, key/value heads the heads, the
    small FFN is not larger than the big one. ``args`` has `TrainArguments`' model fields."""
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
    """Check the optimisation and naming fields every training run has (`TrainArguments`' and the router
    training's): learning rate, weight decay, betas, clipping, the scheduler, and non-empty names."""
    check_float_fields(
        args,
        positive=("learning_rate",),
        non_negative=("weight_decay", "max_grad_norm"),
        fractions=("adam_beta1", "adam_beta2"),
    )
    if args.lr_scheduler not in SCHEDULERS:
        raise UsageError(f"lr_scheduler: {args.lr_scheduler!r} is not a scheduler; use one of {SCHEDULERS}.")
    for name in ("run_name", "report_to", "text_column"):
        if not getattr(args, name).strip():
            raise UsageError(f"{name}: {getattr(args, name)!r} is empty; give a name (see --help).")


def check_data_fields(args) -> None:
    """Check the data fields every training run has (`TrainArguments`' and the router training's).

    The tokenizer folder, if given, holds a tokenizer; the datasets cache is not a file; a streamed corpus comes
    with ``max_steps``; the corpus specs parse (`data.parse_corpus_spec`) and the training corpus is not ``none``.
    """
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


@dataclass
class TrainResult:
    """What a run did: final step and tokens, the loss of each optimizer step it ran, the last evaluation."""

    output_dir: str
    global_step: int
    tokens_seen: int
    losses: dict[int, float]
    eval_metrics: dict[str, float]


@dataclass
class ModelHooks:
    """What a recipe built on `train` changes about its model (LoRA finetuning uses both hooks).

    ``adapt(model)`` gets the built model (frozen as the mode says) before the optimizer is made and returns the
    model to train; whatever then requires grad is trained, and checkpoints hold that model. ``export(model)``
    gets the trained model (unwrapped from DDP) before the final ``save_pretrained`` and returns the model to
    save. A hook that is None changes nothing.
    """

    adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    export: Callable[[torch.nn.Module], torch.nn.Module] | None = None


def build_arg_parser(**kwargs) -> HfArgumentParser:
    """The command-line parser of `TrainArguments` (``--flag-name`` and ``--flag_name`` both work).

    ``kwargs`` go to `argparse.ArgumentParser` (e.g. ``add_help=False`` to use it as a parent parser).
    """
    kwargs.setdefault("prog", "duo-llm train")
    kwargs.setdefault(
        "description", "Stage 1 training of a Duo-LLM model (or its dense baseline) with Accelerate."
    )
    return HfArgumentParser(TrainArguments, **kwargs)


def parse_train_args(argv: list[str] | None = None) -> TrainArguments:
    """Parse command-line arguments into `TrainArguments` (a parse error is a `UsageError`)."""
    (args,) = build_arg_parser().parse(argv)
    return args


# ----------------------------------------------------------------------------------------------------
# Models


def duo_config_from_args(args: TrainArguments, vocab_size: int, **overrides) -> DuoLlamaConfig:
    """The Duo model of a from-scratch run (also the FLOP reference of the dense baseline).

    ``overrides`` are further config fields (the tokenizer's special token ids).
    """
    intermediate = args.intermediate_size or 4 * args.hidden_size
    options = ["small", "big"] + (["skip"] if args.p_skip > 0 else [])
    return DuoLlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=intermediate,
        small_intermediate_size=args.small_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads or args.num_heads,
        max_position_embeddings=args.max_position_embeddings or args.block_size,
        route_options=options,
        routing_mode="random",
        route_probs=args.route_probs(),
        route_seed=args.seed if args.route_seed is None else args.route_seed,
        **overrides,
    )


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The tokenizer's BOS / EOS / padding ids, as config fields (used by ``generate``)."""
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}


def dense_config_like(config: DuoLlamaConfig, intermediate_size: int) -> LlamaConfig:
    """A `LlamaConfig` with a Duo config's dimensions and the given FFN inner size."""
    return LlamaConfig(**{**dense_config_fields(config), "intermediate_size": intermediate_size})


def dense_baseline_config(config: DuoLlamaConfig) -> LlamaConfig:
    """The dense baseline of a Duo config: FFN inner size matching the Duo FFN's FLOPs at route_probs."""
    return dense_config_like(config, dense_intermediate_size(config, config.route_probs))


def is_hub_id(name: str | Path) -> bool:
    """Whether ``name`` is a Hub model id ("name" or "org/name") and no local folder of that name exists."""
    return not Path(name).expanduser().exists() and bool(_HUB_ID.match(str(name)))


def inspect_init_source(path: str | Path, block_size: int):
    """Read a frozen-big source's config (no weights); check it is a supported model and long enough.

    ``path`` is a local folder or a Hub name (whose config is downloaded, or read from the Hub cache).
    """
    folder = Path(path).expanduser()
    if not is_hub_id(path) and not (folder / CONFIG_FILE).is_file():
        raise MissingFileError(
            f"init_from: {str(path)!r} has no config.json; give a folder written by save_pretrained."
        )
    try:
        config = AutoConfig.from_pretrained(str(path) if is_hub_id(path) else folder)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"init_from: {str(path)!r} has a config that cannot be read ({err}).") from err
    if config.model_type not in FROZEN_BIG_SOURCES:
        raise UsageError(
            f"init_from: {str(path)!r} is a {config.model_type!r} model; frozen-big needs a Llama-shaped model or "
            f"an OPT model (model_type one of {sorted(FROZEN_BIG_SOURCES)})."
        )
    if block_size > config.max_position_embeddings:
        raise UsageError(
            f"block_size {block_size} is longer than the max_position_embeddings "
            f"{config.max_position_embeddings} "
            f"of init_from {str(path)!r}; use --block-size <= {config.max_position_embeddings}."
        )
    return config


def build_model(args: TrainArguments, tokenizer) -> torch.nn.Module:
    """The model of a run: a random-routing Duo model, a frozen-big Duo model, or the dense baseline.

    From scratch, the vocabulary is the tokenizer's and the config takes its special token ids.
    """
    if args.mode in ("dense", "random"):
        config = duo_config_from_args(args, len(tokenizer), **special_token_ids(tokenizer))
        if args.mode == "dense":
            return LlamaForCausalLM(dense_baseline_config(config))
        return DuoLlamaForCausalLM(config)
    duo_class = FROZEN_BIG_SOURCES[AutoConfig.from_pretrained(args.init_from).model_type]
    dense = load_complete_model(args.init_from, torch.float32, "--init-from")
    if is_duo_model(dense):  # a Duo model: its big path, with fresh small modules below
        dense = dense.to_dense()
    options = ["small", "big"] + (["skip"] if args.p_skip > 0 else [])
    model = duo_class.from_dense(
        dense,
        small_intermediate_size=args.small_intermediate_size,
        route_options=options,
        routing_mode="random",
        route_probs=args.route_probs(),
        route_seed=args.seed if args.route_seed is None else args.route_seed,
    )
    freeze_all_but_small(model)
    return model


def freeze_all_but_small(model: torch.nn.Module) -> int:
    """Freeze every parameter except the small FFNs; return the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(SMALL_MODULE_KEY in name)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def may_leave_a_module_unused(args: TrainArguments, chance: float = 1e-9) -> bool:
    """Whether a step may route no token of a micro-batch to the small or the big FFN of a layer.

    DDP must then search for unused parameters (``find_unused_parameters``), which costs a graph traversal
    per step, so it is only switched on where needed: a probability of 0, or tiny batches.
    """
    if args.mode == "dense":
        return False
    tokens = args.batch_size * args.block_size
    probs = args.route_probs()
    return any((1.0 - probs[choice]) ** tokens > chance for choice in ("small", "big"))


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not norms, not biases).

    With ``args.fused_optimizer``, torch's fused AdamW is used where it runs (floating-point parameters on CPU
    or CUDA): on CPU its single kernel takes about a third of the time of the default per-parameter loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = args.fused_optimizer and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=fused or None,
    )


def build_scheduler(optimizer, args: TrainArguments, total_steps: int, num_processes: int = 1):
    """Warm-up then ``args.lr_scheduler``.

    Accelerate steps a prepared scheduler once per process per optimizer step, so the step counts are scaled
    by the number of processes (as in accelerate's examples).
    """
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def training_step(
    accelerator: Accelerator, model, batch: dict, optimizer, scheduler, trainable: list, max_grad_norm: float
) -> torch.Tensor:
    """One micro-batch: causal LM loss, backward, and (when Accelerate syncs) clip + optimizer + scheduler.

    Call it inside ``accelerator.accumulate(model)``; returns the (un-scaled) loss.
    """
    ids = batch["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    backward_and_step(accelerator, loss, optimizer, scheduler, trainable, max_grad_norm)
    return loss


# ----------------------------------------------------------------------------------------------------
# Evaluation


def eval_route_kwargs(model, mode: str, input_ids: torch.Tensor, sampler: RouteSampler | None) -> dict:
    """Keyword arguments that make a Duo model follow ``mode`` (random / big / small / skip) on a batch."""
    if mode == "dense":
        return {}
    shape = (*input_ids.shape, model.config.num_hidden_layers)
    if mode == "random":
        return {"routes": sampler.sample(shape, input_ids.device)}
    return {"routes": torch.full(shape, CHOICE_CODES[mode], dtype=torch.long, device=input_ids.device)}


@torch.no_grad()
def evaluate_perplexity(
    model,
    loaders: dict[str, DataLoader],
    accelerator: Accelerator,
    route_modes: list[str],
    route_seed: int = 0,
) -> dict[str, float]:
    """Held-out loss and perplexity of each eval set under each route mode (``dense`` for a dense model).

    Random routes come from a fresh sampler seeded with ``route_seed`` at every call, so evaluations along a
    run see the same routes and are comparable. Keys: ``eval/<set>/<mode>/loss`` and ``.../ppl``.
    """
    unwrapped = accelerator.unwrap_model(model)
    is_duo = is_duo_model(unwrapped)
    modes = route_modes if is_duo else ["dense"]
    was_training = model.training
    model.eval()
    metrics = {}
    for set_name, loader in loaders.items():
        for mode in modes:
            sampler = RouteSampler(unwrapped.config.route_probs, route_seed) if mode == "random" else None
            total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for batch in loader:
                ids = batch["input_ids"]
                logits = model(input_ids=ids, **eval_route_kwargs(unwrapped, mode, ids, sampler)).logits
                losses, mask = token_losses(logits, ids)
                sums, counts = accelerator.gather_for_metrics(
                    (losses.sum(-1).double(), mask.sum(-1).double())
                )
                total += sums.sum()
                count += counts.sum()
            loss = (total / count.clamp_min(1)).item()
            metrics[f"eval/{set_name}/{mode}/loss"] = loss
            metrics[f"eval/{set_name}/{mode}/ppl"] = math.exp(min(loss, 50.0))
    model.train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The run


def load_corpora(args) -> tuple[datasets.Dataset | datasets.IterableDataset, dict]:
    """The training corpus and the holdout corpora (``{"english": ..., "code": ...}``, without ``none`` ones).

    ``args`` needs the corpus fields of `TrainArguments` (``dataset``, ``holdout_english``, ``holdout_code``,
    ``text_column``, ``sample_by``, ``builtin_max_chars``, ``cache_dir``, ``streaming``).
    """
    corpus_kwargs = {
        "text_column": args.text_column,
        "sample_by": args.sample_by,
        "builtin_max_chars": args.builtin_max_chars,
        "cache_dir": args.cache_dir,
    }
    train_texts = load_corpus(args.dataset, "train", streaming=args.streaming, **corpus_kwargs)
    holdout_texts = {}
    for name in HOLDOUTS:
        spec = getattr(args, f"holdout_{name}")
        # With --streaming the holdouts stream too: only their first --eval-blocks blocks are read.
        texts = load_corpus(spec, f"holdout_{name}", streaming=args.streaming, **corpus_kwargs)
        if texts is not None:
            holdout_texts[name] = texts
    return train_texts, holdout_texts


def make_eval_loaders(holdout_texts: dict, tokenizer, args) -> dict[str, DataLoader]:
    """One loader per holdout corpus: its first ``args.eval_blocks`` blocks of ``args.block_size`` tokens."""
    loaders = {}
    for name, texts in holdout_texts.items():
        blocks = pack_corpus(texts, tokenizer, args.block_size, f"holdout_{name}", max_blocks=args.eval_blocks)
        if isinstance(blocks, datasets.IterableDataset):  # held in memory, the same blocks at every evaluation
            ids = [row["input_ids"].tolist() for row in blocks]
            blocks = datasets.Dataset.from_dict({"input_ids": ids}).with_format("torch")
        loaders[name] = DataLoader(blocks, batch_size=args.eval_batch_size or args.batch_size)
    return loaders


def total_training_steps(args, train_loader: DataLoader, num_processes: int = 1) -> int:
    """Optimizer steps of a run: ``args.max_steps``, else ``args.num_epochs`` epochs of the (unprepared) loader.

    Raises when a map-style corpus gives fewer batches than there are processes.
    """
    if not args.streaming and len(train_loader) < num_processes:
        raise UsageError(
            f"dataset {args.dataset!r} has {len(train_loader.dataset)} blocks, fewer than one batch of "
            f"{args.batch_size} x {num_processes} processes; lower --batch-size or add data."
        )
    if args.max_steps is not None:
        return args.max_steps
    batches = len(train_loader) // num_processes
    return args.num_epochs * math.ceil(batches / args.gradient_accumulation_steps)


def training_batches(
    train_loader, accelerator: Accelerator, state: TrainState, total_steps: int, args
) -> Iterator[dict]:
    """The micro-batches of a run, epoch after epoch, from where ``state`` says the run is.

    ``state.epoch`` and ``state.batches_in_epoch`` advance as batches are taken (a batch counts as used once
    it is yielded), so a checkpoint of ``state`` resumes with the next batch. Nothing is yielded when
    ``state.global_step`` (counted by the caller) has reached ``total_steps``; the caller stops the loop after
    its last step. An epoch that gives no batch at all raises (``args.dataset`` and ``args.batch_size`` name it).
    """
    while state.global_step < total_steps:
        train_loader.set_epoch(state.epoch)
        fresh_epoch = state.batches_in_epoch == 0
        batches = (
            accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else train_loader
        )
        for batch in batches:
            state.batches_in_epoch += 1
            yield batch
        if fresh_epoch and state.batches_in_epoch == 0:
            raise UsageError(f"dataset {args.dataset!r} gave no batch of {args.batch_size} blocks.")
        state.epoch += 1
        state.batches_in_epoch = 0


def _prepare_tokenizer(args: TrainArguments, accelerator: Accelerator, train_texts):
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    if args.mode == "frozen-big" and is_hub_id(args.init_from):
        with accelerator.main_process_first():  # one download, then the Hub cache
            return AutoTokenizer.from_pretrained(args.init_from)
    if args.mode == "frozen-big":
        if not has_tokenizer(args.init_from):
            raise MissingFileError(
                f"init_from {args.init_from!r} holds no tokenizer; pass --tokenizer with the tokenizer that "
                "model was trained with (a new one would not match its embeddings)."
            )
        return load_tokenizer(args.init_from)
    folder = Path(args.output_dir) / "tokenizer"
    # The main process trains and saves the tokenizer first; the others (and a resumed run) load it.
    with accelerator.main_process_first():
        if has_tokenizer(folder):
            tokenizer = load_tokenizer(folder)
            if len(tokenizer) > args.vocab_size:
                raise UsageError(
                    f"{folder} holds a tokenizer of {len(tokenizer)} tokens from an earlier run, more than "
                    f"--vocab-size {args.vocab_size}; use a new --output-dir or pass --tokenizer {folder}."
                )
            logger.info("Using the tokenizer in %s", folder)
        else:
            logger.info(
                "Training a byte-level BPE tokenizer (vocab_size %d) on %s", args.vocab_size, args.dataset
            )
            tokenizer = train_bpe_tokenizer(
                iter_texts(train_texts, args.tokenizer_train_chars), args.vocab_size
            )
            if accelerator.is_main_process:
                tokenizer.save_pretrained(folder)
    return tokenizer


def tokenizer_hash(folder: str | Path | None) -> str | None:
    """SHA-256 of a folder's tokenizer files (None for no folder, the name for a Hub model id)."""
    if folder is None or is_hub_id(folder):
        return None if folder is None else str(folder)
    folder = Path(folder).expanduser()
    files = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(TOKENIZER_FILE_PREFIXES)]
    return f"sha256:{files_hash(files)}" if files else None


def model_folder_hash(path: str | Path | None) -> str | None:
    """The content of a model folder: its weights' SHA-256 (`run_files.folder_weights_hash`); a Hub id as it is."""
    if path is None or is_hub_id(path):
        return None if path is None else str(path)
    return f"sha256:{folder_weights_hash(Path(path).expanduser())}"


def content_fingerprint(args, accelerator: Accelerator) -> dict:
    """What a run's paths hold, and the settings Accelerate resolves, for its fingerprint (`run_fingerprint`).

    The corpora's contents (`data.corpus_content_hash`), the weights of the model it starts from (``init_from`` or
    ``model``), the tokenizer's files, the resolved mixed precision and the number of processes.
    """
    content = {
        "dataset": corpus_content_hash(args.dataset),
        "holdout_english": corpus_content_hash(args.holdout_english, "holdout_english", "holdout_english"),
        "holdout_code": corpus_content_hash(args.holdout_code, "holdout_code", "holdout_code"),
        "tokenizer": tokenizer_hash(args.tokenizer),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
    }
    for name in ("init_from", "model"):
        if hasattr(args, name):
            content[name] = model_folder_hash(getattr(args, name))
            content[f"{name}_tokenizer"] = tokenizer_hash(getattr(args, name))
    return content


def training_fingerprint(args, accelerator: Accelerator) -> dict:
    """Every setting that changes what a run (stage 1, or the routers') computes, with its paths by content.

    Left out: what may change on resume (`RESUMABLE_CHANGES`, and the run's length, `EXTENDABLE`).
    """
    excluded = RESUMABLE_CHANGES | EXTENDABLE | CONTENT_PATHS
    return run_fingerprint(args, excluded, **content_fingerprint(args, accelerator))


def make_train_loader(blocks, args) -> DataLoader:
    """The training loader: a seeded order per epoch (`EpochSampler`), or a shuffle buffer when streamed.

    ``args`` needs ``batch_size``, ``seed`` and ``shuffle_buffer``.
    """
    # Each new iterator of a DataLoader draws a seed from its generator; with the global one, a resumed run
    # would draw it after restoring the RNG state and so shift the dropout masks (OPT has dropout) that the
    # uninterrupted run saw. A generator of its own keeps resumed runs exact.
    generator = torch.Generator().manual_seed(args.seed)
    if hasattr(blocks, "__len__"):
        sampler = EpochSampler(len(blocks), seed=args.seed)
        return DataLoader(blocks, batch_size=args.batch_size, sampler=sampler, drop_last=True, generator=generator)
    shuffled = blocks.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    return DataLoader(shuffled, batch_size=args.batch_size, drop_last=True, generator=generator)


def train(
    args: TrainArguments,
    step_callback: Callable[[TrainState, dict], None] | None = None,
    hooks: ModelHooks | None = None,
) -> TrainResult:
    """Run stage 1 training (or a frozen-big / dense baseline run) as ``args`` say; see `TrainArguments`.

    Every check on the inputs runs before any training time is spent. ``step_callback(state, metrics)`` is
    called after each optimizer step (and its logging, evaluation and checkpoint) on every process. ``hooks``
    let a recipe change the model to train and the model to save (`ModelHooks`; e.g. `finetuning` adds LoRA).
    """
    args.validate()
    checkpoints_dir = Path(args.output_dir) / CHECKPOINTS_DIR
    resume_dir = start_or_resume(args)
    source_config = inspect_init_source(args.init_from, args.block_size) if args.mode == "frozen-big" else None

    ddp = DistributedDataParallelKwargs(find_unused_parameters=may_leave_a_module_unused(args))
    with accelerated_run(args, resume_dir, kwargs_handlers=[ddp]) as accelerator:
        return _train(
            args, accelerator, resume_dir, checkpoints_dir, step_callback, source_config, hooks or ModelHooks()
        )


def _train(args, accelerator, resume_dir, checkpoints_dir, step_callback, source_config, hooks) -> TrainResult:
    run = run_identity(resume_dir, training_fingerprint(args, accelerator))
    set_seed(args.seed)

    # Corpora, then the tokenizer, then blocks: each step checks its input before the next costs anything.
    train_texts, holdout_texts = load_corpora(args)
    tokenizer = _prepare_tokenizer(args, accelerator, train_texts)
    if source_config is not None:
        check_tokenizer_fits(tokenizer, source_config.vocab_size, f"init_from {args.init_from!r}")
    vocab_size = len(tokenizer)

    train_blocks = pack_corpus(train_texts, tokenizer, args.block_size, f"dataset {args.dataset!r}")
    eval_loaders = make_eval_loaders(holdout_texts, tokenizer, args)

    set_seed(args.seed)  # the weights depend on the seed only, not on what the data steps drew
    model = build_model(args, tokenizer)
    if args.gradient_checkpointing:
        # transformers v5 deprecates gradient_checkpointing_enable for activation_checkpointing_enable.
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    if hooks.adapt is not None:
        model = hooks.adapt(model)
    is_duo = is_duo_model(model)
    if is_duo and accelerator.num_processes > 1:
        # Each process draws its own routes (same config seed, offset by the process index).
        config = model.config
        model.model.route_sampler = RouteSampler(
            config.route_probs, config.route_seed + accelerator.process_index
        )

    train_loader = make_train_loader(train_blocks, args)
    optimizer = build_optimizer(model, args)
    total_steps = total_training_steps(args, train_loader, accelerator.num_processes)
    scheduler = build_scheduler(optimizer, args, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}

    unwrapped = accelerator.unwrap_model(model)
    # Each process's random routes are part of the run's state: a resumed run draws the routes it would have drawn.
    samplers = {}
    if is_duo:
        samplers["route_samplers"] = RouteSamplerState(lambda: unwrapped.model.route_sampler, accelerator)
    state = restore_train_state(accelerator, resume_dir, samplers)

    unwrapped_config = unwrapped.config
    flops = flops_per_token(unwrapped_config, None if is_duo else {BIG: 1.0}, seq_len=args.block_size)
    accelerator.init_trackers(
        args.run_name,
        config=tracker_config(
            args,
            {
                "vocab_size_model": vocab_size,
                "total_steps": total_steps,
                "forward_flops_per_token": flops.total,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            },
        ),
    )
    route_modes = args.eval_route_list()
    eval_seed = unwrapped_config.route_seed if is_duo else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: dict[int, float] = {}
    eval_metrics: dict[str, float] = {}

    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        desc="train",
        disable=not (args.progress and accelerator.is_local_main_process),
    )
    meter = StepMeter(accelerator, ["train/loss"], args.batch_size * args.block_size * accelerator.num_processes)
    model.train()
    for batch in training_batches(train_loader, accelerator, state, total_steps, args):
        with accelerator.accumulate(model):
            loss = training_step(
                accelerator, model, batch, optimizer, scheduler, trainable, args.max_grad_norm
            )
        meter.add(loss)
        if not accelerator.sync_gradients:
            continue

        step_loss = meter.step(state)["train/loss"]
        check_finite_loss(step_loss, state.global_step, checkpoints_dir)
        losses[state.global_step] = step_loss
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{meter.tokens_per_second():,.0f}")

        metrics: dict[str, float] = {}
        last = state.global_step >= total_steps
        if state.global_step % args.log_every == 0 or last:
            metrics.update(meter.log_metrics(state, scheduler))
        if eval_loaders and ((args.eval_every and state.global_step % args.eval_every == 0) or last):
            eval_metrics = evaluate_perplexity(model, eval_loaders, accelerator, route_modes, eval_seed)
            metrics.update(eval_metrics)
            meter.restart_clock()  # evaluation time is not training throughput
        if metrics:
            accelerator.log(metrics, step=state.global_step)
        if save_checkpoint_if_due(accelerator, checkpoints_dir, state, args, run, samplers, trainable):
            meter.restart_clock()
        if step_callback is not None:
            step_callback(state, {"train/step_loss": step_loss, **metrics})
        if last:
            break
    progress.close()

    save_final(args, accelerator, model, tokenizer, state, eval_metrics, hooks.export, run["run_id"])
    return TrainResult(str(Path(args.output_dir)), state.global_step, state.tokens_seen, losses, eval_metrics)


def save_final(
    args, accelerator, model, tokenizer, state: TrainState, eval_metrics: dict, export=None, run_id: str | None = None
) -> None:
    """``save_pretrained`` the model (``export(model)`` if given) and tokenizer into ``output_dir``, plus the
    arguments and metrics (with the run's id); never a model whose trained weights are not finite
    (`TrainingDiverged`)."""
    output_dir = Path(args.output_dir)
    trained = [p for p in model.parameters() if p.requires_grad]
    check_finite_weights(accelerator, trained, state.global_step, output_dir / CHECKPOINTS_DIR)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if export is None:
        state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards
    else:  # the exported model is a plain module (export hooks do not run under FSDP)
        unwrapped = export(unwrapped)
        state_dict = unwrapped.state_dict()
    unwrapped.save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        atomic_write_json(output_dir / TRAINING_ARGS_FILE, dataclasses.asdict(args), newline=False)
        results = {"global_step": state.global_step, "tokens_seen": state.tokens_seen, "run_id": run_id, **eval_metrics}
        atomic_write_json(output_dir / TRAIN_RESULTS_FILE, results, newline=False)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> TrainResult:
    """``training/train_duo.py`` (and ``duo-llm train``): parse the flags, train, print where the model went."""
    result = train(parse_train_args(argv))
    if process_state().is_main_process:
        steps, tokens = result.global_step, result.tokens_seen
        print(f"Saved the model to {result.output_dir} after {steps} steps ({tokens:,} tokens).")
    return result
