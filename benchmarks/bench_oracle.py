"""Prefix-tree oracle engine vs the naive loop (one model(...) call per pattern), side by side in one run.

Default setting (issue 4): the full 2^12 space over small/big of a 12-layer DuoLlama (hidden 128, inner 512, small
inner 32, 4 heads, vocab 512), 32 sequences of 128 tokens, fp32. The engine runs the whole space with the study's
reductions (oracle, fixed, best-of-100 for the whole space and every BIG count, all-small / all-big losses). The
naive loop is timed on a random sample of patterns (half before the engine, half after, so that a change in
machine load hits both sides) and scaled to the whole space: its cost is linear in the number of patterns.
Reported: measured speed-up, the FLOP-predicted speed-up (`duo_llm_hf.oracle.engine.tree_flops`: attention + FFN + LM
head, per pattern naively vs per tree node) and their ratio (target >= 0.8).

    PYTHONPATH=src python benchmarks/bench_oracle.py                      # the issue's setting (minutes on CPU)
    PYTHONPATH=src python benchmarks/bench_oracle.py --layers 8 --sequences 8   # a quick look

With ``--model`` (a Duo model folder, e.g. SmolLM2-135M converted by ``duo-llm convert``) it times the engine's
leaves on that model instead, before and after side by side in one run: the LM head over a whole leaf chunk at once
(its ``[tokens, vocab]`` logits, then the cross-entropy: the engine before) against the LM head in blocks of 256
rows, only where there is a target (`engine.leaf_losses`, the engine now). Both walk the same prefix tree of the
``--budget`` patterns on random token blocks, alternately (before, after, before, after), and must give the same
losses. Reported: CPU seconds, pattern-tokens per second and the GFLOP/s achieved by the FLOP model
(`engine.tree_flops`) for each side.

    PYTHONPATH=src python benchmarks/bench_oracle.py --model runs/smollm2-duo --route-options big,skip \
        --budget big=29 --sequences 2 --seq-len 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.oracle.engine import default_chunk_tokens, oracle_search, tree_flops
from duo_llm_hf.oracle.run import study_space


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--naive-sample", type=int, default=24, help="patterns timed on the naive side")
    p.add_argument("--best-of-k", type=int, default=100)
    p.add_argument(
        "--chunk-tokens", type=int, help="default: the engine's (4096 on CPU; on GPU, what half the free memory holds)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's weights")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1, see Clock)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--model", help="a Duo model folder: time the leaves before / after on it (see above)")
    p.add_argument("--route-options", default="big,skip", help="--model: the choices searched")
    p.add_argument("--budget", action="append", help="--model: budgets of the tree (repeatable; default big=N-1)")
    p.add_argument("--repeats", type=int, default=2, help="--model: rounds of (before, after)")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Wall seconds and CPU seconds of this process between `start` and `stop` (summed over calls)."""

    def __init__(self, device: str):
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self):
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu

    def seconds(self) -> float:
        """The headline measure: CPU seconds on a CPU (one thread: other jobs on a shared machine do not count),
        wall seconds on a GPU."""
        return self.cpu if self.device == "cpu" else self.wall


@torch.no_grad()
def run_naive(model, ids, patterns, device) -> None:
    """One full forward with labels per pattern, every token on that pattern."""
    for pattern in patterns:
        model(ids, labels=ids, routes=pattern.to(device).expand(*ids.shape, -1))


