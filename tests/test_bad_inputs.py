"""Bad inputs to every command: one line ``duo-llm <command>: error: <message>``, exit code 2, and no work done.

Every case runs the command in-process through ``duo_llm_hf.cli.main`` and checks the exit code, the one line
on stderr (what was wrong) and that the command wrote nothing (its output folder does not exist). The models and
data files are made once per session and are tiny: every check runs before any training or oracle work.
A few cases run a real ``duo-llm`` process (no traceback), ``--debug`` / ``DUO_LLM_DEBUG=1`` show the traceback,
and an unexpected exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from duo_llm_hf import DuoLlamaConfig, DuoLlamaForCausalLM
from duo_llm_hf.cli import main as cli_main
from duo_llm_hf.utils.errors import UsageError
from tests.helpers import save_model_folder, tiny_llama_kwargs

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300  # the builtin_tokenizer's size
POSITIONS = 64


class _Pickled:
    """A pickle that would write a file when loaded: a .pt --data must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture(scope="session")
def assets(tmp_path_factory, builtin_tokenizer):
    """A tiny Duo model folder and a dense one (both with the tokenizer), and good and bad data files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    kwargs = tiny_llama_kwargs(vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    torch.manual_seed(0)
    duo = save_model_folder(root / "duo", DuoLlamaForCausalLM(DuoLlamaConfig(**kwargs)), builtin_tokenizer)
    dense = save_model_folder(root / "dense", LlamaForCausalLM(LlamaConfig(**kwargs)), builtin_tokenizer)
    text = root / "holdout.txt"
    text.write_text("The oracle picks the best route for every token. " * 40)
    binary = root / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)  # 0x80.. are not UTF-8 on their own
    fake_parquet = root / "table.parquet"
    fake_parquet.write_text("not parquet at all\n")
    unknown = root / "corpus.xyz"
    unknown.write_text("text with a suffix no reader knows\n")
    oov = torch.randint(0, VOCAB, (4, 16))
    oov[1, 3] = VOCAB + 700
    save_file({"input_ids": oov}, root / "oov.safetensors")
    torch.save({"input_ids": -oov}, root / "negative.pt")
    marker = root / "was_unpickled"
    torch.save({"input_ids": _Pickled(marker)}, root / "pickled.pt")
    not_a_folder = root / "a_file"
    not_a_folder.write_text("x")
    metrics_binary = root / "metrics.json"
    metrics_binary.write_bytes(b"\xff\xfe\x00garbage")
    return SimpleNamespace(
        root=root, duo=duo, dense=dense, text=str(text), binary=str(binary), fake_parquet=str(fake_parquet),
        unknown=str(unknown), oov=str(root / "oov.safetensors"), negative=str(root / "negative.pt"),
        pickled=str(root / "pickled.pt"), marker=marker, file=str(not_a_folder), metrics_binary=str(metrics_binary),
    )  # fmt: skip


def oracle(a, out, *flags):
    base = ["--model", a.duo, "--data", a.text, "--block-size", "16", "--output-dir", out, "--no-progress"]
    return ["oracle", *_merge(base, flags)]


def train(a, out, *flags):
    base = [
        "--output-dir", out, "--builtin-max-chars", "2000", "--vocab-size", "300", "--hidden-size", "32",
        "--num-layers", "2", "--num-heads", "4", "--block-size", "16", "--batch-size", "2", "--max-steps", "2",
        "--report-to", "none", "--no-progress",
    ]  # fmt: skip
    return ["train", *_merge(base, flags)]


def router(a, out, *flags):
    base = ["--model", a.duo, "--output-dir", out, "--budget", "0.5", "--block-size", "16", "--max-steps", "2"]
    return ["train-router", *_merge(base, flags)]


def finetune(a, out, *flags):
    return ["finetune", *_merge(["--init-from", a.dense, "--output-dir", out, "--block-size", "16"], flags)]


def ablation(a, out, *flags):
    return ["ablation", *_merge(["--output-dir", out, "--preset", "tiny", "--no-progress"], flags)]


def study(a, out, *flags):
    return ["study", *_merge(["--output-dir", out, "--preset", "tiny", "--no-progress"], flags)]


def _merge(base: list[str], flags: tuple[str, ...]) -> list[str]:
    """``base`` with each flag of ``flags`` replacing the same flag there (flags are ``--name value`` pairs, or
    ``--name`` alone when followed by another flag or nothing)."""
    given = [f for f in flags if f.startswith("--")]
    merged, skip = [], False
    for i, item in enumerate(base):
        if skip:
            skip = False
            continue
        if item in given:
            skip = i + 1 < len(base) and not base[i + 1].startswith("--")
            continue
        merged.append(item)
    return merged + list(flags)


def _without(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` without the pair ``flag value``."""
    i = argv.index(flag)
    assert argv[i + 1] == value
    return argv[:i] + argv[i + 2 :]


