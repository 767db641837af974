"""The Fig. 8 ablations (duo_llm_hf.experiments.ablation): the tiny preset end to end, FLOP-matched dense models, token
accounting, resume, and early errors on bad input."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from duo_llm_hf.data.tokenization import train_bpe_tokenizer  # noqa: E402
from duo_llm_hf.experiments.ablation import (  # noqa: E402
    PRESETS,
    AblationArguments,
    model_flops,
    parse_ablation_args,
    plan_ablation,
    planned_config,
    run_ablation,
)
from duo_llm_hf.utils.errors import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNS = ["duo", "dense_p0", "dense_p0.25", "dense_p0.5", "dense_p0.75", "dense_p1", "big_pretrain", "frozen_big"]


def tiny(out, **overrides) -> AblationArguments:
    return AblationArguments(out=str(out), preset="tiny", progress=False, **overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset, run once for the module: 8 models of 2 layers, a few steps each."""
    out = tmp_path_factory.mktemp("ablation") / "tiny"
    return out, run_ablation(tiny(out))


def rows_by(result, run: str) -> dict:
    """p_big -> row of one run."""
    return {row["p_big"]: row for row in result.rows if row["run"] == run}


@pytest.mark.slow
def test_tiny_preset_end_to_end_writes_table_and_plot(tiny_run):
    out, result = tiny_run
    assert result.trained == RUNS and result.reused == []
    for name in ("results.md", "results.json", "results.csv", "fig8.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "fig8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    p_bigs = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [(r["run"], r["p_big"]) for r in result.rows] == (
        [("duo", p) for p in p_bigs]
        + [(f"dense_p{p:g}", p) for p in p_bigs]
        + [("big_pretrain", 1.0)]
        + [("frozen_big", p) for p in p_bigs]
    )
    for row in result.rows:
        assert 1 < row["ppl_english"] < 1e4 and 1 < row["ppl_code"] < 1e4, row
        assert 0 <= row["arc_easy_acc"] <= 1 and 0 <= row["hellaswag_acc_norm"] <= 1, row
    duo = rows_by(result, "duo")
    assert len({round(r["ppl_english"], 6) for r in duo.values()}) == 5  # the routing changes the model's output
    # Frozen-big with every token on BIG is the frozen dense model it started from.
    frozen_all_big, pretrain = rows_by(result, "frozen_big")[1.0], rows_by(result, "big_pretrain")[1.0]
    for key in ("ppl_english", "ppl_code"):
        assert frozen_all_big[key] == pytest.approx(pretrain[key], rel=1e-5)

    # The fixture benchmarks are labelled as such in every output.
    payload = json.loads((out / "results.json").read_text())
    bench_columns = [payload["columns"][k] for k in ("arc_easy_acc", "hellaswag_acc_norm")]
    assert all("fixture smoke set, n=6/6" in c for c in bench_columns), bench_columns
    assert payload["benchmark_chance"] == {"hellaswag_acc_norm": 0.25} and "(chance 0.25)" in bench_columns[1]
    assert all("NOT benchmark scores" in row["benchmark_data"] for row in payload["rows"])
    markdown = (out / "results.md").read_text()
    assert "NOT benchmark scores and not comparable to the paper" in markdown
    assert all(c in markdown for c in bench_columns)
    header = next(csv.reader((out / "results.csv").open()))
    assert all(c in header for c in bench_columns) and "arc_easy_acc" not in header
    assert len(payload["rows"]) == len(result.rows) == 16


@pytest.mark.slow
def test_dense_flops_match_duo_flops_at_each_p_big(tiny_run):
    _, result = tiny_run
    duo = rows_by(result, "duo")
    for p, row in duo.items():
        dense = rows_by(result, f"dense_p{p:g}")[p]
        assert dense["forward_flops_per_token"] == pytest.approx(row["forward_flops_per_token"], rel=1e-12)
    flops = [duo[p]["forward_flops_per_token"] for p in sorted(duo)]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    assert (
        rows_by(result, "dense_p0")[0.0]["ffn_inner"] == "8" and rows_by(result, "dense_p1")[1.0]["ffn_inner"] == "128"
    )

    for preset in ("cpu", "paper"):  # the planned models of the larger presets, without training them
        plan = plan_ablation(AblationArguments(out="unused", preset=preset), num_processes=1)
        vocab = PRESETS[preset]["vocab_size"]
        duo_config = planned_config(plan.run("duo"), vocab)
        for p in plan.p_bigs:
            dense_config = planned_config(plan.run(f"dense_p{p:g}"), vocab)
            assert dense_config.model_type == "llama"
            block = plan.settings["block_size"]
            assert model_flops(dense_config, None, block) == pytest.approx(model_flops(duo_config, p, block), rel=1e-12)


@pytest.mark.slow
def test_equal_token_budgets_and_frozen_big_accounting(tiny_run):
    out, result = tiny_run
    plan = plan_ablation(tiny(out), num_processes=1)
    seen = {run: json.loads((out / "runs" / run / "train_results.json").read_text())["tokens_seen"] for run in RUNS}
    budget = plan.steps * plan.tokens_per_step
    assert all(seen[run] == budget for run in RUNS if run.startswith(("duo", "dense")))
    assert seen["big_pretrain"] + seen["frozen_big"] == budget  # the paper's 200B + 100B = 300B
    assert seen["big_pretrain"] == round(2 / 3 * plan.steps) * plan.tokens_per_step
    assert {row["train_tokens"] for row in result.rows if row["run"] != "big_pretrain"} == {budget}
    frozen = json.loads((out / "runs" / "frozen_big" / "training_args.json").read_text())
    assert frozen["mode"] == "frozen-big" and frozen["init_from"] == str(out / "runs" / "big_pretrain")


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_evaluations(tiny_run, tmp_path, capsys, monkeypatch):
    out, first = tiny_run
    models = {run: (out / "runs" / run / "model.safetensors").stat().st_mtime_ns for run in RUNS}
    evals = {p: p.stat().st_mtime_ns for p in (out / "evals").rglob("*.json")}

    # Through the script: nothing is trained or evaluated again.
    monkeypatch.setattr(sys, "argv", ["ablation.py", "--preset", "tiny", "--out", str(out), "--no-progress"])
    with pytest.raises(SystemExit) as done:  # the script exits with the command's code
        runpy.run_path(str(ROOT / "eval" / "ablation.py"), run_name="__main__")
    assert done.value.code == 0
    assert "fixture smoke set" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in evals} == evals

    # One run lost, one evaluation lost: only those are redone, with the same numbers (seeded, deterministic).
    shutil.rmtree(out / "runs" / "dense_p0.5")
    (out / "evals" / "duo" / "p_big=0.5.json").unlink()
    result = run_ablation(tiny(out))
    assert result.trained == ["dense_p0.5"] and result.reused == [r for r in RUNS if r != "dense_p0.5"]
    for run in RUNS:
        if run != "dense_p0.5":
            assert (out / "runs" / run / "model.safetensors").stat().st_mtime_ns == models[run], run
    for path, mtime in evals.items():
        redone = path.parent.name == "dense_p0.5" or path.name == "p_big=0.5.json" and path.parent.name == "duo"
        assert (path.stat().st_mtime_ns != mtime) == redone, path
    for old, new in zip(first.rows, result.rows, strict=True):
        for key in ("ppl_english", "ppl_code", "arc_easy_acc", "hellaswag_acc_norm"):
            assert new[key] == pytest.approx(old[key], rel=1e-4), (old["run"], old["p_big"], key)

    # A finished run made with other arguments is not silently reused.
    with pytest.raises(ValueError, match=r"trained with other arguments \(learning_rate: 0.003 -> 0.01\)"):
        run_ablation(tiny(out, learning_rate=1e-2))
    # Nor are runs trained with another tokenizer than the one asked for.
    other = tmp_path / "other_tokenizer"
    train_bpe_tokenizer(["another corpus, another tokenizer"] * 20, vocab_size=260).save_pretrained(other)
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        run_ablation(tiny(out, tokenizer=str(other)))
    # Nor is a frozen-big model whose dense source was retrained.
    shutil.rmtree(out / "runs" / "big_pretrain")
    with pytest.raises(ValueError, match="retrained since; pass --overwrite-output-dir to train 'frozen_big"):
        run_ablation(tiny(out))


