"""Stage 1 training (duo_llm_hf.training.train): learning, exact resume, atomic checkpoints, frozen-big, dense
baseline, early errors on bad input, and the training script."""

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM, flops_per_token
from duo_llm_hf.training.arguments import TrainArguments, parse_arguments
from duo_llm_hf.training.building import build_model, dense_baseline_config, duo_config_from_args
from duo_llm_hf.training.checkpointing import list_checkpoints, resolve_resume
from duo_llm_hf.training.tracking import read_metrics
from duo_llm_hf.training.train import train
from tests.helpers import save_model_folder, tiny_llama_kwargs, tiny_train_args, train_duo_argv

ROOT = Path(__file__).resolve().parents[2]



class Crash(Exception):
    """Stands for a killed process."""


def crash_at(step):
    def callback(state, metrics):
        if state.global_step == step:
            raise Crash(f"killed after step {step}")

    return callback


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    args = tiny_train_args(tmp_path, max_steps=30, learning_rate=1e-2, eval_every=15, log_every=5)
    result = train(args)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    records = read_metrics(Path(args.output_dir) / "logs" / "train_duo" / "metrics.jsonl")
    last = records[-1]
    assert last["step"] == 30 and "train/loss" in last and last["train/tokens"] == 30 * 4 * 16
    for holdout in ("english", "code"):
        for mode in ("random", "all-big", "all-small"):
            assert last[f"eval/{holdout}/{mode}/ppl"] > 1
    assert any(r["step"] == 15 and "eval/code/all-big/loss" in r for r in records)

    model = AutoModelForCausalLM.from_pretrained(args.output_dir)
    tok = AutoTokenizer.from_pretrained(args.output_dir)
    assert isinstance(model, DuoLlamaForCausalLM) and model.config.route_probs == {"small": 0.5, "big": 0.5}
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id


def test_resume_after_kill_gives_the_uninterrupted_losses(tmp_path):
    # 2000 characters make about 8 batches of 4 x 16 tokens: 12 steps of 2 micro-batches cross epochs.
    common = dict(
        builtin_max_chars=2000,
        max_steps=12,
        gradient_accumulation_steps=2,
        checkpoint_every=4,
        checkpoints_to_keep=None,
    )
    full = train(tiny_train_args(tmp_path, "full", **common))

    interrupted = tiny_train_args(tmp_path, "interrupted", **common)
    with pytest.raises(Crash):
        train(interrupted, step_callback=crash_at(6))
    checkpoints = Path(interrupted.output_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_4"]

    resumed = train(tiny_train_args(tmp_path, "interrupted", resume_from="latest", **common))
    assert sorted(resumed.losses) == list(range(5, 13))
    assert resumed.losses == {step: full.losses[step] for step in range(5, 13)}
    assert resumed.tokens_seen == full.tokens_seen
    epochs = [
        r["train/epoch"] for r in read_metrics(checkpoints.parent / "logs" / "train_duo" / "metrics.jsonl")
    ]
    assert max(epochs) >= 1  # the run crossed an epoch boundary after resuming
    full_weights, resumed_weights = weights(full.output_dir), weights(resumed.output_dir)
    # Resumed: the same batches and routes run the same computation, so bit for bit.
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)

    with pytest.raises(ValueError, match="learning_rate: was 0.003, now 0.001"):
        train(tiny_train_args(tmp_path, "interrupted", resume_from="latest", **{**common, "learning_rate": 1e-3}))


def test_crash_while_writing_a_checkpoint_leaves_no_complete_looking_one(tmp_path, monkeypatch):
    common = dict(max_steps=8, checkpoint_every=4, checkpoints_to_keep=None)
    full = train(tiny_train_args(tmp_path, "full", **common))

    original = Accelerator.save_state

    def save_then_die(self, output_dir=None, **kwargs):
        original(self, output_dir, **kwargs)
        if "step_8" in str(output_dir):  # every file written, the rename not yet done
            raise Crash("killed while writing a checkpoint")

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    args = tiny_train_args(tmp_path, "crashed", **common)
    with pytest.raises(Crash):
        train(args)
    monkeypatch.setattr(Accelerator, "save_state", original)
    checkpoints = Path(args.output_dir) / "checkpoints"
    assert (checkpoints / ".tmp-step_8").is_dir() and not (checkpoints / "step_8").exists()
    assert resolve_resume("latest", checkpoints) == checkpoints / "step_4"
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        resolve_resume(str(checkpoints / ".tmp-step_8"), checkpoints)

    resumed = train(tiny_train_args(tmp_path, "crashed", resume_from="latest", **common))
    assert resumed.losses == {step: full.losses[step] for step in range(5, 9)}
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_4", "step_8"]  # the stale .tmp is gone


