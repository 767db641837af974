"""The arguments of the router training (stage 3), and what they resolve to: the routers' options and targets.

`RouterTrainArguments` composes stage 1's run, data and optimisation groups (`arguments`), with the defaults of a
few small linear layers (`with_default`), and the router fields (`RouterArguments`). The route options and the
target usage (the fraction of the (token, layer) pairs each choice should take) come from ``setting`` (one of
`router_settings.ROUTER_SETTINGS`) or from ``route_options`` and ``target_usage``; `resolve_router_targets` resolves
them against the model (`RouterTargets`), `oracle_layer_budget` gives the oracle's exact budget (whole layers per
pattern) under oracle supervision; `target_usage_flag` writes targets back as a ``--target-usage`` value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field, fields
from typing import TYPE_CHECKING, Literal

from ..utils.arguments import check_folder, check_integer_fields, check_output_dir, user_values
from ..utils.errors import UsageError
from .arguments import (
    DataArguments,
    OptimizationArguments,
    RunArguments,
    check_data_fields,
    check_run_fields,
    renamed_keyword,
    with_default,
)
from .router_settings import ROUTER_SETTINGS

if TYPE_CHECKING:
    from ..models.routed_ffn import TemperatureSchedule

# The model code (torch, transformers) is imported where it is used, so that `--help` answers at once; the schedule
# kinds are spelled out as a `Literal`, which a test holds equal to `routed_ffn.SCHEDULE_KINDS`.
ScheduleKind = Literal["constant", "linear", "exponential", "cosine"]
DEFAULT_BLOCK_SIZE = 256
SUPERVISIONS = ("conventional", "oracle")
ORACLE_FIELDS = (
    "oracle_targets",
    "oracle_blocks",
    "oracle_batch_size",
    "oracle_budget",
    "oracle_causal",
    "oracle_chunk_tokens",
    "oracle_calibration_blocks",
    "oracle_label_smoothing",
)


@dataclass(kw_only=True)
class RouterArguments:
    """The routers, their loss and, under oracle supervision, the oracle's targets."""

    model: str = field(metadata={"help": "Folder of a stage 1 Duo model (DuoLlama or DuoOPT, save_pretrained)."})
    setting: str | None = field(
        default=None,
        metadata={
            "help": "One of the paper's router settings: sets the route options and the target usage (then "
            "leave out --route-options and --target-usage).",
            "choices": sorted(ROUTER_SETTINGS),
        },
    )
    route_options: str | None = field(
        default=None,
        metadata={"help": "Choices the routers pick from, comma-separated (default: the model's route_options)."},
    )
    target_usage: str | None = field(
        default=None,
        metadata={
            "help": "Target usage: the fraction of the (token, layer) pairs on BIG (e.g. 0.3), or a fraction per "
            "choice (e.g. small=0.3,big=0.5,skip=0.2).",
            "deprecated_aliases": ["budget"],
        },
    )
    budget: InitVar[str | None] = None  # the 0.1 name of target_usage, as a Python keyword
    alpha: float = field(
        default=1.0, metadata={"help": "Weight of the usage loss (the paper's budget loss): loss = CE + alpha * usage."}
    )
    temperature_start: float = field(default=1.0, metadata={"help": "Router temperature tau at step 0."})
    temperature_end: float = field(default=0.1, metadata={"help": "Router temperature at the end of annealing."})
    temperature_schedule: ScheduleKind = field(
        default="exponential", metadata={"help": "How tau goes from start to end."}
    )
    temperature_steps: int | None = field(
        default=None, metadata={"help": "Steps over which tau anneals (default: the whole run)."}
    )
    router_seed: int | None = field(default=None, metadata={"help": "Seed of the router weights (default: --seed)."})
    supervision: Literal["conventional", "oracle"] = field(
        default="conventional",
        metadata={
            "help": "conventional: the paper's router, trained by the LM loss through the soft mixture (plus "
            "alpha * usage loss). oracle (beyond the paper): a router distilled from the oracle: the oracle is run "
            "once over --oracle-blocks training blocks (or read from --oracle-targets) and each layer's router "
            "learns the oracle's choice in that layer (cross-entropy, on the FFN inputs of the oracle's route), "
            "plus alpha * usage loss."
        },
    )
    oracle_targets: str | None = field(
        default=None,
        metadata={
            "help": "supervision oracle: an oracle result folder over training blocks (duo-llm oracle, or the "
            "oracle_targets/ folder of an earlier run) holding --oracle-budget; default: computed by this run over "
            "--oracle-blocks training blocks into <output-dir>/oracle_targets (resumable)."
        },
    )
    oracle_blocks: int = field(
        default=256, metadata={"help": "supervision oracle: training blocks the oracle's targets are computed on."}
    )
    oracle_batch_size: int = field(
        default=8, metadata={"help": "supervision oracle: sequences per oracle batch (and per resumable result)."}
    )
    oracle_budget: str | None = field(
        default=None,
        metadata={
            "help": "supervision oracle: the oracle's exact budget (e.g. 2 = two BIG layers, big=6,skip=6); "
            "default: the --target-usage fractions times the number of layers, which must be whole numbers."
        },
    )
    oracle_causal: bool = field(
        default=False,
        metadata={
            "help": "supervision oracle: learn the causally consistent oracle's routes (realisable in one forward "
            "pass; no use of the next token) instead of the independent oracle's."
        },
    )
    oracle_chunk_tokens: int | None = field(
        default=None, metadata={"help": "supervision oracle: tokens per forward batch of the oracle's tree walk."}
    )
    oracle_calibration_blocks: int = field(
        default=64,
        metadata={
            "help": "supervision oracle: after training, shift each layer's router biases so that on this many "
            "training blocks its hard choices take each choice as often as the oracle does in that layer (0: off)."
        },
    )

    oracle_label_smoothing: float = field(
        default=0.0,
        metadata={"help": "supervision oracle: label smoothing of the routers' cross-entropy towards the oracle."},
    )

    def __post_init__(self, budget: str | None) -> None:
        if budget is not None:
            self.target_usage = renamed_keyword(type(self).__name__, "budget", budget)

    def temperature_plan(self, total_steps: int) -> TemperatureSchedule:
        """The router temperature schedule of a run of ``total_steps`` optimizer steps."""
        from ..models.routed_ffn import TemperatureSchedule

        steps = total_steps if self.temperature_steps is None else self.temperature_steps
        return TemperatureSchedule(self.temperature_start, self.temperature_end, steps, self.temperature_schedule)


