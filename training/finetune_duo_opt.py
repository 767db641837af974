"""Finetune a pretrained OPT as a Duo-LLM model (the paper's Appendix A).

The OPT weights are frozen, a small FFN is added next to every layer's FFN and trained with random routing
(--p-big), optionally with LoRA adapters on the attention (--lora, merged into the weights on save):

    accelerate launch training/finetune_duo_opt.py --init-from facebook/opt-1.3b --output-dir runs/duo-opt-1.3b \
        --lora --block-size 1024 --batch-size 8 --max-steps 5000 --mixed-precision bf16
    python training/finetune_duo_opt.py --init-from path/to/opt --output-dir runs/duo-opt --max-steps 100

All flags: ``python training/finetune_duo_opt.py --help``. The work is done by `duo_llm_hf.training.finetune`; routers
are trained on the result with ``training/train_router.py``.
"""

import sys

from duo_llm_hf.cli import main as duo_llm


def main(argv: list[str] | None = None) -> int:
    """``duo-llm finetune`` with these arguments (default: the command line): the same flags, ``--help`` at once, the
    same one-line errors and exit codes."""
    return duo_llm(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
