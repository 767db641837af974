"""The oracle at the depth of a real model: exact search at 30 layers against brute force, and the approximate
search (beam / greedy over the levels below all-BIG) against the exact search at every budget of a tiny model."""

import math

import pytest
import torch

from duo_llm_hf import BIG, SKIP, DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.oracle.engine import oracle_search, pattern_losses
from duo_llm_hf.oracle.results import OracleResult
from duo_llm_hf.oracle.run import study_space
from duo_llm_hf.oracle.search import (
    SearchSettings,
    gap_table,
    largest_gap,
    one_move_below,
    route_space_for,
    run_search,
    search_gap,
)
from duo_llm_hf.oracle.spaces import (
    PatternSet,
    RouteSpace,
    budget_size,
    choice_counts,
    parse_layer_budget,
    pattern_index,
    sample_budget,
)
from duo_llm_hf.utils.errors import UsageError
from tests.helpers import FLOAT_TOL

N_LAYERS, VOCAB = 8, 64
BUDGETS = [f"big={N_LAYERS - m}" for m in range(1, N_LAYERS + 1)]


def tiny_model(num_layers: int, seed: int = 0) -> DuoLlamaForCausalLM:
    torch.manual_seed(seed)
    config = DuoLlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, route_options=["big", "skip"],
        initializer_range=0.2,  # large weights: skipping a layer changes the losses a lot
    )
    return DuoLlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model(N_LAYERS)


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exact(model, blocks, tmp_path_factory):
    """The exact oracle at every budget of the tiny model, and its whole loss table."""
    search = SearchSettings("exact")
    space = route_space_for(model.config, BUDGETS, None, search)
    result = run_search(model, blocks, space, tmp_path_factory.mktemp("exact"), search, best_of_k=5, progress=False)
    _, table = pattern_losses(model, blocks, study_space(model.config, ["all"]))
    return result, table


def approximate(
    model, blocks, folder, method: str, width: int = 2, exact_dir=None, budgets=BUDGETS, **kwargs
) -> OracleResult:
    search = SearchSettings(method, width)
    space = route_space_for(model.config, budgets, None, search)
    return run_search(model, blocks, space, folder, search, exact_dir, best_of_k=5, progress=False, **kwargs)


def naive_losses(model, ids, patterns) -> torch.Tensor:
    """One full forward per pattern, every token on that pattern: ``[P, N, T]``."""
    with torch.no_grad():
        return torch.stack([model(ids, labels=ids, routes=p.expand(*ids.shape, -1)).token_losses for p in patterns])


@pytest.mark.numerics
def test_exact_search_at_30_layers_equals_brute_force():
    """A slice of the budgets that move up to two of 30 layers off all-BIG (466 patterns), searched by the prefix
    tree, against one forward per pattern; then the oracle, fixed and best-of-K of that slice."""
    model = tiny_model(30)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    space = RouteSpace.from_config(model.config, ["big=29", "big=28"])
    assert space.size == 30 + 435
    slice_ = space.patterns[torch.randperm(space.size, generator=torch.Generator().manual_seed(3))[:24]]
    naive = naive_losses(model, ids, slice_)
    _, table = pattern_losses(model, ids, space)
    rows = space.ranks(pattern_index(slice_, space.choices))
    assert (naive - table[rows]).abs().max() < FLOAT_TOL
    # The whole pipeline (tree walk, reducers) on the slice as a pattern set, against brute-force minima.
    picked = PatternSet(30, space.choices, ["big=29", "big=28"], slice_)
    found = oracle_search(model, ids, picked)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    for g, budget in enumerate(picked.budgets):
        inside = budget.matches(choice_counts(slice_))
        brute = naive[inside].amin(0)
        assert (found.oracle_loss[g][mask] - brute[mask]).abs().max() < FLOAT_TOL
    sums = naive.double().sum((1, 2))
    ranks = picked.ranks(_indices(picked, slice_))
    assert (found.pattern_loss_sum[ranks] - sums).abs().max() < 1e-4


def _indices(space, patterns):
    return pattern_index(patterns, space.choices)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["beam", "greedy"])
