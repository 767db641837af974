"""Trustworthy training runs (issue 14): no code from checkpoints, no lost results, no mixed or diverged runs.

Stage 1 training and the router training: a pickle that is not plain data in a checkpoint is refused, never run;
a finished run is not overwritten without ``--overwrite-output-dir``; pruning keeps other runs' checkpoints; a
resumed run may run longer but must have the fingerprint of the run it continues; a damaged checkpoint is named
and skipped for the newest valid one; a diverged run stops with a one-line error and saves no non-finite model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from duo_llm_hf import cli
from duo_llm_hf.data.corpus import builtin_documents
from duo_llm_hf.experiments.ablation import parse_ablation_args, run_is_finished
from duo_llm_hf.experiments.study import StudyArguments, StudyConfig, _check_same_settings
from duo_llm_hf.training.arguments import FinetuneArguments, TrainArguments, parse_arguments
from duo_llm_hf.training.checkpointing import CorruptCheckpointError, TrainingDiverged, UnsafeCheckpointError
from duo_llm_hf.training.finetune import finetune
from duo_llm_hf.training.router_arguments import RouterTrainArguments
from duo_llm_hf.training.routers import train_router
from duo_llm_hf.training.train import train
from duo_llm_hf.utils.errors import UsageError
from duo_llm_hf.utils.run_files import OVERWRITE_FLAG, file_hash
from tests.helpers import tiny_router_args, tiny_train_args, train_duo_argv

BASE = dict(max_steps=4, checkpoint_every=2, checkpoints_to_keep=None, log_every=1)


class _Evil:
    """Unpickling it creates ``marker`` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A local text corpus (so that a change of its content, not its path, can be tested)."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n\n".join(d["text"] for d in builtin_documents()[:40])[:4000])
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    """A finished 4-step run with checkpoints at steps 2 and 4 (every test copies what it changes)."""
    tmp = tmp_path_factory.mktemp("base")
    return train(tiny_train_args(tmp, "run", dataset=str(corpus), **BASE)), tmp


def copy_run(base, tmp_path: Path, name: str = "copy") -> Path:
    result, _ = base
    folder = tmp_path / name
    shutil.copytree(result.output_dir, folder)
    return folder


def args_for(folder: Path, corpus: Path, **overrides):
    values = {"dataset": str(corpus), **BASE, **overrides}
    return tiny_train_args(folder.parent, folder.name, cache_dir=str(folder.parent / "cache"), **values)


# ----------------------------------------------------------------------------------------------------
# 1. No code from a checkpoint


# Every pickle Accelerate's load_state may read (the last four are files this trainer never writes).
PICKLES = [
    "custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
    "scaler.pt", "sampler.bin", "dl_state_dict.bin", "pytorch_model.bin",
]  # fmt: skip


@pytest.mark.parametrize("name", PICKLES)
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_run(base, corpus, tmp_path, name, writer):
    folder = copy_run(base, tmp_path)
    marker = tmp_path / "pwned"
    target = folder / "checkpoints" / "step_4" / name
    if writer == "pickle":
        target.write_bytes(pickle.dumps(_Evil(marker)))
    else:
        torch.save(_Evil(marker), target)
    for resume_from in ("latest", str(target.parent)):
        with pytest.raises(UnsafeCheckpointError, match=name) as refusal:
            train(args_for(folder, corpus, resume_from=resume_from, max_steps=6))
        assert not marker.exists()
        assert "weights_only=False" not in str(refusal.value)  # torch's advice to load it anyway is not passed on


