"""The oracle engine: route spaces, prefix tree vs naive forwards, reducers vs brute force, routing mode."""

import itertools

import pytest
import torch

from duo_llm_hf import BIG, SKIP, SMALL, DuoLlamaConfig, DuoLlamaForCausalLM, pattern_flops
from duo_llm_hf.oracle.engine import causal_oracle, oracle_search, pattern_losses, tree_flops
from duo_llm_hf.oracle.reducers import BatchReduction
from duo_llm_hf.oracle.results import OracleResult
from duo_llm_hf.oracle.spaces import (
    RouteSpace,
    UnevenLayerBudget,
    index_to_pattern,
    layer_budget_of_fractions,
    parse_layer_budget,
    pattern_index,
)
from tests.helpers import FLOAT_TOL, assert_same_choice, assert_same_search, budget_table, decided, to_ranks

N_LAYERS, VOCAB = 4, 64



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = DuoLlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, route_options=["small", "big", "skip"],
        initializer_range=0.2,  # large weights: the routes change the losses a lot
    )
    return DuoLlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
    labels = ids.clone()
    labels[1, 4] = -100  # a position without a target in the middle
    return ids, labels


def naive_table(model, ids, labels, space):
    """One full forward per pattern, every token on that pattern."""
    with torch.no_grad():
        return torch.stack(
            [model(ids, labels=labels, routes=p.expand(*ids.shape, -1)).token_losses for p in space.patterns]
        )


SPACES = [
    (["small", "big"], "all"),
    (["small", "big", "skip"], "all"),
    (["big", "skip"], "all"),
    (["small", "big"], 2),
    (["small", "big", "skip"], {"big": 1, "skip": 2}),
    (["small", "big"], "3:1"),
]


@pytest.mark.numerics
@pytest.mark.parametrize("choices,budget", SPACES)
def test_prefix_tree_equals_naive_forwards(model, batch, choices, budget):
    ids, labels = batch
    space = RouteSpace(N_LAYERS, choices, [budget])
    patterns, table = pattern_losses(model, ids, space, labels=labels, chunk_tokens=50)
    assert torch.equal(patterns, space.patterns)
    # The tree batches prefixes; a naive forward runs one pattern: other shapes, float rounding.
    torch.testing.assert_close(table, naive_table(model, ids, labels, space), rtol=0, atol=FLOAT_TOL)


def test_route_space_sizes_and_numbering():
    assert RouteSpace(12, ["small", "big"]).size == 2**12
    assert RouteSpace(6, ["small", "big", "skip"]).size == 3**6
    assert RouteSpace(12, ["small", "big"], [4]).size == 495  # C(12, 4)
    assert RouteSpace(12, ["big", "skip"], [{"big": 6, "skip": 6}]).size == 924
    assert RouteSpace(12, ["small", "big", "skip"], ["big=6,skip=6"]).size == 924
    sched = RouteSpace(12, ["small", "big"], ["6:2"])
    assert sched.size == sum(__import__("math").comb(12, k) for k in range(2, 7))
    assert parse_layer_budget("6:2").big_at(5).tolist() == [6, 5, 4, 3, 2]
    assert parse_layer_budget((2, 6)).big_at(3).tolist() == [2, 4, 6]
    space = RouteSpace(4, ["small", "big"])
    assert space.indices.tolist() == list(range(16))
    assert space.pattern_str(1) == "sssB" and space.pattern_str(8) == "Bsss"
    codes = index_to_pattern(space.indices, space.choices, 4)
    assert torch.equal(pattern_index(codes, space.choices), space.indices)
    assert RouteSpace(4, ["small", "big"], ["classes"]).labels == [f"big={k}" for k in range(5)]
    for label in ("all", "big=4", "big=6,skip=6", "big=6:2", "small=3,big=4,skip=5"):
        assert parse_layer_budget(label).label == label


def test_layer_budgets_and_fractions_convert_both_ways():
    assert parse_layer_budget(4).fractions(12) == {BIG: 4 / 12}
    assert parse_layer_budget("big=6,skip=3").fractions(12) == {BIG: 0.5, SKIP: 0.25}
    assert layer_budget_of_fractions({BIG: 0.5, SKIP: 0.25}, 12).label == "big=6,skip=3"
    for k in range(13):
        assert layer_budget_of_fractions(parse_layer_budget(k).fractions(12), 12) == parse_layer_budget(k)
    with pytest.raises(UnevenLayerBudget, match=r"\{'big': 0.3\} of 4 layers is \{'big': 1.2\} layers") as err:
        layer_budget_of_fractions({BIG: 0.3}, 4)
    assert err.value.nearest.label == "big=1"
    with pytest.raises(ValueError, match="varies with position"):
        parse_layer_budget("6:2").fractions(12)


