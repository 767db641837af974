"""DuoLlama: equality with dense Llama, dispatch, routes, losses, save/load, generation, training features."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from duo_llm_hf import BIG, SKIP, SMALL, DuoLlamaForCausalLM
from tests import helpers
from tests.helpers import FLOAT_TOL, tiny_llama_kwargs

VOCAB = 96


def ids_batch(batch=2, seq=12, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def full_routes(choice, batch=2, seq=12, layers=3):
    return torch.full((batch, seq, layers), choice, dtype=torch.long)


@pytest.mark.numerics
@pytest.mark.parametrize("tie", [False, True])
def test_all_big_equals_dense_llama(tie):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(tie_word_embeddings=tie))).eval()
    duo = DuoLlamaForCausalLM.from_dense(dense, small_intermediate_size=8).eval()
    ids = ids_batch()
    expected = dense(ids).logits
    got = duo(ids, routes=full_routes(BIG)).logits
    # The Duo layer runs the BIG FFN on the gathered tokens of its route: other shapes, float rounding.
    torch.testing.assert_close(got, expected, rtol=0, atol=FLOAT_TOL)
    back = duo.to_dense().eval()
    torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=FLOAT_TOL)


@pytest.mark.numerics
def test_attentions_hidden_states_and_tuple_output_match_dense_llama():
    """output_attentions (eager), output_hidden_states and return_dict=False behave as in LlamaForCausalLM."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())).eval()
    dense.set_attn_implementation("eager")  # SDPA computes no attention weights
    duo = DuoLlamaForCausalLM.from_dense(dense, small_intermediate_size=8).eval()
    helpers.assert_outputs_like_dense(duo, dense, full_routes(BIG), input_ids=ids_batch())


def test_from_dense_rejects_non_llama(tiny_model):
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        DuoLlamaForCausalLM.from_dense(tiny_model())


def test_modules_run_only_on_their_tokens(tiny_model):
    model = tiny_model(route_options=["small", "big", "skip"])
    rows = {}

    def counter(name):
        def hook(module, args, output):
            rows[name] = rows.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    layer = model.model.layers[1]
    layer.mlp.big.register_forward_hook(counter("big"))
    layer.mlp.small.register_forward_hook(counter("small"))
    routes = torch.randint(0, 3, (2, 12, 3), generator=torch.Generator().manual_seed(1))
    model(ids_batch(), routes=routes)
    assert rows.get("big", 0) == int((routes[..., 1] == BIG).sum())
    assert rows.get("small", 0) == int((routes[..., 1] == SMALL).sum())


def test_skip_leaves_residual_unchanged(tiny_model):
    model = tiny_model(route_options=["big", "skip"])
    layer = model.model.layers[0]
    hidden = torch.randn(1, 5, 32)
    out, router_logits = layer.mlp(hidden, torch.full((1, 5), SKIP))
    assert torch.equal(out, torch.zeros_like(hidden)) and router_logits is None


@pytest.mark.numerics
def test_mixed_routes_match_per_token_module_outputs(tiny_model):
    model = tiny_model(route_options=["small", "big", "skip"])
    ffn = model.model.layers[0].mlp
    hidden = torch.randn(2, 6, 32)
    route = torch.randint(0, 3, (2, 6), generator=torch.Generator().manual_seed(2))
    out, _ = ffn(hidden, route)
    expected = torch.stack([ffn.run_choice(hidden, c) for c in (SMALL, BIG, SKIP)])  # [3, B, T, D]
    picked = expected.gather(0, route[None, ..., None].expand(1, 2, 6, 32))[0]
    torch.testing.assert_close(out, picked)


def test_output_returns_routes_taken(tiny_model):
    model = tiny_model(routing="fixed", pattern="sBs")
    out = model(ids_batch())
    assert out.routes.shape == (2, 12, 3)
    assert torch.equal(out.routes, torch.tensor([SMALL, BIG, SMALL]).expand(2, 12, 3))
    explicit = torch.randint(0, 2, (2, 12, 3))
    assert torch.equal(model(ids_batch(), routes=explicit).routes, explicit)


def test_token_losses_without_recomputing_logits(tiny_model):
    model = tiny_model()
    ids = ids_batch()
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels, routes=full_routes(SMALL))
    manual = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="none"
    )
    manual = manual.view(2, 11)
    torch.testing.assert_close(out.token_losses[:, :-1], manual)
    assert torch.all(out.token_losses[:, -1] == 0) and out.token_losses[0, 4] == 0
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(out.loss, manual[valid].mean())


@pytest.mark.parametrize(
    ("routes", "error", "match"),
    [
        (torch.zeros(2, 12, 2, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(2, 12, 3), TypeError, "dtype"),
        (torch.full((2, 12, 3), SKIP), ValueError, r"codes \[2\] are not allowed"),
        (torch.full((2, 12, 3), 7), ValueError, r"codes \[7\]"),
        ([[0, 1, 0]], TypeError, "LongTensor"),
    ],
)
def test_bad_routes_raise_clear_errors(tiny_model, routes, error, match):
    with pytest.raises(error, match=match):
        tiny_model()(ids_batch(), routes=routes)


def test_uniform_pattern_routings_are_explicit_uniform_routes(tiny_model):
    """`routing="all-big"` etc. (the routing vocabulary's uniform patterns) equal explicit routes of one choice."""
    model = tiny_model(route_options=["small", "big"])
    ids = ids_batch()
    for routing, choice in (("all-big", BIG), ("all-small", SMALL)):
        out = model(ids, routing=routing)
        assert torch.equal(out.routes, full_routes(choice))
        assert torch.equal(out.logits, model(ids, routes=full_routes(choice)).logits)
    with pytest.raises(ValueError, match="not allowed by route_options"):
        model(ids, routing="all-skip")
    with pytest.raises(ValueError, match="uniform pattern"):
        model(ids, routing="big")


def test_explicit_mode_without_routes_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="routes="):
        tiny_model(routing="explicit")(ids_batch())


