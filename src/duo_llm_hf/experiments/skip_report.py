"""Metrics, findings and report of the BIG-or-SKIP study of a pretrained model (`skip_study`).

`skip_metrics` turns the loss tables, the causal oracle, the fixed skip sets, the routers and HellaSwag into one
JSON-ready dict; `skip_findings` restates the paper's findings for the model from those numbers only (and names
the ones this setting cannot test); `skip_report_blocks` renders them. Every perplexity comes with a 95%
bootstrap interval over blocks.
"""

from __future__ import annotations

import math

import torch

from . import skip_analysis as sa

# The source the report compares HellaSwag with (read from the model card; zero-shot, lighteval).
PUBLISHED_HELLASWAG = {
    "model": "SmolLM2-135M-Instruct",
    "score": 40.9,
    "base_model_score": 42.1,
    "source": "model card of HuggingFaceTB/SmolLM2-135M-Instruct (https://huggingface.co/HuggingFaceTB/"
    "SmolLM2-135M-Instruct), evaluation table (zero-shot, lighteval); the base SmolLM2-135M scores 42.1 there. "
    "The SmolLM2 paper is arXiv:2502.02737.",
}

LEFT_OUT = [
    "All-small and every SMALL/BIG stage (the SMALL/BIG oracle, position budgets in BIG layers of a small/big "
    "model, the distilled routers): the converted model's small FFNs are untrained, so routing to them measures "
    "noise; the study searches BIG or SKIP only.",
    "Token difficulty against all-small: replaced by its skip analogue (the loss of the best fixed pattern with the "
    "most FFNs skipped, against what the per-token choice of the skipped FFNs gains).",
    "Exact search beyond a few FFNs skipped: it grows as C(30, m). Larger budgets are searched by a beam (their "
    "oracle and fixed are upper bounds, with the beam's gap measured where exact is known) and their best-of-K "
    "curve is left out; fixed skip sets beyond every searched budget are chosen greedily, with the greedy "
    "search's gap to exact measured where exact is known. The causal oracle runs at an exact budget only.",
]


def holdout_metrics(table: dict, config, causal: dict | None, search: dict | None, routers: dict, holdout: str) -> dict:
    """Every number of one holdout, from its loss table (`skip_study.skip_table_stage`) and, on the first holdout, the
    beam's levels beyond it (`skip_search.search_stage`)."""
    losses, patterns, ids = table["losses"], table["patterns"], table["input_ids"]
    mask = sa.token_mask(ids)
    moved = sa.moved_counts(patterns)
    samples, seed = config.bootstrap_samples, config.seed

    def ci(token_losses: torch.Tensor, rows=slice(None)) -> dict:
        return sa.bootstrap_ppl(token_losses[rows], mask[rows], samples, seed)

    all_big = losses[int((moved == 0).nonzero()[0])]
    by_moved = {}
    indices = {}
    top = int(moved.max())
    for m in range(1, top + 1):
        members = moved == m
        methods = sa.method_losses(losses, members, mask, config.best_of_k, seed)
        size = int(members.sum())
        ks = sa.curve_ks(size)
        indices[m] = methods
        by_moved[str(m)] = {
            "patterns": size,
            "search": "exact",
            **_method_entries(methods, patterns, mask, ci),
            f"best_of_{config.best_of_k}": ci(methods["best_of_k"]),
            "best_of_k_curve": {
                "k": ks,
                "ppl": [math.exp(v) for v in sa.expected_best_of_k(losses, members, mask, ks)],
            },
        }
    for m, level in (search or {}).get("levels", {}).items():
        everything = torch.ones(len(level["patterns"]), dtype=torch.bool)
        methods = sa.method_losses(level["losses"], everything, mask, 0, seed)
        entry = {
            "patterns": len(level["patterns"]),
            "budget_size": math.comb(len(patterns[0]), int(m)),
            "search": "beam",
            **_method_entries(methods, level["patterns"], mask, ci),
        }
        sampled = level["sampled"].bool()
        if sampled.any():
            entry[f"best_of_{config.search_best_of_k}"] = ci(level["losses"][sampled].min(0).values)
        by_moved[str(m)] = entry
    everything = losses.min(0).values
    out = {
        "blocks": int(ids.shape[0]),
        "tokens": int(mask.sum()),
        "all_big": ci(all_big),
        "by_moved": by_moved,
        "schedules": schedule_metrics(losses, moved, mask, config),
        "difficulty": sa.difficulty(indices[top]["fixed"], everything, all_big, mask),
    }
    if search:
        out["search"] = {**search["search"], "gap": search["gap"]}
    if causal is not None:
        rows = slice(0, causal["loss"].shape[0])
        m = config.moved_causal
        out["causal"] = {
            "moved": m,
            "blocks": causal["loss"].shape[0],
            "causal_oracle": ci(causal["loss"], rows),
            "oracle": ci(indices[m]["oracle"], rows),
            "fixed": ci(indices[m]["fixed"], rows),
            "all_big": ci(all_big, rows),
        }
    out["routers"] = {
        m: {
            "ppl": ci(r["evaluation"][holdout]["losses"]),
            "realised_skipped": float(
                ((r["evaluation"][holdout]["routes"] == sa.SKIP).sum(-1) * mask).sum() / mask.sum()
            ),
        }
        for m, r in routers.items()
    }
    return out


