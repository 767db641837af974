"""Oracle study runs: results on disk, resume after an interruption, two processes, data loading."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.oracle.engine import oracle_search, pattern_losses
from duo_llm_hf.oracle.results import OracleResult
from duo_llm_hf.oracle.run import load_token_blocks, run_oracle_study, study_space
from duo_llm_hf.utils.run_files import ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE
from tests.helpers import FLOAT_TOL, assert_same_choice, assert_same_search, budget_table, to_ranks

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = DuoLlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, route_options=["small", "big", "skip"], initializer_range=0.2,
    )
    return DuoLlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(2))


BUDGETS = ["all", "classes", "2:1"]
KWARGS = dict(batch_size=2, best_of_k=3, seed=1, progress=False)


def assert_same(a: OracleResult, b: OracleResult):
    """Equal results: the same batches run the same computation (a resumed run)."""
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.summary() == b.summary()


def assert_same_up_to_rounding(model, blocks, space, a: OracleResult, b: OracleResult):
    """Results of the same sequences run in batches of other shapes (other processes): tensors as
    helpers.assert_same_search; in the summaries, numbers up to rounding, and a fixed pattern may differ only where
    both results find its loss equal (a near tie of two patterns' sums)."""
    _, table = pattern_losses(model, blocks, space)
    assert_same_search(space, table, a.tensors, b.tensors, a.tensors["best_of_k_samples"])
    numbers, others = flat(a.summary()), flat(b.summary())
    assert numbers.keys() == others.keys()
    for key, value in numbers.items():
        if isinstance(value, float):
            assert value == pytest.approx(others[key], rel=1e-5), key  # perplexities: exp of a mean loss
        elif key.endswith("_pattern") and value != others[key]:
            method = key.rsplit("/", 1)[1].replace("fixed_pattern", "fixed")
            ppl = key.rsplit("/", 1)[0] + f"/perplexity/{method}"
            assert numbers[ppl] == pytest.approx(others[ppl], rel=1e-5), key
        else:
            assert value == others[key], key


def flat(tree, prefix: str = "") -> dict:
    """A nested summary as one {"a/b/c": leaf} dict."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}/{key}").items()}


@pytest.mark.numerics
def test_study_results_save_and_load(model, blocks, tmp_path):
    space = study_space(model.config, BUDGETS, ["small", "big"])
    result = run_oracle_study(model, blocks, space, tmp_path, causal=True, model_id="tiny", data_id="random", **KWARGS)
    loaded = OracleResult.load(tmp_path)
    assert_same(result, loaded)
    summary = json.loads((tmp_path / ORACLE_SUMMARY_FILE).read_text())
    assert summary["tokens_evaluated"] == 5 * 7 and summary["model"] == "tiny" and summary["data"] == "random"
    assert summary["space"]["budget_sizes"] == {"all": 8, "big=0": 1, "big=1": 3, "big=2": 3, "big=3": 1, "big=2:1": 6}
    budgets = summary["budgets"]
    for entry in budgets.values():
        ppl = entry["perplexity"]
        assert set(ppl) == {"oracle", "fixed", "best_of_k", "best_of_k_pattern", "causal_oracle"}
        assert ppl["oracle"] <= ppl["best_of_k"] <= ppl["best_of_k_pattern"] + 1e-9
        assert ppl["oracle"] <= ppl["fixed"] <= ppl["best_of_k_pattern"] + 1e-9
    assert budgets["big=0"]["perplexity"]["fixed"] == pytest.approx(summary["uniform_perplexity"]["small_all"])
    assert budgets["big=3"]["fixed_pattern"] == "BBB"
    usage = loaded.usage("big=1")
    assert usage.shape == (3, 3, 8)
    assert torch.equal(usage.sum(0)[:, :-1], torch.full((3, 7), 5))  # 5 sequences, one choice per layer and token
    assert torch.equal(usage[1].sum(0)[:-1], torch.full((7,), 5))  # exactly one BIG layer per token
    # The batched study equals one oracle_search over all sequences at once (other shapes: float rounding).
    whole = oracle_search(model, blocks, space, best_of_k=3, seed=1, uniform=["small", "big"]).tensors()
    _, table = pattern_losses(model, blocks, space)
    for name in ("oracle_loss", "uniform_loss", "best_of_k_loss"):
        torch.testing.assert_close(loaded.tensors[name], whole[name], rtol=0, atol=FLOAT_TOL, msg=name)
    for kind, among in (("oracle", None), ("best_of_k", loaded.tensors["best_of_k_samples"])):
        for g in range(len(space.budgets)):
            candidates = budget_table(space, table, g, None if among is None else among[g])
            got, expected = loaded.tensors[f"{kind}_index"][g], whole[f"{kind}_index"][g]
            assert_same_choice(candidates, to_ranks(space, got), to_ranks(space, expected))


def last_bar(err: str) -> str:
    """The final render of the last progress bar written to ``err`` (tqdm redraws a bar after each \\r)."""
    return err.rstrip("\n").split("\n")[-1].split("\r")[-1]


def test_interrupted_run_resumes_to_the_same_result(model, blocks, tmp_path, capsys):
    space = study_space(model.config, BUDGETS, ["small", "big", "skip"])
    straight = run_oracle_study(model, blocks, space, tmp_path / "straight", **KWARGS)
    shown = {**KWARGS, "progress": True}
    assert run_oracle_study(model, blocks, space, tmp_path / "cut", stop_after_batches=1, **shown) is None
    assert last_bar(capsys.readouterr().err).endswith("sequences 2/5]")  # the bar counts finished sequences
    state = json.loads((tmp_path / "cut" / "oracle_state.json").read_text())
    assert state["batches_done"] == 1 and state["num_batches"] == 3
    assert not (tmp_path / "cut" / ORACLE_RESULTS_FILE).exists()
    resumed = run_oracle_study(model, blocks, space, tmp_path / "cut", **shown)
    bar = last_bar(capsys.readouterr().err)
    assert " 100%|" in bar and bar.endswith("sequences 5/5]")  # a full bar says every sequence is done
    assert_same(straight, resumed)  # the resumed batches run exactly as in the straight run: bit for bit
    with pytest.raises(ValueError, match="best_of_k: was 3, now 4"):
        run_oracle_study(model, blocks, space, tmp_path / "cut", **{**KWARGS, "best_of_k": 4})


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.numerics
@pytest.mark.slow
def test_two_processes_give_the_one_process_result(model, blocks, tmp_path):
    model.save_pretrained(tmp_path / "model")
    save_file({"input_ids": blocks}, tmp_path / "blocks.safetensors")
    args = [
        "--model", str(tmp_path / "model"), "--data", str(tmp_path / "blocks.safetensors"), "--batch-size", "2",
        "--best-of-k", "3", "--seed", "1", "--budget", "all", "--budget", "classes", "--budget", "2:1",
        "--causal", "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    # accelerate 1.x's launcher starts several CPU processes only through mpirun; torchrun is the portable way.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    done = subprocess.run(
        [*launch, str(ROOT / "eval" / "oracle_study.py"), *args, "--output-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "searched by 2 process(es)" in done.stdout, done.stdout[-500:]
    # The same loaded weights as the launched processes: memory alignment can change how tiny GEMMs round.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    space = study_space(loaded.config, ["all", "classes", "2:1"])
    data_id = load_token_blocks(tmp_path / "blocks.safetensors")[1]
    one = run_oracle_study(
        loaded, blocks, space, tmp_path / "one", causal=True, model_id=str(tmp_path / "model"), data_id=data_id,
        **KWARGS,
    )
    # Each process walks only its share of the trees, in batches of other shapes than one process's.
    assert_same_up_to_rounding(loaded, blocks, space, one, OracleResult.load(tmp_path / "two"))


def test_load_token_blocks(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "mat", "<eos>", "<unk>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    (tmp_path / "a.txt").write_text("the cat sat\non the mat\n")
    (tmp_path / "b.txt").write_text("the cat\n")
    blocks, name = load_token_blocks([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer, block_size=4)
    # a: 6 words + eos, b: 2 words + eos = 10 tokens -> 2 blocks of 4, the rest dropped.
    assert blocks.tolist() == [[0, 1, 2, 3], [0, 4, 5, 0]]
    assert "2x4 tokens" in name
    torch.save({"input_ids": blocks}, tmp_path / "blocks.pt")
    again, _ = load_token_blocks(tmp_path / "blocks.pt", num_blocks=1)
    assert again.tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="only 2"):
        load_token_blocks(tmp_path / "blocks.pt", num_blocks=3)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_token_blocks(tmp_path / "a.txt", block_size=4)
    with pytest.raises(FileNotFoundError):
        load_token_blocks(tmp_path / "missing.txt", tokenizer, block_size=4)
