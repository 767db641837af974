"""Duo models in other tools: lm-evaluation-harness (`lm_eval`, local `tasks`) and Hub model cards (`model_card`)."""