def _method_entries(methods: dict, patterns: torch.Tensor, mask: torch.Tensor, ci) -> dict:
    """The oracle's and the fixed pattern's perplexities, the fixed pattern's skipped layers and the oracle's
    layer usage, for one budget (`skip_analysis.method_losses` over ``patterns``)."""
    usage = sa.skip_usage(patterns, methods["oracle_index"], mask)
    return {
        "oracle": ci(methods["oracle"]),
        "fixed": ci(methods["fixed"]),
        "fixed_skipped": (patterns[methods["fixed_index"]] == sa.SKIP).nonzero().flatten().tolist(),
        "oracle_skip_usage": usage,
        "oracle_skip_center": sa.skip_center(usage),
    }


def schedule_metrics(losses: torch.Tensor, moved: torch.Tensor, mask: torch.Tensor, config) -> dict:
    """The oracle under budgets that change along the sequence (the paper's Fig. 4c, in FFNs skipped): ``a:b``
    skips ``a`` FFNs at the first position, falling (or rising) linearly to ``b`` at the last, against a constant
    budget of their mean, each the per-token minimum over the patterns its position allows."""
    top = int(moved.max())
    if top < 2:
        return {}
    seq_len = losses.shape[-1]
    per_class = torch.stack([losses[moved == m].min(0).values for m in range(top + 1)])  # [M + 1, N, T]
    middle = top // 2
    out = {}
    for a, b in ((top, 0), (0, top), (middle, middle)):
        where = torch.linspace(a, b, seq_len, dtype=torch.float64)
        m_at = torch.floor(where + 0.5).long()  # round half up, as the oracle's schedules do
        chosen = per_class[m_at, :, torch.arange(seq_len)].T  # [N, T]
        out[f"{a}:{b}" if a != b else str(a)] = sa.bootstrap_ppl(chosen, mask, config.bootstrap_samples, config.seed)
    return out


def log_gap_share(method: float, fixed: float, oracle: float) -> float:
    """Share of the fixed-to-oracle gap in log perplexity that ``method`` closes (NaN when oracle >= fixed)."""
    gap = math.log(fixed) - math.log(oracle)
    return (math.log(fixed) - math.log(method)) / gap if gap > 0 else float("nan")


def interpolate_moved(by_moved: dict, all_big: float, method: str, skipped: float) -> float | None:
    """Perplexity of ``method`` at a fractional number of skipped FFNs, linear in log perplexity between the
    nearest budgets around it that were measured (0 is all-BIG); None beyond the largest."""
    points = {0: all_big, **{int(m): v[method]["ppl"] for m, v in by_moved.items()}}
    if skipped > max(points) or skipped < 0:
        return None
    return sa.log_interpolate(points, skipped)


