"""The model card is filled in from the saved folder and the run's figures, and never invents figures."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.cli import main as cli_main
from duo_llm_hf.integrations.model_card import NOT_EVALUATED, build_model_card, main, write_model_card
from tests.helpers import tiny_llama_kwargs


def lm_eval_output(model_dir, limit=None, model_args=None) -> dict:
    """The layout lm-evaluation-harness 0.4 writes, for a run on ``model_dir`` (``limit``: a ``--limit`` run)."""
    totals = {"arc_easy": 2376, "hellaswag": 10042}
    return {
        "results": {
            "arc_easy": {
                "alias": "arc_easy",
                "acc,none": 0.3125,
                "acc_stderr,none": 0.0118,
                "acc_norm,none": 0.2917,
                "acc_norm_stderr,none": 0.0121,
            },
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.2611, "acc_stderr,none": 0.0044},
        },
        "n-shot": {"arc_easy": 0, "hellaswag": 0},
        "n-samples": {task: {"original": n, "effective": limit or n} for task, n in totals.items()},
        "config": {
            "model": "duo",
            "model_args": f"pretrained={model_dir},routing=random,p_big=0.5" if model_args is None else model_args,
            "limit": limit,
        },
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = DuoLlamaConfig(**tiny_llama_kwargs(num_hidden_layers=2, route_options=["small", "big", "skip"]))
    folder = tmp_path_factory.mktemp("duo-tiny")
    DuoLlamaForCausalLM(config).save_pretrained(folder)
    return folder


def sections(card: str) -> dict[str, str]:
    """Card text by '##'/'###' heading."""
    out, title = {}, "front"
    for line in card.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            out[title] = ""
        else:
            out[title] = out.get(title, "") + line + "\n"
    return out


def test_card_without_figures_marks_every_result_not_evaluated(model_dir):
    path = write_model_card(model_dir)
    assert path == model_dir / "README.md"
    assert not list(model_dir.glob(".tmp-*"))
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"duo-llm", "custom_code"} <= set(card.data.tags)
    assert card.data.eval_results is None and card.data.metrics is None
    text = path.read_text()
    assert "{{" not in text and "{%" not in text
    parts = sections(text)
    for title in (
        "Oracle routes (stage 2)",
        "Learned router (stage 3)",
        "lm-evaluation-harness",
        "Stage 1: Duo model with random routing",
        "Stage 3: learned router",
    ):
        assert NOT_EVALUATED in parts[title], title
    # Facts read from the folder: the config and the weights.
    assert "| layers | 2 |" in text and "| small FFN inner size | 4 |" in text
    assert "`small`, `big`, `skip`" in text and "trust_remote_code=True" in text
    assert "| skip | 2 | `-` | 0 | yes |" in text


def test_card_shows_the_run_figures(model_dir, tmp_path):
    figures = {
        "datasets": ["wikitext"],
        "training": {"stage1": {"steps": 1200, "final_loss": 3.217, "eval_ppl": 24.9}},
        "oracle": {
            "k=1": {"oracle_ppl": 21.4, "fixed_ppl": 30.2},
            "k=2": {"oracle_ppl": 19.8, "fixed_ppl": 27.5},
        },
        "router": {"budget_big": 0.3, "realised": {"small": 0.68, "big": 0.32}, "ppl": 26.1},
        "lm_eval": lm_eval_output(model_dir),
        "limitations": ["Trained on 10M tokens only."],
    }
    text = build_model_card(model_dir, figures, repo_id="someone/duo-tiny")
    parts = sections(text)
    assert "| steps | 1200 |" in parts["Stage 1: Duo model with random routing"]
    assert NOT_EVALUATED in parts["Stage 3: learned router"]  # no router training figures were given
    assert "| k=1 | 21.4 | 30.2 |" in parts["Oracle routes (stage 2)"]
    router = parts["Learned router (stage 3)"]
    assert "| budget_big | 0.3 |" in router and "| big | 0.32 |" in router
    assert "| arc_easy | acc_norm | 0.2917 | 0.0121 | 0 | 2,376 |" in parts["lm-evaluation-harness"]
    assert "`routing=random`, `p_big=0.5`" in parts["lm-evaluation-harness"]
    for title in ("Oracle routes (stage 2)", "Learned router (stage 3)", "lm-evaluation-harness"):
        assert NOT_EVALUATED not in parts[title]
    assert 'repo = "someone/duo-tiny"' in text and "Trained on 10M tokens only." in text
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["wikitext"]
    assert set(card.data.metrics) == {"accuracy", "perplexity"}
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("arc_easy", "acc")] == 0.3125 and values[("hellaswag", "acc")] == 0.2611


def test_card_reads_run_files_and_json_paths(model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run, ignore=shutil.ignore_patterns("README.md"))  # the model, not its card
    (run / "train_results.json").write_text(json.dumps({"global_step": 50, "tokens_seen": 102400}))
    (run / "training_args.json").write_text(
        json.dumps({"dataset": "hf:wikitext:wikitext-2-raw-v1@train", "learning_rate": 0.001})
    )
    lm_eval_file = tmp_path / "results_2024.json"
    lm_eval_file.write_text(json.dumps(lm_eval_output(run)))
    oracle_file = tmp_path / "study" / "oracle_summary.json"
    oracle_file.parent.mkdir()
    oracle_file.write_text(json.dumps({"all_big_ppl": 25.0, "oracle_ppl": 18.0}))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"big_fraction": 0.29}))

    path = write_model_card(run, [lm_eval_file, oracle_file, f"router={report}"])
    text = path.read_text()
    parts = sections(text)
    assert "| tokens_seen | 102,400 |" in parts["Stage 1: Duo model with random routing"]
    assert "| learning_rate | 0.001 |" in parts["Stage 1: Duo model with random routing"]
    assert "| oracle_ppl | 18 |" in parts["Oracle routes (stage 2)"]
    assert "| big_fraction | 0.29 |" in parts["Learned router (stage 3)"]
    assert "hellaswag" in parts["lm-evaluation-harness"]
    assert ModelCard.load(path).data.datasets == ["wikitext"]  # the Hub id of the hf: corpus spec


def test_oracle_summary_layout(model_dir):
    summary = {  # the layout of eval/oracle_study.py's oracle_summary.json
        "model": "runs/duo",
        "tokens_evaluated": 4096,
        "uniform_perplexity": {"small_all": 41.2, "big_all": 30.5},
        "budgets": {
            "big=1": {"patterns": 12, "perplexity": {"oracle": 22.1, "fixed": 35.0}, "fixed_pattern": "sssBssss"},
            "big=2": {"patterns": 66, "perplexity": {"oracle": 19.4, "fixed": 33.2}, "fixed_pattern": "ssBsssBs"},
        },
        "_space": {"kind": "classes"},
    }
    oracle = sections(build_model_card(model_dir, {"oracle": summary}))["Oracle routes (stage 2)"]
    assert "| tokens_evaluated | 4096 |" in oracle and "| big_all | 30.5 |" in oracle
    assert "|  | patterns | perplexity oracle | perplexity fixed | fixed_pattern |" in oracle
    assert "| big=2 | 66 | 19.4 | 33.2 | ssBsssBs |" in oracle
    assert "_space" not in oracle


def test_router_run_folder(model_dir, tmp_path):
    run = tmp_path / "router-run"
    shutil.copytree(model_dir, run, ignore=shutil.ignore_patterns("README.md"))
    (run / "train_results.json").write_text(json.dumps({"global_step": 300}))
    (run / "router_report.json").write_text(json.dumps({"realised_big": 0.31, "ppl": 27.2}))
    stage1 = tmp_path / "stage1_results.json"
    stage1.write_text(json.dumps({"global_step": 9000, "eval_ppl": 24.0}))
    parts = sections(build_model_card(run, {"training": {"stage1": stage1}}))
    assert "| global_step | 300 |" in parts["Stage 3: learned router"]
    assert "| global_step | 9000 |" in parts["Stage 1: Duo model with random routing"]
    assert "| realised_big | 0.31 |" in parts["Learned router (stage 3)"]


def test_command_line(model_dir, tmp_path, capsys):
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({"oracle": {"oracle_ppl": 17.5}}))
    path = main([str(model_dir), "--metrics", str(figures), "--model-name", "Duo tiny"])
    assert str(path) in capsys.readouterr().out
    text = path.read_text()
    assert text.splitlines()[0] == "---" and "# Duo tiny" in text and "| oracle_ppl | 17.5 |" in text
    # The same through the duo-llm command.
    path.unlink()
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"realised_big": 0.27}))
    assert cli_main(["card", str(model_dir), "--metrics", f"router={report}"]) == 0
    assert "| realised_big | 0.27 |" in sections(path.read_text())["Learned router (stage 3)"]


def test_bad_inputs_give_clear_errors(model_dir, tmp_path):
    unknown = tmp_path / "numbers.json"
    unknown.write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="numbers.json.*SECTION=FILE"):
        build_model_card(model_dir, [unknown])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_model_card(model_dir, [tmp_path / "missing.json"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model_card(tmp_path)
    broken = tmp_path / "oracle.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_model_card(model_dir, [broken])


def test_card_refuses_lm_eval_results_of_another_model(model_dir, tmp_path, capsys):
    other = tmp_path / "other-run"
    other.mkdir()
    results = tmp_path / "lm_eval.json"
    results.write_text(json.dumps(lm_eval_output(other)))
    with pytest.raises(ValueError, match="results are of model .*other-run.*not of"):
        build_model_card(model_dir, [results])
    # On the command line: one line, exit 2, and no card written.
    assert cli_main(["card", str(model_dir), "--metrics", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duo-llm card: error: lm_eval: the results are of model") and "\n" not in err
    # Results that do not name their model are refused too; those of its Hub copy (--repo-id) are accepted.
    results.write_text(json.dumps(lm_eval_output(model_dir, model_args="trust_remote_code=True")))
    with pytest.raises(ValueError, match="do not say which model"):
        build_model_card(model_dir, [results])
    results.write_text(json.dumps(lm_eval_output(model_dir, model_args={"pretrained": "someone/duo-tiny"})))
    assert "hellaswag" in build_model_card(model_dir, [results], repo_id="someone/duo-tiny")
    # A path that does not exist from here (lm-eval ran elsewhere): the folder's name and parameter count decide.
    output = lm_eval_output(model_dir, model_args=f"pretrained=runs/{model_dir.name}")
    output["config"]["model_num_parameters"] = DuoLlamaForCausalLM.from_pretrained(model_dir).num_parameters()
    results.write_text(json.dumps(output))
    assert "hellaswag" in build_model_card(model_dir, [results])
    output["config"]["model_num_parameters"] += 1
    results.write_text(json.dumps(output))
    with pytest.raises(ValueError, match="results are of model 'runs/duo-tiny"):
        build_model_card(model_dir, [results])


def test_limited_lm_eval_run_is_a_smoke_test_not_a_benchmark_score(model_dir, tmp_path):
    results = tmp_path / "lm_eval.json"
    results.write_text(json.dumps(lm_eval_output(model_dir, limit=4)))
    text = build_model_card(model_dir, [results])
    lm_eval = sections(text)["lm-evaluation-harness"]
    assert "Smoke test, not a benchmark score" in lm_eval and "`--limit 4`" in lm_eval
    assert "| arc_easy | acc | 0.3125 | 0.0118 | 0 | 4 of 2,376 |" in lm_eval
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None and card.data.metrics is None  # no model-index, no "accuracy"
    assert "model-index:" not in text.split("---")[1]  # the metadata (its text mentions the model-index)
    # Hand-written figures (no results file, so no item counts) are shown, but never as benchmark scores.
    text = build_model_card(model_dir, {"lm_eval": {"arc_easy": {"acc": 0.5}}})
    assert "| arc_easy | acc | 0.5 |  |  | not recorded |" in text and "model-index:" not in text.split("---")[1]


def test_card_metadata_and_text_hold_no_builtin_dataset_nor_template_comment(model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run, ignore=shutil.ignore_patterns("README.md"))
    (run / "training_args.json").write_text(json.dumps({"dataset": "builtin", "learning_rate": 0.001}))
    text = write_model_card(run).read_text()
    assert ModelCard.load(run / "README.md").data.datasets is None
    assert "datasets" not in text.split("---")[1]
    assert "This file is the template" not in text and "<!--" not in text
    assert text.startswith("---\n") and "\n---\n\n# run\n" in text
