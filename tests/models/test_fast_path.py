"""The fast dispatch of DuoFFN gives the reference dispatch's outputs, in every routing mode and phase."""

import pytest
import torch

from duo_llm_hf import BIG, SKIP, SMALL, DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.models.routed_ffn import DispatchPlan, DuoFFN, dispatch_plans, router_probabilities, set_ffn_dispatch
from duo_llm_hf.oracle.engine import pattern_losses
from duo_llm_hf.oracle.spaces import RouteSpace, pattern_index
from tests.helpers import FLOAT_TOL, assert_same_choice, assert_same_greedy, budget_table, decided, tiny_llama_kwargs

N_LAYERS = 3
VOCAB = 128
# The fast dispatch groups rows by choice and runs each module once on its group: other shapes and orders than the
# reference, so float rounding (helpers.FLOAT_TOL says why that size).
TIGHT = {"atol": FLOAT_TOL, "rtol": 1e-5}


def tiny_model(**duo_fields) -> DuoLlamaForCausalLM:
    torch.manual_seed(0)
    fields = {"route_options": ["small", "big", "skip"], **duo_fields}
    config = DuoLlamaConfig(**tiny_llama_kwargs(vocab_size=VOCAB, num_hidden_layers=N_LAYERS, **fields))
    return DuoLlamaForCausalLM(config).eval()


