"""The approximate oracle search against the exact one at every budget of a tiny random DuoLlama (BIG/SKIP).

Builds a DuoLlama of ``--layers`` layers (hidden 16, random weights with std 0.2 so that skipping a layer matters),
runs the exact search of every budget ``big = n - m`` (m = 1 .. n) on random token blocks, then greedy and the beam
at each ``--widths``, and prints each search's gap (`oracle.search.gap_table`) and the patterns it evaluated.

    PYTHONPATH=src python benchmarks/search_gap_tiny.py --layers 10 --widths 1,2,4
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.oracle.search import SearchSettings, gap_table, route_space_for, run_search


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--widths", default="1,2,4", help="beam widths, comma-separated")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--best-of-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the gaps to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = DuoLlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=args.layers, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, route_options=["big", "skip"], initializer_range=0.2,
    )
    model = DuoLlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    blocks = torch.randint(0, config.vocab_size, (args.sequences, args.seq_len), generator=generator)
    budgets = [f"big={args.layers - m}" for m in range(1, args.layers + 1)]
    searches = [SearchSettings("greedy")] + [SearchSettings("beam", int(w)) for w in args.widths.split(",")]
    gaps = {}
    with tempfile.TemporaryDirectory() as folder:
        exact = SearchSettings("exact")
        space = route_space_for(config, budgets, None, exact)
        run_search(model, blocks, space, f"{folder}/exact", exact, best_of_k=args.best_of_k, progress=False)
        print(f"DuoLlama {args.layers} layers (BIG/SKIP), {args.sequences} x {args.seq_len} random tokens")
        for search in searches:
            name = search.method + (f" width {search.width}" if search.method == "beam" else "")
            space = route_space_for(config, budgets, None, search)
            result = run_search(
                model, blocks, space, f"{folder}/{name}", search, f"{folder}/exact", best_of_k=args.best_of_k,
                progress=False,
            )
            gaps[name] = result.meta["search_gap"]
            print(f"\n{name}: {result.meta['search']['patterns_searched_all_levels']:,} patterns evaluated")
            print(gap_table(gaps[name]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(gaps, f, indent=2)
    return gaps


if __name__ == "__main__":
    main()
