"""Evaluating the ablation's models: held-out perplexity and the benchmarks at each p_big, each evaluation cached in
``evals/<run>/<setting>.json`` with a fingerprint of what it depends on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ...data.corpus import load_corpus, pack_corpus
from ...training.evaluation import evaluate_perplexity
from ...training.loop import reset_accelerate_state
from ...utils.files import atomic_write_text
from ...utils.loading import load_complete_model
from ...utils.schema import ABLATION_EVAL_SCHEMA
from .benchmarks import BENCHMARK_METRICS, BenchmarkSpec
from .files import jsonable, read_json
from .plan import AblationPlan, PlannedRun, route_probs
from .runs import model_fingerprint

logger = logging.getLogger(__name__)


def evaluation_points(plan: AblationPlan, run: PlannedRun) -> list[float | None]:
    """The p_big values a run is evaluated at (None: a dense model, evaluated once)."""
    return list(plan.p_bigs) if run.is_duo else [None]


def setting_key(p_big: float | None) -> str:
    return "dense" if p_big is None else f"p_big={p_big:g}"


def perplexity_fingerprint(plan: AblationPlan, run: PlannedRun) -> dict[str, Any]:
    return {
        "model": model_fingerprint(plan.run_dir(run)),
        "holdouts": {k: list(v) for k, v in plan.holdouts.items()},
        "eval_blocks": plan.settings["eval_blocks"],
        "block_size": plan.settings["block_size"],
        "builtin_max_chars": plan.settings["builtin_max_chars"],
        "eval_seed": plan.settings["eval_seed"],
    }


def benchmark_fingerprint(plan: AblationPlan, run: PlannedRun) -> dict[str, Any]:
    spec = plan.benchmarks
    return {
        "model": model_fingerprint(plan.run_dir(run)),
        "source": spec.source,
        "data_dir": spec.resolved_data_dir(),
        "benchmarks": list(spec.benchmarks),
        "limit": spec.limit,
        "eval_seed": plan.settings["eval_seed"],
    }


def _holdout_loaders(plan: AblationPlan, tokenizer, accelerator) -> dict:
    from torch.utils.data import DataLoader

    loaders = {}
    args = plan.runs[0].args
    for name, (spec, column) in plan.holdouts.items():
        texts = load_corpus(
            spec,
            f"holdout_{name}",
            text_column=column,
            streaming=plan.settings["streaming"],
            builtin_max_chars=plan.settings["builtin_max_chars"],
            cache_dir=args.cache_dir,
        )
        blocks = pack_corpus(
            texts, tokenizer, plan.settings["block_size"], f"holdout_{name}", plan.settings["eval_blocks"]
        )
        loaders[name] = accelerator.prepare(DataLoader(blocks, batch_size=args.eval_batch_size or args.batch_size))
    return loaders


def _load_model(folder: Path, device):
    model = load_complete_model(folder, torch.float32, "ablation run")
    return model.to(device).eval()


def evaluate_holdouts(plan: AblationPlan, run: PlannedRun, points, loaders, accelerator) -> dict:
    """Held-out loss and perplexity of one model at each point (a p_big, or None for dense)."""
    model = _load_model(plan.run_dir(run), accelerator.device)
    seed = plan.settings["eval_seed"]
    results = {}
    for p_big in points:
        if p_big is not None:
            model.set_routing("random", route_probs=route_probs(p_big), route_seed=seed)
        mode = "dense" if p_big is None else "random"
        metrics = evaluate_perplexity(model, loaders, accelerator, [mode], seed)
        results[p_big] = {
            f"{kind}_{name}": metrics[f"eval/{name}/{mode}/{kind}"] for name in loaders for kind in ("loss", "ppl")
        }
    del model
    return results


def benchmark_task_manager(spec: BenchmarkSpec):
    """The harness's `TaskManager` that knows the benchmark tasks of ``spec``."""
    from lm_eval.tasks import TaskManager

    from ...integrations.lm_eval import local_task_manager

    if spec.source == "hub":
        return TaskManager()
    return local_task_manager(spec.resolved_data_dir(), include_defaults=False)  # no index of the harness's tasks


