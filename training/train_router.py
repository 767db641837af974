"""Stage 3: train learned routers on a frozen Duo model (the paper's CE + alpha * budget loss).

    accelerate launch --config_file training/configs/cpu.yaml training/train_router.py \
        --model runs/duo --output-dir runs/router-big30 --setting small70-big30
    python training/train_router.py --model runs/duo --output-dir runs/router --budget 0.5 --max-steps 200

All flags: ``python training/train_router.py --help``. The work is done by `duo_llm_hf.training.routers`.
"""

from duo_llm_hf.training.routers import main
from duo_llm_hf.utils.errors import script_main

if __name__ == "__main__":
    script_main("duo-llm train-router", main)  # one-line errors, exit 2, as the command shows them
