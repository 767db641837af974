"""Small file helpers of the ablation: JSON read back leniently, and made JSON-safe (atomic writes: `utils.files`)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def jsonable(value):
    return json.loads(json.dumps(value, default=str))
