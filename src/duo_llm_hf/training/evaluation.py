"""Held-out perplexity of a stage 1 model under each routing it was trained for (random, all-big, all-small, ...).

Random routes come from a sampler seeded afresh at every evaluation, so evaluations along a run (and of runs
trained with the same route seed) see the same routes and are comparable. The router training's evaluation, under
the routers' hard choices, is `router_evaluation.evaluate_router`.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..models.losses import token_losses
from ..models.routes import RouteSampler, parse_routing
from ..utils.loading import is_duo_model


def eval_route_kwargs(model, routing: str, input_ids: torch.Tensor, sampler: RouteSampler | None) -> dict:
    """Keyword arguments that make a Duo model follow ``routing`` (``random`` or a uniform pattern, ``all-big``,
    ...) on a batch; none for a dense model (``dense``)."""
    if routing == "dense":
        return {}
    shape = (*input_ids.shape, model.config.num_hidden_layers)
    if routing == "random":
        return {"routes": sampler.sample(shape, input_ids.device)}
    _, pattern = parse_routing(routing, model.config.num_hidden_layers)
    return {"routes": torch.tensor(pattern, dtype=torch.long, device=input_ids.device).expand(shape)}


@torch.no_grad()
def evaluate_perplexity(
    model,
    loaders: dict[str, DataLoader],
    accelerator: Accelerator,
    routings: list[str],
    route_seed: int = 0,
) -> dict[str, float]:
    """Held-out loss and perplexity of each eval set under each routing (``dense`` for a dense model).

    Random routes come from a fresh sampler seeded with ``route_seed`` at every call, so evaluations along a
    run see the same routes and are comparable. Keys: ``eval/<set>/<routing>/loss`` and ``.../ppl``.
    """
    unwrapped = accelerator.unwrap_model(model)
    is_duo = is_duo_model(unwrapped)
    modes = routings if is_duo else ["dense"]
    was_training = model.training
    model.eval()
    metrics = {}
    for set_name, loader in loaders.items():
        for mode in modes:
            sampler = RouteSampler(unwrapped.config.route_probs, route_seed) if mode == "random" else None
            total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for batch in loader:
                ids = batch["input_ids"]
                logits = model(input_ids=ids, **eval_route_kwargs(unwrapped, mode, ids, sampler)).logits
                losses, mask = token_losses(logits, ids)
                sums, counts = accelerator.gather_for_metrics(
                    (losses.sum(-1).double(), mask.sum(-1).double())
                )
                total += sums.sum()
                count += counts.sum()
            loss = (total / count.clamp_min(1)).item()
            metrics[f"eval/{set_name}/{mode}/loss"] = loss
            metrics[f"eval/{set_name}/{mode}/ppl"] = math.exp(min(loss, 50.0))
    model.train(was_training)
    return metrics



__all__ = ["eval_route_kwargs", "evaluate_perplexity"]