def skip_findings(metrics: dict) -> list[dict]:
    """The paper's findings restated for this model, each decided by the numbers it lists."""
    out = []
    best_of = f"best_of_{metrics['settings']['best_of_k']}"
    n = metrics["model"]["layers"]
    for holdout, h in metrics["holdouts"].items():

        def finding(key: str, statement: str, holds: bool, numbers: dict, holdout=holdout) -> None:
            out.append(
                {"id": key, "holdout": holdout, "statement": statement, "reproduced": bool(holds), "numbers": numbers}
            )

        ppl = {
            m: {k: v[k]["ppl"] for k in ("oracle", best_of, "fixed")} for m, v in h["by_moved"].items() if best_of in v
        }
        finding(
            "oracle_beats_random_beats_fixed",
            f"oracle <= {best_of.replace('_', '-')} < fixed at every budget with best-of-K (equal where the budget "
            "holds no more patterns than K; at a beam budget the oracle and fixed are over the patterns searched)",
            all(v["oracle"] <= v[best_of] < v["fixed"] for v in ppl.values()),
            ppl,
        )
        one = h["by_moved"]["1"]["oracle"]["ppl"]
        finding(
            "skipping_oracle_beats_all_big",
            "the oracle with one FFN skipped per token beats all-BIG (the paper: 1 BIG layer beats all-BIG)",
            one < h["all_big"]["ppl"],
            {"oracle_1_skipped": one, "all_big": h["all_big"]["ppl"]},
        )
        fixed_one = h["by_moved"]["1"]["fixed"]["ppl"]
        finding(
            "fixed_pruning_costs",
            "static pruning (the best fixed pattern) with one FFN skipped is no better than all-BIG",
            fixed_one >= h["all_big"]["ppl"],
            {"fixed_1_skipped": fixed_one, "all_big": h["all_big"]["ppl"]},
        )
        curve = {"0": h["all_big"]["ppl"], **{m: v["oracle"]["ppl"] for m, v in h["by_moved"].items()}}
        best = min(curve, key=curve.get)
        finding(
            "oracle_lowest_below_all_big",
            "the oracle's perplexity is lowest at a budget below all-BIG (FFNs skipped > 0)",
            int(best) > 0,
            {"best_skipped": int(best), **{f"skipped_{m}": v for m, v in curve.items()}},
        )
        top = str(max(int(m) for m in h["by_moved"]))
        center = h["by_moved"][top]["oracle_skip_center"]
        how = " (beam search)" if h["by_moved"][top].get("search") == "beam" else ""
        finding(
            "oracle_keeps_early_layers_at_high_budget",
            f"at a high budget ({top} of {n} FFNs skipped{how}) the oracle keeps the earlier layers BIG: its skipped "
            f"FFNs lie above the middle layer {(n - 1) / 2:g} (mean index)",
            center > (n - 1) / 2,
            {"mean_skipped_layer": center},
        )
        d = h["difficulty"]
        finding(
            "gap_ranks_tokens_differently",
            "skip analogue of token difficulty: what the per-token choice gains ranks tokens differently from the "
            "cheap model's loss (Spearman < 0.9 and top-10% overlap < 0.5)",
            d["spearman_cheap_vs_gap"] < 0.9 and d["top_decile_overlap"] < 0.5,
            d,
        )
        if h["schedules"]:
            s = {k: v["ppl"] for k, v in h["schedules"].items()}
            constant = next(k for k in s if ":" not in k)
            finding(
                "oracle_prefers_constant_budget",
                f"a constant budget ({constant} FFNs skipped) beats budgets that change along the sequence",
                s[constant] < min(v for k, v in s.items() if k != constant),
                s,
            )
        if "causal" in h:
            c = h["causal"]
            values = {k: c[k]["ppl"] for k in ("oracle", "causal_oracle", "fixed", "all_big")}
            values["share_of_oracle_gain_kept"] = log_gap_share(
                values["causal_oracle"], values["fixed"], values["oracle"]
            )
            finding(
                "causal_oracle_beats_fixed",
                f"beyond the paper: the causally consistent oracle ({c['moved']} FFN skipped; each token still chosen "
                "knowing its label, but on the routes already taken by earlier tokens) beats the best fixed pattern",
                values["causal_oracle"] < values["fixed"],
                values,
            )
        distances = {}
        for m, r in h["routers"].items():
            fixed = interpolate_moved(h["by_moved"], h["all_big"]["ppl"], "fixed", r["realised_skipped"])
            oracle = interpolate_moved(h["by_moved"], h["all_big"]["ppl"], "oracle", r["realised_skipped"])
            if fixed is None or oracle is None:
                continue
            router = math.log(r["ppl"]["ppl"])
            distances[m] = {
                "realised_skipped": r["realised_skipped"],
                "to_fixed": abs(router - math.log(fixed)),
                "to_oracle": abs(router - math.log(oracle)),
            }
        if distances:
            finding(
                "routers_closer_to_fixed",
                "the conventional router sits closer to fixed than to the oracle at its realised budget (log "
                "perplexity)",
                all(d["to_fixed"] < d["to_oracle"] for d in distances.values()),
                distances,
            )
    return out


