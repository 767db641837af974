"""Stage 2 of Duo-LLM: the oracle study of a trained Duo model (``python eval/oracle_study.py --help``).

The same command as ``duo-llm oracle``; the work is done by `duo_llm_hf.oracle.run`.
"""

import sys

from duo_llm_hf.cli import main as duo_llm


def main(argv: list[str] | None = None) -> int:
    """``duo-llm oracle`` with these arguments (default: the command line): the same flags, ``--help`` at once, the
    same one-line errors and exit codes."""
    return duo_llm(["oracle", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
