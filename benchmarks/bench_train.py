"""Training throughput of a Duo model at p_big against a dense LlamaForCausalLM of the same dimensions.

Both models are built by `duo_llm_hf.training.building` and trained by `training.loop.training_step` (Accelerate,
AdamW, gradient clipping) on the same random token blocks; the Duo model draws fresh random routes every step
(stage 1). The two are timed alternately, round after round (ABBA order), and the medians are compared, so that load
from other processes on a shared machine hits both alike. Reported:

    FLOP efficiency = (t_dense / t_duo) / (FLOPs_dense / FLOPs_duo)

where t is the median time of a training step and FLOPs the forward FLOPs per token of `duo_llm_hf.utils.flops`
(training costs about 3x forward for both, so the ratio is the same). 1.0 means the Duo model turns every
FLOP it saves into time saved.

On a CPU the time is taken by two clocks: the wall clock, and the CPU time of this process
(`time.process_time`). On a machine shared with other jobs, the wall clock also counts the time the process
waits for a core, which changes with the others' load from one step to the next; with ``--threads 1`` the CPU
time counts only the work of the step and is the steadier measure. On a GPU only the wall clock is used.

    PYTHONPATH=src python benchmarks/bench_train.py                       # hidden 512, 8 layers, seq 256
    PYTHONPATH=src python benchmarks/bench_train.py --profile             # where the time of each step goes
    PYTHONPATH=src python benchmarks/bench_train.py --part ffn            # one layer's FFN alone

``--part ffn`` times one layer's FFN (forward + backward on ``[batch, seq, hidden]``): the dense big MLP, the
Duo FFN's gather/run/scatter dispatch under random routes, and an *ideal* split that runs the big and small
MLPs on contiguous halves with no gather or scatter, so the dispatch overhead shows on its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from transformers import LlamaForCausalLM

from duo_llm_hf import DuoLlamaForCausalLM, RouteSampler, flops_per_token
from duo_llm_hf.models.routed_ffn import compile_ffns
from duo_llm_hf.training.arguments import TrainArguments
from duo_llm_hf.training.building import build_optimizer, build_scheduler, dense_config_like, duo_config_from_args
from duo_llm_hf.training.loop import training_step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="key/value heads (default --num-heads)")
    parser.add_argument("--intermediate-size", type=int, default=None, help="big FFN inner size (default 4 x hidden)")
    parser.add_argument("--tie-embeddings", action="store_true", help="the LM head shares the embedding's weights")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--p-big", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (medians over rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step each")
    parser.add_argument(
        "--no-fused-optimizer",
        action="store_true",
        help="AdamW's per-parameter loop instead of its fused kernel",
    )
    parser.add_argument("--part", choices=["model", "ffn"], default="model", help="whole training step or FFN")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="Accelerate's")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the FFNs (models.routed_ffn.compile_ffns)"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend, with --compile")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="stop after the round that passes this time (at least one)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def build(args: argparse.Namespace):
    """The Duo model (random routing at p_big), the dense model with the same dims (all big), and a trainer
    each (optimizer, scheduler) from the training library."""
    train_args = TrainArguments(
        output_dir="unused",
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        block_size=args.seq_len,
        p_big=args.p_big,
        batch_size=args.batch_size,
        seed=args.seed,
        warmup_steps=0,
        fused_optimizer=not args.no_fused_optimizer,
    )
    torch.manual_seed(args.seed)
    duo_config = duo_config_from_args(train_args, args.vocab_size, tie_word_embeddings=args.tie_embeddings)
    dense_config = dense_config_like(duo_config, duo_config.intermediate_size)
    models = {"duo": DuoLlamaForCausalLM(duo_config), "dense": LlamaForCausalLM(dense_config)}
    if args.compile:
        for model in models.values():
            compile_ffns(model, args.compile_backend)
    total = args.warmup + args.steps * args.rounds + 2
    trainers = {}
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    for name, model in models.items():
        optimizer = build_optimizer(model, train_args)
        scheduler = build_scheduler(optimizer, train_args, total)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        trainable = [p for p in model.parameters() if p.requires_grad]
        trainers[name] = (model, optimizer, scheduler, trainable)
    flops = {
        "duo": flops_per_token(duo_config, seq_len=args.seq_len).total,
        "dense": flops_per_token(dense_config, {"big": 1.0}, seq_len=args.seq_len).total,
    }
    return accelerator, trainers, flops, duo_config


def run_steps(accelerator, trainer, batch, steps: int) -> dict[str, float]:
    """Seconds per training step, by the wall clock and by this process's CPU time."""
    model, optimizer, scheduler, trainable = trainer
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        training_step(accelerator, model, batch, optimizer, scheduler, trainable, max_grad_norm=1.0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"wall": (time.perf_counter() - wall) / steps, "cpu": (time.process_time() - cpu) / steps}


def device_is_cpu(accelerator) -> bool:
    return accelerator.device.type == "cpu"


