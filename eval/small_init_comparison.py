"""Where the small FFNs start, compared after the same finetuning: which start gives the better small FFN for the
same language-model tokens.

Each variant is one `duo-llm finetune` run of the pretrained Duo model (frozen weights, small FFNs trained with
random routing at p_big 0.5) with the same steps, batch, block size and learning rate, differing only in
``--small-init``, ``--distill-steps`` and ``--p-big-start``. After it, on the first ``--blocks`` blocks of the
held-out text: each layer on SMALL alone against the same layer skipped (how many layers SMALL wins), the middle
layers on SMALL together, random routing at p_big 0.5 (seeded routes, the same for every variant) and all-BIG. The
runs are kept in ``--out/<variant>/`` and reused by a re-run (each resumes from its checkpoints); the table is
``--out/comparison.json``.

    PYTHONPATH=src python eval/small_init_comparison.py --model SMOLLM2_DUO_DIR --out runs/small-init \
        --heldout ../shared/data/wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from duo_llm_hf.experiments.skip_study import moved_space
from duo_llm_hf.models.routes import BIG, SKIP, SMALL, RouteSampler
from duo_llm_hf.oracle.engine import pattern_losses
from duo_llm_hf.utils.files import atomic_write_json
from duo_llm_hf.utils.loading import allow_route_options, load_duo_model

# Variant name -> the finetuning flags it adds (FinetuneArguments fields).
VARIANTS = {
    "random": {},
    "slice-weight": {"small_init": "slice-weight"},
    "slice-activation": {"small_init": "slice-activation"},
    "slice-activation + 100 distillation steps": {"small_init": "slice-activation", "distill_steps": 100},
    "slice-activation + p_big 1.0 -> 0.5": {"small_init": "slice-activation", "p_big_start": 1.0},
    "random + p_big 1.0 -> 0.5": {"p_big_start": 1.0},
}


def heldout_blocks(model_dir: Path, path: str, block_size: int, count: int) -> torch.LongTensor:
    """The first ``count`` blocks of ``block_size`` tokens of the text file ``path``, in the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(Path(path).read_text(encoding="utf-8"))["input_ids"][: count * block_size]
    return torch.tensor(ids).view(count, block_size)


def mean_ppl(losses: torch.Tensor) -> float:
    """Perplexity of per-token losses ``[N, T]`` (the last position has no target)."""
    return math.exp(float(losses[:, :-1].double().mean()))


@torch.no_grad()
def evaluate(model_dir: Path, blocks: torch.LongTensor, middle: range, skip: list[float] | None) -> dict:
    """Per layer SMALL alone (and SKIP alone unless given), the middle layers on SMALL, random routing at p_big
    0.5 and all-BIG, as held-out perplexities."""
    model = load_duo_model(model_dir, what="model").eval()
    allow_route_options(model.config, ["small", "big", "skip"])
    n = model.config.num_hidden_layers
    out = {}
    for name, choice in (("small", SMALL), ("skip", SKIP)):
        if name == "skip" and skip is not None:
            out["skip"] = skip
            continue
        space = moved_space(n, 1, ("big", name))
        _, losses = pattern_losses(model, blocks, space)  # [patterns, N, T]: all-BIG, then each layer moved
        moved = (space.patterns == choice).nonzero()
        out[name] = [mean_ppl(losses[int(moved[moved[:, 1] == layer][0, 0])]) for layer in range(n)]
        out["all_big"] = mean_ppl(losses[int((space.patterns == BIG).all(-1).nonzero()[0])])
    routes = torch.full((*blocks.shape, n), BIG)
    routes[:, :, middle.start : middle.stop] = SMALL
    out["middle_small"] = mean_ppl(model(input_ids=blocks, labels=blocks, routes=routes).token_losses)
    sampled = RouteSampler({"small": 0.5, "big": 0.5}, seed=0).sample((*blocks.shape, n))
    out["random"] = mean_ppl(model(input_ids=blocks, labels=blocks, routes=sampled).token_losses)
    out["small_beats_skip"] = sum(s < k for s, k in zip(out["small"], out["skip"], strict=True))
    return out


def finetune_variant(model: str, output_dir: Path, flags: dict, args) -> dict:
    """The variant's finetuning run (reused when finished); its steps, tokens and seconds."""
    from duo_llm_hf.training.arguments import FinetuneArguments
    from duo_llm_hf.training.finetune import finetune

    results = output_dir / "train_results.json"
    began = time.perf_counter()
    if not results.is_file():
        finetune(FinetuneArguments(
            init_from=model, output_dir=str(output_dir), resume_from="latest", dataset="builtin",
            builtin_max_chars=400_000, block_size=args.block_size, batch_size=args.batch_size,
            max_steps=args.steps, learning_rate=args.learning_rate, warmup_steps=args.steps // 10, p_big=0.5,
            eval_every=0, holdout_english="none", holdout_code="none", checkpoint_every=10, report_to="jsonl",
            progress=False, seed=0, **flags,
        ))  # fmt: skip
    saved = json.loads(results.read_text())
    return {"steps": saved["global_step"], "tokens": saved["tokens_seen"], "seconds": time.perf_counter() - began,
            **{k: v for k, v in saved.items() if k.startswith("distill/")}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The pretrained model converted to Duo (a folder).")
    parser.add_argument("--out", required=True, help="Folder of the runs and comparison.json.")
    parser.add_argument("--heldout", required=True, help="Held-out text file (never trained on).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated names of VARIANTS.")
    parser.add_argument("--steps", type=int, default=40, help="Language-model steps of every variant.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--blocks", type=int, default=4, help="Held-out blocks of --heldout-block-size tokens.")
    parser.add_argument("--heldout-block-size", type=int, default=256)
    parser.add_argument("--middle", default="10-19", help="First-last layer of the middle layers put on small.")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {unknown} are not variants; choose from {list(VARIANTS)}.")
    first, last = (int(x) for x in args.middle.split("-"))
    out = Path(args.out)
    blocks = heldout_blocks(Path(args.model), args.heldout, args.heldout_block_size, args.blocks)
    before = evaluate(Path(args.model), blocks, range(first, last + 1), None)
    table = {"settings": vars(args), "before": before, "variants": {}}
    for name in args.variants.split(","):
        folder = out / name.replace(" ", "_").replace(">", "").replace(".", "")
        run = finetune_variant(args.model, folder, VARIANTS[name], args)
        table["variants"][name] = {**run, **evaluate(folder, blocks, range(first, last + 1), before["skip"])}
        atomic_write_json(out / "comparison.json", table)
        v = table["variants"][name]
        print(f"| {name} | {v['tokens']:,} | {v['small_beats_skip']} | {v['middle_small']:,.1f} | {v['random']:,.1f} "
              f"| {v['all_big']:.2f} | {v['seconds']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
