"""Data of the `*_local` lm-eval tasks: benchmark files read from a local folder, and HellaSwag's documents.

lm-eval imports this file by path (`custom_dataset: !function local_data.load_local_json` and `process_docs:
!function local_data.process_hellaswag_docs` in the task YAMLs) and calls `load_local_json(**metadata,
**dataset_kwargs)`. The folder holding the files comes from the task metadata (`--metadata '{"data_dir": "/path"}'`
on the command line, `TaskManager(metadata=...)` in Python), else from the environment variable named by
`DATA_DIR_ENV`. It imports only the standard library, `datasets` and (for HellaSwag's documents) the harness.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DATA_DIR_ENV = "DUO_LM_EVAL_DATA"

# The end of a sentence inside a HellaSwag context: what precedes the last one is ctx_a.
_SENTENCE_END = re.compile(r"^(.*[.!?]) (.*)$", re.DOTALL)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the local benchmark files: `data_dir`, else `$DUO_LM_EVAL_DATA`; a clear error otherwise."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise ValueError(
            "The *_local lm-eval tasks need the folder of their jsonl files: pass --metadata "
            f"'{{\"data_dir\": \"/path/to/benchmarks\"}}' (TaskManager(metadata={{'data_dir': ...}}) in Python) or "
            f"set {DATA_DIR_ENV}=/path/to/benchmarks. The folder holds arc_easy/{{train,validation,test}}.jsonl "
            "(Hub schema) and hellaswag_val.jsonl (or hellaswag/hellaswag_val.jsonl)."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data_dir {str(path)!r} (local lm-eval benchmark files) is not a folder.")
    return path


def find_local_file(root: str | os.PathLike, name: str) -> Path | None:
    """The file ``name`` (``"<benchmark>/<file>"``) under ``root``, else its ``<file>`` directly in ``root`` (the
    benchmark's own folder was given); None when neither exists."""
    for path in (Path(root) / name, Path(root) / Path(name).name):
        if path.is_file():
            return path
    return None


def load_local_json(data_files: dict[str, str], data_dir: str | os.PathLike | None = None, **_metadata):
    """Load the task's splits with the `datasets` json builder; each file is found by `find_local_file`.

    The other metadata lm-eval passes along (task version, model arguments) is ignored.
    """
    import datasets

    root = resolve_data_dir(data_dir)
    files = {split: find_local_file(root, name) for split, name in data_files.items()}
    missing = [str(root / data_files[split]) for split, path in files.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"Local benchmark files are missing: {missing} (nor their file name directly in {str(root)!r}). "
            "See docs/evaluation.md ('Benchmarks with lm-evaluation-harness') for the files and their format."
        )
    return datasets.load_dataset("json", data_files={split: str(path) for split, path in files.items()})


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` of a HellaSwag context given whole: ctx_b is the incomplete noun phrase that ends an
    ActivityNet context (``"A man is sitting on a roof. he"`` -> ``("A man is sitting on a roof.", "he")``), i.e.
    what follows the last sentence end when it starts with a lowercase letter and is not itself a sentence (ends
    without ``.``, ``!`` or ``?``); else ``(ctx, "")``, as the dataset gives WikiHow contexts (complete sentences,
    some with lowercase words after abbreviations such as "u.s.")."""
    match = _SENTENCE_END.match(ctx)
    if match and match[2][:1].islower() and not match[2].rstrip("\"' ").endswith((".", "!", "?")):
        return match[1], match[2]
    return ctx, ""


def hellaswag_hub_fields(doc: dict) -> dict:
    """The Hub schema's ``ctx_a`` / ``ctx_b`` of an item that has only ``ctx`` (e.g. the offline copy described in
    docs/evaluation.md), so that the harness's own `process_docs` applies."""
    ctx_a, ctx_b = split_hellaswag_context(doc["ctx"])
    return {"ctx_a": ctx_a, "ctx_b": ctx_b}


def process_hellaswag_docs(dataset):
    """HellaSwag documents (``query``, ``choices``, ``gold``) by the harness's own `process_docs`
    (`lm_eval.tasks.hellaswag.utils`). Items in the Hub schema go through it unchanged; items with only ``ctx``
    first get ``ctx_a`` / ``ctx_b`` from `split_hellaswag_context`, so that ctx_b is capitalised as the harness
    does."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    if "ctx_a" not in dataset.column_names:
        dataset = dataset.map(hellaswag_hub_fields)
    return process_docs(dataset)