def test_set_routing_validates_and_keeps_old_settings_on_error(tiny_model):
    model = tiny_model()
    model.set_routing("fixed", pattern="BBs")
    assert model.config.pattern == [BIG, BIG, SMALL]
    with pytest.raises(ValueError, match="pattern"):
        model.set_routing("fixed", pattern="BB")
    assert model.config.pattern == [BIG, BIG, SMALL] and model.config.routing == "fixed"


def test_save_reload_identical_logits(tiny_model, tmp_path):
    model = tiny_model(route_options=["small", "big", "skip"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, DuoLlamaForCausalLM)
    routes = torch.randint(0, 3, (2, 12, 3))
    torch.testing.assert_close(
        reloaded(ids_batch(), routes=routes).logits, model(ids_batch(), routes=routes).logits
    )
    assert reloaded.config.route_options == ["small", "big", "skip"]


@pytest.mark.numerics
@pytest.mark.slow
def test_trust_remote_code_load_without_the_package(tiny_model, tmp_path):
    model = tiny_model(routing="fixed", pattern="BsB")
    model.save_pretrained(tmp_path / "duo")
    ids = ids_batch()
    hidden = model.model(ids).last_hidden_state
    torch.save({"ids": ids, "logits": model(ids).logits, "hidden": hidden}, tmp_path / "expected.pt")
    auto_map = json.loads((tmp_path / "duo" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_duo_llama.DuoLlamaModel", auto_map
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["duo_llm_hf"] = None  # the package must not be importable here
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "duo")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"])
        out = model.generate(expected["ids"][:, :4], max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 7)
        from transformers import AutoModel  # the decoder stack alone, through the auto_map's AutoModel entry
        stack = AutoModel.from_pretrained({str(tmp_path / "duo")!r}, trust_remote_code=True).eval()
        assert type(stack).__name__ == "DuoLlamaModel", type(stack)
        torch.testing.assert_close(stack(expected["ids"]).last_hidden_state, expected["hidden"])
        print("REMOTE-OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("mode", ["random", "fixed"])
def test_generate_with_kv_cache(tiny_model, mode):
    model = tiny_model(routing=mode, pattern="sBs" if mode == "fixed" else None)
    prompt = ids_batch(seq=5)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    if mode == "fixed":  # deterministic routes: cached decoding equals recomputing the whole sequence
        no_cache = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, use_cache=False
        )
        assert torch.equal(out, no_cache)


def test_cached_decoding_matches_full_forward_with_explicit_routes(tiny_model):
    model = tiny_model(route_options=["small", "big", "skip"])
    ids = ids_batch(seq=9)
    routes = torch.randint(0, 3, (2, 9, 3), generator=torch.Generator().manual_seed(4))
    full = model(ids, routes=routes).logits
    prefill = model(ids[:, :6], routes=routes[:, :6], use_cache=True)
    cache = prefill.cache
    steps = [prefill.logits]
    for t in range(6, 9):
        step = model(ids[:, t : t + 1], routes=routes[:, t : t + 1], cache=cache, use_cache=True)
        cache = step.cache
        steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_batched_generation_with_left_padding(tiny_model):
    model = tiny_model(routing="fixed", pattern="BsB")
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    batch = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone_a = model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=5, do_sample=False)
    alone_b = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=5, do_sample=False)
    assert torch.equal(out[0, 5:], alone_a[0, 5:]) and torch.equal(out[1, 5:], alone_b[0, 3:])


@pytest.mark.numerics
def test_sdpa_and_eager_attention_agree(tiny_config):
    torch.manual_seed(0)
    sdpa = DuoLlamaForCausalLM(tiny_config(route_options=["small", "big", "skip"])).eval()
    sdpa.set_attn_implementation("sdpa")
    eager = DuoLlamaForCausalLM(tiny_config(route_options=["small", "big", "skip"])).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    routes = torch.randint(0, 3, (2, 12, 3))
    torch.testing.assert_close(
        eager(ids_batch(), routes=routes).logits, sdpa(ids_batch(), routes=routes).logits
    )


def test_gradients_reach_only_modules_that_ran(tiny_model):
    model = tiny_model().train()
    routes = full_routes(SMALL)
    routes[..., 2] = BIG
    model(ids_batch(), labels=ids_batch(), routes=routes).loss.backward()
    for idx, layer in enumerate(model.model.layers):
        big_ran = idx == 2
        assert (layer.mlp.big.up_proj.weight.grad is not None) == big_ran
        assert (layer.mlp.small.up_proj.weight.grad is not None) == (not big_ran)
        assert layer.self_attn.q_proj.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    routes = torch.randint(0, 2, (2, 12, 3))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(ids_batch(), labels=ids_batch(), routes=routes).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