def hellaswag_metrics(runs: dict, fixed_sets: dict) -> dict:
    """The HellaSwag table: each run's acc_norm and stderr, and whether source and converted agree item by item."""
    from .hellaswag import same_scores

    out = {"published": PUBLISHED_HELLASWAG, "runs": {}}
    for name, run in runs.items():
        out["runs"][name] = {k: run[k] for k in ("items", "acc_norm", "acc_norm_stderr", "acc", "acc_stderr")}
        for key in ("skipped", "realised_skipped"):
            if key in run:
                out["runs"][name][key] = run[key]
    if "source" in runs and "converted_all_big" in runs:
        out["identity"] = same_scores(runs["source"], runs["converted_all_big"])
    return out


# ----------------------------------------------------------------------------------------------------
# Report


def fmt_ci(entry: dict) -> str:
    """A perplexity and its 95% interval, as the report prints them."""
    return f"{entry['ppl']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def skip_report_blocks(metrics: dict) -> list[tuple]:
    """The report as blocks (`report.render_markdown`)."""
    from .report import _numbers_text, fmt

    model = metrics["model"]
    best_of = f"best_of_{metrics['settings']['best_of_k']}"
    blocks: list[tuple] = [
        ("h", 1, f"Duo-LLM study of a pretrained model (preset {metrics['preset']})"),
        (
            "p",
            f"Model: {model['source']} ({model['layers']} layers, hidden {model['hidden_size']}, FFN "
            f"{model['big_inner_size']}, {fmt(model['parameters'])} parameters as a Duo model). "
            f"{model['weights_note']} Route options: BIG or SKIP; a budget counts the FFNs moved off all-BIG per "
            "token. Perplexities carry a 95% bootstrap interval over blocks "
            f"({metrics['settings']['bootstrap_samples']} resamples of the blocks). Every number is in metrics.json.",
        ),
        ("h", 2, "Findings of the paper, for this model"),
        (
            "table",
            ["finding", "holdout", "holds", "numbers"],
            [
                [f["statement"], f["holdout"], fmt(f["reproduced"]), _numbers_text(f["numbers"])]
                for f in metrics["findings"]
            ],
        ),
        ("h", 3, "Left out, and why"),
        *[("p", f"- {line}") for line in metrics["left_out"]],
    ]
    for holdout, h in metrics["holdouts"].items():
        rows = [["0", "1", fmt_ci(h["all_big"]), fmt_ci(h["all_big"]), fmt_ci(h["all_big"]), "(all-BIG)"]]
        for m, v in h["by_moved"].items():
            rows.append([m, _searched(v), fmt_ci(v["oracle"]), fmt_ci(v[best_of]) if best_of in v else "-",
                         fmt_ci(v["fixed"]), " ".join(map(str, v["fixed_skipped"]))])  # fmt: skip
        blocks += [
            ("h", 2, f"{holdout} holdout ({h['blocks']} blocks, {fmt(h['tokens'])} tokens)"),
            (
                "table",
                ["FFNs skipped", "patterns", "oracle", best_of.replace("_", "-"), "fixed", "fixed: skipped layers"],
                rows,
            ),
        ]
        if "search" in h:
            blocks.append(("p", _search_text(h["search"])))
        for m, v in h["by_moved"].items():
            if "best_of_k_curve" in v:
                curve = v["best_of_k_curve"]
                points = ", ".join(f"K={k}: {p:.2f}" for k, p in zip(curve["k"], curve["ppl"]))
                blocks.append(
                    ("p", f"Best of K random patterns per token, {m} FFN(s) skipped (expected, exact): {points}.")
                )
            usage = " ".join(f"{u:.2f}" for u in v["oracle_skip_usage"])
            blocks.append(("p", f"Oracle's share of tokens skipping each layer's FFN ({m} skipped): {usage}."))
        if "causal" in h:
            c = h["causal"]
            blocks.append(
                (
                    "table",
                    ["first blocks", "FFNs skipped", "all-BIG", "fixed", "causal oracle", "oracle"],
                    [
                        [
                            fmt(c["blocks"]),
                            fmt(c["moved"]),
                            fmt_ci(c["all_big"]),
                            fmt_ci(c["fixed"]),
                            fmt_ci(c["causal_oracle"]),
                            fmt_ci(c["oracle"]),
                        ]
                    ],  # fmt: skip
                )
            )
        if h["schedules"]:
            blocks.append(("table", ["FFNs skipped along the block", "oracle"],
                           [[k, fmt_ci(v)] for k, v in h["schedules"].items()]))  # fmt: skip
        if h["routers"]:
            rows = [[m, fmt(r["realised_skipped"]), fmt_ci(r["ppl"])] for m, r in h["routers"].items()]
            blocks.append(("table", ["router target (FFNs skipped)", "realised", "perplexity"], rows))
    blocks += _perspective_blocks(metrics) + _fixed_blocks(metrics) + _hellaswag_blocks(metrics)
    blocks += [
        ("h", 2, "Time per stage (seconds)"),
        ("table", ["stage", "seconds"], [[k, fmt(v)] for k, v in metrics["seconds"].items()]),
    ]
    return blocks