def profile_step(accelerator, trainer, batch, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(accelerator, trainer, batch, 1)
    print(f"\n== {name}: top operators of one training step (self CPU time) ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def bench_ffn(args: argparse.Namespace) -> dict:
    """Forward + backward of one layer's FFN: dense big MLP, Duo dispatch, and the ideal contiguous split."""
    _, trainers, _, config = build(args)
    duo_ffn = trainers["duo"][0].model.layers[0].mlp
    big, small = duo_ffn.big, duo_ffn.small
    sampler = RouteSampler(config.route_probs, args.seed)
    hidden = torch.randn(args.batch_size, args.seq_len, args.hidden_size, requires_grad=True)
    n_big = round(args.p_big * args.batch_size * args.seq_len)
    flat = hidden.view(-1, args.hidden_size)
    cases = {
        "dense": lambda: big(hidden),
        "duo": lambda: duo_ffn.dispatch(hidden, sampler.sample(hidden.shape[:-1])),
        "ideal": lambda: torch.cat([big(flat[:n_big]), small(flat[n_big:])]),
    }

    def run(case):
        start = time.process_time()  # CPU time of this process: see the module docstring
        for _ in range(args.steps):
            cases[case]().pow(2).mean().backward()
        return (time.process_time() - start) / args.steps

    for case in cases:
        run(case)
    times = {case: [] for case in cases}
    for round_index in range(args.rounds):
        order = list(cases) if round_index % 2 == 0 else list(reversed(cases))
        for case in order:
            times[case].append(run(case))
    median = {case: statistics.median(values) for case, values in times.items()}
    flop_ratio = config.intermediate_size / (
        args.p_big * config.intermediate_size + (1 - args.p_big) * config.small_intermediate_size
    )
    print(
        f"one FFN, {args.batch_size} x {args.seq_len} tokens, hidden {args.hidden_size}, p_big {args.p_big}, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} rounds x {args.steps}"
    )
    print("| FFN | ms (fwd + bwd) | t_dense / t | FLOP efficiency |")
    print("|---|---:|---:|---:|")
    for case in cases:
        speedup = median["dense"] / median[case]
        efficiency = speedup / flop_ratio if case != "dense" else 1.0
        print(f"| {case} | {median[case] * 1e3:.1f} | {speedup:.3f} | {efficiency:.3f} |")
    return {"median_seconds": median, "flop_ratio": flop_ratio}


def measure(args: argparse.Namespace) -> dict:
    """Dense and Duo training steps timed side by side (ABBA rounds); the figures of `main`, without printing."""
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator, trainers, flops, duo_config = build(args)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids.to(accelerator.device)}

    start = time.perf_counter()
    for trainer in trainers.values():
        run_steps(accelerator, trainer, batch, args.warmup)
    warmup_seconds = time.perf_counter() - start
    if args.profile:
        for name, trainer in trainers.items():
            profile_step(accelerator, trainer, batch, name)

    clocks = ("cpu", "wall") if device_is_cpu(accelerator) else ("wall",)
    times = {clock: {name: [] for name in trainers} for clock in clocks}
    start = time.perf_counter()
    for round_index in range(args.rounds):
        order = ["duo", "dense"] if round_index % 2 == 0 else ["dense", "duo"]
        for name in order:
            measured = run_steps(accelerator, trainers[name], batch, args.steps)
            for clock in clocks:
                times[clock][name].append(measured[clock])
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            break
    device = str(accelerator.device)
    peak_memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    del trainers
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    tokens = args.batch_size * args.seq_len
    flop_ratio = flops["dense"] / flops["duo"]
    result = {
        "config": {
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "num_kv_heads": duo_config.num_key_value_heads,
            "tie_embeddings": args.tie_embeddings,
            "intermediate_size": duo_config.intermediate_size,
            "small_intermediate_size": duo_config.small_intermediate_size,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "vocab_size": args.vocab_size,
            "p_big": args.p_big,
            "fused_optimizer": not args.no_fused_optimizer,
            "mixed_precision": args.mixed_precision,
            "compile": args.compile and args.compile_backend,
        },
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "forward_flops_per_token": flops,
        "flop_ratio": flop_ratio,
        "rounds": len(times[clocks[0]]["duo"]),
        "warmup_seconds": warmup_seconds,
        "peak_memory_bytes": peak_memory,
    }
    for clock in clocks:
        median = {name: statistics.median(values) for name, values in times[clock].items()}
        speedup = median["dense"] / median["duo"]
        # Adjacent measurements share the load of that moment: their ratio is a second, drift-robust estimate.
        ratios = [dense / duo for dense, duo in zip(times[clock]["dense"], times[clock]["duo"])]
        result[clock] = {
            "seconds_per_step": times[clock],
            "median_seconds_per_step": median,
            "tokens_per_second": {name: tokens / t for name, t in median.items()},
            "speedup": speedup,
            "flop_efficiency": speedup / flop_ratio,
            "flop_efficiency_median_of_round_ratios": statistics.median(ratios) / flop_ratio,
        }
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.part == "ffn":
        if args.threads:
            torch.set_num_threads(args.threads)
        return bench_ffn(args)
    result = measure(args)
    clocks = [clock for clock in ("cpu", "wall") if clock in result]
    tokens = args.batch_size * args.seq_len
    print(
        f"hidden {args.hidden_size}, {args.num_layers} layers, seq {args.seq_len}, batch {args.batch_size}, "
        f"vocab {args.vocab_size}, p_big {args.p_big}; {result['device']}, {result['threads']} threads; "
        f"median of {result['rounds']} alternating rounds x {args.steps} steps; FLOP ratio {result['flop_ratio']:.3f}"
    )
    print("| clock | model | s / step (median) | tokens / s | t_dense / t_duo | FLOP efficiency |")
    print("|---|---|---:|---:|---:|---:|")
    for clock in clocks:
        median, speedup = result[clock]["median_seconds_per_step"], result[clock]["speedup"]
        for name in ("dense", "duo"):
            extra = f"{speedup:.3f} | {speedup / result['flop_ratio']:.3f}" if name == "duo" else "1 | 1"
            print(f"| {clock} | {name} | {median[name]:.3f} | {tokens / median[name]:,.0f} | {extra} |")
    for clock in clocks:
        print(
            f"{clock} time: FLOP efficiency {result[clock]['flop_efficiency']:.3f} from the medians, "
            f"{result[clock]['flop_efficiency_median_of_round_ratios']:.3f} as the median of per-round ratios"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
