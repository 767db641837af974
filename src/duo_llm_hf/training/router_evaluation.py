"""The evaluation of trained routers and the report of a router run.

`evaluate_router` runs the held-out sets in evaluation mode, where every token takes its routers' argmax choice
and only that module runs, and measures the *realised* fraction of each choice (overall, per layer, and the
per-layer x per-position usage counts that the oracle's analysis also draws) with the perplexity at that realised
usage; `router_report` is the JSON report of a run (``router_report.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..models.losses import token_losses
from ..models.routes import BIG, CHOICE_NAMES, realised_fractions, route_usage
from ..utils.flops import flops_per_token
from .checkpointing import TrainState
from .router_arguments import RouterTargets, RouterTrainArguments


@torch.no_grad()
def evaluate_router(
    model, loaders: Mapping[str, DataLoader], accelerator: Accelerator | None = None, **forward_kwargs
) -> dict[str, dict]:
    """Held-out loss, perplexity and realised routes of each eval set under hard learned routing.

    The model runs in evaluation mode with ``routing="learned"`` (each token takes its argmax choice; only that
    module runs); ``forward_kwargs`` replace or add forward arguments (e.g. ``routing="fixed"``), so other route
    modes are measured the same way. Returns, per set and for ``"all"`` sets together: ``loss``, ``ppl``,
    ``tokens`` (predicted tokens), ``realised`` (`routes.realised_fractions`: overall and per layer) and
    ``usage`` (`routes.route_usage` counts ``[3, layers, positions]`` of the routes taken, every position of
    every block counted). Under several processes, the counts of all processes are gathered.
    """
    kwargs = {"routing": "learned", **forward_kwargs}
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    all_usage, all_loss, all_tokens = None, 0.0, 0
    for name, loader in loaders.items():
        total = count = 0.0
        usage = None
        for batch in loader:
            ids = batch["input_ids"]
            out = model(input_ids=ids, **kwargs)
            losses, mask = token_losses(out.logits, ids)
            sums, counts, routes = losses.sum(-1).double(), mask.sum(-1).double(), out.routes
            if accelerator is not None:
                sums, counts, routes = accelerator.gather_for_metrics((sums, counts, routes))
            total += sums.sum().item()
            count += counts.sum().item()
            counted = route_usage(routes).cpu()
            usage = counted if usage is None else usage + counted
        if usage is None:
            raise ValueError(f"eval set {name!r} has no blocks to evaluate.")
        loss = total / max(count, 1.0)
        results[name] = _eval_entry(loss, int(count), usage)
        all_loss, all_tokens = all_loss + total, all_tokens + int(count)
        all_usage = usage if all_usage is None or all_usage.shape != usage.shape else all_usage + usage
    if len(results) > 1 and all(r["usage"].shape == all_usage.shape for r in results.values()):
        results["all"] = _eval_entry(all_loss / max(all_tokens, 1), all_tokens, all_usage)
    model.train(was_training)
    return results


def _eval_entry(loss: float, tokens: int, usage: torch.Tensor) -> dict:
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "realised": realised_fractions(usage),
        "usage": usage,
    }


def eval_metrics(results: Mapping[str, dict], prefix: str = "eval") -> dict[str, float]:
    """Flat tracker metrics of `evaluate_router` results: loss, ppl and the overall realised fractions."""
    metrics = {}
    for name, entry in results.items():
        metrics[f"{prefix}/{name}/learned/loss"] = entry["loss"]
        metrics[f"{prefix}/{name}/learned/ppl"] = entry["ppl"]
        for choice, fraction in entry["realised"]["overall"].items():
            metrics[f"{prefix}/{name}/realised/{choice}"] = fraction
    return metrics


def router_report(
    args: RouterTrainArguments,
    config,
    router_targets: RouterTargets,
    state: TrainState,
    results: Mapping[str, dict],
    train_realised: Mapping[str, float],
    train_agreement: float | None = None,
    temperature_final: float = 1.0,
) -> dict:
    """The JSON report of a router run: its targets, and per held-out set the realised fractions and perplexity.

    ``holdouts[name]`` holds ``loss``, ``ppl``, ``tokens``, ``realised`` (``overall`` and ``per_layer``
    fractions of each choice), ``usage`` (counts ``[3][layers][positions]``: choice code x layer x position,
    the data of the paper's Fig. 3) and ``flops_per_token`` at the realised fractions (with the routers' own
    FLOPs) next to ``flops_per_token_all_big``.
    """
    holdouts = {}
    for name, entry in results.items():
        realised = entry["realised"]["overall"]
        fractions = realised if sum(realised.values()) > 0 else None
        holdouts[name] = {
            "loss": entry["loss"],
            "ppl": entry["ppl"],
            "tokens": entry["tokens"],
            "realised": entry["realised"],
            "flops_per_token": flops_per_token(config, fractions, seq_len=args.block_size, router=True).total,
            "usage": entry["usage"].tolist(),
        }
    return {
        "model": str(args.model),
        "setting": args.setting,
        "supervision": args.supervision,
        "route_options": list(router_targets.options),
        "target_usage": {CHOICE_NAMES[code]: value for code, value in router_targets.targets.items()},
        "oracle_budget": router_targets.oracle_budget,
        "oracle_causal": args.oracle_causal if args.supervision == "oracle" else None,
        "alpha": args.alpha,
        "temperature_final": float(temperature_final),
        "global_step": state.global_step,
        "tokens_seen": state.tokens_seen,
        "block_size": args.block_size,
        "flops_per_token_all_big": flops_per_token(config, {BIG: 1.0}, seq_len=args.block_size).total,
        "train_realised_last_window": dict(train_realised),
        "train_oracle_agreement_last_window": train_agreement,
        "holdouts": holdouts,
    }



__all__ = ["eval_metrics", "evaluate_router", "router_report"]
