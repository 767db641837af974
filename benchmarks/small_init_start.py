"""Where a finetuning run's small FFNs start: held-out perplexity with some layers on small, skipped, or all BIG.

Loads a Duo model folder (a pretrained model converted with ``from_dense``), gives its small FFNs each start asked
for (``--small-init`` and ``--distill-steps`` of ``duo-llm finetune``, through `training.small_init.start_small_ffns`
on the built-in training corpus) and prints, per start, the perplexity on the first ``--blocks`` blocks of a text
file with ``--layers`` routed to small, the same layers skipped, and every layer BIG. No language-model step runs.

    PYTHONPATH=src python benchmarks/small_init_start.py --model MODEL_DIR --heldout wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

from duo_llm_hf import DuoLlamaForCausalLM
from duo_llm_hf.data.corpus import builtin_corpus
from duo_llm_hf.models.routes import BIG, SKIP, SMALL
from duo_llm_hf.training.small_init import start_small_ffns


def token_blocks(tokenizer, text: str, block_size: int, count: int | None = None) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"]
    count = len(ids) // block_size if count is None else count
    return torch.tensor(ids[: count * block_size]).view(count, block_size)


def perplexity(model, blocks: torch.Tensor, layers: range, choice: int | None, batch_size: int = 2) -> float:
    """exp of the mean next-token loss with ``layers`` on ``choice`` (None: all BIG), every other layer BIG."""
    routes = torch.full((*blocks.shape, model.config.num_hidden_layers), BIG)
    if choice is not None:
        routes[:, :, layers.start : layers.stop] = choice
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids, route in zip(blocks.split(batch_size), routes.split(batch_size)):
            nll += model(input_ids=ids, labels=ids, routes=route).loss.item() * ids[:, 1:].numel()
            tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Duo Llama model folder (with its tokenizer).")
    parser.add_argument("--heldout", required=True, help="Held-out text file.")
    parser.add_argument("--blocks", type=int, default=8, help="Held-out blocks.")
    parser.add_argument("--block-size", type=int, default=256, help="Held-out block length in tokens.")
    parser.add_argument("--train-block-size", type=int, default=64, help="Training block length in tokens.")
    parser.add_argument("--layers", default="10-19", help="First-last layer routed to small / skipped.")
    parser.add_argument(
        "--starts", default="random:0,slice-weight:0,slice-activation:0,slice-activation:100",
        help="Comma-separated small_init:distill_steps.",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Blocks per calibration / distillation step.")
    parser.add_argument("--distill-learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    first, last = (int(n) for n in args.layers.split("-"))
    layers = range(first, last + 1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.heldout, encoding="utf-8") as file:
        heldout = token_blocks(tokenizer, file.read(), args.block_size, args.blocks)
    train = token_blocks(tokenizer, "\n".join(builtin_corpus("train")["text"]), args.train_block_size)
    train_blocks = [{"input_ids": row} for row in train]
    print(f"| small FFN start | layers {args.layers} small | layers {args.layers} skipped | all BIG | start (s) |")
    print("|---|---|---|---|---|")
    for start in args.starts.split(","):
        small_init, steps = start.split(":")
        model = DuoLlamaForCausalLM.from_pretrained(args.model, route_options=["small", "big", "skip"]).float().eval()
        run = SimpleNamespace(
            small_init=small_init, distill_steps=int(steps), distill_learning_rate=args.distill_learning_rate,
            batch_size=args.batch_size, seed=args.seed, progress=False,
        )
        began = time.perf_counter()
        results = start_small_ffns(run, model, train_blocks)
        seconds = time.perf_counter() - began
        ppl = [perplexity(model, heldout, layers, choice) for choice in (SMALL, SKIP, None)]
        name = small_init + (f" + {steps} distillation steps" if int(steps) else "")
        if results:
            name += f" (relative error {results['distill/relative_error_start']:.3f} -> "
            name += f"{results['distill/relative_error_end']:.3f})"
        print(f"| {name} | {ppl[0]:,.1f} | {ppl[1]:,.1f} | {ppl[2]:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