def measure(args: argparse.Namespace) -> dict:
    """The engine over the whole space against a sample of naive patterns scaled to it; the figures of `main`."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DuoLlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=args.seq_len,
        route_options=["small", "big"],
    )
    model = DuoLlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, args.vocab, (args.sequences, args.seq_len), device=args.device)
    space = study_space(config, ["all", "classes"])
    flops = tree_flops(config, space, args.seq_len)
    generator = torch.Generator().manual_seed(1)
    sample = space.patterns[torch.randperm(space.size, generator=generator)[: args.naive_sample]]
    half = len(sample) // 2
    chunk_tokens = args.chunk_tokens or default_chunk_tokens(args.device, config)

    run_naive(model, ids, sample[:1], args.device)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    naive, tree = Clock(args.device), Clock(args.device)
    with naive:
        run_naive(model, ids, sample[:half], args.device)
    with tree:
        oracle_search(model, ids, space, best_of_k=args.best_of_k, uniform=["small", "big"], chunk_tokens=chunk_tokens)
    with naive:
        run_naive(model, ids, sample[half:], args.device)
    scale = space.size / len(sample)
    measured = naive.seconds() * scale / tree.seconds()
    predicted = flops["predicted_speedup"]
    pattern_tokens = space.size * args.sequences * args.seq_len
    return {
        "patterns": space.size,
        "naive_patterns_timed": len(sample),
        "naive_seconds_per_pattern": {"wall": naive.wall / len(sample), "cpu": naive.cpu / len(sample)},
        "naive_seconds_scaled": {"wall": naive.wall * scale, "cpu": naive.cpu * scale},
        "tree_seconds": {"wall": tree.wall, "cpu": tree.cpu},
        "tree_pattern_tokens_per_second": pattern_tokens / tree.seconds(),
        "naive_pattern_tokens_per_second": pattern_tokens / (naive.seconds() * scale),
        "measured_speedup": measured,
        "measured_speedup_wall": naive.wall * scale / tree.wall,
        "flop_predicted_speedup": predicted,
        "ratio": measured / predicted,
        "flops_per_token": flops,
        "chunk_tokens": chunk_tokens,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
        "setting": {**vars(args), "threads": torch.get_num_threads()},
    }


@torch.no_grad()
def measure_model(args: argparse.Namespace) -> dict:
    """The leaves before (the whole chunk's logits at once) and after (`leaf_losses`) on a saved Duo model."""
    from duo_llm_hf.oracle.engine import walk_prefix_tree
    from duo_llm_hf.utils.loading import allow_route_options, load_duo_model

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = load_duo_model(args.model, dtype=getattr(torch, args.dtype), what="--model").to(args.device).eval()
    options = args.route_options.split(",")
    allow_route_options(model.config, options)
    config = model.config
    budgets = args.budget or [f"big={config.num_hidden_layers - 1}"]
    space = study_space(config, budgets, options)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.seq_len), generator=generator).to(args.device)
    chunk_tokens = args.chunk_tokens or default_chunk_tokens(args.device, config)
    clocks = {"before": Clock(args.device), "after": Clock(args.device)}
    losses = {}

    def run(side: str) -> None:
        table = torch.zeros(space.size, *ids.shape, device=args.device)

        def keep(indices, chunk, logits) -> None:
            table[space.ranks(indices).to(args.device)] = chunk

        with clocks[side]:
            walk_prefix_tree(model, ids, space, keep, chunk_tokens=chunk_tokens, with_logits=side == "before")
        losses[side] = table

    for _ in range(args.repeats):
        run("before")
        run("after")
    pattern_tokens = space.size * ids.numel() * args.repeats
    flops = tree_flops(config, space, args.seq_len)["tree"]["total"] * ids.numel() * args.repeats
    sides = {
        side: {
            "seconds": {"wall": clock.wall, "cpu": clock.cpu},
            "pattern_tokens_per_second": pattern_tokens / clock.seconds(),
            "pattern_tokens_per_wall_second": pattern_tokens / clock.wall,
            "gflop_per_second": flops / clock.seconds() / 1e9,
        }
        for side, clock in clocks.items()
    }
    return {
        "model": args.model,
        "patterns": space.size,
        "budgets": space.labels,
        "tokens": ids.numel(),
        "repeats": args.repeats,
        "gflop_per_pattern_token": flops / pattern_tokens / 1e9,
        "max_loss_difference": float((losses["before"] - losses["after"]).abs().max()),
        "speedup": clocks["before"].seconds() / clocks["after"].seconds(),
        "chunk_tokens": chunk_tokens,
        "sides": sides,
        "setting": {**vars(args), "threads": torch.get_num_threads()},
    }


def main_model(args: argparse.Namespace) -> dict:
    figures = measure_model(args)
    unit = "CPU s" if args.device == "cpu" else "s"
    print(
        f"{args.model}: {figures['patterns']:,} patterns ({', '.join(figures['budgets'])}) x {figures['tokens']} "
        f"tokens, {figures['repeats']} rounds; {figures['gflop_per_pattern_token']:.3f} GFLOP per pattern-token; "
        f"device {args.device}, {figures['setting']['threads']} threads"
    )
    for side, label in (("before", "LM head on the whole chunk"), ("after", "LM head in blocks of 256 rows")):
        f = figures["sides"][side]
        clock = f["seconds"]["cpu" if args.device == "cpu" else "wall"]
        print(
            f"{side:>6} ({label}): {clock:.1f} {unit} (wall {f['seconds']['wall']:.1f} s), "
            f"{f['pattern_tokens_per_second']:.0f} pattern-tokens per {unit}, "
            f"{f['gflop_per_second']:.1f} GFLOP/s"
        )
    print(f"speed-up {figures['speedup']:.2f}x; largest loss difference {figures['max_loss_difference']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.model:
        return main_model(args)
    figures = measure(args)
    space_size, sampled = figures["patterns"], figures["naive_patterns_timed"]
    half = sampled // 2
    unit = "CPU s" if args.device == "cpu" else "s"
    clock = "cpu" if args.device == "cpu" else "wall"
    naive_scaled = figures["naive_seconds_scaled"]
    print(
        f"DuoLlama {args.layers} layers, hidden {args.hidden}, inner {args.intermediate}/"
        f"{args.intermediate // 16}, vocab {args.vocab}; {args.sequences} x {args.seq_len} tokens; "
        f"{space_size:,} patterns; device {args.device}, {figures['setting']['threads']} threads"
    )
    print(
        f"naive: {figures['naive_seconds_per_pattern'][clock]:.3f} {unit}/pattern over {sampled} sampled patterns "
        f"({half} before, {sampled - half} after the engine), scaled to {space_size:,} patterns: "
        f"{naive_scaled[clock]:.1f} {unit} (wall {naive_scaled['wall']:.1f} s)"
    )
    tree = figures["tree_seconds"]
    print(f"prefix tree (whole space, all reductions): {tree[clock]:.1f} {unit} (wall {tree['wall']:.1f} s)")
    flops = figures["flops_per_token"]
    naive_mflop = flops["naive"]["total"] / space_size / 1e6
    tree_mflop = flops["tree"]["total"] / space_size / 1e6
    print(
        f"speed-up measured {figures['measured_speedup']:.2f}x (wall {figures['measured_speedup_wall']:.2f}x), "
        f"FLOP-predicted {figures['flop_predicted_speedup']:.2f}x (naive {naive_mflop:.2f} vs tree "
        f"{tree_mflop:.2f} MFLOP per pattern-token), ratio {figures['ratio']:.2f} (target >= 0.8)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
