"""Learned routers (stage 3): budget loss, annealing, hard dispatch, save/load, router training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from duo_llm_hf import (
    BIG,
    ROUTER_SETTINGS,
    SKIP,
    SMALL,
    DuoLlamaConfig,
    DuoLlamaForCausalLM,
    DuoRouter,
    TemperatureSchedule,
    freeze_all_but_routers,
    realised_fractions,
    router_probabilities,
    set_router_temperature,
    usage_loss,
)
from duo_llm_hf.experiments.analysis import usage_fraction
from duo_llm_hf.models.losses import parse_target_usage
from duo_llm_hf.models.routed_ffn import router_temperature, routers
from duo_llm_hf.models.routes import route_usage

VOCAB = 64


def tiny_config(**kwargs) -> DuoLlamaConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        small_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        routing="learned",
    )
    fields.update(kwargs)
    return DuoLlamaConfig(**fields)


def tiny_model(seed: int = 0, **kwargs) -> DuoLlamaForCausalLM:
    torch.manual_seed(seed)
    return DuoLlamaForCausalLM(tiny_config(**kwargs)).eval()


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def probs_with_big(p_big: torch.Tensor) -> torch.Tensor:
    """Router logits over small/big whose probabilities are the given P_big, shape [..., 3] (-inf for skip)."""
    return torch.stack([1 - p_big, p_big, torch.zeros_like(p_big)], dim=-1).log()


# softmax(log p) is p up to rounding: a budget met "exactly" leaves a loss of rounding size.
ZERO = pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- budget loss


def test_budget_loss_is_zero_exactly_at_the_target():
    # Mean over layers of P_big is 0.25 in every sequence although no single layer has 0.25.
    p_big = torch.tensor([0.5, 0.0]).expand(3, 5, 2)
    assert usage_loss(probs_with_big(p_big), 0.25).item() == ZERO
    assert usage_loss(probs_with_big(p_big), 0.5).item() == pytest.approx(0.0625)

    three = torch.tensor([0.25, 0.5, 0.25]).expand(2, 4, 3, 3).log()
    assert usage_loss(three, {"small": 0.25, "big": 0.5, "skip": 0.25}).item() == ZERO
    assert usage_loss(three, {"small": 0.5, "big": 0.5, "skip": 0.0}).item() == pytest.approx(2 * 0.25**2)
    # The temperature divides the logits before the softmax: tau = 0.5 squares the odds (1:3 -> 1:9).
    p_big = torch.full((2, 4, 3), 0.25)
    assert usage_loss(probs_with_big(p_big), 0.1, temperature=0.5).item() == ZERO


def test_budget_loss_is_per_sequence_and_ignores_padding():
    # Sequence means 0 and 0.5 average to the target 0.25, but each sequence misses it by 0.25.
    p_big = torch.tensor([0.0, 0.5])[:, None, None].expand(2, 4, 3)
    assert usage_loss(probs_with_big(p_big), 0.25).item() == pytest.approx(0.0625)

    # Padded tokens (mask False) may hold anything: only the counted tokens meet the target.
    p_big = torch.full((2, 6, 3), 0.25)
    p_big[:, 4:] = 1.0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    assert usage_loss(probs_with_big(p_big), 0.25, mask).item() == ZERO
    assert usage_loss(probs_with_big(p_big), 0.25).item() > 1e-6
    # A sequence with no counted token does not count in the batch mean.
    mask[1] = False
    p_big[1] = 1.0
    assert usage_loss(probs_with_big(p_big), 0.25, mask).item() == ZERO


def test_budget_loss_gradient_points_toward_the_target():
    for start, target in ((2.0, 0.3), (-2.0, 0.7)):
        logits = torch.full((2, 5, 3, 2), 0.0)
        logits[..., 1] = start
        logits.requires_grad_(True)
        p = torch.softmax(logits, -1)
        skip = torch.full_like(logits[..., :1], float("-inf"))
        loss = usage_loss(torch.cat([logits, skip], -1), target)
        loss.backward()
        # Gradient descent on the BIG logit moves P_big toward the target ...
        direction = -logits.grad[..., 1]
        assert (torch.sign(direction) == torch.sign(torch.tensor(target) - p[..., 1].detach())).all()
        # ... and a small step lowers the loss.
        with torch.no_grad():
            stepped = logits - 0.5 * logits.grad
            assert usage_loss(torch.cat([stepped, skip], -1), target) < loss


def test_parse_budget_fractions_errors_name_the_problem():
    assert parse_target_usage(0.3) == {BIG: 0.3}
    assert parse_target_usage({"skip": 0.2, "big": 0.5, "small": 0.3}, ["small", "big", "skip"]) == {
        SMALL: 0.3,
        BIG: 0.5,
        SKIP: 0.2,
    }
    with pytest.raises(ValueError, match="sum to 1"):
        parse_target_usage({"small": 0.3, "big": 0.3, "skip": 0.3}, ["small", "big", "skip"])
    with pytest.raises(ValueError, match="does not allow"):
        parse_target_usage({"skip": 0.5}, ["small", "big"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        parse_target_usage(1.5)
    with pytest.raises(ValueError, match="shape"):
        usage_loss(torch.zeros(2, 3, 2), 0.5)
    for setting in ROUTER_SETTINGS.values():
        parse_target_usage(setting["target_usage"], setting["route_options"])


# ---------------------------------------------------------------- router and temperature


def test_router_probabilities_use_the_choice_code_layout():
    router = DuoRouter(16, ["big", "skip"], temperature=0.7)
    logits = router(torch.randn(3, 5, 16))
    assert logits.shape == (3, 5, 3) and logits.dtype == torch.float32
    assert (logits[..., SMALL] == float("-inf")).all()
    probs = router_probabilities(logits, router.temperature)
    assert (probs[..., SMALL] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
    route = logits.argmax(-1)
    assert set(route.unique().tolist()) <= {BIG, SKIP}
    assert torch.equal(route, probs.argmax(-1))
    with pytest.raises(ValueError, match="at least two"):
        DuoRouter(16, ["big"])


def test_temperature_schedules():
    for kind in ("linear", "exponential", "cosine"):
        schedule = TemperatureSchedule(start=2.0, end=0.05, steps=10, kind=kind)
        values = [schedule(step) for step in range(12)]
        assert (
            values[0] == pytest.approx(2.0) and values[10] == pytest.approx(0.05) and values[11] == pytest.approx(0.05)
        )
        assert all(a >= b for a, b in zip(values, values[1:]))
    assert TemperatureSchedule(start=1.0, end=0.1, steps=10, kind="exponential")(5) == pytest.approx(0.1**0.5)
    assert TemperatureSchedule(start=1.5, kind="constant")(99) == 1.5
    with pytest.raises(ValueError, match="kind"):
        TemperatureSchedule(kind="step")
    with pytest.raises(ValueError, match="> 0"):
        TemperatureSchedule(end=0.0)


def test_annealing_makes_the_assignment_hard():
    model = tiny_model(route_options=["small", "big", "skip"])
    x = ids()
    with torch.no_grad():
        hard = model(x).logits  # eval: argmax routing, only the chosen module runs
        model.train()
        schedule = TemperatureSchedule(start=1.0, end=1e-4, steps=4, kind="exponential")
        gaps, peaks = [], []
        for step in (0, 4):
            set_router_temperature(model, schedule(step))
            out = model(x)
            gaps.append((out.logits - hard).abs().max().item())
            peaks.append(router_probabilities(out.router_logits, schedule(step)).max(-1).values.min().item())
    assert router_temperature(model) == pytest.approx(1e-4)
    assert "router_temperature" not in model.config.to_dict()  # run-time state, not saved
    assert peaks[0] < 0.9 and peaks[1] > 0.999  # the softmax became one-hot
    assert gaps[0] > 1e-3 and gaps[1] < 1e-4  # the soft mixture became the hard route


# ---------------------------------------------------------------- model integration


def count_rows(model):
    """Forward hooks counting the rows each big / small module receives, per layer."""
    counts = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for choice, module in ((BIG, layer.mlp.big), (SMALL, layer.mlp.small)):
            counts[i, choice] = 0

            def hook(_module, args, _output, key=(i, choice)):
                counts[key] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

            handles.append(module.register_forward_hook(hook))
    return counts, handles


def test_evaluation_runs_only_the_chosen_module():
    model = tiny_model(route_options=["small", "big", "skip"])
    x = ids(batch=3, seq=10)
    counts, handles = count_rows(model)
    with torch.no_grad():
        out = model(x)
    routes = out.routes
    assert out.router_logits.shape == (3, 10, 2, 3)
    assert torch.equal(routes, out.router_logits.argmax(-1))
    assert len(routes.unique()) == 3  # the test covers all three choices
    for layer in range(2):
        assert counts[layer, BIG] == (routes[..., layer] == BIG).sum().item()
        assert counts[layer, SMALL] == (routes[..., layer] == SMALL).sum().item()
    # The same routes given explicitly give the same logits: the router only chose them.
    torch.testing.assert_close(model(x, routes=routes).logits, out.logits)

    # Training mode mixes: every allowed module sees every token.
    for key in counts:
        counts[key] = 0
    model.train()
    model(x)
    assert all(n == 30 for n in counts.values())
    for handle in handles:
        handle.remove()


def test_routing_fields_are_validated():
    with pytest.raises(ValueError, match="use_router"):
        tiny_config(use_router="yes")
    assert tiny_config().use_router is True
    assert tiny_config(routing="random").use_router is False
    model = tiny_model(routing="random")
    with pytest.raises(ValueError, match="set_routing"):
        model(ids(), routing="learned")
    model.set_routing("learned")
    assert len(routers(model)) == 2 and model.config.use_router
    assert model(ids()).router_logits is not None
    # Routers stay when the mode changes; the routes then come from the new mode.
    model.set_routing("random")
    assert len(routers(model)) == 2 and model(ids()).router_logits is None


def test_configs_of_older_versions_load(tmp_path):
    # router_temperature and ffn_dispatch were config fields; they are run-time state now, dropped on load.
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "router_temperature" not in saved and "ffn_dispatch" not in saved
    saved.update(router_temperature=0.25, ffn_dispatch="reference", use_router=True)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = DuoLlamaConfig.from_pretrained(tmp_path)
    assert not hasattr(loaded, "router_temperature") and not hasattr(loaded, "ffn_dispatch")
    assert "router_temperature" not in loaded.to_dict() and loaded.use_router
    model = DuoLlamaForCausalLM(loaded)
    assert len(routers(model)) == 2 and router_temperature(model) == 1.0
    assert all(layer.mlp.dispatch_mode == "fast" for layer in model.model.layers)


def test_budget_loss_as_aux_loss_follows_mixtral():
    model = tiny_model(router_target_usage=0.3, router_aux_loss_coef=0.5)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        plain = model(x, labels=x, attention_mask=mask)
        out = model(x, labels=x, attention_mask=mask, output_router_logits=True)
    assert plain.aux_loss is None
    expected = usage_loss(out.router_logits, 0.3, mask.bool())
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * expected)
    set_router_temperature(model, 0.5)
    with torch.no_grad():
        hot = model(x, output_router_logits=True)
    torch.testing.assert_close(hot.aux_loss, usage_loss(hot.router_logits, 0.3, temperature=0.5))
    with pytest.raises(ValueError, match="target_usage"):
        tiny_config(router_target_usage={"skip": 0.5})


def test_route_usage_layout_and_realised_fractions():
    routes = torch.tensor([[[BIG, SMALL], [SKIP, BIG], [BIG, BIG]], [[SMALL, SMALL], [BIG, BIG], [SKIP, SKIP]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    usage = route_usage(routes, mask)
    assert usage.shape == (3, 2, 3)  # [choices, layers, positions]
    assert usage[BIG, 0].tolist() == [1, 1, 1]
    assert usage[SMALL, 1].tolist() == [2, 0, 0]
    assert usage[SKIP, 0].tolist() == [0, 1, 0]
    assert usage.sum().item() == 2 * 5  # 5 counted tokens, 2 layers
    torch.testing.assert_close(usage_fraction(usage, BIG)[0], torch.tensor([0.5, 0.5, 1.0]))
    report = realised_fractions(usage)
    assert report["overall"] == pytest.approx({"small": 0.3, "big": 0.6, "skip": 0.1})
    assert report["per_layer"][1] == pytest.approx({"small": 0.4, "big": 0.6, "skip": 0.0})
    json.dumps(report)


def test_generate_in_learned_mode_matches_full_forward():
    model = tiny_model(route_options=["small", "big", "skip"])
    prompt = ids(batch=1, seq=5)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        # Greedy decoding without a KV cache, one full forward per token.
        tokens = prompt
        for _ in range(6):
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


# ---------------------------------------------------------------- save / load


def test_router_weights_survive_save_and_load(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for router in routers(model):
            router.bias.copy_(torch.tensor([0.3, -0.2]))
    model.save_pretrained(tmp_path)
    reloaded = DuoLlamaForCausalLM.from_pretrained(tmp_path).eval()
    for a, b in zip(routers(model), routers(reloaded)):
        torch.testing.assert_close(a.weight, b.weight)
        torch.testing.assert_close(a.bias, b.bias)
    x = ids()
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    assert torch.equal(expected.routes, got.routes)
    torch.testing.assert_close(expected.logits, got.logits)


def test_stage1_checkpoint_loads_with_fresh_routers(tmp_path):
    stage1 = tiny_model(routing="random")
    stage1.save_pretrained(tmp_path)
    model, info = DuoLlamaForCausalLM.from_pretrained(tmp_path, routing="learned", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert model.config.use_router and len(routers(model)) == 2
    for router in routers(model):
        assert router.weight.abs().max() > 0 and torch.isfinite(router.weight).all()
        assert (router.bias == 0).all()
    fresh = {k for k in model.state_dict() if ".mlp.router." in k}
    assert fresh and all(torch.equal(v, model.state_dict()[k]) for k, v in stage1.state_dict().items())


@pytest.mark.slow
def test_trust_remote_code_loads_routers_without_the_package(tmp_path):
    model = tiny_model(route_options=["small", "big", "skip"])
    model.save_pretrained(tmp_path / "model")
    x = ids()
    with torch.no_grad():
        out = model(x)
    torch.save({"ids": x, "logits": out.logits, "routes": out.routes}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["duo_llm_hf"] = None  # the package must not be importable
        import torch
        from transformers import AutoModelForCausalLM
        path = {str(tmp_path / "model")!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("duo_llm_hf"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(expected["ids"])
        assert out.router_logits is not None
        assert torch.equal(out.routes, expected["routes"])
        torch.testing.assert_close(out.logits, expected["logits"])
        print("ok")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- router training


def train_routers(model, budget, steps: int, alpha: float = 10.0, lr: float = 0.05):
    params = freeze_all_but_routers(model)
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        x = ids(batch=4, seq=16, seed=100 + step)
        out = model(x, labels=x)
        loss = out.loss + alpha * usage_loss(out.router_logits, budget)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def big_fraction(model) -> float:
    with torch.no_grad():
        routes = model(ids(batch=8, seq=16, seed=7)).routes
    return realised_fractions(route_usage(routes))["overall"]["big"]


def test_training_routers_leaves_duo_weights_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_routers(model, 0.2, steps=3)
    after = model.state_dict()
    for key, value in before.items():
        if ".mlp.router." in key:
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".mlp.router." not in n)


def test_router_training_moves_big_fraction_toward_the_target():
    model = tiny_model()
    start = big_fraction(model)
    train_routers(model, 0.1, steps=25)
    end = big_fraction(model)
    assert start > 0.25
    assert abs(end - 0.1) < 0.5 * abs(start - 0.1), (start, end)
