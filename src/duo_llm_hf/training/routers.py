"""Stage 3 with Accelerate: train learned routers on a frozen Duo model, and report their realised budget.

`train_router` loads a stage 1 Duo model folder (DuoLlama or DuoOPT, via `AutoModelForCausalLM`), gives every
layer a fresh router over the route options of the setting (`add_routers`), freezes the Duo weights and trains
the routers on the training corpus with the paper's loss ``CE + alpha * budget_loss`` while the router
temperature anneals (`router.TemperatureSchedule`). In training mode each layer's FFN output is the soft mixture
``sum_x P_x * H_x``; the evaluation (`evaluate_router`) runs the held-out sets in evaluation mode, where every
token takes its argmax choice and only that module runs, and reports the *realised* fraction of each choice
(overall, per layer, and the per-layer x per-position usage counts that the oracle's analysis also draws) with
the perplexity at that realised budget.

Beyond the paper, ``supervision="oracle"`` trains the same routers to predict the oracle's choices instead: per
training batch the oracle (`oracle.oracle_routing`) finds each token's best pattern under an exact budget, the
model follows those routes (teacher forcing: each router sees the FFN input the oracle's route gives) and each
layer's router learns the oracle's choice in that layer by cross-entropy (`oracle_router_loss`), plus ``alpha *
budget_loss``. Afterwards `calibrate_routers` shifts the router biases so that hard routing takes each choice as
often as the oracle does per layer; the evaluation is the conventional router's.

Which choices a model can route: those of its ``route_options`` (its small and big FFNs were trained for them
in stage 1), plus ``skip``, which needs no module (the paper lets the oracle and the router skip layers of a
model trained with small / big routing only). The paper's three settings are `router.ROUTER_SETTINGS`.

Data, optimizer, scheduler, checkpoints, trackers and resume checks are stage 1's (`training`); the output folder
holds the model with its routers (``save_pretrained``, ``routing_mode="learned"``), the tokenizer,
``training_args.json``, ``train_results.json`` and ``router_report.json`` (`ROUTER_REPORT_FILE`). A checkpoint holds the
whole model (Accelerate's ``save_state``), although only the routers change.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.corpus import pack_corpus
from ..data.tokenization import check_tokenizer_fits, has_tokenizer, load_tokenizer
from ..models.losses import IGNORE_INDEX, next_token_targets, token_losses
from ..models.modeling_duo import DUO_CONFIG_FIELDS
from ..models.router import (
    ROUTER_SETTINGS,
    SCHEDULE_KINDS,
    TemperatureSchedule,
    budget_loss,
    freeze_all_but_routers,
    parse_budget,
    realised_fractions,
    routers,
    set_router_temperature,
)
from ..models.routes import BIG, CHOICE_NAMES, SKIP, choice_code, route_usage
from ..oracle.engine import oracle_routing
from ..oracle.spaces import RouteSpace, UnevenLayerBudget, layer_budget_of_fractions
from ..utils.arguments import HfArgumentParser, check_integer_fields, check_output_dir, user_values
from ..utils.errors import MissingFileError, UsageError
from ..utils.files import atomic_write_json
from ..utils.flops import flops_per_token
from ..utils.loading import inspect_duo_source, load_duo_model
from ..utils.processes import process_state
from ..utils.run_files import ROUTER_REPORT_FILE
from .checkpointing import (
    CHECKPOINTS_DIR,
    TrainState,
    check_finite_loss,
    restore_train_state,
    save_checkpoint_if_due,
)
from .loop import StepMeter, accelerated_run, backward_and_step, run_identity, start_or_resume, tracker_config
from .train import (
    TrainArguments,
    build_optimizer,
    build_scheduler,
    check_data_fields,
    check_run_fields,
    load_corpora,
    make_eval_loaders,
    make_train_loader,
    save_final,
    total_training_steps,
    training_batches,
    training_fingerprint,
)

DEFAULT_BLOCK_SIZE = 256


def _stage1(name: str, **changes):
    """A field declared like `TrainArguments`' field ``name`` (same help), with ``default`` or ``help`` changed."""
    source = TrainArguments.__dataclass_fields__[name]
    metadata = {**source.metadata, **({"help": changes["help"]} if "help" in changes else {})}
    return field(default=changes.get("default", source.default), metadata=metadata)


