"""Projected cost of the exact oracle at budgets that move m layers off all-BIG, from the FLOP model.

For a Duo model of n layers searched over BIG/SKIP, the exact search of the budget ``big = n - m`` walks the prefix
tree of its C(n, m) patterns. The tree is counted in closed form (nothing is enumerated, so m = 8 at 30 layers,
5.9 million patterns, costs nothing to count): a prefix of depth d with s skips is a node when s <= m and
d - s <= n - m; each node runs its layer's attention once, each BIG child its FFN, each leaf the LM head
(`utils.flops`: attention_flops, ffn_flops, and 2 x hidden x vocab for the head), exactly as `engine.tree_flops`
counts an enumerated space (checked here against it for m <= 3). The time is FLOPs / a sustained rate that you name:
``--rate-tflops`` (default 30: about half the 67 TFLOP/s fp32 peak of an H100 / H200, the engine's fp32 GEMMs
being 576 to 1536 wide) and ``--cpu-gflops`` (what bench_oracle.py --model measured here).

    PYTHONPATH=src python benchmarks/project_oracle_cost.py --model runs/smollm2-duo --tokens 1024 \\
        --rate-tflops 30 --cpu-gflops 60
"""

from __future__ import annotations

import argparse
import json
from math import comb

from duo_llm_hf.oracle.engine import tree_flops
from duo_llm_hf.oracle.spaces import RouteSpace
from duo_llm_hf.utils.flops import attention_flops, ffn_flops
from duo_llm_hf.utils.loading import allow_route_options, inspect_duo_source


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Duo model folder (only its config is read)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per block")
    p.add_argument("--tokens", type=int, default=1024, help="tokens evaluated (blocks x block size)")
    p.add_argument("--max-moves", type=int, default=8, help="project m = 1 .. this")
    p.add_argument("--rate-tflops", type=float, default=30.0, help="sustained fp32 TFLOP/s of the accelerator")
    p.add_argument("--cpu-gflops", type=float, help="sustained GFLOP/s measured on this CPU (bench_oracle --model)")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def exact_tree_flops(config, moves: int, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the exact search of ``big = n - moves`` over BIG/SKIP, by closed-form counts."""
    n = config.num_hidden_layers
    attention, big_ffn = attention_flops(config, seq_len), ffn_flops(config, "big")

    def prefixes(depth: int, bigs_below: int) -> int:
        """Feasible prefixes of ``depth`` layers with at most ``bigs_below`` BIG layers (and at most m skips)."""
        return sum(comb(depth, s) for s in range(max(0, depth - bigs_below), min(depth, moves) + 1))

    nodes = sum(prefixes(d, n - moves) for d in range(n))  # every internal node runs one attention
    big_edges = sum(prefixes(d, n - moves - 1) for d in range(n))  # nodes with a BIG layer left to give
    leaves = comb(n, moves)
    parts = {
        "attention": nodes * attention,
        "ffn": big_edges * big_ffn,
        "lm_head": leaves * 2.0 * config.hidden_size * config.vocab_size,
    }
    parts["total"] = sum(parts.values())
    return parts


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = inspect_duo_source(args.model, "--model")
    allow_route_options(config, ["big", "skip"])
    for moves in range(1, 4):  # the closed form is the enumerated tree
        space = RouteSpace.from_config(config, [f"big={config.num_hidden_layers - moves}"], ["big", "skip"])
        enumerated = tree_flops(config, space, args.seq_len)
        closed = exact_tree_flops(config, moves, args.seq_len)
        assert abs(enumerated["tree"]["total"] - closed["total"]) <= 1e-6 * closed["total"], moves
    rows = []
    print(
        f"{args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
        f"{args.tokens} tokens in blocks of {args.seq_len}; accelerator at {args.rate_tflops:g} TFLOP/s"
        + (f", CPU at {args.cpu_gflops:g} GFLOP/s" if args.cpu_gflops else "")
    )
    print(f"{'m':>2} {'patterns':>10} {'GFLOP/pattern-token':>20} {'LM head':>8} {'accelerator':>14} {'CPU':>14}")
    for moves in range(1, args.max_moves + 1):
        flops = exact_tree_flops(config, moves, args.seq_len)
        patterns = comb(config.num_hidden_layers, moves)
        total = flops["total"] * args.tokens
        row = {
            "moves": moves,
            "patterns": patterns,
            "gflop_per_pattern_token": flops["total"] / patterns / 1e9,
            "lm_head_share": flops["lm_head"] / flops["total"],
            "total_tflop": total / 1e12,
            "accelerator_seconds": total / (args.rate_tflops * 1e12),
        }
        if args.cpu_gflops:
            row["cpu_seconds"] = total / (args.cpu_gflops * 1e9)
        rows.append(row)
        cpu = f"{row['cpu_seconds'] / 3600:>12.2f} h" if args.cpu_gflops else ""
        print(
            f"{moves:>2} {patterns:>10,} {row['gflop_per_pattern_token']:>20.4f} {row['lm_head_share']:>8.0%} "
            f"{row['accelerator_seconds']:>12,.0f} s {cpu:>14}"
        )
    figures = {"model": args.model, "setting": vars(args), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