def _bad_inputs(tmp_path):
    local = tmp_path / "bench"
    (local / "arc_easy").mkdir(parents=True)
    (local / "arc_easy" / "test.jsonl").write_text("{}\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        ({"p_bigs": "0,1.5"}, ValueError, r"p_bigs: 1.5 is not a probability"),
        ({"p_bigs": "0,half"}, ValueError, r"p_bigs: 'half' is not a number"),
        ({"p_bigs": "0.5,0.5"}, ValueError, "distinct probabilities"),
        ({"train_p_big": 1.0}, ValueError, "strictly between 0 and 1, or one of the FFNs is never trained"),
        ({"frozen_pretrain_fraction": 0.0}, ValueError, "frozen_pretrain_fraction"),
        ({"train_tokens": 64}, ValueError, r"1 optimizer step\(s\) of 64 tokens; frozen-big needs"),
        ({"lm_eval_tasks": "hub", "lm_eval_data": str(local)}, ValueError, "only read with --lm-eval-tasks local"),
        ({"lm_eval_tasks": "local"}, ValueError, "needs --lm-eval-data DIR"),
        ({"lm_eval_data": str(tmp_path)}, FileNotFoundError, r"holds none of \[.*hellaswag/hellaswag_val.jsonl"),
        ({"lm_eval_data": str(tmp_path / "nowhere")}, FileNotFoundError, "'.*nowhere' is not a folder"),
        ({"train_override": "no_such_field=1"}, ValueError, "'no_such_field' is not a training argument"),
        ({"train_override": "p_big=0.3"}, ValueError, "'p_big' is set by the ablation"),
        ({"train_override": "weight_decay=lots"}, ValueError, "weight_decay='lots' does not fit"),
        ({"train_override": "weight_decay"}, ValueError, "is not KEY=VALUE"),
        ({"hidden_size": 0}, ValueError, "hidden_size: 0 must be a positive integer"),
        ({"dataset": str(tmp_path / "missing.txt")}, FileNotFoundError, "missing.txt' is not an existing file"),
        ({"tokenizer": str(tmp_path / "no_tok")}, FileNotFoundError, "tokenizer: .* is not a tokenizer folder"),
        ({"out": str(a_file)}, UsageError, "is a file"),
    ]


