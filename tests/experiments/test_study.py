"""The main job end to end: ``duo-llm study --preset tiny`` (a 6-layer model, seconds per stage)."""

from __future__ import annotations

import json
import math

import pytest

from duo_llm_hf.cli import main as cli_main
from duo_llm_hf.experiments.report import fmt, gap_closed, interpolated_log_ppl
from duo_llm_hf.experiments.study import PRESETS, run_study, study_config
from tests.helpers import save_model_folder

HOLDOUTS = ("english", "code", "mine")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    # A holdout of the user's own: text the built-in corpus does not hold, tokenized with the study's tokenizer.
    mine = out.parent / "mine.txt"
    mine.write_text("".join(f"Line {i}: the router decides, the oracle knows the next word.\n" for i in range(400)))
    argv = ["study", "--out", str(out), "--preset", "tiny", "--no-progress", "--holdout", f"mine={mine}"]
    assert cli_main(argv) == 0
    return out


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_every_output_exists(study):
    for name in ("report.md", "report.html", "metrics.json"):
        assert (study / name).stat().st_size > 0
    figures = {p.name for p in (study / "figures").iterdir()}
    for holdout in HOLDOUTS:
        stems = (
            "ppl_vs_budget",
            "methods",
            "schedules",
            "oracle_usage",
            "router_conventional_usage",
            "router_distilled_usage",
            "router_distilled_causal_usage",
            "router_curves",
        )
        for stem in stems:
            assert f"{stem}_{holdout}.png" in figures
        assert f"token_difficulty_{holdout}.png" in figures and f"token_difficulty_{holdout}.html" in figures
    html = (study / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 10  # self-contained
    for holdout in ("english", "code"):  # the interactive pages are links, relative to the report
        page = f"figures/token_difficulty_{holdout}.html"
        assert f'<a href="{page}">' in html and f"]({page})" in (study / "report.md").read_text()


@pytest.mark.slow
def test_report_numbers_are_those_of_metrics_json(study):
    metrics = json.loads((study / "metrics.json").read_text())
    report = (study / "report.md").read_text()
    n = metrics["model"]["layers"]
    for oracle in metrics["oracle"].values():
        for k, entry in oracle["by_budget"].items():
            row = f"| {k} | {entry['patterns']} | {fmt(entry['oracle'])} |"
            assert row in report, row
        for value in oracle["schedules"].values():
            assert fmt(value) in report
    for by_k in metrics["routers"].values():
        for per_holdout in by_k.values():
            for entry in per_holdout.values():
                assert fmt(entry["ppl"]) in report
    for finding in metrics["findings"]:
        assert finding["statement"] in report
        for value in _numbers(finding["numbers"]):
            assert fmt(value) in report
    for by_kind in metrics["router_gap"].values():
        for by_k in by_kind.values():
            for gap in by_k.values():
                assert fmt(gap["gap_closed"]) in report and fmt(gap["realised_big_layers"]) in report
    # Each finding of the paper, and whether each distilled router beats the conventional one, stated per holdout.
    assert [f["holdout"] for f in metrics["findings"]] == [h for h in HOLDOUTS for _ in range(9)] and n == 6
    beats = next(f for f in metrics["findings"] if f["id"] == "distilled_beats_conventional")
    assert beats["reproduced"] == all(p["distilled"] < p["conventional"] for p in beats["numbers"].values())


@pytest.mark.slow
def test_every_router_is_measured_on_every_holdout_with_its_curve(study):
    metrics = json.loads((study / "metrics.json").read_text())
    assert list(metrics["oracle"]) == list(HOLDOUTS)
    assert set(metrics["routers"]) == {"conventional", "distilled", "distilled_causal"}
    for kind, by_k in metrics["routers"].items():
        for k, per_holdout in by_k.items():
            steps = PRESETS["tiny"].router["max_steps"]
            for holdout in HOLDOUTS:
                entry = per_holdout[holdout]
                assert [step for step, _ in entry["curve"]] == list(range(1, steps + 1)), (kind, k)
                assert entry["curve"][-1][1] == pytest.approx(entry["ppl"], rel=1e-6)  # the last is the final one
                gap = metrics["router_gap"][holdout][kind][k]
                assert gap["ppl"] == entry["ppl"] and gap["realised_big_layers"] == pytest.approx(
                    entry["realised"]["big"] * 6
                )
    # The distilled routers trained on stored targets: the oracle's over distill_blocks training blocks.
    assert metrics["seconds"]["oracle_train"] > 0 and metrics["seconds"]["oracle_train_causal"] > 0


def test_gap_closed_and_interpolation():
    by_budget = {"0": {"fixed": 100.0, "oracle": 100.0}, "1": {"fixed": 80.0, "oracle": 40.0}, "2": {"fixed": 60.0,
                 "oracle": 30.0}}  # fmt: skip
    assert gap_closed(80.0, 80.0, 40.0) == 0 and gap_closed(40.0, 80.0, 40.0) == pytest.approx(1.0)
    assert gap_closed(math.sqrt(80.0 * 40.0), 80.0, 40.0) == pytest.approx(0.5)  # half way in log perplexity
    assert gap_closed(90.0, 80.0, 40.0) < 0  # worse than fixed
    assert math.isnan(gap_closed(50.0, 40.0, 40.0))
    assert interpolated_log_ppl(by_budget, "fixed", 1.0) == pytest.approx(math.log(80.0))
    assert interpolated_log_ppl(by_budget, "oracle", 1.5) == pytest.approx((math.log(40.0) + math.log(30.0)) / 2)
    assert interpolated_log_ppl(by_budget, "fixed", 2.0) == pytest.approx(math.log(60.0))


@pytest.mark.slow
def test_findings_follow_from_the_numbers(study):
    metrics = json.loads((study / "metrics.json").read_text())
    english = metrics["oracle"]["english"]
    one = next(f for f in metrics["findings"] if f["id"] == "one_big_layer_beats_all_big")
    assert one["reproduced"] == (english["by_budget"]["1"]["oracle"] < english["all_big"])
    # The oracle takes the per-token minimum over a superset of the fixed pattern and the K random ones.
    for entry in english["by_budget"].values():
        assert entry["oracle"] <= entry["best_of_20"] + 1e-9 and entry["oracle"] <= entry["fixed"] + 1e-9


@pytest.mark.slow
def test_rerun_reuses_finished_stages(study, capsys):
    before = (study / "metrics.json").read_text()
    holdouts = json.loads((study / "study_settings.json").read_text())["holdouts"]
    run_study(study, "tiny", progress=False, holdouts=holdouts)
    assert "[duo-llm study]" not in capsys.readouterr().out  # no stage ran again
    assert json.loads((study / "metrics.json").read_text())["oracle"] == json.loads(before)["oracle"]


@pytest.mark.slow
def test_changed_settings_are_refused(study):
    with pytest.raises(ValueError, match="other settings"):
        run_study(study, "tiny", progress=False, best_of_k=5)


def test_presets_and_bad_settings():
    assert {"tiny", "default", "paper"} <= set(PRESETS)
    assert PRESETS["paper"].train["hidden_size"] == 2560 and PRESETS["default"].num_layers == 12
    with pytest.raises(ValueError, match="not a study preset"):
        study_config("huge")
    with pytest.raises(ValueError, match="not a study setting"):
        study_config("tiny", epochs=3)


@pytest.mark.slow
def test_study_of_a_given_duo_opt_model(tmp_path):
    """The stages after training read only the interface DuoLlama and DuoOPT share: a DuoOPT folder is studied too."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from duo_llm_hf import DuoOPTForCausalLM
    from duo_llm_hf.data.corpus import builtin_corpus, iter_texts
    from duo_llm_hf.data.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(iter_texts(builtin_corpus("train", max_chars=60_000)), vocab_size=300)
    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=6,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            pad_token_id=tokenizer.pad_token_id or 0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    duo = DuoOPTForCausalLM.from_dense(opt, small_intermediate_size=2)
    folder = save_model_folder(tmp_path / "duo_opt", duo, tokenizer)
    metrics = run_study(tmp_path / "study", "tiny", progress=False, model=folder)
    assert metrics["model"]["type"] == "duo_opt" and metrics["model"]["layers"] == 6
    assert not (tmp_path / "study" / "model").exists()  # no stage 1
    assert set(metrics["routers"]) == {"conventional", "distilled", "distilled_causal"}
    assert (tmp_path / "study" / "report.md").exists()


@pytest.mark.slow
def test_a_damaged_oracle_result_stops_the_study_before_its_report(study, tmp_path, capsys):
    """One flipped byte in a finished stage's oracle result: the re-run study refuses it (sha256) in one line, and
    neither its metrics nor its report are written from it."""
    import shutil

    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    results = copy / "oracle" / "english" / "oracle_results.safetensors"
    data = bytearray(results.read_bytes())
    data[-1] ^= 0xFF
    results.write_bytes(bytes(data))
    (copy / "metrics.json").unlink()
    (copy / "report.md").unlink()
    holdouts = json.loads((copy / "study_settings.json").read_text())["holdouts"]
    argv = ["study", "--out", str(copy), "--preset", "tiny", "--no-progress"]
    argv += [f"--holdout={name}={path}" for name, path in holdouts.items()]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "oracle_results.safetensors is not the file this oracle run wrote" in err[0], err
    assert not (copy / "metrics.json").exists() and not (copy / "report.md").exists()
