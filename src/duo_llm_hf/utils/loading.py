"""Loading a saved Duo model for the commands, with a one-line `UsageError` for every way a model can be wrong.

`load_duo_model` is the one place the commands load a Duo model folder (or Hub name): a missing folder, a folder
that is not a model, a dense (non-Duo) model, and weights that do not match the config (missing layers, extra
keys, other shapes) are user errors that name what is wrong; a checkpoint never loads with randomly initialised
weights. The routers' weights are the one legitimate gap: a stage 1 model has none (`_keys_to_ignore_on_load_missing`
of the Duo models), and learned routing on it gets fresh ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..models.configuration_duo_llama import DuoLlamaConfig
from ..models.configuration_duo_opt import DuoOPTConfig
from ..models.routes import CHOICE_NAMES, choice_code, validate_route_fields
from .errors import MissingFileError, UsageError
from .run_files import CONFIG_FILE

DUO_MODEL_TYPES = (DuoLlamaConfig.model_type, DuoOPTConfig.model_type)
# Choices a Duo model can take although its config does not list them: skip runs no FFN, so it needs no weights.
WEIGHTLESS_CHOICES = ("skip",)
_SHOWN_KEYS = 6


def is_duo_model(model_or_config) -> bool:
    """Whether a model (or its config) is a Duo model (DuoLlama, DuoOPT) rather than a dense one.

    Read from ``model_type``, so a Duo model loaded with ``trust_remote_code`` (its own copy of the classes) or
    wrapped in place (peft's LoRA layers) counts too.
    """
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in DUO_MODEL_TYPES


def _source(path: str | Path, what: str) -> str | Path:
    """The local folder of ``path``, or ``path`` itself when it can only be a Hub name; `UsageError` otherwise."""
    name = str(path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise MissingFileError(
                f"{what}: {name!r} is not a model folder (it has no config.json); give a Duo model folder written "
                "by save_pretrained, e.g. the output folder of `duo-llm train`."
            )
        return folder
    if folder.exists():
        raise MissingFileError(
            f"{what}: {name!r} is a file, not a model folder; give the folder save_pretrained wrote."
        )
    from ..training.building import is_hub_id  # only here: a name that is no local path may be a Hub model

    if not is_hub_id(name):
        raise MissingFileError(
            f"{what}: {name!r} does not exist; give a Duo model folder written by save_pretrained (e.g. the output "
            "folder of `duo-llm train`) or a Hub model name (org/name)."
        )
    return name


def inspect_duo_source(path: str | Path, what: str = "model"):
    """Read a Duo model's config (no weights) from a local folder or the Hub; `UsageError` unless it is one.

    ``what`` names the argument in the messages (``"model"``, ``"--model"``).
    """
    source = _source(path, what)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(source, Path):
            raise UsageError(f"{what}: {str(path)!r} has a config that cannot be read ({reason}).") from err
        raise UsageError(
            f"{what}: no local folder {str(path)!r} exists, and it could not be loaded as a Hub model name "
            f"({reason}); check the path, or the name and your network."
        ) from err
    if not is_duo_model(config):
        raise UsageError(
            f"{what}: {str(path)!r} is a {config.model_type!r} model, not a Duo model ({list(DUO_MODEL_TYPES)}); "
            "this command needs a Duo model: train one with `duo-llm train`, finetune a pretrained OPT/Llama into "
            "one with `duo-llm finetune`, or convert a dense Llama or OPT model exactly with `duo-llm convert "
            f"{path} --output-dir DIR`."
        )
    return config


def _keys(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def load_duo_model(path: str | Path, dtype: torch.dtype = torch.float32, what: str = "model"):
    """Load a Duo model (DuoLlama or DuoOPT) with `AutoModelForCausalLM`; every weight must come from the checkpoint.

    Raises `UsageError` for a missing folder, a folder that is no model or not a Duo model (`inspect_duo_source`),
    missing weight files, and weights that do not match the config (`load_complete_model`).
    """
    inspect_duo_source(path, what)
    return load_complete_model(path, dtype, what)


def load_complete_model(path: str | Path, dtype: torch.dtype = torch.float32, what: str = "model"):
    """`AutoModelForCausalLM.from_pretrained` that never leaves a weight randomly initialised.

    Keys missing from the checkpoint (except those the model class may lack, such as a stage 1 Duo model's router
    weights: `_keys_to_ignore_on_load_missing`), unexpected keys and weights of other shapes are a `UsageError`
    naming them, as are missing weight files.
    """
    return load_complete_checkpoint(_source(path, what), str(path), what, dtype=dtype)


def load_complete_checkpoint(source: str | Path, name: str, what: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(source, **kwargs)` that never leaves a weight randomly initialised.

    ``source`` is a local folder or Hub name that exists (`load_complete_model` checks that), ``name`` how the user
    wrote it, for the messages. Keys missing from the checkpoint (except those the class may lack:
    `_keys_to_ignore_on_load_missing`), unexpected keys, weights of other shapes and missing weight files are a
    `UsageError` naming them.
    """
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as err:
        raise UsageError(f"{what}: {name!r} cannot be loaded ({str(err).strip()}).") from err
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise UsageError(
            f"{what}: the weights in {name!r} have other shapes than its config.json asks for; the config was "
            "changed after the weights were saved, or belongs to another model."
        ) from err
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        found = [f"missing {_keys(missing)}"] if missing else []
        found += [f"unexpected {_keys(unexpected)}"] if unexpected else []
        raise UsageError(
            f"{what}: the weights in {name!r} do not match its config.json ({model.config.num_hidden_layers} layers): "
            f"{'; '.join(found)}. The checkpoint is incomplete or its config was changed; load a complete folder "
            "written by save_pretrained."
        )
    return model


def allow_route_options(config, route_options: Sequence[str | int]) -> list[str]:
    """Let a Duo model of ``config`` take every choice of ``route_options`` in explicit routes (the oracle's
    route space); ``config`` is changed in place (a loaded model's ``model.config``, or a config read before).

    A choice the model's ``config.route_options`` lacks is added when it needs no weights (``skip``: the FFN adds
    nothing), so the BIG-or-SKIP oracle runs on a model trained on small/big (the paper's Fig. 2d); its
    ``route_probs`` give the added choice probability 0 and its routers keep their choices. A ``small`` or ``big``
    the model was not trained to route to is refused. Returns the added choices.
    """
    wanted = [CHOICE_NAMES[c] for c in sorted({choice_code(c, "route_options") for c in route_options})]
    added = [name for name in wanted if name not in config.route_options]
    untrained = [name for name in added if name not in WEIGHTLESS_CHOICES]
    if untrained:
        raise UsageError(
            f"route options {wanted}: the model's route_options are {config.route_options}, so its "
            f"{' and '.join(untrained)} FFNs were not trained to be routed to; choose from {config.route_options} "
            f"(plus {', '.join(WEIGHTLESS_CHOICES)}, which needs no weights)."
        )
    if added:
        config.route_options = [*config.route_options, *added]
        validate_route_fields(config)  # canonical order; route_probs give the added choices 0
    return added
