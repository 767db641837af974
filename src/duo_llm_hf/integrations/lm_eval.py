"""lm-evaluation-harness integration: the `duo` model and the local-data benchmark tasks.

The harness's own `lm_eval` command evaluates a saved Duo folder as `--model hf` with `trust_remote_code=True`:
every routing is a config override that `HFLM` hands to `from_pretrained`, and the model validates it as it is
built (a JSON `--model_args` carries `route_probs`)::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,routing=fixed,pattern=sBsB
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,routing=learned
    lm_eval --model hf --model_args '{"pretrained": "DIR", "trust_remote_code": true, "routing": "random",
                                      "route_probs": {"small": 0.75, "big": 0.25}, "route_seed": 0}'

`DuoLM` (`duo`, registered when this module is imported: in Python and in `duo-llm eval`) is the harness's `HFLM`
with shorter routing arguments, checks and the routing in the results file::

    duo-llm eval --model duo --model_args pretrained=DIR,routing=random,p_big=0.25 --tasks arc_easy,hellaswag
    duo-llm eval --model duo --model_args pretrained=DIR,routing=all-small --tasks hellaswag

The harness's `arc_easy` and `hellaswag` tasks load their data from the Hub. `arc_easy_local` and
`hellaswag_local` (YAMLs in `TASKS_DIR`) are the same tasks reading local jsonl files (ARC-Easy in the Hub schema;
HellaSwag as `hellaswag_val.jsonl`, the offline copy's format or the Hub schema, through the harness's own
`process_docs`): `--include_path TASKS_DIR --metadata '{"data_dir": "/path"}'`, or `local_task_manager(data_dir)`
in Python.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..models.routes import UNIFORM_PATTERNS, parse_routing, pattern_to_str
from ..utils.arguments import user_values
from ..utils.errors import UsageError
from ..utils.loading import inspect_duo_source, is_duo_model

TASKS_DIR = Path(__file__).parent / "tasks"
"""Folder of the `*_local` task YAMLs; pass it to `--include_path` / `TaskManager(include_path=...)`."""

FIXTURE_DATA_DIR = TASKS_DIR / "fixtures"
"""Six hand-written ARC-Easy (Hub schema) and HellaSwag (`hellaswag/hellaswag_val.jsonl`, the offline copy's format)
examples, for tests and smoke runs only."""

LOCAL_TASKS = {"arc_easy": "arc_easy_local", "hellaswag": "hellaswag_local"}
"""Official task name -> the local-data task with the same definition."""

# `routing=config` keeps the saved config's routing; every other value is a name of the routing vocabulary.
KEEP_CONFIG_ROUTING = "config"
DUO_ROUTINGS = (KEEP_CONFIG_ROUTING, "random", "fixed", "learned", *UNIFORM_PATTERNS)
"""The `routing` values of the `duo` model: `config`, a routing mode, or a uniform pattern (`all-small`, ...)."""


def routing_settings(
    config,
    routing: str | None = None,
    p_big: float | None = None,
    p_small: float | None = None,
    p_skip: float | None = None,
    pattern: str | list | None = None,
    route_seed: int | None = None,
) -> dict[str, Any] | None:
    """The `set_routing` arguments that the `duo` model arguments ask for (None: keep the config's routing).

    `routing` is one of `DUO_ROUTINGS`: `config` (default), `random`, `fixed`, `learned` (the model's trained
    routers; refused for a model without routers), or `all-small` / `all-big` / `all-skip` (every token on that
    choice in every layer), the names `models.routes.parse_routing` reads. With `random`, the given
    probabilities (`p_big`, `p_small`, `p_skip`) set `route_probs`; a single allowed choice left unset gets the
    remainder, and none given keeps the config's. `p_*` alone implies `random`, `pattern` alone implies `fixed`.
    """
    probs = {name: p for name, p in (("small", p_small), ("big", p_big), ("skip", p_skip)) if p is not None}
    if routing is None:
        routing = "random" if probs else "fixed" if pattern is not None else KEEP_CONFIG_ROUTING
    if routing not in DUO_ROUTINGS:
        raise ValueError(f"routing={routing!r} is not a routing of the duo model; use one of {list(DUO_ROUTINGS)}.")
    mode, uniform_pattern = (
        (None, None) if routing == KEEP_CONFIG_ROUTING else parse_routing(routing, config.num_hidden_layers)
    )
    if probs and mode != "random":
        raise ValueError(f"p_small/p_big/p_skip {probs} only apply to routing=random, not routing={routing!r}.")
    if pattern is not None and routing != "fixed":
        raise ValueError(f"pattern={pattern!r} only applies to routing=fixed, not routing={routing!r}.")
    if mode is None:
        return None
    if mode == "learned" and not getattr(config, "use_router", False):
        # set_routing("learned") would add freshly initialised routers: refuse rather than score untrained ones.
        raise ValueError(
            "routing=learned: this model has no routers (config.use_router is false); evaluate a model whose "
            "routers were trained (stage 3), or pick another routing."
        )
    settings: dict[str, Any] = {"routing": mode}
    if route_seed is not None:
        settings["route_seed"] = int(route_seed)
    if routing == "fixed":
        if pattern is None:
            raise ValueError("routing=fixed needs pattern=..., one letter per layer: s (small), B (big), - (skip).")
        if not isinstance(pattern, (str, list, tuple)):
            raise ValueError(f"pattern={pattern!r}: give one letter per layer, s (small), B (big), - (skip): sBsB.")
        settings["pattern"] = pattern
    elif uniform_pattern is not None:
        settings["pattern"] = uniform_pattern
    elif mode == "random" and probs:
        settings["route_probs"] = _fill_route_probs(probs, list(config.route_options))
    return settings


def _fill_route_probs(probs: dict[str, float], options: list[str]) -> dict[str, float]:
    """Complete the given probabilities over the allowed choices: one unset choice takes the remainder."""
    for name, p in probs.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
            raise ValueError(f"p_{name}={p!r} is not a probability; give a number in [0, 1].")
    outside = sorted(set(probs) - set(options))
    unset = [name for name in options if name not in probs]
    if outside and any(probs[name] > 0 for name in outside):
        raise ValueError(f"p_{outside[0]} is set but the model's route_options {options} do not allow {outside[0]!r}.")
    probs = {name: float(p) for name, p in probs.items() if name in options}
    if len(unset) == 1:
        probs[unset[0]] = max(0.0, 1.0 - sum(probs.values()))
    elif len(unset) > 1:
        raise ValueError(
            f"routing=random with route_options {options}: set the probabilities of {unset} too "
            f"(p_{unset[0]}=..., they must sum to 1)."
        )
    return probs


def describe_routing(config) -> dict[str, Any]:
    """The routing a Duo config applies, for result files: mode, pattern letters, probabilities, seed."""
    info: dict[str, Any] = {"routing": config.routing, "route_options": list(config.route_options)}
    if config.routing == "fixed":
        info["pattern"] = pattern_to_str(config.pattern)
    if config.routing == "random":
        info["route_probs"] = dict(config.route_probs)
        info["route_seed"] = config.route_seed
    return info


class NotDuoModelError(UsageError, TypeError):
    """``--model duo`` was given a model that is not a Duo model (also a `TypeError`, as before)."""


# How `--model_args pretrained=...` is named in messages.
PRETRAINED = "--model_args pretrained"
ROUTING_ARGS = ("routing", "p_big", "p_small", "p_skip", "pattern", "route_seed")


def check_duo_source(pretrained: str | os.PathLike, *routing_args) -> None:
    """The `duo` model's source is a readable Duo model (a folder, or a reachable Hub name) and its routing
    arguments (`ROUTING_ARGS`, in order) fit it; `UsageError` otherwise. Reads its config only."""
    config = inspect_duo_source(pretrained, PRETRAINED)
    with user_values(f"--model_args for {str(pretrained)!r}: "):
        routing_settings(config, *routing_args)


def check_duo_command_line(argv: list[str]) -> bool:
    """``duo-llm eval``: check the `duo` model's arguments (`check_duo_source`) before the harness starts, so a
    missing folder, a dense model or a wrong routing is one line before any of the harness's output. The model
    arguments are read with the harness's own action (``key=val,...``, several of them, or JSON). Returns whether
    the command evaluates the `duo` model."""
    import argparse

    from lm_eval._cli.utils import MergeDictAction

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model")
    parser.add_argument("--model_args", "-a", nargs="+", action=MergeDictAction, default=None)
    try:
        known, _ = parser.parse_known_args(argv)
    except (SystemExit, ValueError):  # the harness's parser says what is wrong, its way
        return False
    model_args = known.model_args or {}
    if known.model == "duo" and isinstance(model_args.get("pretrained"), str):
        check_duo_source(model_args["pretrained"], *(model_args.get(name) for name in ROUTING_ARGS))
    return known.model == "duo"


class _HeldStream:
    """A stand-in for ``sys.stderr`` that keeps what is written until `release` (then writes it through)."""

    def __init__(self, target):
        self.target, self.parts, self.released = target, [], False

    def write(self, text: str) -> int:
        if self.released:
            return self.target.write(text)
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        if self.released:
            self.target.flush()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.target.write("".join(self.parts))
            self.parts.clear()

    def __getattr__(self, name):  # encoding, isatty, fileno, ...: the real stream's
        return getattr(self.target, name)


@contextlib.contextmanager
def progress_held_until_scoring():
    """Hold back what is written to stderr (the harness's progress bars of building and tokenising the requests)
    until `DuoLM` has checked that the requests fit the model and starts scoring. A request the model cannot take
    is then one error line, not one after the harness's bars; the harness's logging keeps its own stream."""
    target = sys.stderr
    held = sys.stderr = _HeldStream(target)
    try:
        yield held
    except UsageError:
        held.parts.clear()  # the bars of the work refused: only the error line follows
        raise
    finally:
        held.release()
        sys.stderr = target


def release_held_progress() -> None:
    """Write out and stop holding stderr (`progress_held_until_scoring`): the model starts scoring."""
    if isinstance(sys.stderr, _HeldStream):
        sys.stderr.release()


@register_model("duo")
class DuoLM(HFLM):
    """`HFLM` for Duo models, with the routing chosen by model arguments.

    Args:
        pretrained: a saved Duo model folder or Hub name, or a loaded `DuoLlamaForCausalLM` (whose config the
            routing arguments change in place).
        routing, p_big, p_small, p_skip, pattern, route_seed: see `routing_settings`.
        **kwargs: every `HFLM` argument (`tokenizer`, `batch_size`, `device`, `dtype`, ...).
    """

    def __init__(
        self,
        pretrained,
        routing: str | None = None,
        p_big: float | None = None,
        p_small: float | None = None,
        p_skip: float | None = None,
        pattern: str | None = None,
        route_seed: int | None = None,
        **kwargs,
    ) -> None:
        if isinstance(pretrained, (str, os.PathLike)):
            check_duo_source(pretrained, routing, p_big, p_small, p_skip, pattern, route_seed)
        # duo_llama is not in transformers' causal-LM name table, which HFLM reads to pick its backend.
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)
        model = self.model
        if not is_duo_model(model):
            raise NotDuoModelError(
                f"--model duo evaluates Duo models; {type(model).__name__} (model_type "
                f"{getattr(model.config, 'model_type', None)!r}) has no Duo routing. Use --model hf for it."
            )
        with user_values("--model_args: "):
            settings = routing_settings(model.config, routing, p_big, p_small, p_skip, pattern, route_seed)
        if settings is not None:
            model.set_routing(**settings)

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        """The harness's scoring, after checking that every continuation fits the model's positions (the harness
        asserts it mid-run, with a bare AssertionError)."""
        longest = max((len(continuation) for _, _, continuation in requests), default=0)
        if longest > self.max_length:
            raise UsageError(
                f"the task needs continuations of up to {longest} tokens, longer than the {self.max_length} "
                "positions this model can take (max_position_embeddings); evaluate it on another task, or a model "
                "with more positions."
            )
        release_held_progress()
        return super()._loglikelihood_tokens(requests, *args, **kwargs)

    def loglikelihood_rolling(self, *args, **kwargs):
        release_held_progress()
        return super().loglikelihood_rolling(*args, **kwargs)

    def generate_until(self, *args, **kwargs):
        release_held_progress()
        return super().generate_until(*args, **kwargs)

    @property
    def routing(self) -> dict[str, Any]:
        """The routing the model is evaluated under (see `describe_routing`)."""
        return describe_routing(self.model.config)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "duo_routing": self.routing}


def local_task_manager(data_dir: str | os.PathLike, **kwargs):
    """A `TaskManager` that knows the `*_local` tasks and reads their files from `data_dir`."""
    from lm_eval.tasks import TaskManager

    metadata = {**kwargs.pop("metadata", {}), "data_dir": str(Path(data_dir).expanduser().resolve())}
    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata, **kwargs)


def hellaswag_agreement(path: str | os.PathLike, limit: int | None = None) -> dict[str, int]:
    """Compare `hellaswag_local`'s documents of a HellaSwag file with the official task's on the same items.

    The official `process_docs` (`lm_eval.tasks.hellaswag.utils`) is applied to the items as the file gives them
    (``ctx`` whole as ctx_a, ctx_b empty) and `hellaswag_local`'s to the same items; returns the number of items
    (the first ``limit``) whose query, choices and gold coincide (``"same"``), of those that differ only by the
    capital letter the harness gives an ActivityNet ctx_b that `hellaswag_local` restores (``"ctx_b
    capitalised"``), and of any other difference (``"other"``).
    """
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from .tasks.local_data import process_hellaswag_docs, split_hellaswag_context

    items = datasets.load_dataset("json", data_files={"validation": str(path)})["validation"]
    if limit is not None:
        items = items.select(range(min(limit, len(items))))
    ours = process_hellaswag_docs(items)
    given = process_docs(items.map(lambda item: {"ctx_a": item["ctx"], "ctx_b": ""}))
    counts = {"same": 0, "ctx_b capitalised": 0, "other": 0}
    for item, doc, official in zip(items, ours, given, strict=True):
        fields = ("choices", "gold")
        if doc["query"] == official["query"] and all(doc[k] == official[k] for k in fields):
            counts["same"] += 1
            continue
        ctx_b = split_hellaswag_context(item["ctx"])[1]
        restored = official["query"][: len(official["query"]) - len(ctx_b)] + ctx_b.capitalize()
        kind = (
            "ctx_b capitalised" if doc["query"] == restored and all(doc[k] == official[k] for k in fields) else "other"
        )
        counts[kind] += 1
    return counts


__all__ = [
    "DUO_ROUTINGS",
    "DuoLM",
    "FIXTURE_DATA_DIR",
    "LOCAL_TASKS",
    "NotDuoModelError",
    "TASKS_DIR",
    "describe_routing",
    "hellaswag_agreement",
    "local_task_manager",
    "routing_settings",
]
