"""The Appendix A finetuning recipe (duo_llm_hf.training.finetune): a tiny OPT with its own tokenizer, saved locally,
becomes a Duo model; only the small FFNs (and the LoRA adapters) change; the result reloads (also with
trust_remote_code); LoRA is merged exactly and resumes exactly; bad input stops early; the script runs."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, OPTConfig, OPTForCausalLM

from duo_llm_hf import BIG, DuoOPTForCausalLM
from duo_llm_hf.cli import COMMANDS
from duo_llm_hf.models.routes import CHOICE_CODES
from duo_llm_hf.oracle.engine import pattern_losses
from duo_llm_hf.oracle.spaces import RouteSpace
from duo_llm_hf.training import finetune as finetuning
from duo_llm_hf.training.arguments import FinetuneArguments, parse_arguments
from duo_llm_hf.training.building import build_model, freeze_all_but_small
from duo_llm_hf.training.finetune import AttentionLoRA, estimate_memory, finetune
from duo_llm_hf.training.router_settings import ROUTER_SETTINGS
from duo_llm_hf.training.routers import train_router
from tests.helpers import (
    FLOAT_TOL,
    save_model_folder,
    tiny_llama_kwargs,
    tiny_opt,
    tiny_opt_kwargs,
    tiny_router_args,
    tiny_run_fields,
)

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 2
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")



@pytest.fixture(scope="module")
def source(tmp_path_factory, builtin_tokenizer):
    """A tiny pre-norm OPT and its tokenizer, saved in one folder as a Hub OPT checkpoint is."""
    tokenizer = builtin_tokenizer
    opt = tiny_opt(
        vocab_size=len(tokenizer),
        num_hidden_layers=LAYERS,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_model_folder(tmp_path_factory.mktemp("opt"), opt, tokenizer), opt, tokenizer


def tiny_args(tmp_path, folder, name="run", **overrides) -> FinetuneArguments:
    values = dict(init_from=folder, max_steps=4, eval_every=0, warmup_steps=1, learning_rate=1e-2, report_to="jsonl")
    return FinetuneArguments(**tiny_run_fields(tmp_path, name, **{**values, **overrides}))


def initial_small_ffns(args, tokenizer) -> dict[str, torch.Tensor]:
    """The small FFNs as the run built them (same seed), before any step."""
    set_seed(args.seed)
    return {k: v for k, v in build_model(args, tokenizer).state_dict().items() if ".mlp.small." in k}


def ids_and_routes(seed=1, vocab=300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    return ids, torch.randint(0, 2, (2, 12, LAYERS), generator=g)


@pytest.mark.numerics
def test_finetune_changes_only_the_small_ffns(tmp_path, source):
    folder, opt, tokenizer = source
    args = tiny_args(tmp_path, folder, eval_every=2)
    result = finetune(args)
    assert sorted(result.losses) == [1, 2, 3, 4]
    assert {f"eval/{s}/{m}/ppl" for s in ("english", "code") for m in ("random", "all-big", "all-small")} <= set(
        result.eval_metrics
    )

    duo = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    assert type(duo) is DuoOPTForCausalLM
    assert duo.config.routing == "random" and duo.config.route_probs == {"small": 0.5, "big": 0.5}
    assert duo.config.small_intermediate_size == 128 // 16
    # Every pretrained weight is unchanged: the big path is the source OPT, bit for bit ...
    big_path, original = duo.to_dense().state_dict(), opt.state_dict()
    assert big_path.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(big_path[key], value), key
    ids, _ = ids_and_routes()
    with torch.no_grad():
        all_big = duo(ids, routes=torch.full((*ids.shape, LAYERS), BIG)).logits
        # The Duo layer runs the BIG FFN on the gathered tokens of its route: other shapes, float rounding.
        torch.testing.assert_close(all_big, opt(ids).logits, rtol=0, atol=FLOAT_TOL)
    # ... and every small FFN was trained.
    trained = duo.state_dict()
    initial = initial_small_ffns(args, tokenizer)
    assert len(initial) == LAYERS * 4  # fc1/fc2 weight and bias per layer
    for key, value in initial.items():
        assert not torch.equal(trained[key], value), key
    # The source's own tokenizer is saved with the model.
    assert AutoTokenizer.from_pretrained(args.output_dir).get_vocab() == tokenizer.get_vocab()


@pytest.mark.numerics
def test_finetune_with_lora_freezes_the_pretrained_weights_and_merges_exactly(tmp_path, source):
    folder, opt, tokenizer = source
    rank = 2
    args = tiny_args(tmp_path, folder, lora=True, lora_r=rank, lora_alpha=4, lora_dropout=0.0, checkpoint_every=4)
    finetune(args)

    # The checkpoint holds the adapters unmerged: the frozen weights there are the source's, bit for bit.
    checkpoint = load_file(str(Path(args.output_dir) / "checkpoints" / "step_4" / "model.safetensors"))
    lora_keys = [k for k in checkpoint if ".lora_" in k]
    assert len(lora_keys) == LAYERS * len(PROJECTIONS) * 2
    assert all(checkpoint[k].abs().sum() > 0 for k in lora_keys if ".lora_B." in k)  # B starts at 0: trained
    original = opt.state_dict()
    frozen = {k: v for k, v in checkpoint.items() if ".lora_" not in k and ".mlp.small." not in k}
    for key, value in frozen.items():
        dense_key = key.replace(".base_layer.", ".").replace("model.", "model.decoder.", 1).replace(".mlp.big.", ".")
        assert torch.equal(value, original[dense_key]), key
    initial = initial_small_ffns(args, tokenizer)
    for key, value in initial.items():
        assert not torch.equal(checkpoint[key], value), key

    # The saved model has the adapters merged: a plain DuoOPT, no LoRA keys, the same outputs as the LoRA model.
    merged = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    assert type(merged) is DuoOPTForCausalLM and not any("lora" in k for k in merged.state_dict())
    unmerged = AttentionLoRA(rank, 4, 0.0).add(DuoOPTForCausalLM.from_dense(OPTForCausalLM.from_pretrained(folder)))
    unmerged.load_state_dict(checkpoint, strict=False)
    unmerged.eval()
    ids, routes = ids_and_routes()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids, routes=routes).logits, unmerged(ids, routes=routes).logits, rtol=1e-5, atol=1e-5
        )
    # Only the attention projections changed, each by a rank <= r update; everything else is the source's.
    big_path = merged.to_dense().state_dict()
    for key, value in original.items():
        if key.endswith(".weight") and any(f".{p}." in key for p in PROJECTIONS):
            delta = big_path[key] - value
            assert 0 < torch.linalg.matrix_rank(delta).item() <= rank, key
        else:
            assert torch.equal(big_path[key], value), key


def test_lora_run_resumes_exactly(tmp_path, source):
    folder, _, _ = source
    common = dict(max_steps=6, checkpoint_every=3, lora=True, lora_r=2, lora_dropout=0.0)
    full = finetune(tiny_args(tmp_path, folder, "full", **common))

    def crash_at_4(state, metrics):
        if state.global_step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_args(tmp_path, folder, "crashed", **common), step_callback=crash_at_4)
    resumed = finetune(tiny_args(tmp_path, folder, "crashed", resume_from="latest", **common))
    assert resumed.losses == {step: full.losses[step] for step in (4, 5, 6)}
    full_weights = load_file(str(Path(full.output_dir) / "model.safetensors"))
    resumed_weights = load_file(str(Path(resumed.output_dir) / "model.safetensors"))
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)
    with pytest.raises(ValueError, match="lora_r: was 2, now 4"):
        finetune(tiny_args(tmp_path, folder, "crashed", resume_from="latest", **{**common, "lora_r": 4}))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, source):
    """The output folder of a short run of the Appendix A recipe: small / big routing at p_big 0.5, LoRA."""
    folder, _, _ = source
    args = tiny_args(tmp_path_factory.mktemp("finetuned"), folder, max_steps=2, lora=True, lora_r=2)
    finetune(args)
    return args.output_dir


@pytest.fixture(scope="module")
def finetuned_with_skip(tmp_path_factory, source):
    """The output folder of a short LoRA finetuning run that also trained the skip route (p_skip > 0)."""
    folder, _, _ = source
    args = tiny_args(
        tmp_path_factory.mktemp("finetuned_skip"), folder, max_steps=2, lora=True, lora_r=2, p_big=0.4, p_skip=0.2
    )
    finetune(args)
    return args.output_dir


@pytest.mark.numerics
@pytest.mark.slow
def test_finetuned_model_loads_with_trust_remote_code(tmp_path, finetuned):
    ids, routes = ids_and_routes()
    model = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    with torch.no_grad():
        expected = model(ids, routes=routes).logits
    torch.save({"ids": ids, "routes": routes}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["duo_llm_hf"] = None  # the installed package must not be used
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({finetuned!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "DuoOPTForCausalLM", type(model)
        assert not type(model).__module__.startswith("duo_llm_hf"), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained({finetuned!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(inputs["ids"], routes=inputs["routes"]).logits
            prompt = tokenizer("def main", return_tensors="pt")
            out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == prompt["input_ids"].shape[1] + 3, out.shape
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Another process with weights loaded at other addresses: memory alignment can change how tiny GEMMs round.
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=FLOAT_TOL)


@pytest.mark.numerics
def test_oracle_prefix_tree_equals_naive_forwards_on_the_finetuned_model(finetuned_with_skip):
    model = AutoModelForCausalLM.from_pretrained(finetuned_with_skip).eval()
    assert model.config.route_options == ["small", "big", "skip"]
    space = RouteSpace.from_config(model.config, ["all"])
    assert space.size == 3**LAYERS
    ids, _ = ids_and_routes()
    labels = ids.clone()
    labels[0, 5] = -100  # a position without a target
    patterns, table = pattern_losses(model, ids, space, labels=labels, chunk_tokens=10)
    with torch.no_grad():
        naive = torch.stack([model(ids, labels=labels, routes=p.expand(*ids.shape, -1)).token_losses for p in patterns])
        # Tree chunks, naive forwards and the routing mode's chunks batch other shapes: float rounding.
        torch.testing.assert_close(table, naive, rtol=0, atol=FLOAT_TOL)
        oracle = model(ids, labels=labels, routing="oracle")
    torch.testing.assert_close(oracle.token_losses, table.amin(0), rtol=0, atol=FLOAT_TOL)


@pytest.mark.parametrize("setting", sorted(ROUTER_SETTINGS))
def test_routers_train_on_the_finetuned_model_in_each_appendix_a_setting(tmp_path, finetuned, setting):
    args = tiny_router_args(tmp_path, finetuned, setting, target_usage=None, setting=setting, max_steps=3)
    report = train_router(args).report
    preset = ROUTER_SETTINGS[setting]
    assert report["route_options"] == preset["route_options"] and report["target_usage"] == preset["target_usage"]
    for entry in report["holdouts"].values():  # only the setting's choices are taken, at hard (argmax) routing
        overall = entry["realised"]["overall"]
        assert sum(overall.values()) == pytest.approx(1.0)
        assert all(
            overall.get(name, 0.0) == 0.0 for name in ("small", "big", "skip") if name not in preset["route_options"]
        )

    routed = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    assert type(routed) is DuoOPTForCausalLM and routed.config.routing == "learned"
    assert routed.config.route_options == preset["route_options"]
    # The routers train on top: every weight of the finetuned model is unchanged.
    duo_state = AutoModelForCausalLM.from_pretrained(finetuned).state_dict()
    routed_state = routed.state_dict()
    assert {k for k in routed_state if ".mlp.router." not in k} == set(duo_state)
    assert all(torch.equal(routed_state[k], v) for k, v in duo_state.items())
    ids, _ = ids_and_routes()
    with torch.no_grad():
        routes = routed(ids).routes
    allowed = [CHOICE_CODES[name] for name in preset["route_options"]]
    assert torch.isin(routes, torch.tensor(allowed)).all()


def test_bad_inputs_stop_early_with_clear_errors(tmp_path, source):
    folder, _, tokenizer = source
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(gpt2)
    short_opt = OPTForCausalLM(OPTConfig(**tiny_opt_kwargs(vocab_size=len(tokenizer), max_position_embeddings=8)))
    short = save_model_folder(tmp_path / "short", short_opt, tokenizer)
    cases = [
        ({"init_from": None}, ValueError, "give the pretrained model"),
        ({"init_from": str(tmp_path / "absent")}, FileNotFoundError, "not a model folder"),
        ({"init_from": str(gpt2)}, ValueError, "'gpt2' model; frozen-big needs a Llama-shaped model or an OPT"),
        ({"init_from": short}, ValueError, "block_size 16 is longer than the max_position_embeddings 8"),
        ({"lora": True, "lora_r": 0}, ValueError, "lora_r: 0 must be a positive integer"),
        ({"lora": True, "lora_dropout": 1.0}, ValueError, r"lora_dropout: 1.0 must be in \[0, 1\)"),
        ({"lora": True, "lora_target_modules": " , "}, ValueError, "lora_target_modules: name at least one"),
        ({"lora": True, "lora_target_modules": "no_such_proj"}, ValueError, "no_such_proj"),
    ]
    for i, (overrides, error, message) in enumerate(cases):
        args = tiny_args(tmp_path, folder, f"bad{i}", **overrides)
        with pytest.raises(error, match=message):
            finetune(args)
        assert not (Path(args.output_dir) / "model.safetensors").exists(), overrides


def test_script_and_parser(tmp_path, source, monkeypatch, capsys):
    folder, _, _ = source
    args = parse_arguments(
        FinetuneArguments,
        ["--output-dir", "x", "--model-name-or-path", "facebook/opt-1.3b", "--lora", "--lora-r", "8", "--p-big", "0.3"]
    )
    assert (args.init_from, args.mode, args.lora, args.lora_r) == ("facebook/opt-1.3b", "frozen-big", True, 8)
    assert args.p_big == 0.3
    with pytest.raises(ValueError, match="--hidden-size"):  # the checkpoint gives the shape: no from-scratch flags
        parse_arguments(FinetuneArguments, ["--output-dir", "x", "--init-from", folder, "--hidden-size", "64"])
    assert COMMANDS["finetune"].load() is finetuning.main  # duo-llm finetune runs the same function

    # The script, given a Hub name: the tiny OPT sits in a Hub cache and is read offline, as a download is.
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-opt" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "cli"
    argv = f"--init-from tiny-org/tiny-opt --output-dir {out} --builtin-max-chars 2000 --block-size 16 --batch-size 2 "
    argv += "--max-steps 2 --eval-every 0 --eval-blocks 1 --report-to none --no-progress --lora --lora-r 2 "
    argv += f"--cache-dir {tmp_path / 'cache'}"
    main = runpy.run_path(str(ROOT / "training" / "finetune_duo_opt.py"))["main"]
    main(argv.split())
    assert f"Saved the finetuned Duo model to {out} after 2 steps" in capsys.readouterr().out
    assert type(AutoModelForCausalLM.from_pretrained(out)) is DuoOPTForCausalLM


def test_memory_estimate_counts_the_parameters_of_the_run(source):
    folder, opt, _ = source
    duo = DuoOPTForCausalLM.from_dense(opt)
    estimate = estimate_memory(opt.config)
    assert estimate.total_parameters == sum(p.numel() for p in duo.parameters())
    assert estimate.small_parameters == sum(p.numel() for n, p in duo.named_parameters() if ".mlp.small." in n)
    assert estimate.lora_parameters == 0
    assert estimate.static_bytes == 4 * estimate.total_parameters + 12 * estimate.small_parameters

    with_lora = estimate_memory(opt.config, lora_r=2)
    freeze_all_but_small(duo)  # as the run freezes the model before the adapters are added
    adapted = AttentionLoRA(r=2).add(duo)
    assert with_lora.trainable_parameters == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert with_lora.lora_parameters == sum(p.numel() for n, p in adapted.named_parameters() if ".lora_" in n) > 0


def test_lora_defaults_to_the_attention_of_llama_family_models_too():
    from transformers import LlamaConfig, LlamaForCausalLM

    from duo_llm_hf import DuoLlamaForCausalLM

    config = LlamaConfig(**tiny_llama_kwargs())
    duo = DuoLlamaForCausalLM.from_dense(LlamaForCausalLM(config))
    freeze_all_but_small(duo)
    adapted = AttentionLoRA(r=2).add(duo)
    adapted_names = {n.split(".")[-4] for n, _ in adapted.named_parameters() if ".lora_A." in n}
    assert adapted_names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    lora = sum(p.numel() for n, p in adapted.named_parameters() if ".lora_" in n)
    assert estimate_memory(config, lora_r=2).lora_parameters == lora