def mixed_routes(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Routes where every layer mixes small, big and skip tokens (so no layer takes the shortcut)."""
    g = torch.Generator().manual_seed(seed)
    routes = torch.randint(0, 3, (batch, seq, N_LAYERS), generator=g)
    routes.view(-1, N_LAYERS)[:3] = torch.tensor([[SMALL], [BIG], [SKIP]])
    return routes


ROUTE_CASES = {
    "all-big": lambda b, t: torch.full((b, t, N_LAYERS), BIG),
    "all-small": lambda b, t: torch.full((b, t, N_LAYERS), SMALL),
    "all-skip": lambda b, t: torch.full((b, t, N_LAYERS), SKIP),
    "mixed": lambda b, t: mixed_routes(b, t, seed=b * 100 + t),
    "small-big": lambda b, t: mixed_routes(b, t, seed=7).clamp_max(BIG),
    "per-layer": lambda b, t: torch.tensor([SMALL, SKIP, BIG]).expand(b, t, N_LAYERS),
}


def run_both(model: DuoLlamaForCausalLM, call):
    """`call(model)` under the reference dispatch and under the fast one."""
    outputs = {}
    for mode in ("reference", "fast"):
        set_ffn_dispatch(model, mode)
        outputs[mode] = call(model)
    return outputs["reference"], outputs["fast"]


def test_dispatch_plans_group_rows_by_choice():
    routes = mixed_routes(2, 5, seed=1)
    plans = dispatch_plans(routes)
    assert len(plans) == N_LAYERS
    for layer, plan in enumerate(plans):
        flat = routes[..., layer].reshape(-1)
        assert plan.counts == tuple(int((flat == code).sum()) for code in (SMALL, BIG, SKIP))
        assert torch.equal(flat[plan.order], flat.sort(stable=True).values)
        # Within a choice the rows keep their order (so each module sees the rows the reference gathers).
        n_small = plan.counts[SMALL]
        assert torch.equal(plan.order[:n_small], (flat == SMALL).nonzero().squeeze(1))
        single = DispatchPlan.from_route(routes[..., layer])
        assert single.counts == plan.counts and torch.equal(single.order, plan.order)


@pytest.mark.numerics
@pytest.mark.parametrize("case", sorted(ROUTE_CASES))
def test_ffn_dispatch_fast_equals_reference(case):
    model = tiny_model()
    ffn = model.model.layers[0].mlp
    hidden = torch.randn(3, 7, 32)
    route = ROUTE_CASES[case](3, 7)[..., 0]
    ffn.dispatch_mode = "reference"
    expected = ffn.dispatch(hidden, route)
    ffn.dispatch_mode = "fast"
    torch.testing.assert_close(ffn.dispatch(hidden, route), expected, **TIGHT)
    torch.testing.assert_close(ffn.dispatch(hidden, route, DispatchPlan.from_route(route)), expected, **TIGHT)
    if case in ("mixed", "all-skip"):
        assert (expected[route == SKIP] == 0).all()


@pytest.mark.numerics
@pytest.mark.parametrize("case", sorted(ROUTE_CASES))
def test_prefill_and_cached_decoding_equal(case):
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (3, 6))
    prompt_routes = ROUTE_CASES[case](3, 6)
    # Tokens of one decoding step take different modules.
    step_routes = [ROUTE_CASES[case](3, 1) for _ in range(3)]
    if case == "mixed":
        step_routes = [mixed_routes(3, 1, seed=s) for s in range(3)]

    def prefill_then_decode(m):
        out = m(prompt, routes=prompt_routes, use_cache=True)
        logits, cache = [out.logits], out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for routes in step_routes:  # tokens of one step take different modules
            out = m(token, routes=routes, cache=cache, use_cache=True)
            logits.append(out.logits)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return torch.cat(logits, dim=1)

    with torch.no_grad():
        reference, fast = run_both(model, prefill_then_decode)
    torch.testing.assert_close(fast, reference, **TIGHT)


@pytest.mark.numerics
@pytest.mark.parametrize(
    "routing",
    [
        {"routing": "random", "route_probs": {"small": 0.5, "big": 0.5}, "route_seed": 3},
        {"routing": "random", "route_probs": {"small": 0.3, "big": 0.5, "skip": 0.2}, "route_seed": 4},
        {"routing": "fixed", "pattern": "sB-"},
        {"routing": "fixed", "pattern": "BBB"},
        {"routing": "fixed", "pattern": "sss"},
    ],
    ids=["random-small-big", "random-with-skip", "fixed-mixed", "fixed-all-big", "fixed-all-small"],
)
def test_generate_equal(routing):
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (2, 5))

    def generate(m):
        m.set_routing(**routing)  # a fresh route sampler: both paths draw the same random routes
        return m.generate(
            prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
        )

    reference, fast = run_both(model, generate)
    # The dispatches run the modules on rows grouped differently: logits within rounding, tokens where decided.
    assert_same_greedy(fast, reference, prompt.shape[1], atol=TIGHT["atol"])

    def scores(m):
        m.set_routing(**routing)
        out = m(prompt, labels=prompt)
        return out.logits, out.routes

    (ref_logits, ref_routes), (fast_logits, fast_routes) = run_both(model, scores)
    assert torch.equal(fast_routes, ref_routes)
    torch.testing.assert_close(fast_logits, ref_logits, **TIGHT)


@pytest.mark.numerics
def test_learned_routing_equal():
    model = tiny_model()
    model.set_routing("learned")  # adds (untrained) routers; evaluation mode runs each token's argmax only
    prompt = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        reference, fast = run_both(model, lambda m: m(prompt))
    # Routers' argmax on inputs that differ by rounding: equal where decided, and every choice here is decided
    # (a near tie would change the later tokens' inputs and the logits compared below).
    assert bool(decided(-router_probabilities(reference.router_logits).movedim(-1, 0)).all())
    assert torch.equal(fast.routes, reference.routes)
    assert all(fast.routes[..., layer].unique().numel() > 1 for layer in range(N_LAYERS))  # mixed layers
    torch.testing.assert_close(fast.logits, reference.logits, **TIGHT)


@pytest.mark.numerics
def test_oracle_routing_equal():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        reference, fast = run_both(model, lambda m: m(ids, labels=ids, routing="oracle", budget=1))
    # The oracle's patterns are argmins of losses that differ by rounding: equal wherever the losses decide them.
    space = RouteSpace.from_config(model.config, [1])
    _, table = pattern_losses(model, ids, space, labels=ids)
    chosen = [space.ranks(pattern_index(o.routes, space.choices).flatten()).view(ids.shape) for o in (fast, reference)]
    assert assert_same_choice(budget_table(space, table, 0), *chosen) > 0
    assert fast.routes.unique().numel() > 1  # tokens took different patterns: the dispatch had work to do
    same = (fast.routes == reference.routes).all(-1)  # each token's logits are under its own pattern only
    torch.testing.assert_close(fast.logits[same], reference.logits[same], **TIGHT)
    torch.testing.assert_close(fast.token_losses, reference.token_losses, **TIGHT)


@pytest.mark.numerics
def test_gradients_equal():
    model = tiny_model()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    routes = mixed_routes(2, 8, seed=5)

    def grads(m):
        m.zero_grad()
        m(ids, labels=ids, routes=routes).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    reference, fast = run_both(model, grads)
    assert reference.keys() == fast.keys()
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], **TIGHT, msg=name)


def test_dispatch_mode_is_run_time_state_not_saved(tmp_path):
    model = tiny_model()
    assert all(layer.mlp.dispatch_mode == "fast" for layer in model.model.layers)
    set_ffn_dispatch(model, "reference")
    assert all(layer.mlp.dispatch_mode == "reference" for layer in model.model.layers)
    assert "ffn_dispatch" not in model.config.to_dict()
    model.save_pretrained(tmp_path)
    reloaded = DuoLlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[0].mlp.dispatch_mode == "fast"


def test_bad_dispatch_settings_give_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="ffn_dispatch.*fast"):
        set_ffn_dispatch(model, "vectorised")
    with pytest.raises(ValueError, match="dispatch_mode"):
        DuoFFN(torch.nn.Identity(), torch.nn.Identity(), dispatch_mode="batched")
    ffn = model.model.layers[0].mlp
    route = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="plan covers 5 rows"):
        ffn.dispatch(torch.randn(4, 32), route, DispatchPlan.from_route(torch.zeros(5, dtype=torch.long)))
