"""Router training (duo_llm_hf.training.routers): budget tracking, frozen Duo weights, exact resume, the report,
the paper's settings, early errors on bad input, and the script."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from duo_llm_hf import BIG, SKIP, DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.data.corpus import pack_corpus
from duo_llm_hf.data.tokenization import load_tokenizer
from duo_llm_hf.experiments.router_comparison import ComparisonArguments, compare_routers, comparison_table
from duo_llm_hf.models.routed_ffn import router_probabilities, router_temperature, routers
from duo_llm_hf.oracle.results import OracleResult
from duo_llm_hf.training.arguments import parse_arguments
from duo_llm_hf.training.checkpointing import list_checkpoints
from duo_llm_hf.training.loaders import load_corpora, make_eval_loaders
from duo_llm_hf.training.router_arguments import RouterTrainArguments, parse_target_usage_flag, target_usage_flag
from duo_llm_hf.training.router_evaluation import evaluate_router
from duo_llm_hf.training.router_oracle import (
    compute_oracle_targets,
    oracle_target_blocks,
    router_agreement,
    targets_folder,
)
from duo_llm_hf.training.routers import add_routers, train_router
from duo_llm_hf.training.train import train
from duo_llm_hf.utils.loading import load_duo_model
from duo_llm_hf.utils.run_files import ROUTER_REPORT_FILE
from tests.helpers import save_model_folder, tiny_llama_kwargs, tiny_opt_kwargs, tiny_router_args, tiny_train_args

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 2



def duo_folder(folder: Path, tokenizer, seed: int = 0, **overrides) -> str:
    """A tiny DuoLlama model (random weights stand for a stage 1 model) saved with the tokenizer."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        small_intermediate_size=8,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    fields.update(overrides)
    return save_model_folder(folder, DuoLlamaForCausalLM(DuoLlamaConfig(**fields)), tokenizer)


@pytest.fixture(scope="module")
def source(tmp_path_factory, builtin_tokenizer):
    return duo_folder(tmp_path_factory.mktemp("source"), builtin_tokenizer)


def duo_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".mlp.router." not in k}


