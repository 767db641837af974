"""What the BIG-or-SKIP study of a pretrained model reads off its loss table: per number of FFNs moved off all-BIG,
the oracle, the best fixed pattern, best-of-K random patterns (one K, and the whole curve K = 1 .. size of the
budget), bootstrap intervals over blocks, the oracle's layer usage and token difficulty's skip analogue.

The table is ``loss[pattern, block, position]`` over every pattern that moves at most a few layers off all-BIG
(`oracle.engine.pattern_losses`), small enough to hold whole: 466 patterns for two layers of 30. Every function
here is plain tensor arithmetic on that table, so the report's numbers can be checked on synthetic tables.
"""

from __future__ import annotations

import math

import torch

from ..models.losses import IGNORE_INDEX, next_token_targets
from ..models.routes import BIG, SKIP


def token_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Tokens with a next-token target (every position but the last of a block)."""
    return next_token_targets(input_ids) != IGNORE_INDEX


def moved_counts(patterns: torch.Tensor) -> torch.Tensor:
    """``[P]``: how many layers each pattern moves off BIG (to SKIP, or to SMALL where the space allows it)."""
    return (patterns != BIG).sum(-1)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the tokens with a target (``losses[..., N, T]``, ``mask[N, T]``), float64."""
    mask = mask.to(torch.float64)
    return (losses.double() * mask).sum((-2, -1)) / mask.sum()


def method_losses(table: torch.Tensor, members: torch.Tensor, mask: torch.Tensor, best_of_k: int, seed: int) -> dict:
    """Per-token losses ``[N, T]`` of the methods of one budget (the patterns flagged by ``members`` ``[P]``):
    ``oracle`` (per-token minimum), ``fixed`` (the pattern with the lowest mean loss) and ``best_of_k`` (the
    per-token minimum over ``best_of_k`` patterns drawn without replacement, seeded; all of them when the budget
    has fewer; left out when ``best_of_k`` is 0). Also ``fixed_index`` and ``oracle_index`` (pattern rows of
    ``table``)."""
    rows = members.nonzero().flatten()
    sub = table[rows]
    means = masked_mean(sub, mask)
    fixed = int(rows[int(means.argmin())])
    oracle_loss, oracle_arg = sub.min(0)
    out = {"oracle": oracle_loss, "oracle_index": rows[oracle_arg], "fixed": table[fixed], "fixed_index": fixed}
    if best_of_k:
        generator = torch.Generator().manual_seed(seed)
        drawn = rows[torch.randperm(len(rows), generator=generator)[: min(best_of_k, len(rows))]]
        out["best_of_k"] = table[drawn].min(0).values
    return out


def expected_best_of_k(table: torch.Tensor, members: torch.Tensor, mask: torch.Tensor, ks: list[int]) -> list[float]:
    """The per-token best of ``K`` patterns drawn at random (without replacement) from a budget, as its expected
    mean loss, exactly, for each ``K`` of ``ks``: the ``i``-th smallest of ``N`` losses is the minimum of ``K``
    draws with probability ``C(N - i, K - 1) / C(N, K)``. K = 1 is a random pattern, K = N the oracle."""
    sub = table[members.nonzero().flatten()].double()
    ordered = sub.sort(0).values
    n = ordered.shape[0]
    out = []
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"best-of-K: K={k} is outside 1 .. {n}, the patterns of the budget.")
        # log C(n - i, k - 1) - log C(n, k) for i = 1 .. n (zero weight once n - i < k - 1).
        i = torch.arange(1, n + 1, dtype=torch.float64)
        log_w = _log_comb(n - i, _f64(k - 1)) - _log_comb(_f64(n), _f64(k))
        weights = torch.where(n - i >= k - 1, log_w.exp(), torch.zeros_like(log_w))
        expected = (weights[:, None, None] * ordered).sum(0)
        out.append(float(masked_mean(expected, mask)))
    return out


def _f64(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64)


def _log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    n = n.clamp_min(k)  # the weight is masked out where n < k; keep lgamma finite there
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def curve_ks(size: int, points: int = 24) -> list[int]:
    """K values for a best-of-K curve from 1 to ``size``: every K up to 32, else about ``points`` log-spaced."""
    if size <= 32:
        return list(range(1, size + 1))
    ks = {round(math.exp(x * math.log(size) / (points - 1))) for x in range(points)}
    return sorted(k for k in ks | {1, size} if 1 <= k <= size)


def log_interpolate(points: dict[int, float], x: float) -> float:
    """The perplexity at ``x`` (a fractional number of layers moved, within the range of ``points``) from the
    perplexities measured at whole numbers ``points``: linear in log perplexity between the nearest two."""
    low = max(m for m in points if m <= x)
    high = min(m for m in points if m >= x)
    share = (x - low) / (high - low) if high > low else 0.0
    return math.exp(math.log(points[low]) + share * (math.log(points[high]) - math.log(points[low])))


def bootstrap_ppl(losses: torch.Tensor, mask: torch.Tensor, samples: int = 1000, seed: int = 0) -> dict:
    """Perplexity of per-token ``losses`` ``[N, T]`` with a 95% bootstrap interval over blocks: ``samples``
    resamples of the ``N`` blocks with replacement, each block's summed loss and token count kept together."""
    mask = mask.double()
    sums, counts = (losses.double() * mask).sum(-1), mask.sum(-1)
    ppl = math.exp(float(sums.sum() / counts.sum()))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(sums), (samples, len(sums)), generator=generator)
    resampled = (sums[picks].sum(-1) / counts[picks].sum(-1)).exp()
    low, high = torch.quantile(resampled, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ppl": ppl, "low": low, "high": high}


def skip_usage(patterns: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, choice: int = SKIP) -> list[float]:
    """Per layer, the share of tokens (with a target) whose chosen pattern (``index`` ``[N, T]``, rows of
    ``patterns``) takes ``choice`` there (SKIP: skips that layer's FFN)."""
    skipped = (patterns[index] == choice).double()  # [N, T, L]
    weights = mask.double()[..., None]
    return ((skipped * weights).sum((0, 1)) / weights.sum()).tolist()


def skip_center(usage: list[float]) -> float:
    """Mean layer index (0 = first) of the skipped FFNs, weighted by ``usage``."""
    total = sum(usage)
    return sum(i * u for i, u in enumerate(usage)) / total if total else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties share their average rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def difficulty(cheap: torch.Tensor, oracle: torch.Tensor, full: torch.Tensor, mask: torch.Tensor, top=0.1) -> dict:
    """Token difficulty's skip analogue: the cheap model's loss (the best fixed pattern with the most FFNs
    skipped) against the gap ``cheap - oracle`` (what per-token choice of the skipped FFNs buys), and the full
    model's (all-BIG) loss against the same gap; Spearman and the overlap of the top 10% under each ranking."""
    keep = mask.bool()
    cheap, oracle, full = cheap[keep].double(), oracle[keep].double(), full[keep].double()
    gap = cheap - oracle
    n_top = max(1, int(top * cheap.numel()))
    top_gap = set(gap.topk(n_top).indices.tolist())
    return {
        "tokens": int(cheap.numel()),
        "spearman_cheap_vs_gap": spearman(cheap, gap),
        "top_decile_overlap": len(set(cheap.topk(n_top).indices.tolist()) & top_gap) / n_top,
        "spearman_all_big_vs_gap": spearman(full, gap),
    }
