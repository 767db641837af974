"""Metrics, findings, figures and the report of a study (``report.md``, ``report.html``, ``metrics.json``).

`collect_metrics` reads the stage outputs into one JSON-ready dict; `findings` checks the paper's findings against
those numbers only; `write_report` draws the figures and renders the report from the same dict, so every number
in the report is one of ``metrics.json``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from pathlib import Path

import torch

from ..models.routes import BIG, SKIP
from ..oracle.results import OracleResult
from ..utils.files import atomic_write_json, atomic_write_text
from ..utils.run_files import (
    STAGE_DONE_FILE,
    STUDY_METRICS_FILE,
    STUDY_REPORT_FILE,
    STUDY_REPORT_HTML_FILE,
    TRAIN_RESULTS_FILE,
)
from ..utils.schema import STUDY_RECORD_SCHEMA, read_state_file
from ..utils.tables import markdown_table
from . import analysis

ROUTER_LABELS = {
    "conventional": "router",
    "distilled": "distilled router",
    "distilled_causal": "distilled router (causal oracle)",
}


def collect_metrics(config, model, stages, oracle, skip, causal, routers, n_layers: int) -> dict:
    """Everything the report states, as plain numbers."""
    train_record = _training_record(stages.out, config)
    metrics = {
        "preset": config.preset,
        "settings": json.loads(json.dumps(dataclasses.asdict(config))),
        "model": {
            "layers": n_layers,
            "type": model.config.model_type,
            "source": config.model or "stage 1 of this study",
            "hidden_size": model.config.hidden_size,
            "big_inner_size": model.config.intermediate_size,
            "small_inner_size": model.config.small_intermediate_size,
            "vocab_size": model.config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "training_steps": train_record["global_step"],
            "training_tokens": train_record["tokens_seen"],
            "training_eval": train_record["eval"],
        },
        "oracle": {h: oracle_metrics(r, n_layers, config) for h, r in oracle.items()},
        "skip": {h: skip_metrics(r, config.skip_budget) for h, r in skip.items()},
        "causal": {h: causal_metrics(r) for h, r in causal.items()},
        "routers": {
            kind: {str(k): {h: _router_numbers(entry) for h, entry in per_k.items()} for k, per_k in by_k.items()}
            for kind, by_k in routers.items()
        },
        "token_difficulty": {h: difficulty_metrics(r) for h, r in oracle.items()},
    }
    metrics["router_gap"] = router_gaps(metrics)
    metrics["findings"] = findings(metrics)
    metrics["seconds"] = stage_seconds(stages.out)
    return metrics


def _training_record(out: Path, config) -> dict:
    """Steps, tokens and last evaluation of stage 1: the study's own run, or what a given model folder recorded."""
    marker = Path(config.model) / TRAIN_RESULTS_FILE if config.model else out / "model" / STAGE_DONE_FILE
    record = read_state_file(marker, STUDY_RECORD_SCHEMA) if marker.exists() else {}
    return {
        "global_step": record.get("global_step", 0),
        "tokens_seen": record.get("tokens_seen", 0),
        "eval": record.get("eval", {k: v for k, v in record.items() if k.startswith("eval/")}),
    }


def oracle_metrics(result: OracleResult, n_layers: int, config) -> dict:
    by_budget = {}
    for k in range(n_layers + 1):
        label = f"big={k}"
        entry = {
            "patterns": math.comb(n_layers, k),
            "oracle": result.perplexity("oracle", label),
            "fixed": result.perplexity("fixed", label),
            "fixed_pattern": result.fixed_pattern(label),
        }
        if config.best_of_k:
            entry[f"best_of_{config.best_of_k}"] = result.perplexity("best_of_k", label)
            entry[f"best_of_{config.best_of_k}_pattern"] = result.perplexity("best_of_k_pattern", label)
        by_budget[str(k)] = entry
    constant = config.constant_budget
    schedules = {str(constant): result.perplexity("oracle", f"big={constant}")}
    schedules.update({s: result.perplexity("oracle", f"big={s}") for s in config.schedules})
    return {
        "tokens": result.num_tokens,
        "all_small": result.perplexity("small_all"),
        "all_big": result.perplexity("big_all"),
        "by_budget": by_budget,
        "schedules": schedules,
        "big_layer_center": {
            str(k): layer_center(result.usage(f"big={k}")) for k in range(1, n_layers) if k in config.router_budgets
        },
    }


