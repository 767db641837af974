"""State and manifest files are checked against their schema before use: a file that parses but has the wrong
shape is one `UsageError` naming the file and the field, never a KeyError, TypeError or a misleading message."""

from __future__ import annotations

import json

import pytest

from duo_llm_hf.utils.errors import UsageError
from duo_llm_hf.utils.schema import ListOf, MapOf, Optional, read_state_file, schema_problem

GOOD_TRAIN_STATE = {
    "files": {"model.safetensors": 8}, "global_step": 3, "epoch": 0, "batches_in_epoch": 3, "tokens_seen": 96,
    "run_id": "abc", "fingerprint": {"seed": 0, "block_size": 16},
}  # fmt: skip


def test_schema_problem_names_the_field():
    schema = {"a": int, "b": MapOf(int), "c": ListOf(str), "d": Optional({"e": float})}
    assert schema_problem({"a": 1, "b": {"x": 2}, "c": ["y"]}, schema) is None
    assert schema_problem({"a": 1, "b": {"x": 2}, "c": [], "d": {"e": 2}}, schema) is None  # an int is a number
    assert schema_problem({"a": True, "b": {}, "c": []}, schema).startswith("field 'a' is true or false")
    assert schema_problem({"a": 1, "b": {"x": "2"}, "c": []}, schema) == (
        "field 'b.x' is a string (\"2\"), expected an integer"
    )
    assert schema_problem({"a": 1, "b": {}, "c": [3]}, schema).startswith("field 'c[0]' is an integer")
    assert schema_problem({"a": 1, "b": {}, "c": [], "d": {}}, schema) == "field 'd.e' is missing"
    assert schema_problem([1], schema).startswith("the file is an array")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"fingerprint": [1, 2]}, "fingerprint"),
        ({"files": {"model.safetensors": "8"}}, "files.model.safetensors"),
        ({"global_step": None}, "global_step"),
    ],
)
def test_checkpoint_state_of_the_wrong_shape_is_one_error(tmp_path, change, field):
    from duo_llm_hf.training.checkpointing import STATE_FILE, CorruptCheckpointError, validate_checkpoint

    folder = tmp_path / "step_3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    (folder / STATE_FILE).write_text(json.dumps({**GOOD_TRAIN_STATE, **change}))
    with pytest.raises(CorruptCheckpointError, match=rf"train_state.json has the wrong structure: field '{field}'"):
        validate_checkpoint(folder)


def test_oracle_state_of_the_wrong_shape_is_one_error(tmp_path):
    from duo_llm_hf.oracle.run import STATE_FORMAT, _finished_batches
    from duo_llm_hf.utils.run_files import ORACLE_STATE_FILE

    path = tmp_path / ORACLE_STATE_FILE
    for state, field in (
        ({"format": STATE_FORMAT, "fingerprint": ["seed"], "batch_sha256": {}}, "fingerprint"),
        ({"format": STATE_FORMAT, "fingerprint": {}, "batch_sha256": {"0": 17}}, "batch_sha256.0"),
        ({"format": STATE_FORMAT, "fingerprint": {}}, "batch_sha256"),
    ):
        path.write_text(json.dumps(state))
        with pytest.raises(UsageError, match=rf"oracle_state.json has the wrong structure: field '{field}'"):
            _finished_batches(tmp_path, {}, 4, warn=False)


def test_oracle_summary_of_the_wrong_shape_is_one_error(tmp_path):
    from duo_llm_hf.oracle.results import OracleResult
    from duo_llm_hf.utils.run_files import ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE

    (tmp_path / ORACLE_RESULTS_FILE).write_bytes(b"")
    (tmp_path / ORACLE_SUMMARY_FILE).write_text(json.dumps({"_space": {"num_layers": "3", "choices": []}}))
    with pytest.raises(UsageError, match=r"oracle_summary.json has the wrong structure: field '_space.num_layers'"):
        OracleResult.load(tmp_path)


def test_study_stage_marker_that_is_not_an_object_is_one_error(tmp_path):
    from duo_llm_hf.experiments.study import Stages, study_config
    from duo_llm_hf.utils.run_files import STAGE_DONE_FILE

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / STAGE_DONE_FILE).write_text("[]")
    stages = Stages(tmp_path, study_config("tiny"), progress=False)
    with pytest.raises(UsageError, match=r"stage_done.json has the wrong structure: the file is an array"):
        stages.run("stage 1", tmp_path / "model", dict)


def test_unreadable_json_is_one_error(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"\xff{")
    with pytest.raises(UsageError, match=r"state.json is not valid JSON"):
        read_state_file(path, {})


def _router_report(tmp_path, training_args, report):
    """The router comparison reading back a router run it finished earlier."""
    import dataclasses

    from duo_llm_hf.experiments.router_comparison import _finished_report
    from tests.helpers import tiny_router_args

    run = tiny_router_args(tmp_path, str(tmp_path / "model"))
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    args = dataclasses.asdict(run) if training_args is None else training_args
    (folder / "training_args.json").write_text(json.dumps(args))
    (folder / "router_report.json").write_text(json.dumps(report))
    return _finished_report(run)


def _ablation_file(name, schema_name):
    def read(tmp_path, value):
        from duo_llm_hf.experiments.ablation.files import read_json
        from duo_llm_hf.utils import schema

        (tmp_path / name).write_text(json.dumps(value))
        return read_json(tmp_path / name, getattr(schema, schema_name))

    return read


def _card_run_file(name):
    def read(tmp_path, value):
        from duo_llm_hf.integrations.model_card import collect_figures

        (tmp_path / name).write_text(json.dumps(value))
        return collect_figures(tmp_path)

    return read


