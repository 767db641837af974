"""A run's fingerprint: every setting that changes what it computes, with the paths it reads by their content.

A checkpoint carries the fingerprint of its run; a resumed run must have the same one (`loop.run_identity`), or
it would mix two different computations in one model. What may change on resume (`RESUMABLE_CHANGES`) and how
long the run is (`EXTENDABLE`) are left out; corpora, tokenizers and models go in by their content hashes, so a
renamed folder resumes and a changed file does not.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from ..data.corpus import corpus_content_hash
from ..utils.loading import is_hub_id
from ..utils.run_files import files_hash, folder_weights_hash
from .loop import run_fingerprint

# Arguments that may change when a run (stage 1, or the routers') is resumed: they do not change what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume_from",
        "report_to",
        "run_name",
        "progress",
        "log_every",
        "eval_every",
        "eval_blocks",
        "eval_batch_size",
        "eval_routings",
        "checkpoint_every",
        "checkpoints_to_keep",
        "cache_dir",
        "overwrite_output_dir",
        "torch_compile",
    }
)

# A resumed run may run longer: the steps already done computed the same (docs/training.md, "Resume, fingerprint,
# extend").
EXTENDABLE = frozenset({"max_steps", "num_epochs"})

# Paths that go into a run's fingerprint by their content (`content_fingerprint`), not by their name.
CONTENT_PATHS = frozenset({"dataset", "holdout_english", "holdout_code", "init_from", "tokenizer", "model"})

# Fields added after runs of their command were checkpointed: at their defaults (what those runs did) they are
# left out of the fingerprint, so such a run still resumes; any other value is in it.
ADDED_FIELDS = ("small_init", "distill_steps", "distill_learning_rate", "p_big_start", "p_big_decay_fraction")

# A tokenizer's files (in a tokenizer or model folder), whose bytes define it.
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece")



def tokenizer_hash(folder: str | Path | None) -> str | None:
    """SHA-256 of a folder's tokenizer files (None for no folder, the name for a Hub model id)."""
    if folder is None or is_hub_id(folder):
        return None if folder is None else str(folder)
    folder = Path(folder).expanduser()
    files = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(TOKENIZER_FILE_PREFIXES)]
    return f"sha256:{files_hash(files)}" if files else None


def model_folder_hash(path: str | Path | None) -> str | None:
    """The content of a model folder: its weights' SHA-256 (`run_files.folder_weights_hash`); a Hub id as it is."""
    if path is None or is_hub_id(path):
        return None if path is None else str(path)
    return f"sha256:{folder_weights_hash(Path(path).expanduser())}"


def content_fingerprint(args, accelerator: Accelerator) -> dict:
    """What a run's paths hold, and the settings Accelerate resolves, for its fingerprint (`run_fingerprint`).

    The corpora's contents (`data.corpus_content_hash`), the weights of the model it starts from (``init_from`` or
    ``model``), the tokenizer's files, the resolved mixed precision and the number of processes.
    """
    content = {
        "dataset": corpus_content_hash(args.dataset),
        "holdout_english": corpus_content_hash(args.holdout_english, "holdout_english", "holdout_english"),
        "holdout_code": corpus_content_hash(args.holdout_code, "holdout_code", "holdout_code"),
        "tokenizer": tokenizer_hash(args.tokenizer),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
    }
    for name in ("init_from", "model"):
        if hasattr(args, name):
            content[name] = model_folder_hash(getattr(args, name))
            content[f"{name}_tokenizer"] = tokenizer_hash(getattr(args, name))
    return content


def training_fingerprint(args, accelerator: Accelerator) -> dict:
    """Every setting that changes what a run (stage 1, or the routers') computes, with its paths by content.

    Left out: what may change on resume (`RESUMABLE_CHANGES`, and the run's length, `EXTENDABLE`).
    """
    fields = getattr(args, "__dataclass_fields__", {})
    at_default = {name for name in ADDED_FIELDS if name in fields and getattr(args, name) == fields[name].default}
    excluded = RESUMABLE_CHANGES | EXTENDABLE | CONTENT_PATHS | at_default
    return run_fingerprint(args, excluded, **content_fingerprint(args, accelerator))



__all__ = [
    "ADDED_FIELDS",
    "CONTENT_PATHS",
    "EXTENDABLE",
    "RESUMABLE_CHANGES",
    "content_fingerprint",
    "model_folder_hash",
    "tokenizer_hash",
    "training_fingerprint",
]
