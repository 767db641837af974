"""Stage 3: train learned routers on a frozen Duo model (the paper's CE + alpha * budget loss: the usage loss).

    accelerate launch --config_file training/configs/cpu.yaml training/train_router.py \
        --model runs/duo --output-dir runs/router-big30 --setting small70-big30
    python training/train_router.py --model runs/duo --output-dir runs/router --target-usage 0.5 --max-steps 200

All flags: ``python training/train_router.py --help``. The work is done by `duo_llm_hf.training.routers`.
"""

import sys

from duo_llm_hf.cli import main as duo_llm


def main(argv: list[str] | None = None) -> int:
    """``duo-llm train-router`` with these arguments (default: the command line): the same flags, the same one-line
    errors and exit codes."""
    return duo_llm(["train-router", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