def test_approximate_search_never_beats_exact_and_its_gap_is_measured(model, blocks, exact, tmp_path, method):
    exact_result, table = exact
    exact_result.save(tmp_path / "exact")
    result = approximate(model, blocks, tmp_path / method, method, exact_dir=tmp_path / "exact")
    all_space = study_space(model.config, ["all"])
    mask = result.tensors["token_mask"].bool()
    for g, label in enumerate(BUDGETS):
        space = result.space
        members = space.patterns[space.members[g]]
        # every searched pattern is in the budget; level 1 searches all of it (exact), later levels fewer
        assert bool(parse_layer_budget(label).matches(choice_counts(members)).all())
        assert space.budget_full_sizes()[g] == budget_size(N_LAYERS, space.choices, space.budgets[g])
        if g == 0:
            assert len(members) == N_LAYERS
        # the approximate oracle is the brute-force minimum over the patterns it searched ...
        brute = table[all_space.ranks(_indices(all_space, members))].amin(0)
        assert (result.tensors["oracle_loss"][g][mask] - brute[mask]).abs().max() < FLOAT_TOL
        # ... so never below the exact oracle, and fixed never below the exact best pattern
        assert bool((result.tensors["oracle_loss"][g] >= exact_result.tensors["oracle_loss"][g] - FLOAT_TOL).all())
        assert result.mean_loss("fixed", label) >= exact_result.mean_loss("fixed", label) - FLOAT_TOL
    gap = result.meta["search_gap"]
    assert list(gap) == BUDGETS
    assert gap["big=7"]["oracle"]["ratio"] == pytest.approx(1.0, abs=1e-6)  # level 1 is exact
    assert all(row["oracle"]["ratio"] >= 1 - 1e-6 and row["fixed"]["ratio"] >= 1 - 1e-6 for row in gap.values())
    # the search missed something somewhere: a gap that is always 1 would measure nothing here
    assert max(row["oracle"]["ratio"] for row in gap.values()) > 1.01
    assert "big=4" in gap_table(gap)
    worst = largest_gap(gap)["oracle"]
    assert worst["ratio"] == max(row["oracle"]["ratio"] for row in gap.values()) and worst["budget"] in gap
    # saved with the result and loaded back, with how it was searched
    loaded = OracleResult.load(tmp_path / method)
    assert loaded.meta["search"]["method"] == method
    assert loaded.summary() == result.summary()
    assert loaded.meta["search_gap"]["big=4"] == gap["big=4"]


@pytest.mark.numerics
def test_a_beam_wide_enough_is_the_exact_search(model, blocks, exact, tmp_path):
    exact_result, _ = exact
    result = approximate(model, blocks, tmp_path / "wide", "beam", width=math.comb(N_LAYERS, N_LAYERS // 2))
    for g, label in enumerate(BUDGETS):
        assert int(result.space.members[g].sum()) == result.space.budget_full_sizes()[g]
        assert (result.tensors["oracle_loss"][g] - exact_result.tensors["oracle_loss"][g]).abs().max() < FLOAT_TOL
        assert result.fixed_pattern(label) == exact_result.fixed_pattern(label)


def test_best_of_k_draws_from_the_whole_budget(model, blocks, tmp_path):
    result = approximate(model, blocks, tmp_path / "greedy", "greedy")
    samples = result.tensors["best_of_k_samples"]
    for g, label in enumerate(BUDGETS):
        drawn = result.space.patterns[samples[g]]
        assert len(drawn) == min(5, math.comb(N_LAYERS, int(label.split("=")[1])))
        assert bool(result.space.budgets[g].matches(choice_counts(drawn)).all())
    # large budgets are sampled without being enumerated: 30 layers, 8 skipped (5.9 million patterns)
    budget = parse_layer_budget("big=22")
    drawn = sample_budget(30, (BIG, SKIP), budget, 100, seed=0)
    assert len(torch.unique(_indices(RouteSpace(1, ["big", "skip"]), drawn))) == 100
    assert bool((choice_counts(drawn)[:, SKIP] == 8).all())
    assert torch.equal(drawn, sample_budget(30, (BIG, SKIP), budget, 100, seed=0))


def test_interrupted_beam_resumes_to_the_same_result(model, blocks, tmp_path):
    settings = {"budgets": ["big=7", "big=5"], "batch_size": 1, "causal": True}  # levels 1 to 3
    whole = approximate(model, blocks, tmp_path / "whole", "beam", **settings)
    calls = 0
    while (result := approximate(model, blocks, tmp_path / "parts", "beam", stop_after_batches=2, **settings)) is None:
        calls += 1
    assert calls >= 2
    assert whole.tensors.keys() == result.tensors.keys()
    for name, tensor in whole.tensors.items():
        assert torch.equal(tensor, result.tensors[name]), name
    assert "causal_loss" in result.tensors


def test_one_move_below_and_budget_checks(model):
    beam = torch.tensor([[BIG, BIG, SKIP], [SKIP, BIG, BIG]])
    children = one_move_below(beam, (BIG, SKIP))
    assert children.tolist() == [[BIG, SKIP, SKIP], [SKIP, BIG, SKIP], [SKIP, SKIP, BIG]]
    with pytest.raises(ValueError, match="fix the number of BIG layers"):
        route_space_for(model.config, ["all"], None, SearchSettings("beam"))
    with pytest.raises(ValueError, match="varies with position"):
        route_space_for(model.config, ["6:2"], None, SearchSettings("greedy"))
    with pytest.raises(ValueError, match="beam width"):
        SearchSettings("beam", 0)


def test_gap_needs_the_same_blocks(model, blocks, exact, tmp_path):
    exact_result, _ = exact
    other = OracleResult(exact_result.space, {**exact_result.tensors, "input_ids": blocks + 1}, exact_result.meta)
    with pytest.raises(UsageError, match="different token blocks"):
        search_gap(other, exact_result)