@dataclass
class RouterTrainArguments:
    """Arguments of a router training run (each is also a command-line flag, ``--name-with-dashes``).

    The route options and budget come from ``setting`` (one of `ROUTER_SETTINGS`) or from ``route_options`` and
    ``budget``. The data, optimisation, logging and checkpoint fields mean what they mean in stage 1
    (`training.TrainArguments`), with defaults for a few small linear layers.
    """

    model: str = field(metadata={"help": "Folder of a stage 1 Duo model (DuoLlama or DuoOPT, save_pretrained)."})
    output_dir: str = field(metadata={"help": "Folder for the model with routers, tokenizer, report, checkpoints."})
    # The routers and their loss
    setting: str | None = field(
        default=None,
        metadata={
            "help": f"One of the paper's router settings {sorted(ROUTER_SETTINGS)}: sets the route options and the "
            "budget (then leave out --route-options and --budget)."
        },
    )
    route_options: str | None = field(
        default=None,
        metadata={"help": "Choices the routers pick from, comma-separated (default: the model's route_options)."},
    )
    budget: str | None = field(
        default=None,
        metadata={
            "help": "Target budget: the fraction of BIG (e.g. 0.3), or a fraction per choice "
            "(e.g. small=0.3,big=0.5,skip=0.2)."
        },
    )
    alpha: float = field(default=1.0, metadata={"help": "Weight of the budget loss: loss = CE + alpha * budget."})
    temperature_start: float = field(default=1.0, metadata={"help": "Router temperature tau at step 0."})
    temperature_end: float = field(default=0.1, metadata={"help": "Router temperature at the end of annealing."})
    temperature_schedule: Literal["constant", "linear", "exponential", "cosine"] = field(
        default="exponential", metadata={"help": f"How tau goes from start to end: {list(SCHEDULE_KINDS)}."}
    )
    temperature_steps: int | None = field(
        default=None, metadata={"help": "Steps over which tau anneals (default: the whole run)."}
    )
    router_seed: int | None = field(default=None, metadata={"help": "Seed of the router weights (default: --seed)."})
    supervision: Literal["conventional", "oracle"] = field(
        default="conventional",
        metadata={
            "help": "conventional: the paper's router, trained by the LM loss through the soft mixture (plus "
            "alpha * budget loss). oracle (beyond the paper): each layer's router learns the oracle's choice in that "
            "layer on the training text (cross-entropy, on the FFN inputs of the oracle's route), plus alpha * "
            "budget loss."
        },
    )
    oracle_budget: str | None = field(
        default=None,
        metadata={
            "help": "supervision oracle: the oracle's exact budget (e.g. 2 = two BIG layers, big=6,skip=6); "
            "default: the --budget targets times the number of layers, which must be whole numbers."
        },
    )
    oracle_causal: bool = field(
        default=False,
        metadata={"help": "supervision oracle: targets from the causally consistent oracle (realisable routes)."},
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
    # Data
    dataset: str = _stage1("dataset")
    holdout_english: str = _stage1("holdout_english")
    holdout_code: str = _stage1("holdout_code")
    text_column: str = _stage1("text_column")
    sample_by: Literal["document", "paragraph", "line"] = _stage1("sample_by")
    streaming: bool = _stage1("streaming")
    shuffle_buffer: int = _stage1("shuffle_buffer")
    builtin_max_chars: int | None = _stage1("builtin_max_chars")
    cache_dir: str | None = _stage1("cache_dir")
    block_size: int | None = _stage1(
        "block_size",
        default=None,
        help=f"Tokens per block (default: {DEFAULT_BLOCK_SIZE}, or the model's positions if fewer).",
    )
    tokenizer: str | None = _stage1("tokenizer", help="Tokenizer folder (default: the one in --model).")
    # Optimisation
    batch_size: int = _stage1("batch_size")
    gradient_accumulation_steps: int = _stage1("gradient_accumulation_steps")
    learning_rate: float = _stage1("learning_rate", default=1e-2)
    weight_decay: float = _stage1("weight_decay", default=0.0)
    adam_beta1: float = _stage1("adam_beta1")
    adam_beta2: float = _stage1("adam_beta2")
    lr_scheduler: str = _stage1("lr_scheduler", default="constant")
    warmup_steps: int = _stage1("warmup_steps", default=0)
    max_grad_norm: float = _stage1("max_grad_norm")
    fused_optimizer: bool = _stage1("fused_optimizer")
    max_steps: int | None = _stage1("max_steps")
    num_epochs: int = _stage1("num_epochs")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _stage1("mixed_precision")
    seed: int = _stage1("seed", help="Seed of the data order and (by default) the router weights.")
    # Evaluation, logging, checkpoints
    eval_every: int = _stage1("eval_every", default=0)
    eval_blocks: int = _stage1("eval_blocks")
    eval_batch_size: int | None = _stage1("eval_batch_size")
    log_every: int = _stage1("log_every")
    report_to: str = _stage1("report_to")
    run_name: str = _stage1("run_name", default="train_router")
    checkpoint_every: int = _stage1("checkpoint_every")
    checkpoints_to_keep: int | None = _stage1("checkpoints_to_keep")
    resume_from: str | None = _stage1("resume_from")
    overwrite_output_dir: bool = _stage1("overwrite_output_dir")
    progress: bool = _stage1("progress")

    def validate(self) -> None:
        """Check every argument and the paths they name, before any work is done (see also
        `resolve_router_budget`); raise `UsageError`."""
        check_output_dir(self)
        check_integer_fields(
            self,
            positive=(
                "batch_size", "gradient_accumulation_steps", "eval_blocks", "log_every", "num_epochs", "shuffle_buffer"
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
            given = [f"--{n.replace('_', '-')}" for n in ORACLE_FIELDS if getattr(self, n) != _DEFAULTS[n]]
            if given:
                raise UsageError(f"{given} set the oracle's targets; they need --supervision oracle.")
        if self.temperature_steps is not None and self.temperature_steps < 0:
            raise UsageError(f"temperature_steps: {self.temperature_steps!r} must be >= 0 (or left unset).")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"block_size: {self.block_size} must be at least 2 tokens.")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise UsageError(f"alpha: {self.alpha!r} must be a finite number >= 0 (the budget loss weight).")
        with user_values():
            self.temperature_plan(1)  # checks the temperatures and the schedule kind
        if self.setting is not None:
            if self.setting not in ROUTER_SETTINGS:
                raise UsageError(
                    f"setting: {self.setting!r} is not a router setting; use one of "
                    f"{sorted(ROUTER_SETTINGS)}, or --route-options with --budget."
                )
            if self.route_options is not None or self.budget is not None:
                raise UsageError(
                    f"setting {self.setting!r} fixes the route options and the budget; leave out --route-options "
                    "and --budget, or give those without --setting."
                )
        elif self.budget is None:
            raise UsageError(
                f"budget: give a target, e.g. --budget 0.3 (the fraction of BIG) or --budget small=0.3,big=0.5,"
                f"skip=0.2, or one of the paper's settings with --setting ({', '.join(sorted(ROUTER_SETTINGS))})."
            )
        else:
            with user_values():
                parse_budget(parse_budget_flag(self.budget))
        if self.route_options is not None:
            with user_values():
                parse_route_options(self.route_options)
        if self.oracle_budget is not None and not self.oracle_budget.strip():
            raise UsageError("oracle_budget: '' is empty; give an exact budget such as 2 or big=6,skip=6.")
        inspect_duo_source(self.model)
        check_data_fields(self)

    def temperature_plan(self, total_steps: int) -> TemperatureSchedule:
        """The router temperature schedule of a run of ``total_steps`` optimizer steps."""
        steps = total_steps if self.temperature_steps is None else self.temperature_steps
        return TemperatureSchedule(self.temperature_start, self.temperature_end, steps, self.temperature_schedule)


SUPERVISIONS = ("conventional", "oracle")
ORACLE_FIELDS = ("oracle_budget", "oracle_causal", "oracle_chunk_tokens", "oracle_calibration_blocks")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterTrainArguments)}