# (id, argv builder (assets, output folder) -> argv, regex the error line must match)
CASES = [
    # duo-llm oracle
    ("oracle-num-blocks-negative", lambda a, o: oracle(a, o, "--num-blocks", "-3"),
     r"--num-blocks: -3 must be a positive integer"),
    ("oracle-num-blocks-zero", lambda a, o: oracle(a, o, "--num-blocks", "0"), r"--num-blocks: 0 must be a positive"),
    ("oracle-best-of-k-negative", lambda a, o: oracle(a, o, "--best-of-k", "-5"),
     r"--best-of-k: -5 must be an integer >= 0"),
    ("oracle-budget-empty", lambda a, o: oracle(a, o, "--budget", ""), r"--budget: '' is empty"),
    ("oracle-budget-garbage", lambda a, o: oracle(a, o, "--budget", "lots"), r"budget: 'lots'"),
    ("oracle-budget-too-many-layers", lambda a, o: oracle(a, o, "--budget", "big=9"), r"big=9.*3 layers"),
    ("oracle-block-size-past-positions", lambda a, o: oracle(a, o, "--block-size", "1000"),
     rf"--block-size 1000 is longer than the max_position_embeddings {POSITIONS}"),
    ("oracle-block-size-one", lambda a, o: oracle(a, o, "--block-size", "1"), r"--block-size: 1 must be at least 2"),
    ("oracle-batch-size-zero", lambda a, o: oracle(a, o, "--batch-size", "0"), r"--batch-size: 0 must be a positive"),
    ("oracle-chunk-tokens-zero", lambda a, o: oracle(a, o, "--chunk-tokens", "0"), r"--chunk-tokens: 0 must be"),
    ("oracle-stop-after-zero", lambda a, o: oracle(a, o, "--stop-after-batches", "0"),
     r"--stop-after-batches: 0 must be a positive"),
    ("oracle-seed-negative", lambda a, o: oracle(a, o, "--seed", "-1"), r"--seed: -1 is not a seed"),
    ("oracle-route-options-unknown", lambda a, o: oracle(a, o, "--route-options", "big,huge"),
     r"--route-options: 'big,huge' \['huge'\] are not allowed"),
    ("oracle-route-options-empty", lambda a, o: oracle(a, o, "--route-options", ""), r"--route-options: '' names none"),
    ("oracle-beam-without-big-count", lambda a, o: oracle(a, o, "--search", "beam"),
     r"budget 'all': an approximate search takes budgets that fix the number of BIG layers"),
    ("oracle-beam-width-zero", lambda a, o: oracle(a, o, "--search", "beam", "--beam-width", "0"),
     r"--beam-width: 0 must be a positive"),
    ("oracle-gap-from-exact", lambda a, o: oracle(a, o, "--gap-from", str(a.root)),
     r"--gap-from compares an approximate search with an exact run"),
    ("oracle-gap-from-not-a-run",
     lambda a, o: oracle(a, o, "--search", "beam", "--budget", "1", "--gap-from", str(a.root)),
     r"--gap-from: '.*' holds no oracle run"),
    ("oracle-data-folder", lambda a, o: oracle(a, o, "--data", str(a.root)), r"data: '.*bad_inputs\d*' is a folder"),
    ("oracle-data-missing", lambda a, o: oracle(a, o, "--data", str(a.root / "nope.txt")),
     r"data: '.*nope.txt' does not exist"),
    ("oracle-data-binary", lambda a, o: oracle(a, o, "--data", a.binary), r"data: '.*binary.txt' is not UTF-8 text"),
    ("oracle-data-token-ids-past-vocab", lambda a, o: oracle(a, o, "--data", a.oov, "--block-size", "16"),
     rf"oov.safetensors' holds token id {VOCAB + 700}, outside the model's vocabulary 0 .. {VOCAB - 1}"),
    ("oracle-data-negative-token-ids", lambda a, o: oracle(a, o, "--data", a.negative),
     r"negative.pt' holds token id -\d+, outside the model's vocabulary"),
    ("oracle-data-pickle-refused", lambda a, o: oracle(a, o, "--data", a.pickled),
     r"pickled.pt' is not a readable weights-only torch.save file .*nothing is unpickled"),
    ("oracle-text-without-block-size", lambda a, o: _without(oracle(a, o), "--block-size", "16"),
     r"--block-size: text data is cut into blocks"),
    ("oracle-tokenizer-missing", lambda a, o: oracle(a, o, "--tokenizer", str(a.root / "no_tok")),
     r"--tokenizer: '.*no_tok' is not a tokenizer folder \(it does not exist\)"),
    ("oracle-model-missing-path", lambda a, o: oracle(a, o, "--model", str(a.root / "no_model")),
     r"--model: '.*no_model' does not exist"),
    ("oracle-model-missing-relative", lambda a, o: oracle(a, o, "--model", "runs/no-such-duo-model"),
     r"--model: .*'runs/no-such-duo-model'.*(does not exist|could not be loaded as a Hub model name)"),
    ("oracle-model-dense", lambda a, o: oracle(a, o, "--model", a.dense),
     r"--model: '.*dense' is a 'llama' model, not a Duo model"),
    ("oracle-output-dir-is-file", lambda a, o: oracle(a, o, "--output-dir", a.file) + ["--no-progress"],
     r"--output-dir: '.*a_file' is a file"),
    ("oracle-dtype-choice", lambda a, o: oracle(a, o, "--dtype", "float8"), r"argument --dtype: invalid choice"),
    ("oracle-best-of-k-type", lambda a, o: oracle(a, o, "--best-of-k", "many"),
     r"argument --best-of-k: invalid int value: 'many'"),
    ("oracle-unknown-flag", lambda a, o: oracle(a, o, "--num-blockz", "3"), r"unrecognized arguments: --num-blockz"),
    ("oracle-required", lambda a, o: ["oracle", "--output-dir", o], r"the following arguments are required: --model"),
    # duo-llm train
    ("train-num-layers-negative", lambda a, o: train(a, o, "--num-layers", "-1"), r"num_layers: -1 must be a positive"),
    ("train-block-size-one", lambda a, o: train(a, o, "--block-size", "1"), r"block_size: 1 must be at least 2"),
    ("train-learning-rate-negative", lambda a, o: train(a, o, "--learning-rate", "-1"),
     r"learning_rate: -1.0 must be a finite number > 0"),
    ("train-learning-rate-nan", lambda a, o: train(a, o, "--learning-rate", "nan"), r"learning_rate: nan must be"),
    ("train-adam-beta-one", lambda a, o: train(a, o, "--adam-beta2", "1.0"), r"adam_beta2: 1.0 must be in \[0, 1\)"),
    ("train-weight-decay-negative", lambda a, o: train(a, o, "--weight-decay", "-0.1"), r"weight_decay: -0.1 must be"),
    ("train-max-grad-norm-inf", lambda a, o: train(a, o, "--max-grad-norm", "inf"), r"max_grad_norm: inf must be"),
    ("train-p-big-above-one", lambda a, o: train(a, o, "--p-big", "1.5"), r"p_big=1.5, p_skip=0.0: each must be"),
    ("train-eval-routes-empty", lambda a, o: train(a, o, "--eval-routes", ""), r"eval_routes: '' names none"),
    ("train-eval-routes-unknown", lambda a, o: train(a, o, "--eval-routes", "all-big,huge"), r"\['huge'\] are not"),
    ("train-lr-scheduler", lambda a, o: train(a, o, "--lr-scheduler", "wavy"), r"lr_scheduler: 'wavy' is not a sched"),
    ("train-vocab-size-tiny", lambda a, o: train(a, o, "--vocab-size", "10"), r"vocab_size: 10 is too small"),
    ("train-heads-do-not-divide", lambda a, o: train(a, o, "--hidden-size", "30"),
     r"hidden_size 30 is not a multiple of num_heads 4"),
    ("train-kv-heads-do-not-divide", lambda a, o: train(a, o, "--num-kv-heads", "3"),
     r"num_kv_heads 3 does not divide num_heads 4"),
    ("train-small-larger-than-big", lambda a, o: train(a, o, "--small-intermediate-size", "1000"),
     r"small_intermediate_size 1000 is larger than the big FFN's intermediate_size 128"),
    ("train-seed-negative", lambda a, o: train(a, o, "--seed", "-1"), r"seed: -1 is not a seed"),
    ("train-route-seed-huge", lambda a, o: train(a, o, "--route-seed", str(2**40)), r"route_seed: \d+ is not a seed"),
    ("train-max-steps-zero", lambda a, o: train(a, o, "--max-steps", "0"), r"max_steps: 0 must be a positive integer"),
    ("train-warmup-negative", lambda a, o: train(a, o, "--warmup-steps", "-1"), r"warmup_steps: -1 must be an integer"),
    ("train-run-name-empty", lambda a, o: train(a, o, "--run-name", ""), r"run_name: '' is empty"),
    ("train-dataset-empty", lambda a, o: train(a, o, "--dataset", ""), r"dataset: '' is not a corpus"),
    ("train-dataset-binary", lambda a, o: train(a, o, "--dataset", a.binary),
     r"dataset: '.*binary.txt' is not UTF-8 text \(byte 128"),
    ("train-dataset-fake-parquet", lambda a, o: train(a, o, "--dataset", a.fake_parquet),
     r"table.parquet' is not a Parquet file"),
    ("train-dataset-unknown-type", lambda a, o: train(a, o, "--dataset", a.unknown),
     r"corpus.xyz' has an unknown type"),
    ("train-dataset-missing", lambda a, o: train(a, o, "--dataset", str(a.root / "gone.txt")),
     r"gone.txt' is not an existing file or folder"),
    ("train-holdout-binary", lambda a, o: train(a, o, "--holdout-code", a.binary),
     r"holdout_code: '.*binary.txt' is not UTF-8 text"),
    ("train-tokenizer-missing", lambda a, o: train(a, o, "--tokenizer", str(a.root / "no_tok")),
     r"tokenizer: '.*no_tok' is not a tokenizer folder"),
    ("train-tokenizer-not-tokenizer", lambda a, o: train(a, o, "--tokenizer", str(a.root)),
     r"tokenizer: '.*' is not a tokenizer folder \(no tokenizer files\)"),
    ("train-frozen-big-no-source", lambda a, o: train(a, o, "--mode", "frozen-big"), r"needs --init-from"),
    ("train-block-past-positions", lambda a, o: train(a, o, "--max-position-embeddings", "8"),
     r"block_size 16 is longer than max_position_embeddings 8"),
    ("train-output-dir-is-file", lambda a, o: train(a, o, "--output-dir", a.file), r"output_dir: '.*a_file' is a file"),
    ("train-mode-choice", lambda a, o: train(a, o, "--mode", "sparse"), r"argument --mode: invalid choice: 'sparse'"),
    ("train-bool-type", lambda a, o: train(a, o, "--streaming", "perhaps"), r"argument --streaming"),
    ("train-unknown-flag", lambda a, o: train(a, o, "--num-blocks", "3"), r"unrecognized arguments: --num-blocks 3"),
    # duo-llm train-router
    ("router-budget-empty", lambda a, o: router(a, o, "--budget", ""), r"budget: '' is not a number"),
    ("router-budget-above-one", lambda a, o: router(a, o, "--budget", "1.5"), r"budget: target 1.5 for 'big'"),
    ("router-alpha-negative", lambda a, o: router(a, o, "--alpha", "-1"), r"alpha: -1.0 must be a finite number >= 0"),
    ("router-temperature-zero", lambda a, o: router(a, o, "--temperature-start", "0"), r"temperatures must be > 0"),
    ("router-setting-unknown", lambda a, o: _without(router(a, o, "--setting", "fast"), "--budget", "0.5"),
     r"--setting: invalid choice: 'fast'"),
    ("router-route-options-unknown", lambda a, o: router(a, o, "--route-options", "small,huge"), r"huge"),
    ("router-oracle-field-needs-oracle", lambda a, o: router(a, o, "--oracle-budget", "2"),
     r"\['--oracle-budget'\] set the oracle's targets; they need --supervision oracle"),
    ("router-model-dense", lambda a, o: router(a, o, "--model", a.dense), r"is a 'llama' model, not a Duo model"),
    ("router-model-missing", lambda a, o: router(a, o, "--model", str(a.root / "no_model")),
     r"model: '.*no_model' does not exist"),
    ("router-learning-rate-zero", lambda a, o: router(a, o, "--learning-rate", "0"), r"learning_rate: 0.0 must be"),
    ("router-shuffle-buffer-zero", lambda a, o: router(a, o, "--shuffle-buffer", "0"), r"shuffle_buffer: 0 must be"),
    # duo-llm finetune
    ("finetune-source-missing", lambda a, o: finetune(a, o, "--init-from", str(a.root / "no_opt")),
     r"init_from: '.*no_opt' is not a model folder"),
    ("finetune-lora-rank-zero", lambda a, o: finetune(a, o, "--lora-r", "0"), r"lora_r: 0 must be a positive integer"),
    ("finetune-lora-dropout-one", lambda a, o: finetune(a, o, "--lora-dropout", "1"), r"lora_dropout: 1.0 must be in"),
    ("finetune-hidden-flag", lambda a, o: finetune(a, o, "--hidden-size", "64"), r"unrecognized arguments: --hidden"),
    # duo-llm ablation
    ("ablation-p-bigs", lambda a, o: ablation(a, o, "--p-bigs", "0,1.5"), r"p_bigs: 1.5 is not a probability"),
    ("ablation-train-p-big", lambda a, o: ablation(a, o, "--train-p-big", "1"), r"train_p_big: 1.0 must be strictly"),
    ("ablation-out-is-file", lambda a, o: ablation(a, o, "--output-dir", a.file), r"output_dir: '.*a_file' is a file"),
    ("ablation-threads-zero", lambda a, o: ablation(a, o, "--threads", "0"), r"threads: 0 must be a positive integer"),
    ("ablation-seed-negative", lambda a, o: ablation(a, o, "--eval-seed", "-2"), r"eval_seed: -2 is not a seed"),
    ("ablation-override", lambda a, o: ablation(a, o, "--train-override", "learning_rate=-1"),
     r"learning_rate: -1.0 must be a finite number > 0"),
    # duo-llm study
    ("study-model-dense", lambda a, o: study(a, o, "--model", a.dense), r"dense' is a 'llama' model, not a Duo model"),
    ("study-model-missing", lambda a, o: study(a, o, "--model", str(a.root / "no_model")), r"no_model"),
    ("study-out-is-file", lambda a, o: study(a, o, "--output-dir", a.file), r"--output-dir: '.*a_file' is a file"),
    ("study-preset-choice", lambda a, o: study(a, o, "--preset", "huge"), r"argument --preset: invalid choice: 'huge'"),
    ("study-holdout-no-name", lambda a, o: study(a, o, "--holdout", a.text),
     r"--holdout: '.*holdout.txt' is not NAME=PATH"),
    ("study-holdout-missing", lambda a, o: study(a, o, "--holdout", f"mine={a.root / 'gone.txt'}"),
     r"--holdout mine: '.*gone.txt' is not an existing file"),
    ("study-holdout-twice", lambda a, o: study(a, o, "--holdout", f"mine={a.text}", "--holdout", f"mine={a.text}"),
     r"--holdout: name 'mine' is given twice"),
    ("study-holdout-builtin-name", lambda a, o: study(a, o, "--holdout", f"english={a.text}"),
     r"--holdout: name 'english' is taken by a built-in holdout"),
    ("study-holdout-binary", lambda a, o: study(a, o, "--holdout", f"mine={a.binary}"),
     r"--holdout mine: .*binary.txt"),
    ("study-holdout-only-alone", lambda a, o: study(a, o, "--holdout-only"), r"--holdout-only leaves no holdout"),
    # duo-llm card
    ("card-model-missing", lambda a, o: ["card", str(a.root / "no_model")], r"no_model' has no config.json"),
    ("card-metrics-missing", lambda a, o: ["card", a.duo, "--metrics", str(a.root / "gone.json")],
     r"metrics: '.*gone.json' does not exist"),
    ("card-metrics-binary", lambda a, o: ["card", a.duo, "--metrics", f"oracle={a.metrics_binary}"],
     r"metrics: '.*metrics.json' is not valid JSON"),
    ("card-repo-id-empty", lambda a, o: ["card", a.duo, "--repo-id", ""], r"--repo-id: '' is empty"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_no_work(assets, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = cli_main(argv(assets, str(out)))
    err = capsys.readouterr().err
    command = argv(assets, str(out))[0]
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(rf"duo-llm {command}: error: .*{message}", lines[0]), lines[0]
    assert not out.exists(), "the command wrote its output folder before refusing"
    assert not (Path(assets.duo) / "README.md").exists()  # duo-llm card wrote no card
    assert not assets.marker.exists(), "a .pt --data was unpickled"


@pytest.mark.parametrize("command", ["train", "finetune", "oracle", "train-router", "ablation", "study", "card"])
def test_help_names_the_command(command, capsys):
    assert cli_main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: duo-llm {command} ")


def test_debug_flag_and_environment_show_the_traceback(assets, tmp_path, monkeypatch):
    argv = oracle(assets, str(tmp_path / "out"), "--num-blocks", "-3")
    with pytest.raises(UsageError, match="--num-blocks: -3"):
        cli_main([*argv, "--debug"])
    monkeypatch.setenv("DUO_LLM_DEBUG", "1")
    with pytest.raises(UsageError, match="--num-blocks: -3"):
        cli_main(argv)


def test_unexpected_exceptions_keep_their_traceback(assets, tmp_path, monkeypatch):
    """A bug is not a user error: neither a RuntimeError nor a plain ValueError is turned into one line."""
    import duo_llm_hf.oracle.run as oracle_run

    argv = oracle(assets, str(tmp_path / "out"))
    for error in (RuntimeError("a bug"), ValueError("a bug, not a user error")):

        def broken(args, error=error):
            raise error

        monkeypatch.setattr(oracle_run.OracleArguments, "validate", broken)
        with pytest.raises(type(error), match="a bug"):
            cli_main(argv)


def _run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **(env or {})}
    )


@pytest.mark.slow
def test_real_process_prints_one_line_without_traceback(assets, tmp_path):
    """``duo-llm`` and a script, as a user runs them: one line on stderr, exit code 2; ``DUO_LLM_DEBUG=1`` shows
    the traceback."""
    argv = oracle(assets, str(tmp_path / "out"), "--best-of-k", "-5")
    done = _run([sys.executable, "-m", "duo_llm_hf.cli", *argv])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["duo-llm oracle: error: --best-of-k: -5 must be an integer >= 0."]

    script = _run([sys.executable, "eval/oracle_study.py", *argv[1:], "--num-blocks", "-1"])
    assert script.returncode == 2, script.stderr
    assert "Traceback" not in script.stderr
    assert script.stderr.strip().splitlines()[-1].startswith("duo-llm oracle: error: --num-blocks: -1")

    debug = _run([sys.executable, "-m", "duo_llm_hf.cli", *argv], env={"DUO_LLM_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "UsageError: --best-of-k: -5" in debug.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_process_parse_error_is_one_line(tmp_path):
    done = _run([sys.executable, "training/train_duo.py", "--output-dir", str(tmp_path / "out"), "--mode", "x"])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("duo-llm train: error: argument --mode: invalid choice: 'x'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budgets", "0"], r"budgets: \[0\] must be BIG layer counts >= 1"),
        (["--budgets", "3"], r"budgets \[3\]: BIG layers must lie in 1 .. 2"),
        (["--router-steps", "0"], r"router_steps: 0 must be a positive integer"),
        (["--learning-rate", "-1"], r"learning_rate: -1.0 must be a finite number > 0"),
        (["--block-size", "1"], r"block_size: 1 must be at least 2 tokens"),
        (["--model", "DENSE"], r"is a 'llama' model, not a Duo model"),
    ],
)
def test_router_vs_oracle_script_bad_inputs(assets, tmp_path, capsys, flags, message):
    """``eval/router_vs_oracle.py`` (not a duo-llm command) reports through the same `run_command`."""
    from duo_llm_hf.experiments import router_comparison
    from duo_llm_hf.utils.errors import run_command

    out = tmp_path / "out"
    flags = [assets.dense if flag == "DENSE" else flag for flag in flags]
    argv = _merge(["--model", assets.duo, "--output_dir", str(out), "--no-progress"], tuple(flags))
    assert run_command(router_comparison.PROG, router_comparison.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"{router_comparison.PROG}: error: .*{message}", lines[0]), lines
    assert not out.exists()


def test_unknown_command_is_one_line(capsys):
    assert cli_main(["orcale", "--model", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "duo-llm: error: unknown command 'orcale'; choose from train, finetune, eval, oracle, train-router, ablation, "
        "study, card (see 'duo-llm --help')."
    ]