def test_routers_move_to_the_budget_and_the_duo_weights_stay(tmp_path, source, builtin_tokenizer):
    args = tiny_router_args(tmp_path, source, max_steps=12, learning_rate=0.05, alpha=5.0)
    # The realised BIG fraction of the fresh routers (same seed) on the held-out blocks, before training.
    fresh = add_routers(load_duo_model(source), ["small", "big"], seed=args.seed)
    _, holdouts = load_corpora(args)
    loaders = make_eval_loaders(holdouts, builtin_tokenizer, args)
    before = evaluate_router(fresh, loaders)["all"]["realised"]["overall"]["big"]
    target = 0.9 if before < 0.5 else 0.1
    args.target_usage = str(target)

    result = train_router(args)
    report = result.report
    after = report["holdouts"]["all"]["realised"]["overall"]["big"]
    assert abs(after - target) < 0.5 * abs(before - target), (before, after, target)
    assert json.loads((Path(args.output_dir) / ROUTER_REPORT_FILE).read_text()) == report

    trained = AutoModelForCausalLM.from_pretrained(args.output_dir)
    assert trained.config.routing == "learned" and len(routers(trained)) == LAYERS
    assert report["temperature_final"] == pytest.approx(args.temperature_end)
    source_state = load_file(str(Path(source) / "model.safetensors"))
    trained_state = trained.state_dict()
    assert duo_weights(trained_state).keys() == source_state.keys()
    assert all(torch.equal(trained_state[k], v) for k, v in source_state.items())
    fresh_state = fresh.state_dict()
    router_keys = [k for k in trained_state if ".mlp.router." in k]
    assert router_keys and all(not torch.equal(trained_state[k], fresh_state[k]) for k in router_keys)

    # The report: per-layer and overall fractions, usage counts, perplexity and FLOPs of each held-out set.
    assert report["route_options"] == ["small", "big"] and report["target_usage"] == {"big": target}
    assert set(report["holdouts"]) == {"english", "code", "all"}
    for entry in report["holdouts"].values():
        realised = entry["realised"]
        assert len(realised["per_layer"]) == LAYERS
        assert sum(realised["overall"].values()) == pytest.approx(1.0)
        assert all(sum(layer.values()) == pytest.approx(1.0) for layer in realised["per_layer"])
        usage = torch.tensor(entry["usage"])
        assert usage.shape == (3, LAYERS, 16) and usage.sum() == 16 * LAYERS * (entry["tokens"] // 15)
        assert realised["overall"]["big"] == pytest.approx((usage[BIG].sum() / usage.sum()).item())
        assert entry["ppl"] > 1 and 0 < entry["flops_per_token"] < report["flops_per_token_all_big"]
    assert report["holdouts"]["all"]["tokens"] == sum(report["holdouts"][h]["tokens"] for h in ("english", "code"))


class Crash(Exception):
    """Stands for a killed process."""


def test_resume_gives_the_uninterrupted_run(tmp_path, source):
    common = dict(max_steps=8, gradient_accumulation_steps=2, checkpoint_every=3, checkpoints_to_keep=None)
    full = train_router(tiny_router_args(tmp_path, source, "full", **common))

    def crash_after_5(state, metrics):
        if state.global_step == 5:
            raise Crash("killed after step 5")

    interrupted = tiny_router_args(tmp_path, source, "interrupted", **common)
    with pytest.raises(Crash):
        train_router(interrupted, step_callback=crash_after_5)
    checkpoints = Path(interrupted.output_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_3"]

    resumed = train_router(tiny_router_args(tmp_path, source, "interrupted", resume_from="latest", **common))
    assert sorted(resumed.losses) == list(range(4, 9))
    assert resumed.losses == {step: full.losses[step] for step in range(4, 9)}
    assert resumed.report["holdouts"] == full.report["holdouts"]
    full_state, resumed_state = (load_file(str(Path(r.output_dir) / "model.safetensors")) for r in (full, resumed))
    # Resumed: the same batches and temperatures run the same computation, so bit for bit.
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)

    changed = {**common, "alpha": 2.0}
    with pytest.raises(ValueError, match=r"alpha: was 1.0, now 2.0"):
        train_router(tiny_router_args(tmp_path, source, "interrupted", resume_from="latest", **changed))


def test_three_way_setting_through_the_script(tmp_path, source):
    out = tmp_path / "script"
    main = runpy.run_path(str(ROOT / "training" / "train_router.py"))["main"]
    main(
        [
            "--model",
            source,
            "--output-dir",
            str(out),
            "--setting",
            "big50-small30-skip20",
            "--builtin-max-chars",
            "3000",
            "--block-size",
            "16",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--eval-blocks",
            "1",
            "--holdout-code",
            "none",
            "--report-to",
            "none",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]  # fmt: skip
    )
    report = json.loads((out / ROUTER_REPORT_FILE).read_text())
    assert report["setting"] == "big50-small30-skip20"
    assert report["route_options"] == ["small", "big", "skip"]
    assert report["target_usage"] == {"small": 0.3, "big": 0.5, "skip": 0.2}
    assert set(report["holdouts"]) == {"english"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.route_options == ["small", "big", "skip"]
    assert all(r.choices == (0, 1, 2) for r in routers(model))
    assert (out / "tokenizer.json").is_file() and (out / "training_args.json").is_file()


def test_teacher_forced_router_logits_match_learned_routing(source):
    model = add_routers(load_duo_model(source), ["small", "big", "skip"], seed=1).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    learned = model(input_ids=ids, routing="learned")
    forced = model(input_ids=ids, routes=learned.routes, output_router_logits=True)
    assert torch.equal(forced.routes, learned.routes)
    torch.testing.assert_close(forced.router_logits, learned.router_logits)
    torch.testing.assert_close(forced.logits, learned.logits)
    assert model(input_ids=ids, routes=learned.routes).router_logits is None  # only when asked


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> str:
    """A briefly trained stage 1 model (2 layers), so that the oracle's choices depend on the text."""
    folder = tmp_path_factory.mktemp("stage1")
    args = tiny_train_args(
        folder,
        "model",
        num_layers=LAYERS,
        max_steps=30,
        learning_rate=1e-2,
        report_to="none",
        holdout_english="none",
        holdout_code="none",
    )
    train(args)
    return args.output_dir


def test_stored_oracle_targets_round_trip(tmp_path, stage1):
    """The oracle's targets are an oracle result folder: read back, they give the routes the engine found, under
    the exact budget, for the independent and the causal oracle; a budget not computed is refused."""
    model = load_duo_model(stage1)
    blocks = torch.randint(0, model.config.vocab_size, (3, 16))
    result = compute_oracle_targets(
        model, blocks, ["big=1"], tmp_path / "targets", causal=True, batch_size=2, progress=False
    )
    again = OracleResult.load(tmp_path / "targets")
    for causal, method in ((False, "oracle"), (True, "causal_oracle")):
        rows = oracle_target_blocks(again, "big=1", causal)
        assert len(rows) == 3
        torch.testing.assert_close(rows[:]["routes"], result.routes("big=1", method), rtol=0, atol=0)
        torch.testing.assert_close(rows[:]["input_ids"], blocks, rtol=0, atol=0)
        mask = rows[:]["token_mask"]
        assert mask.dtype == torch.bool and not mask[:, -1].any() and mask[:, :-1].all()
        assert (rows[:]["routes"][mask] == BIG).sum(-1).eq(1).all()  # exactly one BIG layer of 2
    with pytest.raises(ValueError, match="not 'big=2'"):
        oracle_target_blocks(again, 2)


@pytest.mark.slow
def test_distilled_router_learns_the_oracles_choices(tmp_path, stage1):
    args = tiny_router_args(
        tmp_path,
        stage1,
        supervision="oracle",
        alpha=0.0,
        temperature_schedule="constant",
        batch_size=8,
        max_steps=40,
        learning_rate=0.05,
        eval_blocks=4,
        eval_every=20,
        oracle_blocks=64,
        holdout_code="none",
    )
    result = train_router(args)
    report = result.report
    assert report["supervision"] == "oracle" and report["oracle_budget"] == "big=1"  # 0.5 of 2 layers
    assert 0 < report["train_oracle_agreement_last_window"] <= 1
    realised = report["holdouts"]["english"]["realised"]
    assert len(realised["per_layer"]) == LAYERS and sum(realised["overall"].values()) == pytest.approx(1.0)
    # Its training loss (cross-entropy towards the stored oracle routes) goes down.
    losses = [result.losses[step] for step in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.01, losses

    # The targets were computed once, by the oracle engine, on the first training blocks, and stored.
    stored = OracleResult.load(targets_folder(args.output_dir))
    train_texts, _ = load_corpora(args)
    packed = pack_corpus(train_texts, load_tokenizer(args.output_dir), 16)
    count = min(64, len(packed))
    torch.testing.assert_close(stored.tensors["input_ids"], packed["input_ids"][:count], rtol=0, atol=0)
    rows = oracle_target_blocks(stored, "big=1")
    blocks, routes, mask = rows[:]["input_ids"], rows[:]["routes"], rows[:]["token_mask"]

    # On those blocks, each layer's hard choice (teacher forced on the oracle's route) agrees with the oracle
    # more often than the fresh routers do, and more often than always taking each layer's commoner choice.
    trained = load_duo_model(args.output_dir)
    fresh = add_routers(load_duo_model(stage1), ["small", "big"], seed=args.seed)
    agreement = {}
    for name, model in (("trained", trained), ("fresh", fresh)):
        logits = model(input_ids=blocks, routes=routes, output_router_logits=True).router_logits
        probs = router_probabilities(logits, router_temperature(model))
        agreement[name] = router_agreement(probs, routes, mask)
        if name == "trained":
            # Calibrated on these blocks: each layer's hard choices take BIG as often as the oracle's.
            hard_big = (probs.argmax(-1) == BIG)[mask].double().mean(0)
            torch.testing.assert_close(hard_big, (routes[mask] == BIG).double().mean(0), atol=0.01, rtol=0)
    p_big = (routes[mask] == BIG).double().mean(0)
    majority = torch.maximum(p_big, 1 - p_big).mean().item()
    assert agreement["trained"] > max(majority, agreement["fresh"]) + 0.05, (agreement, majority)
    calibration = report["oracle_calibration"]
    assert calibration["blocks"] == count
    assert len(calibration["bias_offsets"]) == LAYERS and calibration["agreement_after"] == pytest.approx(
        agreement["trained"]
    )

    # A second router reads the stored targets instead of running the oracle again.
    reader = tiny_router_args(
        tmp_path, stage1, "reader", supervision="oracle", oracle_targets=str(targets_folder(args.output_dir)),
        max_steps=2, batch_size=8, holdout_code="none",
    )  # fmt: skip
    train_router(reader)
    assert not targets_folder(reader.output_dir).exists()


@pytest.mark.slow
def test_distilled_router_on_a_streamed_corpus(tmp_path, stage1):
    """A streamed corpus has no length: the oracle labels its first blocks all the same."""
    args = tiny_router_args(
        tmp_path, stage1, "streamed", supervision="oracle", streaming=True, shuffle_buffer=8, max_steps=2,
        batch_size=2, oracle_blocks=4, holdout_code="none",
    )  # fmt: skip
    train_router(args)
    assert OracleResult.load(targets_folder(args.output_dir)).tensors["input_ids"].shape[0] == 4


def test_router_vs_oracle_table(tmp_path, stage1, monkeypatch):
    args = ComparisonArguments(
        model=stage1,
        output_dir=str(tmp_path / "cmp"),
        router_steps=3,
        batch_size=4,
        block_size=16,
        eval_blocks=2,
        builtin_max_chars=3000,
        progress=False,
    )
    results = compare_routers(args)
    assert results["budgets"] == [1]
    for name in ("english", "code"):
        found = results["sets"][name]
        # The oracle takes each token's best pattern: never worse than the best single pattern.
        assert found["oracle"][1] <= found["fixed"][1] + 1e-9
        assert found["fixed_pattern"][1] in ("sB", "Bs")
        for supervision in ("conventional", "oracle"):
            entry = results["routers"][supervision][1][name]
            assert 0 <= entry["realised_big"] <= 1 and entry["ppl"] > 1
    table = (Path(args.output_dir) / "router_vs_oracle.md").read_text()
    assert table == comparison_table(results) + "\n"
    methods = [line.split("|")[2].strip() for line in table.splitlines()[2:]]
    assert methods[:2] == ["all small", "oracle"] and methods[2].startswith("fixed `")
    assert methods[3:] == ["router (conventional)", "router (distilled from the oracle)", "all big"]

    # A rerun with the same arguments reuses the finished routers and oracle studies.
    monkeypatch.setattr("duo_llm_hf.experiments.router_comparison.train_router", None)
    again = compare_routers(args)
    assert json.loads(json.dumps(again)) == json.loads((Path(args.output_dir) / "router_vs_oracle.json").read_text())
    assert again["routers"] == results["routers"] and again["sets"] == results["sets"]


def test_duo_opt_model_with_the_big_skip_setting(tmp_path, builtin_tokenizer):
    from duo_llm_hf import DuoOPTConfig, DuoOPTForCausalLM

    torch.manual_seed(0)
    config = DuoOPTConfig(
        **tiny_opt_kwargs(
            vocab_size=len(builtin_tokenizer),
            ffn_dim=64,
            num_hidden_layers=LAYERS,
            max_position_embeddings=32,
            pad_token_id=builtin_tokenizer.pad_token_id,
        )
    )
    folder = save_model_folder(tmp_path / "opt", DuoOPTForCausalLM(config), builtin_tokenizer)
    args = tiny_router_args(
        tmp_path, folder, target_usage=None, setting="big50-skip50", max_steps=2, holdout_code="none"
    )
    report = train_router(args).report
    assert report["route_options"] == ["big", "skip"] and report["target_usage"] == {"big": 0.5}
    assert report["holdouts"]["english"]["realised"]["overall"]["small"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(args.output_dir)
    assert type(model) is DuoOPTForCausalLM and [r.choices for r in routers(model)] == [(1, 2)] * LAYERS


def test_parser_and_target_usage_flags():
    argv = ["--model", "m", "--output-dir", "o", "--target-usage", "big=0.5,skip=0.5", "--alpha", "3"]
    args = parse_arguments(RouterTrainArguments, argv)
    assert (args.target_usage, args.alpha, args.block_size) == ("big=0.5,skip=0.5", 3.0, None)
    assert parse_target_usage_flag(args.target_usage) == {"big": 0.5, "skip": 0.5}
    assert parse_target_usage_flag("0.3") == 0.3
    assert target_usage_flag({BIG: 4 / 12}) == repr(4 / 12)
    assert parse_target_usage_flag(target_usage_flag({BIG: 4 / 12})) == 4 / 12
    assert target_usage_flag({SKIP: 0.25, BIG: 0.5}) == "big=0.5,skip=0.25"


def test_bad_inputs_stop_early_with_clear_errors(tmp_path, source, builtin_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(vocab_size=300))).save_pretrained(llama)
    big_skip = duo_folder(tmp_path / "big_skip", builtin_tokenizer, route_options=["big", "skip"])
    no_tok = tmp_path / "no_tok"
    load_duo_model(source).save_pretrained(no_tok)
    cases = [
        ({"model": str(tmp_path / "absent")}, FileNotFoundError, "does not exist"),
        ({"model": str(empty)}, FileNotFoundError, "not a model folder"),
        ({"model": str(llama)}, ValueError, "is a 'llama' model, not a Duo model"),
        ({"model": str(no_tok)}, FileNotFoundError, "holds no tokenizer"),
        ({"target_usage": "1.5"}, ValueError, r"must be a number in \[0, 1\]"),
        ({"target_usage": "lots"}, ValueError, "'lots' is not a number"),
        ({"target_usage": None}, ValueError, "target_usage: give a target"),
        ({"target_usage": "big=0.5,skip=0.5"}, ValueError, r"sets targets for \['skip'\], which route_options"),
        ({"target_usage": None, "setting": "big90"}, ValueError, "'big90' is not a router setting"),
        ({"setting": "big50-skip50"}, ValueError, "leave out --route-options"),
        (
            {"target_usage": None, "model": big_skip, "setting": "small70-big30"},
            ValueError,
            r"routes to \['small'\], which model .* cannot route",
        ),
        ({"route_options": "big"}, ValueError, "at least two route options"),
        ({"route_options": "big,huge"}, ValueError, "'huge' is not a route choice"),
        ({"block_size": 64}, ValueError, "block_size 64 is longer than the max_position_embeddings 32"),
        ({"alpha": -1.0}, ValueError, "alpha: -1.0"),
        ({"temperature_end": 0.0}, ValueError, "temperatures must be > 0"),
        ({"resume_from": str(tmp_path / "nowhere")}, ValueError, "not a checkpoint folder"),
        ({"oracle_budget": "1"}, ValueError, "need --supervision oracle"),
        ({"supervision": "oracle", "target_usage": "0.25"}, ValueError, r"0.5\} layers, not whole numbers"),
        ({"supervision": "oracle", "oracle_budget": "big=3"}, ValueError, "3 big layers is impossible"),
    ]
    for i, (overrides, error, message) in enumerate(cases):
        args = tiny_router_args(tmp_path, source, f"bad{i}", **overrides)
        with pytest.raises(error, match=message):
            train_router(args)
        out = Path(args.output_dir)
        assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists(), overrides
