"""Oracle supervision of the routers (beyond the paper): the oracle's routes as targets, the routers' loss towards
them, and the calibration of the routers' biases after training.

Per training batch the oracle (`oracle.oracle_routing`) finds each token's best pattern under an exact budget
(`oracle_router_targets`); the model follows those routes (teacher forcing) and each layer's router learns the
oracle's choice in that layer by cross-entropy (`oracle_router_loss`). After training, `calibrate_routers` shifts
the router biases so that hard routing takes each choice as often as the oracle does per layer.
"""

from __future__ import annotations

import torch

from ..models.losses import IGNORE_INDEX, next_token_targets
from ..models.routed_ffn import router_probabilities, router_temperature, routers
from ..models.routes import CHOICE_NAMES
from ..oracle.engine import oracle_routing


def oracle_router_targets(
    model, input_ids: torch.LongTensor, budget, *, causal: bool = False, chunk_tokens: int | None = None
) -> tuple[torch.LongTensor, torch.Tensor]:
    """The oracle's route of every token (``[batch, seq, layers]``) and which tokens count (``[batch, seq]``).

    The oracle (`oracle.oracle_routing`, independent by default, ``causal`` for the causally consistent one)
    picks each token's best pattern under ``budget`` over the model's ``route_options``, given the next tokens
    of ``input_ids``; tokens without a next token (the last of each block) do not count. Runs without gradients
    in evaluation mode, and leaves the model's mode as it was.
    """
    was_training = model.training
    model.eval()
    try:
        found = oracle_routing(model, input_ids, input_ids, budget, causal=causal, chunk_tokens=chunk_tokens)
    finally:
        model.train(was_training)
    return found.routes, next_token_targets(input_ids) != IGNORE_INDEX


def oracle_router_loss(router_probs: torch.Tensor, routes: torch.LongTensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the routers' probabilities (``[batch, seq, layers, 3]``) at the oracle's ``routes``.

    Averaged over the layers and the counted tokens (``mask``, ``[batch, seq]``): each layer's router learns to
    predict the oracle's choice in that layer.
    """
    chosen = router_probs.gather(-1, routes.to(router_probs.device)[..., None]).squeeze(-1)  # [B, T, L]
    log_p = torch.log(chosen.clamp_min(torch.finfo(chosen.dtype).tiny))
    weights = mask.to(log_p.device, log_p.dtype)[..., None].expand_as(log_p)
    return -(log_p * weights).sum() / weights.sum().clamp_min(1)


def router_agreement(router_probs: torch.Tensor, routes: torch.LongTensor, mask: torch.Tensor) -> float:
    """Fraction of the counted (token, layer) pairs where the router's argmax is the oracle's choice."""
    hits = (router_probs.argmax(-1) == routes.to(router_probs.device))[mask.to(router_probs.device).bool()]
    return hits.double().mean().item() if hits.numel() else float("nan")


def _match_fractions(scores: torch.Tensor, target: torch.Tensor, rounds: int = 8, steps: int = 50) -> torch.Tensor:
    """Offsets ``[C]`` such that ``argmax(scores + offsets)`` takes choice ``c`` for a ``target[c]`` share of rows.

    ``scores``: ``[n, C]`` (``-inf`` for choices never allowed). The share of a choice only grows with its own
    offset, so each offset is found by bisection with the others held; a few rounds over the choices settle all
    of them (one round is exact for two choices).
    """
    finite = scores[torch.isfinite(scores)]
    span = float(finite.max() - finite.min()) + 1.0 if finite.numel() else 1.0
    offsets = torch.zeros(scores.shape[-1], dtype=scores.dtype)
    allowed = [c for c in range(scores.shape[-1]) if torch.isfinite(scores[:, c]).any()]
    for _ in range(rounds if len(allowed) > 2 else 1):
        for c in allowed[:-1]:  # the last allowed choice takes the rest
            low, high = -span, span
            for _ in range(steps):
                offsets[c] = (low + high) / 2
                share = ((scores + offsets).argmax(-1) == c).double().mean()
                low, high = (offsets[c].item(), high) if share < target[c] else (low, offsets[c].item())
            offsets[c] = high
    return offsets


@torch.no_grad()
def calibrate_routers(
    model, input_ids: torch.LongTensor, budget, *, causal: bool = False, chunk_tokens: int | None = None
) -> dict:
    """Shift each layer's router biases so that its hard choices match the oracle's per-layer shares.

    A router trained to predict the oracle's choice in its layer is a classifier, and the argmax of a classifier
    that is unsure favours the commoner class: under a budget of 1 BIG layer in 4, every layer may prefer small
    and hard routing then spends almost no BIG. On ``input_ids`` (training blocks), with the model teacher
    forced on the oracle's routes, each router's biases get offsets (`_match_fractions`) such that its argmax
    takes each choice as often as the oracle does in that layer. Returns the offsets per layer and the hard
    choice shares and agreement with the oracle before and after.
    """
    routes, mask = oracle_router_targets(model, input_ids, budget, causal=causal, chunk_tokens=chunk_tokens)
    was_training = model.training
    model.eval()
    logits = model(input_ids=input_ids, routes=routes, output_router_logits=True, logits_to_keep=1).router_logits
    probs = router_probabilities(logits, router_temperature(model))
    model.train(was_training)
    counted = mask.to(probs.device).bool()
    before = router_agreement(probs, routes, mask)
    offsets, shares = [], []
    for layer, router in enumerate(routers(model)):
        log_p = torch.log(probs[:, :, layer][counted].double())  # [n, 3]; argmax(log P + o) = argmax(logits + tau o)
        oracle_share = torch.bincount(routes[:, :, layer][counted].reshape(-1).cpu(), minlength=len(CHOICE_NAMES))
        target = oracle_share.double() / oracle_share.sum().clamp_min(1)
        offset = _match_fractions(log_p.cpu(), target)
        router.bias.add_(
            torch.stack([offset[code] for code in router.choices]).to(router.bias.device, router.bias.dtype)
            * router.temperature
        )
        offsets.append({CHOICE_NAMES[code]: offset[code].item() * router.temperature for code in router.choices})
        shares.append({CHOICE_NAMES[c]: target[c].item() for c in router.choices})
    model.eval()
    after = model(input_ids=input_ids, routes=routes, output_router_logits=True, logits_to_keep=1).router_logits
    after_probs = router_probabilities(after, router_temperature(model))
    model.train(was_training)
    return {
        "blocks": int(input_ids.shape[0]),
        "oracle_shares": shares,
        "bias_offsets": offsets,
        "agreement_before": before,
        "agreement_after": router_agreement(after_probs, routes, mask),
    }



__all__ = ["calibrate_routers", "oracle_router_loss", "oracle_router_targets", "router_agreement"]
