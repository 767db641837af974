"""Metrics, findings and report of the paper's Appendix A on a pretrained model (`duo_study`).

Every number comes from the study's tables (`skip_analysis` arithmetic on per-token losses), its routers'
evaluations and HellaSwag runs; perplexities carry a 95% bootstrap interval over blocks. The findings restate the
paper's for the model and say, with their numbers, whether each holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..models.routes import CHOICE_CODES, CHOICE_NAMES, SKIP, SMALL
from . import skip_analysis as sa
from .report import _finding, fmt, gap_closed


def finetune_results(folder: Path) -> dict:
    """The finetuning run's own results: its held-out evaluation at the last step (``eval/<holdout>/<routing>/ppl``)
    and the distillation's relative errors."""
    from ..utils.run_files import TRAIN_RESULTS_FILE
    from ..utils.schema import TRAIN_RESULTS_SCHEMA, read_state_file

    results = read_state_file(folder / TRAIN_RESULTS_FILE, TRAIN_RESULTS_SCHEMA)
    return {k: v for k, v in results.items() if k.endswith("/ppl") or k.startswith("distill/")}


def per_layer_metrics(tables: dict, config) -> dict:
    """Per holdout: all-BIG, and each layer on SMALL alone and skipped alone (perplexity), before and after
    finetuning (skipping reads no small FFN: its numbers come from the table after); how many layers SMALL beats
    SKIP in."""
    out = {}
    for holdout in tables["after"]:
        alone = {when: _alone(by_holdout[holdout], config) for when, by_holdout in tables.items()}
        for entry in alone.values():
            entry["skip"] = alone["after"]["skip"]
            entry["small_beats_skip"] = sum(s < k for s, k in zip(entry["small"], entry["skip"], strict=True))
        out[holdout] = alone
    return out


def _alone(table: dict, config) -> dict:
    """All-BIG (with its interval) and the perplexity of each layer moved alone to each choice the table holds."""
    patterns, losses = table["patterns"], table["losses"]
    mask = sa.token_mask(table["input_ids"])
    means = sa.masked_mean(losses, mask)
    moved = sa.moved_counts(patterns)
    all_big = int((moved == 0).nonzero()[0])
    out = {"all_big": sa.bootstrap_ppl(losses[all_big], mask, config.bootstrap_samples, config.seed)}
    for name, code in (("small", SMALL), ("skip", SKIP)):
        rows = [((moved == 1) & (patterns[:, layer] == code)).nonzero().flatten() for layer in range(patterns.shape[1])]
        if all(len(r) for r in rows):
            out[name] = [math.exp(float(means[int(r[0])])) for r in rows]
    return out


def one_moved_metrics(per_layer: dict, config) -> dict:
    """Per holdout and space, after finetuning: the oracle and the best fixed pattern at one layer moved."""
    from .duo_study import SPACES, in_space

    out = {}
    for holdout, table in per_layer.items():
        mask = sa.token_mask(table["input_ids"])
        moved = sa.moved_counts(table["patterns"])
        out[holdout] = {}
        for space, choices in SPACES.items():
            members = in_space(table["patterns"], choices) & (moved == 1)
            methods = sa.method_losses(table["losses"], members, mask, 0, config.seed)
            out[holdout][space] = {
                m: sa.bootstrap_ppl(methods[m], mask, config.bootstrap_samples, config.seed)
                for m in ("oracle", "fixed")
            }
    return out


def exact_metrics(exact: dict, config) -> dict:
    """The exact SMALL/BIG table: per layers moved, oracle, best-of-K and fixed; token difficulty at its last level."""
    losses, patterns = exact["losses"], exact["patterns"]
    mask = sa.token_mask(exact["input_ids"])
    moved = sa.moved_counts(patterns)
    out = {"blocks": int(len(exact["input_ids"])), "by_moved": {}}
    for m in range(1, int(moved.max()) + 1):
        members = moved == m
        methods = sa.method_losses(losses, members, mask, config.best_of_k, config.seed)
        out["by_moved"][str(m)] = {
            "patterns": int(members.sum()),
            **{
                key: sa.bootstrap_ppl(methods[key], mask, config.bootstrap_samples, config.seed)
                for key in ("oracle", "best_of_k", "fixed")
            },
        }
    top = int(moved.max())
    top_methods = sa.method_losses(losses, moved == top, mask, 0, config.seed)
    all_big = losses[int((moved == 0).nonzero()[0])]
    out["difficulty"] = sa.difficulty(top_methods["fixed"], losses.min(0).values, all_big, mask)
    out["difficulty"]["cheap"] = f"best fixed SMALL/BIG pattern, {top} layers on small"
    return out


