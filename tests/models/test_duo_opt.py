"""DuoOPT: equality with the source OPT model, save / reload / trust_remote_code, generate, dispatch, losses,
validation, FLOPs; and conversion of Llama-family checkpoints with DuoLlama.from_dense."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTForCausalLM,
)

import duo_llm_hf.models
from duo_llm_hf import (
    BIG,
    SKIP,
    SMALL,
    DuoLlamaForCausalLM,
    DuoOPTConfig,
    DuoOPTForCausalLM,
    DuoOPTModel,
    flops_per_token,
)
from duo_llm_hf.utils.flops import ffn_flops
from tests import helpers

VOCAB = 96
PAD = 1


def tiny_opt(**overrides) -> OPTForCausalLM:
    """The suite's tiny OPT (`helpers.tiny_opt`: 3 layers, every weight exercised), padding with PAD."""
    return helpers.tiny_opt(pad_token_id=PAD, **overrides)


def tiny_duo(route_options=("small", "big", "skip"), **kwargs) -> DuoOPTForCausalLM:
    return DuoOPTForCausalLM.from_dense(tiny_opt(**kwargs), route_options=list(route_options)).eval()


def batch(seed: int = 1, batch_size: int = 2, seq_len: int = 10, pad: int = 3):
    """Token ids and an attention mask whose second row is left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if batch_size > 1 and pad:
        ids[1, :pad] = PAD
        mask[1, :pad] = 0
    return ids, mask


def all_routes(choice: int, ids: torch.Tensor, n_layers: int = 3) -> torch.Tensor:
    return torch.full((*ids.shape, n_layers), choice)


# --- equality with the source model ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "do_layer_norm_before, word_embed_proj_dim",
    [(True, None), (False, 24)],
    ids=["pre-norm", "post-norm+proj"],
)
@pytest.mark.numerics
def test_all_big_equals_source_opt(do_layer_norm_before, word_embed_proj_dim):
    opt = tiny_opt(do_layer_norm_before=do_layer_norm_before, word_embed_proj_dim=word_embed_proj_dim)
    duo = DuoOPTForCausalLM.from_dense(opt).eval()
    assert (duo.model.project_in is not None) == (word_embed_proj_dim is not None)
    assert (duo.model.final_layer_norm is not None) == do_layer_norm_before
    ids, mask = batch()
    with torch.no_grad():
        expected = opt(ids, attention_mask=mask).logits
        got = duo(ids, attention_mask=mask, routes=all_routes(BIG, ids)).logits
        # fixed routing on BIG is the same computation
        duo.set_routing("fixed", "BBB")
        fixed = duo(ids, attention_mask=mask).logits
    # The Duo layer runs the BIG FFN on the gathered tokens of its route: other shapes than OPT's, float rounding.
    torch.testing.assert_close(got, expected, rtol=0, atol=helpers.FLOAT_TOL)
    torch.testing.assert_close(fixed, expected, rtol=0, atol=helpers.FLOAT_TOL)
    # The small FFNs change the output: the test above is not passing by accident.
    with torch.no_grad():
        small = duo(ids, attention_mask=mask, routes=all_routes(SMALL, ids)).logits
    assert (small - expected).abs().max() > 1e-3


@pytest.mark.numerics
def test_attentions_hidden_states_and_tuple_output_match_source_opt():
    """output_attentions (eager), output_hidden_states and return_dict=False behave as in OPTForCausalLM."""
    opt = tiny_opt()
    opt.set_attn_implementation("eager")  # SDPA computes no attention weights
    duo = DuoOPTForCausalLM.from_dense(opt).eval()
    ids, mask = batch()
    helpers.assert_outputs_like_dense(duo, opt, all_routes(BIG, ids), input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("do_layer_norm_before", [True, False])
def test_to_dense_round_trip(do_layer_norm_before):
    opt = tiny_opt(do_layer_norm_before=do_layer_norm_before, word_embed_proj_dim=None if do_layer_norm_before else 24)
    dense = DuoOPTForCausalLM.from_dense(opt).to_dense().eval()
    assert type(dense) is OPTForCausalLM and dense.config.ffn_dim == opt.config.ffn_dim
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids, attention_mask=mask).logits, opt(ids, attention_mask=mask).logits)


def test_from_dense_config():
    duo = DuoOPTForCausalLM.from_dense(tiny_opt(), small_intermediate_size=16, route_options=["big", "skip"])
    config = duo.config
    assert config.model_type == "duo_opt" and config.ffn_dim == 128 and config.intermediate_size == 128
    assert config.small_intermediate_size == 16 and config.route_options == ["big", "skip"]
    assert duo.model.layers[0].mlp.small.fc1.out_features == 16
    # default small size: ffn_dim // 16
    assert DuoOPTForCausalLM.from_dense(tiny_opt()).config.small_intermediate_size == 8
    # the head stays tied to the token embeddings, as in OPT
    assert duo.lm_head.weight.data_ptr() == duo.model.embed_tokens.weight.data_ptr()


def test_from_dense_rejects_other_models():
    with pytest.raises(TypeError, match="OPTForCausalLM"):
        DuoOPTForCausalLM.from_dense(tiny_duo())
    llama = LlamaForCausalLM(LlamaConfig(**helpers.tiny_llama_kwargs()))
    with pytest.raises(TypeError, match="DuoLlamaForCausalLM.from_dense"):
        DuoOPTForCausalLM.from_dense(llama)
    with pytest.raises(TypeError, match="DuoOPTForCausalLM.from_dense"):
        DuoLlamaForCausalLM.from_dense(tiny_opt())


# --- the layer interface the oracle uses ----------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("do_layer_norm_before", [True, False])
def test_layer_interface_matches_forward(do_layer_norm_before):
    """embed -> attend / mlp / merge per layer -> finalize -> lm_head reproduces forward (mixed routes)."""
    duo = tiny_duo(do_layer_norm_before=do_layer_norm_before, word_embed_proj_dim=None if do_layer_norm_before else 24)
    ids, mask = batch()
    routes = torch.randint(0, 3, (*ids.shape, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = duo(ids, attention_mask=mask, routes=routes)
        hidden, layer_kwargs = duo.model.embed(ids, attention_mask=mask)
        for i, layer in enumerate(duo.model.layers):
            residual, ffn_input = layer.attend(hidden, cache=None, **layer_kwargs)
            # every choice run on every token, then picked per token: a "run all and mask" reference
            candidates = torch.stack([layer.mlp.run_choice(ffn_input, c) for c in (SMALL, BIG, SKIP)])
            ffn_output = candidates.gather(0, routes[..., i][None, ..., None].expand(1, *ffn_input.shape))[0]
            hidden = layer.merge(residual, ffn_output)
        logits = duo.lm_head(duo.model.finalize(hidden))
    assert torch.equal(out.routes, routes)
    # Every choice on every token against dispatch on each route's tokens: other shapes, float rounding.
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=helpers.FLOAT_TOL)


def test_skip_adds_nothing_to_the_residual():
    duo = tiny_duo()
    ids, mask = batch()
    with torch.no_grad():
        hidden, layer_kwargs = duo.model.embed(ids, attention_mask=mask)
        layer = duo.model.layers[0]
        residual, ffn_input = layer.attend(hidden, **layer_kwargs)
        out, router_logits = layer.mlp(ffn_input, torch.full(ids.shape, SKIP))
    assert torch.equal(out, torch.zeros_like(out)) and router_logits is None
    assert torch.equal(layer.merge(residual, out), residual)


def test_dispatch_runs_each_module_on_its_tokens_only():
    duo = tiny_duo()
    ids, mask = batch(batch_size=2, seq_len=12)
    routes = torch.randint(0, 3, (*ids.shape, 3), generator=torch.Generator().manual_seed(7))
    rows = {}

    def hook(name):
        def record(module, args, output):
            rows.setdefault(name, []).append(args[0].shape[0])

        return record

    handles = []
    for i, layer in enumerate(duo.model.layers):
        handles.append(layer.mlp.big.register_forward_hook(hook(("big", i))))
        handles.append(layer.mlp.small.register_forward_hook(hook(("small", i))))
    with torch.no_grad():
        duo(ids, attention_mask=mask, routes=routes)
    for handle in handles:
        handle.remove()
    for i in range(3):
        for name, code in (("big", BIG), ("small", SMALL)):
            expected = int((routes[..., i] == code).sum())
            assert sum(rows.get((name, i), [])) == expected, (name, i)


# --- routing modes, losses, generate ----------------------------------------------------------------------


def test_random_routing_is_seeded_and_returned():
    duo = tiny_duo()
    ids, mask = batch()
    duo.set_routing("random", route_probs={"small": 0.25, "big": 0.5, "skip": 0.25}, route_seed=11)
    with torch.no_grad():
        first = duo(ids, attention_mask=mask)
        duo.set_routing("random", route_seed=11)
        again = duo(ids, attention_mask=mask)
        replay = duo(ids, attention_mask=mask, routes=first.routes)
    assert first.routes.shape == (2, 10, 3) and set(first.routes.unique().tolist()) == {SMALL, BIG, SKIP}
    assert torch.equal(first.routes, again.routes)
    # The same routes through the same code in the same shapes: the identical computation, bit for bit.
    torch.testing.assert_close(first.logits, again.logits, rtol=0, atol=0)
    torch.testing.assert_close(replay.logits, first.logits, rtol=0, atol=0)


def test_token_losses():
    duo = tiny_duo()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = duo(ids, attention_mask=mask, labels=labels, routes=all_routes(SMALL, ids))
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100
    ).view(2, -1)
    torch.testing.assert_close(out.token_losses[:, :-1], expected)
    assert torch.equal(out.token_losses[:, -1], torch.zeros(2))
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(out.loss, expected[valid].mean())


def test_generate_all_big_equals_opt_generate():
    opt = tiny_opt()
    duo = DuoOPTForCausalLM.from_dense(opt, routing="fixed", pattern="BBB").eval()
    ids, mask = batch(pad=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    expected = opt.generate(ids, **kwargs)
    assert torch.equal(duo.generate(ids, **kwargs), expected)


def test_generate_left_padded_batch_equals_unpadded_rows():
    duo = tiny_duo()
    duo.set_routing("fixed", "sB-")
    ids, mask = batch(pad=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    batched = duo.generate(ids, attention_mask=mask, **kwargs)
    for row in range(2):
        real = ids[row : row + 1, mask[row].bool()]
        alone = duo.generate(real, attention_mask=torch.ones_like(real), **kwargs)
        assert torch.equal(batched[row, -6:], alone[0, -6:]), row


def test_generate_random_routing_uses_the_cache_and_the_sampler():
    """generate() under random routing = a greedy loop over the KV cache drawing routes from the same seed."""
    duo = tiny_duo()
    ids, mask = batch(pad=2)
    new = 5
    duo.set_routing("random", route_seed=3)
    generated = duo.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD)

    duo.set_routing("random", route_seed=3)
    tokens, attention, past, step_ids = ids, mask, None, ids
    with torch.no_grad():
        for _ in range(new):
            out = duo(step_ids, attention_mask=attention, cache=past, use_cache=True)
            assert out.routes.shape == (*step_ids.shape, 3)
            past = out.cache
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step_ids], dim=1)
            attention = torch.cat([attention, torch.ones_like(step_ids)], dim=1)
    assert torch.equal(generated, tokens)


def test_training_step_with_gradient_checkpointing():
    duo = tiny_duo()
    duo.activation_checkpointing_enable()
    duo.train()
    ids, mask = batch()
    routes = torch.full((*ids.shape, 3), BIG)
    routes[0, :, 1] = SMALL
    out = duo(ids, attention_mask=mask, labels=ids, routes=routes)
    out.loss.backward()
    layer = duo.model.layers[1]
    assert layer.mlp.small.fc1.weight.grad.abs().sum() > 0
    assert duo.model.layers[0].mlp.small.fc1.weight.grad is None  # no token took small there


# --- validation -------------------------------------------------------------------------------------------


def test_route_and_config_validation_errors():
    duo = tiny_duo(route_options=("small", "big"))
    ids, mask = batch()
    with pytest.raises(ValueError, match="not allowed by route_options"):
        duo(ids, routes=all_routes(SKIP, ids))
    with pytest.raises(ValueError, match="shape"):
        duo(ids, routes=torch.zeros(2, 10, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        duo(ids, routes=torch.zeros(2, 10, 3))
    with pytest.raises(ValueError, match="pattern"):
        duo.set_routing("fixed", "sB")
    assert duo.config.routing == "random"  # a rejected change leaves the config as it was
    with pytest.raises(ValueError, match="routing"):
        duo.set_routing("sometimes")
    with pytest.raises(ValueError, match=r"1\.\.128 \(ffn_dim\)"):
        DuoOPTConfig(ffn_dim=128, small_intermediate_size=200)
    with pytest.raises(ValueError, match="layerdrop"):
        DuoOPTConfig(layerdrop=0.1)
    with pytest.raises(ValueError, match="route_probs"):
        DuoOPTConfig(route_probs={"small": 0.7, "big": 0.7})


# --- save, reload, auto classes, trust_remote_code ------------------------------------------------------


def test_auto_classes():
    config = AutoConfig.for_model(
        "duo_opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    assert isinstance(config, DuoOPTConfig) and config.small_intermediate_size == 4
    assert isinstance(AutoModelForCausalLM.from_config(config), DuoOPTForCausalLM)
    assert isinstance(AutoModel.from_config(config), DuoOPTModel)


def test_save_and_reload(tmp_path):
    duo = tiny_duo()
    duo.set_routing("random", route_seed=4)
    duo.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "duo_opt" and "intermediate_size" not in saved
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_duo_opt.DuoOPTForCausalLM"
    ids, mask = batch()
    routes = torch.randint(0, 3, (*ids.shape, 3), generator=torch.Generator().manual_seed(2))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DuoOPTForCausalLM
    with torch.no_grad():
        # The same weights, code and shapes in one process: the identical computation, bit for bit.
        torch.testing.assert_close(
            reloaded(ids, attention_mask=mask, routes=routes).logits,
            duo(ids, attention_mask=mask, routes=routes).logits,
            rtol=0,
            atol=0,
        )
        duo.set_routing("random", route_seed=4)
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).routes, duo(ids, attention_mask=mask).routes)


@pytest.mark.numerics
@pytest.mark.slow
def test_trust_remote_code_without_the_package(tmp_path):
    duo = tiny_duo(do_layer_norm_before=False, word_embed_proj_dim=24)
    folder = tmp_path / "model"
    duo.save_pretrained(folder)
    # What save_pretrained ships is the models package: every module but the other model's two files.
    shipped = {path.name for path in folder.glob("*.py")}
    package = Path(duo_llm_hf.models.__file__).parent
    modules = {path.name for path in package.glob("*.py")} - {"__init__.py"}
    assert shipped == modules - {"modeling_duo_llama.py", "configuration_duo_llama.py"}
    ids, mask = batch()
    routes = torch.randint(0, 3, (*ids.shape, 3), generator=torch.Generator().manual_seed(2))
    torch.save({"ids": ids, "mask": mask, "routes": routes}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = duo(ids, attention_mask=mask, routes=routes).logits

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["duo_llm_hf"] = None  # the installed package must not be used
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads({torch.get_num_threads()})  # as the suite: bit-equal logits need the same kernels
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "DuoOPTForCausalLM", type(model)
        assert not type(model).__module__.startswith("duo_llm_hf"), type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        ids, mask = inputs["ids"], inputs["mask"]
        with torch.no_grad():
            out = model(ids, attention_mask=mask, routes=inputs["routes"])
            model.set_routing("fixed", "sB-")
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert gen.shape == (2, 13), gen.shape
        torch.save(out.logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Another process with weights loaded at other addresses: memory alignment can change how tiny GEMMs round.
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=helpers.FLOAT_TOL)


# --- FLOPs ----------------------------------------------------------------------------------------------


def test_flops_count_the_two_matrix_ffn():
    duo = tiny_duo()
    config = duo.config
    layer = duo.model.layers[0].mlp
    # one multiply-add (2 FLOPs) per weight of fc1 and fc2
    for choice, module in ((BIG, layer.big), (SMALL, layer.small)):
        weights = module.fc1.weight.numel() + module.fc2.weight.numel()
        assert ffn_flops(config, choice) == 2.0 * weights
    assert ffn_flops(config, SKIP) == 0
    fractions = {"small": 0.25, "big": 0.5, "skip": 0.25}
    count = flops_per_token(config, fractions, seq_len=16)
    assert count.ffn == 3 * (0.25 * ffn_flops(config, SMALL) + 0.5 * ffn_flops(config, BIG))
    assert count.lm_head == 2.0 * duo.lm_head.weight.numel()

    projected = tiny_duo(do_layer_norm_before=False, word_embed_proj_dim=24)
    head = projected.lm_head.weight.numel() + 2 * projected.model.project_in.weight.numel()
    assert flops_per_token(projected.config, fractions, seq_len=16).lm_head == 2.0 * head


# --- Llama-family checkpoints through DuoLlama.from_dense -------------------------------------------------


@pytest.mark.numerics
def test_llama_family_from_dense():
    """A Llama-3-style config (GQA, head_dim, biases, llama3 rope scaling, untied head) converts exactly."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **helpers.tiny_llama_kwargs(
            intermediate_size=96,
            num_hidden_layers=2,
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    )
    llama = LlamaForCausalLM(config).eval()
    duo = DuoLlamaForCausalLM.from_dense(llama, route_options=["small", "big"]).eval()
    assert duo.config.rope_parameters["rope_type"] == "llama3" and duo.config.head_dim == 16
    ids, mask = batch(seq_len=24)
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask).logits
        got = duo(ids, attention_mask=mask, routes=torch.full((*ids.shape, 2), BIG)).logits
        # BIG FFN on gathered tokens against the dense FFN: other shapes, float rounding.
        torch.testing.assert_close(got, expected, rtol=0, atol=helpers.FLOAT_TOL)
        torch.testing.assert_close(duo.to_dense().eval()(ids, attention_mask=mask).logits, expected)