@pytest.mark.parametrize("source_kind", ["llama", "duo"])
def test_frozen_big_changes_no_frozen_parameter(tmp_path, builtin_tokenizer, source_kind):
    torch.manual_seed(0)
    dims = tiny_llama_kwargs(vocab_size=len(builtin_tokenizer))
    if source_kind == "llama":
        source = LlamaForCausalLM(LlamaConfig(**dims))
        big_path = source.state_dict()
    else:
        source = DuoLlamaForCausalLM(DuoLlamaConfig(**dims))
        big_path = source.to_dense().state_dict()
    folder = save_model_folder(tmp_path / "source", source, builtin_tokenizer)

    args = tiny_train_args(tmp_path, mode="frozen-big", init_from=folder, max_steps=4, learning_rate=1e-2)
    train(args)
    trained = DuoLlamaForCausalLM.from_pretrained(args.output_dir)
    state = trained.state_dict()
    for key, value in big_path.items():
        assert torch.equal(state[key.replace(".mlp.", ".mlp.big.")], value), key

    torch.manual_seed(args.seed)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    initial = build_model(args, builtin_tokenizer).state_dict()
    small_keys = [k for k in state if ".mlp.small." in k]
    assert small_keys and all(not torch.equal(state[k], initial[k]) for k in small_keys)
    if source_kind == "duo":  # the small modules start fresh, not from the source's
        assert not torch.equal(initial[small_keys[0]], source.state_dict()[small_keys[0]])


@pytest.mark.parametrize("p_big,p_skip", [(0.5, 0.0), (0.25, 0.25)])
def test_dense_baseline_flops_match_the_duo_model(tmp_path, p_big, p_skip):
    args = tiny_train_args(tmp_path, p_big=p_big, p_skip=p_skip, small_intermediate_size=8)
    duo = duo_config_from_args(args, vocab_size=300)
    dense = dense_baseline_config(duo)
    assert dense.model_type == "llama" and dense.hidden_size == duo.hidden_size
    duo_flops = flops_per_token(duo, seq_len=16)
    dense_flops = flops_per_token(dense, {"big": 1.0}, seq_len=16)
    assert dense_flops.total == pytest.approx(duo_flops.total, rel=1e-12)
    assert dense_flops.ffn == pytest.approx(duo_flops.ffn, rel=1e-12)


def test_dense_baseline_trains_and_saves_a_llama(tmp_path):
    args = tiny_train_args(tmp_path, mode="dense", max_steps=2, eval_every=1, small_intermediate_size=8)
    result = train(args)
    model = AutoModelForCausalLM.from_pretrained(args.output_dir)
    assert type(model) is LlamaForCausalLM and model.config.intermediate_size == (128 + 8) // 2
    assert set(result.eval_metrics) == {
        f"eval/{h}/dense/{m}" for h in ("english", "code") for m in ("loss", "ppl")
    }


