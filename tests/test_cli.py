"""The ``duo-llm`` command line around the commands: ``--help`` answers at once, and the flags' spellings."""

import json
import subprocess
import sys
import textwrap

import pytest

from duo_llm_hf.cli import COMMANDS
from duo_llm_hf.utils.arguments import build_parser
from duo_llm_hf.utils.errors import UsageError

# What --help must not import: each takes seconds, and none is needed to list a command's flags.
HEAVY = ("torch", "transformers", "datasets", "accelerate", "safetensors", "lm_eval", "huggingface_hub")


def help_imports(argv: list[str]) -> tuple[str, list[str]]:
    """The output of ``duo-llm ARGV`` in a fresh interpreter, and which heavy modules it imported."""
    code = f"""
        import json, sys
        from duo_llm_hf.cli import main
        code = main({argv!r})
        print("HEAVY", json.dumps([name for name in {HEAVY!r} if name in sys.modules]), code)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out, _, last = done.stdout.rpartition("HEAVY ")
    heavy, code = last.rsplit(" ", 1)
    assert code.strip() == "0"
    return out, json.loads(heavy)


@pytest.mark.slow
@pytest.mark.parametrize("command", [None, *(name for name in COMMANDS if name != "eval")])
def test_help_imports_neither_torch_nor_transformers(command):
    out, heavy = help_imports(["--help"] if command is None else [command, "--help"])
    assert out.startswith(f"usage: duo-llm {command or ''}".rstrip())
    assert heavy == [], f"duo-llm {command or ''} --help imported {heavy}"


@pytest.mark.slow
def test_import_of_the_package_is_light_and_its_names_load_on_use():
    code = """
        import sys
        import duo_llm_hf
        print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
        from duo_llm_hf import BIG, DuoLlamaConfig
        from transformers import AutoConfig
        print(BIG, AutoConfig.for_model("duo_llama").__class__ is DuoLlamaConfig)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["[]", "1 True"]  # registered with the Auto classes on first use


def test_negative_flags_have_their_own_help_and_output_dir_is_one_spelling(capsys):
    from duo_llm_hf.experiments.ablation.arguments import AblationArguments
    from duo_llm_hf.training.arguments import TrainArguments

    text = build_parser(TrainArguments).format_help()
    no_progress = text[text.index("--no-progress, --no_progress") :].split("\n")[1]
    assert "Turn off --progress." in no_progress
    for arguments in (AblationArguments, TrainArguments):
        assert "  --output-dir OUTPUT_DIR, --output_dir OUTPUT_DIR" in build_parser(arguments).format_help()
    (args,) = build_parser(AblationArguments).parse(["--out", "old", "--no-progress"])  # the former spelling
    assert args.out == "old" and args.progress is False
    (args,) = build_parser(AblationArguments).parse(["--output-dir", "new"])
    assert args.out == "new"
    with pytest.raises(UsageError, match=r"required: --output-dir \(see 'duo-llm ablation --help'\)"):
        build_parser(AblationArguments).parse([])


def test_router_flag_vocabularies_match_the_model_code():
    """train-router spells its --temperature-schedule choices out (so its --help imports no torch): they must stay
    those of the model code. Its --setting choices are the router settings' data file."""
    from typing import get_args

    from duo_llm_hf.models.routed_ffn import SCHEDULE_KINDS
    from duo_llm_hf.training.router_arguments import RouterTrainArguments, ScheduleKind
    from duo_llm_hf.training.router_settings import ROUTER_SETTINGS

    assert get_args(ScheduleKind) == tuple(SCHEDULE_KINDS)
    (setting,) = [a for a in build_parser(RouterTrainArguments)._actions if a.dest == "setting"]
    assert list(setting.choices) == sorted(ROUTER_SETTINGS) and len(ROUTER_SETTINGS) == 3


# transformers' TrainingArguments flag -> our field and the value it parses to
TRANSFORMERS_FLAGS = {
    ("--per_device_train_batch_size", "3"): ("batch_size", 3),
    ("--save_steps", "7"): ("checkpoint_every", 7),
    ("--save_total_limit", "4"): ("checkpoints_to_keep", 4),
    ("--resume_from_checkpoint", "latest"): ("resume_from", "latest"),
    ("--logging_steps", "2"): ("log_every", 2),
    ("--eval_steps", "9"): ("eval_every", 9),
    ("--num_train_epochs", "2"): ("num_epochs", 2),
    ("--lr_scheduler_type", "linear"): ("lr_scheduler", "linear"),
    ("--bf16",): ("mixed_precision", "bf16"),
    ("--bf16", "False"): ("mixed_precision", "no"),
    ("--fp16", "true"): ("mixed_precision", "fp16"),
}


@pytest.mark.parametrize("argv", list(TRANSFORMERS_FLAGS), ids=" ".join)
def test_transformers_flag_names_are_aliases_of_ours(argv):
    from duo_llm_hf.training.arguments import TrainArguments
    from duo_llm_hf.training.router_arguments import RouterTrainArguments

    name, value = TRANSFORMERS_FLAGS[argv]
    for arguments, required in ((TrainArguments, []), (RouterTrainArguments, ["--model", "m"])):
        (args,) = build_parser(arguments).parse(["--output-dir", "out", *required, *argv])
        assert getattr(args, name) == value
    dashed = [argv[0].replace("_", "-"), *argv[1:]]  # transformers takes both spellings, as we do
    (args,) = build_parser(TrainArguments).parse(["--output-dir", "out", *dashed])
    assert getattr(args, name) == value
    (args,) = build_parser(TrainArguments).parse(["--output-dir", "out"])
    assert args.mixed_precision is None and args.checkpoints_to_keep == 2  # our defaults when no flag is given


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--batch_sz", "4"], "; did you mean --batch-size?"),
        (["--lerning-rate=0.1"], "; did you mean --learning-rate?"),
        (["--num-layer", "3"], "; did you mean --num-layers?"),  # a prefix is not a flag (no abbreviations)
        (["--zzzzzz", "1"], " (see"),  # nothing near: no guess
    ],
)
def test_an_unknown_flag_names_the_nearest_known_one(argv, hint):
    from duo_llm_hf.training.arguments import TrainArguments

    with pytest.raises(UsageError) as raised:
        build_parser(TrainArguments).parse(["--output-dir", "out", *argv])
    message = str(raised.value)
    assert message.startswith(f"unrecognized arguments: {' '.join(argv)}{hint}"), message
    assert message.endswith("(see 'duo-llm train --help').")


def test_help_prints_each_default_once():
    """A help line that says its default in words gets no "(default: ...)" from argparse after it."""
    from duo_llm_hf.training.arguments import TrainArguments

    text = " ".join(build_parser(TrainArguments).format_help().split())
    assert "Eval batch size (default --batch-size). --log-every" in text
    assert "(default: the accelerate config's, else no). --bf16" in text
    assert "Log training metrics every N steps. (default: 10)" in text  # the others keep argparse's
