"""The structure of the state and manifest files the project reads back, checked before anything in them is used.

A file that parses as JSON but has the wrong shape (a list where a mapping belongs, a size written as a string,
a field missing) would otherwise fail deep inside the code that uses it with a KeyError or TypeError, or pass a
wrong value on. `read_state_file` reads a file and checks it against its schema: a one-line `UsageError` (or the
caller's subclass) names the file and the field.

A schema is a mapping ``field -> spec``; a spec is a Python type (or a tuple of types), a nested schema (a dict),
`MapOf` (a mapping whose values all match a spec), `ListOf`, or `Optional` (a field that may be missing). Fields
a schema does not name are allowed, so a newer writer can add fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class MapOf:
    """A JSON object with string keys whose every value matches ``value``."""

    value: Any


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose every item matches ``item``."""

    item: Any


@dataclass(frozen=True)
class Optional:
    """A field that may be missing; when present it matches ``spec`` (``null`` is allowed)."""

    spec: Any


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
          list: "an array", type(None): "null"}  # fmt: skip


def _describe(spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, (dict, MapOf)):
        return "an object"
    if isinstance(spec, ListOf):
        return "an array"
    return _NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def _matches_type(value, spec) -> bool:
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


def schema_problem(value, spec, where: str = "") -> str | None:
    """The first place where ``value`` does not match ``spec`` (``"field 'a.b' is a string, expected an
    integer"``), or None."""
    label = f"field {where!r}" if where else "the file"
    if isinstance(spec, Optional):
        return None if value is None else schema_problem(value, spec.spec, where)
    if isinstance(spec, tuple):
        if any(schema_problem(value, s, where) is None for s in spec):
            return None
        return f"{label} is {_kind(value)}, expected {_describe(spec)}"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{label} is {_kind(value)}, expected an object"
        for name, field_spec in spec.items():
            inner = f"{where}.{name}" if where else name
            if name not in value:
                if isinstance(field_spec, Optional):
                    continue
                return f"field {inner!r} is missing"
            problem = schema_problem(value[name], field_spec, inner)
            if problem:
                return problem
        return None
    if isinstance(spec, (MapOf, ListOf)):
        mapping = isinstance(spec, MapOf)
        if not isinstance(value, dict if mapping else list):
            return f"{label} is {_kind(value)}, expected {_describe(spec)}"
        items = value.items() if mapping else ((f"[{i}]", item) for i, item in enumerate(value))
        for key, item in items:
            inner = (f"{where}.{key}" if where else key) if mapping else f"{where}{key}"
            problem = schema_problem(item, spec.value if mapping else spec.item, inner)
            if problem:
                return problem
        return None
    return None if _matches_type(value, spec) else f"{label} is {_kind(value)}, expected {_describe(spec)}"


def _kind(value) -> str:
    return f"{_NAMES.get(type(value), type(value).__name__)} ({json.dumps(value)[:40]})"


def check_state(value, schema, source: str | Path, error: type[UsageError] = UsageError) -> Any:
    """Return ``value`` (a file's parsed JSON) if it matches ``schema``; else raise ``error`` naming ``source`` and
    the field."""
    problem = schema_problem(value, schema)
    if problem:
        raise error(
            f"{source} has the wrong structure: {problem}. It was damaged or edited, or written by another "
            "version; restore it, or start that run over."
        )
    return value


def read_state_file(path: str | Path, schema, error: type[UsageError] = UsageError) -> Any:
    """Read the JSON file ``path`` and check it against ``schema`` (`check_state`); ``error`` (a `UsageError`
    class) for a file that is not JSON or has the wrong structure. A missing file raises `FileNotFoundError`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}); it was damaged: restore it, or start that run over.") from None
    return check_state(value, schema, path, error)


# The schemas of the files the project reads back (the fields their readers use).
FINGERPRINT = MapOf((str, int, float, bool, list, dict, type(None)))
TRAIN_STATE_SCHEMA = {
    "files": MapOf(int),
    "global_step": int,
    "epoch": int,
    "tokens_seen": int,
    "batches_in_epoch": int,
    "run_id": Optional(str),
    "fingerprint": Optional(FINGERPRINT),
}
TRAIN_RESULTS_SCHEMA = {"global_step": int, "tokens_seen": int, "run_id": Optional(str)}
FINISHED_RUN_SCHEMA = {"run_id": Optional(str)}  # what a new run reads of a finished one in its folder
ORACLE_STATE_SCHEMA = {"format": int, "fingerprint": FINGERPRINT, "batch_sha256": MapOf(str)}
ORACLE_SUMMARY_SCHEMA = {
    "_space": {"num_layers": int, "choices": ListOf(str), "budgets": ListOf(str), "extra_classes": list},
}
STAGE_DONE_SCHEMA: Mapping = {}  # any object: what a stage recorded (reused as it was written)
STUDY_SETTINGS_SCHEMA: Mapping = {}  # any object: compared setting by setting with this study's
TRAINING_ARGS_SCHEMA: Mapping = {}  # any object: compared argument by argument with a new run's
ROUTER_REPORT_SCHEMA = {"holdouts": MapOf({"ppl": float, "realised": {"overall": {"big": float}}})}
ABLATION_RUN_SCHEMA = {"train_seconds": Optional(float), "init_from": Optional((str, dict))}
ABLATION_EVAL_SCHEMA = {  # one evaluation point of one ablation run, as cached
    "perplexity": Optional({"fingerprint": Optional(dict), "metrics": Optional(MapOf((float, type(None))))}),
    "benchmarks": Optional({"fingerprint": Optional(dict), "metrics": Optional(dict)}),
}
STUDY_RECORD_SCHEMA = {  # stage 1's record as the study report reads it (train_results.json or stage_done.json)
    "global_step": Optional(int), "tokens_seen": Optional(int), "eval": Optional(dict), "seconds": Optional(float),
}  # fmt: skip
FIXED_SETS_SCHEMA = MapOf(
    {"skipped": ListOf(int), "loss": float, "greedy_skipped": Optional(ListOf(int)), "search": str}
)
HELLASWAG_RUN_SCHEMA = {
    "items": int, "acc_norm": float, "acc_norm_stderr": (float, str), "acc": float, "acc_stderr": (float, str),
    "loglikelihoods": ListOf(ListOf(float)),
}  # fmt: skip
JSON_OBJECT_SCHEMA: Mapping = {}  # any object (a tokenizer.json compared whole, a card's figures)
LM_EVAL_RESULTS_SCHEMA = {"results": MapOf(dict), "n-shot": Optional(dict), "config": Optional(dict)}


__all__ = [
    "ABLATION_EVAL_SCHEMA",
    "ABLATION_RUN_SCHEMA",
    "FINISHED_RUN_SCHEMA",
    "FIXED_SETS_SCHEMA",
    "HELLASWAG_RUN_SCHEMA",
    "JSON_OBJECT_SCHEMA",
    "LM_EVAL_RESULTS_SCHEMA",
    "ListOf",
    "MapOf",
    "Optional",
    "ORACLE_STATE_SCHEMA",
    "ORACLE_SUMMARY_SCHEMA",
    "ROUTER_REPORT_SCHEMA",
    "STAGE_DONE_SCHEMA",
    "STUDY_RECORD_SCHEMA",
    "STUDY_SETTINGS_SCHEMA",
    "TRAIN_RESULTS_SCHEMA",
    "TRAIN_STATE_SCHEMA",
    "TRAINING_ARGS_SCHEMA",
    "check_state",
    "read_state_file",
    "schema_problem",
]
