"""Held-out perplexity against realised usage: conventional router, oracle-supervised router, fixed, oracle.

    python eval/router_vs_oracle.py --model runs/duo-tiny --output-dir runs/router-vs-oracle

All flags: ``python eval/router_vs_oracle.py --help``. The work is done by `duo_llm_hf.experiments.router_comparison`.
"""

from duo_llm_hf.experiments.router_comparison import PROG, main
from duo_llm_hf.utils.errors import script_main

if __name__ == "__main__":
    script_main(PROG, main)
