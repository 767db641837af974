"""Training the ablation's runs: the shared tokenizer, then each planned run, reused when finished with the same
arguments, resumed from its newest checkpoint when interrupted, refused (or retrained when asked) when it no longer
fits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...data.corpus import iter_texts, load_corpus
from ...data.tokenization import has_tokenizer, load_tokenizer, train_bpe_tokenizer
from ...training.arguments import current_names
from ...training.checkpointing import CHECKPOINTS_DIR, list_checkpoints
from ...training.fingerprint import RESUMABLE_CHANGES
from ...training.train import train
from ...utils.errors import UsageError
from ...utils.files import atomic_target, atomic_write_text
from ...utils.processes import process_state
from ...utils.run_files import OVERWRITE_FLAG, TRAIN_RESULTS_FILE, TRAINING_ARGS_FILE, FingerprintMismatch
from ...utils.schema import ABLATION_RUN_SCHEMA, JSON_OBJECT_SCHEMA, TRAIN_RESULTS_SCHEMA, TRAINING_ARGS_SCHEMA
from .files import jsonable, read_json
from .plan import AblationPlan, PlannedRun

logger = logging.getLogger(__name__)


def _comparable_args(values: Mapping[str, Any]) -> dict[str, Any]:
    # Paths inside the output folder may move with it; settings that do not change what a run computes may change.
    ignored = RESUMABLE_CHANGES | {"init_from", "tokenizer"}
    return {k: v for k, v in values.items() if k not in ignored}


def run_is_finished(run: PlannedRun, overwrite: bool = False) -> bool:
    """Whether a run's folder holds its final model.

    A final model trained with other arguments is refused, or with ``overwrite`` counts as not finished (retrained).
    """
    folder = Path(run.args.output_dir)
    results = read_json(folder / TRAIN_RESULTS_FILE, TRAIN_RESULTS_SCHEMA)
    if results is None:
        return False
    saved = read_json(folder / TRAINING_ARGS_FILE, TRAINING_ARGS_SCHEMA) or {}
    planned = _comparable_args(dataclasses.asdict(run.args))
    saved = _comparable_args(current_names(saved))
    changed = sorted(k for k in planned if saved.get(k) != planned[k])
    if changed and not overwrite:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {planned[k]!r}" for k in changed)
        raise UsageError(
            f"{folder} holds a finished run '{run.name}' trained with other arguments ({detail}). Use a new "
            f"--output-dir for other settings, or pass {OVERWRITE_FLAG} to retrain it."
        )
    return not changed


def prepare_tokenizer(plan: AblationPlan):
    """The tokenizer every run shares: the given one, the one already in OUT/tokenizer, or a new BPE."""
    folder = plan.tokenizer_dir
    state = process_state()
    settings = plan.settings
    with state.main_process_first():
        if not has_tokenizer(folder):
            logger.info(
                "Training a byte-level BPE tokenizer (vocab %d) on %s", settings["vocab_size"], settings["dataset"]
            )
            texts = load_corpus(
                settings["dataset"],
                "train",
                text_column=plan.runs[0].args.text_column,
                streaming=settings["streaming"],
                builtin_max_chars=settings["builtin_max_chars"],
                cache_dir=plan.runs[0].args.cache_dir,
            )
            tokenizer = train_bpe_tokenizer(
                iter_texts(texts, settings["tokenizer_train_chars"]), settings["vocab_size"]
            )
            if state.is_main_process:
                with atomic_target(folder) as tmp:
                    tokenizer.save_pretrained(tmp)
        tokenizer = load_tokenizer(folder)
    if settings["tokenizer"] is None and len(tokenizer) > settings["vocab_size"]:
        raise UsageError(
            f"{folder} holds a tokenizer of {len(tokenizer)} tokens, more than vocab_size {settings['vocab_size']}; "
            "use a new --output-dir or pass --tokenizer."
        )
    return tokenizer


RUN_INFO = "ablation_run.json"  # in each run folder: training time, and the model it started from


def _stale_reason(plan: AblationPlan, run: PlannedRun, source) -> str | None:
    """Why a finished run no longer fits the plan (its source model retrained, another tokenizer), or None."""
    recorded = (read_json(plan.run_dir(run) / RUN_INFO, ABLATION_RUN_SCHEMA) or {}).get("init_from")
    if source is not None and recorded is not None and recorded != source:
        return f"was trained from an earlier '{run.depends_on}' model, which has been retrained since"
    if read_json(plan.run_dir(run) / "tokenizer.json", JSON_OBJECT_SCHEMA) != read_json(
        plan.tokenizer_dir / "tokenizer.json", JSON_OBJECT_SCHEMA
    ):
        return f"was trained with another tokenizer than {plan.tokenizer_dir}"
    return None


def train_runs(plan: AblationPlan, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Train every run not finished yet (resuming from its newest checkpoint); return (trained, reused).

    A finished run that no longer fits the plan (other arguments, its source model retrained, another tokenizer) is
    refused, or with ``overwrite`` retrained from scratch; so is an unfinished one whose checkpoints do not fit.
    """
    trained, reused = [], []
    for index, run in enumerate(plan.runs, 1):
        source = jsonable(model_fingerprint(plan.run_dir(run.depends_on))) if run.depends_on else None
        finished = run_is_finished(run, overwrite)
        stale = _stale_reason(plan, run, source) if finished else None
        if stale is not None and not overwrite:
            raise UsageError(
                f"{plan.run_dir(run)} {stale}; pass {OVERWRITE_FLAG} to train '{run.name}' again (runs compared in "
                "one table must share their tokenizer and source models)."
            )
        if finished and stale is None:
            reused.append(run.name)
            logger.info("[%d/%d] %s: finished earlier, reused", index, len(plan.runs), run.name)
            continue
        logger.info(
            "[%d/%d] training %s (%s, p_big %g, %d steps, %d tokens)",
            index, len(plan.runs), run.name, run.kind, run.p_big, run.args.max_steps, run.tokens,
        )  # fmt: skip
        start = time.perf_counter()
        checkpoints = list_checkpoints(plan.run_dir(run) / CHECKPOINTS_DIR)
        fresh = dataclasses.replace(run.args, resume_from=None, overwrite_output_dir=overwrite)
        try:
            train(dataclasses.replace(fresh, resume_from="latest") if checkpoints else fresh)
        except FingerprintMismatch:
            if not overwrite:
                raise
            train(fresh)  # the checkpoints are of an earlier plan: start over, as asked
        info = {"train_seconds": time.perf_counter() - start, "init_from": source}
        if process_state().is_main_process:
            atomic_write_text(plan.run_dir(run) / RUN_INFO, json.dumps(info, indent=2))
        trained.append(run.name)
    return trained, reused


def model_fingerprint(folder: Path) -> dict[str, Any]:
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "train_results": read_json(folder / TRAIN_RESULTS_FILE, TRAIN_RESULTS_SCHEMA),
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
    }