@pytest.mark.parametrize(
    "choices,budget,message",
    [
        (["small", "big"], 5, "impossible with 4 layers"),
        (["small", "big"], -1, "impossible"),
        (["small", "big"], {"skip": 1}, "allows only ['small', 'big']"),
        (["big", "skip"], {"big": 1, "skip": 2}, "selects no pattern"),
        (["small", "big", "skip"], {"big": 3, "skip": 3}, "fixes 6 layers"),
        (["small", "skip"], "3:1", "schedules BIG layers"),
        (["small", "big"], "9:1", "impossible"),
        (["small", "big"], "big=3:x", "not a whole number"),
        (["small", "big"], "medium=2", "not a route choice"),
    ],
)
def test_infeasible_spaces_say_why(choices, budget, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RouteSpace(N_LAYERS, choices, [budget])


def test_choice_outside_route_options(model):
    config = DuoLlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    with pytest.raises(ValueError, match="not in the model's route_options"):
        RouteSpace.from_config(config, ["all"], route_options=["big", "skip"])


def brute_min(values, indices):
    """Lowest (loss, index) by definition: Python's min over pairs."""
    return min(zip(values, indices))


@pytest.mark.numerics
def test_reducers_match_brute_force(model, batch):
    ids, labels = batch
    budgets = ["all", "classes", "3:1"]
    space = RouteSpace(N_LAYERS, ["small", "big", "skip"], budgets, extra_classes=[(4, 0, 0), (0, 4, 0)])
    _, table = pattern_losses(model, ids, space, labels=labels)
    k, seed = 5, 3
    # One prefix node per forward: ties (e.g. at the untargeted tokens) are met across many chunks. The forwards
    # run in other shapes than the table's: losses agree up to float rounding, choices wherever they are decided.
    red = oracle_search(
        model, ids, space, labels=labels, best_of_k=k, seed=seed, uniform=["small", "big"], chunk_tokens=1
    )
    samples = space.sample(k, seed)
    n, t = ids.shape
    mask = red.token_mask
    seq_len = ids.shape[1]
    tokens = int(mask.sum())
    decisions = 0
    for g, budget in enumerate(space.budgets):
        allowed = budget.allowed(space.counts, seq_len)  # [P, T]
        for kind, among in (("oracle", None), ("best_of_k", samples[g])):
            candidates = budget_table(space, table, g, among)
            torch.testing.assert_close(getattr(red, f"{kind}_loss")[g], candidates.amin(0), rtol=0, atol=FLOAT_TOL)
            index = getattr(red, f"{kind}_index")[g]
            decisions += assert_same_choice(candidates, to_ranks(space, index))
            # Tokens without a target: every loss is exactly 0 in any kernel, the tie goes to the lowest index.
            for b, pos in itertools.product(range(n), range(t)):
                if not mask[b, pos]:
                    ranks = (allowed[:, pos] & (True if among is None else among)).nonzero().squeeze(1).tolist()
                    lowest = brute_min([0.0] * len(ranks), [int(space.indices[r]) for r in ranks])[1]
                    assert int(index[b, pos]) == lowest
    assert decisions > 0
    # Summed over the tokens: one rounding error per token.
    torch.testing.assert_close(red.pattern_loss_sum, table.double().sum((1, 2)), rtol=0, atol=FLOAT_TOL * tokens)
    all_small = int(space.ranks(torch.tensor([0])))
    all_big = int(space.ranks(pattern_index(torch.full((1, N_LAYERS), BIG), space.choices)))
    torch.testing.assert_close(red.uniform_loss[0], table[all_small], rtol=0, atol=FLOAT_TOL)
    torch.testing.assert_close(red.uniform_loss[1], table[all_big], rtol=0, atol=FLOAT_TOL)

    result = OracleResult.from_batches(space, [red], ids, {"best_of_k": k, "seed": seed, "uniform": ["small", "big"]})
    for g, budget in enumerate(space.budgets):
        allowed = budget.allowed(space.counts, seq_len)
        # Fixed: per class of the budget (one per BIG count for a schedule), the best pattern by its summed loss.
        members = budget.matches(space.counts)
        if budget.big_schedule is None:
            groups = [members]
        else:
            groups = [members & (space.counts[:, BIG] == kk) for kk in budget.big_at(seq_len).unique()]
        for restrict, method in ((None, "fixed"), (samples[g], "best_of_k_pattern")):
            total, names = 0.0, []
            for members in groups:
                ranks = members.nonzero().squeeze(1).tolist()
                if restrict is not None:
                    ranks = [r for r in ranks if restrict[r]]
                sums = [float((table[r] * allowed[r][None, :]).double().sum()) for r in ranks]
                best, index = brute_min(sums, [int(space.indices[r]) for r in ranks])
                total += best
                # A near tie of two patterns' sums (within one rounding error per token) may go either way.
                sure = bool(decided(torch.tensor(sums), FLOAT_TOL * tokens))
                names.append(space.pattern_str(index) if sure else None)
            assert result.mean_loss(method, budget.label) == pytest.approx(total / tokens, rel=0, abs=FLOAT_TOL)
            got = result.fixed_pattern(budget.label, method).split("|")
            assert [a for a, b in zip(got, names) if b is not None] == [b for b in names if b is not None]
        # Usage: how many tokens' oracle patterns take each choice, per layer and position (from the same indices).
        usage = result.usage(budget.label)
        routes = index_to_pattern(red.oracle_index[g], space.choices, N_LAYERS)
        for code, layer, pos in itertools.product((SMALL, BIG, SKIP), range(N_LAYERS), range(t)):
            hits = [bool(routes[b, pos, layer] == code) for b in range(n) if mask[b, pos]]
            assert int(usage[code, layer, pos]) == sum(hits)
    difficulty = result.token_difficulty()
    # From the same reduction, by elementwise float ops (exactly rounded in every kernel): exact.
    assert torch.equal(difficulty["loss_small_all"], red.uniform_loss[0])
    assert torch.equal(difficulty["gap"], red.uniform_loss[0] - red.oracle_loss[0])


@pytest.mark.numerics
def test_chunked_equals_unchunked(model, batch):
    ids, labels = batch
    space = RouteSpace(N_LAYERS, ["small", "big", "skip"], ["all", "classes", "3:1"])
    _, table = pattern_losses(model, ids, space, labels=labels)
    whole = oracle_search(model, ids, space, labels=labels, best_of_k=4, chunk_tokens=10**9).tensors()
    for chunk in (1, 40):  # one prefix node per forward; a few nodes
        chunked = oracle_search(model, ids, space, labels=labels, best_of_k=4, chunk_tokens=chunk).tensors()
        assert_same_search(space, table, whole, chunked, space.sample(4, 0))


@pytest.mark.numerics
@pytest.mark.parametrize("world_size", [2, 3])
def test_split_tree_combines_to_the_whole(model, batch, world_size):
    ids, labels = batch
    space = RouteSpace(N_LAYERS, ["small", "big"], ["all", "classes", "3:1"], extra_classes=[(4, 0, 0)])
    roots = space.partition(world_size)
    owner = torch.stack([
        torch.isin(pattern_index(space.patterns[:, : r.shape[1]], space.choices), pattern_index(r, space.choices))
        for r in roots
    ])
    assert torch.equal(owner.sum(0), torch.ones(space.size, dtype=torch.long))  # every pattern exactly once
    kwargs = dict(labels=labels, best_of_k=3, uniform=["small"])
    whole = oracle_search(model, ids, space, **kwargs).tensors()
    parts = [oracle_search(model, ids, space, roots=r, **kwargs) for r in roots]
    combined = BatchReduction.combine(parts).tensors()
    # Each part walks its subtrees in batches of other shapes than the whole tree's.
    _, table = pattern_losses(model, ids, space, labels=labels)
    assert_same_search(space, table, whole, combined, space.sample(3, 0))


@pytest.mark.numerics
def test_causal_oracle_matches_brute_force(model, batch):
    ids, labels = batch[0][:2, :6], batch[1][:2, :6]
    space = RouteSpace(N_LAYERS, ["small", "big"], ["all"])
    loss, index = causal_oracle(model, ids, space, 0, labels=labels)
    chosen = index_to_pattern(index, space.choices, N_LAYERS)
    with torch.no_grad():
        for pos in range(ids.shape[1]):
            trials = []
            for p in space.patterns:
                routes = chosen.clone()
                routes[:, pos] = p  # earlier tokens keep their chosen routes; later ones do not matter
                trials.append(model(ids, labels=labels, routes=routes).token_losses[:, pos])
            trials = torch.stack(trials)
            for b in range(ids.shape[0]):
                best, best_index = brute_min(trials[:, b].tolist(), space.indices.tolist())
                assert float(loss[b, pos]) == pytest.approx(best, abs=1e-5)
                # The KV-cache path and the full forward differ by float rounding: only a near-tie may flip.
                picked = float(trials[int(space.ranks(index[b, pos : pos + 1])), b])
                assert int(index[b, pos]) == best_index or picked == pytest.approx(best, abs=1e-5)


@pytest.mark.numerics
def test_routing_oracle_mode(model, batch):
    ids, labels = batch
    out = model(ids, labels=labels, routing="oracle", budget=2)
    assert out.routes.shape == (*ids.shape, N_LAYERS)
    assert ((out.routes == BIG).sum(-1) == 2).all()
    space = RouteSpace.from_config(model.config, [2])
    red = oracle_search(model, ids, space, labels=labels)
    mask = red.token_mask
    # routing="oracle" walks the same prefix tree in the same chunks as oracle_search: the same computation, exact.
    assert torch.equal(out.token_losses, red.oracle_loss[0] * mask)
    assert torch.equal(out.routes, index_to_pattern(red.oracle_index[0], space.choices, N_LAYERS))
    assert out.loss == pytest.approx(float(out.token_losses.sum() / mask.sum()))
    # The returned logits are each token's under its own oracle pattern.
    recomputed = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none"
    )
    assert torch.allclose(recomputed.view(3, -1)[mask[:, :-1]], out.token_losses[:, :-1][mask[:, :-1]], atol=FLOAT_TOL)
    # The oracle beats every fixed pattern of the budget, token by token.
    table = naive_table(model, ids, labels, space)
    assert (out.token_losses <= table.amin(0) + FLOAT_TOL).all()  # naive forwards: other shapes

    causal = model(ids, labels=labels, routing="oracle", budget=2, causal=True)
    assert ((causal.routes == BIG).sum(-1) == 2).all()
    with torch.no_grad():
        replay = model(ids, labels=labels, routes=causal.routes)  # one forward realises the causal oracle
    assert torch.allclose(replay.token_losses, causal.token_losses, atol=FLOAT_TOL)
    assert torch.allclose(replay.logits, causal.logits, atol=FLOAT_TOL)

    with pytest.raises(ValueError, match="needs labels"):
        model(ids, routing="oracle", budget=2)
    with pytest.raises(ValueError, match="one budget"):
        model(ids, labels=labels, routing="oracle", budget="classes")


