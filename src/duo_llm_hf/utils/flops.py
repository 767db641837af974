"""FLOP model of the Duo architecture (forward pass, multiply-adds counted as 2 FLOPs).

Used by the budgets (FFN compute of a pattern), the benchmarks (predicted savings) and the dense baselines (an
inner size matched to a Duo model's FLOPs). Training costs about 3x the forward figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..models.routes import BIG, CHOICE_NAMES, SMALL, choice_code, choice_values


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, split by part of the model."""

    attention: float
    ffn: float
    lm_head: float
    router: float = 0.0

    @property
    def total(self) -> float:
        return self.attention + self.ffn + self.lm_head + self.router


def _ffn_matrices(config) -> int:
    # Llama's gated MLP has three projections (gate, up, down); OPT's fc1/fc2 has two. The big inner size is
    # `intermediate_size` everywhere: DuoOPTConfig aliases it to OPT's ffn_dim.
    return 3 if getattr(config, "model_type", "").endswith("llama") else 2


def ffn_inner_size(config, choice: int | str) -> int:
    """Inner size of the module that serves a choice (0 for SKIP)."""
    code = choice_code(choice)
    # Read only the size the choice needs, so a dense config (no small_intermediate_size) works for BIG.
    if code == BIG:
        return config.intermediate_size
    return config.small_intermediate_size if code == SMALL else 0


def ffn_flops(config, choice: int | str) -> float:
    """Forward FLOPs per token of one layer's FFN under one choice."""
    return 2.0 * _ffn_matrices(config) * config.hidden_size * ffn_inner_size(config, choice)


def choice_cost(config, choice: int | str) -> float:
    """FFN compute of a choice in units of the big FFN (BIG = 1, SMALL = small/big inner size, SKIP = 0)."""
    return ffn_inner_size(config, choice) / config.intermediate_size


def attention_flops(config, seq_len: int) -> float:
    """Forward FLOPs per token of one layer's attention: projections plus scores and values over ``seq_len``."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    kv_dim = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    projections = 2.0 * hidden * (2 * q_dim + 2 * kv_dim)
    # Causal attention: a token attends to (seq_len + 1) / 2 positions on average.
    scores = 2.0 * 2.0 * q_dim * (seq_len + 1) / 2
    return projections + scores


def flops_per_token(
    config,
    route_fractions: Mapping[str | int, float] | None = None,
    seq_len: int | None = None,
    router: bool = False,
) -> FlopCount:
    """Forward FLOPs per token of a Duo model.

    ``route_fractions`` maps each choice to the fraction of (token, layer) pairs that take it (default: the
    config's ``route_probs``); it must sum to 1. ``seq_len`` defaults to ``max_position_embeddings``.
    """
    fractions = _fractions(route_fractions if route_fractions is not None else config.route_probs)
    n_layers = config.num_hidden_layers
    seq_len = seq_len or config.max_position_embeddings
    ffn = n_layers * sum(frac * ffn_flops(config, code) for code, frac in fractions.items())
    n_choices = len(getattr(config, "route_options", CHOICE_NAMES))
    return FlopCount(
        attention=n_layers * attention_flops(config, seq_len),
        ffn=ffn,
        lm_head=_lm_head_flops(config),
        router=2.0 * n_layers * config.hidden_size * n_choices if router else 0.0,
    )


def _lm_head_flops(config) -> float:
    # OPT models such as opt-350m project hidden states to word_embed_proj_dim around the decoder
    # (project_in / project_out) and their head reads the projected size; counted here with the head.
    hidden = config.hidden_size
    proj = getattr(config, "word_embed_proj_dim", None) or hidden
    projections = 0.0 if proj == hidden else 2.0 * 2.0 * hidden * proj
    return 2.0 * proj * config.vocab_size + projections


def pattern_flops(config, pattern: Sequence[int], seq_len: int | None = None) -> FlopCount:
    """Forward FLOPs per token when every token follows one pattern."""
    counts = {
        code: sum(1 for c in pattern if int(c) == code) / len(pattern) for code in range(len(CHOICE_NAMES))
    }
    return flops_per_token(config, counts, seq_len)


def dense_intermediate_size(config, route_fractions: Mapping[str | int, float]) -> int:
    """Inner size of a dense FFN whose FLOPs equal the Duo FFN's expected FLOPs under ``route_fractions``."""
    fractions = _fractions(route_fractions)
    return max(1, round(sum(frac * ffn_inner_size(config, code) for code, frac in fractions.items())))


def _fractions(route_fractions: Mapping[str | int, float]) -> dict[int, float]:
    pairs = choice_values(route_fractions.items(), "route_fractions", dict(route_fractions))
    fractions = {code: float(v) for code, v in pairs.items()}
    total = sum(fractions.values())
    if any(v < 0 for v in fractions.values()) or abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"route_fractions: {dict(route_fractions)!r} must be non-negative and sum to 1 (got {total:g})."
        )
    return fractions
