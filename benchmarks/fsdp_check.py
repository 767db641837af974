"""FSDP through the library: train a tiny Duo model, checkpoint (sharded under FSDP), resume, gather and save.

Run under ``accelerate launch`` with ``training/configs/fsdp.yaml`` (the device check's ``fsdp`` part does, in one
process on one GPU). Two runs of the same steps on the same random token blocks: one straight through, one that
stops at a checkpoint and resumes from it in a fresh Accelerator. Each gathers its final model
(``accelerator.get_state_dict``) and saves it with ``save_pretrained``; the saved model must load back equal to the
gathered one, and the resumed run's weights must equal the straight run's. Writes ``fsdp_check.json`` to
``--output-dir``.

    accelerate launch --config_file training/configs/fsdp.yaml --num_processes 1 \\
        benchmarks/fsdp_check.py --output-dir DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from duo_llm_hf import DuoLlamaForCausalLM
from duo_llm_hf.training.arguments import TrainArguments
from duo_llm_hf.training.building import build_optimizer, build_scheduler, duo_config_from_args
from duo_llm_hf.training.checkpointing import (
    RouteSamplerState,
    TrainState,
    restore_train_state,
    save_checkpoint,
    validate_checkpoint,
)
from duo_llm_hf.training.loop import reset_accelerate_state, training_step

VOCAB = 256


def run(out: Path, steps: int, stop_at: int | None = None, resume_from: Path | None = None) -> dict:
    """Train to ``steps`` (checkpointing at ``stop_at``, then stopping there), or resume from ``resume_from``."""
    accelerator = Accelerator()
    args = TrainArguments(
        output_dir=str(out), hidden_size=64, num_layers=2, num_heads=4, block_size=32, batch_size=2, warmup_steps=0
    )
    torch.manual_seed(0)
    model = DuoLlamaForCausalLM(duo_config_from_args(args, VOCAB))
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    samplers = {"route_samplers": RouteSamplerState(lambda: unwrapped.model.route_sampler, accelerator)}
    state = TrainState()
    if resume_from is not None:
        validate_checkpoint(resume_from)
        state = restore_train_state(accelerator, resume_from, samplers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    while state.global_step < (stop_at or steps):
        ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(state.global_step))
        training_step(
            accelerator, model, {"input_ids": ids.to(accelerator.device)}, optimizer, scheduler, trainable, 1.0
        )
        state.global_step += 1
    info = {"distributed_type": str(accelerator.distributed_type), "steps": state.global_step}
    if stop_at is not None:
        folder = save_checkpoint(
            accelerator,
            out / "checkpoints",
            state.global_step,
            {**state.state_dict(), "run_id": "fsdp-check"},
            states=samplers,
        )
        info["checkpoint_files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    else:
        gathered = {k: v.detach().float().cpu() for k, v in accelerator.get_state_dict(model).items()}
        unwrapped.save_pretrained(
            out / "model",
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(model),
        )
        accelerator.wait_for_everyone()
        info["gathered"] = gathered
    reset_accelerate_state()
    return info


def max_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", "--out", dest="out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    out = Path(args.out)
    straight = run(out / "straight", args.steps)
    stopped = run(out / "resumed", args.steps, stop_at=args.steps // 2)
    checkpoint = out / "resumed" / "checkpoints" / f"step_{args.steps // 2}"
    resumed = run(out / "resumed", args.steps, resume_from=checkpoint)
    loaded = DuoLlamaForCausalLM.from_pretrained(out / "straight" / "model").state_dict()
    gathered = straight.pop("gathered")
    result = {
        "distributed_type": straight["distributed_type"],
        "steps": args.steps,
        "checkpoint_files": stopped["checkpoint_files"],
        "saved_equals_gathered_max_abs": max_difference({k: v.float() for k, v in loaded.items()}, gathered),
        "resumed_equals_straight_max_abs": max_difference(resumed.pop("gathered"), gathered),
    }
    result["passed"] = (
        result["saved_equals_gathered_max_abs"] == 0.0 and result["resumed_equals_straight_max_abs"] < 1e-5
    )
    if Accelerator().is_main_process:
        (out / "fsdp_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
