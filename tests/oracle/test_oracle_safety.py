"""Oracle runs that must not lose or mix work, and Duo models that must load whole (issue 14, oracle side).

Finished runs are refused without --overwrite-output-dir; a resumed run refuses other weights, dtype or data,
naming what differs; a damaged batch file is named and computed again; --route-options big,skip works on a model
saved as `duo-llm train` saves it; a model folder that is missing, dense, or incomplete is a one-line error.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.cli import main as duo_llm
from duo_llm_hf.models.routes import CHOICE_NAMES
from duo_llm_hf.oracle.results import OracleResult
from duo_llm_hf.oracle.run import BATCH_DIR, run_oracle_study, study_space
from duo_llm_hf.training.routers import add_routers
from duo_llm_hf.utils.errors import UsageError
from duo_llm_hf.utils.loading import allow_route_options, load_duo_model
from duo_llm_hf.utils.run_files import ORACLE_RESULTS_FILE, ORACLE_STATE_FILE
from tests.helpers import tiny_llama_kwargs

VOCAB = 96  # tiny_llama_kwargs' vocabulary


def trained_like(seed: int = 0, route_options=("small", "big"), **overrides) -> DuoLlamaForCausalLM:
    """A tiny Duo model configured as `duo-llm train` saves one: route_options and route_probs in its config."""
    torch.manual_seed(seed)
    probs = {name: 1.0 / len(route_options) for name in route_options}
    config = DuoLlamaConfig(
        **tiny_llama_kwargs(initializer_range=0.2, **overrides),
        small_intermediate_size=8, route_options=list(route_options), route_probs=probs,
    )
    return DuoLlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny Duo model and 5 blocks of 8 tokens (3 batches of 2)."""
    root = tmp_path_factory.mktemp("oracle_safety")
    trained_like().save_pretrained(root / "model")
    blocks = torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": blocks}, root / "blocks.safetensors")
    return root


def oracle(files, out, *extra, model=None, data=None) -> list[str]:
    return [
        "oracle", "--model", str(model or files / "model"), "--data", str(data or files / "blocks.safetensors"),
        "--batch-size", "2", "--best-of-k", "3", "--budget", "all", "--budget", "classes", "--no-progress",
        "--output-dir", str(out), *extra,
    ]


def run(argv, capsys) -> tuple[int, str]:
    """Run ``duo-llm`` in this process; return its exit code and stderr."""
    code = duo_llm(argv)
    return code, capsys.readouterr().err


def assert_same_result(a, b):
    """Identical tensors and summaries (the model and data paths in the summary aside)."""
    first, second = OracleResult.load(a), OracleResult.load(b)
    assert first.tensors.keys() == second.tensors.keys()
    for name in first.tensors:
        assert torch.equal(first.tensors[name], second.tensors[name]), name
    drop = ("model", "data")
    assert {k: v for k, v in first.summary().items() if k not in drop} == {
        k: v for k, v in second.summary().items() if k not in drop
    }


@pytest.fixture(scope="module")
def straight(files):
    """An uninterrupted CLI run, to compare the others with."""
    out = files / "straight"
    assert duo_llm(oracle(files, out)) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Finished runs, overwrite, resume


