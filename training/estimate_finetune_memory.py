"""Estimate the GPU memory of the Appendix A finetuning from parameter counts (activations not included).

    python training/estimate_finetune_memory.py                                # OPT-1.3B (its published shape)
    python training/estimate_finetune_memory.py --init-from facebook/opt-1.3b  # any config: Hub name or folder

Counts the parameters of the Duo model the run builds (on the meta device: nothing is allocated or
downloaded but the config), then the bytes of fp32 weights and of the gradients and AdamW moments of the
trainable part, with and without LoRA. It is an estimate: activations (which grow with batch size x block
size), the CUDA context and allocator fragmentation come on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig, OPTConfig

from duo_llm_hf.training.arguments import parse_arguments
from duo_llm_hf.training.finetune import estimate_memory
from duo_llm_hf.utils.errors import script_main

SUMMARY = __doc__.split("\n")[0]
# The shape of facebook/opt-1.3b (its config.json), so that the estimate runs without a network.
OPT_1_3B = dict(
    vocab_size=50272,
    hidden_size=2048,
    ffn_dim=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    max_position_embeddings=2048,
    word_embed_proj_dim=2048,
    do_layer_norm_before=True,
)


@dataclass
class EstimateArguments:
    """The model whose finetuning is estimated, and the run's LoRA rank and small FFN size."""

    prog = "estimate_finetune_memory.py"
    description = SUMMARY

    init_from: str | None = field(
        default=None, metadata={"help": "Model config to read (Hub name or folder); default: OPT-1.3B's shape."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the LoRA row (default 16)."})
    small_intermediate_size: int | None = field(default=None, metadata={"help": "Default: ffn_dim // 16."})


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(EstimateArguments, argv)
    config = AutoConfig.from_pretrained(args.init_from) if args.init_from else OPTConfig(**OPT_1_3B)
    name = args.init_from or "OPT-1.3B shape"
    gib = 1024**3
    print(f"{name}: estimate from parameter counts; activations, CUDA context and fragmentation come on top.")
    print("| run | parameters | trainable | fp32 weights | grads + AdamW | total before activations |")
    print("|---|---|---|---|---|---|")
    for label, rank in (("small FFNs", None), (f"small FFNs + LoRA r={args.lora_r}", args.lora_r)):
        est = estimate_memory(config, lora_r=rank, small_intermediate_size=args.small_intermediate_size)
        print(
            f"| {label} | {(est.total_parameters + est.lora_parameters) / 1e6:,.1f} M "
            f"| {est.trainable_parameters / 1e6:,.2f} M "
            f"| {est.weights_bytes / gib:.2f} GiB | {(est.gradients_bytes + est.optimizer_bytes) / gib:.2f} GiB "
            f"| {est.static_bytes / gib:.2f} GiB |"
        )


if __name__ == "__main__":
    script_main("estimate_finetune_memory.py", main)  # one-line errors, exit 2, as the training scripts show them
