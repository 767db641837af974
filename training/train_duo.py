"""Stage 1 training of a Duo-LLM model (random routing), a frozen-big model, or the dense baseline.

    accelerate launch --config_file training/configs/cpu.yaml training/train_duo.py --output-dir runs/duo
    python training/train_duo.py --output-dir runs/duo --max-steps 200        # one process, no launcher

All flags: ``python training/train_duo.py --help``. The work is done by `duo_llm_hf.training.train`.
"""

import sys

from duo_llm_hf.cli import main as duo_llm


def main(argv: list[str] | None = None) -> int:
    """``duo-llm train`` with these arguments (default: the command line): the same flags, ``--help`` at once, the
    same one-line errors and exit codes."""
    return duo_llm(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
