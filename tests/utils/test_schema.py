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