def evaluate_benchmarks(plan: AblationPlan, run: PlannedRun, p_big: float | None, task_manager) -> dict | None:
    """ARC-Easy acc and HellaSwag acc_norm of one model at one point, through the harness (None off rank 0)."""
    import lm_eval

    spec = plan.benchmarks
    tasks = spec.task_names()
    model_args: dict[str, Any] = {"pretrained": str(plan.run_dir(run))}
    if p_big is None:
        model = "hf"
    else:
        model = "duo"
        model_args.update(routing="random", p_big=p_big, route_seed=plan.settings["eval_seed"])
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks.values()),
        task_manager=task_manager,
        batch_size=spec.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",
        limit=spec.limit,
        bootstrap_iters=1000,  # only the stderr of acc / acc_norm is asked for: the closed form, no resampling
        log_samples=False,
        random_seed=plan.settings["eval_seed"],
        numpy_random_seed=plan.settings["eval_seed"],
        torch_random_seed=plan.settings["eval_seed"],
    )
    if results is None:  # not the main process of a data-parallel evaluation
        return None
    metrics: dict[str, Any] = {"n": {}}
    for bench, task in tasks.items():
        metric = BENCHMARK_METRICS[bench]
        scores = results["results"][task]
        metrics[f"{bench}_{metric}"] = float(scores[f"{metric},none"])
        stderr = scores.get(f"{metric}_stderr,none")
        metrics[f"{bench}_{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        metrics["n"][bench] = int(results["n-samples"][task]["effective"])
    metrics["lm_eval"] = {"model": model, "model_args": model_args, "tasks": tasks, "versions": results.get("versions")}
    return metrics


def evaluate_runs(plan: AblationPlan, tokenizer) -> dict[str, dict[str, dict]]:
    """Evaluate every run at its points, reusing cached evaluations; returns run -> setting -> record."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    accelerator = Accelerator()
    loaders = task_manager = None
    records: dict[str, dict[str, dict]] = {}

    def save(path: Path, record: dict) -> None:  # each evaluation is kept as soon as it is done
        if accelerator.is_main_process:
            atomic_write_text(path, json.dumps(jsonable(record), indent=2))

    try:
        for run in plan.runs:
            points = evaluation_points(plan, run)
            paths = {p: plan.out / "evals" / run.name / f"{setting_key(p)}.json" for p in points}
            cached = {p: read_json(path, ABLATION_EVAL_SCHEMA) or {} for p, path in paths.items()}
            ppl_fp = jsonable(perplexity_fingerprint(plan, run))
            todo = [p for p in points if (cached[p].get("perplexity") or {}).get("fingerprint") != ppl_fp]
            if todo and plan.holdouts:
                logger.info("Held-out perplexity of %s at %s", run.name, [setting_key(p) for p in todo])
                if loaders is None:
                    loaders = _holdout_loaders(plan, tokenizer, accelerator)
                for p, metrics in evaluate_holdouts(plan, run, todo, loaders, accelerator).items():
                    cached[p]["perplexity"] = {"fingerprint": ppl_fp, "metrics": metrics}
                    save(paths[p], cached[p])
            if plan.benchmarks.enabled:
                bench_fp = jsonable(benchmark_fingerprint(plan, run))
                for p in points:
                    if (cached[p].get("benchmarks") or {}).get("fingerprint") == bench_fp:
                        continue
                    logger.info("Benchmarks of %s at %s", run.name, setting_key(p))
                    task_manager = task_manager or benchmark_task_manager(plan.benchmarks)
                    [metrics] = broadcast_object_list([evaluate_benchmarks(plan, run, p, task_manager)])
                    cached[p]["benchmarks"] = {"fingerprint": bench_fp, "metrics": metrics}
                    save(paths[p], cached[p])
            accelerator.wait_for_everyone()
            records[run.name] = {setting_key(p): cached[p] for p in points}
    finally:
        # The harness and this evaluation set Accelerate's process-wide state; later runs start clean.
        reset_accelerate_state()
    return records
