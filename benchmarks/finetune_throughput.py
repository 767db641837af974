"""Finetuning throughput on CPU: training tokens per second of `duo-llm finetune` under each setting, side by side.

Runs a few optimizer steps of the Appendix A finetuning (frozen pretrained model, small FFNs trained with random
routing) for each setting and prints the tokens per second of the training steps (`train/tokens_per_second` of
the run's log: data and optimizer time included, evaluation and loading left out), so the settings that give the
most tokens in a fixed time can be read off one run.

    PYTHONPATH=src python benchmarks/finetune_throughput.py --model SMOLLM2_DUO_DIR --out /tmp/throughput
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from duo_llm_hf.training.arguments import FinetuneArguments
from duo_llm_hf.training.finetune import finetune

# name -> FinetuneArguments fields; each setting sees the same number of tokens per step (512).
SETTINGS = {
    "block 64, batch 8": {"block_size": 64, "batch_size": 8},
    "block 256, batch 2": {"block_size": 256, "batch_size": 2},
    "block 64, batch 8, LoRA r 16": {"block_size": 64, "batch_size": 8, "lora": True},
    "block 64, batch 8, gradient checkpointing": {"block_size": 64, "batch_size": 8, "gradient_checkpointing": True},
    "block 256, batch 2, gradient checkpointing": {"block_size": 256, "batch_size": 2, "gradient_checkpointing": True},
}


def last_throughput(output_dir: Path) -> float:
    """The last ``train/tokens_per_second`` the run logged."""
    lines = (output_dir / "logs" / "finetune_duo" / "metrics.jsonl").read_text().splitlines()
    values = [json.loads(line).get("train/tokens_per_second") for line in lines]
    return [v for v in values if v is not None][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A Duo model folder (a pretrained model converted to Duo).")
    parser.add_argument("--out", required=True, help="Folder for the runs (one per setting).")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per setting.")
    args = parser.parse_args()
    print("| setting | tokens/s |\n|---|---|")
    for name, fields in SETTINGS.items():
        output_dir = Path(args.out) / name.replace(", ", "_").replace(" ", "-")
        run = FinetuneArguments(
            init_from=args.model, output_dir=str(output_dir), dataset="builtin", builtin_max_chars=400_000,
            max_steps=args.steps, log_every=args.steps, eval_every=0, holdout_english="none", holdout_code="none",
            checkpoint_every=0, report_to="jsonl", progress=False, overwrite_output_dir=True, **fields,
        )  # fmt: skip
        finetune(run)
        print(f"| {name} | {last_throughput(output_dir):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
