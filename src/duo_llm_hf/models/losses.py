"""Per-token causal LM losses, shared by the model, the oracle and the analyses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
