"""The study's holdouts, read and checked before the first stage, and each holdout's stages kept apart.

`check_holdouts` reads every holdout's whole content before any work: bad UTF-8 anywhere in a text file, a holdout
with no text, and one too short for the oracle's blocks are one-line errors. Whether a text gives enough blocks is
exact once a tokenizer exists (``--model``, or a finished stage 1); before stage 1 trains the study's byte-level
tokenizer, a text is refused when even one token per byte (plus one per document) could not fill the blocks, and
the exact count is checked right after stage 1, before any oracle runs.

A holdout's stages (``oracle/<name>``, ``oracle_skip/<name>``, ``oracle_causal/<name>``) record the content hash of
the holdout they ran on. Adding a holdout, or fixing one that was refused, keeps every other stage; a holdout whose
content changed after its stages finished is refused (or, with ``--overwrite-output-dir``, only its own stages are
redone).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from ..utils.errors import UsageError
from ..utils.run_files import OVERWRITE_FLAG, STAGE_DONE_FILE
from ..utils.schema import STAGE_DONE_SCHEMA, read_state_file

logger = logging.getLogger(__name__)

# The stage folders that hold one subfolder per holdout.
HOLDOUT_STAGES = ("oracle", "oracle_skip", "oracle_causal")
# The study settings that name holdouts: a change of them keeps the stages that do not depend on the holdouts.
HOLDOUT_SETTINGS = ("holdouts", "builtin_holdouts")
HOLDOUT_HASH_KEY = "holdout_sha256"


def needed_blocks(config) -> int:
    """The most blocks of a holdout any stage takes (the oracle's, or the causal oracle's)."""
    causal = config.causal_blocks if config.causal_budget is not None else 0
    return max(config.oracle_blocks, causal)


def check_holdouts(config, specs: dict[str, str], out: Path, overwrite: bool) -> dict[str, str]:
    """Read and check every holdout (``specs``: name -> corpus spec) before the first stage; return each one's
    content hash. A holdout whose finished stages in ``out`` ran on other content is refused, unless ``overwrite``:
    then those stages are removed. The exact count of blocks needs the study's tokenizer: the study checks it with
    `holdout_blocks` as soon as there is one."""
    from ..data.corpus import corpus_content_hash, load_corpus, parse_corpus_spec
    from ..utils.arguments import user_values

    hashes = {}
    for name, spec in specs.items():
        parsed = parse_corpus_spec(spec, f"holdout_{name}")
        if parsed.kind == "local":
            _check_utf8(name, parsed.location)
        with user_values(f"--holdout {name}: "):
            texts = load_corpus(spec, f"holdout_{name}", builtin_max_chars=config.train.get("builtin_max_chars"))
        if hasattr(texts, "__len__"):  # a streamed Hub corpus is read when its stage runs
            _check_length(name, texts, config)
        hashes[name] = hashlib.sha256(corpus_content_hash(spec, f"holdout_{name}").encode()).hexdigest()
    _check_finished_stages(out, hashes, overwrite)
    return hashes


def _check_utf8(name: str, location: str) -> None:
    """Every plain-text file of a local holdout decodes as UTF-8 from its first byte to its last."""
    from ..data.corpus import local_data_files

    builder, files = local_data_files(location)
    if builder != "text":
        return
    for file in files:
        data = Path(file).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(
                f"--holdout {name}: {file!r} is not UTF-8 text (byte {err.start} of {len(data)} is "
                f"{data[err.start : err.start + 1]!r}); give UTF-8 text."
            ) from None


def _check_length(name: str, texts, config) -> None:
    """Refuse a holdout that cannot fill the blocks even at one token per byte and one end-of-text per document
    (a byte-level tokenizer never gives more tokens than that)."""
    block_size, blocks = config.train["block_size"], needed_blocks(config)
    most = sum(len(text.encode()) + 1 for text in texts["text"])
    if most < block_size * blocks:
        raise UsageError(
            f"--holdout {name}: its text is too short: at most {most} tokens, and the study needs {blocks} blocks "
            f"of {block_size} tokens ({blocks * block_size}); give it more text."
        )


def _check_finished_stages(out: Path, hashes: dict[str, str], overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, remove) a holdout's finished stages that ran on content other than now."""
    for name, digest in hashes.items():
        stale = []
        for stage in HOLDOUT_STAGES:
            marker = out / stage / name / STAGE_DONE_FILE
            if marker.is_file():
                recorded = read_state_file(marker, STAGE_DONE_SCHEMA).get(HOLDOUT_HASH_KEY)
                if recorded is not None and recorded != digest:
                    stale.append(marker.parent)
        if stale and not overwrite:
            folders = ", ".join(str(folder.relative_to(out)) for folder in stale)
            raise UsageError(
                f"--holdout {name}: its content changed since its stages ran in {out} ({folders}); give it another "
                f"name, or pass {OVERWRITE_FLAG} to redo that holdout's stages (the other stages are kept)."
            )
        for folder in stale:
            logger.warning("study: holdout %s changed; removing its stage %s", name, folder)
            shutil.rmtree(folder)


__all__ = ["HOLDOUT_HASH_KEY", "HOLDOUT_SETTINGS", "HOLDOUT_STAGES", "check_holdouts", "needed_blocks"]
