"""The ablation's arguments: `AblationArguments` (each a flag), its presets (data files), and how they resolve
into the settings the plan is made from.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ...training.arguments import TrainArguments
from ...utils.arguments import DataclassArgumentParser, build_parser
from ...utils.errors import UsageError
from ..presets import ablation_preset, preset_names

# Values of each preset (presets/ablation/*.json and the shared presets/paper.json); every one can be changed by its
# flag (``--train-override`` for other training fields).
PRESETS: dict[str, dict[str, Any]] = {name: ablation_preset(name) for name in preset_names("ablation")}

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


# `TrainArguments` fields that are also flags of the ablation, unset by default: the preset gives their value.
PRESET_TRAIN_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "small_intermediate_size",
    "vocab_size",
    "block_size",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "mixed_precision",
    "dataset",
    "holdout_english",
    "holdout_code",
    "builtin_max_chars",
    "streaming",
    "eval_blocks",
)
# `TrainArguments` fields that are flags of the ablation with their training default, for every run.
SHARED_TRAIN_FIELDS = ("tokenizer", "seed", "overwrite_output_dir", "progress")


def _train_fields(names: Sequence[str], unset: bool) -> list[tuple[str, Any, Any]]:
    """`TrainArguments`' fields ``names`` (type, default and help), for the dataclass of the ablation's flags; with
    ``unset``, optional and None by default."""
    declared = {f.name: f for f in dataclasses.fields(TrainArguments)}
    types = typing.get_type_hints(TrainArguments)
    return [
        (name, types[name] | None, field(default=None, metadata=declared[name].metadata))
        if unset
        else (name, types[name], field(default=declared[name].default, metadata=declared[name].metadata))
        for name in names
    ]


TrainingFlags = dataclasses.make_dataclass(
    "TrainingFlags", _train_fields(PRESET_TRAIN_FIELDS, unset=True) + _train_fields(SHARED_TRAIN_FIELDS, unset=False)
)
TrainingFlags.__doc__ = "The ablation's flags that are `TrainArguments` fields, declared there."


@dataclass(kw_only=True)
class AblationArguments(TrainingFlags):
    """Arguments of the ablation (each is also a flag, ``--name-with-dashes``). Unset values come from the preset."""

    # The command's name and description in --help and errors (`build_parser`); unannotated, so not fields.
    prog = "duo-llm ablation"
    description = (
        "The paper's Fig. 8 ablations: Duo vs dense at equal FLOPs, scratch vs frozen-big. Flags shown with "
        "default None take the preset's value (the data files in duo_llm_hf/experiments/presets/)."
    )

    out: str = field(
        metadata={
            "flag": "output_dir",
            "aliases": ["--out"],
            "help": "Output folder: trained runs, evaluations, table and plots. (--out: the former spelling, "
            "still accepted.)",
        }
    )
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
    warmup_fraction: float | None = field(default=None, metadata={"help": "Warm-up share of each run's steps."})
    holdout_english_column: str | None = field(
        default=None, metadata={"help": "Text column of the English holdout (default: the training one)."}
    )
    holdout_code_column: str | None = field(
        default=None, metadata={"help": "Text column of the code holdout (default: the training one)."}
    )
    eval_seed: int = field(default=0, metadata={"help": "Seed of the random routes at evaluation."})
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
        metadata={
            "help": "Folder of local benchmark files: hellaswag_val.jsonl (or hellaswag/hellaswag_val.jsonl) and/or "
            "arc_easy/test.jsonl; implies --lm-eval-tasks local."
        },
    )
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "Score only the first N examples of each task (cpu preset: 2000)."}
    )
    lm_eval_batch_size: int | None = field(default=None, metadata={"help": "Batch size of the harness."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: the preset's)."})


def build_arg_parser(**kwargs) -> DataclassArgumentParser:
    """The command-line parser of `AblationArguments` (kwargs go to `argparse.ArgumentParser`)."""
    return build_parser(AblationArguments, **kwargs)


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
    """``"weight_decay=0.05,lr_scheduler=linear"`` -> training fields, parsed as `duo-llm train` parses its flags."""
    if not text:
        return {}
    types = _field_types()
    parser = DataclassArgumentParser(TrainArguments)
    overrides: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip().replace("-", "_"), raw.strip()
        if not sep or not key:
            raise UsageError(
                f"train_override: {item!r} is not KEY=VALUE; write e.g. weight_decay=0.05,warmup_steps=10."
            )
        if key not in types:
            raise UsageError(f"train_override: {key!r} is not a training argument (see training/train_duo.py --help).")
        if key in CONTROLLED_TRAIN_FIELDS:
            raise UsageError(
                f"train_override: {key!r} is set by the ablation for each run; use the ablation's own flags "
                "(--train-tokens, --train-p-big, --seed, --warmup-fraction, --holdout-*, --tokenizer)."
            )
        if raw.lower() == "none" and type(None) in typing.get_args(types[key]):
            overrides[key] = None
            continue
        try:
            (parsed,) = parser.parse(["--output_dir", "unused", f"--{key}", raw])
        except UsageError:
            raise UsageError(f"train_override: {key}={raw!r} does not fit the field's type {types[key]}.") from None
        overrides[key] = getattr(parsed, key)
    return overrides


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
        progress=args.progress,
    )
    if args.lm_eval_data is not None and args.lm_eval_tasks is None:
        settings["lm_eval_tasks"] = "local"  # giving the data implies using it
    return settings
