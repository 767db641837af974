"""The ablation's results: one row per model and p_big, written as ``results.md`` / ``.json`` / ``.csv`` with
``fig8.png``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig

from ...data.corpus import HOLDOUTS
from ...training.building import dense_baseline_config, duo_config_from_args
from ...utils.files import atomic_target, atomic_write_text
from ...utils.flops import flops_per_token
from ...utils.loading import is_duo_model
from ...utils.run_files import TRAIN_RESULTS_FILE
from ...utils.schema import ABLATION_RUN_SCHEMA, TRAIN_RESULTS_SCHEMA
from ...utils.tables import markdown_table
from .benchmarks import BENCHMARK_CHANCE, BENCHMARK_METRICS, BENCHMARK_NAMES
from .figure import plot_fig8
from .files import jsonable, read_json
from .plan import KINDS, AblationPlan, PlannedRun, route_probs
from .runs import RUN_INFO


def model_flops(config, p_big: float | None, seq_len: int) -> float:
    """Forward FLOPs per token: a Duo model under random routing at ``p_big``, or a dense model (None)."""
    fractions = {"big": 1.0} if p_big is None else route_probs(p_big)
    return flops_per_token(config, fractions, seq_len=seq_len).total


def planned_config(run: PlannedRun, vocab_size: int):
    """The model config a from-scratch run builds (Duo, or the FLOP-matched dense Llama)."""
    duo = duo_config_from_args(run.args, vocab_size)
    return dense_baseline_config(duo) if run.args.mode == "dense" else duo


def build_rows(plan: AblationPlan, records: Mapping[str, Mapping[str, dict]]) -> tuple[list[dict], dict[str, int]]:
    """One row per (model, point), in the order of the figure; and the benchmark example counts."""
    rows, counts = [], {}
    for run in plan.runs:
        config = AutoConfig.from_pretrained(plan.run_dir(run))
        is_duo = is_duo_model(config)
        timing = read_json(plan.run_dir(run) / RUN_INFO, ABLATION_RUN_SCHEMA) or {}
        results = read_json(plan.run_dir(run) / TRAIN_RESULTS_FILE, TRAIN_RESULTS_SCHEMA) or {}
        for key, record in records[run.name].items():
            p_big = None if key == "dense" else float(key.split("=")[1])
            ffn = (
                f"{config.intermediate_size}/{config.small_intermediate_size}"
                if is_duo
                else str(config.intermediate_size)
            )
            row: dict[str, Any] = {
                "model": KINDS[run.kind],
                "run": run.name,
                "p_big": p_big if p_big is not None else run.p_big,
                "ffn_inner": ffn,
                "train_tokens": run.total_tokens,
                "run_tokens": results.get("tokens_seen", run.tokens),
                "forward_flops_per_token": model_flops(config, p_big, plan.settings["block_size"]),
                "train_seconds": timing.get("train_seconds"),
            }
            for name in HOLDOUTS:
                metrics = (record.get("perplexity") or {}).get("metrics") or {}
                row[f"ppl_{name}"] = metrics.get(f"ppl_{name}")
                row[f"loss_{name}"] = metrics.get(f"loss_{name}")
            bench = (record.get("benchmarks") or {}).get("metrics") or {}
            for b, metric in BENCHMARK_METRICS.items():
                row[f"{b}_{metric}"] = bench.get(f"{b}_{metric}")
                row[f"{b}_{metric}_stderr"] = bench.get(f"{b}_{metric}_stderr")
            counts.update(bench.get("n") or {})
            rows.append(row)
    return rows, counts


def column_labels(plan: AblationPlan, counts: Mapping[str, int]) -> dict[str, str]:
    """Row key -> column title; the benchmark titles say what data they were computed on."""
    labels = {
        "model": "model",
        "run": "run",
        "p_big": "p_big",
        "ffn_inner": "FFN inner (big/small)",
        "train_tokens": "train tokens (total)",
        "forward_flops_per_token": "forward FLOPs/token",
    }
    for name in plan.holdouts:
        labels[f"ppl_{name}"] = f"ppl {name} (held-out)"
    if plan.benchmarks.enabled:
        suffix = plan.benchmarks.short_label(counts)
        for b in plan.benchmarks.benchmarks:
            metric = BENCHMARK_METRICS[b]
            chance = f"(chance {BENCHMARK_CHANCE[b]:g}) " if b in BENCHMARK_CHANCE else ""
            labels[f"{b}_{metric}"] = f"{BENCHMARK_NAMES[b]} {metric} {chance}{suffix}".strip()
    return labels


def _fmt(value, key: str) -> str:
    if value is None:
        return "-"
    if key == "forward_flops_per_token":
        return f"{value / 1e6:.2f}M" if value < 1e9 else f"{value / 1e9:.2f}G"
    if key == "train_tokens":
        return f"{value:,}"
    if key.startswith("ppl_"):
        return f"{value:.2f}"
    if key == "p_big":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _cell(row: Mapping[str, Any], key: str) -> str:
    cell = _fmt(row.get(key), key)
    stderr = row.get(f"{key}_stderr")
    if stderr is not None and row.get(key) is not None:
        cell += f" ± {stderr:.3f}"
    return cell


def results_table(rows: Sequence[dict], labels: Mapping[str, str]) -> str:
    """``results.md``'s table: the titled columns, numbers formatted, benchmark scores with their stderr."""
    return markdown_table(list(labels.values()), [[_cell(row, k) for k in labels] for row in rows])