def skip_metrics(result: OracleResult, budget: str) -> dict:
    usage = result.usage(budget)
    return {
        "budget": budget,
        "oracle": result.perplexity("oracle", budget),
        "fixed": result.perplexity("fixed", budget),
        "fixed_pattern": result.fixed_pattern(budget),
        "all_big": result.perplexity("big_all"),
        "skip_fraction_per_layer": analysis.layer_preference(usage, SKIP).tolist(),
    }


def causal_metrics(result: OracleResult) -> dict:
    label = result.budgets[0]
    return {
        "budget": label,
        "tokens": result.num_tokens,
        "oracle": result.perplexity("oracle", label),
        "causal_oracle": result.perplexity("causal_oracle", label),
        "fixed": result.perplexity("fixed", label),
    }


def difficulty_metrics(result: OracleResult, top: float = 0.1) -> dict:
    """How differently the small model's loss and the loss gap rank the tokens (the paper's Section 3.2.2)."""
    scores = result.token_difficulty("all")
    mask = result.tensors["token_mask"].bool()
    small, gap = scores["loss_small_all"][mask].double(), scores["gap"][mask].double()
    n_top = max(1, int(top * small.numel()))
    top_small = set(small.topk(n_top).indices.tolist())
    top_gap = set(gap.topk(n_top).indices.tolist())
    return {
        "tokens": int(small.numel()),
        "spearman_small_vs_gap": spearman(small, gap),
        "top_decile_overlap": len(top_small & top_gap) / n_top,
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation; tied values share their average rank (NaN if either side is constant)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def layer_center(usage: torch.Tensor, choice: int = BIG) -> float:
    """Mean layer index (0 = first) of ``choice``'s usage: where in depth the compute goes."""
    per_layer = usage[choice].double().sum(-1)
    layers = torch.arange(per_layer.numel(), dtype=torch.float64)
    return float((per_layer * layers).sum() / per_layer.sum().clamp_min(1e-12))


def _router_numbers(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "usage"}


def interpolated_log_ppl(by_budget: dict, method: str, big_layers: float) -> float:
    """Log perplexity of ``method`` (``oracle`` or ``fixed``) at a fractional number of BIG layers, linear in log
    perplexity between the two whole budgets around it (the routers realise budgets between whole numbers)."""
    low = max(0, min(int(math.floor(big_layers)), len(by_budget) - 1))
    high = min(low + 1, len(by_budget) - 1)
    share = min(max(big_layers - low, 0.0), 1.0) if high > low else 0.0
    a, b = math.log(by_budget[str(low)][method]), math.log(by_budget[str(high)][method])
    return a + share * (b - a)


def gap_closed(router_ppl: float, fixed_ppl: float, oracle_ppl: float) -> float:
    """Share of the fixed-to-oracle gap in log perplexity that a router closes: 0 at the fixed pattern, 1 at the
    oracle, negative when worse than fixed (NaN when the oracle is no better than fixed)."""
    gap = math.log(fixed_ppl) - math.log(oracle_ppl)
    return (math.log(fixed_ppl) - math.log(router_ppl)) / gap if gap > 0 else float("nan")


def router_gaps(metrics: dict) -> dict:
    """Per holdout, router kind and target budget: the router's realised BIG layers and perplexity, fixed and
    oracle at that realised budget (`interpolated_log_ppl`) and the share of their gap it closes (`gap_closed`)."""
    n = metrics["model"]["layers"]
    gaps: dict[str, dict] = {}
    for holdout, m in metrics["oracle"].items():
        for kind, by_k in metrics["routers"].items():
            for k, per_holdout in by_k.items():
                entry = per_holdout[holdout]
                big_layers = entry["realised"].get("big", 0.0) * n
                fixed = math.exp(interpolated_log_ppl(m["by_budget"], "fixed", big_layers))
                oracle = math.exp(interpolated_log_ppl(m["by_budget"], "oracle", big_layers))
                gaps.setdefault(holdout, {}).setdefault(kind, {})[k] = {
                    "realised_big_layers": big_layers,
                    "ppl": entry["ppl"],
                    "fixed": fixed,
                    "oracle": oracle,
                    "gap_closed": gap_closed(entry["ppl"], fixed, oracle),
                }
    return gaps


def stage_seconds(out: Path) -> dict[str, float]:
    seconds = {}
    for marker in sorted(out.glob(f"**/{STAGE_DONE_FILE}")):
        seconds[str(marker.parent.relative_to(out))] = read_state_file(marker, STUDY_RECORD_SCHEMA).get("seconds", 0.0)
    return seconds


# ----------------------------------------------------------------------------------------------------
# Findings: each is checked on the numbers of metrics.json only.


def findings(metrics: dict) -> list[dict]:
    """The paper's findings on each holdout, each with the numbers that decide it and whether this run reproduces
    it there (`holdout_findings`)."""
    return [finding for holdout in metrics["oracle"] for finding in holdout_findings(metrics, holdout)]


def holdout_findings(metrics: dict, holdout: str) -> list[dict]:
    """The paper's findings checked on the numbers of one holdout."""
    out = []
    m = metrics["oracle"][holdout]
    n = metrics["model"]["layers"]
    budgets = [str(k) for k in metrics["settings"]["router_budgets"]]
    best_of = f"best_of_{metrics['settings']['best_of_k']}"

    def finding(key: str, statement: str, reproduced: bool, numbers: dict) -> None:
        out.append({**_finding(key, statement, reproduced, numbers), "holdout": holdout})

    numbers = {k: {method: m["by_budget"][k][method] for method in ("oracle", best_of, "fixed")} for k in budgets}
    ok = all(v["oracle"] < v[best_of] < v["fixed"] for v in numbers.values())
    finding("oracle_beats_random_beats_fixed", f"oracle < {best_of.replace('_', '-')} < fixed", ok, numbers)

    one, all_big = m["by_budget"]["1"]["oracle"], m["all_big"]
    finding(
        "one_big_layer_beats_all_big",
        "oracle with 1 BIG layer beats all-BIG",
        one < all_big,
        {"oracle_1_big": one, "all_big": all_big},
    )

    curve = {k: v["oracle"] for k, v in m["by_budget"].items()}
    best_k = min(curve, key=curve.get)
    finding(
        "oracle_lowest_at_middle_budget",
        "oracle perplexity is lowest at a middle budget (0 < k < n)",
        0 < int(best_k) < n,
        {"best_k": int(best_k), "ppl_at_best_k": curve[best_k], "ppl_at_0": curve["0"], f"ppl_at_{n}": curve[str(n)]},
    )

    distances = {}
    for k in budgets:
        if k not in metrics["routers"].get("conventional", {}):
            continue
        router = math.log(metrics["routers"]["conventional"][k][holdout]["ppl"])
        fixed, oracle = math.log(m["by_budget"][k]["fixed"]), math.log(m["by_budget"][k]["oracle"])
        distances[k] = {"to_fixed": abs(router - fixed), "to_oracle": abs(router - oracle)}
    if distances:
        finding(
            "routers_closer_to_fixed",
            "the conventional router sits closer to fixed than to the oracle (distance in log perplexity)",
            all(d["to_fixed"] < d["to_oracle"] for d in distances.values()),
            distances,
        )

    routers = metrics["routers"]
    for kind in (k for k in ROUTER_LABELS if k != "conventional" and k in routers and "conventional" in routers):
        pairs = {
            k: {"conventional": routers["conventional"][k][holdout]["ppl"], kind: routers[kind][k][holdout]["ppl"]}
            for k in budgets
            if k in routers[kind] and k in routers["conventional"]
        }
        finding(
            f"{kind}_beats_conventional",
            f"beyond the paper: the {ROUTER_LABELS[kind]} beats the conventional router at every budget (perplexity)",
            all(p[kind] < p["conventional"] for p in pairs.values()),
            pairs,
        )

    centers = m["big_layer_center"]
    low, high = budgets[0], budgets[-1]
    middle_layer = (n - 1) / 2
    finding(
        "oracle_later_layers_at_low_budget",
        f"the oracle favours later layers at low budgets (k={low}) and earlier ones at high budgets "
        f"(k={high}): mean BIG layer index above / below the middle layer {middle_layer:g}",
        centers[low] > middle_layer > centers[high],
        centers,
    )

    difficulty = metrics["token_difficulty"][holdout]
    finding(
        "gap_ranks_tokens_differently",
        "the loss gap ranks tokens differently from the small model's loss (Spearman < 0.9 and top-10% overlap < 0.5)",
        difficulty["spearman_small_vs_gap"] < 0.9 and difficulty["top_decile_overlap"] < 0.5,
        difficulty,
    )

    schedules = m["schedules"]
    constant = str(metrics["settings"]["constant_budget"])
    finding(
        "oracle_prefers_constant_budget",
        f"a constant budget of {constant} BIG layers beats budgets that change along the sequence",
        schedules[constant] < min(v for k, v in schedules.items() if k != constant),
        schedules,
    )
    return out


def _finding(key: str, statement: str, reproduced: bool, numbers: dict) -> dict:
    return {"id": key, "statement": statement, "reproduced": bool(reproduced), "numbers": numbers}


# ----------------------------------------------------------------------------------------------------
# Figures and report


def fmt(value) -> str:
    """How the report prints a number (the test checks the report against metrics.json with this)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_figures(out: Path, metrics: dict, oracle: dict[str, OracleResult], routers: dict, model_dir: Path) -> dict:
    figures = out / "figures"
    n = metrics["model"]["layers"]
    best_of = f"best_of_{metrics['settings']['best_of_k']}"
    paths = {}
    for holdout, m in metrics["oracle"].items():
        curves = {
            method.replace("_", "-"): {int(k): v[method] for k, v in m["by_budget"].items()}
            for method in ("oracle", best_of, "fixed")
        }
        for kind, by_k in metrics["routers"].items():
            curves[ROUTER_LABELS[kind]] = {int(k): v[holdout]["ppl"] for k, v in by_k.items()}
        paths[f"ppl_vs_budget_{holdout}"] = analysis.plot_ppl_vs_budget(
            curves, n, figures / f"ppl_vs_budget_{holdout}.png", f"Perplexity against budget ({holdout}; Fig. 4b)"
        )
        k = str(metrics["settings"]["router_budgets"][len(metrics["settings"]["router_budgets"]) // 2])
        methods = {
            "oracle": m["by_budget"][k]["oracle"],
            best_of.replace("_", "-"): m["by_budget"][k][best_of],
            "fixed": m["by_budget"][k]["fixed"],
        }
        for kind, by_k in metrics["routers"].items():
            methods[ROUTER_LABELS[kind]] = by_k[k][holdout]["ppl"]
        paths[f"methods_{holdout}"] = analysis.plot_method_values(
            methods, figures / f"methods_{holdout}.png", f"{k} BIG layers of {n} ({holdout}; Fig. 4a)"
        )
        paths[f"schedules_{holdout}"] = analysis.plot_method_values(
            {f"big={s}": v for s, v in m["schedules"].items()},
            figures / f"schedules_{holdout}.png",
            f"Oracle under position-dependent budgets ({holdout}; Fig. 4c)\n"
            "big=a:b: a BIG layers at the first position, falling linearly to b at the last",
        )
        panels = {f"oracle k={k}": oracle[holdout].usage(f"big={k}") for k in metrics["settings"]["router_budgets"]}
        paths[f"oracle_usage_{holdout}"] = analysis.plot_usage_heatmaps(
            panels, figures / f"oracle_usage_{holdout}.png", f"Oracle: BIG usage ({holdout}; Fig. 2)"
        )
        for kind, by_k in routers.items():
            panels = {f"{ROUTER_LABELS[kind]} k={k}": entry[holdout]["usage"] for k, entry in by_k.items()}
            paths[f"router_{kind}_usage_{holdout}"] = analysis.plot_usage_heatmaps(
                panels,
                figures / f"router_{kind}_usage_{holdout}.png",
                f"{ROUTER_LABELS[kind]}: BIG usage ({holdout}; Fig. 3)",
            )
        paths.update(_curve_figures(figures, metrics, holdout))
        paths.update(_difficulty_figures(figures, holdout, oracle[holdout], model_dir))
    return paths


def _curve_figures(figures: Path, metrics: dict, holdout: str) -> dict:
    """The routers' held-out perplexity along training at the middle router budget, against fixed and oracle."""
    if not metrics["routers"]:
        return {}
    budgets = metrics["settings"]["router_budgets"]
    k = str(budgets[len(budgets) // 2])
    curves = {ROUTER_LABELS[kind]: by_k[k][holdout].get("curve", []) for kind, by_k in metrics["routers"].items()}
    if not any(curves.values()):
        return {}
    entry = metrics["oracle"][holdout]["by_budget"][k]
    path = analysis.plot_router_curves(
        curves,
        {f"fixed (k={k})": entry["fixed"], f"oracle (k={k})": entry["oracle"]},
        figures / f"router_curves_{holdout}.png",
        f"Routers along training, {k} BIG layers of {metrics['model']['layers']} ({holdout})",
    )
    return {f"router_curves_{holdout}": path}


def _difficulty_figures(figures: Path, holdout: str, result: OracleResult, model_dir: Path) -> dict:
    from ..data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    scores = result.token_difficulty("all")
    ids = result.tensors["input_ids"][0]
    mask = result.tensors["token_mask"][0].bool()
    # Position t's loss is the prediction of token t + 1: colour the predicted token.
    tokens = [tokenizer.decode([int(i)]) for i in ids[1:]][: int(mask.sum())]
    panels = {
        "loss of the small model (all layers small)": scores["loss_small_all"][0][mask].tolist(),
        "loss gap: small - oracle (benefit of more compute)": scores["gap"][0][mask].tolist(),
    }
    png = analysis.plot_token_difficulty(tokens, panels, figures / f"token_difficulty_{holdout}.png")
    page = figures / f"token_difficulty_{holdout}.html"
    atomic_write_text(page, analysis.token_difficulty_html(tokens, panels, f"Token difficulty ({holdout}; Fig. 5/6)"))
    return {f"token_difficulty_{holdout}": png, f"token_difficulty_{holdout}_html": page}


def report_blocks(metrics: dict, figures: dict) -> list[tuple]:
    """The report as blocks: ("h", level, text), ("p", text), ("table", header, rows), ("img", path, alt)."""
    n = metrics["model"]["layers"]
    model = metrics["model"]
    best_of = f"best_of_{metrics['settings']['best_of_k']}"
    blocks = [
        ("h", 1, f"Duo-LLM study (preset {metrics['preset']})"),
        (
            "p",
            f"A {n}-layer Duo model ({model['type']}; hidden {model['hidden_size']}, "
            f"big FFN {model['big_inner_size']}, small FFN {model['small_inner_size']}, "
            f"{fmt(model['parameters'])} parameters; from {model['source']}) "
            f"trained with random routing for {fmt(model['training_steps'])} steps "
            f"({fmt(model['training_tokens'])} tokens), then the oracle, routers and token difficulty on the "
            f"holdouts {', '.join(metrics['oracle'])}. Every number below is in metrics.json.",
        ),
        ("h", 2, "Findings of the paper"),
        (
            "table",
            ["finding", "holdout", "reproduced", "numbers"],
            [
                [f["statement"], f["holdout"], fmt(f["reproduced"]), _numbers_text(f["numbers"])]
                for f in metrics["findings"]
            ],
        ),
    ]
    for holdout, m in metrics["oracle"].items():
        header = ["BIG layers", "patterns", "oracle", best_of.replace("_", "-"), "fixed", "fixed pattern"]
        kinds = list(metrics["routers"])
        header += [ROUTER_LABELS[k] for k in kinds]
        rows = []
        for k, v in m["by_budget"].items():
            row = [
                k,
                fmt(v["patterns"]),
                fmt(v["oracle"]),
                fmt(v.get(best_of, float("nan"))),
                fmt(v["fixed"]),
                v["fixed_pattern"],
            ]
            row += [
                fmt(metrics["routers"][kind][k][holdout]["ppl"]) if k in metrics["routers"][kind] else ""
                for kind in kinds
            ]
            rows.append(row)
        blocks += [
            ("h", 2, f"Perplexity against budget: {holdout} holdout ({fmt(m['tokens'])} tokens)"),
            ("p", f"All small: {fmt(m['all_small'])}; all big: {fmt(m['all_big'])}."),
            ("table", header, rows),
            ("img", figures[f"ppl_vs_budget_{holdout}"], "perplexity against budget"),
            ("img", figures[f"methods_{holdout}"], "oracle, best-of-K, fixed and routers"),
            ("h", 3, "Position-dependent budgets (Fig. 4c)"),
            ("table", ["budget", "oracle perplexity"], [[f"big={s}", fmt(v)] for s, v in m["schedules"].items()]),
            ("img", figures[f"schedules_{holdout}"], "position-dependent budgets"),
            ("h", 3, "Where the oracle puts BIG layers (Fig. 2)"),
            (
                "p",
                "Mean BIG layer index per budget (0 = first layer): "
                + ", ".join(f"k={k}: {fmt(c)}" for k, c in m["big_layer_center"].items())
                + ".",
            ),
            ("img", figures[f"oracle_usage_{holdout}"], "oracle usage heatmaps"),
        ]
        for kind in metrics["routers"]:
            blocks.append(("img", figures[f"router_{kind}_usage_{holdout}"], f"{ROUTER_LABELS[kind]} usage heatmaps"))
    blocks += _router_blocks(metrics) + _gap_blocks(metrics, figures) + _skip_blocks(metrics) + _causal_blocks(metrics)
    blocks += [
        ("h", 2, "Token difficulty (Fig. 5 and 6)"),
        (
            "table",
            ["holdout", "tokens", "Spearman(small loss, gap)", "top-10% overlap"],
            [
                [h, fmt(d["tokens"]), fmt(d["spearman_small_vs_gap"]), fmt(d["top_decile_overlap"])]
                for h, d in metrics["token_difficulty"].items()
            ],
        ),
    ]
    for holdout in metrics["oracle"]:
        blocks.append(("img", figures[f"token_difficulty_{holdout}"], f"token difficulty ({holdout})"))
        page = f"figures/{figures[f'token_difficulty_{holdout}_html'].name}"
        blocks.append(("p", f"Interactive page (hover a token for its value): [{page}]({page})"))
    blocks += [
        ("h", 2, "Time per stage (seconds)"),
        ("table", ["stage", "seconds"], [[k, fmt(v)] for k, v in metrics["seconds"].items()]),
    ]
    return blocks


def _router_blocks(metrics: dict) -> list[tuple]:
    rows = []
    for kind, by_k in metrics["routers"].items():
        for k, per_holdout in by_k.items():
            for holdout, entry in per_holdout.items():
                realised = entry["realised"]
                rows.append(
                    [
                        ROUTER_LABELS[kind],
                        k,
                        holdout,
                        fmt(entry["ppl"]),
                        fmt(realised.get("big", 0.0)),
                        fmt(realised.get("small", 0.0)),
                    ]
                )
    if not rows:
        return []
    return [
        ("h", 2, "Routers at their realised budgets"),
        ("table", ["router", "target BIG layers", "holdout", "perplexity", "realised BIG", "realised small"], rows),
    ]


def _gap_blocks(metrics: dict, figures: dict) -> list[tuple]:
    """The routers against fixed and oracle at their realised budgets, the share of the gap each closes, whether
    the distilled router beats the conventional one, and the training curves."""
    gaps = metrics.get("router_gap", {})
    if not gaps:
        return []
    rows = [
        [h, ROUTER_LABELS[kind], k, fmt(g["realised_big_layers"]), fmt(g["ppl"]), fmt(g["fixed"]), fmt(g["oracle"]),
         fmt(g["gap_closed"])]
        for h, by_kind in gaps.items()
        for kind, by_k in by_kind.items()
        for k, g in by_k.items()
    ]  # fmt: skip
    blocks = [
        ("h", 2, "Routers against fixed and oracle: the share of the gap closed"),
        (
            "p",
            "Each router is evaluated with hard routing at the budget it realises (realised BIG layers, mean over "
            "tokens); fixed and oracle are taken at that same budget, linear in log perplexity between the two whole "
            "budgets around it. Gap closed = (log fixed - log router) / (log fixed - log oracle): 0 is the fixed "
            "pattern, 1 the oracle. The distilled routers learn the oracle's per-token routes on training blocks "
            f"({fmt(metrics['settings']['distill_blocks'])} blocks for the oracle, "
            f"{fmt(metrics['settings']['distill_causal_blocks'])} for the causal oracle, which decides without the "
            "next token and so is realisable by a router).",
        ),
        (
            "table",
            [
                "holdout",
                "router",
                "target BIG layers",
                "realised BIG layers",
                "router",
                "fixed",
                "oracle",
                "gap closed",
            ],
            rows,
        ),  # fmt: skip
    ]
    for kind in (k for k in gaps[next(iter(gaps))] if k != "conventional"):
        wins = {
            h: {k: by_kind[kind][k]["ppl"] < by_kind["conventional"][k]["ppl"] for k in by_kind[kind]}
            for h, by_kind in gaps.items()
            if "conventional" in by_kind
        }
        won = [h for h, w in wins.items() if all(w.values())]
        lost = {h: [k for k, ok in w.items() if not ok] for h, w in wins.items() if not all(w.values())}
        text = f"The {ROUTER_LABELS[kind]} beats the conventional router at every budget on: {', '.join(won) or 'none'}"
        if lost:
            text += "; not on " + "; ".join(f"{h} (budgets {', '.join(ks)})" for h, ks in lost.items())
        blocks.append(("p", text + "."))
    for holdout in gaps:
        if f"router_curves_{holdout}" in figures:
            blocks.append(("img", figures[f"router_curves_{holdout}"], f"router training curves ({holdout})"))
    return blocks


def _skip_blocks(metrics: dict) -> list[tuple]:
    rows = [
        [
            h,
            s["budget"],
            fmt(s["oracle"]),
            fmt(s["fixed"]),
            s["fixed_pattern"],
            fmt(s["all_big"]),
            " ".join(f"{x:.2f}" for x in s["skip_fraction_per_layer"]),
        ]
        for h, s in metrics["skip"].items()
    ]
    return [
        ("h", 2, "BIG or SKIP (Fig. 2d)"),
        (
            "table",
            ["holdout", "budget", "oracle", "fixed", "fixed pattern", "all big", "skip fraction per layer"],
            rows,
        ),
    ]


def _causal_blocks(metrics: dict) -> list[tuple]:
    if not metrics["causal"]:
        return []
    rows = [
        [h, c["budget"], fmt(c["tokens"]), fmt(c["oracle"]), fmt(c["causal_oracle"]), fmt(c["fixed"])]
        for h, c in metrics["causal"].items()
    ]
    return [
        ("h", 2, "Causally consistent oracle"),
        (
            "p",
            "The paper's oracle runs each sequence with every token on the same pattern; the causal oracle decides "
            "tokens left to right and later tokens attend to the keys and values of the routes chosen earlier.",
        ),
        ("table", ["holdout", "budget", "tokens", "oracle", "causal oracle", "fixed"], rows),
    ]


def _numbers_text(numbers) -> str:
    if isinstance(numbers, dict):
        return "; ".join(f"{k}: {_numbers_text(v)}" for k, v in numbers.items())
    return fmt(numbers)


def render_markdown(blocks: list[tuple], out: Path) -> str:
    """``report.md``: the blocks as Markdown, the figures linked relative to ``out``."""
    lines = []
    for block in blocks:
        if block[0] == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif block[0] == "p":
            lines += [block[1], ""]
        elif block[0] == "table":
            lines += [markdown_table(block[1], block[2]), ""]
        elif block[0] == "img":
            lines += [f"![{block[2]}]({Path(block[1]).relative_to(out)})", ""]
    return "\n".join(lines)


def render_html(markdown: str, out: Path) -> str:
    """``report.html``: ``report.md`` rendered by markdown-it, self-contained (the figures embedded as data URIs)."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    link_image = renderer.renderer.rules["image"]

    def embed_image(self, tokens, idx, options, env) -> str:
        data = base64.b64encode((out / tokens[idx].attrGet("src")).read_bytes()).decode()
        tokens[idx].attrSet("src", f"data:image/png;base64,{data}")
        return link_image(tokens, idx, options, env)

    renderer.add_render_rule("image", embed_image)
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Duo-LLM study</title><style>{style}</style>"
        f"</head><body>{renderer.render(markdown)}</body></html>"
    )


def write_report(out: Path, metrics: dict, oracle: dict, routers: dict, model_dir: Path) -> None:
    figures = write_figures(out, metrics, oracle, routers, model_dir)
    blocks = report_blocks(metrics, figures)
    atomic_write_json(out / STUDY_METRICS_FILE, metrics)
    markdown = render_markdown(blocks, out)
    atomic_write_text(out / STUDY_REPORT_FILE, markdown)
    atomic_write_text(out / STUDY_REPORT_HTML_FILE, render_html(markdown, out))