def _searched(entry: dict) -> str:
    """The patterns column: how many patterns the budget holds, or how many of them a search evaluated."""
    from .report import fmt

    if entry.get("search", "exact") == "exact":
        return fmt(entry["patterns"])
    return f"{fmt(entry['patterns'])} of {fmt(entry['budget_size'])} ({entry['search']})"


def _search_text(search: dict) -> str:
    """One sentence on how the budgets beyond the exact ones were searched, and the search's measured gap."""
    gap = search["gap"]
    return (
        f"Budgets beyond {gap['moved']} FFNs skipped: beam search (width {search['width']}, kept by mean loss and "
        "by tokens won, from every pattern of the last exact budget); the oracle and fixed there are over the "
        f"patterns searched, so each is an upper bound on the exact figure. Measured gap of one beam step at "
        f"{gap['moved']} FFNs skipped ({gap['patterns_searched']} of {gap['budget_size']} patterns searched): "
        f"oracle {gap['oracle']['searched']:.2f} against exact {gap['oracle']['exact']:.2f} (ratio "
        f"{gap['oracle']['ratio']:.3f}), fixed {gap['fixed']['searched']:.2f} against {gap['fixed']['exact']:.2f} "
        f"(ratio {gap['fixed']['ratio']:.3f}). Each further beam step can add to that gap."
    )


def _perspective_blocks(metrics: dict) -> list[tuple]:
    return [
        ("h", 2, "The oracle's label-aware selection, in perspective"),
        (
            "p",
            "The oracle picks each token's pattern knowing that token's label: the minimum over many patterns of a "
            "noisy loss is low even when no pattern is better on average. Best-of-K shows how much of its gain "
            "comes from the number of alternatives alone: K = 1 is a random pattern, K = all patterns is the oracle. "
            "The causally consistent oracle decides tokens left to right on the routes already taken, still knowing "
            "each token's label, and is realisable by one forward pass. The best fixed pattern (static layer "
            "pruning) needs no label at all; a router must come from it towards the oracle without labels.",
        ),
    ]