_ORACLE_DEFAULTS = {f.name: f.default for f in fields(RouterArguments) if f.name in ORACLE_FIELDS}


@dataclass(kw_only=True)
class RouterTrainArguments(OptimizationArguments, DataArguments, RouterArguments, RunArguments):
    """Arguments of a router training run (each is also a command-line flag, ``--name-with-dashes``).

    The data, optimisation, logging and checkpoint fields mean what they mean in stage 1 (`arguments`); those
    declared here differ: defaults for a few small linear layers, and a block size and tokenizer from the model.
    """

    prog = "duo-llm train-router"
    description = "Stage 3: train learned routers on a frozen Duo model with Accelerate."

    output_dir: str = with_default(
        RunArguments, "output_dir", help="Folder for the model with routers, tokenizer, report, checkpoints."
    )
    eval_every: int = with_default(RunArguments, "eval_every", 0)
    run_name: str = with_default(RunArguments, "run_name", "train_router")
    block_size: int | None = with_default(
        DataArguments,
        "block_size",
        None,
        help=f"Tokens per block (default: {DEFAULT_BLOCK_SIZE}, or the model's positions if fewer).",
    )
    tokenizer: str | None = with_default(
        DataArguments, "tokenizer", help="Tokenizer folder (default: the one in --model)."
    )
    learning_rate: float = with_default(OptimizationArguments, "learning_rate", 1e-2)
    weight_decay: float = with_default(OptimizationArguments, "weight_decay", 0.0)
    lr_scheduler: str = with_default(OptimizationArguments, "lr_scheduler", "constant")
    warmup_steps: int = with_default(OptimizationArguments, "warmup_steps", 0)
    seed: int = with_default(
        OptimizationArguments, "seed", help="Seed of the data order and (by default) the router weights."
    )

    def validate(self) -> None:
        """Check every argument and the paths they name, before any work is done (see also
        `resolve_router_targets`); raise `UsageError`."""
        check_output_dir(self)
        check_integer_fields(
            self,
            positive=(
                "batch_size", "gradient_accumulation_steps", "eval_blocks", "log_every", "num_epochs", "shuffle_buffer",
                "oracle_blocks", "oracle_batch_size",
            ),
            optional=(
                "max_steps", "eval_batch_size", "block_size", "builtin_max_chars", "checkpoints_to_keep",
                "oracle_chunk_tokens",
            ),
            non_negative=("eval_every", "checkpoint_every", "warmup_steps", "oracle_calibration_blocks"),
            seeds=("seed", "router_seed"),
        )  # fmt: skip
        check_run_fields(self)
        if self.supervision not in SUPERVISIONS:
            raise UsageError(f"supervision: {self.supervision!r} is not one of {list(SUPERVISIONS)}.")
        if self.supervision != "oracle":
            given = [f"--{n.replace('_', '-')}" for n in ORACLE_FIELDS if getattr(self, n) != _ORACLE_DEFAULTS[n]]
            if given:
                raise UsageError(f"{given} set the oracle's targets; they need --supervision oracle.")
        if not 0 <= self.oracle_label_smoothing < 1:
            raise UsageError(f"oracle_label_smoothing: {self.oracle_label_smoothing!r} must be in [0, 1).")
        if self.oracle_targets is not None:
            check_folder("oracle_targets", self.oracle_targets, "oracle result folder")
        if self.temperature_steps is not None and self.temperature_steps < 0:
            raise UsageError(f"temperature_steps: {self.temperature_steps!r} must be >= 0 (or left unset).")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"block_size: {self.block_size} must be at least 2 tokens.")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise UsageError(f"alpha: {self.alpha!r} must be a finite number >= 0 (the usage loss weight).")
        with user_values():
            self.temperature_plan(1)  # checks the temperatures and the schedule kind
        if self.setting is not None:
            if self.setting not in ROUTER_SETTINGS:
                raise UsageError(
                    f"setting: {self.setting!r} is not a router setting; use one of "
                    f"{sorted(ROUTER_SETTINGS)}, or --route-options with --target-usage."
                )
            if self.route_options is not None or self.target_usage is not None:
                raise UsageError(
                    f"setting {self.setting!r} fixes the route options and the target usage; leave out "
                    "--route-options and --target-usage, or give those without --setting."
                )
        elif self.target_usage is None:
            raise UsageError(
                "target_usage: give a target, e.g. --target-usage 0.3 (the fraction of BIG) or --target-usage "
                f"small=0.3,big=0.5,skip=0.2, or one of the paper's settings with --setting "
                f"({', '.join(ROUTER_SETTINGS)})."
            )
        else:
            from ..models.losses import parse_target_usage

            with user_values():
                parse_target_usage(parse_target_usage_flag(self.target_usage))
        if self.route_options is not None:
            with user_values():
                parse_route_options(self.route_options)
        if self.oracle_budget is not None and not self.oracle_budget.strip():
            raise UsageError("oracle_budget: '' is empty; give an exact budget such as 2 or big=6,skip=6.")
        from ..utils.loading import inspect_duo_source

        inspect_duo_source(self.model)
        check_data_fields(self)


