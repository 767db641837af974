"""The paper's Appendix A recipe: a pretrained OPT becomes a Duo model and only its new parts are trained.

`DuoOPTForCausalLM.from_dense` turns each layer's FFN into the big module and adds a small one (inner size
``ffn_dim // 16``); every pretrained weight is frozen and the small FFNs are trained with random routing
(``--p-big``, 0.5 as in stage 1). Optionally, LoRA adapters from `peft` on the attention projections let the
shared attention adapt to both modules while its pretrained weights stay frozen. Routers are then trained on top
of the result (``training/train_router.py``, the three settings of Appendix A). Llama-family checkpoints work the
same way (`DuoLlamaForCausalLM.from_dense`).

The run is `training.train` in its frozen-big mode (the same loop, data, evaluation, atomic checkpoints and
resume); where the small FFNs start (a slice of the big FFN, local distillation: `small_init`) and LoRA come in
through `ModelHooks`, and a p_big that moves over the run through `FinetuneArguments.route_probs_at`.

LoRA and what is saved: the checkpoints under ``checkpoints/`` hold the adapters unmerged, so a run resumes
exactly. The final model in ``output_dir`` has them merged into the attention weights (peft's
``merge_and_unload``): it is a plain Duo checkpoint that loads with ``AutoModelForCausalLM`` (or
``trust_remote_code``) without peft and that the router trainer, the oracle and lm-eval read as any Duo model.
A separate adapter file would not stand alone here anyway: the small FFNs are new full weights, so the
finetuned model is always saved whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from ..models.configuration_duo_llama import DuoLlamaConfig
from ..models.configuration_duo_opt import DuoOPTConfig
from .arguments import FinetuneArguments, parse_arguments
from .building import FROZEN_BIG_SOURCES
from .checkpointing import TrainState
from .small_init import start_small_ffns
from .train import ModelHooks, TrainResult, print_saved, train

# The attention projections that LoRA adapts by default, by Duo model_type.
ATTENTION_PROJECTIONS = {
    DuoOPTConfig.model_type: ("q_proj", "k_proj", "v_proj", "out_proj"),
    DuoLlamaConfig.model_type: ("q_proj", "k_proj", "v_proj", "o_proj"),
}


class AttentionLoRA:
    """LoRA adapters (peft) on a Duo model's attention: `add` before training, `merge` before saving.

    `add` injects the adapters in place (``get_peft_model``) and returns the same model object, now with
    trainable ``lora_A`` / ``lora_B`` matrices next to the frozen projections; what was trainable before (the
    small FFNs) stays trainable. `merge` folds the adapters into the projection weights and removes them
    (``merge_and_unload``), giving back a plain Duo model.
    """

    def __init__(
        self, r: int = 16, alpha: float = 32.0, dropout: float = 0.05, target_modules: Sequence[str] | None = None
    ):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.peft_model = None

    def targets(self, model: torch.nn.Module) -> list[str]:
        """The module names adapted in ``model``: the given ones, or its attention projections."""
        if self.target_modules is not None:
            return self.target_modules
        model_type = model.config.model_type
        if model_type not in ATTENTION_PROJECTIONS:
            raise ValueError(
                f"LoRA: no default attention projections for model_type {model_type!r}; pass target_modules "
                f"(--lora-target-modules). Known: {sorted(ATTENTION_PROJECTIONS)}."
            )
        return list(ATTENTION_PROJECTIONS[model_type])

    def add(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        if self.peft_model is not None:
            raise RuntimeError("AttentionLoRA.add: adapters were already added; use one AttentionLoRA per model.")
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.targets(model), bias="none"
        )
        self.peft_model = get_peft_model(model, config)
        model = self.peft_model.get_base_model()
        # get_peft_model leaves only the adapters trainable; the small FFNs train too.
        for name, param in model.named_parameters():
            if name in trainable:
                param.requires_grad_(True)
        return model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.peft_model is None or model is not self.peft_model.get_base_model():
            raise ValueError("AttentionLoRA.merge: this model did not get its adapters from this AttentionLoRA.add.")
        merged = self.peft_model.merge_and_unload()
        self.peft_model = None
        return merged

    def hooks(self) -> ModelHooks:
        """The `train` hooks: adapters added to the built model, merged into the saved one."""
        return ModelHooks(adapt=self.add, export=self.merge)


@dataclass
class MemoryEstimate:
    """Parameter counts of a finetuning run and the memory they take, in bytes (activations not included).

    Weights are held in fp32 (the run loads the checkpoint in fp32; ``--mixed-precision bf16`` autocasts the
    matmuls); each trainable parameter (small FFNs, LoRA) also has an fp32 gradient and two fp32 AdamW moments.
    """

    total_parameters: int
    small_parameters: int
    lora_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int

    @property
    def trainable_parameters(self) -> int:
        return self.small_parameters + self.lora_parameters

    @property
    def static_bytes(self) -> int:
        """Weights + gradients + optimizer states: what the run holds before any activation."""
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes


def estimate_memory(
    config,
    lora_r: int | None = None,
    lora_target_modules: Sequence[str] | None = None,
    small_intermediate_size: int | None = None,
) -> MemoryEstimate:
    """Count the parameters of the Duo model a finetuning run makes from ``config`` (a dense or Duo config of a
    supported architecture), and the memory of its weights, gradients and AdamW states.

    The model is built on the meta device: no weights are allocated or downloaded. ``lora_r`` None: no LoRA.
    ``total_parameters`` counts the Duo model without the adapters.
    """
    from ..models.modeling_duo import dense_config_fields

    if config.model_type not in FROZEN_BIG_SOURCES:
        raise ValueError(f"estimate_memory: {config.model_type!r} is not one of {sorted(FROZEN_BIG_SOURCES)}.")
    duo_class = FROZEN_BIG_SOURCES[config.model_type]
    duo_config = duo_class.config_class(**dense_config_fields(config), small_intermediate_size=small_intermediate_size)
    with torch.device("meta"):
        duo = duo_class(duo_config)
    named = dict(duo.named_parameters())  # tied weights once
    total = sum(p.numel() for p in named.values())
    small = sum(p.numel() for name, p in named.items() if ".mlp.small." in name)
    lora = 0
    if lora_r is not None:
        targets = AttentionLoRA(lora_r, target_modules=lora_target_modules).targets(duo)
        for name, module in duo.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                lora += lora_r * (module.in_features + module.out_features)
    trainable = small + lora
    return MemoryEstimate(total, small, lora, 4 * (total + lora), 4 * trainable, 8 * trainable)


def finetune(args: FinetuneArguments, step_callback: Callable[[TrainState, dict], None] | None = None) -> TrainResult:
    """Run the Appendix A finetuning: ``args.init_from`` as a Duo model, frozen, small FFNs (and LoRA) trained.

    Saves the finetuned Duo model and the source's tokenizer in ``args.output_dir``; see `FinetuneArguments`.
    """
    args.validate()
    hooks = ModelHooks()
    if args.lora:
        lora = AttentionLoRA(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_list())
        hooks = lora.hooks()
    hooks.start = partial(start_small_ffns, args)
    return train(args, step_callback, hooks)


def main(argv: list[str] | None = None) -> TrainResult:
    """``training/finetune_duo_opt.py`` (and ``duo-llm finetune``): parse the flags, finetune, print where the model
    went."""
    result = finetune(parse_arguments(FinetuneArguments, argv))
    print_saved(result, "the finetuned Duo model")
    return result


__all__ = [
    "ATTENTION_PROJECTIONS",
    "AttentionLoRA",
    "MemoryEstimate",
    "estimate_memory",
    "finetune",
    "main",
]
