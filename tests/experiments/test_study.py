"""The main job end to end: ``duo-llm study --preset tiny`` (a 6-layer model, seconds per stage)."""

from __future__ import annotations

import json

import pytest

from duo_llm_hf.cli import main as cli_main
from duo_llm_hf.experiments.report import fmt
from duo_llm_hf.experiments.study import PRESETS, run_study, study_config
from tests.helpers import save_model_folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert cli_main(["study", "--out", str(out), "--preset", "tiny", "--no-progress"]) == 0
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
    for holdout in ("english", "code"):
        stems = (
            "ppl_vs_budget",
            "methods",
            "schedules",
            "oracle_usage",
            "router_conventional_usage",
            "router_oracle_usage",
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
    assert len(metrics["findings"]) == 7 and n == 6


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
    run_study(study, "tiny", progress=False)
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
    assert set(metrics["routers"]) == {"conventional", "oracle"} and (tmp_path / "study" / "report.md").exists()