@dataclass
class RouterTrainResult:
    """What a router run did: steps, tokens, the total loss of each optimizer step it ran, and its report."""

    output_dir: str
    global_step: int
    tokens_seen: int
    losses: dict[int, float]
    report: dict


def build_router_arg_parser(**kwargs) -> HfArgumentParser:
    """The command-line parser of `RouterTrainArguments` (``kwargs`` go to `argparse.ArgumentParser`)."""
    kwargs.setdefault("prog", "duo-llm train-router")
    kwargs.setdefault("description", "Stage 3: train learned routers on a frozen Duo model with Accelerate.")
    return HfArgumentParser(RouterTrainArguments, **kwargs)


def parse_router_args(argv: list[str] | None = None) -> RouterTrainArguments:
    """Parse command-line arguments into `RouterTrainArguments` (a parse error is a `UsageError`)."""
    (args,) = build_router_arg_parser().parse(argv)
    return args


# ----------------------------------------------------------------------------------------------------
# Route options and budgets


def parse_route_options(text: str | Sequence[str | int]) -> list[str]:
    """Route options from a comma-separated string (``"small,big"``) or a list, as names in canonical order."""
    items = [part.strip() for part in text.split(",") if part.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise ValueError(f"route_options: {text!r} names no choice; use e.g. small,big or big,skip.")
    return [CHOICE_NAMES[c] for c in sorted({choice_code(item, "route_options") for item in items})]


def parse_budget_flag(text: str | float | Mapping[str, float]) -> float | dict[str, float]:
    """A ``--budget`` value: ``"0.3"`` (the BIG fraction) or ``"small=0.3,big=0.5,skip=0.2"`` (per choice)."""
    if not isinstance(text, str):
        return text if isinstance(text, Mapping) else float(text)
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"budget: {text!r} is not a number; give the BIG fraction (e.g. 0.3) or name=fraction pairs "
                "(e.g. small=0.3,big=0.5,skip=0.2)."
            ) from None
    targets = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        try:
            targets[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"budget: {part!r} in {text!r} is not name=fraction (e.g. big=0.5).") from None
    return targets


def budget_flag(targets: Mapping[int, float]) -> str:
    """The ``--budget`` value of budget targets (``{choice code: fraction}``), read back by `parse_budget_flag`:
    the BIG fraction alone when only BIG is targeted, else ``name=fraction`` pairs; written with ``repr`` so that
    no digit of the fraction is lost."""
    if set(targets) == {BIG}:
        return repr(targets[BIG])
    return ",".join(f"{CHOICE_NAMES[code]}={fraction!r}" for code, fraction in sorted(targets.items()))


