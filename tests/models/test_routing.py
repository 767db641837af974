"""Route choices, config validation and random routing."""

from __future__ import annotations

import math

import pytest
import torch

from duo_llm_hf import (
    BIG,
    ROUTING_MODES,
    SKIP,
    SMALL,
    UNIFORM_PATTERNS,
    DuoLlamaConfig,
    RouteSampler,
    parse_pattern,
    parse_routing,
    pattern_to_str,
    route_fractions,
)
from tests.helpers import tiny_llama_kwargs


def test_choice_codes_are_public_and_distinct():
    assert (SMALL, BIG, SKIP) == (0, 1, 2)
    assert parse_pattern("sB-") == [SMALL, BIG, SKIP]
    assert parse_pattern(["big", "small", 2]) == [BIG, SMALL, SKIP]
    assert pattern_to_str([SMALL, BIG, SKIP]) == "sB-"


def test_one_routing_vocabulary():
    assert ROUTING_MODES == ("random", "fixed", "explicit", "learned", "oracle")
    assert sorted(UNIFORM_PATTERNS) == ["all-big", "all-skip", "all-small"]
    assert parse_routing("learned", 4) == ("learned", None)
    assert parse_routing("oracle", 4) == ("oracle", None)
    assert parse_routing("all-big", 3) == ("fixed", [BIG, BIG, BIG])
    assert parse_routing("all-skip", 2) == ("fixed", [SKIP, SKIP])
    with pytest.raises(ValueError, match="all-small"):
        parse_routing("dense", 2)


def test_config_routing_takes_every_mode_but_the_oracle(tiny_config):
    for mode in ("random", "explicit", "learned"):
        assert tiny_config(routing=mode).routing == mode
    with pytest.raises(ValueError, match="routing"):
        tiny_config(routing="oracle")


def test_config_defaults(tiny_config):
    config = DuoLlamaConfig(**tiny_llama_kwargs(intermediate_size=64))
    assert config.small_intermediate_size == 64 // 16
    assert config.route_options == ["small", "big"]
    assert config.route_probs == {"small": 0.5, "big": 0.5}
    assert config.routing == "random"
    skip = tiny_config(route_options=["skip", "big"])
    assert skip.route_options == ["big", "skip"]  # canonical order


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"small_intermediate_size": 0}, "small_intermediate_size", "1..64"),
        ({"small_intermediate_size": 65}, "small_intermediate_size", "1..64"),
        ({"route_options": []}, "route_options", "non-empty"),
        ({"route_options": ["small", "huge"]}, "route_options", "'huge'"),
        ({"routing": "greedy"}, "routing", "'greedy'"),
        ({"route_probs": {"small": 0.7, "big": 0.7}}, "route_probs", "sum to 1"),
        ({"route_probs": {"small": -0.5, "big": 1.5}}, "route_probs", ">= 0"),
        ({"route_probs": {"skip": 0.5, "big": 0.5}}, "route_probs", "'skip'"),
        ({"routing": "fixed"}, "pattern", "one choice per layer"),
        ({"routing": "fixed", "pattern": "sB"}, "pattern", "3 layers"),
        ({"routing": "fixed", "pattern": "sB-"}, "pattern", "['skip']"),
        ({"pattern": "sBx"}, "pattern", "'x'"),
        ({"route_seed": -1}, "route_seed", "non-negative"),
    ],
)
def test_config_rejects_bad_fields_with_clear_errors(tiny_config, overrides, field, hint):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    message = str(info.value)
    assert field in message and hint in message


def test_fixed_pattern_stored_as_codes(tiny_config):
    config = tiny_config(routing="fixed", pattern="sBs")
    assert config.pattern == [SMALL, BIG, SMALL]


def test_random_routing_realises_route_probs_and_is_seeded():
    probs = {"small": 0.2, "big": 0.5, "skip": 0.3}
    routes = RouteSampler(probs, seed=7).sample((64, 128, 4))
    n = routes.numel()
    fractions = route_fractions(routes)
    for name, p in probs.items():
        assert abs(fractions[name] - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(routes, RouteSampler(probs, seed=7).sample((64, 128, 4)))
    assert not torch.equal(routes, RouteSampler(probs, seed=8).sample((64, 128, 4)))


def test_route_sampler_state_round_trip():
    sampler = RouteSampler({"small": 0.5, "big": 0.5}, seed=3)
    sampler.sample((4, 4))
    state = sampler.state_dict()
    expected = sampler.sample((4, 4))
    other = RouteSampler({"small": 0.5, "big": 0.5}, seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.sample((4, 4)), expected)


def test_model_random_routing_reproducible_with_seed(tiny_model):
    ids = torch.randint(3, 96, (2, 12))
    a = tiny_model(route_seed=5)(ids).routes
    b = tiny_model(route_seed=5)(ids).routes
    c = tiny_model(route_seed=6)(ids).routes
    assert torch.equal(a, b) and not torch.equal(a, c)
