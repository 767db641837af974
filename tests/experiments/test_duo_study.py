"""The paper's Appendix A on a pretrained model (``--preset smollm2-duo``), on a tiny 30-layer Llama converted here:
finetune, then route; and its analysis code on synthetic numbers."""

from __future__ import annotations

import json

import pytest
import torch

from duo_llm_hf.experiments import duo_report
from duo_llm_hf.experiments.duo_study import SPACES, nearest_flops, space_name
from duo_llm_hf.models.routes import BIG, SKIP, SMALL
from tests.experiments.test_skip_study import LAYERS, tiny_llama_folder  # noqa: F401 (the fixture)


def tiny_duo_overrides(source: str, hellaswag: str | None) -> dict:
    """The smollm2-duo preset at tiny sizes, converting the dense checkpoint ``source`` as it converts SmolLM2."""
    return dict(
        source=source,
        weights_note="A tiny random Llama of the tests.",
        train={"dataset": "builtin", "block_size": 16, "builtin_max_chars": 60_000},
        finetune={
            "dataset": "builtin",
            "block_size": 16,
            "batch_size": 2,
            "max_steps": 3,
            "builtin_max_chars": 60_000,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
        oracle_blocks=4,
        fixed_blocks=2,
        moved_exact=2,
        router={"max_steps": 2, "batch_size": 2, "eval_every": 0},
        bootstrap_samples=50,
        hellaswag=hellaswag,
        hellaswag_items=3,
    )


@pytest.mark.slow
def test_duo_study_end_to_end(tiny_llama_folder, tmp_path):  # noqa: F811 (the fixture)
    from duo_llm_hf.experiments.study import run_study, summary_table
    from duo_llm_hf.integrations.lm_eval import FIXTURE_DATA_DIR

    out = tmp_path / "study"
    overrides = tiny_duo_overrides(tiny_llama_folder, str(FIXTURE_DATA_DIR / "hellaswag"))
    metrics = run_study(out, "smollm2-duo", progress=False, **overrides)
    assert metrics["kind"] == "duo" and metrics["model"]["layers"] == LAYERS
    assert metrics["finetune"]["global_step"] == 3 and metrics["finetune"]["all_big_unchanged"] is True
    for holdout in ("english", "code"):
        entry = metrics["per_layer"][holdout]
        assert len(entry["after"]["small"]) == LAYERS == len(entry["before"]["skip"])
        # All-BIG does not use the small FFNs: finetuning leaves it as it was.
        assert entry["after"]["all_big"]["ppl"] == pytest.approx(entry["before"]["all_big"]["ppl"], rel=1e-6)
        assert entry["after"]["small"] != entry["before"]["small"]  # the small FFNs were trained
        for space in SPACES:
            one = metrics["one_moved"][holdout][space]
            assert one["oracle"]["ppl"] <= one["fixed"]["ppl"] + 1e-9
    exact = metrics["exact"]["by_moved"]["2"]
    assert exact["patterns"] == 435
    assert exact["oracle"]["ppl"] <= exact["best_of_k"]["ppl"] <= exact["fixed"]["ppl"]
    levels = metrics["levels"]
    assert [levels["small-big"][m]["search"] for m in ("0", "1", "2")] == ["exact"] * 3
    expected = {"small70-big30": "small-big", "big50-skip50": "big-skip", "big50-small30-skip20": "small-big-skip"}
    assert {setting: router["space"] for setting, router in metrics["routers"].items()} == expected
    for router in metrics["routers"].values():
        space = router["space"]
        realised = router["holdouts"]["english"]
        deepest = max(int(m) for m in levels[space])
        assert deepest >= min(realised["moved"], LAYERS - 1)  # searched down to the router's budget
        assert set(router["fixed"]) == {"fixed", "fixed_skip"}
        assert router["fixed"]["fixed_skip"]["space"] == "big-skip"
        assert len(router["fixed"]["fixed"]["pattern"]) == LAYERS
    runs = metrics["hellaswag"]["runs"]
    assert "all_big" in runs and {f"router_{s}" for s in metrics["routers"]} <= set(runs)
    assert all(r["items"] == 3 for r in runs.values())
    report = (out / "report.md").read_text()
    for finding in metrics["findings"]:
        assert finding["statement"] in report
    assert "Small against skip, per layer" in report and "Routers in the three settings" in report
    assert "Findings of the paper, for this model" in summary_table(metrics)
    again = run_study(out, "smollm2-duo", progress=False, **overrides)  # every stage reused
    assert json.dumps(again["routers"]) == json.dumps(metrics["routers"])


def test_spaces_and_the_fixed_pattern_at_equal_flops():
    assert space_name(["big", "skip"]) == "big-skip" and space_name(["big", "small"]) == "small-big"
    path = {0: {"flops": 1.0}, 1: {"flops": 0.7}, 2: {"flops": 0.45}, 3: {"flops": 0.3}}
    assert nearest_flops(path, 0.5) == 2 and nearest_flops(path, 0.99) == 0 and nearest_flops(path, 0.1) == 3


def test_observations_read_the_usage_heatmap():
    usage = torch.zeros(3, 6, 8)
    usage[SMALL, :2] = 1  # the first two layers on small
    usage[BIG, 2:, :2] = 1  # later layers: BIG at the first positions, SKIP after
    usage[SKIP, 2:, 2:] = 1
    seen = duo_report.observations(usage)
    assert seen["small"]["first_layers"] == 1 and seen["small"]["last_layers"] == 0
    assert seen["big"]["first_positions"] > seen["big"]["last_positions"]
    assert seen["skip"]["last_layers"] > seen["skip"]["first_layers"]


def test_interpolation_between_levels():
    levels = {"1": {"fixed": 10.0}, "3": {"fixed": 40.0}}
    assert duo_report._between(levels, 2.0, "fixed") == pytest.approx(20.0)
    assert duo_report._between(levels, 5.0, "fixed") == pytest.approx(40.0)  # beyond: the nearest level


def test_each_space_is_searched_past_its_routers_budget_and_flops():
    from duo_llm_hf.experiments.duo_study import levels_needed

    routers = {
        "small70-big30": {"space": "small-big", "realised": {"english": {"moved": 20.4, "flops": 0.34}}},
        "big50-skip50": {"space": "big-skip", "realised": {"english": {"moved": 14.0, "flops": 0.53}}},
    }
    # small-big past 20.4 moved; big-skip past its router (14) and past the skip set at 0.34 FLOPs (20 skipped).
    assert levels_needed(routers, None, 30) == {"small-big": 22, "big-skip": 21}
    assert levels_needed(routers, None, 20)["small-big"] == 19  # never past the last layer


@pytest.mark.parametrize("preset", ["smollm2-duo", "smollm2-duo-gpu"])
def test_the_presets_are_valid_studies_and_finetuning_runs(preset):
    from duo_llm_hf.experiments.duo_study import check_duo_settings
    from duo_llm_hf.experiments.study import is_duo_study, study_config
    from duo_llm_hf.training.arguments import FinetuneArguments

    config = study_config(preset)
    assert is_duo_study(config)
    check_duo_settings(config, LAYERS)
    args = FinetuneArguments(init_from="a-model", output_dir="unused", **config.finetune)
    assert args.small_init == "slice-activation" and args.distill_steps > 0 and args.max_steps > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_settings": ("small50",)}, "not router settings"),
        ({"moved_exact": 1}, "moved_exact"),
        ({"fixed_blocks": 99}, "fixed_blocks"),
        ({"search_method": "bogus"}, "search_method"),
    ],
)
def test_settings_the_study_cannot_serve_are_refused_in_one_line(overrides, message):
    from duo_llm_hf.experiments.duo_study import check_duo_settings
    from duo_llm_hf.experiments.study import study_config
    from duo_llm_hf.utils.errors import UsageError

    with pytest.raises(UsageError, match=message):
        check_duo_settings(study_config("smollm2-duo", **overrides), LAYERS)
