"""A router distilled from the oracle (beyond the paper): stored oracle targets, the routers' loss towards them,
and the calibration of the routers' biases.

The oracle is run once, with the oracle engine (`oracle.run.run_oracle_study`: resumable, multi-process, result
files), over many training blocks and every budget the routers need (`compute_oracle_targets`); the result is an
oracle result folder (``oracle_results.safetensors`` + ``oracle_summary.json``), so one enumeration serves the
routers of several budgets and a rerun reads it back. `oracle_target_blocks` turns it into training rows (token
ids, the oracle's route of every token, which tokens count): the independent oracle's routes (the paper's, which
see the next token), or the causally consistent oracle's (realisable in one forward pass; present when the result
was computed with ``causal=True``). The model follows those routes (teacher forcing: each router sees the FFN input
the oracle's route gives) and each layer's router learns the oracle's choice in that layer by cross-entropy
(`oracle_router_loss`). `calibrate_routers` shifts the router biases so that hard routing takes each choice as
often as the oracle does per layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch

from ..models.routed_ffn import router_probabilities, router_temperature, routers
from ..models.routes import CHOICE_NAMES
from ..oracle.results import OracleResult
from ..oracle.run import run_oracle_study, study_space
from ..utils.errors import UsageError
from ..utils.processes import process_state


def compute_oracle_targets(
    model,
    input_ids: torch.LongTensor,
    budgets: Sequence,
    output_dir: str | os.PathLike,
    *,
    route_options: Sequence[str] | None = None,
    causal: bool = False,
    batch_size: int = 8,
    chunk_tokens: int | None = None,
    data_id: str = "",
    model_id: str = "",
    progress: bool = True,
) -> OracleResult:
    """The oracle's per-token routes over ``input_ids`` (training blocks ``[N, T]``) for every budget in
    ``budgets``, from one enumeration; saved in ``output_dir`` as an oracle result and returned.

    A run already there with the same fingerprint resumes (or is read back when finished); ``causal`` adds the
    causally consistent oracle's routes. Every process returns the result.
    """
    space = study_space(model.config, list(budgets), route_options=route_options)
    was_training = model.training
    model.eval()
    try:
        run_oracle_study(
            model,
            input_ids,
            space,
            output_dir,
            batch_size=batch_size,
            causal=causal,
            chunk_tokens=chunk_tokens,
            model_id=model_id,
            data_id=data_id,
            progress=progress,
        )
    finally:
        model.train(was_training)
    process_state().wait_for_everyone()
    return OracleResult.load(output_dir)


def oracle_target_blocks(result: OracleResult, budget, causal: bool = False, source: str = "") -> datasets.Dataset:
    """Training rows of a router distilled from ``result`` under ``budget``: ``input_ids`` ``[T]``, ``routes``
    ``[T, layers]`` (the independent oracle's, or with ``causal`` the causal oracle's) and ``token_mask`` ``[T]``
    (tokens with a next token), as a torch-formatted `datasets.Dataset`."""
    label = f"big={budget}" if isinstance(budget, int) else str(budget)
    where = f"oracle targets {source!r}" if source else "oracle targets"
    if label not in result.budgets:
        raise UsageError(f"{where} hold budgets {result.budgets}, not {label!r}; compute them for that budget.")
    method = "causal_oracle" if causal else "oracle"
    if causal and "causal_index" not in result.tensors:
        raise UsageError(f"{where} hold no causal oracle's routes; compute them with the causal oracle.")
    routes = result.routes(label, method)
    return datasets.Dataset.from_dict(
        {
            "input_ids": result.tensors["input_ids"].tolist(),
            "routes": routes.tolist(),
            "token_mask": result.tensors["token_mask"].bool().tolist(),
        }
    ).with_format("torch")


def oracle_router_loss(
    router_probs: torch.Tensor, routes: torch.LongTensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of the routers' probabilities (``[batch, seq, layers, 3]``) at the oracle's ``routes``.

    Averaged over the layers and the counted tokens (``mask``, ``[batch, seq]``): each layer's router learns to
    predict the oracle's choice in that layer. ``label_smoothing`` spreads that share of the target uniformly
    over the choices the router allows (those with a non-zero probability).
    """
    log_p = torch.log(router_probs.clamp_min(torch.finfo(router_probs.dtype).tiny))
    chosen = log_p.gather(-1, routes.to(router_probs.device)[..., None]).squeeze(-1)  # [B, T, L]
    if label_smoothing:
        allowed = router_probs > 0
        uniform = (log_p * allowed).sum(-1) / allowed.sum(-1).clamp_min(1)
        chosen = (1 - label_smoothing) * chosen + label_smoothing * uniform
    weights = mask.to(chosen.device, chosen.dtype)[..., None].expand_as(chosen)
    return -(chosen * weights).sum() / weights.sum().clamp_min(1)


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


def _teacher_forced_probs(model, input_ids: torch.LongTensor, routes: torch.LongTensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, routes=routes, output_router_logits=True, logits_to_keep=1).router_logits
    finally:
        model.train(was_training)
    return router_probabilities(logits, router_temperature(model))


@torch.no_grad()
def calibrate_routers(model, input_ids: torch.LongTensor, routes: torch.LongTensor, mask: torch.Tensor) -> dict:
    """Shift each layer's router biases so that its hard choices match the oracle's per-layer shares.

    A router trained to predict the oracle's choice in its layer is a classifier, and the argmax of a classifier
    that is unsure favours the commoner class: under a budget of 1 BIG layer in 4, every layer may prefer small
    and hard routing then spends almost no BIG. On ``input_ids`` (training blocks) with the oracle's ``routes``
    (``[N, T, layers]``; ``mask`` ``[N, T]`` the tokens that count), the model teacher forced on those routes,
    each router's biases get offsets (`_match_fractions`) such that its argmax takes each choice as often as the
    oracle does in that layer. Returns the offsets per layer and the hard choice shares and agreement with the
    oracle before and after.
    """
    probs = _teacher_forced_probs(model, input_ids, routes)
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
    return {
        "blocks": int(input_ids.shape[0]),
        "oracle_shares": shares,
        "bias_offsets": offsets,
        "agreement_before": before,
        "agreement_after": router_agreement(_teacher_forced_probs(model, input_ids, routes), routes, mask),
    }


@contextmanager
def calibrated(model, input_ids: torch.LongTensor, routes: torch.LongTensor, mask: torch.Tensor) -> Iterator[dict]:
    """`calibrate_routers` for the time of a ``with`` block (an evaluation during training); the router biases
    are restored afterwards, so that training goes on from its own weights."""
    saved = [router.bias.detach().clone() for router in routers(model)]
    try:
        yield calibrate_routers(model, input_ids, routes, mask)
    finally:
        with torch.no_grad():
            for router, bias in zip(routers(model), saved):
                router.bias.copy_(bias)


def calibration_rows(blocks: datasets.Dataset, count: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``count`` rows of `oracle_target_blocks` as stacked ``input_ids``, ``routes``, ``token_mask``."""
    rows = blocks.select(range(min(count, len(blocks))))[:]
    return tuple(rows[key].to(device) for key in ("input_ids", "routes", "token_mask"))


def targets_folder(output_dir: str | os.PathLike) -> Path:
    """Where a router run that computes its own oracle targets keeps them."""
    return Path(output_dir) / "oracle_targets"


__all__ = [
    "calibrate_routers",
    "calibrated",
    "calibration_rows",
    "compute_oracle_targets",
    "oracle_router_loss",
    "oracle_target_blocks",
    "router_agreement",
    "targets_folder",
]