def routable_choices(config) -> list[str]:
    """The choices a model can route: its ``route_options`` (trained in stage 1) and ``skip`` (needs no module)."""
    return [name for name in CHOICE_NAMES if name in config.route_options or name == CHOICE_NAMES[SKIP]]


def resolve_router_budget(args: RouterTrainArguments, config) -> tuple[list[str], dict[int, float]]:
    """The router's route options and budget targets (``{choice code: fraction}``) for a model's config.

    Raises when the setting asks for a choice the model cannot route (see `routable_choices`) or the budget does
    not fit the options.
    """
    if args.setting is not None:
        preset = ROUTER_SETTINGS[args.setting]
        options, budget, source = preset["route_options"], preset["budget"], f"setting {args.setting!r}"
    else:
        options = parse_route_options(args.route_options or config.route_options)
        budget, source = parse_budget_flag(args.budget), f"route_options {options}"
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
        return options, parse_budget(budget, options)


def oracle_layer_budget(
    args: RouterTrainArguments, options: Sequence[str], targets: Mapping[int, float], num_layers: int
):
    """The oracle's budget for oracle supervision: ``args.oracle_budget``, else the targets times the layers.

    The oracle picks patterns with *exact* counts (a layer budget: `oracle.spaces.parse_layer_budget` syntax), so
    each target fraction times ``num_layers`` must be a whole number (``0.5`` of 4 layers: ``big=2``). The budget
    is checked against a route space over ``options`` here, before any work is done.
    """
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


# ----------------------------------------------------------------------------------------------------
# Models



def add_routers(model, route_options: Sequence[str | int], seed: int = 0, temperature: float = 1.0):
    """Give every layer of a Duo model a fresh router over ``route_options`` and switch it to learned routing.

    Routers the model already had are replaced. Router weights are drawn with the model's initialisation under
    ``seed`` (the global random state is left as it was). The config's ``route_probs`` keep the probabilities of
    the choices still allowed (renormalised; uniform if none is left) and a ``fixed_pattern`` using a choice no
    longer allowed is dropped, so the model stays valid in every routing mode. Returns the model.
    """
    config = model.config
    options = parse_route_options(route_options)
    kept = {name: p for name, p in config.route_probs.items() if name in options and p > 0}
    total = sum(kept.values())
    probs = {name: kept.get(name, 0.0) / total for name in options} if total > 0 else None
    pattern = config.fixed_pattern
    if pattern is not None and any(CHOICE_NAMES[c] not in options for c in pattern):
        pattern = None
    previous = {key: getattr(config, key) for key in DUO_CONFIG_FIELDS}
    old_routers = [layer.mlp.router for layer in model.model.layers]
    try:
        config.route_options, config.route_probs, config.fixed_pattern = options, probs, pattern
        config.router_temperature = float(temperature)
        for layer in model.model.layers:
            layer.mlp.router = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.set_routing("learned")
    except ValueError:
        for key, value in previous.items():
            setattr(config, key, value)
        for layer, router in zip(model.model.layers, old_routers):
            layer.mlp.router = router
        raise
    return model


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_router(
    model, loaders: Mapping[str, DataLoader], accelerator: Accelerator | None = None, **forward_kwargs
) -> dict[str, dict]:
    """Held-out loss, perplexity and realised routes of each eval set under hard learned routing.

    The model runs in evaluation mode with ``routing="learned"`` (each token takes its argmax choice; only that
    module runs); ``forward_kwargs`` replace or add forward arguments (e.g. ``routing="fixed"``), so other route
    modes are measured the same way. Returns, per set and for ``"all"`` sets together: ``loss``, ``ppl``,
    ``tokens`` (predicted tokens), ``realised`` (`router.realised_fractions`: overall and per layer) and
    ``usage`` (`routing.route_usage` counts ``[3, layers, positions]`` of the routes taken, every position of
    every block counted). Under several processes, the counts of all processes are gathered.
    """
    kwargs = {"routing": "learned", **forward_kwargs}
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    all_usage, all_loss, all_tokens = None, 0.0, 0
    for name, loader in loaders.items():
        total = count = 0.0
        usage = None
        for batch in loader:
            ids = batch["input_ids"]
            out = model(input_ids=ids, **kwargs)
            losses, mask = token_losses(out.logits, ids)
            sums, counts, routes = losses.sum(-1).double(), mask.sum(-1).double(), out.routes
            if accelerator is not None:
                sums, counts, routes = accelerator.gather_for_metrics((sums, counts, routes))
            total += sums.sum().item()
            count += counts.sum().item()
            counted = route_usage(routes).cpu()
            usage = counted if usage is None else usage + counted
        if usage is None:
            raise ValueError(f"eval set {name!r} has no blocks to evaluate.")
        loss = total / max(count, 1.0)
        results[name] = _eval_entry(loss, int(count), usage)
        all_loss, all_tokens = all_loss + total, all_tokens + int(count)
        all_usage = usage if all_usage is None or all_usage.shape != usage.shape else all_usage + usage
    if len(results) > 1 and all(r["usage"].shape == all_usage.shape for r in results.values()):
        results["all"] = _eval_entry(all_loss / max(all_tokens, 1), all_tokens, all_usage)
    model.train(was_training)
    return results


