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
    base = ["--model", a.duo, "--output-dir", out, "--target-usage", "0.5", "--block-size", "16", "--max-steps", "2"]
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
    ("train-eval-routings-empty", lambda a, o: train(a, o, "--eval-routings", ""), r"eval_routings: '' names none"),
    ("train-eval-routings-unknown", lambda a, o: train(a, o, "--eval-routings", "all-big,huge"),
     r"\['huge'\] are not"),
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
    ("router-target-usage-empty", lambda a, o: router(a, o, "--target-usage", ""), r"target_usage: '' is not a number"),
    ("router-target-usage-above-one", lambda a, o: router(a, o, "--target-usage", "1.5"),
     r"target_usage: target 1.5 for 'big'"),
    ("router-alpha-negative", lambda a, o: router(a, o, "--alpha", "-1"), r"alpha: -1.0 must be a finite number >= 0"),
    ("router-temperature-zero", lambda a, o: router(a, o, "--temperature-start", "0"), r"temperatures must be > 0"),
    ("router-setting-unknown", lambda a, o: _without(router(a, o, "--setting", "fast"), "--target-usage", "0.5"),
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
    ("finetune-small-init-unknown", lambda a, o: finetune(a, o, "--small-init", "slice"),
     r"small_init: 'slice' is not an initialisation"),
    ("finetune-p-big-start-above-one", lambda a, o: finetune(a, o, "--p-big-start", "1.5"),
     r"p_big_start: 1.5 must be a probability in \[0, 1\]"),
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
    # duo-llm convert
    ("convert-source-missing", lambda a, o: ["convert", str(a.root / "gone"), "--output-dir", o],
     r"SOURCE: '.*gone' does not exist"),
    ("convert-source-duo", lambda a, o: ["convert", a.duo, "--output-dir", o], r"is a Duo model already"),
    ("convert-output-is-file", lambda a, o: ["convert", a.dense, "--output-dir", a.file],
     r"--output-dir: '.*a_file' is a file"),
    ("convert-route-options", lambda a, o: ["convert", a.dense, "--output-dir", o, "--route-options", "big,tiny"],
     r"--route-options: 'big,tiny' \['tiny'\] are not allowed"),
    ("convert-seed", lambda a, o: ["convert", a.dense, "--output-dir", o, "--seed", "-1"], r"--seed: -1 is not a seed"),
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


@pytest.mark.parametrize(
    "command", ["train", "finetune", "oracle", "train-router", "ablation", "study", "card", "convert"]
)
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
        "duo-llm: error: unknown command 'orcale'; did you mean 'oracle'? choose from train, finetune, eval, oracle, "
        "train-router, ablation, study, card, convert (see 'duo-llm --help')."
    ]


# ----------------------------------------------------------------------------------------------------
# Repeated choices in a budget or fraction spec: refused wherever such a spec is parsed (the last value would win)

REPEATED_CHOICE_CASES = [
    ("oracle-budget-big-twice", lambda a, o: oracle(a, o, "--budget", "big=1,big=2"),
     r"budget: 'big=1,big=2' names 'big' twice"),
    ("oracle-budget-big-twice-by-case", lambda a, o: oracle(a, o, "--budget", "big=1,BIG=1"), r"names 'big' twice"),
    ("oracle-budget-big-count-and-schedule", lambda a, o: oracle(a, o, "--budget", "big=2:1,big=1"),
     r"names 'big' twice \(a count and a schedule\)"),
    ("oracle-budget-two-schedules", lambda a, o: oracle(a, o, "--budget", "big=2:1,big=3:1"), r"names 'big' twice"),
    ("router-target-usage-big-twice", lambda a, o: router(a, o, "--target-usage", "big=0.3,big=0.5"),
     r"target_usage: 'big=0.3,big=0.5' names 'big' twice"),
    ("router-target-usage-small-twice", lambda a, o: router(a, o, "--target-usage", "small=0.5,Small=0.2,big=0.3"),
     r"names 'small' twice"),
    ("router-oracle-budget-big-twice",
     lambda a, o: router(a, o, "--supervision", "oracle", "--oracle-budget", "big=1,big=2"), r"names 'big' twice"),
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, message", [c[1:] for c in REPEATED_CHOICE_CASES], ids=[c[0] for c in REPEATED_CHOICE_CASES]
)
def test_a_choice_named_twice_is_refused(assets, tmp_path, capsys, argv, message):
    test_bad_input_is_one_line_and_no_work(assets, tmp_path, capsys, argv, message)


