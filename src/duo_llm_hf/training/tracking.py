"""Experiment tracking: a JSON-lines tracker for Accelerate, and the choice of trackers for a run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker
from accelerate.utils import is_tensorboard_available

from ..utils.run_files import METRICS_LOG_FILE


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per ``accelerator.log`` call to ``<logging_dir>/<run_name>/metrics.jsonl``.

    Lines look like ``{"step": 10, "time": ..., "train/loss": 3.2}``; the run configuration is the first line,
    ``{"config": {...}}``. A resumed run appends, so a step may appear twice: the last line of a step wins.
    """

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path, **kwargs):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / run_name / METRICS_LOG_FILE

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Path:
        return self.path

    def _write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values, "time": time.time()})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        record = {"step": step, "time": time.time()}
        for key, value in values.items():
            value = value.item() if hasattr(value, "item") else value
            # JSON has no NaN/inf; keep them readable as strings rather than writing invalid JSON.
            record[key] = str(value) if isinstance(value, float) and not math.isfinite(value) else value
        self._write(record)


def read_metrics(path: str | Path) -> list[dict]:
    """The metric lines of a ``metrics.jsonl`` file (the config line left out), in order."""
    lines = Path(path).read_text().splitlines()
    return [record for record in map(json.loads, lines) if "config" not in record]


def make_trackers(report_to: str, run_name: str, logging_dir: str | Path) -> list:
    """Trackers for ``Accelerator(log_with=...)``: a comma-separated list of names.

    ``auto`` = JSON lines plus TensorBoard when it is installed; ``jsonl``; ``none``; any other name is passed
    to Accelerate as is (``tensorboard``, ``wandb``, ...).
    """
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["none"]:
        return []
    trackers: list = []
    for name in names:
        if name == "auto":
            trackers.append(JsonlTracker(run_name, logging_dir))
            if is_tensorboard_available():
                trackers.append("tensorboard")
        elif name == "jsonl":
            trackers.append(JsonlTracker(run_name, logging_dir))
        elif name == "none":
            raise ValueError(f"report_to: {report_to!r} mixes 'none' with trackers; give one or the other.")
        else:
            trackers.append(name)
    return trackers