def test_finished_run_is_refused_without_overwrite_flag(files, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = (out / ORACLE_RESULTS_FILE).read_bytes()
    code, err = run(oracle(files, out), capsys)
    assert code == 2
    assert err.startswith("duo-llm oracle: error: ") and "already holds a finished oracle run" in err
    assert "--overwrite-output-dir" in err
    assert (out / ORACLE_RESULTS_FILE).read_bytes() == before
    # With the flag, the run starts over (its damaged batch file is not even looked at) and ends the same.
    (out / BATCH_DIR / "batch_00001.safetensors").write_bytes(b"junk")
    code, err = run(oracle(files, out, "--overwrite-output-dir", "--seed", "5"), capsys)
    assert code == 0, err
    assert json.loads((out / ORACLE_STATE_FILE).read_text())["fingerprint"]["seed"] == 5


def test_finished_run_with_same_settings_is_reused_by_the_library(files, straight, tmp_path):
    """The study calls run_oracle_study on a finished stage folder when it was killed before its marker."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    model = load_duo_model(files / "model")
    blocks = OracleResult.load(straight).tensors["input_ids"]
    space = study_space(model.config, ["all", "classes"])
    result = run_oracle_study(model, blocks, space, out, batch_size=2, best_of_k=3, progress=False)
    assert result is not None
    assert_same_result(straight, out)


def test_interrupted_cli_run_resumes_with_other_chunk_size(files, straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(oracle(files, out, "--stop-after-batches", "1"), capsys)[0] == 0
    assert not (out / ORACLE_RESULTS_FILE).exists()
    # The chunk size only bounds memory: the resumed run may change it.
    code, err = run(oracle(files, out, "--chunk-tokens", "16"), capsys)
    assert code == 0, err
    assert_same_result(straight, out)


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint: what changes results may not change between sessions


def test_resume_refuses_replaced_weights(files, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(files / "model", model_dir)
    out = tmp_path / "run"
    assert run(oracle(files, out, "--stop-after-batches", "1", model=model_dir), capsys)[0] == 0
    trained_like(seed=1).save_pretrained(model_dir)  # the same config, other weights
    code, err = run(oracle(files, out, model=model_dir), capsys)
    assert code == 2
    assert "cannot resume the oracle run" in err and "weights_sha256: was" in err
    assert "dtype" not in err and "input_sha256" not in err  # only what differs is named


def test_resume_refuses_another_dtype(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(oracle(files, out, "--stop-after-batches", "1", "--dtype", "bfloat16"), capsys)[0] == 0
    code, err = run(oracle(files, out), capsys)
    assert code == 2
    assert "dtype: was 'bfloat16', now 'float32'" in err


def test_resume_refuses_other_data_but_not_a_moved_file(files, straight, tmp_path, capsys):
    data = tmp_path / "blocks.safetensors"
    shutil.copy(files / "blocks.safetensors", data)
    out = tmp_path / "run"
    assert run(oracle(files, out, "--stop-after-batches", "1", data=data), capsys)[0] == 0
    # Other tokens under the same path: refused.
    save_file({"input_ids": torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(9))}, data)
    code, err = run(oracle(files, out, data=data), capsys)
    assert code == 2 and "input_sha256: was" in err
    # The original tokens under another path: the run resumes (the fingerprint holds content, not paths).
    code, err = run(oracle(files, out), capsys)
    assert code == 0, err
    assert_same_result(straight, out)


def test_old_state_format_is_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    old = {"fingerprint": {"model": str(files / "model")}, "batches_done": 1, "num_batches": 3}
    (out / ORACLE_STATE_FILE).write_text(json.dumps(old))
    code, err = run(oracle(files, out), capsys)
    assert code == 2
    assert "older version" in err and "--overwrite-output-dir" in err


# ---------------------------------------------------------------------------------------------------------------
# Damaged batch files


def test_truncated_batch_file_is_named_and_recomputed(files, straight, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert run(oracle(files, out, "--stop-after-batches", "2"), capsys)[0] == 0
    damaged = out / BATCH_DIR / "batch_00000.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    with caplog.at_level("WARNING", logger="duo_llm_hf.oracle.run"):
        code, err = run(oracle(files, out), capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "damaged" in warnings[0], warnings
    assert_same_result(straight, out)


def test_missing_batch_file_of_a_finished_library_run_is_recomputed(files, straight, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / BATCH_DIR / "batch_00002.safetensors").unlink()
    model = load_duo_model(files / "model")
    blocks = OracleResult.load(straight).tensors["input_ids"]
    with caplog.at_level("WARNING", logger="duo_llm_hf.oracle.run"):
        run_oracle_study(
            model, blocks, study_space(model.config, ["all", "classes"]), out, batch_size=2, best_of_k=3,
            progress=False,
        )
    assert any("batch_00002.safetensors is missing" in r.getMessage() for r in caplog.records)
    assert_same_result(straight, out)


# ---------------------------------------------------------------------------------------------------------------
# --route-options on a model trained on small/big (issue 14, part 6)


def test_big_or_skip_on_a_model_trained_on_small_and_big(files, tmp_path, capsys):
    saved = json.loads((files / "model" / "config.json").read_text())
    assert saved["route_options"] == ["small", "big"] and saved["route_probs"] == {"small": 0.5, "big": 0.5}
    out = tmp_path / "run"
    code, err = run(oracle(files, out, "--route-options", "big,skip"), capsys)
    assert code == 0, err
    result = OracleResult.load(out)
    assert [CHOICE_NAMES[c] for c in result.space.choices] == ["big", "skip"]
    # The same search on the model with all three options, built in memory, gives the same tensors.
    model = trained_like()
    allow_route_options(model.config, ["skip"])
    space = study_space(model.config, ["all", "classes"], ["big", "skip"])
    direct = run_oracle_study(
        model, result.tensors["input_ids"], space, tmp_path / "direct", batch_size=2, best_of_k=3, progress=False
    )
    for name, tensor in direct.tensors.items():
        assert torch.equal(tensor, result.tensors[name]), name


def test_route_options_on_a_model_with_routers(tmp_path):
    """A router-trained model keeps its routers (over small/big) when the oracle adds skip."""
    model = add_routers(trained_like(), ["small", "big"], seed=0)
    model.save_pretrained(tmp_path / "model")
    loaded = load_duo_model(tmp_path / "model")
    assert allow_route_options(loaded.config, ["big", "skip"]) == ["skip"]
    assert loaded.config.route_options == ["small", "big", "skip"]
    assert loaded.config.route_probs == {"small": 0.5, "big": 0.5, "skip": 0.0}
    assert loaded.model.layers[0].mlp.router.out_features == 2
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_route_option_with_untrained_weights_is_refused(tmp_path, capsys, files):
    trained_like(route_options=("big", "skip")).save_pretrained(tmp_path / "model")
    code, err = run(oracle(files, tmp_path / "run", "--route-options", "small,skip", model=tmp_path / "model"), capsys)
    assert code == 2
    assert "route_options are ['big', 'skip'], so its small FFNs were not trained" in err


# ---------------------------------------------------------------------------------------------------------------
# Loading a Duo model (issue 14, part 5)


def test_config_with_more_layers_than_the_weights_is_refused(files, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(files / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (model_dir / "config.json").write_text(json.dumps(config))
    code, err = run(oracle(files, tmp_path / "run", model=model_dir), capsys)
    assert code == 2
    assert "do not match its config.json (5 layers): missing model.layers.3." in err
    assert not (tmp_path / "run").exists()


def test_extra_weights_are_refused(files, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(files / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"\(2 layers\): unexpected model\.layers\.2\."):
        load_duo_model(model_dir)


def test_stage1_model_loads_for_learned_routing_without_router_weights(files, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(files / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["routing"] = "learned"
    (model_dir / "config.json").write_text(json.dumps(config))
    model = load_duo_model(model_dir)  # routers missing from the weights: legitimate, they start fresh
    assert model.model.layers[0].mlp.router is not None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "does not exist; give a Duo model folder"),
        (lambda d: d.mkdir(), "is not a model folder (it has no config.json)"),
        (lambda d: d.write_text("x"), "is a file, not a model folder"),
        (
            lambda d: LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())).save_pretrained(d),
            "is a 'llama' model, not a Duo model",
        ),
        (lambda d: (d.mkdir(), shutil.copy(d.parent.parent / "files" / "config.json", d)), "cannot be loaded"),
    ],
    ids=["missing", "empty", "file", "dense", "no-weights"],
)
def test_bad_model_folders_are_one_line_errors(files, tmp_path, capsys, make, message):
    (tmp_path / "files").mkdir()
    shutil.copy(files / "model" / "config.json", tmp_path / "files")
    model_dir = tmp_path / "sub" / "model"
    model_dir.parent.mkdir()
    make(model_dir)
    capsys.readouterr()  # save_pretrained's progress bar
    code, err = run(oracle(files, tmp_path / "run", model=model_dir), capsys)
    assert code == 2, err
    assert err.startswith("duo-llm oracle: error: --model: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_folder_that_looks_like_a_hub_name(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(oracle(files, tmp_path / "run", model="runs/absent"), capsys)
    assert code == 2
    assert "no local folder 'runs/absent' exists, and it could not be loaded as a Hub model name" in err


def test_dense_model_given_to_the_study(tmp_path, capsys):
    LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())).save_pretrained(tmp_path / "dense")
    code, err = run(["study", "--out", str(tmp_path / "study"), "--preset", "tiny", "--model", str(tmp_path / "dense")],
                    capsys)
    assert code == 2
    assert "duo-llm study: error: --model:" in err and "not a Duo model" in err and "duo-llm finetune" in err
