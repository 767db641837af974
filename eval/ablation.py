"""The paper's Fig. 8 ablations: Duo against dense models of equal FLOPs, from scratch against frozen-big.

    python eval/ablation.py --preset cpu --output-dir runs/ablation_cpu   # ~20 min on 2 CPU cores, offline
    python eval/ablation.py --preset tiny --output-dir /tmp/ablation_tiny # seconds: a smoke test
    accelerate launch --config_file training/configs/ddp.yaml eval/ablation.py --preset paper --output-dir runs/fig8

All flags: ``python eval/ablation.py --help``. The work is done by `duo_llm_hf.experiments.ablation`.
"""

from duo_llm_hf.experiments.ablation import main
from duo_llm_hf.utils.errors import script_main

if __name__ == "__main__":
    script_main("duo-llm ablation", main)  # one-line errors, exit 2, as the command shows them