def _eval_entry(loss: float, tokens: int, usage: torch.Tensor) -> dict:
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "realised": realised_fractions(usage),
        "usage": usage,
    }


def eval_metrics(results: Mapping[str, dict], prefix: str = "eval") -> dict[str, float]:
    """Flat tracker metrics of `evaluate_router` results: loss, ppl and the overall realised fractions."""
    metrics = {}
    for name, entry in results.items():
        metrics[f"{prefix}/{name}/learned/loss"] = entry["loss"]
        metrics[f"{prefix}/{name}/learned/ppl"] = entry["ppl"]
        for choice, fraction in entry["realised"]["overall"].items():
            metrics[f"{prefix}/{name}/realised/{choice}"] = fraction
    return metrics


# ----------------------------------------------------------------------------------------------------
# Oracle supervision


def oracle_router_targets(
    model, input_ids: torch.LongTensor, budget, *, causal: bool = False, chunk_tokens: int | None = None
) -> tuple[torch.LongTensor, torch.Tensor]:
    """The oracle's route of every token (``[batch, seq, layers]``) and which tokens count (``[batch, seq]``).

    The oracle (`oracle.oracle_routing`, independent by default, ``causal`` for the causally consistent one)
    picks each token's best pattern under ``budget`` over the model's ``route_options``, given the next tokens
    of ``input_ids``; tokens without a next token (the last of each block) do not count. Runs without gradients
    in evaluation mode, and leaves the model's mode as it was.
    """
    was_training = model.training
    model.eval()
    try:
        found = oracle_routing(model, input_ids, input_ids, budget, causal=causal, chunk_tokens=chunk_tokens)
    finally:
        model.train(was_training)
    return found.routes, next_token_targets(input_ids) != IGNORE_INDEX