def test_tree_flops_counts_the_tree():
    config = DuoLlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB
    )
    space = RouteSpace(3, ["small", "big"])
    flops = tree_flops(config, space, seq_len=8)
    # 1 + 2 + 4 tree nodes run attention, against 3 layers x 8 patterns naively; 2 + 4 + 8 FFN runs, half each.
    assert flops["tree"]["attention"] / flops["naive"]["attention"] == pytest.approx(7 / 24)
    assert flops["tree"]["lm_head"] == flops["naive"]["lm_head"]
    big, small = 2 * 3 * 32 * 64, 2 * 3 * 32 * 4
    assert flops["tree"]["ffn"] == pytest.approx(7 * (big + small))
    assert flops["naive"]["ffn"] == pytest.approx(12 * (big + small))
    per_pattern = sum(pattern_flops(config, p.tolist(), seq_len=8).total for p in space.patterns)
    assert flops["naive"]["total"] == pytest.approx(per_pattern)
    assert flops["predicted_speedup"] == pytest.approx(flops["naive"]["total"] / flops["tree"]["total"])


@pytest.mark.numerics
@pytest.mark.parametrize("do_layer_norm_before", [True, False])
def test_oracle_on_duo_opt(do_layer_norm_before):
    """The engine only uses the shared layer interface: DuoOPT (pre- and post-norm, per-sequence positions)."""
    from duo_llm_hf import DuoOPTConfig, DuoOPTForCausalLM

    torch.manual_seed(0)
    config = DuoOPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=32, do_layer_norm_before=do_layer_norm_before, init_std=0.2,
        route_options=["small", "big", "skip"],
    )
    model = DuoOPTForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    space = RouteSpace.from_config(config, ["all"])
    _, table = pattern_losses(model, ids, space, labels=ids, chunk_tokens=20)
    # Tree chunks, naive forwards and the routing mode's chunks batch other shapes: float rounding.
    torch.testing.assert_close(table, naive_table(model, ids, ids, space), rtol=0, atol=FLOAT_TOL)
    out = model(ids, labels=ids, routing="oracle")
    torch.testing.assert_close(out.token_losses, table.amin(0), rtol=0, atol=FLOAT_TOL)
    causal = model(ids, labels=ids, routing="oracle", budget={"skip": 1}, causal=True)
    with torch.no_grad():
        replay = model(ids, labels=ids, routes=causal.routes)
    assert torch.allclose(replay.token_losses, causal.token_losses, atol=FLOAT_TOL)
