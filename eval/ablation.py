"""The paper's Fig. 8 ablations: Duo against dense models of equal FLOPs, from scratch against frozen-big.

    python eval/ablation.py --preset cpu --output-dir runs/ablation_cpu   # ~20 min on 2 CPU cores, offline
    python eval/ablation.py --preset tiny --output-dir /tmp/ablation_tiny # seconds: a smoke test
    accelerate launch --config_file training/configs/ddp.yaml eval/ablation.py --preset paper --output-dir runs/fig8

All flags: ``python eval/ablation.py --help``. The work is done by `duo_llm_hf.experiments.ablation`.
"""

import sys

from duo_llm_hf.cli import main as duo_llm


def main(argv: list[str] | None = None) -> int:
    """``duo-llm ablation`` with these arguments (default: the command line): the same flags, ``--help`` at once, the
    same one-line errors and exit codes."""
    return duo_llm(["ablation", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