def oracle_router_loss(router_probs: torch.Tensor, routes: torch.LongTensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the routers' probabilities (``[batch, seq, layers, 3]``) at the oracle's ``routes``.

    Averaged over the layers and the counted tokens (``mask``, ``[batch, seq]``): each layer's router learns to
    predict the oracle's choice in that layer.
    """
    chosen = router_probs.gather(-1, routes.to(router_probs.device)[..., None]).squeeze(-1)  # [B, T, L]
    log_p = torch.log(chosen.clamp_min(torch.finfo(chosen.dtype).tiny))
    weights = mask.to(log_p.device, log_p.dtype)[..., None].expand_as(log_p)
    return -(log_p * weights).sum() / weights.sum().clamp_min(1)


def router_agreement(router_probs: torch.Tensor, routes: torch.LongTensor, mask: torch.Tensor) -> float:
    """Fraction of the counted (token, layer) pairs where the router's argmax is the oracle's choice."""
    hits = (router_probs.argmax(-1) == routes.to(router_probs.device))[mask.to(router_probs.device).bool()]
    return hits.double().mean().item() if hits.numel() else float("nan")


def _match_fractions(scores: torch.Tensor, target: torch.Tensor, rounds: int = 8, steps: int = 50) -> torch.Tensor:
    """Offsets ``[C]`` such that ``argmax(scores + offsets)`` takes choice ``c`` for a ``target[c]`` share of rows.

    ``scores``: ``[n, C]`` (``-inf`` for choices never allowed). The share of a choice only grows with its own
    offset, so each offset is found by bisection with the others held; a few rounds over the choices settle all
    of them (one round is exact for two choices).
    """
    finite = scores[torch.isfinite(scores)]
    span = float(finite.max() - finite.min()) + 1.0 if finite.numel() else 1.0
    offsets = torch.zeros(scores.shape[-1], dtype=scores.dtype)
    allowed = [c for c in range(scores.shape[-1]) if torch.isfinite(scores[:, c]).any()]
    for _ in range(rounds if len(allowed) > 2 else 1):
        for c in allowed[:-1]:  # the last allowed choice takes the rest
            low, high = -span, span
            for _ in range(steps):
                offsets[c] = (low + high) / 2
                share = ((scores + offsets).argmax(-1) == c).double().mean()
                low, high = (offsets[c].item(), high) if share < target[c] else (low, offsets[c].item())
            offsets[c] = high
    return offsets


@torch.no_grad()
def calibrate_routers(
    model, input_ids: torch.LongTensor, budget, *, causal: bool = False, chunk_tokens: int | None = None
) -> dict:
    """Shift each layer's router biases so that its hard choices match the oracle's per-layer shares.

    A router trained to predict the oracle's choice in its layer is a classifier, and the argmax of a classifier
    that is unsure favours the commoner class: under a budget of 1 BIG layer in 4, every layer may prefer small
    and hard routing then spends almost no BIG. On ``input_ids`` (training blocks), with the model teacher
    forced on the oracle's routes, each router's biases get offsets (`_match_fractions`) such that its argmax
    takes each choice as often as the oracle does in that layer. Returns the offsets per layer and the hard
    choice shares and agreement with the oracle before and after.
    """
    routes, mask = oracle_router_targets(model, input_ids, budget, causal=causal, chunk_tokens=chunk_tokens)
    was_training = model.training
    model.eval()
    probs = model(input_ids=input_ids, routes=routes, output_router_probs=True, logits_to_keep=1).router_probs
    model.train(was_training)
    counted = mask.to(probs.device).bool()
    before = router_agreement(probs, routes, mask)
    offsets, shares = [], []
    for layer, router in enumerate(routers(model)):
        log_p = torch.log(probs[:, :, layer][counted].double())  # [n, 3]; argmax(log P + o) = argmax(logits + tau o)
        oracle_share = torch.bincount(routes[:, :, layer][counted].reshape(-1).cpu(), minlength=len(CHOICE_NAMES))
        target = oracle_share.double() / oracle_share.sum().clamp_min(1)
        offset = _match_fractions(log_p.cpu(), target)
        router.bias.add_(
            torch.stack([offset[code] for code in router.choices]).to(router.bias.device, router.bias.dtype)
            * router.temperature
        )
        offsets.append({CHOICE_NAMES[code]: offset[code].item() * router.temperature for code in router.choices})
        shares.append({CHOICE_NAMES[c]: target[c].item() for c in router.choices})
    model.eval()
    after_probs = model(input_ids=input_ids, routes=routes, output_router_probs=True, logits_to_keep=1).router_probs
    model.train(was_training)
    return {
        "blocks": int(input_ids.shape[0]),
        "oracle_shares": shares,
        "bias_offsets": offsets,
        "agreement_before": before,
        "agreement_after": router_agreement(after_probs, routes, mask),
    }


# ----------------------------------------------------------------------------------------------------
# The run


def train_router(
    args: RouterTrainArguments, step_callback: Callable[[TrainState, dict], None] | None = None
) -> RouterTrainResult:
    """Train the routers of a frozen Duo model as ``args`` say (see the module docstring); return the result.

    Every check on the inputs runs before any training time is spent. ``step_callback(state, metrics)`` is
    called after each optimizer step (and its logging, evaluation and checkpoint) on every process.
    """
    args.validate()
    source_config = inspect_duo_source(args.model)  # checked by validate; read again for the run
    options, targets = resolve_router_budget(args, source_config)
    positions = source_config.max_position_embeddings
    if args.block_size is not None and args.block_size > positions:
        raise UsageError(
            f"block_size {args.block_size} is longer than the max_position_embeddings {positions} of model "
            f"{args.model!r}; use --block-size <= {positions}."
        )
    args = dataclasses.replace(args, block_size=args.block_size or min(DEFAULT_BLOCK_SIZE, positions))
    oracle_budget = None
    if args.supervision == "oracle":
        oracle_budget = oracle_layer_budget(args, options, targets, source_config.num_hidden_layers)
    checkpoints_dir = Path(args.output_dir) / CHECKPOINTS_DIR
    resume_dir = start_or_resume(args, "router training run")

    router_budget = RouterBudget(options, targets, oracle_budget)
    with accelerated_run(args, resume_dir) as accelerator:
        return _train_router(
            args, accelerator, router_budget, source_config, resume_dir, checkpoints_dir, step_callback
        )


@dataclass(frozen=True)
class RouterBudget:
    """What the routers learn: their options, the budget targets and, under oracle supervision, the oracle's budget."""

    options: list[str]
    targets: dict[int, float]
    oracle_budget: str | None = None


def _train_router(args, accelerator, router_budget, source_config, resume_dir, checkpoints_dir, step_callback):
    output_dir = Path(args.output_dir)
    run = run_identity(resume_dir, training_fingerprint(args, accelerator), "router training run")
    set_seed(args.seed)

    train_texts, holdout_texts = load_corpora(args)
    tokenizer_dir = args.tokenizer or args.model
    if args.tokenizer is None and not has_tokenizer(args.model):
        raise MissingFileError(
            f"model {args.model!r} holds no tokenizer; pass --tokenizer with the tokenizer the model was trained with."
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer_fits(tokenizer, source_config.vocab_size, f"model {args.model!r}")
    train_blocks = pack_corpus(train_texts, tokenizer, args.block_size, f"dataset {args.dataset!r}")
    eval_loaders = make_eval_loaders(holdout_texts, tokenizer, args)

    model = load_duo_model(args.model)
    schedule = args.temperature_plan(1)  # replaced below once the number of steps is known
    router_seed = args.seed if args.router_seed is None else args.router_seed
    add_routers(model, router_budget.options, seed=router_seed, temperature=schedule(0))
    trainable = freeze_all_but_routers(model)

    train_loader = make_train_loader(train_blocks, args)
    optimizer = build_optimizer(model, args)
    total_steps = total_training_steps(args, train_loader, accelerator.num_processes)
    schedule = args.temperature_plan(total_steps)
    scheduler = build_scheduler(optimizer, args, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}
    unwrapped = accelerator.unwrap_model(model)

    state = restore_train_state(accelerator, resume_dir)
    targets_named = {CHOICE_NAMES[code]: value for code, value in router_budget.targets.items()}
    accelerator.init_trackers(
        args.run_name,
        config=tracker_config(
            args,
            {
                "route_options_resolved": ",".join(router_budget.options),
                "budget_resolved": json.dumps(targets_named),
                "oracle_budget_resolved": str(router_budget.oracle_budget),
                "total_steps": total_steps,
                "trainable_parameters": sum(p.numel() for p in trainable),
            },
        ),
    )

    losses: dict[int, float] = {}
    results: dict[str, dict] = {}
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        desc="train routers",
        disable=not (args.progress and accelerator.is_local_main_process),
    )
    # Averaged per step and per log window: the total loss, the main loss (the LM's CE, or the routers' CE towards
    # the oracle) and the budget loss; summed over a log window: the routers' hard (argmax) choice counts, their
    # soft probabilities, and (oracle supervision) their agreement with the oracle.
    main_name = "train/router_ce" if args.supervision == "oracle" else "train/ce"
    meter = StepMeter(
        accelerator,
        ["train/loss", main_name, "train/budget_loss"],
        args.batch_size * args.block_size * accelerator.num_processes,
    )
    hard_counts = torch.zeros(len(CHOICE_NAMES), dtype=torch.float64, device=accelerator.device)
    soft_sums = torch.zeros(len(CHOICE_NAMES), dtype=torch.float64, device=accelerator.device)
    agreement = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # hits, counted pairs
    train_realised: dict[str, float] = {}
    train_agreement = None
    calibrate = args.supervision == "oracle" and args.oracle_calibration_blocks > 0  # the final eval comes after
    model.train()
    for batch in training_batches(train_loader, accelerator, state, total_steps, args):
        temperature = schedule(state.global_step)
        set_router_temperature(unwrapped, temperature)
        with accelerator.accumulate(model):
            ids = batch["input_ids"]
            if args.supervision == "oracle":
                routes, mask = oracle_router_targets(
                    unwrapped,
                    ids,
                    router_budget.oracle_budget,
                    causal=args.oracle_causal,
                    chunk_tokens=args.oracle_chunk_tokens,
                )
                # Teacher forcing: the model follows the oracle's routes, each router sees the FFN input there.
                out = model(input_ids=ids, routes=routes, output_router_probs=True, logits_to_keep=1)
                main = oracle_router_loss(out.router_probs, routes, mask)
            else:
                out = model(input_ids=ids, labels=ids, routing="learned")
                main = out.loss
            budget = budget_loss(out.router_probs, router_budget.targets)
            loss = main + args.alpha * budget
            backward_and_step(accelerator, loss, optimizer, scheduler, trainable, args.max_grad_norm)
        meter.add(loss, main, budget)
        probs = out.router_probs.detach()
        hard_counts += torch.bincount(probs.argmax(-1).reshape(-1), minlength=len(CHOICE_NAMES)).double()
        soft_sums += probs.double().reshape(-1, len(CHOICE_NAMES)).sum(0)
        if args.supervision == "oracle":
            hits = (probs.argmax(-1) == routes)[mask]
            agreement += torch.stack([hits.sum(), torch.tensor(hits.numel(), device=hits.device)]).double()
        if not accelerator.sync_gradients:
            continue

        step_values = meter.step(state)
        step_loss = step_values["train/loss"]
        check_finite_loss(step_loss, state.global_step, checkpoints_dir)
        losses[state.global_step] = step_loss
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}", budget=f"{step_values['train/budget_loss']:.4f}")

        metrics: dict[str, float] = {}
        last = state.global_step >= total_steps
        if state.global_step % args.log_every == 0 or last:
            hard = accelerator.reduce(hard_counts, "sum")
            soft = accelerator.reduce(soft_sums, "sum")
            train_realised = {n: (hard[c] / hard.sum().clamp_min(1)).item() for c, n in enumerate(CHOICE_NAMES)}
            metrics.update(
                {
                    **meter.log_metrics(state, scheduler),
                    "train/temperature": temperature,
                    **{f"train/realised/{n}": v for n, v in train_realised.items()},
                    **{
                        f"train/soft/{n}": (soft[c] / soft.sum().clamp_min(1e-12)).item()
                        for c, n in enumerate(CHOICE_NAMES)
                    },
                }
            )
            if args.supervision == "oracle":
                hits, pairs = accelerator.reduce(agreement, "sum").tolist()
                train_agreement = hits / max(pairs, 1.0)
                metrics["train/oracle_agreement"] = train_agreement
            hard_counts.zero_()
            soft_sums.zero_()
            agreement.zero_()
        if eval_loaders and (
            (args.eval_every and state.global_step % args.eval_every == 0) or (last and not calibrate)
        ):
            results = evaluate_router(model, eval_loaders, accelerator)
            metrics.update(eval_metrics(results))
            meter.restart_clock()  # evaluation time is not training throughput
        if metrics:
            accelerator.log(metrics, step=state.global_step)
        if save_checkpoint_if_due(accelerator, checkpoints_dir, state, args, run, trained=trainable):
            meter.restart_clock()
        if step_callback is not None:
            step_callback(state, {"train/step_loss": step_loss, **metrics})
        if last:
            break
    progress.close()

    set_router_temperature(unwrapped, schedule(state.global_step))
    calibration = None
    if calibrate:
        # Every process calibrates on the same blocks, so the routers stay identical.
        count = min(args.oracle_calibration_blocks, len(train_blocks)) if hasattr(train_blocks, "__len__") else None
        blocks = train_blocks.select(range(count)) if count else train_blocks.take(args.oracle_calibration_blocks)
        ids = torch.stack([row["input_ids"] for row in blocks]).to(accelerator.device)
        calibration = calibrate_routers(
            unwrapped,
            ids,
            router_budget.oracle_budget,
            causal=args.oracle_causal,
            chunk_tokens=args.oracle_chunk_tokens,
        )
    if eval_loaders and (calibration is not None or not results):  # after calibration, or a resumed finished run
        results = evaluate_router(model, eval_loaders, accelerator)
        accelerator.log(eval_metrics(results), step=state.global_step)
    report = router_report(args, unwrapped.config, router_budget, state, results, train_realised, train_agreement)
    report["oracle_calibration"] = calibration
    save_final(args, accelerator, model, tokenizer, state, eval_metrics(results), run_id=run["run_id"])
    if accelerator.is_main_process:
        atomic_write_json(output_dir / ROUTER_REPORT_FILE, report, newline=False)
    accelerator.wait_for_everyone()
    return RouterTrainResult(str(output_dir), state.global_step, state.tokens_seen, losses, report)