def level_metrics(levels: dict, paths: dict, mask: torch.Tensor, config) -> dict:
    """Per space and level (layers moved) on the search blocks: oracle and fixed perplexity, the fixed pattern's
    FFN FLOPs, how the level was searched, and the oracle's share of tokens on each choice per layer."""
    out = {}
    for space, by_m in levels.items():
        out[space] = {}
        for m, level in by_m.items():
            every = torch.ones(len(level["patterns"]), dtype=torch.bool)
            methods = sa.method_losses(level["losses"], every, mask, 0, config.seed)
            usage = {
                CHOICE_NAMES[c]: sa.skip_usage(level["patterns"], methods["oracle_index"], mask, c)
                for c in (SMALL, SKIP)
            }
            out[space][str(m)] = {
                "patterns": len(level["patterns"]),
                "search": level["search"],
                "oracle": math.exp(float(sa.masked_mean(methods["oracle"], mask))),
                "fixed": math.exp(float(sa.masked_mean(methods["fixed"], mask))),
                "fixed_flops": paths[space][m]["flops"],
                "oracle_usage": usage,
            }
    return out


def _between(levels: dict, moved: float, method: str) -> float:
    """``method``'s perplexity at a fractional number of layers moved: linear in log perplexity between the two
    levels around it (the nearest level outside the searched range)."""
    points = {int(m): v[method] for m, v in levels.items()}
    return sa.log_interpolate(points, min(max(moved, min(points)), max(points)))


