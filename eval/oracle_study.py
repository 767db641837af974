"""Stage 2 of Duo-LLM: the oracle study of a trained Duo model.

Evaluates every route pattern of the model (or those under budgets) on held-out token blocks, with the prefix-tree
engine of `duo_llm_hf.oracle`, and reports per budget: the oracle, the best fixed pattern, best-of-K random
patterns (per token and as one pattern), optionally the causally consistent oracle, plus the all-small / all-big
losses (token difficulty) and the oracle's per-layer x per-position usage (saved tensors).

    python eval/oracle_study.py --model runs/duo --data holdout.txt --block-size 128 --num-blocks 32 \\
        --budget all --budget classes --budget 6:2 --best-of-k 100 --output-dir runs/oracle
    accelerate launch --num_processes 8 eval/oracle_study.py ...   # the pattern space split over 8 processes

Interrupted, the same command resumes where it stopped. Results: <output-dir>/oracle_results.safetensors and
oracle_summary.json; load them with `duo_llm_hf.oracle_results.OracleResult.load(output_dir)`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

import duo_llm_hf  # noqa: F401  (registers duo_llama with the Auto classes)
from duo_llm_hf.oracle_run import load_token_blocks, run_oracle_study, study_space


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="folder (or Hub name) of a Duo causal LM")
    p.add_argument("--data", required=True, nargs="+", help="text files, or one .safetensors/.pt file of token blocks")
    p.add_argument("--tokenizer", help="tokenizer for text data (default: the model's)")
    p.add_argument("--block-size", type=int, help="tokens per block when tokenizing text")
    p.add_argument("--num-blocks", type=int, help="evaluate the first N blocks")
    p.add_argument(
        "--budget", action="append",
        help="budget (repeatable): all, a BIG count (4), counts per choice (big=6,skip=6), a BIG schedule over "
        "positions (6:2), or 'classes' for every count class. Default: all and classes.",
    )
    p.add_argument("--route-options", help="comma-separated subset of the model's route_options, e.g. big,skip")
    p.add_argument("--best-of-k", type=int, default=100, help="random patterns per budget for best-of-K (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the best-of-K draw")
    p.add_argument("--causal", action="store_true", help="also run the causally consistent oracle (one tree per token)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (and per checkpoint)")
    p.add_argument(
        "--chunk-tokens", type=int, help="tokens per forward batch, bounds memory (default 4096 on CPU, 65536 on GPU)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--stop-after-batches", type=int, help="stop after N batches (rerun the command to continue)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    state = PartialState()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.to(state.device).eval()
    is_text = not args.data[0].endswith((".safetensors", ".pt", ".pth"))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model) if is_text else None
    blocks, data_id = load_token_blocks(args.data, tokenizer, args.block_size, args.num_blocks)
    route_options = args.route_options.split(",") if args.route_options else None
    space = study_space(model.config, args.budget or ["all", "classes"], route_options)
    result = run_oracle_study(
        model, blocks, space, args.output_dir,
        batch_size=args.batch_size, best_of_k=args.best_of_k, seed=args.seed, causal=args.causal,
        chunk_tokens=args.chunk_tokens, model_id=args.model, data_id=data_id,
        stop_after_batches=args.stop_after_batches, progress=not args.no_progress,
    )
    if result is not None:
        print(result.table())
        summary = result.summary()
        print(json.dumps({k: summary[k] for k in ("tokens_evaluated", "space")}, indent=2))
        print(f"results: {args.output_dir}/oracle_results.safetensors, oracle_summary.json")
    elif state.is_main_process:
        print(f"stopped after {args.stop_after_batches} batches; rerun the same command to continue.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
