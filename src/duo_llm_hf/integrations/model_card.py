"""Hub model cards for Duo checkpoints: the `MODEL_CARD.md` template filled in with a run's real figures.

`write_model_card(model_dir, metrics)` reads the saved model folder (``config.json``, the safetensors headers
for parameter counts, and the run files the training script leaves there: ``train_results.json``,
``training_args.json``) plus the figures given in ``metrics``, and writes ``README.md`` (the Hub's model card)
into the folder (``train_results.json`` and ``training_args.json`` count as router training, stage 3, when
``router_report.json`` lies next to them, as router training leaves it). A section with no figures says
**Not evaluated**; no number is ever made up.

``metrics`` is a dict, one JSON path, or a list of JSON paths. As a dict its keys are the card's sections,
each holding figures or the path of a JSON file with them (at any depth: ``{"training": {"stage1":
"runs/duo/train_results.json"}}``):

- ``training``: ``{stage: figures}``; stages ``stage1`` (random routing) and ``router`` (stage 3) get the
  paper's description, other names are shown as they are.
- ``oracle``: the oracle study's summary (stage 2), ``router``: the learned router's report (stage 3).
- ``lm_eval``: the JSON that lm-evaluation-harness writes (``{"results": {task: {"acc,none": ...}}}``), or
  ``{task: {metric: value}}``.
- ``model_name``, ``repo_id``, ``datasets``, ``base_model``, ``license``, ``language``, ``limitations``
  (a list of extra lines); any other key is shown under "Other figures".

Figures are dicts of scalars (a two-column table), dicts of such dicts (one row per key), lists of dicts, or
Markdown text. A JSON path given alone goes to the section named by its top-level keys, else lm-eval's format,
else its file name (``*oracle*``, ``*router*``, ``*lm_eval*``, ``*train*``).

Command line (what ``duo-llm card`` calls): ``python -m duo_llm_hf.integrations.model_card MODEL_DIR [--metrics
[SECTION=]FILE ...] [--repo-id USER/NAME]``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..data import HUB_PREFIX
from ..training.arguments import current_names
from ..utils.arguments import label as flag_label
from ..utils.arguments import parse_arguments
from ..utils.errors import MissingFileError, UsageError
from ..utils.run_files import (
    CONFIG_FILE,
    LM_EVAL_RESULTS_FILE,
    ORACLE_SUMMARY_FILE,
    ROUTER_REPORT_FILE,
    TRAIN_RESULTS_FILE,
    TRAINING_ARGS_FILE,
)
from ..utils.schema import JSON_OBJECT_SCHEMA, LM_EVAL_RESULTS_SCHEMA, check_state
from ..utils.tables import markdown_table

NOT_EVALUATED = "**Not evaluated**"
CARD_TAGS = ("duo-llm", "routed-ffn", "adaptive-computation", "custom_code")
SECTIONS = ("training", "oracle", "router", "lm_eval")
CARD_FIELDS = ("model_name", "repo_id", "datasets", "base_model", "license", "language", "limitations")
# Run files found in the model folder, and where their figures go: (section, stage, part). The training files
# belong to the stage that wrote the folder: router training (stage 3) when it left its report there, else stage 1.
RUN_FILES = {
    TRAIN_RESULTS_FILE: ("training", "stage1", "results"),
    TRAINING_ARGS_FILE: ("training", "stage1", "hyperparameters"),
    ORACLE_SUMMARY_FILE: ("oracle", None, None),
    ROUTER_REPORT_FILE: ("router", None, None),
    LM_EVAL_RESULTS_FILE: ("lm_eval", None, None),
}
STAGES = {
    "stage1": (
        "Stage 1: Duo model with random routing",
        "Every token in every layer takes a route drawn at random (`route_probs`; the paper uses "
        "p_big = 0.5), so the big and the small FFN of each layer both learn to serve every token.",
    ),
    "router": (
        "Stage 3: learned router",
        "The Duo weights are frozen; a linear router per layer maps the FFN input to one logit per allowed "
        "choice and is trained with cross-entropy + alpha x usage loss (the paper's budget loss), its softmax "
        "temperature annealed so that the choices become hard. At inference each token runs only its argmax choice.",
    ),
}
# A JSON file given without a section goes to the section its name mentions.
FILE_WORDS = (("lm_eval", "lm_eval"), ("lm-eval", "lm_eval"), ("oracle", "oracle"), ("router", "router"))
PARAMETER_PARTS = (("big FFNs", ".mlp.big."), ("small FFNs", ".mlp.small."), ("routers", ".router."))
_LM_EVAL_SKIP = ("alias", "samples", "sample_len")


def write_model_card(
    model_dir: str | os.PathLike,
    metrics: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    filename: str = "README.md",
) -> Path:
    """Fill in the model card of the checkpoint in ``model_dir`` and write it there as ``filename``.

    Returns the path written. See the module docstring for ``metrics``.
    """
    from ..utils.files import atomic_write_text  # here, as torch and the models below: `--help` stays instant

    model_dir = Path(model_dir)
    card = build_model_card(model_dir, metrics, repo_id=repo_id, model_name=model_name)
    path = model_dir / filename
    atomic_write_text(path, card)
    return path


def build_model_card(
    model_dir: str | os.PathLike,
    metrics: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
) -> str:
    """The filled-in model card (YAML metadata and Markdown) as a string.

    lm-evaluation-harness results must name this model (`check_lm_eval_model`); only a full run (no ``--limit``,
    every item of each task) goes into the Hub's ``model-index``, a limited one is shown as a smoke test.
    """
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    figures = collect_figures(model_dir, metrics)
    name = model_name or figures.get("model_name") or model_dir.resolve().name
    repo = repo_id or figures.get("repo_id") or name
    check_lm_eval_model(figures.get("lm_eval"), model_dir, repo)
    lm_eval = lm_eval_rows(figures.get("lm_eval"))
    benchmark = [row for row in lm_eval if row["full"]]

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*CARD_TAGS, config.get("model_type", "duo")],
        datasets=_as_list(figures.get("datasets")) or None,
        metrics=metric_ids(figures) or None,
        base_model=figures.get("base_model"),
        license=figures.get("license"),
        language=figures.get("language"),
        model_name=name if benchmark else None,
        eval_results=eval_results(benchmark) or None,
    )
    template = resources.files("duo_llm_hf.integrations").joinpath("MODEL_CARD.md").read_text(encoding="utf-8")
    known = set(SECTIONS) | set(CARD_FIELDS)
    other = {k: v for k, v in figures.items() if k not in known}
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=name,
        repo_id=repo,
        family=f"`{config.get('model_type', 'unknown')}`",
        small_ratio=_small_ratio(config),
        architecture=architecture_rows(model_dir, config),
        route_options_text=", ".join(f"`{o}`" for o in config.get("route_options", [])) or "not recorded",
        choices=choice_rows(config),
        routing=config.get("routing", "not recorded"),
        routing_detail=_routing_detail(config),
        flop_seq_len=config.get("max_position_embeddings", "n/a"),
        flop_rows=flop_rows(config),
        training=training_stages(figures.get("training")),
        oracle=render_figures(figures.get("oracle"), "no oracle summary was given for this checkpoint"),
        router=render_figures(figures.get("router"), "no router report was given for this checkpoint"),
        lm_eval=render_lm_eval(lm_eval, figures.get("lm_eval")),
        other=render_figures(other, "") if other else "",
        example_pattern=_example_pattern(config),
        has_tokenizer=any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")),
        extra_limitations=_as_list(figures.get("limitations")),
    )
    return str(card)


# ----------------------------------------------------------------------------------------------- inputs


def read_config(model_dir: Path) -> dict:
    """The checkpoint's ``config.json`` as a dict (a clear error when the folder is not a saved model), the Duo keys
    an older version wrote (``routing_mode``, ...) read under their names of now."""
    from ..models.configuration_duo import RENAMED_KEYS

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(
            f"model_dir: {str(model_dir)!r} has no config.json; pass the folder that save_pretrained wrote."
        )
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"model_dir: {str(path)!r} is not valid JSON ({err}); is this a saved model?") from err
    config = check_state(config, JSON_OBJECT_SCHEMA, path)
    return {RENAMED_KEYS.get(key, key): value for key, value in config.items()}


def collect_figures(model_dir: Path, metrics=None) -> dict:
    """The run's figures: the run files in ``model_dir`` first, then ``metrics`` (which wins on conflicts)."""
    figures: dict = {}
    router_run = (Path(model_dir) / ROUTER_REPORT_FILE).is_file()
    for filename, (section, stage, part) in RUN_FILES.items():
        path = Path(model_dir) / filename
        if not path.is_file():
            continue
        data = _load_json(path, LM_EVAL_RESULTS_SCHEMA if section == "lm_eval" else JSON_OBJECT_SCHEMA)
        if part == "hyperparameters" or section == "router":
            data = current_names(data)  # written before 0.2: `budget`, `eval_routes`, mode `random`
        if section == "training":
            stage = "router" if router_run else stage
            figures.setdefault("training", {}).setdefault(stage, {})[part] = _scalars(data)
            if part == "hyperparameters" and isinstance(data, Mapping) and hub_dataset(data.get("dataset")):
                figures.setdefault("datasets", [hub_dataset(data["dataset"])])
        else:
            figures[section] = data
    _deep_update(figures, load_metrics(metrics))
    return figures


