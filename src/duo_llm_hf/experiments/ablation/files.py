"""Small file helpers of the ablation: JSON read back with its schema, and made JSON-safe (atomic writes:
`utils.files`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...utils.schema import read_state_file


def read_json(path: Path, schema) -> Any:
    """The file the ablation wrote at ``path``, checked against ``schema`` (a one-line `UsageError` for a damaged
    or wrong-shaped file); None when it does not exist yet."""
    if not Path(path).is_file():
        return None
    return read_state_file(path, schema)


def jsonable(value):
    return json.loads(json.dumps(value, default=str))
