"""HellaSwag in a study: lm-eval's ``hellaswag_local`` task on a local copy, one run per model and routing.

Each run is kept in ``hellaswag/<name>.json`` (acc_norm, its stderr, acc, the items) and reused by a re-run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..utils.files import atomic_write_json
from ..utils.schema import HELLASWAG_RUN_SCHEMA, read_state_file

HELLASWAG_FILE = "hellaswag_val.jsonl"
TASK = "hellaswag_local"


def hellaswag_available(data_dir: str | None) -> str | None:
    """Why the HellaSwag part cannot run (one line), or None when ``data_dir`` holds the local copy."""
    if not data_dir:
        return "no HellaSwag folder was given (--hellaswag DIR)"
    if not (Path(data_dir) / HELLASWAG_FILE).is_file():
        return f"{data_dir} holds no {HELLASWAG_FILE}"
    return None


def evaluate_hellaswag(lm, task_manager, limit: int) -> dict:
    """acc_norm (with stderr) and acc of ``lm`` (an lm-eval model) on the first ``limit`` HellaSwag items of the
    local copy ``task_manager`` reads (`integrations.lm_eval.local_task_manager`), and every item's
    log-likelihoods (to compare two runs item by item)."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=task_manager, limit=limit, log_samples=True)
    scores = results["results"][TASK]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return {
        "items": len(samples),
        "acc_norm": scores["acc_norm,none"],
        "acc_norm_stderr": scores["acc_norm_stderr,none"],
        "acc": scores["acc,none"],
        "acc_stderr": scores["acc_stderr,none"],
        "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
    }


class HellaSwagRuns:
    """The HellaSwag runs of a study in ``folder``, one file each, on the local copy in ``data_dir``."""

    def __init__(self, folder: Path, data_dir: str):
        self.folder, self.data_dir = folder, data_dir
        self._task_manager = None  # indexing lm-eval's tasks takes seconds: once per study

    def run(self, name: str, make_lm, limit: int) -> dict:
        """The run ``name`` (``folder/<name>.json``), evaluated with the model ``make_lm()`` gives unless kept."""
        path = self.folder / f"{name}.json"
        if path.is_file():
            return read_state_file(path, HELLASWAG_RUN_SCHEMA)
        if self._task_manager is None:
            from ..integrations.lm_eval import local_task_manager

            self._task_manager = local_task_manager(self.data_dir)
        print(f"[duo-llm study] HellaSwag: {name} ({limit} items) ...", flush=True)
        record = {"name": name, **evaluate_hellaswag(make_lm(), self._task_manager, limit)}
        atomic_write_json(path, record)
        return record


def left_out(data_dir: str | None) -> dict | None:
    """``{"not_run": reason}``, said in one line, when ``data_dir`` holds no local copy; else None."""
    reason = hellaswag_available(data_dir)
    if reason is None:
        return None
    print(f"[duo-llm study] HellaSwag left out: {reason}.", flush=True)
    return {"not_run": reason}


class DuoModels:
    """lm-eval models of a study's Duo model for `HellaSwagRuns.run`: ``routing(name, **kwargs)`` is the model under
    a routing (``all-big``, ``fixed`` with ``pattern=``), ``router(folder)`` a trained router's model, learned
    routing; each a factory, so a kept run loads nothing."""

    def __init__(self, model, model_dir):
        from ..data.tokenization import load_tokenizer

        self.model, self.tokenizer = model, load_tokenizer(model_dir)
        self.device = str(next(model.parameters()).device)  # lm-eval's own default is cuda

    def routing(self, routing: str, **kwargs):
        from ..integrations.lm_eval import DuoLM

        def make():
            return DuoLM(pretrained=self.model, tokenizer=self.tokenizer, routing=routing, batch_size=8,
                         device=self.device, **kwargs)  # fmt: skip

        return make

    def router(self, folder):
        from ..integrations.lm_eval import DuoLM
        from ..utils.loading import load_duo_model

        def make():
            routed = load_duo_model(folder).to(self.device).eval()
            return DuoLM(
                pretrained=routed, tokenizer=self.tokenizer, routing="learned", batch_size=8, device=self.device
            )

        return make


def same_scores(a: dict, b: dict) -> dict:
    """Whether two runs on the same items score identically: acc_norm, and the largest log-likelihood difference."""
    diffs = [abs(x - y) for la, lb in zip(a["loglikelihoods"], b["loglikelihoods"]) for x, y in zip(la, lb)]
    return {
        "identical_acc_norm": a["acc_norm"] == b["acc_norm"] and a["items"] == b["items"],
        "max_loglikelihood_difference": max(diffs) if diffs else 0.0,
    }
