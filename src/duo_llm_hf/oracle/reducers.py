"""Streaming reducers of the oracle: everything the study reports, from losses that stream out of the prefix tree.

The oracle's table ``loss[pattern, sequence, token]`` is never held whole. Each chunk of leaves of the prefix
tree (``m`` patterns, their losses ``[m, N, T]``) updates:

- per budget, the running per-token minimum and its argmin pattern (the oracle);
- per budget, the same over K patterns drawn at random (best-of-K, per token);
- per pattern, its loss summed over the tokens (the fixed strategy and best-of-K as one pattern are the argmins
  of these sums, taken when the results are read);
- the per-token losses of the all-small and all-big patterns (token difficulty).

Ties are broken towards the lowest pattern index whatever the order of the chunks, so chunked, resumed and
multi-process runs agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from ..models.routes import CHOICE_CODES
from .spaces import RouteSpace, pattern_index

NO_PATTERN = torch.iinfo(torch.long).max


class RunningMin:
    """Running minimum of losses over patterns and its argmin, per slot (budget) and element (token).

    Ties go to the lowest pattern index. ``loss`` / ``index``: ``[slots, ...]``; never-updated entries hold
    ``inf`` / ``NO_PATTERN``.
    """

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu"):
        self.loss = torch.full(tuple(shape), float("inf"), device=device)
        self.index = torch.full(tuple(shape), NO_PATTERN, dtype=torch.long, device=device)

    def update(
        self, slot: int, losses: torch.Tensor, indices: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold ``losses[m, ...]`` of patterns ``indices[m]`` (ascending) into ``slot``; ``allowed``
        (broadcastable to ``losses``) masks the (pattern, element) pairs the budget forbids. Returns where the
        minimum improved and the position in ``losses`` of the best pattern of this chunk."""
        m = losses.shape[0]
        values = losses if allowed is None else losses.masked_fill(~allowed, float("inf"))
        best = values.amin(0)
        hit = values == best
        if allowed is not None:
            hit &= allowed
        order = torch.arange(m, device=losses.device).view(-1, *([1] * (losses.dim() - 1)))
        # Indices ascend within a chunk, so the first hit is the lowest index.
        position = torch.where(hit, order, m).amin(0).clamp_max(m - 1)
        candidate = indices.to(losses.device)[position]
        loss, index = self.loss[slot], self.index[slot]
        better = torch.isfinite(best) & ((best < loss) | ((best == loss) & (candidate < index)))
        self.loss[slot] = torch.where(better, best, loss)
        self.index[slot] = torch.where(better, candidate, index)
        return better, position

    def merge(self, loss: torch.Tensor, index: torch.Tensor) -> None:
        """Fold in another running minimum (another process's, or another part of the tree)."""
        better = (loss < self.loss) | ((loss == self.loss) & (index < self.index))
        self.loss = torch.where(better, loss, self.loss)
        self.index = torch.where(better, index, self.index)