def _bad_inputs(tmp_path, tokenizer):
    """(overrides, error type, message) for each kind of bad input; files are made here."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "hi"}) + "\n")
    short = save_model_folder(
        tmp_path / "short",
        LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(vocab_size=300, max_position_embeddings=8))),
        tokenizer,
    )
    small_vocab = save_model_folder(
        tmp_path / "small_vocab", LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(vocab_size=64))), tokenizer
    )
    no_tok = save_model_folder(tmp_path / "no_tok", LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(vocab_size=300))))
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(gpt2)
    frozen = {"mode": "frozen-big"}
    return [
        (
            {"dataset": str(tmp_path / "missing.jsonl")},
            FileNotFoundError,
            "missing.jsonl' is not an existing file",
        ),
        (
            {"holdout_code": str(tmp_path / "gone")},
            FileNotFoundError,
            "holdout_code: .* not an existing file",
        ),
        ({"tokenizer": str(tmp_path / "no_such_tok")}, FileNotFoundError, "not a tokenizer folder"),
        (
            {**frozen, "init_from": str(tmp_path / "absent")},
            FileNotFoundError,
            "init_from: .* not a model folder",
        ),
        ({"dataset": str(empty)}, ValueError, "empty.jsonl' is empty"),
        ({"dataset": str(tiny)}, ValueError, "no complete block of 16 tokens"),
        (
            {"max_position_embeddings": 8},
            ValueError,
            "block_size 16 is longer than max_position_embeddings 8",
        ),
        (
            {**frozen, "init_from": short},
            ValueError,
            "block_size 16 is longer than the max_position_embeddings 8",
        ),
        (
            {**frozen, "init_from": small_vocab},
            ValueError,
            r"tokenizer has \d+ tokens but init_from .* vocab_size 64",
        ),
        (
            {**frozen, "init_from": str(gpt2)},
            ValueError,
            "'gpt2' model; frozen-big needs a Llama-shaped model",
        ),
        ({**frozen, "init_from": no_tok}, FileNotFoundError, "holds no tokenizer"),
        ({"mode": "frozen-big"}, ValueError, "needs --init-from"),
        ({"p_big": 0.8, "p_skip": 0.3}, ValueError, "together at most 1"),
        ({"resume_from": str(tmp_path / "nowhere")}, ValueError, "not a checkpoint folder"),
    ]


def test_bad_inputs_stop_early_with_clear_errors(tmp_path, builtin_tokenizer):
    for i, (overrides, error, message) in enumerate(_bad_inputs(tmp_path, builtin_tokenizer)):
        args = tiny_train_args(tmp_path, f"bad{i}", **overrides)
        with pytest.raises(error, match=message):
            train(args)
        out = Path(args.output_dir)
        # Nothing was trained: no checkpoint, no model.
        assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists(), overrides


def test_script_and_parser(tmp_path, capsys):
    args = parse_arguments(TrainArguments, ["--output-dir", "x", "--p-big", "0.25", "--mode", "dense", "--no-progress"])
    assert (args.p_big, args.mode, args.progress) == (0.25, "dense", False)
    out = tmp_path / "cli"
    main = runpy.run_path(str(ROOT / "training" / "train_duo.py"))["main"]
    main(train_duo_argv(out, tmp_path / "cache", holdout_code="none"))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2
    printed = capsys.readouterr().out  # where the model went, then its held-out perplexity (as train-router prints)
    assert f"Saved the model to {out} after 2 steps" in printed
    assert re.search(r"\n  english: perplexity random \d+\.\d{3}, all-big \d+\.\d{3}", printed), printed


def test_streamed_local_corpus_trains_and_resumes_exactly(tmp_path):
    from duo_llm_hf.data.corpus import builtin_corpus

    corpus = tmp_path / "stream.jsonl"
    texts = builtin_corpus("train", max_chars=1000)["text"]
    corpus.write_text(
        "".join(json.dumps({"text": t[i : i + 200]}) + "\n" for t in texts for i in range(0, len(t), 200))
    )
    # A few batches per pass over the stream: the 14 steps cross into later, reshuffled epochs.
    common = dict(
        dataset=str(corpus), streaming=True, shuffle_buffer=8, max_steps=14, checkpoint_every=5, log_every=1
    )
    full = train(tiny_train_args(tmp_path, "full", **common))
    with pytest.raises(Crash):
        train(tiny_train_args(tmp_path, "cut", **common), step_callback=crash_at(12))
    resumed = train(tiny_train_args(tmp_path, "cut", resume_from="latest", **common))
    assert resumed.losses == {step: full.losses[step] for step in range(11, 15)}
    assert "eval/code/random/ppl" in full.eval_metrics and resumed.eval_metrics == full.eval_metrics
    epochs = [
        r["train/epoch"] for r in read_metrics(Path(resumed.output_dir) / "logs/train_duo/metrics.jsonl")
    ]
    assert max(epochs) >= 1
