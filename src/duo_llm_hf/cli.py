"""The ``duo-llm`` command: one subcommand per stage, each calling the same library function as its script.

``duo-llm COMMAND --help`` shows a command's own flags. Commands are imported only when run, and ``--help`` builds
the parser from the command's arguments dataclass alone (a module that imports neither torch nor transformers), so
every ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module:function`` taking the remaining command-line arguments, and ``module:Class``, its
    arguments dataclass (None: the command parses its own ``--help``)."""

    target: str
    help: str
    script: str
    arguments: str | None = None

    def load(self) -> Callable[[list[str]], object]:
        return _load(self.target)

    def print_help(self) -> None:
        from .utils.arguments import build_parser

        build_parser(_load(self.arguments)).print_help()


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def eval_command(argv: list[str]) -> None:
    """``duo-llm eval``: the lm-evaluation-harness command line (``lm_eval``, same flags) with the ``duo`` model
    registered, which the harness's own ``lm_eval`` command does not know (it evaluates Duo folders as ``--model hf``
    with ``trust_remote_code=True`` and the routing as config overrides)."""
    from lm_eval.__main__ import cli_evaluate

    held = contextlib.nullcontext()
    if not any(arg in ("-h", "--help") for arg in argv):  # the harness's --help needs no model (nor torch)
        # (importing registers `duo` with the harness)
        from .integrations.lm_eval import check_duo_command_line, progress_held_until_scoring

        if check_duo_command_line(argv):  # its bars wait until the model has checked the requests fit it
            held = progress_held_until_scoring()

    sys.argv = ["duo-llm eval", *argv]  # the harness parses sys.argv itself
    try:
        with held:
            cli_evaluate()
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):  # the harness's word for tasks it does not know
            raise
        from .utils.errors import UsageError

        raise UsageError(f"--tasks: {err}; see 'duo-llm eval ls tasks' (local ones need --include_path).") from err


COMMANDS: dict[str, Command] = {
    "train": Command(
        "duo_llm_hf.training.train:main",
        "Stage 1: train a Duo model (random routing), a frozen-big model or the FLOP-matched dense baseline.",
        "training/train_duo.py",
        "duo_llm_hf.training.arguments:TrainArguments",
    ),
    "finetune": Command(
        "duo_llm_hf.training.finetune:main",
        "Appendix A: finetune a pretrained OPT (Hub or local) as a Duo model: frozen weights, small FFNs, LoRA.",
        "training/finetune_duo_opt.py",
        "duo_llm_hf.training.arguments:FinetuneArguments",
    ),
    "eval": Command(
        "duo_llm_hf.cli:eval_command",
        "Benchmarks with lm-evaluation-harness (--model duo, any routing mode; the harness's own flags).",
        "lm_eval --model hf",
    ),
    "oracle": Command(
        "duo_llm_hf.oracle.run:main",
        "Stage 2: the oracle over every route (or budgets): oracle, fixed, best-of-K, usage, token difficulty.",
        "eval/oracle_study.py",
        "duo_llm_hf.oracle.arguments:OracleArguments",
    ),
    "train-router": Command(
        "duo_llm_hf.training.routers:main",
        "Stage 3: train routers on a frozen Duo model (CE + alpha * usage loss, or supervised by the oracle).",
        "training/train_router.py",
        "duo_llm_hf.training.router_arguments:RouterTrainArguments",
    ),
    "ablation": Command(
        "duo_llm_hf.experiments.ablation:main",
        "Fig. 8: Duo at p_big 0..1 against FLOP-matched dense models, and from scratch against frozen-big.",
        "eval/ablation.py",
        "duo_llm_hf.experiments.ablation.arguments:AblationArguments",
    ),
    "study": Command(
        "duo_llm_hf.experiments.study:main",
        "The main job: the paper's study end to end (train, oracle, routers, token difficulty) with a report.",
        "duo-llm study --output-dir DIR",
        "duo_llm_hf.experiments.study_arguments:StudyArguments",
    ),
    "card": Command(
        "duo_llm_hf.integrations.model_card:main",
        "Write the Hub model card (README.md) of a saved checkpoint, filled in with the run's figures.",
        "python -m duo_llm_hf.integrations.model_card",
        "duo_llm_hf.integrations.model_card:CardArguments",
    ),
    "convert": Command(
        "duo_llm_hf.integrations.convert:main",
        "Convert a pretrained Llama-family or OPT checkpoint (folder, Hub name, .gguf, smollm2) into a Duo model.",
        "python -m duo_llm_hf.integrations.convert",
        "duo_llm_hf.integrations.convert_arguments:ConvertArguments",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-llm",
        description="Duo-LLM on Hugging Face: train Duo models, find oracle routes, train routers, analyse.",
        epilog=(
            "Run 'duo-llm COMMAND --help' for the flags of a command. A user error prints one line and exits 2; "
            "add --debug (or set DUO_LLM_DEBUG=1) to see its traceback."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=f"{command.help} (script: {command.script})", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            nearest = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"did you mean {nearest[0]!r}? " if nearest else ""
            message = (
                f"unknown command {argv[0]!r}; {hint}choose from {', '.join(COMMANDS)} (see 'duo-llm --help')."
            )
            print(f"duo-llm: error: {message}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    command = COMMANDS[argv[0]]
    if command.arguments and any(arg in ("-h", "--help") for arg in argv[1:]):
        command.print_help()
        return 0
    from .utils.errors import run_command
    from .utils.processes import quiet_libraries

    quiet_libraries()  # before the command imports the libraries, which read their switches then

    return run_command(f"duo-llm {argv[0]}", COMMANDS[argv[0]].load(), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
