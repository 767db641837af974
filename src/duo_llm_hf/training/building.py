"""What a training run builds: the model of stage 1 (random routing, frozen-big or the dense baseline), its
optimizer and its learning-rate schedule.

`build_model` makes the model of a `arguments.TrainArguments` run: a `DuoLlamaForCausalLM` from scratch
(`duo_config_from_args`), a Duo model around a pretrained dense Llama or OPT (or the big path of a Duo model) whose
weights are frozen but the small FFNs' (`inspect_init_source` reads its config first, `freeze_all_but_small`), or
the FLOP-matched dense baseline (`dense_baseline_config`). `build_optimizer` and `build_scheduler` serve the router
training too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, get_scheduler

from ..models.configuration_duo_llama import DuoLlamaConfig
from ..models.configuration_duo_opt import DuoOPTConfig
from ..models.modeling_duo import dense_config_fields
from ..models.modeling_duo_llama import DuoLlamaForCausalLM
from ..models.modeling_duo_opt import DuoOPTForCausalLM
from ..utils.errors import MissingFileError, UsageError
from ..utils.flops import dense_intermediate_size
from ..utils.hub import check_hub_name
from ..utils.loading import check_weight_pickles, is_duo_model, is_hub_id, load_complete_model
from ..utils.run_files import CONFIG_FILE

if TYPE_CHECKING:  # arguments.py checks its init_from with this module's helpers
    from .arguments import OptimizationArguments, TrainArguments

SMALL_MODULE_KEY = ".mlp.small."
# frozen-big sources by model_type: the Duo class each becomes (a Duo source gives its big path, to_dense()).
FROZEN_BIG_SOURCES = {
    "llama": DuoLlamaForCausalLM,
    DuoLlamaConfig.model_type: DuoLlamaForCausalLM,
    "opt": DuoOPTForCausalLM,
    DuoOPTConfig.model_type: DuoOPTForCausalLM,
}




def duo_config_from_args(args: TrainArguments, vocab_size: int, **overrides) -> DuoLlamaConfig:
    """The Duo model of a from-scratch run (also the FLOP reference of the dense baseline).

    ``overrides`` are further config fields (the tokenizer's special token ids).
    """
    intermediate = args.intermediate_size or 4 * args.hidden_size
    options = ["small", "big"] + (["skip"] if args.p_skip > 0 else [])
    return DuoLlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=intermediate,
        small_intermediate_size=args.small_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads or args.num_heads,
        max_position_embeddings=args.max_position_embeddings or args.block_size,
        route_options=options,
        routing="random",
        route_probs=args.route_probs(),
        route_seed=args.seed if args.route_seed is None else args.route_seed,
        **overrides,
    )


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The tokenizer's BOS / EOS / padding ids, as config fields (used by ``generate``)."""
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}


def dense_config_like(config: DuoLlamaConfig, intermediate_size: int) -> LlamaConfig:
    """A `LlamaConfig` with a Duo config's dimensions and the given FFN inner size."""
    return LlamaConfig(**{**dense_config_fields(config), "intermediate_size": intermediate_size})


def dense_baseline_config(config: DuoLlamaConfig) -> LlamaConfig:
    """The dense baseline of a Duo config: FFN inner size matching the Duo FFN's FLOPs at route_probs."""
    return dense_config_like(config, dense_intermediate_size(config, config.route_probs))