def router_report(
    args: RouterTrainArguments,
    config,
    router_budget: RouterBudget,
    state: TrainState,
    results: Mapping[str, dict],
    train_realised: Mapping[str, float],
    train_agreement: float | None = None,
) -> dict:
    """The JSON report of a router run: its targets, and per held-out set the realised fractions and perplexity.

    ``holdouts[name]`` holds ``loss``, ``ppl``, ``tokens``, ``realised`` (``overall`` and ``per_layer``
    fractions of each choice), ``usage`` (counts ``[3][layers][positions]``: choice code x layer x position,
    the data of the paper's Fig. 3) and ``flops_per_token`` at the realised fractions (with the routers' own
    FLOPs) next to ``flops_per_token_all_big``.
    """
    holdouts = {}
    for name, entry in results.items():
        realised = entry["realised"]["overall"]
        fractions = realised if sum(realised.values()) > 0 else None
        holdouts[name] = {
            "loss": entry["loss"],
            "ppl": entry["ppl"],
            "tokens": entry["tokens"],
            "realised": entry["realised"],
            "flops_per_token": flops_per_token(config, fractions, seq_len=args.block_size, router=True).total,
            "usage": entry["usage"].tolist(),
        }
    return {
        "model": str(args.model),
        "setting": args.setting,
        "supervision": args.supervision,
        "route_options": list(router_budget.options),
        "budget": {CHOICE_NAMES[code]: value for code, value in router_budget.targets.items()},
        "oracle_budget": router_budget.oracle_budget,
        "oracle_causal": args.oracle_causal if args.supervision == "oracle" else None,
        "alpha": args.alpha,
        "temperature_final": float(config.router_temperature),
        "global_step": state.global_step,
        "tokens_seen": state.tokens_seen,
        "block_size": args.block_size,
        "flops_per_token_all_big": flops_per_token(config, {BIG: 1.0}, seq_len=args.block_size).total,
        "train_realised_last_window": dict(train_realised),
        "train_oracle_agreement_last_window": train_agreement,
        "holdouts": holdouts,
    }


def main(argv: list[str] | None = None) -> RouterTrainResult:
    """``training/train_router.py`` (and ``duo-llm train-router``): parse the flags, train, print the outcome."""
    result = train_router(parse_router_args(argv))
    if not process_state().is_main_process:
        return result
    print(f"Saved the model with routers to {result.output_dir} after {result.global_step} steps.")
    for name, entry in result.report["holdouts"].items():
        fractions = ", ".join(f"{choice} {value:.3f}" for choice, value in entry["realised"]["overall"].items())
        print(f"  {name}: perplexity {entry['ppl']:.3f} at realised fractions {fractions}")
    return result


__all__ = [
    "RouterBudget",
    "RouterTrainArguments",
    "RouterTrainResult",
    "add_routers",
    "budget_flag",
    "build_router_arg_parser",
    "calibrate_routers",
    "eval_metrics",
    "evaluate_router",
    "main",
    "oracle_layer_budget",
    "oracle_router_loss",
    "oracle_router_targets",
    "parse_budget_flag",
    "parse_route_options",
    "parse_router_args",
    "resolve_router_budget",
    "routable_choices",
    "router_agreement",
    "router_report",
    "train_router",
]