def test_learned_routing_shares_the_router_code(tmp_path):
    model = DuoOPTForCausalLM.from_dense(tiny_opt(), route_options=["small", "big", "skip"], routing="learned")
    model.eval()
    assert all(layer.mlp.router is not None for layer in model.model.layers)
    ids, mask = batch()
    out = model(ids, attention_mask=mask)
    assert out.router_logits.shape == (*ids.shape, 3, 3)
    assert torch.equal(out.routes, out.router_logits.argmax(-1))
    model.save_pretrained(tmp_path)
    reloaded = DuoOPTForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, out.logits)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 3)


def test_llama_and_opt_run_one_shared_forward_each():
    """The layer, stack and causal-LM forwards are written once (`modeling_duo_forward.py`), not copied per
    architecture: a copy in a model file would drift from the other."""
    from duo_llm_hf.models import modeling_duo_llama as llama
    from duo_llm_hf.models import modeling_duo_opt as opt

    pairs = [
        (llama.DuoLlamaDecoderLayer, opt.DuoOPTDecoderLayer),
        (llama.DuoLlamaModel, opt.DuoOPTModel),
        (llama.DuoLlamaForCausalLM, opt.DuoOPTForCausalLM),
    ]
    for llama_class, opt_class in pairs:  # transformers wraps each subclass's forward: compare what is wrapped
        llama_forward, opt_forward = inspect.unwrap(llama_class.forward), inspect.unwrap(opt_class.forward)
        assert llama_forward.__code__ is opt_forward.__code__, (llama_class, opt_class)
        assert Path(llama_forward.__code__.co_filename).name == "modeling_duo_forward.py"