@pytest.mark.parametrize(
    "parse, spec",
    [
        ("duo_llm_hf.models.losses:parse_target_usage", {"big": 0.3, "BIG": 0.5}),
        ("duo_llm_hf.models.losses:parse_target_usage", {"big": 0.3, 1: 0.5}),
        ("duo_llm_hf.utils.flops:dense_intermediate_size", {"small": 0.5, "SMALL": 0.5}),
        ("duo_llm_hf.oracle.spaces:parse_layer_budget", {"big": 2, "Big": 2}),
        ("duo_llm_hf.training.router_arguments:parse_target_usage_flag", "skip=0.2,big=0.5,skip=0.3"),
    ],
)
def test_library_parsers_refuse_a_choice_named_twice(parse, spec):
    import importlib

    module, name = parse.split(":")
    function = getattr(importlib.import_module(module), name)
    args = (DuoLlamaConfig(**tiny_llama_kwargs()), spec) if name == "dense_intermediate_size" else (spec,)
    with pytest.raises(ValueError, match="twice; give each choice once"):
        function(*args)


def test_route_probs_naming_a_choice_twice_are_refused():
    with pytest.raises(ValueError, match="route_probs: .* names 'big' twice"):
        DuoLlamaConfig(**tiny_llama_kwargs(), route_probs={"small": 0.5, "big": 0.25, "BIG": 0.25})


# Validated before the work: every holdout read whole, unwritable output folders, --report-to, duo-llm eval,
# unreachable Hub names, weight files that are not plain tensors (and never torch's weights_only=False advice).


@pytest.fixture(scope="session")
def inputs(assets, tmp_path_factory):
    """`assets` plus holdouts that fail only when read whole, model folders whose weights are a pickle holding an
    object (it would write `assets.marker` if unpickled), and a Duo model with 8 positions."""
    root = tmp_path_factory.mktemp("bad_inputs_whole")
    (root / "empty.txt").write_text("\n \n")
    (root / "short.txt").write_text("too short")
    (root / "late_bad.txt").write_bytes(b"Every token takes a route. " * 1000 + b"\xff\xfe" + b" and more text" * 10)
    pickled = {}
    for name, source in (("dense", assets.dense), ("duo", assets.duo)):
        folder = root / f"pickled_{name}"
        folder.mkdir()
        for file in Path(source).glob("*.json"):
            (folder / file.name).write_bytes(file.read_bytes())
        torch.save({"lm_head.weight": torch.zeros(2), "extra": _Pickled(assets.marker)}, folder / "pytorch_model.bin")
        pickled[name] = str(folder)
    short = save_model_folder(
        root / "short_duo",
        DuoLlamaForCausalLM(DuoLlamaConfig(**tiny_llama_kwargs(vocab_size=VOCAB, max_position_embeddings=8))),
        _tokenizer(assets.duo),
    )
    return SimpleNamespace(
        **vars(assets), empty=str(root / "empty.txt"), short=str(root / "short.txt"),
        late_bad=str(root / "late_bad.txt"), pickled_dense=pickled["dense"], pickled_duo=pickled["duo"],
        short_duo=short,
    )  # fmt: skip


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _under_file(a, flag: str = "--output-dir") -> tuple[str, str]:
    return flag, str(Path(a.file) / "out")


