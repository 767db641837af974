"""Stage 1 (train a Duo model, `train`), stage 3 (train routers, `routers`) and the OPT finetuning recipe
(`finetune`), with the Accelerate loop, checkpoints and trackers they share."""