def observations(usage: torch.Tensor) -> dict:
    """The paper's Fig. 9 observations from usage counts ``[3, layers, positions]``: the share of each choice in
    the first and last third of the layers, and in the first and last quarter of the positions."""
    layers, positions = usage.shape[1], usage.shape[2]
    third, quarter = max(1, layers // 3), max(1, positions // 4)

    def share(choice: int, layer_slice=slice(None), position_slice=slice(None)) -> float:
        part = usage[:, layer_slice, position_slice].double()
        return float(part[choice].sum() / part.sum().clamp_min(1e-12))

    out = {}
    for name, code in CHOICE_CODES.items():
        out[name] = {
            "first_layers": share(code, slice(0, third)),
            "last_layers": share(code, slice(layers - third, layers)),
            "first_positions": share(code, position_slice=slice(0, quarter)),
            "last_positions": share(code, position_slice=slice(positions - quarter, positions)),
        }
    return out


def router_metrics(routers: dict, fixed: dict, levels: dict, first: str, fixed_blocks: int, config) -> dict:
    """Per router: on every holdout its perplexity, realised layers moved and FFN FLOPs, usage, and the fixed
    patterns at its FLOPs; on the search blocks of the first holdout, fixed and oracle at its realised budget and
    the share of their gap it closes; the Fig. 9 observations from its usage."""
    out = {}
    for setting, router in routers.items():
        entry = {"space": router["space"], "holdouts": {}}
        for holdout, e in router["evaluation"].items():
            mask = sa.token_mask(e["input_ids"])
            realised = router["realised"][holdout]
            ci = {"ppl": sa.bootstrap_ppl(e["losses"], mask, config.bootstrap_samples, config.seed)}
            for kind, f in fixed[setting].items():
                ci[kind] = sa.bootstrap_ppl(f["losses"][holdout], mask, config.bootstrap_samples, config.seed)
            entry["holdouts"][holdout] = {
                **ci,
                "moved": realised["moved"],
                "flops": realised["flops"],
                "usage": realised["usage"],
            }
        entry["fixed"] = {kind: {k: v for k, v in f.items() if k != "losses"} for kind, f in fixed[setting].items()}
        search_ids = router["evaluation"][first]["input_ids"][:fixed_blocks]
        mask = sa.token_mask(search_ids)
        losses = router["evaluation"][first]["losses"][:fixed_blocks]
        moved = float(
            (sa.moved_counts(router["evaluation"][first]["routes"][:fixed_blocks].long()) * mask).sum() / mask.sum()
        )
        router_ppl = math.exp(float(sa.masked_mean(losses, mask)))
        by_m = levels[router["space"]]
        fixed_ppl, oracle_ppl = _between(by_m, moved, "fixed"), _between(by_m, moved, "oracle")
        entry["at_realised"] = {
            "holdout": first,
            "blocks": fixed_blocks,
            "moved": moved,
            "router": router_ppl,
            "fixed": fixed_ppl,
            "oracle": oracle_ppl,
            "gap_closed": gap_closed(router_ppl, fixed_ppl, oracle_ppl),
            "searched": any(by_m[str(m)]["search"] == "searched" for m in (math.floor(moved), math.ceil(moved))
                            if str(m) in by_m),
        }  # fmt: skip
        entry["observations"] = observations(router["realised"][first]["usage_counts"])
        out[setting] = entry
    return out


def duo_findings(metrics: dict) -> list[dict]:
    """The paper's findings restated for the model from ``metrics`` (each with its numbers)."""
    found = []
    first = metrics["first_holdout"]
    exact = metrics["exact"]["by_moved"]
    top = max(exact, key=int)
    e = exact[top]
    bo = metrics["settings"]["best_of_k"]
    found.append(_finding(
        "oracle_best_of_k_fixed",
        f"Oracle < best-of-{bo} < fixed (SMALL/BIG, {top} layers on small, {first}, exact).",
        e["oracle"]["ppl"] < e["best_of_k"]["ppl"] < e["fixed"]["ppl"],
        {"oracle": e["oracle"]["ppl"], f"best_of_{bo}": e["best_of_k"]["ppl"], "fixed": e["fixed"]["ppl"]},
    ))  # fmt: skip
    for holdout, spaces in metrics["one_moved"].items():
        all_big = metrics["per_layer"][holdout]["after"]["all_big"]["ppl"]
        oracle = spaces["small-big"]["oracle"]["ppl"]
        found.append(_finding(
            f"fewer_layers_beat_all_big/{holdout}",
            f"The oracle with one layer fewer on BIG beats all-BIG ({holdout}).",
            oracle < all_big,
            {"oracle_one_layer_on_small": oracle, "all_big": all_big},
        ))  # fmt: skip
    levels = metrics["levels"]["small-big"]
    # Only exact levels decide it: a searched level's oracle is an upper bound, which may lie above the true one.
    exact_curve = {int(m): v["oracle"] for m, v in levels.items() if v["search"] == "exact"}
    best, last = min(exact_curve, key=exact_curve.get), max(exact_curve)
    searched = {int(m): v["oracle"] for m, v in levels.items() if v["search"] != "exact"}
    found.append(_finding(
        "oracle_best_at_middle_budget",
        f"The oracle is best at a middle budget (SMALL/BIG, {first}; decided on the exact levels 0 .. {last} layers "
        "moved only, since a searched level's oracle is an upper bound).",
        0 < best < last,
        {"best_exact_layers_moved": best, "oracle_there": exact_curve[best], "all_big": exact_curve[0],
         **({"searched_levels_best": min(searched.values())} if searched else {})},
    ))  # fmt: skip
    for setting, r in metrics["routers"].items():
        a = r["at_realised"]
        found.append(_finding(
            f"router_nearer_fixed/{setting}",
            f"The conventional router ({setting}) sits nearer the fixed pattern than the oracle ({first}, at its "
            "realised budget).",
            a["gap_closed"] < 0.5,
            {"router": a["router"], "fixed": a["fixed"], "oracle": a["oracle"], "gap_closed": a["gap_closed"]},
        ))  # fmt: skip
    d = metrics["exact"]["difficulty"]
    found.append(_finding(
        "token_difficulty",
        "Tokens hard for the cheap model are those the oracle's choice helps most (Spearman of the cheap model's "
        "loss against the cheap-to-oracle gap > 0).",
        d["spearman_cheap_vs_gap"] > 0,
        {k: d[k] for k in ("spearman_cheap_vs_gap", "top_decile_overlap", "spearman_all_big_vs_gap")},
    ))  # fmt: skip
    return found + _observation_findings(metrics)


def _observation_findings(metrics: dict) -> list[dict]:
    """The three observations of the paper's Appendix A (Fig. 9) from the routers' usage on the first holdout."""
    found = []
    for setting, r in metrics["routers"].items():
        o = r["observations"]
        if o["small"]["first_layers"] + o["small"]["last_layers"] > 0:
            found.append(_finding(
                f"early_layers_small/{setting}",
                f"Early layers take the small module more than late layers ({setting}).",
                o["small"]["first_layers"] > o["small"]["last_layers"],
                {"first_third": o["small"]["first_layers"], "last_third": o["small"]["last_layers"]},
            ))  # fmt: skip
        found.append(_finding(
            f"early_tokens_big/{setting}",
            f"Early tokens take the big module more than later tokens ({setting}).",
            o["big"]["first_positions"] > o["big"]["last_positions"],
            {"first_quarter": o["big"]["first_positions"], "last_quarter": o["big"]["last_positions"]},
        ))  # fmt: skip
        if o["skip"]["first_layers"] + o["skip"]["last_layers"] > 0:
            found.append(_finding(
                f"late_skip/{setting}",
                f"With skip allowed, later layers and later tokens skip more ({setting}).",
                o["skip"]["last_layers"] > o["skip"]["first_layers"]
                and o["skip"]["last_positions"] > o["skip"]["first_positions"],
                {k: o["skip"][k] for k in ("first_layers", "last_layers", "first_positions", "last_positions")},
            ))  # fmt: skip
    return found


def hellaswag_metrics(runs: dict, routers: dict) -> dict:
    """The HellaSwag table: each run's acc_norm and stderr; per router, its run and the fixed runs at its FLOPs."""
    from .duo_study import fixed_run_name

    if "not_run" in runs:
        return runs
    keys = ("items", "acc_norm", "acc_norm_stderr", "acc", "acc_stderr")
    out = {"runs": {name: {k: run[k] for k in keys if k in run} | ({"flops": run["flops"]} if "flops" in run else {})
                    for name, run in runs.items()}}  # fmt: skip
    out["comparisons"] = {
        setting: {
            "router": f"router_{setting}",
            **{kind: fixed_run_name(f) for kind, f in r["fixed"].items()},
        }
        for setting, r in routers.items()
    }
    return out


def write_duo_report(stages, model, per_layer, exact, levels, paths, routers, fixed, hellaswag, context) -> dict:
    """``metrics.json``, ``report.md``, ``report.html`` and the routers' usage heatmaps; returns the metrics."""
    from ..utils.files import atomic_write_json, atomic_write_text
    from ..utils.run_files import STUDY_METRICS_FILE, STUDY_REPORT_FILE, STUDY_REPORT_HTML_FILE
    from .report import render_html, render_markdown, stage_seconds

    config = stages.config
    first = context["first"]
    mask = sa.token_mask(context["search_blocks"])
    by_level = level_metrics(levels, paths, mask, config)
    finetune_seconds = context["finetune"].get("seconds", 0.0)
    metrics = {
        "kind": "duo",
        "preset": config.preset,
        "settings": json.loads(json.dumps(dataclasses.asdict(config))),
        "model": {
            "source": config.model or config.source,
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "big_inner_size": model.config.intermediate_size,
            "small_inner_size": model.config.small_intermediate_size,
            "weights_note": config.weights_note,
        },
        "finetune": {
            "global_step": context["finetune"]["global_step"],
            "tokens_seen": context["finetune"]["tokens_seen"],
            "seconds": finetune_seconds,
            "tokens_per_second": context["finetune"]["tokens_seen"] / finetune_seconds if finetune_seconds else None,
            "all_big_unchanged": context["all_big_unchanged"],
            "results": finetune_results(context["finetuned_dir"]),
        },
        "first_holdout": first,
        "per_layer": per_layer_metrics(per_layer, config),
        "one_moved": one_moved_metrics(per_layer["after"], config),
        "exact": exact_metrics(exact, config),
        "levels": by_level,
        "search": {"method": config.search_method, "width": config.search_width, "gap": context["gap"]},
        "routers": router_metrics(routers, fixed, by_level, first, config.fixed_blocks, config),
    }
    metrics["hellaswag"] = hellaswag_metrics(hellaswag, metrics["routers"])
    metrics["findings"] = duo_findings(metrics)
    metrics["seconds"] = stage_seconds(stages.out)
    figures = usage_figures(stages.out, routers, first)
    out = stages.out
    atomic_write_json(out / STUDY_METRICS_FILE, metrics)
    markdown = render_markdown(duo_report_blocks(metrics, figures), out)
    atomic_write_text(out / STUDY_REPORT_FILE, markdown)
    atomic_write_text(out / STUDY_REPORT_HTML_FILE, render_html(markdown, out))
    return metrics


def usage_figures(out, routers: dict, first: str) -> dict:
    """``figures/usage_<choice>.png``: each router's usage of a choice, layer x token position (first holdout)."""
    from .analysis import plot_usage_heatmaps

    figures = {}
    for name, code in CHOICE_CODES.items():
        usage = {
            s: r["realised"][first]["usage_counts"]
            for s, r in routers.items()
            if r["realised"][first]["usage"][name] > 0
        }
        if usage:
            path = out / "figures" / f"usage_{name}.png"
            figures[name] = plot_usage_heatmaps(usage, path, f"Routers' {name.upper()} usage ({first})", code)
    return figures


def _ci(entry: dict) -> str:
    return f"{entry['ppl']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def duo_report_blocks(metrics: dict, figures: dict) -> list[tuple]:
    """The report as blocks (`report.render_markdown`)."""
    from .report import _numbers_text

    model, ft = metrics["model"], metrics["finetune"]
    first = metrics["first_holdout"]
    evaluation = ", ".join(f"{k.removeprefix('eval/').removesuffix('/ppl')} {v:.2f}" for k, v in ft["results"].items()
                           if k.endswith("/ppl"))  # fmt: skip
    distilled = {k.removeprefix("distill/relative_error_"): v for k, v in ft["results"].items() if "distill/" in k}
    evaluation = f"The finetuning run's own evaluation at its last step (holdout/routing perplexity): {evaluation}."
    if distilled:
        evaluation += (f" Distillation's mean relative error of the small FFNs: {distilled['start']:.3f} before, "
                       f"{distilled['end']:.3f} after.")  # fmt: skip
    blocks: list[tuple] = [
        ("h", 1, f"Duo-LLM Appendix A on a pretrained model (preset {metrics['preset']})"),
        ("p", f"Model: {model['source']} ({model['layers']} layers, hidden {model['hidden_size']}, FFN "
              f"{model['big_inner_size']}, small FFN {model['small_inner_size']}). {model['weights_note']} "
              f"Small FFNs finetuned on the frozen model: {ft['global_step']} steps, {ft['tokens_seen']:,} tokens in "
              f"{ft['seconds']:.0f} s ({fmt(ft['tokens_per_second'])} tokens/s); pretrained weights unchanged: "
              f"{fmt(ft['all_big_unchanged'])}. Perplexities carry a 95% bootstrap interval over blocks."),
        ("p", evaluation),
        ("h", 2, "Findings of the paper, for this model"),
        ("table", ["finding", "holds", "numbers"],
         [[f["statement"], fmt(f["reproduced"]), _numbers_text(f["numbers"])] for f in metrics["findings"]]),
        ("h", 2, "Small against skip, per layer"),
    ]  # fmt: skip
    for holdout, entry in metrics["per_layer"].items():
        after, before = entry["after"], entry["before"]
        blocks.append(("p", f"{holdout}: all-BIG {_ci(after['all_big'])}. SMALL beats SKIP in "
                            f"{after['small_beats_skip']} of {len(after['small'])} layers after finetuning "
                            f"({before['small_beats_skip']} before)."))  # fmt: skip
        rows = [[i, f"{before['small'][i]:.2f}", f"{after['small'][i]:.2f}", f"{after['skip'][i]:.2f}"]
                for i in range(len(after["small"]))]  # fmt: skip
        blocks.append(("table", ["layer", "on small, before", "on small, after", "skipped"], rows))
    blocks.append(("h", 2, "Oracle and fixed pattern, one layer moved"))
    rows = [[h, s, _ci(v["oracle"]), _ci(v["fixed"])] for h, spaces in metrics["one_moved"].items()
            for s, v in spaces.items()]  # fmt: skip
    blocks.append(("table", ["holdout", "space", "oracle", "fixed"], rows))
    ex = metrics["exact"]
    bo = metrics["settings"]["best_of_k"]
    blocks.append(("h", 2, f"Exact SMALL/BIG oracle ({first}, first {ex['blocks']} blocks)"))
    blocks.append(("table", ["layers on small", "patterns", "oracle", f"best of {bo}", "fixed"],
                   [[m, v["patterns"], _ci(v["oracle"]), _ci(v["best_of_k"]), _ci(v["fixed"])]
                    for m, v in ex["by_moved"].items()]))  # fmt: skip
    gap = metrics["search"]["gap"]
    blocks.append(("h", 2, f"Searched budgets ({metrics['search']['method']}, width {metrics['search']['width']})"))
    blocks.append(("p", f"Beyond the exact levels the oracle is the per-token minimum over the patterns searched and "
                        f"fixed the best of them: upper bounds. The search's gap, measured one step inside the exact "
                        f"SMALL/BIG table at {gap['moved']} layers moved ({gap['patterns_searched']} of "
                        f"{gap['budget_size']} patterns searched): oracle {gap['oracle']['searched']:.2f} against "
                        f"{gap['oracle']['exact']:.2f} exact (ratio {gap['oracle']['ratio']:.3f}), fixed "
                        f"{gap['fixed']['searched']:.2f} against {gap['fixed']['exact']:.2f} (ratio "
                        f"{gap['fixed']['ratio']:.3f})."))  # fmt: skip
    blocks.append(("p", _usage_text(metrics["levels"]["small-big"])))
    for space, by_m in metrics["levels"].items():
        rows = [[m, v["search"], v["patterns"], f"{v['oracle']:.2f}", f"{v['fixed']:.2f}", f"{v['fixed_flops']:.3f}"]
                for m, v in by_m.items()]  # fmt: skip
        blocks.append(("p", f"{space}:"))
        blocks.append(("table", ["layers moved", "search", "patterns", "oracle", "fixed", "fixed's FFN FLOPs"], rows))
    blocks += _router_blocks(metrics, figures) + _hellaswag_blocks(metrics)
    blocks += [("h", 2, "Time per stage (seconds)"),
               ("table", ["stage", "seconds"], [[k, fmt(v)] for k, v in metrics["seconds"].items()])]  # fmt: skip
    return blocks


def _usage_text(levels: dict) -> str:
    """Which layers the SMALL/BIG oracle puts on small at its lowest and highest budget."""
    parts = []
    for m in (min(levels, key=int), max(levels, key=int)) if len(levels) > 1 else ():
        if m == "0":
            m = sorted(levels, key=int)[1]
        usage = levels[m]["oracle_usage"]["small"]
        center = sa.skip_center(usage)
        shares = " ".join(f"{u:.2f}" for u in usage)
        parts.append(f"with {m} layers on small, share of tokens on small per layer (0 = first): {shares} (mean layer "
                     f"{center:.1f})")  # fmt: skip
    return "The SMALL/BIG oracle's layers, " + "; ".join(parts) + "."


def _router_blocks(metrics: dict, figures: dict) -> list[tuple]:
    blocks: list[tuple] = [("h", 2, "Routers in the three settings")]
    rows = []
    for setting, r in metrics["routers"].items():
        for holdout, h in r["holdouts"].items():
            rows.append([setting, holdout, f"{h['moved']:.2f}", f"{h['flops']:.3f}", _ci(h["ppl"]), _ci(h["fixed"]),
                         _ci(h["fixed_skip"])])  # fmt: skip
    blocks.append(("table", ["setting", "holdout", "layers moved", "FFN FLOPs", "router", "fixed (same space)",
                             "fixed skip set"], rows))  # fmt: skip
    fixed_rows = [[s, kind, f["space"], f["moved"], f"{f['flops']:.3f}", f["pattern"]]
                  for s, r in metrics["routers"].items() for kind, f in r["fixed"].items()]  # fmt: skip
    blocks.append(("table", ["setting", "fixed", "space", "layers moved", "FFN FLOPs", "pattern"], fixed_rows))
    gap_rows = [[s, f"{a['moved']:.2f}", f"{a['router']:.2f}", f"{a['fixed']:.2f}", f"{a['oracle']:.2f}",
                 f"{a['gap_closed']:+.3f}", fmt(a["searched"])]
                for s, r in metrics["routers"].items() for a in [r["at_realised"]]]  # fmt: skip
    blocks.append(
        (
            "p",
            f"At the realised budget, on the search blocks of {metrics['first_holdout']} (fixed and oracle "
            "interpolated in log perplexity between levels; 'searched': they rest on the search):",
        )
    )
    blocks.append(("table", ["setting", "layers moved", "router", "fixed", "oracle", "gap closed", "searched"],
                   gap_rows))  # fmt: skip
    for name, path in figures.items():
        blocks.append(("img", path, f"routers' {name} usage"))
    return blocks


def _hellaswag_blocks(metrics: dict) -> list[tuple]:
    h = metrics["hellaswag"]
    if "not_run" in h:
        return [("h", 2, "HellaSwag"), ("p", f"Not run: {h['not_run']}.")]
    rows = [[name, r["items"], f"{r['acc_norm']:.3f} +- {r['acc_norm_stderr']:.3f}", fmt(r.get("flops", ""))]
            for name, r in h["runs"].items()]  # fmt: skip
    return [("h", 2, "HellaSwag (acc_norm)"), ("table", ["run", "items", "acc_norm", "fixed's FFN FLOPs"], rows)]


def duo_summary(metrics: dict) -> str:
    """The closing terminal summary: small against skip, the routers against fixed and oracle, the findings and
    HellaSwag."""
    lines = []
    for holdout, entry in metrics["per_layer"].items():
        after = entry["after"]
        lines.append(
            f"{holdout}: all-BIG {_ci(after['all_big'])}; SMALL beats SKIP in {after['small_beats_skip']} of "
            f"{len(after['small'])} layers after finetuning ({entry['before']['small_beats_skip']} before)"
        )
    for setting, r in metrics["routers"].items():
        a = r["at_realised"]
        lines.append(
            f"router {setting}: {a['moved']:.2f} layers moved, perplexity {a['router']:.2f} against fixed "
            f"{a['fixed']:.2f} and oracle {a['oracle']:.2f} ({a['holdout']}, first {a['blocks']} blocks); gap closed "
            f"{a['gap_closed']:+.3f}"
        )
    lines.append("Findings of the paper, for this model:")
    for f in metrics["findings"]:
        lines.append(f"  [{'holds' if f['reproduced'] else 'does NOT hold'}] {f['statement']}")
    hs = metrics["hellaswag"]
    if "not_run" in hs:
        lines.append(f"HellaSwag left out: {hs['not_run']}.")
    for name, r in hs.get("runs", {}).items():
        score = f"acc_norm {r['acc_norm']:.3f} +- {r['acc_norm_stderr']:.3f}"
        lines.append(f"HellaSwag {name} ({r['items']} items): {score}")
    return "\n".join(lines)