WHOLE_INPUT_CASES = [
    # the study reads every holdout whole before its first stage
    ("study-holdout-empty", lambda a, o: study(a, o, "--holdout", f"mine={a.empty}"), r"empty.txt' is empty"),
    ("study-holdout-too-short", lambda a, o: study(a, o, "--holdout", f"mine={a.short}"),
     r"--holdout mine: its text is too short: at most 10 tokens, and the study needs 2 blocks of 16 tokens"),
    ("study-holdout-bad-utf8-late", lambda a, o: study(a, o, "--holdout", f"mine={a.late_bad}"),
     r"--holdout mine: '.*late_bad.txt' is not UTF-8 text \(byte 27000 of 27142"),
    # an output folder that cannot be written: refused before any work (a parent that is a file)
    ("train-output-under-file", lambda a, o: train(a, o, *_under_file(a)),
     r"output_dir: '.*a_file/out' lies under '.*a_file', which is a file, not a folder"),
    ("finetune-output-under-file", lambda a, o: finetune(a, o, *_under_file(a)), r"a_file/out' lies under"),
    ("oracle-output-under-file", lambda a, o: oracle(a, o, *_under_file(a)), r"--output-dir: '.*a_file/out' lies"),
    ("router-output-under-file", lambda a, o: router(a, o, *_under_file(a)), r"output_dir: '.*a_file/out' lies"),
    ("study-output-under-file", lambda a, o: study(a, o, *_under_file(a)), r"--output-dir: '.*a_file/out' lies"),
    ("ablation-output-under-file", lambda a, o: ablation(a, o, *_under_file(a)), r"output_dir: '.*a_file/out' lies"),
    # --report-to names what our help offers, nothing else
    ("train-report-to-unknown", lambda a, o: train(a, o, "--report-to", "jsonl,tensorbored"),
     r"report_to: 'jsonl,tensorbored' \['tensorbored'\] are not allowed; give a comma-separated subset of "
     r"\['auto', 'jsonl', 'none', 'all', 'aim', 'tensorboard', 'wandb'"),
    ("train-report-to-none-and-more", lambda a, o: train(a, o, "--report-to", "none,jsonl"),
     r"report_to: 'none,jsonl' mixes 'none' with trackers"),
    ("router-report-to-unknown", lambda a, o: router(a, o, "--report-to", "wandbb"), r"\['wandbb'\] are not allowed"),
    # weight files that are a pickle of more than tensors: one line, without torch's advice, nothing unpickled
    ("finetune-init-from-pickled-object", lambda a, o: finetune(a, o, "--init-from", a.pickled_dense),
     r"init_from: a weight file in '.*pickled_dense' holds a pickle that is not plain tensors \(it refers to "
     r"getattr\); refusing to load it"),
    ("train-init-from-pickled-object", lambda a, o: train(a, o, "--mode", "frozen-big", "--init-from", a.pickled_duo),
     r"init_from: a weight file in '.*pickled_duo' holds a pickle"),
    ("oracle-model-pickled-object", lambda a, o: oracle(a, o, "--model", a.pickled_duo),
     r"--model: a weight file in '.*pickled_duo' holds a pickle that is not plain tensors"),
    ("study-model-pickled-object", lambda a, o: study(a, o, "--model", a.pickled_duo), r"holds a pickle that is not"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", [c[1:] for c in WHOLE_INPUT_CASES], ids=[c[0] for c in WHOLE_INPUT_CASES])
def test_input_checked_whole_is_one_line_and_no_work(inputs, tmp_path, capsys, argv, message):
    recorded = _Recorded(capsys)
    test_bad_input_is_one_line_and_no_work(inputs, tmp_path, recorded, argv, message)
    assert "weights_only" not in recorded.err  # torch's advice to unpickle anyway is never passed on


class _Recorded:
    """``capsys`` that keeps what it last read."""

    def __init__(self, capsys):
        self.capsys, self.err = capsys, ""

    def readouterr(self):
        captured = self.capsys.readouterr()
        self.err = captured.err
        return captured


def test_report_to_choices_are_accelerates():
    """The trackers --report-to offers (and its help names) are Accelerate's, besides our own."""
    from accelerate.utils import LoggerType

    from duo_llm_hf.training.arguments import ACCELERATE_TRACKERS, TrainArguments

    assert set(ACCELERATE_TRACKERS) == {kind.value for kind in LoggerType}
    help_text = TrainArguments.__dataclass_fields__["report_to"].metadata["help"]
    assert all(name in help_text for name in ("auto", "jsonl", "none", *ACCELERATE_TRACKERS))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its permission bits")
def test_output_folder_without_write_permission_is_one_line(assets, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = locked / "out"
    assert cli_main(train(assets, str(out))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not writable by this user" in lines[0], lines
    assert not out.exists()


@pytest.mark.slow
def test_output_folder_on_a_read_only_mount_is_one_line(tmp_path):
    """A read-only bind mount, made in a private mount namespace (``unshare``; skipped where that is not allowed)."""
    source, mount = tmp_path / "source", tmp_path / "mount"
    source.mkdir()
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "--bind", "-o", "ro", str(source), str(mount)],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    out = mount / "run"
    command = (
        f"mount --bind -o ro {source} {mount} && {sys.executable} -m duo_llm_hf.cli study --preset tiny "
        f"--no-progress --output-dir {out}"
    )
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"duo-llm study: error: --output-dir: '{out}' (its nearest existing folder '{mount}') is on a read-only "
        "file system; give a folder you can write to."
    ]
    assert not list(source.iterdir())


def _unused_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "argv",
    [
        lambda a, o: oracle(a, o, "--model", "some-org/unreachable-duo"),
        lambda a, o: router(a, o, "--model", "some-org/unreachable-duo"),
        lambda a, o: train(a, o, "--mode", "frozen-big", "--init-from", "some-org/unreachable-duo"),
        lambda a, o: ["convert", "some-org/unreachable-duo", "--output-dir", o],
        lambda a, o: ["convert", a.dense, "--tokenizer", "some-org/unreachable-duo", "--output-dir", o],
        lambda a, o: train(a, o, "--dataset", "hf:some-org/unreachable-duo"),
        lambda a, o: train(a, o, "--holdout-english", "hf:some-org/unreachable-duo:en@test"),
    ],
    ids=["oracle", "train-router", "train-frozen-big", "convert", "convert-tokenizer", "train-dataset",
         "train-holdout"],
)
def test_unreachable_hub_name_fails_fast_in_one_line(assets, tmp_path, capsys, monkeypatch, argv):
    """Without HF_HUB_OFFLINE, a Hub name that is no local folder and not cached: one line within seconds (the Hub
    client alone retries for about 30 s). The Hub is an unused loopback port, so no network is needed."""
    import time

    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{_unused_loopback_port()}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    out = tmp_path / "out"
    start = time.monotonic()
    code = cli_main(argv(assets, str(out)))
    elapsed = time.monotonic() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert re.search(rf"'some-org/unreachable-duo' is no local folder, and the Hub \({endpoint}\) cannot be reached",
                     lines[0]), lines[0]  # fmt: skip
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not out.exists()


@pytest.fixture
def local_tasks_only(monkeypatch):
    """The harness indexes only the tasks of --include_path (its own hundreds take long to index)."""
    import functools

    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))  # fmt: skip
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # duo-llm eval hands the harness its arguments in sys.argv
    import logging

    from lm_eval.utils import setup_logging

    setup_logging()  # as the harness's command line does; its handler then writes to the process's stderr, not to
    for handler in logging.getLogger("lm_eval").handlers:  # a stream an earlier test captured and closed
        if type(handler) is logging.StreamHandler:  # not pytest's own capturing handlers
            handler.stream = sys.__stderr__