def test_a_custom_checkpoint_pickle_is_refused_even_when_listed_as_written(base, corpus, tmp_path):
    """Accelerate unpickles custom_checkpoint_*.pkl with weights_only=False: never loaded, whatever train_state says."""
    folder = copy_run(base, tmp_path)
    marker = tmp_path / "pwned"
    step = folder / "checkpoints" / "step_4"
    (step / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    state = json.loads((step / "train_state.json").read_text())
    state["files"]["custom_checkpoint_0.pkl"] = (step / "custom_checkpoint_0.pkl").stat().st_size
    (step / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(UnsafeCheckpointError, match="custom_checkpoint_0.pkl"):
        train(args_for(folder, corpus, resume_from="latest", max_steps=6))
    assert not marker.exists()


def test_a_file_the_checkpoint_did_not_write_is_refused(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path)
    (folder / "checkpoints" / "step_4" / "extra.bin").write_bytes(b"anything")
    with pytest.raises(UnsafeCheckpointError, match="extra.bin is not one of the files this checkpoint wrote"):
        train(args_for(folder, corpus, resume_from="latest", max_steps=6))


def test_the_refusal_is_one_line_through_the_cli(base, corpus, tmp_path, capsys):
    folder = copy_run(base, tmp_path)
    (folder / "checkpoints" / "step_4" / "random_states_0.pkl").write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    argv = train_duo_argv(folder, tmp_path / "cache", dataset=corpus, resume_from="latest", max_steps=6)
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duo-llm train: error: ") and "random_states_0.pkl" in err and "\n" not in err
    assert not (tmp_path / "pwned").exists()


def test_checkpoints_hold_no_pickled_custom_state(base):
    result, _ = base
    step = Path(result.output_dir) / "checkpoints" / "step_2"
    assert not list(step.glob("custom_checkpoint_*"))
    state = json.loads((step / "train_state.json").read_text())
    assert state["global_step"] == 2 and state["run_id"] and state["fingerprint"]["learning_rate"] == 3e-3
    assert len(json.loads((step / "route_samplers.json").read_text())["per_process"]) == 1


# ----------------------------------------------------------------------------------------------------
# 2. No lost results


def test_a_finished_run_is_not_overwritten_without_the_flag(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path)
    before = file_hash(folder / "model.safetensors")
    with pytest.raises(UsageError, match=f"already holds a finished training run.*{OVERWRITE_FLAG}"):
        train(args_for(folder, corpus, max_steps=2))
    # 'latest' with no checkpoint left would start from step 0 just the same.
    shutil.rmtree(folder / "checkpoints")
    with pytest.raises(UsageError, match="already holds a finished training run"):
        train(args_for(folder, corpus, max_steps=2, resume_from="latest"))
    assert file_hash(folder / "model.safetensors") == before
    result = train(args_for(folder, corpus, max_steps=2, checkpoint_every=0, overwrite_output_dir=True))
    assert result.global_step == 2 and file_hash(folder / "model.safetensors") != before


def test_finetune_does_not_overwrite_a_finished_run(base, tmp_path):
    folder = copy_run(base, tmp_path)
    args = FinetuneArguments(
        output_dir=str(folder), init_from=base[0].output_dir, report_to="none", progress=False, block_size=16
    )
    with pytest.raises(UsageError, match=f"already holds a finished training run.*{OVERWRITE_FLAG}"):
        finetune(args)


def test_every_training_command_takes_the_overwrite_flag(tmp_path):
    out = str(tmp_path / "out")
    for arguments, argv in (
        (TrainArguments, ["--output-dir", out]),
        (RouterTrainArguments, ["--model", out, "--output-dir", out]),
        (FinetuneArguments, ["--init-from", out, "--output-dir", out]),
    ):
        assert parse_arguments(arguments, [*argv, OVERWRITE_FLAG]).overwrite_output_dir
    assert parse_ablation_args(["--out", out, OVERWRITE_FLAG]).overwrite_output_dir
    assert parse_arguments(StudyArguments, ["--out", out, OVERWRITE_FLAG]).overwrite_output_dir


def test_resuming_another_runs_checkpoint_into_a_finished_run_needs_the_flag(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path, "finished")
    other = copy_run(base, tmp_path, "other")
    (other / "train_results.json").write_text(json.dumps({"global_step": 4, "run_id": "another run"}))
    with pytest.raises(UsageError, match="holds a finished training run other than the one .*step_4 continues"):
        train(args_for(other, corpus, resume_from=str(folder / "checkpoints" / "step_4"), max_steps=5))


def test_an_earlier_runs_checkpoints_are_not_overwritten_without_the_flag(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path)
    (folder / "train_results.json").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(UsageError, match="holds checkpoints of an earlier training run .*--resume-from latest"):
        train(args_for(folder, corpus))


def test_pruning_keeps_other_runs_checkpoints(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path)  # the earlier run's step_2 and step_4
    train(args_for(folder, corpus, max_steps=6, checkpoint_every=3, checkpoints_to_keep=1, overwrite_output_dir=True))
    # This run wrote step_3 and step_6 and keeps its newest one; the earlier run's checkpoints stay, kept apart.
    earlier = json.loads((Path(base[0].output_dir) / "train_results.json").read_text())["run_id"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [f"run-{earlier}", "step_6"]
    assert sorted(p.name for p in (folder / "checkpoints" / f"run-{earlier}").iterdir()) == ["step_2", "step_4"]


def test_resume_with_more_steps_extends_the_run(base, corpus, tmp_path):
    result, _ = base
    folder = copy_run(base, tmp_path)
    extended = train(args_for(folder, corpus, resume_from="latest", max_steps=6))
    assert extended.global_step == 6 and sorted(extended.losses) == [5, 6]
    # The first 4 steps are the original run's (its log), and its checkpoints are untouched.
    logged = {}
    for line in (folder / "logs" / "train_duo" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            logged[record["step"]] = record["train/loss"]
    assert {step: logged[step] for step in range(1, 5)} == result.losses
    assert file_hash(folder / "checkpoints" / "step_4" / "model.safetensors") == file_hash(
        Path(result.output_dir) / "checkpoints" / "step_4" / "model.safetensors"
    )
    assert (folder / "checkpoints" / "step_6").is_dir()
    assert json.loads((folder / "train_results.json").read_text())["global_step"] == 6


def test_a_study_with_other_settings_needs_the_flag(tmp_path):
    """The same study again reuses its stages (test_study's re-run); other settings replace them only when asked."""
    _check_same_settings(tmp_path, StudyConfig("tiny", seed=0))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stage_done.json").write_text("{}")
    _check_same_settings(tmp_path, StudyConfig("tiny", seed=0), overwrite=True)  # same settings: nothing removed
    assert (tmp_path / "model" / "stage_done.json").exists()
    with pytest.raises(UsageError, match=f"other settings \\(seed differ\\).*{OVERWRITE_FLAG}"):
        _check_same_settings(tmp_path, StudyConfig("tiny", seed=1))
    assert (tmp_path / "model" / "stage_done.json").exists()
    _check_same_settings(tmp_path, StudyConfig("tiny", seed=1), overwrite=True)
    assert json.loads((tmp_path / "study_settings.json").read_text())["seed"] == 1
    assert not (tmp_path / "model").exists()


def test_an_ablation_run_with_other_arguments_is_retrained_only_when_asked(tmp_path):
    args = tiny_train_args(tmp_path, "run")
    run = SimpleNamespace(name="duo", args=args)
    folder = Path(args.output_dir)
    folder.mkdir()
    (folder / "train_results.json").write_text(json.dumps({"global_step": 2, "tokens_seen": 64, "run_id": None}))
    (folder / "training_args.json").write_text(json.dumps({**dataclasses.asdict(args), "learning_rate": 1.0}))
    with pytest.raises(UsageError, match=f"other arguments \\(learning_rate: 1.0 -> 0.003\\).*{OVERWRITE_FLAG}"):
        run_is_finished(run)
    assert run_is_finished(run, overwrite=True) is False  # retrained
    (folder / "training_args.json").write_text(json.dumps(dataclasses.asdict(args)))
    assert run_is_finished(run, overwrite=True) is True  # the same run is reused, flag or not


# ----------------------------------------------------------------------------------------------------
# 3. A resumed run has the fingerprint of the run it continues


@pytest.mark.parametrize(
    "change, key",
    [
        ({"learning_rate": 1e-3}, "learning_rate"),
        ({"seed": 1}, "seed"),
        ({"block_size": 8}, "block_size"),
        ({"hidden_size": 48}, "hidden_size"),
        ({"p_big": 0.75}, "p_big"),
        ({"mixed_precision": "bf16"}, "mixed_precision"),
        ({"warmup_steps": 2}, "warmup_steps"),
    ],
)
def test_resume_refuses_other_settings(base, corpus, tmp_path, change, key):
    folder = copy_run(base, tmp_path)
    with pytest.raises(UsageError, match=f"cannot resume the training run in .*step_4.*{key}: was"):
        train(args_for(folder, corpus, resume_from="latest", max_steps=6, **change))


def test_resume_refuses_other_data_at_the_same_path_and_accepts_a_moved_corpus(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path)
    changed = tmp_path / "data" / corpus.name
    changed.parent.mkdir()
    changed.write_text(corpus.read_text() + " one more sentence.")
    with pytest.raises(UsageError, match="dataset: was 'sha256:"):
        train(args_for(folder, changed.parent / corpus.name, resume_from="latest", max_steps=6))
    changed.write_text(corpus.read_text())  # the same text elsewhere is the same corpus
    assert train(args_for(folder, changed, resume_from="latest", max_steps=5)).global_step == 5


def test_resume_refuses_other_init_weights_and_tokenizer(base, corpus, tmp_path):
    """Frozen-big starts from --init-from: its weights and tokenizer count by content."""
    source = tmp_path / "source"
    shutil.copytree(base[0].output_dir, source, ignore=shutil.ignore_patterns("checkpoints", "logs"))

    def frozen(**overrides):
        values = dict(mode="frozen-big", init_from=str(source), dataset=str(corpus), max_steps=2, checkpoint_every=2)
        return tiny_train_args(tmp_path, "frozen", **{**values, **overrides})

    train(frozen())
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<changed>"
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UsageError, match="init_from_tokenizer: was 'sha256:"):
        train(frozen(resume_from="latest", max_steps=3))
    weights = load_file(source / "model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="init_from: was 'sha256:"):
        train(frozen(resume_from="latest", max_steps=3))


@pytest.fixture(scope="module")
def router_base(tmp_path_factory, base):
    """A finished 2-step router run on the base model, with a checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("router")
    model = tmp / "model"
    shutil.copytree(base[0].output_dir, model, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    result = train_router(tiny_router_args(tmp, str(model), "routers", max_steps=2, checkpoint_every=2))
    return result, model


def test_router_training_refuses_other_settings_and_other_weights(router_base, tmp_path):
    result, model = router_base
    folder = tmp_path / "routers"
    shutil.copytree(result.output_dir, folder)
    common = dict(max_steps=3, checkpoint_every=2, resume_from="latest")
    with pytest.raises(UsageError, match="cannot resume the router training run.*alpha: was 1.0, now 2.0"):
        train_router(tiny_router_args(tmp_path, str(model), "routers", alpha=2.0, **common))
    other = tmp_path / "model"
    shutil.copytree(model, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="model: was 'sha256:"):
        train_router(tiny_router_args(tmp_path, str(other), "routers", **common))


def test_router_training_does_not_overwrite_a_finished_run(router_base, tmp_path):
    result, model = router_base
    folder = tmp_path / "routers"
    shutil.copytree(result.output_dir, folder)
    with pytest.raises(UsageError, match=f"already holds a finished router training run.*{OVERWRITE_FLAG}"):
        train_router(tiny_router_args(tmp_path, str(model), "routers", max_steps=2, checkpoint_every=0))


# ----------------------------------------------------------------------------------------------------
# 4. Damaged checkpoints


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(base, corpus, tmp_path, caplog):
    result, _ = base
    folder = copy_run(base, tmp_path)
    (folder / "train_results.json").unlink()  # as if the run had been killed after its step-4 checkpoint
    truncate(folder / "checkpoints" / "step_4" / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="step_4/model.safetensors has .* bytes"):  # asked for by name
        train(args_for(folder, corpus, resume_from=str(folder / "checkpoints" / "step_4")))
    with caplog.at_level(logging.WARNING):
        resumed = train(args_for(folder, corpus, resume_from="latest"))
    assert "step_4/model.safetensors" in caplog.text and "truncated" in caplog.text
    assert resumed.losses == {step: result.losses[step] for step in (3, 4)}  # exact, from step_2


def test_when_every_checkpoint_is_damaged_the_run_stops_naming_each(base, corpus, tmp_path):
    folder = copy_run(base, tmp_path)
    truncate(folder / "checkpoints" / "step_4" / "optimizer.bin")
    truncate(folder / "checkpoints" / "step_2" / "train_state.json")
    with pytest.raises(CorruptCheckpointError, match="no valid checkpoint.*step_4/optimizer.bin.*step_2/train_state"):
        train(args_for(folder, corpus, resume_from="latest"))


# ----------------------------------------------------------------------------------------------------
# 7. Divergence


def test_a_diverged_training_run_fails_and_saves_no_model(tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = train_duo_argv(
        out, tmp_path / "cache", learning_rate=1e6, max_grad_norm=0, max_steps=6, checkpoint_every=1,
        checkpoints_to_keep=10,
    )  # fmt: skip
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duo-llm train: error: training diverged") and "\n" not in err
    assert not (out / "model.safetensors").exists() and not (out / "train_results.json").exists()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and str(checkpoints[-1]) in err  # the last good checkpoint is named and kept
    for folder in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def test_a_nan_loss_stops_the_run(tmp_path, monkeypatch):
    from duo_llm_hf.training import train as training

    original = training.training_step

    def nan_at_step_3(accelerator, model, batch, *args):
        loss = original(accelerator, model, batch, *args)
        nan_at_step_3.calls += 1
        return loss * float("nan") if nan_at_step_3.calls == 3 else loss

    nan_at_step_3.calls = 0
    monkeypatch.setattr(training, "training_step", nan_at_step_3)
    args = tiny_train_args(tmp_path, "nan", max_steps=4, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"the loss of step 3 is nan, .*step_2, is kept"):
        train(args)
    assert not (Path(args.output_dir) / "model.safetensors").exists()


def test_a_diverged_router_run_fails_and_saves_no_model(router_base, tmp_path):
    _, model = router_base
    args = tiny_router_args(tmp_path, str(model), "diverged", learning_rate=1e38, max_grad_norm=0, max_steps=3)
    with pytest.raises(TrainingDiverged, match="training diverged"):
        train_router(args)
    assert not (Path(args.output_dir) / "model.safetensors").exists()