def parse_route_options(text: str | Sequence[str | int]) -> list[str]:
    """Route options from a comma-separated string (``"small,big"``) or a list, as names in canonical order."""
    from ..models.routes import CHOICE_NAMES, choice_code

    items = [part.strip() for part in text.split(",") if part.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise ValueError(f"route_options: {text!r} names no choice; use e.g. small,big or big,skip.")
    return [CHOICE_NAMES[c] for c in sorted({choice_code(item, "route_options") for item in items})]


def parse_target_usage_flag(text: str | float | Mapping[str, float]) -> float | dict[str, float]:
    """A ``--target-usage`` value: ``"0.3"`` (the BIG fraction) or ``"small=0.3,big=0.5,skip=0.2"`` (per choice)."""
    if not isinstance(text, str):
        return text if isinstance(text, Mapping) else float(text)
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"target_usage: {text!r} is not a number; give the BIG fraction (e.g. 0.3) or name=fraction pairs "
                "(e.g. small=0.3,big=0.5,skip=0.2)."
            ) from None
    targets = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name.lower() in {seen.lower() for seen in targets}:  # names only: a choice is named one way in text
            raise ValueError(f"target_usage: {text!r} names {name.lower()!r} twice; give each choice once.")
        try:
            targets[name] = float(value)
        except ValueError:
            raise ValueError(f"target_usage: {part!r} in {text!r} is not name=fraction (e.g. big=0.5).") from None
    return targets