@dataclass
class BatchReduction:
    """What an oracle run over one batch of ``N`` sequences of ``T`` tokens leaves, for ``G`` budgets.

    ``oracle_loss`` / ``oracle_index`` ``[G, N, T]``: per token, the minimum loss over the budget's patterns and the
    index of the pattern reaching it. ``best_of_k_*``: the same over the K sampled patterns (None when K = 0).
    ``causal_*``: the causally consistent oracle (None unless requested). ``pattern_loss_sum`` ``[P]`` (float64):
    each enumerated pattern's loss summed over the tokens with a target; ``schedule_loss_sum`` ``[S, P]``: for each
    position-scheduled budget, summed only over the positions where the budget allows that pattern.
    ``uniform_loss`` ``[U, N, T]``: losses of the all-small / all-big patterns (``uniform_names``).
    ``token_mask`` ``[N, T]``: tokens with a target. Losses at tokens without one are 0.
    """

    token_mask: torch.Tensor
    oracle_loss: torch.Tensor
    oracle_index: torch.Tensor
    pattern_loss_sum: torch.Tensor
    schedule_loss_sum: torch.Tensor
    uniform_loss: torch.Tensor
    best_of_k_loss: torch.Tensor | None = None
    best_of_k_index: torch.Tensor | None = None
    causal_loss: torch.Tensor | None = None
    causal_index: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty fields, on the CPU (for saving)."""
        return {f.name: getattr(self, f.name).cpu() for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BatchReduction:
        return cls(**{f.name: tensors.get(f.name) for f in fields(cls)})

    @classmethod
    def combine(cls, parts: Sequence[BatchReduction]) -> BatchReduction:
        """Combine the reductions of processes that split one batch's pattern space between them.

        Minima merge by (loss, index), sums add (each pattern was evaluated by one process, zeros elsewhere),
        uniform losses come from whichever process evaluated that pattern. Exact: the result does not depend on
        how the space was split.
        """
        first = parts[0]
        out = {}
        for kind in ("oracle", "best_of_k", "causal"):
            if getattr(first, f"{kind}_loss") is None:
                out[f"{kind}_loss"] = out[f"{kind}_index"] = None
                continue
            running = RunningMin(first.oracle_loss.shape, first.oracle_loss.device)
            for part in parts:
                running.merge(getattr(part, f"{kind}_loss"), getattr(part, f"{kind}_index"))
            out[f"{kind}_loss"], out[f"{kind}_index"] = running.loss, running.index
        uniform = first.uniform_loss.clone()
        for part in parts[1:]:
            uniform = torch.where(torch.isnan(uniform), part.uniform_loss, uniform)
        return cls(
            token_mask=first.token_mask,
            pattern_loss_sum=sum(p.pattern_loss_sum for p in parts[1:]) + first.pattern_loss_sum,
            schedule_loss_sum=sum(p.schedule_loss_sum for p in parts[1:]) + first.schedule_loss_sum,
            uniform_loss=uniform,
            **out,
        )


class OracleReducer:
    """Feed it the losses of every pattern of a route space for one batch; it keeps only the reductions.

    Args:
        space: the route space; its budgets are the classes every reduction is reported for.
        token_mask: ``[N, T]`` bool, tokens with a target.
        best_of_k: K patterns drawn per budget (0: no best-of-K).
        seed: seed of the best-of-K draw.
        uniform: names of uniform patterns to keep per token (``"small"``, ``"big"``: all layers on that choice);
            they must be in the space (see ``RouteSpace(extra_classes=...)``).
        keep_logits: keep, per token, the logits of the oracle's pattern of the first budget (routing mode).
    """

    def __init__(
        self,
        space: RouteSpace,
        token_mask: torch.Tensor,
        best_of_k: int = 0,
        seed: int = 0,
        uniform: Sequence[str] = (),
        keep_logits: bool = False,
    ):
        self.space = space
        self.token_mask = token_mask
        device = token_mask.device
        num_budgets = len(space.budgets)
        shape = (num_budgets, *token_mask.shape)
        self.oracle = RunningMin(shape, device)
        self.best_of_k = RunningMin(shape, device) if best_of_k > 0 else None
        self.samples = space.sample(best_of_k, seed) if best_of_k > 0 else None
        self.pattern_loss_sum = torch.zeros(space.size, dtype=torch.float64, device=device)
        self.scheduled = [g for g, b in enumerate(space.budgets) if b.big_schedule is not None]
        self.schedule_loss_sum = torch.zeros(len(self.scheduled), space.size, dtype=torch.float64, device=device)
        self.uniform_names = list(uniform)
        self.uniform_index = [self._uniform_index(name) for name in self.uniform_names]
        self.uniform_loss = torch.full((len(uniform), *token_mask.shape), float("nan"), device=device)
        self.keep_logits = keep_logits
        self.logits: torch.Tensor | None = None

    def _uniform_index(self, name: str) -> int:
        code = torch.full((1, self.space.num_layers), CHOICE_CODES[name])
        index = int(pattern_index(code, self.space.choices))
        self.space.ranks(torch.tensor([index]))  # raises when the pattern is not enumerated
        return index

    def update(self, indices: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Fold in the losses ``[m, N, T]`` of patterns ``indices`` (``[m]``, ascending, each seen once per batch)."""
        seq_len = losses.shape[-1]
        ranks = self.space.ranks(indices)
        counts = self.space.counts[ranks]
        present = self.space.members[:, ranks]
        self.pattern_loss_sum[ranks.to(self.pattern_loss_sum.device)] = losses.double().sum((1, 2))
        for g in present.any(1).nonzero().squeeze(1).tolist():
            budget = self.space.budgets[g]
            rows = present[g].nonzero().squeeze(1)
            allowed = None
            if budget.big_schedule is not None:
                allowed = budget.allowed(counts[rows], seq_len).to(losses.device)[:, None, :]
                s = self.scheduled.index(g)
                masked = losses[rows.to(losses.device)] * allowed
                self.schedule_loss_sum[s, ranks[rows].to(losses.device)] = masked.double().sum((1, 2))
            chunk = losses[rows.to(losses.device)]
            better, position = self.oracle.update(g, chunk, indices[rows], allowed)
            if self.keep_logits and g == 0 and logits is not None:
                self._keep_logits(logits[rows.to(logits.device)], better, position)
            if self.best_of_k is not None:
                sampled = self.samples[g, ranks[rows]].nonzero().squeeze(1)
                if len(sampled):
                    sub = sampled.to(losses.device)
                    self.best_of_k.update(
                        g, chunk[sub], indices[rows][sampled], None if allowed is None else allowed[sub]
                    )
        for u, index in enumerate(self.uniform_index):
            hit = (indices == index).nonzero().squeeze(1)
            if len(hit):
                self.uniform_loss[u] = losses[hit.to(losses.device)[0]]

    def _keep_logits(self, logits: torch.Tensor, better: torch.Tensor, position: torch.Tensor) -> None:
        vocab = logits.shape[-1]
        flat = logits.reshape(logits.shape[0], -1, vocab)
        picked = flat.gather(0, position.reshape(1, -1, 1).expand(1, -1, vocab)).view(*better.shape, vocab)
        if self.logits is None:
            self.logits = torch.zeros_like(picked)
        self.logits = torch.where(better[..., None], picked, self.logits)

    def reduction(self) -> BatchReduction:
        """The reductions so far (complete once every pattern of the space, or of this process's part, was fed)."""
        return BatchReduction(
            token_mask=self.token_mask,
            oracle_loss=self.oracle.loss,
            oracle_index=self.oracle.index,
            pattern_loss_sum=self.pattern_loss_sum,
            schedule_loss_sum=self.schedule_loss_sum,
            uniform_loss=self.uniform_loss,
            best_of_k_loss=None if self.best_of_k is None else self.best_of_k.loss,
            best_of_k_index=None if self.best_of_k is None else self.best_of_k.index,
        )
