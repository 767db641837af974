"""Stage 2 of Duo-LLM: the oracle study of a trained Duo model.

Evaluates every route pattern of the model (or those under budgets) on held-out token blocks, with the prefix-tree
engine of `duo_llm_hf.oracle`, and reports per budget: the oracle, the best fixed pattern, best-of-K random
patterns (per token and as one pattern), optionally the causally consistent oracle, plus the all-small / all-big
losses (token difficulty) and the oracle's per-layer x per-position usage (saved tensors).

    python eval/oracle_study.py --model runs/duo --data holdout.txt --block-size 128 --num-blocks 32 \\
        --budget all --budget classes --budget 6:2 --best-of-k 100 --output-dir runs/oracle
    accelerate launch --num_processes 8 eval/oracle_study.py ...   # the pattern space split over 8 processes

Interrupted, the same command resumes where it stopped. Results: <output-dir>/oracle_results.safetensors and
oracle_summary.json; load them with `duo_llm_hf.oracle_results.OracleResult.load(output_dir)`.
"""

import sys

import duo_llm_hf  # noqa: F401  (registers the Duo models with the Auto classes)
from duo_llm_hf.oracle_run import main

if __name__ == "__main__":
    sys.exit(main())
