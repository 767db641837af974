"""Stage 3 with Accelerate: train learned routers on a frozen Duo model, and report their realised usage.

`train_router` loads a stage 1 Duo model folder (DuoLlama or DuoOPT, via `AutoModelForCausalLM`), gives every
layer a fresh router over the route options of the setting (`add_routers`), freezes the Duo weights and trains
the routers on the training corpus with the paper's loss ``CE + alpha * usage_loss`` (its budget loss) while the
router temperature anneals (`routed_ffn.TemperatureSchedule`). In training mode each layer's FFN output is the soft
mixture ``sum_x P_x * H_x``; the evaluation (`evaluate_router`) runs the held-out sets in evaluation mode, where every
token takes its argmax choice and only that module runs, and reports the *realised* fraction of each choice
(overall, per layer, and the per-layer x per-position usage counts that the oracle's analysis also draws) with
the perplexity at that realised usage.

Beyond the paper, ``supervision="oracle"`` distils the oracle into the same routers: the oracle engine is run
once over ``oracle_blocks`` training blocks (or its result is read from ``oracle_targets``; `router_oracle`), each
token's best pattern under an exact budget is stored, and the routers train on those rows for as many steps as
asked: the model follows the stored routes (teacher forcing: each router sees the FFN input the oracle's route gives)
and each layer's router learns the oracle's choice in that layer by cross-entropy (`oracle_router_loss`), plus
``alpha * usage_loss``. ``oracle_causal`` learns the causally consistent oracle's routes instead. Afterwards (and
for each evaluation during training) `calibrate_routers` shifts the router biases so that hard routing takes each
choice as often as the oracle does per layer; the evaluation is the conventional router's.

Which choices a model can route: those of its ``route_options`` (its small and big FFNs were trained for them
in stage 1), plus ``skip``, which needs no module (the paper lets the oracle and the router skip layers of a
model trained with small / big routing only). The paper's three settings are
`router_settings.ROUTER_SETTINGS`.

This module is the run (`train_router`, read top to bottom in `_train_router`); its arguments and router targets are
in `router_arguments`, the oracle supervision in `router_oracle`, the evaluation and the report in `router_evaluation`.
Data, optimizer, scheduler, checkpoints, trackers and resume checks are stage 1's (`loaders`, `building`,
`checkpointing`, `loop`, `fingerprint`); the output folder
holds the model with its routers (``save_pretrained``, ``routing="learned"``), the tokenizer,
``training_args.json``, ``train_results.json`` and ``router_report.json`` (`ROUTER_REPORT_FILE`). A checkpoint holds
the whole model (Accelerate's ``save_state``), although only the routers change.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from ..data.corpus import pack_corpus
from ..data.tokenization import check_tokenizer_fits, has_tokenizer, load_tokenizer
from ..models.losses import usage_loss
from ..models.modeling_duo import DUO_CONFIG_FIELDS
from ..models.routed_ffn import (
    freeze_all_but_routers,
    router_probabilities,
    router_temperature,
    set_router_temperature,
)
from ..models.routes import CHOICE_NAMES
from ..oracle.results import OracleResult
from ..utils.errors import MissingFileError, UsageError
from ..utils.files import atomic_write_json
from ..utils.loading import inspect_duo_source, load_duo_model
from ..utils.processes import process_state
from ..utils.run_files import ROUTER_REPORT_FILE
from ..utils.run_folder import run_lock
from .arguments import parse_arguments
from .building import build_optimizer, build_scheduler
from .checkpointing import (
    CHECKPOINTS_DIR,
    TrainState,
    restore_train_state,
    save_checkpoint_if_due,
)
from .fingerprint import training_fingerprint
from .loaders import load_corpora, make_eval_loaders, make_train_loader, total_training_steps, training_batches
from .loop import (
    StepMeter,
    accelerated_run,
    backward_and_step,
    progress_bar,
    record_step,
    run_identity,
    start_or_resume,
    tracker_config,
)
from .router_arguments import (
    DEFAULT_BLOCK_SIZE,
    RouterTargets,
    RouterTrainArguments,
    oracle_layer_budget,
    parse_route_options,
    resolve_router_targets,
)
from .router_evaluation import eval_metrics, evaluate_router, router_report
from .router_oracle import (
    calibrate_routers,
    calibrated,
    calibration_rows,
    compute_oracle_targets,
    oracle_router_loss,
    oracle_target_blocks,
    targets_folder,
)
from .train import save_final


@dataclass
class RouterTrainResult:
    """What a router run did: steps, tokens, the total loss of each optimizer step it ran, and its report."""

    output_dir: str
    global_step: int
    tokens_seen: int
    losses: dict[int, float]
    report: dict


def add_routers(model, route_options: Sequence[str | int], seed: int = 0, temperature: float = 1.0):
    """Give every layer of a Duo model a fresh router over ``route_options`` and switch it to learned routing.

    Routers the model already had are replaced. Router weights are drawn with the model's initialisation under
    ``seed`` (the global random state is left as it was). The config's ``route_probs`` keep the probabilities of
    the choices still allowed (renormalised; uniform if none is left) and a ``pattern`` using a choice no
    longer allowed is dropped, so the model stays valid in every routing mode. Returns the model.
    """
    config = model.config
    options = parse_route_options(route_options)
    kept = {name: p for name, p in config.route_probs.items() if name in options and p > 0}
    total = sum(kept.values())
    probs = {name: kept.get(name, 0.0) / total for name in options} if total > 0 else None
    pattern = config.pattern
    if pattern is not None and any(CHOICE_NAMES[c] not in options for c in pattern):
        pattern = None
    previous = {key: getattr(config, key) for key in DUO_CONFIG_FIELDS}
    old_routers = [layer.mlp.router for layer in model.model.layers]
    try:
        config.route_options, config.route_probs, config.pattern = options, probs, pattern
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
    set_router_temperature(model, temperature)
    return model


def train_router(
    args: RouterTrainArguments,
    step_callback: Callable[[TrainState, dict], None] | None = None,
    *,
    train_blocks: datasets.Dataset | None = None,
    eval_loaders: Mapping[str, DataLoader] | None = None,
) -> RouterTrainResult:
    """Train the routers of a frozen Duo model as ``args`` say (see the module docstring); return the result.

    Every check on the inputs runs before any training time is spent. ``step_callback(state, metrics)`` is
    called after each optimizer step (and its logging, evaluation and checkpoint) on every process.
    ``train_blocks`` (the training corpus already packed in ``args.block_size`` blocks, column ``input_ids``) and
    ``eval_loaders`` (held-out loaders by name) replace reading and packing ``args.dataset`` and the holdouts, so
    that several runs on the same data (a study) pack it once.
    """
    args.validate()
    source_config = inspect_duo_source(args.model)  # checked by validate; read again for the run
    options, targets = resolve_router_targets(args, source_config)
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
    with run_lock(args.output_dir, "router training run"):  # one writer per run folder, checks to final save
        resume_dir = start_or_resume(args, "router training run")

        router_targets = RouterTargets(options, targets, oracle_budget)
        with accelerated_run(args, resume_dir) as accelerator:
            data = (train_blocks, eval_loaders)
            return _train_router(
                args, accelerator, router_targets, source_config, resume_dir, checkpoints_dir, step_callback, data
            )


def _train_router(args, accelerator, router_targets, source_config, resume_dir, checkpoints_dir, step_callback, data):
    run = run_identity(resume_dir, training_fingerprint(args, accelerator), "router training run")
    set_seed(args.seed)
    tokenizer, train_blocks, eval_loaders = _router_data(args, source_config, data)
    model = load_duo_model(args.model)
    calibration_set = None
    if args.supervision == "oracle":
        train_blocks, calibration_set = _oracle_rows(args, model, accelerator, router_targets, train_blocks)
    schedule = args.temperature_plan(1)  # replaced below once the number of steps is known
    router_seed = args.seed if args.router_seed is None else args.router_seed
    add_routers(model, router_targets.options, seed=router_seed, temperature=schedule(0))
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
    targets_named = {CHOICE_NAMES[code]: value for code, value in router_targets.targets.items()}
    accelerator.init_trackers(
        args.run_name,
        config=tracker_config(
            args,
            {
                "route_options_resolved": ",".join(router_targets.options),
                "target_usage_resolved": json.dumps(targets_named),
                "oracle_budget_resolved": str(router_targets.oracle_budget),
                "total_steps": total_steps,
                "trainable_parameters": sum(p.numel() for p in trainable),
            },
        ),
    )

    losses: dict[int, float] = {}
    results: dict[str, dict] = {}
    progress = progress_bar(args, accelerator, state, total_steps, "train routers")
    # Averaged per step and per log window: the total loss, the main loss (the LM's CE, or the routers' CE towards
    # the oracle) and the usage loss; the routers' choices are counted per log window (`RouterChoiceCounts`).
    main_name = "train/router_ce" if args.supervision == "oracle" else "train/ce"
    meter = StepMeter(
        accelerator,
        ["train/loss", main_name, "train/usage_loss"],
        args.batch_size * args.block_size * accelerator.num_processes,
    )
    choices = RouterChoiceCounts(accelerator.device, distilled=args.supervision == "oracle")
    calibrate = calibration_set is not None  # the final eval comes after
    model.train()
    for batch in training_batches(train_loader, accelerator, state, total_steps, args):
        temperature = schedule(state.global_step)
        set_router_temperature(unwrapped, temperature)
        with accelerator.accumulate(model):
            loss, main, usage, router_logits = _router_losses(model, batch, args, router_targets, temperature)
            backward_and_step(accelerator, loss, optimizer, scheduler, trainable, args.max_grad_norm)
        meter.add(loss, main, usage)
        oracle_routes = (batch["routes"], batch["token_mask"]) if args.supervision == "oracle" else None
        choices.add(router_probabilities(router_logits.detach(), temperature), oracle_routes)
        if not accelerator.sync_gradients:
            continue

        step_values = record_step(meter, state, losses, checkpoints_dir, progress)
        step_loss = step_values["train/loss"]
        progress.set_postfix(loss=f"{step_loss:.3f}", usage=f"{step_values['train/usage_loss']:.4f}")

        metrics: dict[str, float] = {}
        last = state.global_step >= total_steps
        if state.global_step % args.log_every == 0 or last:
            metrics.update(
                {
                    **meter.log_metrics(state, scheduler),
                    "train/temperature": temperature,
                    **choices.log_metrics(accelerator),
                }
            )
        if eval_loaders and (
            (args.eval_every and state.global_step % args.eval_every == 0) or (last and not calibrate)
        ):
            if calibrate:  # the distilled routers are measured as they will be used: calibrated
                with calibrated(unwrapped, *calibration_set):
                    results = evaluate_router(model, eval_loaders, accelerator)
            else:
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
        calibration = calibrate_routers(unwrapped, *calibration_set)
    if eval_loaders and (calibration is not None or not results):  # after calibration, or a resumed finished run
        results = evaluate_router(model, eval_loaders, accelerator)
        accelerator.log(eval_metrics(results), step=state.global_step)
    temperature_final = router_temperature(unwrapped)
    report = router_report(
        args,
        unwrapped.config,
        router_targets,
        state,
        results,
        choices.train_realised,
        choices.train_agreement,
        temperature_final,
    )
    report["oracle_calibration"] = calibration
    save_final(args, accelerator, model, tokenizer, state, eval_metrics(results), run_id=run["run_id"])
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / ROUTER_REPORT_FILE, report, newline=False)
    accelerator.wait_for_everyone()
    return RouterTrainResult(str(output_dir), state.global_step, state.tokens_seen, losses, report)


def _router_data(args, source_config, data) -> tuple:
    """The tokenizer of the run, its training blocks and its held-out loaders: ``data`` (blocks, loaders) where
    given, else read and packed from ``args.dataset`` and the holdouts."""
    train_blocks, eval_loaders = data
    if train_blocks is None or eval_loaders is None:
        train_texts, holdout_texts = load_corpora(args)
    tokenizer_dir = args.tokenizer or args.model
    if args.tokenizer is None and not has_tokenizer(args.model):
        raise MissingFileError(
            f"model {args.model!r} holds no tokenizer; pass --tokenizer with the tokenizer the model was trained with."
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer_fits(tokenizer, source_config.vocab_size, f"model {args.model!r}")
    if train_blocks is None:
        train_blocks = pack_corpus(train_texts, tokenizer, args.block_size, f"dataset {args.dataset!r}")
    if eval_loaders is None:
        eval_loaders = make_eval_loaders(holdout_texts, tokenizer, args)
    return tokenizer, train_blocks, eval_loaders


def _oracle_rows(args, model, accelerator, router_targets, train_blocks) -> tuple:
    """Distillation: the oracle's routes as training rows, and the blocks the routers are calibrated on (or None).

    The oracle's targets are computed once (or read), before the routers are added: the oracle routes the Duo model
    over the router's options; the rows then replace the packed corpus as training data.
    """
    if args.oracle_targets is not None:
        result, source = OracleResult.load(args.oracle_targets), args.oracle_targets
    else:
        # islice, not select: a streamed corpus (an IterableDataset) has no length.
        ids = torch.stack([row["input_ids"] for row in itertools.islice(train_blocks, args.oracle_blocks)])
        count = len(ids)
        source = str(targets_folder(Path(args.output_dir)))
        result = compute_oracle_targets(
            model.to(accelerator.device),
            ids,
            [router_targets.oracle_budget],
            source,
            route_options=router_targets.options,
            causal=args.oracle_causal,
            batch_size=args.oracle_batch_size,
            chunk_tokens=args.oracle_chunk_tokens,
            data_id=f"{args.dataset}: first {count} training blocks of {args.block_size} tokens",
            model_id=str(args.model),
            progress=args.progress,
        )
    rows = oracle_target_blocks(result, router_targets.oracle_budget, args.oracle_causal, source)
    calibration_set = None
    if args.oracle_calibration_blocks:
        calibration_set = calibration_rows(rows, args.oracle_calibration_blocks, accelerator.device)
    return rows, calibration_set


def _router_losses(model, batch, args, router_targets, temperature: float) -> tuple:
    """The step's loss (main + alpha * usage loss), its two parts and the router logits.

    The main loss is the LM's cross-entropy under learned routing, or, distilling, the routers' cross-entropy
    towards the oracle's choices under teacher forcing: the model follows the oracle's routes, and each router sees
    the FFN input there.
    """
    ids = batch["input_ids"]
    if args.supervision == "oracle":
        routes, mask = batch["routes"], batch["token_mask"]
        out = model(input_ids=ids, routes=routes, output_router_logits=True, logits_to_keep=1)
        probs = router_probabilities(out.router_logits, temperature)
        main = oracle_router_loss(probs, routes, mask, args.oracle_label_smoothing)
    else:
        out = model(input_ids=ids, labels=ids, routing="learned")
        main = out.loss
    usage = usage_loss(out.router_logits, router_targets.targets, temperature=temperature)
    return main + args.alpha * usage, main, usage, out.router_logits


class RouterChoiceCounts:
    """The routers' choices over a log window, summed on each process: their hard (argmax) choice counts, their soft
    probabilities and, distilling, their agreement with the oracle's choices."""

    def __init__(self, device: torch.device, distilled: bool):
        self.distilled = distilled
        self.hard = torch.zeros(len(CHOICE_NAMES), dtype=torch.float64, device=device)
        self.soft = torch.zeros(len(CHOICE_NAMES), dtype=torch.float64, device=device)
        self.agreement = torch.zeros(2, dtype=torch.float64, device=device)  # hits, counted pairs
        self.train_realised: dict[str, float] = {}  # of the last log window
        self.train_agreement: float | None = None

    def add(self, probs: torch.Tensor, oracle_routes: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Count a micro-batch's router probabilities; ``oracle_routes`` (routes, token mask) when distilling."""
        choice = probs.argmax(-1)
        self.hard += torch.bincount(choice.reshape(-1), minlength=len(CHOICE_NAMES)).double()
        self.soft += probs.double().reshape(-1, len(CHOICE_NAMES)).sum(0)
        if oracle_routes is not None:
            routes, mask = oracle_routes
            hits = (choice == routes)[mask]
            self.agreement += torch.stack([hits.sum(), torch.tensor(hits.numel(), device=hits.device)]).double()

    def log_metrics(self, accelerator) -> dict[str, float]:
        """The window's realised and soft fractions (and oracle agreement), summed over processes; starts a new
        window."""
        hard = accelerator.reduce(self.hard, "sum")
        soft = accelerator.reduce(self.soft, "sum")
        self.train_realised = {n: (hard[c] / hard.sum().clamp_min(1)).item() for c, n in enumerate(CHOICE_NAMES)}
        metrics = {
            **{f"train/realised/{n}": v for n, v in self.train_realised.items()},
            **{f"train/soft/{n}": (soft[c] / soft.sum().clamp_min(1e-12)).item() for c, n in enumerate(CHOICE_NAMES)},
        }
        if self.distilled:
            hits, pairs = accelerator.reduce(self.agreement, "sum").tolist()
            self.train_agreement = hits / max(pairs, 1.0)
            metrics["train/oracle_agreement"] = self.train_agreement
        for counts in (self.hard, self.soft, self.agreement):
            counts.zero_()
        return metrics


def main(argv: list[str] | None = None) -> RouterTrainResult:
    """``training/train_router.py`` (and ``duo-llm train-router``): parse the flags, train the routers, print where
    the model went and its realised usage."""
    result = train_router(parse_arguments(RouterTrainArguments, argv))
    if not process_state().is_main_process:
        return result
    print(f"Saved the model with routers to {result.output_dir} after {result.global_step} steps.")
    for name, entry in result.report["holdouts"].items():
        fractions = ", ".join(f"{choice} {value:.3f}" for choice, value in entry["realised"]["overall"].items())
        print(f"  {name}: perplexity {entry['ppl']:.3f} at realised fractions {fractions}")
    return result


__all__ = ["RouterTrainResult", "add_routers", "main", "train_router"]
