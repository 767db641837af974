"""What every run folder needs: refusing to overwrite a finished run, content hashes, and fingerprint checks.

A *fingerprint* is a flat dict of every setting that changes a run's results (weights' and data's content hashes,
dtype, route space, block size, seed, ...). A resumed run must have the same fingerprint as the run it continues;
a mismatch is a `UsageError` naming each setting that differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError

OVERWRITE_FLAG = "--overwrite-output-dir"

# The files the commands write into their output folders and read back (by the next stage, a resumed run, the
# model card, the study's report). A model folder also holds what save_pretrained writes (``config.json``, ...).
CONFIG_FILE = "config.json"
TRAINING_ARGS_FILE = "training_args.json"  # stage 1 and router training: the arguments of the run
TRAIN_RESULTS_FILE = "train_results.json"  # ... its results; written last, so it marks a finished run
METRICS_LOG_FILE = "metrics.jsonl"  # ... one JSON line per logged step
ROUTER_REPORT_FILE = "router_report.json"  # router training: targets, realised fractions, perplexity
ORACLE_RESULTS_FILE = "oracle_results.safetensors"  # an oracle run: the reductions' tensors
ORACLE_SUMMARY_FILE = "oracle_summary.json"  # ... its summary, and what loading the tensors back needs
ORACLE_STATE_FILE = "oracle_state.json"  # ... the finished batches of a run in progress
LM_EVAL_RESULTS_FILE = "lm_eval_results.json"  # lm-eval's results, read by the model card
STAGE_DONE_FILE = "stage_done.json"  # the study: in each finished stage's folder
STUDY_SETTINGS_FILE = "study_settings.json"  # ... the settings of the study in its folder
STUDY_METRICS_FILE = "metrics.json"  # ... the study's numbers
STUDY_REPORT_FILE = "report.md"  # ... and its report, also rendered as STUDY_REPORT_HTML_FILE
STUDY_REPORT_HTML_FILE = "report.html"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 20


def refuse_overwrite(output_dir: str | Path, finished_files: Iterable[str], overwrite: bool, what: str = "run") -> None:
    """Raise `UsageError` when ``output_dir`` already holds a finished ``what`` and ``overwrite`` was not asked.

    A folder holds a finished run when any of ``finished_files`` (names relative to it) exists.
    """
    output_dir = Path(output_dir)
    found = [name for name in finished_files if (output_dir / name).exists()]
    if found and not overwrite:
        raise UsageError(
            f"{output_dir} already holds a finished {what} ({found[0]}); choose another output folder, or pass "
            f"{OVERWRITE_FLAG} to replace it."
        )


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in chunks, so large weight files never sit in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_hash(files: Iterable[str | Path], root: str | Path | None = None) -> str:
    """SHA-256 over the names (relative to ``root``, else the bare names) and contents of ``files``, sorted by name.

    Any changed byte, renamed, added or removed file changes the hash; where the folder lies does not.
    """
    named = sorted((Path(f).relative_to(root).as_posix() if root else Path(f).name, Path(f)) for f in files)
    digest = hashlib.sha256()
    for name, path in named:
        digest.update(name.encode())
        digest.update(file_hash(path).encode())
    return digest.hexdigest()


def folder_weights_hash(folder: str | Path) -> str:
    """SHA-256 over the names and contents of a model folder's weight files (sorted, so the order is stable).

    Two folders with the same weights hash the same; any changed byte of any weight file changes the hash.
    """
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise UsageError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); is it a saved model folder?")
    return files_hash(files)


class FingerprintMismatch(UsageError):
    """A run would resume work done with other settings (`check_fingerprint`)."""


def fingerprint_differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: was X, now Y"`` for every key whose value differs between two fingerprints (sorted by key)."""
    keys = sorted(set(before) | set(now))
    return [f"{k}: was {before.get(k)!r}, now {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def check_fingerprint(before: Mapping[str, Any], now: Mapping[str, Any], folder: str | Path, what: str = "run") -> None:
    """Raise `UsageError` naming every difference when a resumed ``what`` in ``folder`` would mix incompatible work."""
    differences = fingerprint_differences(before, now)
    if differences:
        raise FingerprintMismatch(
            f"cannot resume the {what} in {folder}: its settings differ from this command's "
            f"({'; '.join(differences)}). Use the original settings, another output folder, or {OVERWRITE_FLAG} "
            "to start over."
        )