def load_metrics(metrics) -> dict:
    """Normalise ``metrics`` (dict, path, or list of paths) to a dict of sections with their figures."""
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return _load_paths(metrics)
    paths = [metrics] if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    out: dict = {}
    for item in paths:
        section, _, file = str(item).rpartition("=")
        path = Path(file)
        data = _load_json(path)
        _deep_update(out, {section: data} if section else _classify(path, data))
    return out


def _load_paths(value: Any) -> Any:
    """``value`` with every ``*.json`` path in it (at any depth of dicts) replaced by the file's content."""
    if isinstance(value, (str, os.PathLike)) and str(value).endswith(".json"):
        return _load_json(Path(value))
    if isinstance(value, Mapping):
        return {key: _load_paths(item) for key, item in value.items()}
    return value


def _classify(path: Path, data: Any) -> dict:
    if isinstance(data, Mapping) and set(data) & (set(SECTIONS) | set(CARD_FIELDS)):
        return dict(data)
    if _is_lm_eval_output(data):
        return {"lm_eval": data}
    stem = path.stem.lower()
    for word, section in FILE_WORDS:
        if word in stem:
            return {section: data}
    if "train" in stem:
        return {"training": {"stage1": data}}
    raise UsageError(
        f"metrics: cannot tell which card section {str(path)!r} is for; name it SECTION=FILE with SECTION in "
        f"{list(SECTIONS)}, or give a JSON whose top-level keys are sections."
    )