def _fixed_blocks(metrics: dict) -> list[tuple]:
    from .report import fmt

    sets = metrics.get("fixed_sets", {})
    if not sets:
        return []
    rows = [
        [m, s["search"], " ".join(map(str, s["skipped"])), fmt(math.exp(s["loss"])),
         " ".join(map(str, s.get("greedy_skipped", []))) or "-",
         fmt(math.exp(s["greedy_loss"])) if "greedy_loss" in s else "-"]
        for m, s in sets.items()
    ]  # fmt: skip
    return [
        ("h", 2, "Fixed skip sets (static layer pruning)"),
        (
            "p",
            f"Chosen on the first {metrics['settings']['fixed_blocks']} blocks of the {metrics['fixed_holdout']} "
            "holdout: exact (every pattern) where the oracle's table holds the budget, the best pattern the beam "
            "searched where it searched, greedy beyond (the set with one FFN fewer plus the cheapest next layer). "
            "The greedy columns run greedy from zero skipped; "
            "where exact is known, their difference is the measured gap of the greedy search.",
        ),
        ("table", ["FFNs skipped", "search", "skipped layers", "perplexity", "greedy: skipped", "greedy: ppl"], rows),
    ]


def _hellaswag_blocks(metrics: dict) -> list[tuple]:
    from .report import fmt

    hs = metrics.get("hellaswag")
    if not hs:
        return []
    if "not_run" in hs:
        return [("h", 2, "HellaSwag"), ("p", f"HellaSwag left out: {hs['not_run']}.")]
    rows = [
        [name, fmt(r["items"]), f"{r['acc_norm']:.3f} +- {r['acc_norm_stderr']:.3f}",
         " ".join(map(str, r.get("skipped", []))), fmt(r.get("realised_skipped", ""))]
        for name, r in hs["runs"].items()
    ]  # fmt: skip
    published = hs["published"]
    blocks = [
        ("h", 2, "HellaSwag (lm-eval, hellaswag_local, zero-shot acc_norm +- stderr)"),
        ("table", ["run", "items", "acc_norm", "skipped layers", "realised skipped"], rows),
    ]
    if "identity" in hs:
        i = hs["identity"]
        blocks.append(
            (
                "p",
                f"Source (GGUF loaded by transformers, --model hf) against the converted Duo model all-BIG on the same "
                f"items: identical acc_norm: {fmt(i['identical_acc_norm'])}; largest difference of a choice's "
                f"log-likelihood: {i['max_loglikelihood_difference']:.3g}.",
            )
        )
    blocks.append(
        (
            "p",
            f"Published: {published['model']} scores {published['score']} on HellaSwag ({published['source']}). "
            "Ours is the 4-bit GGUF file (Q4_1, dequantised), on a subset of items, through lm-eval's acc_norm; the "
            "evaluation setups differ, so the numbers are comparable in size only.",
        )
    )
    return blocks


def skip_summary(metrics: dict) -> str:
    """The closing terminal summary of the skip study: perplexities per budget and holdout, then the findings."""
    best_of = f"best_of_{metrics['settings']['best_of_k']}"
    lines = [metrics["model"]["weights_note"]] if metrics["model"]["weights_note"] else []
    for holdout, h in metrics["holdouts"].items():
        lines += [
            f"{holdout} holdout: perplexity [95% bootstrap interval over blocks] by FFNs skipped per token",
            f"  0 all-BIG {fmt_ci(h['all_big'])}",
        ]
        for m, v in h["by_moved"].items():
            random = f"{best_of.replace('_', '-')} {fmt_ci(v[best_of])}  " if best_of in v else ""
            how = "" if v.get("search", "exact") == "exact" else f" ({v['search']} search)"
            lines.append(f"  {m} oracle {fmt_ci(v['oracle'])}  {random}fixed {fmt_ci(v['fixed'])}{how}")
        if "search" in h:
            lines.append("  " + _search_text(h["search"]))
    lines.append("Findings of the paper, for this model:")
    for f in metrics["findings"]:
        lines.append(f"  [{'holds' if f['reproduced'] else 'does NOT hold'}] ({f['holdout']}) {f['statement']}")
    hs = metrics.get("hellaswag", {})
    if "not_run" in hs:
        lines.append(f"HellaSwag left out: {hs['not_run']}.")
    for name, r in hs.get("runs", {}).items():
        lines.append(
            f"HellaSwag {name} ({r['items']} items): acc_norm {r['acc_norm']:.3f} +- {r['acc_norm_stderr']:.3f}"
        )
    return "\n".join(lines)
