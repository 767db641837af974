"""Presets of the study and the ablation, as data files shipped with the package.

- ``paper.json``: the paper's setting, the one preset both commands share. Its ``model``, ``data`` and
  ``training`` sections hold what both read; ``study`` and ``ablation`` what only one of them reads.
- ``study/<name>.json``: the `StudyConfig` fields of a study preset (those not at the dataclass default).
- ``ablation/<name>.json``: the settings of an ablation preset (every flag shown with default None).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).parent
PAPER = "paper"


def preset_names(command: str) -> list[str]:
    """The presets of ``command`` (``"study"`` or ``"ablation"``): its own files, then the shared paper preset."""
    return [*(path.stem for path in sorted((PRESETS_DIR / command).glob("*.json"), key=_order)), PAPER]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def study_preset(name: str) -> dict[str, Any]:
    """The `StudyConfig` fields of study preset ``name`` (the paper's stage 1 runs ``train_tokens`` tokens)."""
    if name != PAPER:
        return read_json(PRESETS_DIR / "study" / f"{name}.json")
    paper = read_json(PRESETS_DIR / "paper.json")
    study = dict(paper["study"])
    training = dict(paper["training"])
    # The study sizes stage 1 for the launch the preset is made for (processes), as a number of steps.
    blocks_per_step = training["batch_size"] * training["gradient_accumulation_steps"] * study.pop("processes")
    tokens_per_step = blocks_per_step * training["block_size"]
    max_steps = math.ceil(training.pop("train_tokens") / tokens_per_step)
    warmup_steps = math.ceil(training.pop("warmup_fraction") * max_steps)
    train = {**paper["model"], **paper["data"], **training, "max_steps": max_steps, "warmup_steps": warmup_steps}
    return {**study, "train": {**train, **study["train"]}}


def ablation_preset(name: str) -> dict[str, Any]:
    """The settings of ablation preset ``name``."""
    if name != PAPER:
        return read_json(PRESETS_DIR / "ablation" / f"{name}.json")
    paper = read_json(PRESETS_DIR / "paper.json")
    return {**paper["model"], **paper["data"], **paper["training"], **paper["ablation"]}


def _order(path: Path) -> tuple[int, str]:
    # Smallest first, as the commands' help lists them.
    return (0 if path.stem == "tiny" else 1, path.stem)


__all__ = ["PAPER", "PRESETS_DIR", "ablation_preset", "preset_names", "study_preset"]
