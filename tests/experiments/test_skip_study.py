"""The BIG-or-SKIP study of a pretrained model (``--preset smollm2``), on a tiny 30-layer Llama converted here, and
its findings and analysis code on synthetic tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from duo_llm_hf.experiments import skip_analysis as sa
from duo_llm_hf.experiments.skip_report import interpolate_moved, skip_findings
from duo_llm_hf.experiments.skip_study import moved_space, skip_pattern
from duo_llm_hf.models.routes import BIG, SKIP
from tests.helpers import save_model_folder, tiny_llama_kwargs

LAYERS = 30


def tiny_overrides(source: str, hellaswag: str | None) -> dict:
    """The smollm2 preset at tiny sizes, converting the dense checkpoint ``source`` as it converts SmolLM2."""
    return dict(
        source=source,
        weights_note="A tiny random Llama of the tests.",
        train={"dataset": "builtin", "block_size": 16, "builtin_max_chars": 60_000},
        oracle_blocks=4,
        causal_blocks=1,
        fixed_blocks=2,
        fixed_moved=(2, 3, 4),
        moved_exact_other=1,
        moved_search=(3,),
        search_width=2,
        search_best_of_k=5,
        router_budgets=(2,),
        router={"max_steps": 2, "batch_size": 2, "eval_every": 0},
        bootstrap_samples=50,
        hellaswag=hellaswag,
        hellaswag_items=3,
        hellaswag_identity_items=3,
        causal_holdouts=1,
    )


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A tiny 30-layer Llama (hidden 16) saved as a HF folder, with a BPE tokenizer of the built-in corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from duo_llm_hf.data.corpus import builtin_corpus, iter_texts
    from duo_llm_hf.data.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(iter_texts(builtin_corpus("train", max_chars=60_000)), vocab_size=300)
    torch.manual_seed(0)
    fields = tiny_llama_kwargs(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
    )
    dense = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    return save_model_folder(tmp_path_factory.mktemp("dense") / "llama", dense, tokenizer)


@pytest.mark.slow
def test_skip_study_end_to_end(tiny_llama_folder, tmp_path):
    from duo_llm_hf.experiments.study import run_study, summary_table
    from duo_llm_hf.integrations.lm_eval import FIXTURE_DATA_DIR

    out = tmp_path / "study"
    metrics = run_study(
        out, "smollm2", progress=False, **tiny_overrides(tiny_llama_folder, str(FIXTURE_DATA_DIR / "hellaswag"))
    )
    assert metrics["kind"] == "skip" and metrics["model"]["layers"] == LAYERS
    english, code = metrics["holdouts"]["english"], metrics["holdouts"]["code"]
    # Exact up to 2 FFNs skipped on the first holdout (1 on the others), then the beam at 3 on the first only.
    assert [(m, v["search"]) for m, v in english["by_moved"].items()] == [("1", "exact"), ("2", "exact"), ("3", "beam")]
    assert [(m, v["patterns"]) for m, v in code["by_moved"].items()] == [("1", 30)]
    beam = english["by_moved"]["3"]
    assert beam["budget_size"] == 4060 and 5 < beam["patterns"] < 4060 and len(beam["fixed_skipped"]) == 3
    assert beam["oracle"]["ppl"] <= beam["best_of_5"]["ppl"]  # the 5 random draws are among the patterns searched
    gap = english["search"]["gap"]
    assert gap["moved"] == 2 and gap["oracle"]["ratio"] >= 1 - 1e-6 and gap["fixed"]["ratio"] >= 1 - 1e-6
    assert "search" not in code
    for holdout in ("english", "code"):
        h = metrics["holdouts"][holdout]
        assert h["blocks"] == 4 and h["tokens"] == 4 * 15
        for v in (v for v in h["by_moved"].values() if v["search"] == "exact"):
            assert v["oracle"]["ppl"] <= v["best_of_100"]["ppl"] <= v["fixed"]["ppl"]
            assert v["oracle"]["low"] <= v["oracle"]["ppl"] <= v["oracle"]["high"]
            curve = v["best_of_k_curve"]["ppl"]  # a random pattern, down to the oracle at K = all
            assert curve == sorted(curve, reverse=True) and math.isclose(curve[-1], v["oracle"]["ppl"], rel_tol=1e-6)
        assert set(h["routers"]) == {"2"}
    assert metrics["holdouts"]["english"]["causal"]["blocks"] == 1  # the causal oracle on the first holdout only
    assert "causal" not in metrics["holdouts"]["code"]
    sets = metrics["fixed_sets"]
    assert [sets[m]["search"] for m in ("2", "3", "4")] == ["exact", "beam", "greedy"]
    assert len(sets["3"]["skipped"]) == 3
    assert set(sets["3"]["skipped"]) < set(sets["4"]["skipped"])  # greedy goes on from the beam's set
    assert sets["2"]["loss"] <= sets["2"]["greedy_loss"] + 1e-9  # exact is never worse than greedy
    hellaswag = metrics["hellaswag"]
    runs = hellaswag["runs"]
    assert set(runs) == {
        "source", "converted_all_big", "all_big", "fixed_skip2", "fixed_skip3", "fixed_skip4", "router_skip2"
    }  # fmt: skip
    assert runs["all_big"]["items"] == 3 and runs["source"]["items"] == 3
    # The end-to-end test of conversion: the dense source (lm-eval's hf model) and the converted model all-BIG
    # score the same items identically, every choice's log-likelihood included.
    assert hellaswag["identity"] == {"identical_acc_norm": True, "max_loglikelihood_difference": 0.0}
    report = (out / "report.md").read_text()
    for finding in metrics["findings"]:
        assert finding["statement"] in report
    assert "A tiny random Llama of the tests." in report and "Left out, and why" in report
    assert "beam search (width 2" in report and "Measured gap of one beam step at 2 FFNs skipped" in report
    assert "Findings of the paper, for this model" in summary_table(metrics)
    # A re-run reuses every stage (and gives the same numbers).
    again = run_study(
        out, "smollm2", progress=False, **tiny_overrides(tiny_llama_folder, str(FIXTURE_DATA_DIR / "hellaswag"))
    )
    assert json.dumps(again["holdouts"]) == json.dumps(metrics["holdouts"])


@pytest.mark.slow
def test_hellaswag_is_left_out_in_one_line_without_data(tiny_llama_folder, tmp_path, capsys):
    from duo_llm_hf.experiments.study import run_study

    overrides = tiny_overrides(tiny_llama_folder, str(tmp_path / "absent"))
    overrides.update(
        router_budgets=(), moved_exact=1, moved_search=(), moved_causal=0, fixed_moved=(1,), oracle_blocks=2
    )
    metrics = run_study(tmp_path / "study", "smollm2", progress=False, **overrides)
    assert "hellaswag_val.jsonl" in metrics["hellaswag"]["not_run"]
    assert "HellaSwag left out" in capsys.readouterr().out


def test_moved_space_counts_layers_off_all_big():
    space = moved_space(LAYERS, 2)
    assert space.size == 1 + 30 + 435
    assert sorted(set(sa.moved_counts(space.patterns).tolist())) == [0, 1, 2]
    assert skip_pattern(4, [1, 3]) == "B-B-"
    with pytest.raises(ValueError):
        moved_space(LAYERS, 30)


def synthetic_table(seed: int = 0):
    """A loss table over the patterns of 6 layers with at most 2 skipped, with known structure: skipping layer 5
    costs nothing on average, every other layer costs, and per-token noise."""
    space = moved_space(6, 2)
    g = torch.Generator().manual_seed(seed)
    cost = torch.tensor([2.0, 0.5, 0.4, 0.3, 0.2, 0.0])
    base = 3.0 + (space.patterns == SKIP).double() @ cost.double()
    losses = base[:, None, None] + 0.3 * torch.randn(space.size, 8, 16, generator=g, dtype=torch.float64)
    return space, losses.float()


def test_methods_and_best_of_k_on_a_synthetic_table():
    space, losses = synthetic_table()
    mask = torch.ones(8, 16, dtype=torch.bool)
    members = sa.moved_counts(space.patterns) == 1
    methods = sa.method_losses(losses, members, mask, best_of_k=100, seed=0)
    assert (space.patterns[methods["fixed_index"]] == SKIP).nonzero().flatten().tolist() == [5]
    assert torch.equal(methods["oracle"], methods["best_of_k"])  # 6 patterns < K: best-of-K is the oracle
    assert torch.all(methods["oracle"] <= methods["fixed"])
    ks = sa.curve_ks(6)
    curve = sa.expected_best_of_k(losses, members, mask, ks)
    sub = losses[members]
    # K = 1 is the mean over patterns, K = all the oracle; brute force over every K-subset agrees in between.
    assert math.isclose(curve[0], float(sa.masked_mean(sub, mask).mean()), rel_tol=1e-6)
    assert math.isclose(curve[-1], float(sa.masked_mean(methods["oracle"], mask)), rel_tol=1e-6)
    from itertools import combinations

    brute = sum(float(sa.masked_mean(sub[list(c)].min(0).values, mask)) for c in combinations(range(6), 3)) / 20
    assert math.isclose(curve[2], brute, rel_tol=1e-6)
    assert sa.curve_ks(435)[0] == 1 and sa.curve_ks(435)[-1] == 435


def test_bootstrap_interval_and_usage():
    losses = torch.rand(20, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(20, 8, dtype=torch.bool)
    ci = sa.bootstrap_ppl(losses, mask, samples=500, seed=0)
    assert ci["low"] < ci["ppl"] < ci["high"]
    same = sa.bootstrap_ppl(torch.full((5, 4), 2.0), torch.ones(5, 4, dtype=torch.bool))
    assert math.isclose(same["low"], math.exp(2.0)) and math.isclose(same["high"], math.exp(2.0))
    patterns = torch.tensor([[BIG, BIG, BIG], [SKIP, BIG, BIG], [BIG, BIG, SKIP]])
    index = torch.tensor([[1, 2], [2, 2]])
    usage = sa.skip_usage(patterns, index, torch.ones(2, 2, dtype=torch.bool))
    assert usage == [0.25, 0.0, 0.75] and math.isclose(sa.skip_center(usage), 1.5)


def _ci(ppl: float) -> dict:
    return {"ppl": ppl, "low": ppl * 0.9, "high": ppl * 1.1}


def synthetic_metrics(oracle_1: float, fixed_1: float, center: float, causal: float = 40.0) -> dict:
    by_moved = {
        "1": {"oracle": _ci(oracle_1), "best_of_100": _ci(oracle_1), "fixed": _ci(fixed_1),
              "oracle_skip_center": center},
        "2": {"oracle": _ci(oracle_1 * 0.8), "best_of_100": _ci(oracle_1), "fixed": _ci(fixed_1 * 1.1),
              "oracle_skip_center": center},
    }  # fmt: skip
    holdout = {
        "all_big": _ci(50.0),
        "by_moved": by_moved,
        "schedules": {"2:0": _ci(20.0), "0:2": _ci(21.0), "1": _ci(19.0)},
        "difficulty": {"spearman_cheap_vs_gap": 0.2, "top_decile_overlap": 0.1},
        "causal": {"moved": 1, "oracle": _ci(oracle_1), "causal_oracle": _ci(causal), "fixed": _ci(fixed_1),
                   "all_big": _ci(50.0)},
        "routers": {"2": {"ppl": _ci(fixed_1 * 1.05), "realised_skipped": 1.5}},
    }  # fmt: skip
    return {"settings": {"best_of_k": 100}, "model": {"layers": 30}, "holdouts": {"english": holdout}}


def test_findings_follow_from_the_numbers():
    found = {f["id"]: f for f in skip_findings(synthetic_metrics(oracle_1=20.0, fixed_1=55.0, center=20.0))}
    assert found["skipping_oracle_beats_all_big"]["reproduced"]
    assert found["fixed_pruning_costs"]["reproduced"]
    assert found["oracle_lowest_below_all_big"]["reproduced"]
    assert found["oracle_keeps_early_layers_at_high_budget"]["reproduced"]
    assert found["oracle_prefers_constant_budget"]["reproduced"]
    assert found["gap_ranks_tokens_differently"]["reproduced"]
    assert found["causal_oracle_beats_fixed"]["reproduced"]
    assert found["routers_closer_to_fixed"]["reproduced"]
    # best-of-100 equals the oracle at 1 skipped (fewer patterns than K) but must lie strictly below fixed.
    assert found["oracle_beats_random_beats_fixed"]["reproduced"]
    flipped_metrics = synthetic_metrics(oracle_1=60.0, fixed_1=45.0, center=5.0, causal=48.0)
    flipped = {f["id"]: f for f in skip_findings(flipped_metrics)}
    assert not flipped["skipping_oracle_beats_all_big"]["reproduced"]
    assert not flipped["fixed_pruning_costs"]["reproduced"]
    assert not flipped["oracle_keeps_early_layers_at_high_budget"]["reproduced"]
    assert not flipped["causal_oracle_beats_fixed"]["reproduced"]


def test_interpolation_between_measured_budgets():
    by_moved = {"1": {"fixed": _ci(60.0)}, "2": {"fixed": _ci(80.0)}, "4": {"fixed": _ci(160.0)}}
    assert interpolate_moved(by_moved, 50.0, "fixed", 0.0) == pytest.approx(50.0)
    assert interpolate_moved(by_moved, 50.0, "fixed", 1.5) == pytest.approx(math.sqrt(60.0 * 80.0))
    # Between 2 and 4 (3 was not measured): halfway in log perplexity.
    assert interpolate_moved(by_moved, 50.0, "fixed", 3.0) == pytest.approx(math.sqrt(80.0 * 160.0))
    assert interpolate_moved(by_moved, 50.0, "fixed", 4.0) == pytest.approx(160.0)
    assert interpolate_moved(by_moved, 50.0, "fixed", 4.5) is None


def test_beam_keeps_the_best_by_loss_and_by_tokens_won():
    from duo_llm_hf.experiments.skip_search import kept_for_next_level
    from duo_llm_hf.oracle.search import SearchSettings

    # Row 0: lowest mean; row 2: wins most tokens (very low on a few, high elsewhere); row 1: neither.
    losses = torch.tensor([[[1.0, 1.0, 1.0, 1.0]], [[1.5, 1.5, 1.5, 1.5]], [[9.0, 0.1, 0.1, 0.1]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert kept_for_next_level(losses, mask, SearchSettings("beam", 1)).tolist() == [0, 2]
    assert kept_for_next_level(losses, mask, SearchSettings("greedy")).tolist() == [0]
    assert kept_for_next_level(losses, mask, SearchSettings("beam", 3)).tolist() == [0, 1, 2]


def test_beam_gap_inside_the_exact_table():
    from duo_llm_hf.experiments.skip_search import table_beam_gap
    from duo_llm_hf.oracle.search import SearchSettings

    space, losses = synthetic_table()
    table = {"losses": losses, "patterns": space.patterns}
    mask = torch.ones(8, 16, dtype=torch.bool)
    wide = table_beam_gap(table, mask, SearchSettings("beam", 6))  # keeps every pattern of level 1: exact
    assert wide["moved"] == 2 and wide["patterns_searched"] == wide["budget_size"] == 15
    assert wide["oracle"]["ratio"] == pytest.approx(1.0) and wide["fixed"]["ratio"] == pytest.approx(1.0)
    narrow = table_beam_gap(table, mask, SearchSettings("greedy"))  # one pattern kept: 5 children of 15
    assert narrow["patterns_searched"] == 5
    assert narrow["oracle"]["ratio"] > 1.0  # the per-token minimum over fewer patterns is higher
    # Greedy keeps layer 5 skipped (free on average), and the best pair {4, 5} is among its children.
    assert narrow["fixed"]["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        low = sa.moved_counts(space.patterns) <= 1
        table_beam_gap({"losses": losses[low], "patterns": space.patterns[low]}, mask, SearchSettings("beam", 2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moved_search": (2,)}, "must lie above moved_exact"),
        ({"moved_search": (30,)}, "below the model's 30 layers"),
        ({"moved_search": (4,), "moved_exact": 1}, "needs moved_exact >= 2"),
        ({"moved_exact_other": 0}, "moved_exact: 0"),
        ({"search_width": 0}, "search_width"),
        ({"search_best_of_k": -1}, "search_best_of_k"),
    ],
)
def test_budgets_the_model_cannot_serve_are_refused_in_one_line(overrides, message):
    from duo_llm_hf.experiments.skip_study import check_budgets
    from duo_llm_hf.experiments.study import study_config
    from duo_llm_hf.utils.errors import UsageError

    check_budgets(study_config("smollm2"), LAYERS)  # the preset itself is fine
    with pytest.raises(UsageError, match=message):
        check_budgets(study_config("smollm2", **overrides), LAYERS)