def _card_metrics(tmp_path, value):
    from duo_llm_hf.integrations.model_card import load_metrics

    (tmp_path / "figures.json").write_text(json.dumps(value))
    return load_metrics(str(tmp_path / "figures.json"))


def _study_stage_seconds(tmp_path, value):
    from duo_llm_hf.experiments.report import stage_seconds

    (tmp_path / "oracle").mkdir()
    (tmp_path / "oracle" / "stage_done.json").write_text(json.dumps(value))
    return stage_seconds(tmp_path)


def _study_training_record(tmp_path, value):
    from types import SimpleNamespace

    from duo_llm_hf.experiments.report import _training_record

    (tmp_path / "train_results.json").write_text(json.dumps(value))
    return _training_record(tmp_path / "study", SimpleNamespace(model=str(tmp_path)))


def _hellaswag_run(tmp_path, value):
    from duo_llm_hf.experiments.hellaswag import HellaSwagRuns

    (tmp_path / "converted.json").write_text(json.dumps(value))
    return HellaSwagRuns(tmp_path, "unused").run("converted", make_lm=None, limit=10)


def _fixed_sets(tmp_path, value):
    from duo_llm_hf.utils.schema import FIXED_SETS_SCHEMA

    (tmp_path / "fixed_sets.json").write_text(json.dumps(value))
    return read_state_file(tmp_path / "fixed_sets.json", FIXED_SETS_SCHEMA)


def _card_config(tmp_path, value):
    from duo_llm_hf.integrations.model_card import read_config

    (tmp_path / "config.json").write_text(json.dumps(value))
    return read_config(tmp_path)


GOOD_HOLDOUT = {"ppl": 12.5, "realised": {"overall": {"big": 0.5, "small": 0.5}}}


@pytest.mark.parametrize(
    "read, value, file, field",
    [
        (lambda t, v: _router_report(t, v, {"holdouts": {}}), [1, 2], "training_args.json", "the file is an array"),
        (lambda t, v: _router_report(t, None, v), {"holdouts": [1]}, "router_report.json", "field 'holdouts'"),
        (lambda t, v: _router_report(t, None, v), {"holdouts": {"wiki": {**GOOD_HOLDOUT, "ppl": "12"}}},
         "router_report.json", "field 'holdouts.wiki.ppl'"),
        (lambda t, v: _router_report(t, None, v), {"holdouts": {"wiki": {"ppl": 3.0, "realised": {}}}},
         "router_report.json", "field 'holdouts.wiki.realised.overall' is missing"),
        (_ablation_file("train_results.json", "TRAIN_RESULTS_SCHEMA"), {"global_step": 3, "tokens_seen": "96"},
         "train_results.json", "field 'tokens_seen'"),
        (_ablation_file("training_args.json", "TRAINING_ARGS_SCHEMA"), "args", "training_args.json", "the file"),
        (_ablation_file("ablation_run.json", "ABLATION_RUN_SCHEMA"), {"train_seconds": "12"}, "ablation_run.json",
         "field 'train_seconds'"),
        (_ablation_file("dense.json", "ABLATION_EVAL_SCHEMA"), {"perplexity": {"metrics": {"ppl_wiki": "9"}}},
         "dense.json", "field 'perplexity.metrics.ppl_wiki'"),
        (_ablation_file("dense.json", "ABLATION_EVAL_SCHEMA"), {"benchmarks": [1]}, "dense.json",
         "field 'benchmarks'"),
        (_ablation_file("tokenizer.json", "JSON_OBJECT_SCHEMA"), [1], "tokenizer.json", "the file is an array"),
        (_card_run_file("train_results.json"), [1], "train_results.json", "the file is an array"),
        (_card_run_file("router_report.json"), "x", "router_report.json", "the file is a string"),
        (_card_run_file("lm_eval_results.json"), {"results": {"hellaswag": 0.3}}, "lm_eval_results.json",
         "field 'results.hellaswag'"),
        (_card_metrics, [1, 2], "figures.json", "the file is an array"),
        (_card_config, [1, 2], "config.json", "the file is an array"),
        (_study_stage_seconds, {"seconds": "12"}, "stage_done.json", "field 'seconds'"),
        (_study_training_record, {"global_step": 3, "eval": [1]}, "train_results.json", "field 'eval'"),
        (_hellaswag_run, {"items": 10, "acc_norm": 0.3}, "converted.json", "field 'acc_norm_stderr' is missing"),
        (_fixed_sets, {"1": {"skipped": [3], "loss": 2.5, "greedy_skipped": 3, "search": "exact"}},
         "fixed_sets.json", "field '1.greedy_skipped'"),
    ],
)  # fmt: skip
def test_files_read_back_of_the_wrong_shape_are_one_error(tmp_path, read, value, file, field):
    with pytest.raises(UsageError, match=rf"{file} has the wrong structure: {field}") as err:
        read(tmp_path, value)
    assert "\n" not in str(err.value)


def test_files_read_back_of_the_right_shape_are_read(tmp_path):
    assert _router_report(tmp_path, None, {"holdouts": {"wiki": GOOD_HOLDOUT}}) == {"holdouts": {"wiki": GOOD_HOLDOUT}}
    read = _ablation_file("dense.json", "ABLATION_EVAL_SCHEMA")
    record = {"perplexity": {"fingerprint": {"a": 1}, "metrics": {"ppl_wiki": 9.0, "loss_wiki": None}}}
    assert read(tmp_path, record) == record
    from duo_llm_hf.experiments.ablation.files import read_json

    assert read_json(tmp_path / "gone.json", {}) is None