def csv_table(rows: Sequence[dict], labels: Mapping[str, str]) -> str:
    """Every row field; the columns that have a title are named by it (so benchmark columns carry their label)."""
    keys = list(rows[0]) if rows else list(labels)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([labels.get(k, k) for k in keys])
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
    return buffer.getvalue()


def write_outputs(plan: AblationPlan, rows: list[dict], counts: dict[str, int], seconds: float) -> dict[str, str]:
    """results.md / .json / .csv and fig8.png in ``plan.out`` (atomically)."""
    labels = column_labels(plan, counts)
    note = plan.benchmarks.note(counts) if plan.benchmarks.enabled else "not evaluated (--lm-eval-tasks none)"
    for row in rows:
        row["benchmark_data"] = note if plan.benchmarks.enabled else None
    files = {name: plan.out / name for name in ("results.md", "results.json", "results.csv", "fig8.png")}
    tokens = plan.steps * plan.tokens_per_step
    header = [
        f"# Fig. 8 ablations (preset `{plan.settings['preset']}`)",
        "",
        f"Each model: {tokens:,} training tokens ({plan.steps} steps of {plan.tokens_per_step:,}); frozen-big counts "
        f"its dense pre-training in that total ({plan.run('big_pretrain').tokens:,} + "
        f"{plan.run('frozen_big').tokens:,}). Duo and frozen-big are evaluated under random routing at each p_big; "
        "each dense model has the FFN size whose FLOPs equal the Duo model's at its p_big.",
        "",
        f"Held-out perplexity: {', '.join(f'{k} = {v[0]}' for k, v in plan.holdouts.items()) or 'none'} "
        f"({plan.settings['eval_blocks']} blocks of {plan.settings['block_size']} tokens each).",
        f"Benchmarks: {note}.",
        "",
        results_table(rows, labels),
        "",
    ]
    atomic_write_text(files["results.md"], "\n".join(header))
    payload = {
        "preset": plan.settings["preset"],
        "settings": plan.settings,
        "p_bigs": plan.p_bigs,
        "tokens_per_model": tokens,
        "steps": plan.steps,
        "tokens_per_step": plan.tokens_per_step,
        "benchmark_data": note,
        "benchmark_chance": {
            f"{b}_{BENCHMARK_METRICS[b]}": BENCHMARK_CHANCE[b]
            for b in plan.benchmarks.benchmarks
            if plan.benchmarks.enabled and b in BENCHMARK_CHANCE
        },
        "columns": labels,
        "rows": rows,
        "seconds_this_call": seconds,
    }
    atomic_write_text(files["results.json"], json.dumps(jsonable(payload), indent=2))
    atomic_write_text(files["results.csv"], csv_table(rows, labels))
    with atomic_target(files["fig8.png"]) as tmp_png:
        plot_fig8(plan, rows, counts, tmp_png)
    return {name: str(path) for name, path in files.items()}