def inspect_init_source(path: str | Path, block_size: int):
    """Read a frozen-big source's config (no weights); check it is a supported model and long enough.

    ``path`` is a local folder or a Hub name (whose config is downloaded, or read from the Hub cache).
    """
    folder = Path(path).expanduser()
    if not is_hub_id(path) and not (folder / CONFIG_FILE).is_file():
        raise MissingFileError(
            f"init_from: {str(path)!r} has no config.json; give a folder written by save_pretrained."
        )
    if is_hub_id(path):
        check_hub_name(str(path), "init_from")
    try:
        config = AutoConfig.from_pretrained(str(path) if is_hub_id(path) else folder)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"init_from: {str(path)!r} has a config that cannot be read ({err}).") from err
    if config.model_type not in FROZEN_BIG_SOURCES:
        raise UsageError(
            f"init_from: {str(path)!r} is a {config.model_type!r} model; frozen-big needs a Llama-shaped model or "
            f"an OPT model (model_type one of {sorted(FROZEN_BIG_SOURCES)})."
        )
    if not is_hub_id(path):
        check_weight_pickles(folder, "init_from")
    if block_size > config.max_position_embeddings:
        raise UsageError(
            f"block_size {block_size} is longer than the max_position_embeddings "
            f"{config.max_position_embeddings} "
            f"of init_from {str(path)!r}; use --block-size <= {config.max_position_embeddings}."
        )
    return config


def build_model(args: TrainArguments, tokenizer) -> torch.nn.Module:
    """The model of a run: a random-routing Duo model, a frozen-big Duo model, or the dense baseline.

    From scratch, the vocabulary is the tokenizer's and the config takes its special token ids.
    """
    if args.mode in ("dense", "scratch"):
        config = duo_config_from_args(args, len(tokenizer), **special_token_ids(tokenizer))
        if args.mode == "dense":
            return LlamaForCausalLM(dense_baseline_config(config))
        return DuoLlamaForCausalLM(config)
    duo_class = FROZEN_BIG_SOURCES[AutoConfig.from_pretrained(args.init_from).model_type]
    dense = load_complete_model(args.init_from, torch.float32, "--init-from")
    if is_duo_model(dense):  # a Duo model: its big path, with fresh small modules below
        dense = dense.to_dense()
    options = ["small", "big"] + (["skip"] if args.p_skip > 0 else [])
    model = duo_class.from_dense(
        dense,
        small_intermediate_size=args.small_intermediate_size,
        route_options=options,
        routing="random",
        route_probs=args.route_probs(),
        route_seed=args.seed if args.route_seed is None else args.route_seed,
    )
    freeze_all_but_small(model)
    return model


def freeze_all_but_small(model: torch.nn.Module) -> int:
    """Freeze every parameter except the small FFNs; return the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(SMALL_MODULE_KEY in name)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def may_leave_a_module_unused(args: TrainArguments, chance: float = 1e-9) -> bool:
    """Whether a step may route no token of a micro-batch to the small or the big FFN of a layer.

    DDP must then search for unused parameters (``find_unused_parameters``), which costs a graph traversal
    per step, so it is only switched on where needed: a probability of 0, or tiny batches.
    """
    if args.mode == "dense":
        return False
    tokens = args.batch_size * args.block_size
    # p_big moves monotonically from its first step to the end (`route_probs_at`): the extremes are there
    extremes = (args.route_probs_at(0, 1), args.route_probs())
    return any((1.0 - probs[choice]) ** tokens > chance for probs in extremes for choice in ("small", "big"))


def build_optimizer(model: torch.nn.Module, args: OptimizationArguments) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not norms, not biases).

    With ``args.fused_optimizer``, torch's fused AdamW is used where it runs (floating-point parameters on CPU
    or CUDA): on CPU its single kernel takes about a third of the time of the default per-parameter loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = args.fused_optimizer and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=fused or None,
    )


def build_scheduler(optimizer, args: OptimizationArguments, total_steps: int, num_processes: int = 1):
    """Warm-up then ``args.lr_scheduler``.

    Accelerate steps a prepared scheduler once per process per optimizer step, so the step counts are scaled
    by the number of processes (as in accelerate's examples).
    """
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )



__all__ = [
    "FROZEN_BIG_SOURCES",
    "SMALL_MODULE_KEY",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "dense_baseline_config",
    "dense_config_like",
    "duo_config_from_args",
    "freeze_all_but_small",
    "inspect_init_source",
    "may_leave_a_module_unused",
    "special_token_ids",
]
