"""The presets are data files (duo_llm_hf.experiments.presets): every key is a setting the command knows, and the
one paper preset gives the study and the ablation the same model, data and training."""

from __future__ import annotations

import dataclasses

from duo_llm_hf.experiments.ablation import PRESETS as ABLATION_PRESETS
from duo_llm_hf.experiments.ablation import AblationArguments
from duo_llm_hf.experiments.ablation.arguments import PRESET_TRAIN_FIELDS
from duo_llm_hf.experiments.study import PRESETS as STUDY_PRESETS
from duo_llm_hf.experiments.study import StudyConfig
from duo_llm_hf.training.arguments import TrainArguments
from duo_llm_hf.training.routers import RouterTrainArguments


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_preset_key_is_a_setting():
    train, router = _names(TrainArguments), _names(RouterTrainArguments)
    for name, config in STUDY_PRESETS.items():
        assert isinstance(config, StudyConfig) and config.preset == name
        assert set(config.train) <= train, (name, set(config.train) - train)
        assert set(config.router) | set(config.distill_router) <= router, name
        assert all(isinstance(getattr(config, f), tuple) for f in ("schedules", "router_budgets", "router_kinds"))
    # Ablation settings: its flags, or training fields the runs take (max_position_embeddings, checkpoint_every...).
    known = _names(AblationArguments) | train
    for name, settings in ABLATION_PRESETS.items():
        assert set(settings) <= known, (name, set(settings) - known)


def test_one_paper_preset_for_study_and_ablation():
    study, ablation = STUDY_PRESETS["paper"].train, ABLATION_PRESETS["paper"]
    # Every training field the ablation's preset gives (model, data, batch) is the study's too.
    assert {k: study[k] for k in PRESET_TRAIN_FIELDS} == {k: ablation[k] for k in PRESET_TRAIN_FIELDS}
    assert (study["hidden_size"], study["block_size"], study["intermediate_size"]) == (2560, 2048, 10240)
    # Stage 1 of the study trains the ablation's token budget (300B) on the launch the preset is sized for (8 GPUs).
    tokens_per_step = study["batch_size"] * study["block_size"] * study["gradient_accumulation_steps"] * 8
    steps = study["max_steps"]
    assert (steps - 1) * tokens_per_step < ablation["train_tokens"] <= steps * tokens_per_step


def test_cpu_presets_keep_their_values():
    """`make demo` runs the default study preset; its metrics must not move with the presets' format."""
    default = STUDY_PRESETS["default"]
    assert default.train["max_steps"] == 900 and default.train["hidden_size"] == 64 and default.causal_budget == 2
    assert default.router == {"max_steps": 120, "batch_size": 16, "eval_blocks": 16, "eval_every": 20}
    assert default.distill_router == {"max_steps": 160, "eval_every": 40} and default.best_of_k == 100
    assert (default.distill_blocks, default.distill_causal_blocks) == (128, 8)
    assert STUDY_PRESETS["tiny"].router_budgets == (2, 3, 4) and STUDY_PRESETS["tiny"].distill_router == {}
    assert ABLATION_PRESETS["cpu"]["train_tokens"] == 800 * 16 * 64 and ABLATION_PRESETS["tiny"]["threads"] == 1
