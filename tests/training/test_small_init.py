"""Where a finetuning run's small FFNs start (training/small_init.py) and how its p_big moves: a small FFN sliced
from its big FFN equals the big FFN with the other neurons zeroed (Llama and OPT, both rankings); distillation
trains only the small FFNs, lowers their error and is reproducible; the p_big schedule and RouteSampler.set_probs;
the flags' checks and fingerprint; a tiny finetuning run with every flag."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from duo_llm_hf import DuoOPTForCausalLM
from duo_llm_hf.models.routes import BIG, SKIP, SMALL, RouteSampler
from duo_llm_hf.training.arguments import FinetuneArguments
from duo_llm_hf.training.fingerprint import ADDED_FIELDS
from duo_llm_hf.training.small_init import (
    distill_small_ffns,
    duo_ffns,
    ffn_projections,
    neuron_scores,
    sample_blocks,
    slice_small_ffns,
    top_neurons,
)
from duo_llm_hf.utils.errors import UsageError
from tests.helpers import save_model_folder, tiny_opt, tiny_run_fields

VOCAB = 96


@pytest.fixture(params=["llama", "opt"])
def duo(request, tiny_model):
    """A tiny Duo model of each architecture (Llama: inner 64 -> small 8; OPT: 128 -> 8), eval mode."""
    if request.param == "llama":
        return tiny_model(seed=0)
    return DuoOPTForCausalLM.from_dense(tiny_opt(seed=0), small_intermediate_size=8).eval()


def blocks(n: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def zero_other_neurons(big: torch.nn.Module, kept: torch.Tensor) -> None:
    """Zero every inner neuron of ``big`` but ``kept``: its input rows (and biases) and output columns."""
    inputs, output = ffn_projections(big)
    others = torch.ones(output.in_features, dtype=torch.bool)
    others[kept] = False
    with torch.no_grad():
        for projection in inputs:
            projection.weight[others] = 0
            if projection.bias is not None:
                projection.bias[others] = 0
        output.weight[:, others] = 0


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["slice-weight", "slice-activation"])
def test_sliced_small_ffn_is_the_big_ffn_with_the_other_neurons_zeroed(duo, method):
    scores = neuron_scores(duo, method, blocks(), batch_size=4)
    assert [tuple(s.shape) for s in scores] == [(ffn_projections(ffn.big)[1].in_features,) for ffn in duo_ffns(duo)]
    kept = slice_small_ffns(duo, scores)
    x = torch.randn(5, duo.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for ffn, index, score in zip(duo_ffns(duo), kept, scores):
        assert len(index) == 8 and torch.equal(index, index.sort().values)
        assert torch.equal(index, top_neurons(score, 8))
        assert score[index].min() >= score[~torch.isin(torch.arange(len(score)), index)].max()
        zero_other_neurons(ffn.big, index)
        torch.testing.assert_close(ffn.small(x), ffn.big(x), rtol=1e-6, atol=1e-6)


def test_the_two_rankings_differ_and_activation_ranking_reads_the_blocks(tiny_model):
    model = tiny_model(seed=0)
    weight = neuron_scores(model, "slice-weight")
    first = neuron_scores(model, "slice-activation", blocks(seed=0), batch_size=4)
    again = neuron_scores(model, "slice-activation", blocks(seed=0), batch_size=3)
    other = neuron_scores(model, "slice-activation", blocks(seed=5), batch_size=4)
    for w, a, b, c in zip(weight, first, again, other):
        torch.testing.assert_close(a, b)  # the same blocks in other batches: the same mean
        assert not torch.allclose(a, c) and not torch.allclose(a / a.sum(), w / w.sum())
    with pytest.raises(ValueError, match="calibration blocks"):
        neuron_scores(model, "slice-activation")
    with pytest.raises(ValueError, match="slice-norm"):
        neuron_scores(model, "slice-norm")


def test_distillation_trains_only_the_small_ffns_lowers_their_error_and_repeats(duo):
    before = {name: p.clone() for name, p in duo.named_parameters()}
    twin = copy.deepcopy(duo)
    data = blocks(8)

    def distill(model):
        return distill_small_ffns(
            model, data, steps=30, batch_size=4, learning_rate=1e-2, generator=torch.Generator().manual_seed(0)
        )

    results = distill(duo)
    assert results["distill/relative_error_end"] < 0.8 * results["distill/relative_error_start"]
    for name, param in duo.named_parameters():
        assert torch.equal(param, before[name]) == (".mlp.small." not in name), name
    assert distill(twin) == results
    for (name, a), b in zip(duo.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_a_layers_loss_reaches_its_own_small_ffn_only(tiny_model):
    """Distilling with one layer's target changed moves only that layer's small FFN differently."""
    model, twin = tiny_model(seed=0), tiny_model(seed=0)
    data = blocks(4)
    with torch.no_grad():  # layer 2's big FFN differs: layers 0 and 1 see the same inputs and targets
        ffn_projections(duo_ffns(twin)[2].big)[1].weight.mul_(2.0)
    for m in (model, twin):
        distill_small_ffns(m, data, steps=3, batch_size=2, learning_rate=1e-2, generator=torch.Generator())
    for layer, (a, b) in enumerate(zip(duo_ffns(model), duo_ffns(twin))):
        same = all(torch.equal(p, q) for p, q in zip(a.small.parameters(), b.small.parameters()))
        assert same == (layer < 2), layer


def test_sample_blocks_draws_reproducibly_from_a_corpus():
    import datasets

    corpus = datasets.Dataset.from_dict({"input_ids": blocks(10).tolist()}).with_format("torch")
    a = sample_blocks(corpus, 4, torch.Generator().manual_seed(0))
    assert a.shape == (4, 12) and torch.equal(a, sample_blocks(corpus, 4, torch.Generator().manual_seed(0)))
    assert torch.equal(sample_blocks(corpus, 20, torch.Generator()), blocks(10))  # a shorter corpus: all of it
    stream = corpus.to_iterable_dataset()
    assert torch.equal(sample_blocks(stream, 3, torch.Generator()), blocks(10)[:3])


def test_set_probs_keeps_the_draws_and_never_draws_a_zero_probability():
    fixed = RouteSampler({"small": 0.5, "big": 0.5}, seed=3)
    moved = RouteSampler({"small": 0.5, "big": 0.5}, seed=3)
    moved.set_probs({"small": 0.5, "big": 0.5})
    assert torch.equal(fixed.sample((4, 50, 3)), moved.sample((4, 50, 3)))
    moved.set_probs({"small": 0.0, "big": 1.0, "skip": 0.0})
    assert (moved.sample((4, 50, 3)) == BIG).all()
    moved.set_probs({"small": 0.25, "big": 0.0, "skip": 0.75})
    draws = moved.sample((8, 100, 3))
    assert not (draws == BIG).any() and 0.2 < (draws == SMALL).float().mean() < 0.3 and (draws == SKIP).any()
    with pytest.raises(ValueError, match="probability > 0"):
        moved.set_probs({"small": 0.0, "big": 0.0})


def finetune_args(tmp_path, folder="unused", name="run", **overrides) -> FinetuneArguments:
    values = dict(init_from=folder, max_steps=4, eval_every=0, warmup_steps=1, learning_rate=1e-2, report_to="jsonl")
    return FinetuneArguments(**tiny_run_fields(tmp_path, name, **{**values, **overrides}))


def test_p_big_moves_from_its_start_to_p_big_over_the_decay_fraction(tmp_path):
    args = finetune_args(tmp_path, p_big=0.5, p_skip=0.2, p_big_start=1.0, p_big_decay_fraction=0.5)
    assert args.route_probs_at(0, 10) == {"small": 0.0, "skip": 0.0, "big": 1.0}
    mid = args.route_probs_at(2, 10)  # 2 of the 5 decay steps
    assert mid["big"] == pytest.approx(0.8) and mid["skip"] / mid["small"] == pytest.approx(0.2 / 0.3)
    assert sum(mid.values()) == pytest.approx(1.0)
    for step in (5, 7, 10):
        assert args.route_probs_at(step, 10) == pytest.approx(args.route_probs())
    constant = finetune_args(tmp_path, p_big=0.5)
    assert constant.route_probs_at(0, 10) == constant.route_probs() == {"small": 0.5, "big": 0.5}
    rising = finetune_args(tmp_path, p_big=1.0, p_big_start=0.0, p_big_decay_fraction=1.0)
    assert rising.route_probs_at(0, 4) == {"small": 1.0, "big": 0.0}
    assert rising.route_probs_at(1, 4) == {"small": 0.75, "big": 0.25}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("small_init", "slice", "small_init: 'slice' is not an initialisation"),
        ("distill_steps", -1, "distill_steps"),
        ("distill_learning_rate", 0.0, "distill_learning_rate"),
        ("p_big_start", 1.5, "p_big_start: 1.5 must be a probability"),
        ("p_big_decay_fraction", 0.0, "p_big_decay_fraction: 0.0 must be in"),
        ("p_big_decay_fraction", 1.5, "p_big_decay_fraction"),
    ],
)
def test_bad_start_flags_are_refused(tmp_path, finetune_source, field, value, message):
    with pytest.raises(UsageError, match=message):
        finetune_args(tmp_path, finetune_source, **{field: value}).validate()


def test_the_fingerprint_holds_the_new_fields_only_when_set(tmp_path):
    from accelerate import Accelerator

    from duo_llm_hf.training.fingerprint import training_fingerprint

    default = training_fingerprint(finetune_args(tmp_path), Accelerator(cpu=True))
    assert not set(ADDED_FIELDS) & set(default)  # what a run written before these flags has
    for name, value in [("small_init", "slice-weight"), ("distill_steps", 3), ("p_big_start", 0.9)]:
        changed = training_fingerprint(finetune_args(tmp_path, **{name: value}), Accelerator(cpu=True))
        assert changed[name] == value and {k: v for k, v in changed.items() if k != name} == default


@pytest.fixture(scope="module")
def finetune_source(tmp_path_factory, builtin_tokenizer):
    tokenizer = builtin_tokenizer
    opt = tiny_opt(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_model_folder(tmp_path_factory.mktemp("opt"), opt, tokenizer)


@pytest.mark.slow
def test_a_finetuning_run_slices_distils_and_schedules_p_big(tmp_path, finetune_source, capsys, monkeypatch):
    from duo_llm_hf.training.finetune import finetune

    drawn = []
    set_probs = RouteSampler.set_probs

    def record(sampler, probs):
        drawn.append(probs["big"])
        set_probs(sampler, probs)

    monkeypatch.setattr(RouteSampler, "set_probs", record)
    args = finetune_args(
        tmp_path,
        finetune_source,
        small_init="slice-activation",
        distill_steps=4,
        p_big_start=1.0,
        p_big_decay_fraction=0.5,
        max_steps=4,
    )
    result = finetune(args)
    out = capsys.readouterr().out
    assert "sliced the top 8 neurons" in out and "distilled 4 steps" in out
    saved = json.loads((Path(result.output_dir) / "train_results.json").read_text())
    assert saved["distill/relative_error_end"] < saved["distill/relative_error_start"]
    steps = [1.0, 0.75, 0.5, 0.5]  # the 4 steps' p_big (samplers built for loading and evaluation come between)
    assert any(drawn[i : i + 4] == steps for i in range(len(drawn))), drawn
    model = DuoOPTForCausalLM.from_pretrained(result.output_dir)
    assert model.config.route_probs == {"small": 0.5, "big": 0.5}
    assert (
        dataclasses.asdict(args)["small_init"]
        == json.loads((Path(result.output_dir) / "training_args.json").read_text())["small_init"]
    )


@pytest.mark.slow
def test_a_resumed_run_keeps_its_start_and_draws_with_the_p_big_of_its_step(tmp_path, finetune_source, capsys):
    """Crashed after step 4 of 6 and resumed: no second slice or distillation, and the same losses and weights as
    the run that was not interrupted (the p_big of steps 5 and 6 comes from the step, not from the start)."""
    from safetensors.torch import load_file

    from duo_llm_hf.training.finetune import finetune

    common = dict(
        small_init="slice-weight",
        distill_steps=2,
        p_big_start=0.9,
        p_big_decay_fraction=1.0,
        max_steps=6,
        checkpoint_every=2,
    )
    full = finetune(finetune_args(tmp_path, finetune_source, name="full", **common))

    def crash_at_4(state, _metrics):
        if state.global_step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(finetune_args(tmp_path, finetune_source, name="crashed", **common), step_callback=crash_at_4)
    capsys.readouterr()
    resumed = finetune(finetune_args(tmp_path, finetune_source, name="crashed", resume_from="latest", **common))
    assert "small FFNs" not in capsys.readouterr().out
    assert resumed.losses == {step: full.losses[step] for step in (5, 6)}
    weights = [load_file(str(Path(run.output_dir) / "model.safetensors")) for run in (full, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
