"""The losses of a Duo model: per-token causal LM losses (shared by the model, the oracle and the analyses) and
the routers' usage loss (the paper's budget loss: the model's `aux_loss`, and the second term of router training).

A router's *target usage* is a target fraction of the (token, layer) pairs per choice (`parse_target_usage`); a
*budget* is the oracle's, and counts layers per pattern instead (`duo_llm_hf.oracle.spaces`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .routed_ffn import router_probabilities
from .routes import CHOICE_CODES, CHOICE_NAMES, choice_code, choice_values

IGNORE_INDEX = -100


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each position's prediction of the next label.

    ``logits``: ``[..., seq, vocab]``; ``labels``: ``[..., seq]`` (the input ids, as in transformers). Returns
    ``(losses, mask)`` of shape ``[..., seq]``: position ``t`` holds the loss of predicting ``labels[t + 1]``;
    positions with no target (the last one, and ignored labels) have loss 0 and mask False.
    """
    targets = next_token_targets(labels, ignore_index)
    return target_losses(logits, targets, ignore_index), targets != ignore_index


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label each position predicts: ``labels`` shifted left by one, ``ignore_index`` at the last position."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def target_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of ``logits`` (``[..., vocab]``) against shifted ``targets`` (``[...]``); 0 where ignored."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction="none",
    ).view(targets.shape)


def mean_loss(
    losses: torch.Tensor, mask: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the positions that have a target (or the sum over ``num_items_in_batch``, as transformers does)."""
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(losses.device)
    return losses.sum() / denominator


def parse_target_usage(
    target_usage: float | Mapping[str | int, float], route_options: Sequence[str] | None = None
) -> dict[int, float]:
    """Normalise a router's target usage to ``{choice code: target fraction of the (token, layer) pairs}``.

    A number is the target fraction of BIG (the paper's budget); a mapping gives a target per choice (names or
    codes). Targets lie in [0, 1]; a mapping over every allowed choice must sum to 1; with ``route_options``,
    every choice must be allowed.
    """
    if isinstance(target_usage, Mapping):
        if not target_usage:
            raise ValueError(
                "target_usage: {} is empty; give a BIG fraction such as 0.3 or a target per choice."
            )
        targets = choice_values(target_usage.items(), "target_usage", dict(target_usage))
    else:
        targets = {CHOICE_CODES["big"]: target_usage}
    for code, value in targets.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"target_usage: target {value!r} for {CHOICE_NAMES[code]!r} must be a number in [0, 1]."
            )
    if route_options is not None:
        allowed = {choice_code(c, "route_options") for c in route_options}
        outside = sorted(CHOICE_NAMES[c] for c in targets if c not in allowed)
        if outside:
            given = dict(target_usage) if isinstance(target_usage, Mapping) else target_usage
            raise ValueError(
                f"target_usage: {given!r} sets targets for {outside}, which route_options {list(route_options)} "
                "does not allow."
            )
        if set(targets) == allowed and abs(sum(targets.values()) - 1.0) > 1e-6:
            named = {CHOICE_NAMES[c]: v for c, v in targets.items()}
            raise ValueError(
                f"target_usage: targets {named} cover every allowed choice and must sum to 1 (they sum to "
                f"{sum(targets.values()):g})."
            )
    return {code: float(v) for code, v in sorted(targets.items())}


def usage_loss(
    router_logits: torch.Tensor,
    target_usage: float | Mapping[str | int, float],
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""The paper's budget loss, per sequence, averaged over the batch: how far the routers' usage of each choice
    is from its target usage.

    ``router_logits``: ``[batch, seq, layers, 3]`` (the model's ``router_logits``, choice-code layout), turned
    into the routers' probabilities ``P = softmax(logits / temperature)`` (pass the routers' temperature);
    ``mask``: ``[batch, seq]``, True for the tokens that count (e.g. the attention mask; padding excluded).
    For sequence ``b`` and each choice ``x`` with a target usage ``u_x`` (see `parse_target_usage`; a number
    is the BIG target):

    .. math::
        f_{b,x} = \frac{1}{L\,|T_b|} \sum_{t \in T_b} \sum_{l=1}^{L} P_{b,t,l,x}, \qquad
        \mathcal{L}_{usage} = \frac{1}{B'} \sum_{b} \sum_{x} (f_{b,x} - u_x)^2

    where ``T_b`` are the counted tokens of sequence ``b`` and ``B'`` the number of sequences with at least
    one counted token (a batch with none gives 0). With one target (BIG) this is the paper's
    ``(sum_l P_{l,big} / L - budget)^2`` with P_big averaged over the sequence's tokens before the square (a
    target per sequence: single tokens may spend more or less); with several choices it is one such term per
    choice. It is 0 exactly when every sequence's mean usage meets its targets.
    """
    if router_logits.dim() != 4 or router_logits.shape[-1] != len(CHOICE_NAMES):
        raise ValueError(
            f"router_logits: expected shape [batch, seq, layers, {len(CHOICE_NAMES)}], got "
            f"{tuple(router_logits.shape)}."
        )
    router_probs = router_probabilities(router_logits, temperature)
    targets = parse_target_usage(target_usage)
    batch, seq = router_probs.shape[:2]
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=router_probs.device)
    elif tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match [batch, seq] = {[batch, seq]}.")
    weights = mask.to(router_probs.device, router_probs.dtype)
    tokens = weights.sum(1)  # [B]
    # Mean over layers first, then over the sequence's counted tokens.
    per_token = router_probs.mean(dim=2)  # [B, T, 3]
    usage = (per_token * weights[..., None]).sum(1) / tokens.clamp_min(1)[:, None]  # [B, 3]
    codes = list(targets)
    target = torch.tensor([targets[c] for c in codes], device=usage.device, dtype=usage.dtype)
    per_sequence = ((usage[:, codes] - target) ** 2).sum(-1)  # [B]
    has_tokens = tokens > 0
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp_min(1)


def parse_budget_fractions(budget, route_options=None) -> dict[int, float]:
    """Deprecated name of `parse_target_usage` (removed in 0.3)."""
    warnings.warn("parse_budget_fractions is deprecated; use parse_target_usage.", FutureWarning, stacklevel=2)
    return parse_target_usage(budget, route_options)


def budget_loss(router_logits, budget, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Deprecated name of `usage_loss` (removed in 0.3)."""
    warnings.warn("budget_loss is deprecated; use usage_loss.", FutureWarning, stacklevel=2)
    return usage_loss(router_logits, budget, mask, temperature)