def test_bad_inputs_stop_before_any_work(tmp_path):
    for i, (overrides, error, message) in enumerate(_bad_inputs(tmp_path)):
        out = overrides.pop("out", tmp_path / f"out{i}")
        with pytest.raises(error, match=message):
            run_ablation(tiny(out, **overrides))
        assert not (Path(out) / "runs").exists(), overrides


def test_parser_and_presets():
    args = parse_ablation_args(
        ["--out", "x", "--preset", "paper", "--p-bigs", "0,1", "--lm-eval-tasks", "none", "--no-progress"]
    )
    assert (args.preset, args.p_bigs, args.lm_eval_tasks, args.progress) == ("paper", "0,1", "none", False)
    plan = plan_ablation(args, num_processes=8)
    assert plan.p_bigs == [0.0, 1.0] and [r.name for r in plan.runs][:3] == ["duo", "dense_p0", "dense_p1"]
    assert plan.tokens_per_step == 8 * 2048 * 16 * 8 and plan.steps * plan.tokens_per_step >= 300_000_000_000
    duo = plan.run("duo").args
    assert (duo.hidden_size, duo.num_layers, duo.intermediate_size, duo.small_intermediate_size) == (
        2560,
        12,
        10240,
        640,
    )
    assert duo.mixed_precision == "bf16" and duo.streaming and plan.holdouts["code"][1] == "content"
    # An explicit local benchmark folder implies --lm-eval-tasks local.
    from duo_llm_hf.integrations.lm_eval import FIXTURE_DATA_DIR

    local = plan_ablation(AblationArguments(out="x", preset="tiny", lm_eval_data=str(FIXTURE_DATA_DIR)), 1)
    assert local.benchmarks.source == "local" and "local copy" in local.benchmarks.note({"arc_easy": 6})
    overridden = plan_ablation(tiny("x", train_override="weight_decay=0.05,lr_scheduler=linear"), 1)
    assert overridden.run("dense_p1").args.weight_decay == 0.05


def test_local_folder_scores_the_benchmarks_it_holds(tmp_path):
    """A folder holding only HellaSwag (the offline copy's layout): HellaSwag is scored, on the cpu preset's first
    2000 items, ARC-Easy is not, and every output says so and gives the chance level."""
    from duo_llm_hf.experiments.ablation.results import column_labels
    from duo_llm_hf.integrations.lm_eval import FIXTURE_DATA_DIR

    shutil.copy(FIXTURE_DATA_DIR / "hellaswag" / "hellaswag_val.jsonl", tmp_path)
    plan = plan_ablation(AblationArguments(out=str(tmp_path / "out"), preset="cpu", lm_eval_data=str(tmp_path)), 1)
    spec = plan.benchmarks
    assert (spec.source, spec.benchmarks, spec.limit) == ("local", ("hellaswag",), 2000)
    assert spec.task_names() == {"hellaswag": "hellaswag_local"}
    note = spec.note({"hellaswag": 2000})
    assert "first 2000 examples" in note and "chance level of HellaSwag acc_norm: 0.25" in note
    assert "ARC-Easy not scored" in note and "arc_easy/test.jsonl" in note
    labels = column_labels(plan, {"hellaswag": 2000})
    assert (
        "arc_easy_acc" not in labels and labels["hellaswag_acc_norm"] == "HellaSwag acc_norm (chance 0.25) [first 2000]"
    )
    # Fewer items than the limit: no "first N" claim; a flag overrides the preset's limit.
    assert "first" not in spec.note({"hellaswag": 6}) and spec.short_label({"hellaswag": 6}) == "[local data]"
    limited = plan_ablation(tiny(tmp_path / "out2", lm_eval_data=str(tmp_path), lm_eval_limit=50), 1).benchmarks
    assert limited.limit == 50 and PRESETS["tiny"]["lm_eval_limit"] is None
