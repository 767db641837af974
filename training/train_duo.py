"""Stage 1 training of a Duo-LLM model (random routing), a frozen-big model, or the dense baseline.

    accelerate launch --config_file training/configs/cpu.yaml training/train_duo.py --output-dir runs/duo
    python training/train_duo.py --output-dir runs/duo --max-steps 200        # one process, no launcher

All flags: ``python training/train_duo.py --help``. The work is done by `duo_llm_hf.training.train`.
"""

from duo_llm_hf.training.train import main
from duo_llm_hf.utils.errors import script_main

if __name__ == "__main__":
    script_main("duo-llm train", main)  # one-line errors, exit 2, as the command shows them
