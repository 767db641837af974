"""Data loader of the `*_local` lm-eval tasks: the Hub schema of a benchmark, read from local jsonl files.

lm-eval imports this file by path (`custom_dataset: !function local_data.load_local_json` in the task YAMLs)
and calls `load_local_json(**metadata, **dataset_kwargs)`. The folder holding the files comes from the task
metadata (`--metadata '{"data_dir": "/path"}'` on the command line, `TaskManager(metadata=...)` in Python), else
from the environment variable named by `DATA_DIR_ENV`. It imports only the standard library and `datasets`.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "DUO_LM_EVAL_DATA"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the local benchmark files: `data_dir`, else `$DUO_LM_EVAL_DATA`; a clear error otherwise."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise ValueError(
            "The *_local lm-eval tasks need the folder of their jsonl files: pass --metadata "
            f"'{{\"data_dir\": \"/path/to/benchmarks\"}}' (TaskManager(metadata={{'data_dir': ...}}) in Python) or "
            f"set {DATA_DIR_ENV}=/path/to/benchmarks. The folder holds arc_easy/{{train,validation,test}}.jsonl and "
            "hellaswag/{train,validation}.jsonl in the Hub schema."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data_dir {str(path)!r} (local lm-eval benchmark files) is not a folder.")
    return path


def load_local_json(data_files: dict[str, str], data_dir: str | os.PathLike | None = None, **_metadata):
    """Load the task's splits with the `datasets` json builder; `data_files` are relative to the data folder.

    The other metadata lm-eval passes along (task version, model arguments) is ignored.
    """
    import datasets

    root = resolve_data_dir(data_dir)
    files = {split: root / name for split, name in data_files.items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Local benchmark files are missing: {missing}. Write each split of the Hub dataset as jsonl there, "
            "e.g. datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')['test'].to_json('arc_easy/test.jsonl')."
        )
    return datasets.load_dataset("json", data_files={split: str(path) for split, path in files.items()})
