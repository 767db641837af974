"""The names of 0.1 that the vocabulary change renamed (CHANGELOG.md) keep working until 0.3, with a deprecation
message: config keys of saved models, Python keywords and functions, command-line flags and values, and the run
files that later runs compare themselves with."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.models.routes import BIG, SMALL
from duo_llm_hf.training.arguments import TrainArguments, current_names
from duo_llm_hf.training.router_arguments import RouterTrainArguments
from duo_llm_hf.utils.arguments import build_parser, parse_arguments
from duo_llm_hf.utils.errors import UsageError
from tests.helpers import tiny_llama_kwargs

OLD_CONFIG = {"routing_mode": "fixed", "fixed_pattern": "sBs", "router_budget": 0.25}


def test_old_config_keys_load_with_a_future_warning():
    with pytest.warns(FutureWarning, match="'routing_mode' is now 'routing'"):
        config = DuoLlamaConfig(**tiny_llama_kwargs(**OLD_CONFIG))
    assert (config.routing, config.pattern, config.router_target_usage) == ("fixed", [SMALL, BIG, SMALL], 0.25)
    saved = config.to_dict()
    assert not set(OLD_CONFIG) & set(saved) and saved["routing"] == "fixed"


def test_a_saved_folder_with_the_old_keys_loads(tmp_path):
    """A config.json written by 0.1 (routing_mode, fixed_pattern, router_budget) loads, and so does an override
    given under an old name."""
    model = DuoLlamaForCausalLM(DuoLlamaConfig(**tiny_llama_kwargs(routing="fixed", pattern="sBs"))).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["routing_mode"], config["fixed_pattern"] = config.pop("routing"), config.pop("pattern")
    config["router_budget"] = config.pop("router_target_usage")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(FutureWarning, match="'fixed_pattern' is now 'pattern'"):
        loaded = DuoLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.routing, loaded.config.pattern) == ("fixed", [SMALL, BIG, SMALL])
    ids = torch.randint(0, 32, (1, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.warns(FutureWarning, match="'routing_mode' is now 'routing'"):
        learned = DuoLlamaForCausalLM.from_pretrained(tmp_path, routing_mode="learned")
    assert learned.config.routing == "learned" and learned.config.use_router


def test_old_attribute_and_keyword_names_warn_and_work(tiny_model):
    model = tiny_model()
    with pytest.warns(FutureWarning, match="'routing_mode' is now 'routing'"):
        assert model.config.routing_mode == "random"
    with pytest.warns(FutureWarning, match="pattern="):
        model.set_routing("fixed", fixed_pattern="BBs")
    assert model.config.pattern == [BIG, BIG, SMALL]
    with pytest.warns(FutureWarning, match=r"set_routing\(mode=\.\.\.\) is now routing="):
        model.set_routing(mode="fixed", pattern="sBs")
    assert (model.config.routing, model.config.pattern) == ("fixed", [SMALL, BIG, SMALL])
    with pytest.warns(FutureWarning, match="'router_budget' is now 'router_target_usage'"):
        model.config.router_budget = 0.5
    assert model.config.router_target_usage == 0.5


def test_old_loss_functions_warn_and_give_the_new_values():
    from duo_llm_hf.models.losses import budget_loss, parse_budget_fractions, parse_target_usage, usage_loss

    logits = torch.randn(2, 3, 4, 3)
    with pytest.warns(FutureWarning, match="use usage_loss"):
        old = budget_loss(logits, 0.3)
    torch.testing.assert_close(old, usage_loss(logits, 0.3))
    with pytest.warns(FutureWarning, match="use parse_target_usage"):
        assert parse_budget_fractions({"big": 0.5}) == parse_target_usage({"big": 0.5})


@pytest.mark.parametrize(
    ("arguments", "argv", "field", "value", "message"),
    [
        (RouterTrainArguments, ["--budget", "0.3"], "target_usage", "0.3", "--budget is deprecated"),
        (TrainArguments, ["--eval-routes", "all-big"], "eval_routings", "all-big", "--eval-routes is deprecated"),
        (TrainArguments, ["--eval_routes", "all-big"], "eval_routings", "all-big", "--eval_routes is deprecated"),
        (TrainArguments, ["--mode", "random"], "mode", "scratch", "--mode random is deprecated"),
    ],
)
def test_old_flags_and_values_parse_with_one_deprecation_line(capsys, arguments, argv, field, value, message):
    required = ["--model", "m"] if arguments is RouterTrainArguments else []
    args = parse_arguments(arguments, ["--output-dir", "out", *required, *argv])
    assert getattr(args, field) == value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "0.3" in err[0]


def test_old_keywords_of_the_arguments_dataclasses_warn_and_set_the_new_fields():
    with pytest.warns(FutureWarning, match=r"budget=\.\.\.\) is now target_usage"):
        router = RouterTrainArguments(model="m", output_dir="out", budget="0.3")
    with pytest.warns(FutureWarning, match=r"eval_routes=\.\.\.\) is now eval_routings"):
        train = TrainArguments(output_dir="out", eval_routes="all-big")
    assert router.target_usage == "0.3" and train.eval_routings == "all-big"
    assert "budget" not in dataclasses.asdict(router) and "eval_routes" not in dataclasses.asdict(train)


def test_old_flags_are_left_out_of_help_and_hints():
    text = build_parser(RouterTrainArguments).format_help() + build_parser(TrainArguments).format_help()
    assert "--budget" not in text.replace("--oracle-budget", "") and "--eval-routes" not in text
    assert "--target-usage" in text and "--eval-routings" in text and "scratch" in text


def test_a_script_that_builds_the_old_mode_in_python_is_told(capsys, tmp_path):
    args = TrainArguments(output_dir=str(tmp_path / "run"), mode="random", p_big=2.0)
    with pytest.raises(UsageError, match="p_big=2.0"):  # checked after the mode
        args.validate()
    assert args.mode == "scratch" and "mode 'random' is deprecated" in capsys.readouterr().err


def test_saved_arguments_of_0_1_compare_under_the_new_names(tmp_path):
    """training_args.json and checkpoint fingerprints written before the rename still match the same run now:
    a finished run is reused and a checkpoint resumes."""
    now = dataclasses.asdict(TrainArguments(output_dir="out"))
    old = {{"eval_routings": "eval_routes"}.get(k, k): v for k, v in now.items()} | {"mode": "random"}
    assert "eval_routes" in old and current_names(old) == now
    router = dataclasses.asdict(RouterTrainArguments(model="m", output_dir="out", target_usage="0.5"))
    old_router = {{"target_usage": "budget"}.get(k, k): v for k, v in router.items()}
    assert current_names(old_router) == router


def test_run_identity_reads_an_old_fingerprint(tmp_path):
    from duo_llm_hf.training.loop import run_identity

    fingerprint = {"mode": "scratch", "eval_routings": "random", "target_usage": "0.5"}
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    (checkpoint / "train_state.json").write_text(
        json.dumps({"run_id": "r1", "fingerprint": {"mode": "random", "eval_routes": "random", "budget": "0.5"}})
    )
    assert run_identity(checkpoint, fingerprint)["run_id"] == "r1"


def test_the_model_card_reads_a_config_with_the_old_keys(tmp_path):
    from duo_llm_hf.integrations.model_card import read_config

    (tmp_path / "config.json").write_text(json.dumps({"routing_mode": "fixed", "fixed_pattern": [1, 0]}))
    assert read_config(tmp_path) == {"routing": "fixed", "pattern": [1, 0]}


def test_the_model_card_reads_run_files_with_the_old_keys(tmp_path):
    """A router folder of 0.1: its training_args.json and router_report.json name the target usage `budget`."""
    from duo_llm_hf.integrations.model_card import collect_figures

    (tmp_path / "training_args.json").write_text(json.dumps({"budget": "0.5", "eval_routes": "random"}))
    (tmp_path / "router_report.json").write_text(json.dumps({"budget": {"big": 0.5}, "holdouts": {}}))
    figures = collect_figures(tmp_path)
    assert figures["router"] == {"target_usage": {"big": 0.5}, "holdouts": {}}
    assert figures["training"]["router"]["hyperparameters"] == {"target_usage": "0.5", "eval_routings": "random"}
