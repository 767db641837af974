"""Stage 2 of Duo-LLM: the oracle study of a trained Duo model (``python eval/oracle_study.py --help``).

The same command as ``duo-llm oracle``; the work is done by `duo_llm_hf.oracle.run`.
"""

import duo_llm_hf.models  # noqa: F401  (registers the Duo models with the Auto classes)
from duo_llm_hf.oracle.run import main
from duo_llm_hf.utils.errors import script_main

if __name__ == "__main__":
    script_main("duo-llm oracle", main)  # one-line errors, exit 2, as the command shows them