def _eval(a, out, model: str, tasks: str = "hellaswag_local") -> list[str]:
    from duo_llm_hf.integrations.lm_eval import FIXTURE_DATA_DIR, TASKS_DIR

    return [
        "eval", "--model", "duo", "--model_args", f"pretrained={model}", "--tasks", tasks, "--include_path",
        str(TASKS_DIR), "--metadata", f'{{"data_dir": "{FIXTURE_DATA_DIR}"}}', "--output_path", out,
    ]  # fmt: skip


EVAL_CASES = [
    ("unknown-task", lambda a, o: _eval(a, o, a.duo, "hellaswag_local,no_such_task"),
     r"--tasks: Tasks not found: no_such_task"),
    ("missing-model-folder", lambda a, o: _eval(a, o, str(a.root / "no_model")),
     r"--model_args pretrained: '.*no_model' does not exist"),
    ("dense-model", lambda a, o: _eval(a, o, a.dense), r"--model_args pretrained: '.*dense' is a 'llama' model, not a"),
    ("pickled-weights", lambda a, o: _eval(a, o, a.pickled_duo), r"holds a pickle that is not plain tensors"),
    ("routing-unknown", lambda a, o: _eval(a, o, f"{a.duo},routing=wavy"), r"routing='wavy' is not a routing"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_errors_are_one_line(inputs, tmp_path, capsys, local_tasks_only, argv, message):
    out = tmp_path / "out"
    assert cli_main(argv(inputs, str(out))) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.match(rf"duo-llm eval: error: .*{message}", lines[0]), lines[0]
    assert not out.exists() and not inputs.marker.exists()


def test_eval_model_with_too_few_positions_is_one_line(inputs, tmp_path, capsys, local_tasks_only):
    """The task's continuations are longer than the model's 8 positions: found when the harness hands the model its
    tokenised requests; the harness's bars of building and tokenising them are held back until then, so stderr is
    one error line (exit 2), not a bare AssertionError after the bars."""
    out = tmp_path / "out"
    assert cli_main(_eval(inputs, str(out), inputs.short_duo)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "AssertionError" not in err and len(lines) == 1, err
    assert re.match(r"duo-llm eval: error: the task needs continuations of up to \d+ tokens, longer than the 8 "
                    r"positions this model can take", lines[-1]), lines  # fmt: skip
    assert not out.exists()
