"""The paper's Appendix A on a pretrained model (``duo-llm study --preset smollm2-duo``): small FFNs trained on the
frozen model, then its oracle over SMALL, BIG and SKIP, routers in the paper's three settings, and HellaSwag at
equal FFN FLOPs.

Stages, each kept in its folder and reused by a re-run (so an interrupted study resumes):

- ``model/``: the checkpoint ``source`` converted to Duo (`skip_study.convert_stage`), unless ``--model``;
- ``finetune/``: `training.finetune` on it with the settings of ``finetune`` (random routing, frozen pretrained
  weights, only the small FFNs trained; it resumes from its own checkpoints);
- ``per_layer/<before|after>/<holdout>/``: the loss of every pattern that moves one layer off all-BIG, to SMALL or
  to SKIP, before and after finetuning: each layer on small alone and skipped alone, and the oracle at one layer
  moved in each space;
- ``exact/<holdout>/``: on the first holdout's first ``fixed_blocks`` blocks, every SMALL/BIG pattern that moves at
  most ``moved_exact`` layers (the oracle, best-of-K and fixed exactly);
- ``routers/<setting>/``: the conventional router of each of ``router_settings`` (`training.router_settings`),
  evaluated with hard routing on every holdout (per-token losses and routes);
- ``search/<space>/level_XX/``: in each router's space, a search (``search_method``, ``search_width``) from the
  exact levels down to the budget the router realised, and in BIG/SKIP down to the FLOPs of every router (the fixed
  skip sets), on the same blocks as ``exact/``;
- ``hellaswag/``: acc_norm of the finetuned model all-BIG, each router, and the best fixed patterns at the router's
  realised FFN FLOPs (in its own space, and with skipping only).

The metrics, findings and report are `duo_report`'s.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..models.routes import BIG, CHOICE_CODES, SKIP, SMALL, pattern_to_str, realised_fractions, route_usage
from ..oracle.search import SearchSettings
from ..utils.errors import UsageError
from . import skip_analysis as sa
from . import skip_search
from .skip_study import _device_of_runs, moved_space, pattern_token_losses, router_stage, table_stage

# The route spaces of the study, by name: the choices a pattern may take in each layer.
SPACES = {"small-big": (SMALL, BIG), "big-skip": (BIG, SKIP), "small-big-skip": (SMALL, BIG, SKIP)}


def space_name(route_options) -> str:
    """The name in `SPACES` of the space of ``route_options`` (choice names)."""
    codes = tuple(sorted(CHOICE_CODES[o] for o in route_options))
    for name, choices in SPACES.items():
        if tuple(sorted(choices)) == codes:
            return name
    raise ValueError(f"route options {list(route_options)} are not one of the study's spaces {list(SPACES)}.")


def check_duo_settings(config, num_layers: int) -> None:
    """Refuse, before any stage runs, settings the study cannot serve (one line each)."""
    from ..training.router_settings import ROUTER_SETTINGS

    unknown = [s for s in config.router_settings if s not in ROUTER_SETTINGS]
    if unknown:
        raise UsageError(f"router_settings: {unknown} are not router settings; use some of {list(ROUTER_SETTINGS)}.")
    if not isinstance(config.moved_exact, int) or not 2 <= config.moved_exact < num_layers:
        raise UsageError(
            f"moved_exact: {config.moved_exact!r} must be a whole number from 2 to {num_layers - 1}: the search's "
            "gap is measured inside the exact table."
        )
    if not isinstance(config.fixed_blocks, int) or not 1 <= config.fixed_blocks <= config.oracle_blocks:
        raise UsageError(
            f"fixed_blocks: {config.fixed_blocks!r} must be from 1 to oracle_blocks ({config.oracle_blocks})."
        )
    try:
        SearchSettings(config.search_method, config.search_width)
    except ValueError as error:
        raise UsageError(f"search_method / search_width: {error}") from None


def finetune_stage(stages, model_dir: Path) -> tuple[Path, dict]:
    """``finetune/``: the small FFNs of ``model_dir`` trained on the frozen model (`training.finetune.finetune`
    with the fields of ``config.finetune``); a killed run resumes from its last checkpoint."""
    from ..training.arguments import FinetuneArguments
    from ..training.finetune import finetune

    config = stages.config
    folder = stages.out / "finetune"
    args = FinetuneArguments(
        init_from=str(model_dir),
        output_dir=str(folder),
        resume_from="latest",
        seed=config.seed,
        progress=stages.progress,
        report_to="jsonl",
        **config.finetune,
    )

    def work() -> dict:
        result = finetune(args)
        return {"global_step": result.global_step, "tokens_seen": result.tokens_seen}

    record = stages.run("finetuning of the small FFNs", folder, work)
    return folder, record


def per_layer_stage(stages, model, when: str, holdout: str, blocks: torch.LongTensor) -> dict:
    """``per_layer/<when>/<holdout>/``: the table of every pattern moving one layer off all-BIG, to SMALL or SKIP
    (``after`` finetuning), or to SMALL only (``before``: skipping does not read the small FFNs)."""
    options = ("small", "big", "skip") if when == "after" else ("small", "big")
    space = moved_space(model.config.num_hidden_layers, 1, options)
    folder = stages.out / "per_layer" / when / holdout
    return table_stage(stages, model, folder, f"one layer moved, {when} finetuning ({holdout})", blocks, space)


def exact_stage(stages, model, holdout: str, blocks: torch.LongTensor) -> dict:
    """``exact/<holdout>/``: every SMALL/BIG pattern moving at most ``moved_exact`` layers, on ``blocks``."""
    moved = stages.config.moved_exact
    space = moved_space(model.config.num_hidden_layers, moved, ("small", "big"))
    what = f"oracle, SMALL/BIG, up to {moved} layers moved ({holdout}; {space.size} patterns)"
    return table_stage(stages, model, stages.out / "exact" / holdout, what, blocks, space)


def in_space(patterns: torch.Tensor, choices) -> torch.Tensor:
    """``[P]``: the patterns that take only ``choices``."""
    return torch.isin(patterns, torch.tensor(choices)).all(-1)


def ffn_fraction(patterns: torch.Tensor, config) -> torch.Tensor:
    """FFN FLOPs of each pattern (``[..., layers]``, e.g. each token's route) as a fraction of all-BIG's."""
    from ..utils.flops import choice_cost

    cost = torch.tensor([choice_cost(config, c) for c in range(3)], dtype=torch.float64)
    return cost[patterns].mean(-1)


def start_level(space: str, exact: dict, per_layer: dict, blocks: int) -> dict:
    """The exact level a search in ``space`` starts from: the exact table's last level in SMALL/BIG, else one layer
    moved (from the per-layer table), on the first ``blocks`` blocks."""
    table = exact if space == "small-big" else per_layer
    patterns, losses = table["patterns"], table["losses"][:, :blocks]
    rows = in_space(patterns, SPACES[space]) & (sa.moved_counts(patterns) == sa.moved_counts(patterns).max())
    return {"patterns": patterns[rows], "losses": losses[rows]}


def levels_needed(routers: dict, config, n: int) -> dict[str, int]:
    """The deepest level each space is searched to: past the layers each of its routers moved on the first
    holdout, and in BIG/SKIP past the FLOPs of every router (the skip set at the same FLOPs)."""
    needed: dict[str, int] = {}
    for router in routers.values():
        first = router["realised"][next(iter(router["realised"]))]
        space = router["space"]
        needed[space] = max(needed.get(space, 0), math.ceil(first["moved"]) + 1)
        needed["big-skip"] = max(needed.get("big-skip", 0), math.ceil(n * (1 - first["flops"])) + 1)
    return {space: min(level, n - 1) for space, level in needed.items()}


def search_stages(stages, model, blocks, exact: dict, per_layer: dict, needed: dict[str, int]) -> dict[str, dict]:
    """``search/<space>/``: each space's levels from its exact start down to ``needed[space]`` layers moved."""
    config = stages.config
    search = SearchSettings(config.search_method, config.search_width)
    out = {}
    for space, last in needed.items():
        start = start_level(space, exact, per_layer, len(blocks))
        label = f"{config.search_method} search, {{m}} layers moved ({space}; {{size}} patterns)"
        levels = skip_search.search_levels(
            stages, model, blocks, start, SPACES[space], last, search, stages.out / "search" / space, label
        )
        out[space] = levels
    return out


def space_levels(space: str, exact: dict, per_layer: dict, searched: dict, blocks: int) -> dict[int, dict]:
    """Every level of ``space`` on the search blocks, ``{m: {"patterns", "losses", "search"}}``: level 0 (all-BIG)
    and the exact ones from the tables, the searched ones beyond."""
    choices = SPACES[space]
    levels = {}
    for table in (per_layer, exact) if space == "small-big" else (per_layer,):
        patterns, losses = table["patterns"], table["losses"][:, :blocks]
        moved = sa.moved_counts(patterns)
        for m in range(int(moved.max()) + 1):
            rows = in_space(patterns, choices) & (moved == m)
            levels[m] = {"patterns": patterns[rows], "losses": losses[rows], "search": "exact"}
    for m, level in searched.get(space, {}).items():
        levels[m] = {"patterns": level["patterns"], "losses": level["losses"], "search": "searched"}
    return dict(sorted(levels.items()))


def fixed_path(levels: dict[int, dict], mask: torch.Tensor, config) -> dict[int, dict]:
    """The best fixed pattern of each level (lowest mean loss on the search blocks) and its FFN FLOPs."""
    path = {}
    for m, level in levels.items():
        means = sa.masked_mean(level["losses"], mask)
        pattern = level["patterns"][int(means.argmin())]
        path[m] = {"pattern": pattern, "flops": float(ffn_fraction(pattern, config)), "loss": float(means.min())}
    return path


def nearest_flops(path: dict[int, dict], flops: float) -> int:
    """The level of ``path`` whose fixed pattern's FFN FLOPs lie nearest ``flops`` (ties: the cheaper)."""
    return min(path, key=lambda m: (abs(path[m]["flops"] - flops), path[m]["flops"]))


def router_evaluation(evaluation: dict, config) -> dict:
    """What a router realised on each holdout (tokens with a target): layers moved off BIG and FFN FLOPs per
    token, usage per choice, and the usage counts ``[3, layers, positions]`` of its heatmaps."""
    out = {}
    for holdout, e in evaluation.items():
        mask = sa.token_mask(e["input_ids"])
        routes = e["routes"].long()
        weight = mask.double().sum()
        usage = route_usage(routes, mask)  # [3, L, T]
        out[holdout] = {
            "moved": float((sa.moved_counts(routes).double() * mask).sum() / weight),
            "flops": float((ffn_fraction(routes, config) * mask).sum() / weight),
            "usage": realised_fractions(usage)["overall"],
            "usage_counts": usage,
        }
    return out


def duo_router_stages(stages, model_dir: Path, blocks: dict, train_blocks) -> dict:
    """``routers/<setting>/``: each router setting trained on the finetuned model and evaluated on every holdout."""
    from ..training.router_settings import ROUTER_SETTINGS

    config = stages.config
    routers = {}
    for setting in config.router_settings:
        trained = router_stage(stages, model_dir, setting, {"setting": setting}, blocks, train_blocks)
        evaluation = {h: {**e, "input_ids": blocks[h]} for h, e in trained["evaluation"].items()}
        routers[setting] = {
            "folder": trained["folder"],
            "space": space_name(ROUTER_SETTINGS[setting]["route_options"]),
            "evaluation": evaluation,
            "realised": router_evaluation(evaluation, model_config(model_dir)),
        }
    return routers


def model_config(model_dir: Path):
    """The config of the Duo model in ``model_dir`` (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=True)


def fixed_run_name(entry: dict) -> str:
    """The HellaSwag run of a fixed pattern of `fixed_comparisons` (one per space and layers moved)."""
    return f"fixed_{entry['space']}_{entry['moved']}"


def fixed_comparisons(model, routers: dict, paths: dict, blocks: dict) -> dict:
    """For each router: the best fixed pattern of its space at its realised FFN FLOPs (first holdout), and the best
    fixed skip set at the nearest FLOPs, each with its per-token losses on every holdout (a pattern shared by two
    comparisons is evaluated once)."""
    out, evaluated = {}, {}
    for setting, router in routers.items():
        flops = router["realised"][next(iter(blocks))]["flops"]
        entry = {}
        for kind, space in (("fixed", router["space"]), ("fixed_skip", "big-skip")):
            m = nearest_flops(paths[space], flops)
            pattern = paths[space][m]["pattern"]
            letters = pattern_to_str(pattern.tolist())
            if letters not in evaluated:
                evaluated[letters] = {h: pattern_token_losses(model, ids, pattern) for h, ids in blocks.items()}
            entry[kind] = {
                "space": space,
                "moved": m,
                "pattern": letters,
                "flops": paths[space][m]["flops"],
                "losses": evaluated[letters],
            }
        out[setting] = entry
    return out


def big_weights_unchanged(source_dir: Path, finetuned_dir: Path) -> bool:
    """Whether the finetuned model's pretrained weights (everything but the small FFNs) equal the source's:
    then its all-BIG model is the source model."""
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        state = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(path))
        return {k: v for k, v in state.items() if ".mlp.small." not in k and ".router." not in k}

    a, b = weights(source_dir), weights(finetuned_dir)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hellaswag_stage(stages, model, model_dir: Path, routers: dict, fixed: dict) -> dict:
    """``hellaswag/``: acc_norm on the first ``hellaswag_items`` items of the finetuned model all-BIG, each router,
    and the fixed patterns of `fixed_comparisons` (a pattern shared by two comparisons runs once)."""
    from .hellaswag import DuoModels, HellaSwagRuns, left_out

    config = stages.config
    missing = left_out(config.hellaswag)
    if missing:
        return missing
    hellaswag, models = HellaSwagRuns(stages.out / "hellaswag", config.hellaswag), DuoModels(model, model_dir)
    items = config.hellaswag_items
    runs = {"all_big": hellaswag.run("all_big", models.routing("all-big"), items)}
    for setting, router in routers.items():
        runs[f"router_{setting}"] = hellaswag.run(f"router_{setting}", models.router(router["folder"]), items)
        for entry in fixed[setting].values():
            name = fixed_run_name(entry)
            run = hellaswag.run(name, models.routing("fixed", pattern=entry["pattern"]), items)
            runs[name] = {**run, "flops": entry["flops"]}
    return runs


def run_duo_study(stages, model_dir: Path) -> dict:
    """Every stage of the Appendix A study of ``model_dir`` (a converted, not yet finetuned, Duo model), then its
    metrics, report and figures."""
    from ..utils.loading import allow_route_options, load_duo_model
    from .duo_report import write_duo_report
    from .study import holdout_blocks, study_holdouts, training_blocks

    config = stages.config
    check_duo_settings(config, model_config(model_dir).num_hidden_layers)
    finetuned_dir, finetune_record = finetune_stage(stages, model_dir)
    blocks, per_layer = {}, {"before": {}, "after": {}}
    for when, folder in (("before", model_dir), ("after", finetuned_dir)):
        model = load_duo_model(folder, what="model")
        allow_route_options(model.config, ["small", "big", "skip"])
        model.to(_device_of_runs()).eval()
        for holdout in study_holdouts(config):
            blocks[holdout] = holdout_blocks(folder, config, holdout, config.oracle_blocks)
            per_layer[when][holdout] = per_layer_stage(stages, model, when, holdout, blocks[holdout])
    first = next(iter(blocks))
    search_blocks = blocks[first][: config.fixed_blocks]
    exact = exact_stage(stages, model, first, search_blocks)
    routers = duo_router_stages(stages, finetuned_dir, blocks, training_blocks(finetuned_dir, config))
    n = model.config.num_hidden_layers
    needed = levels_needed(routers, config, n)
    searched = search_stages(stages, model, search_blocks, exact, per_layer["after"][first], needed)
    mask = sa.token_mask(search_blocks)
    levels = {
        space: space_levels(space, exact, per_layer["after"][first], searched, config.fixed_blocks)
        for space in SPACES
        if space in needed or space == "small-big"
    }
    paths = {space: fixed_path(found, mask, model.config) for space, found in levels.items()}
    fixed = fixed_comparisons(model, routers, paths, blocks)
    hellaswag = hellaswag_stage(stages, model, finetuned_dir, routers, fixed)
    context = {
        "finetune": finetune_record,
        "finetuned_dir": finetuned_dir,
        "all_big_unchanged": big_weights_unchanged(model_dir, finetuned_dir),
        "first": first,
        "search_blocks": search_blocks,
        "gap": skip_search.table_beam_gap(
            exact, mask, SearchSettings(config.search_method, config.search_width), SPACES["small-big"]
        ),
    }
    return write_duo_report(stages, model, per_layer, exact, levels, paths, routers, fixed, hellaswag, context)