def target_usage_flag(targets: Mapping[int, float]) -> str:
    """The ``--target-usage`` value of targets (``{choice code: fraction}``), read back by `parse_target_usage_flag`:
    the BIG fraction alone when only BIG is targeted, else ``name=fraction`` pairs; written with ``repr`` so that
    no digit of the fraction is lost."""
    from ..models.routes import BIG, CHOICE_NAMES

    if set(targets) == {BIG}:
        return repr(targets[BIG])
    return ",".join(f"{CHOICE_NAMES[code]}={fraction!r}" for code, fraction in sorted(targets.items()))


def routable_choices(config) -> list[str]:
    """The choices a model can route: its ``route_options`` (trained in stage 1) and ``skip`` (needs no module)."""
    from ..models.routes import CHOICE_NAMES, SKIP

    return [name for name in CHOICE_NAMES if name in config.route_options or name == CHOICE_NAMES[SKIP]]


def resolve_router_targets(args: RouterTrainArguments, config) -> tuple[list[str], dict[int, float]]:
    """The router's route options and target usage (``{choice code: fraction}``) for a model's config.

    Raises when the setting asks for a choice the model cannot route (see `routable_choices`) or the targets do
    not fit the options.
    """
    from ..models.losses import parse_target_usage

    if args.setting is not None:
        preset = ROUTER_SETTINGS[args.setting]
        options, target_usage, source = preset["route_options"], preset["target_usage"], f"setting {args.setting!r}"
    else:
        options = parse_route_options(args.route_options or config.route_options)
        target_usage, source = parse_target_usage_flag(args.target_usage), f"route_options {options}"
    options = parse_route_options(options)
    routable = routable_choices(config)
    missing = [name for name in options if name not in routable]
    if missing:
        raise UsageError(
            f"{source} routes to {missing}, which model {args.model!r} cannot route: its route_options are "
            f"{list(config.route_options)} (skip is always possible); choose options within {routable}."
        )
    if len(options) < 2:
        raise UsageError(f"{source}: a router needs at least two route options to choose between, got {options}.")
    with user_values():
        return options, parse_target_usage(target_usage, options)


def oracle_layer_budget(
    args: RouterTrainArguments, options: Sequence[str], targets: Mapping[int, float], num_layers: int
):
    """The oracle's budget for oracle supervision: ``args.oracle_budget``, else the target usage times the layers.

    The oracle picks patterns with *exact* counts (a layer budget: `oracle.spaces.parse_layer_budget` syntax), so
    each target fraction times ``num_layers`` must be a whole number (``0.5`` of 4 layers: ``big=2``). The budget
    is checked against a route space over ``options`` here, before any work is done.
    """
    from ..oracle.spaces import RouteSpace, UnevenLayerBudget, layer_budget_of_fractions

    if args.oracle_budget is not None:
        spec = args.oracle_budget
    else:
        try:
            spec = layer_budget_of_fractions(targets, num_layers).label
        except UnevenLayerBudget as err:
            raise UsageError(
                f"{err}; the oracle needs exact counts: give --oracle-budget (e.g. {err.nearest.label})."
            ) from None
    with user_values("oracle_budget: "):
        RouteSpace(num_layers, options, [spec])  # raises on a budget the options cannot meet
    return spec


@dataclass(frozen=True)
class RouterTargets:
    """What the routers learn: their options, their target usage and, under oracle supervision, the oracle's
    budget."""

    options: list[str]
    targets: dict[int, float]
    oracle_budget: str | None = None


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ORACLE_FIELDS",
    "RouterArguments",
    "RouterTargets",
    "RouterTrainArguments",
    "SUPERVISIONS",
    "oracle_layer_budget",
    "parse_route_options",
    "parse_target_usage_flag",
    "resolve_router_targets",
    "routable_choices",
    "target_usage_flag",
]
