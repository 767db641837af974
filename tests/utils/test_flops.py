"""The FLOP model against FLOPs counted by torch, and the dense baseline's matched inner size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from duo_llm_hf import BIG, SKIP, SMALL, dense_intermediate_size, flops_per_token, pattern_flops
from duo_llm_hf.utils.flops import choice_cost, ffn_flops


def counted_flops(model, ids, routes) -> int:
    with FlopCounterMode(display=False) as counter:
        model(ids, routes=routes)
    return counter.get_total_flops()


def test_ffn_flops_match_counted_flops_and_dispatch_saves_them(tiny_model):
    model = tiny_model(route_options=["small", "big", "skip"])
    config = model.config
    ids = torch.randint(3, 96, (2, 10))
    n_tokens, n_layers = ids.numel(), config.num_hidden_layers
    base = counted_flops(model, ids, torch.full((2, 10, n_layers), SKIP))
    for choice in (BIG, SMALL):
        extra = counted_flops(model, ids, torch.full((2, 10, n_layers), choice)) - base
        assert extra == pytest.approx(ffn_flops(config, choice) * n_tokens * n_layers)
    routes = torch.randint(0, 3, (2, 10, n_layers), generator=torch.Generator().manual_seed(0))
    expected = sum(ffn_flops(config, c) * int((routes == c).sum()) for c in (BIG, SMALL))
    assert counted_flops(model, ids, routes) - base == pytest.approx(expected)


def test_flops_per_token_parts(tiny_config):
    config = tiny_config()
    count = flops_per_token(config, {"small": 0.25, "big": 0.75}, seq_len=16)
    d, big, small = config.hidden_size, config.intermediate_size, config.small_intermediate_size
    assert count.ffn == pytest.approx(config.num_hidden_layers * 2 * 3 * d * (0.75 * big + 0.25 * small))
    assert count.lm_head == 2 * d * config.vocab_size
    assert count.total == pytest.approx(count.attention + count.ffn + count.lm_head)
    assert choice_cost(config, "small") == small / big and choice_cost(config, SKIP) == 0
    assert pattern_flops(config, [BIG, BIG, SMALL], 16).ffn == pytest.approx(
        flops_per_token(config, {"big": 2 / 3, "small": 1 / 3}, 16).ffn
    )


def test_dense_baseline_matches_duo_flops(tiny_config):
    config = tiny_config(intermediate_size=256, small_intermediate_size=16)
    for p_big in (0.0, 0.25, 0.5, 0.75, 1.0):
        fractions = {"big": p_big, "small": 1 - p_big}
        inner = dense_intermediate_size(config, fractions)
        assert inner == round(p_big * 256 + (1 - p_big) * 16)
        dense_ffn = 2 * 3 * config.hidden_size * inner
        assert dense_ffn == pytest.approx(
            flops_per_token(config, fractions).ffn / config.num_hidden_layers, rel=0.01
        )


def test_bad_route_fractions(tiny_config):
    with pytest.raises(ValueError, match="sum to 1"):
        flops_per_token(tiny_config(), {"big": 0.7, "small": 0.7})
