"""Atomic writes: a crash (or a kill) leaves either the old file or the new one, never half of one.

Every write goes to a temporary name in the same folder (``.tmp-<name>``: hidden, on the same file system, and
with the final suffix, so that writers that read the suffix, such as matplotlib's ``savefig``, pick the right
format) and is then moved onto the final name with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TMP_PREFIX = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """Where an atomic write of ``path`` goes first: ``.tmp-<name>`` in the same folder."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}")


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to (a file or a folder); when the block ends without an
    error, move it onto ``path``. The parent folder is created when missing. A link at the temporary name is
    removed first, never written through (``os.replace`` then replaces a link at ``path`` itself, not its target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    if tmp.is_symlink():
        tmp.unlink()
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, value: Any, newline: bool = True) -> None:
    """Write ``value`` as JSON indented by 2 to ``path`` atomically, with a final newline unless ``newline=False``."""
    atomic_write_text(path, json.dumps(value, indent=2) + ("\n" if newline else ""))


def atomic_save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically."""
    with atomic_target(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None)
