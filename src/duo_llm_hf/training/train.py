"""Stage 1 training with Accelerate: random routing from scratch, frozen-big, and the dense baseline.

The paper's stage 1 trains a Duo model from scratch while every token in every layer goes to the big or the
small FFN at random (p_big = 0.5). Two comparisons are trained by the same loop: *frozen-big* (start from a
trained dense Llama or OPT, or the big path of a Duo model, freeze it and train only the small FFNs; the
paper's Fig. 8c, and its Appendix A recipe in `finetune`) and the *dense baseline* (a plain
`LlamaForCausalLM` whose FFN inner size matches the Duo model's FLOPs at the given p_big; Fig. 8a/b).

This module is the run, read top to bottom in `_train` as in accelerate's ``run_clm_no_trainer.py``: data, model,
optimizer, the loop, the final save. Its pieces live next to it and are reused by the router training, the
ablations and the study: the arguments (`arguments.TrainArguments`), the data (`loaders`), the model, optimizer
and scheduler (`building`), the evaluation (`evaluation.evaluate_perplexity`), the fingerprint of a resumable run
(`fingerprint`), what both training loops share (`loop`) and the checkpoints (`checkpointing`). `ModelHooks` lets
a recipe change the model it trains and saves. ``training/train_duo.py`` and ``duo-llm train`` call `main`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from ..data.corpus import pack_corpus
from ..data.tokenization import check_tokenizer_fits
from ..models.routed_ffn import compile_ffns
from ..models.routes import BIG, RouteSampler
from ..utils.files import atomic_write_json
from ..utils.flops import flops_per_token
from ..utils.loading import is_duo_model
from ..utils.processes import process_state
from ..utils.run_files import TRAIN_RESULTS_FILE, TRAINING_ARGS_FILE
from ..utils.run_folder import refuse_links, run_lock
from .arguments import TrainArguments, parse_arguments
from .building import (
    build_model,
    build_optimizer,
    build_scheduler,
    inspect_init_source,
    may_leave_a_module_unused,
)
from .checkpointing import (
    CHECKPOINTS_DIR,
    RouteSamplerState,
    TrainState,
    check_finite_weights,
    restore_train_state,
    save_checkpoint_if_due,
)
from .evaluation import evaluate_perplexity
from .fingerprint import training_fingerprint
from .loaders import (
    load_corpora,
    make_eval_loaders,
    make_train_loader,
    prepare_tokenizer,
    total_training_steps,
    training_batches,
)
from .loop import (
    StepMeter,
    accelerated_run,
    progress_bar,
    record_step,
    run_identity,
    start_or_resume,
    tracker_config,
    training_step,
)


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
    """What a recipe built on `train` changes about its model (finetuning uses them all).

    ``start(model, train_blocks, accelerator)`` gets the built model (on the CPU) on a fresh run only (a resumed
    run restores its weights from the checkpoint), before ``adapt``: it may change the starting weights (the small
    FFNs' slice and distillation, `small_init`) and returns metrics for the run's train results. ``adapt(model)``
    gets the built model (frozen as the mode says) before the optimizer is made and returns the model to train;
    whatever then requires grad is trained, and checkpoints hold that model. ``export(model)`` gets the trained
    model (unwrapped from DDP) before the final ``save_pretrained`` and returns the model to save. A hook that is
    None changes nothing.
    """

    start: Callable[[torch.nn.Module, object, Accelerator], dict[str, float]] | None = None
    adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    export: Callable[[torch.nn.Module], torch.nn.Module] | None = None


def train(
    args: TrainArguments,
    step_callback: Callable[[TrainState, dict], None] | None = None,
    hooks: ModelHooks | None = None,
) -> TrainResult:
    """Run stage 1 training (or a frozen-big / dense baseline run) as ``args`` say; see `TrainArguments`.

    Every check on the inputs runs before any training time is spent. ``step_callback(state, metrics)`` is
    called after each optimizer step (and its logging, evaluation and checkpoint) on every process. ``hooks``
    let a recipe change the model to train and the model to save (`ModelHooks`; e.g. `finetune` adds LoRA).
    """
    args.validate()
    checkpoints_dir = Path(args.output_dir) / CHECKPOINTS_DIR
    with run_lock(args.output_dir, "training run"):  # one writer per run folder, from the checks to the final save
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
    tokenizer = prepare_tokenizer(args, accelerator, train_texts)
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
    start_metrics: dict[str, float] = {}
    if hooks.start is not None and resume_dir is None:
        start_metrics = hooks.start(model, train_blocks, accelerator)
    if hooks.adapt is not None:
        model = hooks.adapt(model)
    is_duo = is_duo_model(model)
    if args.torch_compile:
        compile_ffns(model)
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
    routings = args.eval_routing_list()
    eval_seed = unwrapped_config.route_seed if is_duo else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: dict[int, float] = {}
    eval_metrics: dict[str, float] = {}

    progress = progress_bar(args, accelerator, state, total_steps, "train")
    meter = StepMeter(accelerator, ["train/loss"], args.batch_size * args.block_size * accelerator.num_processes)
    model.train()
    for batch in training_batches(train_loader, accelerator, state, total_steps, args):
        if is_duo:  # the random routes of this optimizer step (p_big may move over the run)
            unwrapped.model.route_sampler.set_probs(args.route_probs_at(state.global_step, total_steps))
        with accelerator.accumulate(model):
            loss = training_step(
                accelerator, model, batch, optimizer, scheduler, trainable, args.max_grad_norm
            )
        meter.add(loss)
        if not accelerator.sync_gradients:
            continue

        step_loss = record_step(meter, state, losses, checkpoints_dir, progress)["train/loss"]
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{meter.tokens_per_second():,.0f}")

        metrics: dict[str, float] = {}
        last = state.global_step >= total_steps
        if state.global_step % args.log_every == 0 or last:
            metrics.update(meter.log_metrics(state, scheduler))
        if eval_loaders and ((args.eval_every and state.global_step % args.eval_every == 0) or last):
            eval_metrics = evaluate_perplexity(model, eval_loaders, accelerator, routings, eval_seed)
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

    save_final(
        args, accelerator, model, tokenizer, state, {**start_metrics, **eval_metrics}, hooks.export, run["run_id"]
    )
    return TrainResult(str(Path(args.output_dir)), state.global_step, state.tokens_seen, losses, eval_metrics)


def save_final(
    args, accelerator, model, tokenizer, state: TrainState, eval_metrics: dict, export=None, run_id: str | None = None
) -> None:
    """``save_pretrained`` the model (``export(model)`` if given) and tokenizer into ``output_dir``, plus the
    arguments and metrics (with the run's id); never a model whose trained weights are not finite
    (`TrainingDiverged`), nor into a folder that holds a link (`run_folder.ForeignLink`)."""
    output_dir = Path(args.output_dir)
    trained = [p for p in model.parameters() if p.requires_grad]
    check_finite_weights(accelerator, trained, state.global_step, output_dir / CHECKPOINTS_DIR)
    if accelerator.is_main_process:
        refuse_links(output_dir)  # save_pretrained writes through a link made since the run began
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
    result = train(parse_arguments(TrainArguments, argv))
    print_saved(result, "the model")
    return result


def print_saved(result: TrainResult, what: str) -> None:
    """On the main process: where ``what`` was saved, after how many optimizer steps and tokens, and its held-out
    perplexity under each evaluated routing (as router training prints its own)."""
    if not process_state().is_main_process:
        return
    steps, tokens = result.global_step, result.tokens_seen
    print(f"Saved {what} to {result.output_dir} after {steps} steps ({tokens:,} tokens).")
    for line in perplexity_lines(result.eval_metrics):
        print(f"  {line}")


def perplexity_lines(eval_metrics: dict[str, float]) -> list[str]:
    """``eval/<set>/<routing>/ppl`` metrics as one line per held-out set: ``<set>: perplexity <routing> <ppl>, ...``."""
    by_set: dict[str, list[str]] = {}
    for key, value in eval_metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "eval" and parts[3] == "ppl":
            by_set.setdefault(parts[1], []).append(f"{parts[2]} {value:.3f}")
    return [f"{name}: perplexity {', '.join(values)}" for name, values in by_set.items()]


__all__ = [
    "ModelHooks",
    "TrainResult",
    "main",
    "perplexity_lines",
    "print_saved",
    "save_final",
    "train",
]