def _is_lm_eval_output(data: Any) -> bool:
    results = data.get("results") if isinstance(data, Mapping) else None
    if not isinstance(results, Mapping) or not results:
        return False
    return all(isinstance(v, Mapping) for v in results.values())


def _load_json(path: Path, schema=JSON_OBJECT_SCHEMA) -> Any:
    """A figures file: a JSON object (``schema``), else a one-line error naming the file and the field."""
    if not path.is_file():
        raise MissingFileError(f"metrics: {str(path)!r} does not exist; give a JSON file of figures.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"metrics: {str(path)!r} is not valid JSON ({err}).") from err
    return check_state(data, schema, path)


def _deep_update(base: dict, new: Mapping) -> dict:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


# ------------------------------------------------------------------------------------------ model facts


def _config_namespace(config: dict) -> SimpleNamespace:
    return SimpleNamespace(**config)


def parameter_counts(model_dir: Path) -> dict[str, int] | None:
    """Parameters in the safetensors files of ``model_dir`` (read from their headers), by part."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    counts = {"total": 0, "big FFNs": 0, "small FFNs": 0, "routers": 0}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                numel = math.prod(f.get_slice(key).get_shape())
                counts["total"] += numel
                for part, marker in PARAMETER_PARTS:
                    if marker in key:
                        counts[part] += numel
    return counts


def architecture_rows(model_dir: Path, config: dict) -> list[tuple[str, str]]:
    """(name, value) rows describing the checkpoint, from its config and weights."""
    rows = [
        ("model type", f"`{config.get('model_type', 'not recorded')}`"),
        ("layers", config.get("num_hidden_layers")),
        ("hidden size", config.get("hidden_size")),
        ("attention heads (key/value heads)", _heads(config)),
        ("big FFN inner size", config.get("intermediate_size")),
        ("small FFN inner size", config.get("small_intermediate_size")),
        ("vocabulary", config.get("vocab_size")),
        ("context length", config.get("max_position_embeddings")),
        ("dtype", config.get("dtype") or config.get("torch_dtype")),
    ]
    counts = parameter_counts(model_dir)
    if counts:
        rows.append(("parameters", ", ".join(f"{part} {_millions(n)}" for part, n in counts.items() if n)))
    return [(name, "not recorded" if value is None else str(value)) for name, value in rows]


def choice_rows(config: dict) -> list[dict]:
    from ..models.routes import CHOICE_LETTERS, CHOICE_NAMES
    from ..utils.flops import choice_cost

    allowed = set(config.get("route_options", []))
    rows = []
    for code, name in enumerate(CHOICE_NAMES):
        try:
            cost = f"{choice_cost(_config_namespace(config), code):.4g}"
        except (AttributeError, TypeError, ZeroDivisionError):
            cost = "not recorded"
        rows.append(
            {
                "name": name,
                "code": code,
                "letter": CHOICE_LETTERS[code],
                "cost": cost,
                "allowed": "yes" if name in allowed else "no",
            }
        )
    return rows


def flop_rows(config: dict) -> list[dict]:
    """Forward FLOPs per token for every route on one allowed module, and for the config's ``route_probs``."""
    from ..utils.flops import flops_per_token

    namespace = _config_namespace(config)
    settings = [(f"all {name}", {name: 1.0}) for name in config.get("route_options", []) if name != "skip"]
    if config.get("route_probs"):
        probs = ", ".join(f"{k} {v:g}" for k, v in config["route_probs"].items())
        settings.append((f"random ({probs})", config["route_probs"]))
    rows, base = [], None
    for label, fractions in settings:
        try:
            count = flops_per_token(namespace, fractions)
            big = flops_per_token(namespace, {"big": 1.0})
        except (AttributeError, TypeError, ValueError, KeyError):
            return []
        base = base or big.total
        rows.append(
            {
                "routes": label,
                "attention": _mega(count.attention),
                "ffn": _mega(count.ffn),
                "lm_head": _mega(count.lm_head),
                "total": _mega(count.total),
                "fraction": f"{count.total / base:.3f}",
            }
        )
    return rows


# -------------------------------------------------------------------------------------------- rendering


def training_stages(training: Mapping | None) -> list[dict]:
    """One entry per training stage: the two of the paper always, then any other stage the figures name."""
    training = dict(training or {})
    names = list(STAGES) + [k for k in training if k not in STAGES]
    stages = []
    for name in names:
        title, description = STAGES.get(name, (name, ""))
        body = render_figures(training.get(name), "no training figures for this stage were given")
        stages.append({"title": title, "description": description, "body": body})
    return stages


def render_figures(figures: Any, missing: str) -> str:
    """Markdown for a section's figures; ``NOT_EVALUATED`` with the reason when there are none."""
    if figures is None or figures == {} or figures == [] or figures == "":
        return f"{NOT_EVALUATED}: {missing}." if missing else ""
    return _render(figures, depth=0)


def _render(value: Any, depth: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        # Keys with a leading underscore are bookkeeping (e.g. the oracle summary's "_space"), not figures.
        value = {k: v for k, v in value.items() if not str(k).startswith("_")}
        scalars = {k: v for k, v in value.items() if not isinstance(v, (Mapping, list))}
        nested = {k: v for k, v in value.items() if isinstance(v, (Mapping, list))}
        if nested and all(isinstance(v, Mapping) for v in nested.values()):
            flat = {k: _flatten_row(v) for k, v in nested.items()}
            if _same_columns(flat.values()):  # e.g. the oracle's budgets: one row each, perplexity per method
                nested = flat
        parts = []
        if scalars:
            parts.append(markdown_table(["figure", "value"], [[k, _fmt(v)] for k, v in scalars.items()]))
        if _same_columns(nested.values()):  # e.g. one row per budget, one column per figure
            parts.append(_rows_table("", nested))
            return "\n\n".join(parts)
        for key, sub in nested.items():
            if isinstance(sub, list) and not any(isinstance(x, (Mapping, list)) for x in sub):
                parts.append(f"**{key}**: {', '.join(_fmt(x) for x in sub)}")
            elif depth >= 3:
                parts.append(f"**{key}**: `{json.dumps(sub)[:500]}`")
            else:
                parts.append(f"**{key}**\n\n{_render(sub, depth + 1)}")
        return "\n\n".join(parts)
    if isinstance(value, list):
        if value and all(isinstance(x, Mapping) for x in value):
            return _rows_table(None, {i: row for i, row in enumerate(value)})
        return ", ".join(_fmt(x) for x in value)
    return _fmt(value)


def _rows_table(key_header: str | None, rows: Mapping) -> str:
    columns: list[str] = []
    for row in rows.values():
        columns += [c for c in row if c not in columns]
    header = ([key_header] if key_header is not None else []) + [str(c) for c in columns]
    body = [
        ([str(key)] if key_header is not None else []) + [_fmt(row.get(c, "")) for c in columns]
        for key, row in rows.items()
    ]
    return markdown_table(header, body)


def _flatten_row(row: Mapping) -> Mapping:
    """A row whose values include dicts of scalars, flattened to ``"outer inner"`` columns (else as it is)."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, Mapping) and not _has_nested(value):
            flat.update({f"{key} {inner}": item for inner, item in value.items()})
        elif isinstance(value, (Mapping, list)):
            return row
        else:
            flat[key] = value
    return flat


def _has_nested(row: Mapping) -> bool:
    return any(isinstance(v, (Mapping, list)) for v in row.values())


def _same_columns(rows: Iterable[Any]) -> bool:
    """Whether flat dicts share most of their keys, so that they read best as the rows of one table."""
    rows = list(rows)
    if len(rows) < 2 or not all(isinstance(r, Mapping) and r for r in rows):
        return False
    if any(isinstance(v, (Mapping, list)) for r in rows for v in r.values()):
        return False
    keys = [set(r) for r in rows]
    return 2 * len(set.intersection(*keys)) >= len(set.union(*keys))


def lm_eval_rows(lm_eval: Any) -> list[dict]:
    """(task, metric, value, stderr, n-shot, items, full) rows from lm-eval's output or ``{task: {metric: value}}``.

    ``items`` is the number of items scored (lm-eval's ``n-samples``, None when not recorded); ``full`` says the
    row is a benchmark score: the harness's own output, run without ``--limit`` on every item of the task.
    """
    if not lm_eval:
        return []
    if not isinstance(lm_eval, Mapping):
        raise UsageError("lm_eval: expected lm-evaluation-harness's results JSON or {task: {metric: value}}.")
    results = lm_eval.get("results", lm_eval)
    n_shot = lm_eval.get("n-shot", {})
    samples = lm_eval.get("n-samples") if isinstance(lm_eval.get("n-samples"), Mapping) else {}
    limit = lm_eval.get("config", {}).get("limit") if _is_lm_eval_output(lm_eval) else None
    rows = []
    for task, values in results.items():
        if not isinstance(values, Mapping):
            continue
        counts = samples.get(task) if isinstance(samples.get(task), Mapping) else {}
        items, total = counts.get("effective"), counts.get("original")
        full = _is_lm_eval_output(lm_eval) and limit is None and items is not None and items == total
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric in _LM_EVAL_SKIP or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows.append(
                {
                    "task": task,
                    "metric": metric if filt in ("", "none") else f"{metric} ({filt})",
                    "value": value,
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "n_shot": n_shot.get(task),
                    "items": items,
                    "of": total,
                    "full": full,
                }
            )
    return rows


def lm_eval_model_args(lm_eval: Mapping) -> dict:
    """The ``--model_args`` of an lm-eval run (``k=v,k=v``, a JSON object, or a dict) as a dict."""
    args = lm_eval.get("config", {}).get("model_args")
    if isinstance(args, Mapping):
        return dict(args)
    if not isinstance(args, str) or not args.strip():
        return {}
    if args.strip().startswith("{"):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return dict(item.partition("=")[::2] for item in args.split(",") if "=" in item)


def check_lm_eval_model(lm_eval: Any, model_dir: Path, repo_id: str | None = None) -> None:
    """lm-evaluation-harness's results must be of the model in ``model_dir``: their ``pretrained=`` (the model
    lm-eval loaded) is this folder, or ``repo_id`` (its Hub copy). A ``pretrained=`` path that does not exist from
    here (relative to where lm-eval ran, or moved since) must have this folder's name and the results' parameter
    count (``model_num_parameters``) this checkpoint's. Hand-written ``{task: {metric: value}}`` figures carry no
    model and are the user's word (they never reach the ``model-index``)."""
    if not _is_lm_eval_output(lm_eval) or "config" not in lm_eval:
        return
    pretrained = lm_eval_model_args(lm_eval).get("pretrained")
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise UsageError(
            "lm_eval: the results do not say which model they measured (no pretrained= in config.model_args); "
            "give the results of 'duo-llm eval --model duo --model_args pretrained=MODEL_DIR'."
        )
    path, folder = Path(pretrained).expanduser(), Path(model_dir).resolve()
    if path.exists():
        same = path.resolve() == folder
    else:
        counted = lm_eval["config"].get("model_num_parameters")
        same = path.name == folder.name and counted == (parameter_counts(folder) or {}).get("total")
    if not (same or pretrained == repo_id):
        raise UsageError(
            f"lm_eval: the results are of model {pretrained!r}, not of {str(model_dir)!r}; evaluate this folder "
            "(pretrained=MODEL_DIR) or leave that results file out."
        )


def render_lm_eval(rows: list[dict], lm_eval: Any = None) -> str:
    """The lm-eval table, benchmark scores apart from smoke tests (a ``--limit`` or partial run), and what was
    measured: the model arguments and the number of items of each task."""
    if not rows:
        return f"{NOT_EVALUATED}: no lm-evaluation-harness results were given for this checkpoint."
    parts = []
    if _is_lm_eval_output(lm_eval):
        args = ", ".join(f"`{k}={v}`" for k, v in lm_eval_model_args(lm_eval).items() if k != "pretrained")
        limit = lm_eval.get("config", {}).get("limit")
        parts.append(
            f"Measured by lm-evaluation-harness (`--model {lm_eval.get('config', {}).get('model', '?')}`"
            + (f", {args}" if args else "")
            + (f", `--limit {limit}`" if limit is not None else "")
            + ")."
        )
    else:
        parts.append("Figures given by hand (not lm-evaluation-harness's results file): not in the model-index.")
    full = [row for row in rows if row["full"]]
    smoke = [row for row in rows if not row["full"]]
    if full:
        parts.append(_lm_eval_table(full))
    if smoke:
        parts.append(
            "**Smoke test, not a benchmark score**: scored on part of each task (or with no record of how many "
            "items), so these numbers only show that evaluation runs; they are left out of the model-index."
        )
        parts.append(_lm_eval_table(smoke))
    return "\n\n".join(parts)


def _lm_eval_table(rows: list[dict]) -> str:
    def items(row: dict) -> str:
        if row["items"] is None:
            return "not recorded"
        return f"{row['items']:,}" + (f" of {row['of']:,}" if row["of"] not in (None, row["items"]) else "")

    return markdown_table(
        ["task", "metric", "value", "stderr", "n-shot", "items"],
        [
            [
                r["task"],
                r["metric"],
                _fmt(r["value"]),
                _fmt(r["stderr"]) if r["stderr"] is not None else "",
                "" if r["n_shot"] is None else str(r["n_shot"]),
                items(r),
            ]
            for r in rows
        ],
    )


def eval_results(rows: list[dict]) -> list:
    """lm-eval benchmark scores (full runs only) as the Hub's model-index entries."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=r["task"],
            dataset_name=r["task"],
            metric_type=r["metric"],
            metric_value=r["value"],
        )
        for r in rows
        if r["full"]
    ]


def hub_dataset(spec: Any) -> str | None:
    """The Hub dataset id of a training corpus spec (``hf:NAME[:CONFIG][@SPLIT]``), else None: the built-in corpus
    and local files are no Hub datasets, so the card's metadata does not list them."""
    if not isinstance(spec, str) or not spec.startswith(HUB_PREFIX):
        return None
    return spec[len(HUB_PREFIX) :].partition("@")[0].partition(":")[0] or None


def metric_ids(figures: Mapping) -> list[str]:
    """The Hub ``metrics`` ids the card has figures for."""
    ids = []
    if any(r["metric"].startswith("acc") and r["full"] for r in lm_eval_rows(figures.get("lm_eval"))):
        ids.append("accuracy")
    text = json.dumps({k: figures.get(k) for k in ("training", "oracle", "router")}).lower()
    if "ppl" in text or "perplexity" in text:
        ids.append("perplexity")
    return ids


# --------------------------------------------------------------------------------------------- helpers


def _scalars(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: v for k, v in data.items() if v is None or isinstance(v, (str, int, float, bool))}
    return data


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _mega(flops: float) -> str:
    return f"{flops / 1e6:.4g} M"


def _heads(config: dict) -> str | None:
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads")
    return None if heads is None else f"{heads} ({kv or heads})"


def _small_ratio(config: dict) -> str:
    big, small = config.get("intermediate_size"), config.get("small_intermediate_size")
    if not big or not small:
        return "(not recorded)"
    return f"1/{big / small:.3g}" if big % small == 0 else f"{small}/{big}"


def _routing_detail(config: dict) -> str:
    mode = config.get("routing")
    if mode == "random" and config.get("route_probs"):
        probs = ", ".join(f"{k} {v:g}" for k, v in config["route_probs"].items())
        return f" with route probabilities {probs}"
    if mode == "fixed" and config.get("pattern"):
        from ..models.routes import CHOICE_LETTERS

        return " with pattern `" + "".join(CHOICE_LETTERS[int(c)] for c in config["pattern"]) + "`"
    return ""


def _example_pattern(config: dict) -> str:
    from ..models.routes import CHOICE_LETTERS, CHOICE_NAMES

    letters = [CHOICE_LETTERS[CHOICE_NAMES.index(o)] for o in config.get("route_options", ["small", "big"])]
    return "".join(letters[i % len(letters)] for i in range(config.get("num_hidden_layers", 4)))


@dataclass(kw_only=True)
class CardArguments:
    """Arguments of ``duo-llm card``: the model folder (positional) and flags (``--name-with-dashes``)."""

    # The command's name and description in --help and errors (`build_parser`); unannotated, so not fields.
    prog = "duo-llm card"
    description = (
        "Write the Hub model card (README.md) of a saved Duo checkpoint, filled in with the run's figures. "
        "lm-evaluation-harness results must be of this model; a --limit run is shown as a smoke test, never put "
        "in the model-index."
    )
    flag_labels = True  # messages name the flags (--repo-id), as the card's always did

    model_dir: str = field(metadata={"positional": True, "help": "folder written by save_pretrained"})
    metrics: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"JSON files of the run's figures, as FILE or SECTION=FILE (sections: {', '.join(SECTIONS)})"
        },
    )
    repo_id: str | None = field(default=None, metadata={"help": "Hub repository id shown in the loading example"})
    model_name: str | None = field(default=None, metadata={"help": "title of the card (default: the folder name)"})

    def validate(self) -> None:
        """Check the flags and that the folder is a saved model, before any metrics file is read; raise
        `UsageError`."""
        for name in ("repo_id", "model_name"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise UsageError(f"{flag_label(self, name)}: '' is empty; give a name or leave the flag out.")
        read_config(Path(self.model_dir))


def main(argv: Sequence[str] | None = None) -> Path:
    """``duo-llm card``: write the model card of a saved Duo checkpoint."""
    args = parse_arguments(CardArguments, argv)
    args.validate()
    path = write_model_card(args.model_dir, args.metrics or None, repo_id=args.repo_id, model_name=args.model_name)
    print(path)
    return path


if __name__ == "__main__":
    from ..utils.errors import script_main

    script_main("duo-llm card", main)
