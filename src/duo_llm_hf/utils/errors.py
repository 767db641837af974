"""User errors and how the command line shows them.

A user's mistake (an argument out of its domain, a missing or unreadable file, a run folder that would be
overwritten, a checkpoint that does not fit the run) raises `UsageError`. The command line prints it as one line,
``duo-llm <command>: error: <message>``, and exits 2 (argparse's convention), without a traceback; ``--debug`` or
``DUO_LLM_DEBUG=1`` shows the traceback. Any other exception is a bug and keeps its traceback.

The command-line parsers (`utils.arguments.DataclassArgumentParser`) raise `UsageError`s too (an unknown flag, a value
of the wrong type, an invalid choice, a missing required flag), so they print the same one line instead of
argparse's usage block.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "DUO_LLM_DEBUG"
DEBUG_FLAG = "--debug"
USAGE_EXIT_CODE = 2
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, the shell's code for a command stopped by Ctrl-C
# The commands that continue an interrupted run only when asked; every other command resumes when run again.
RESUME_FLAGS = {
    "duo-llm train": ("--resume-from", "latest"),
    "duo-llm finetune": ("--resume-from", "latest"),
    "duo-llm train-router": ("--resume-from", "latest"),
}


class UsageError(ValueError):
    """A user's mistake; the message says what was wrong and how to fix it.

    A `ValueError`, so library callers that catch `ValueError` keep working.
    """


class MissingFileError(UsageError, FileNotFoundError):
    """A path the user gave does not exist or is not the file or folder it must be (also a `FileNotFoundError`)."""


class MissingDependencyError(UsageError, ImportError):
    """An option needs a package that is not installed (also an `ImportError`); the message says what to install."""


class UsageErrors:
    """Mixin for `argparse.ArgumentParser` classes: a parse error raises `UsageError` instead of printing the usage
    block and exiting, so that `run_command` shows it as one line. ``--help`` is unchanged."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help').")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with where the run stopped (``where``: its folder and last checkpoint), for the one line
    `run_command` prints."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command line that continues ``prog argv``: the same, with the command's `RESUME_FLAGS` (replacing any
    value given before)."""
    flags = RESUME_FLAGS.get(prog, ())
    kept, skip = [], False
    names = {flags[0], "--" + flags[0][2:].replace("-", "_")} if flags else set()
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            kept.append(arg)
    return shlex.join([*prog.split(), *kept, *flags])


def unpickler_reason(err: Exception) -> str:
    """What torch's weights-only unpickler refused (the global it names, if any), for an error message.

    torch's own message advises retrying with ``weights_only=False``, which would run whatever code the file holds:
    never pass that advice on (every loader of user files words its error with this instead)."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    return f"it refers to {found.group(1)}" if found else "it holds objects other than tensors and numbers"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), to quote in a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether the user asked for tracebacks (``--debug`` among the arguments, or ``DUO_LLM_DEBUG=1``)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(prog: str, function: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """Run ``function(argv)`` (``--debug`` removed) as the command ``prog``; return its exit code.

    A `UsageError` becomes one line on stderr and exit code 2 unless debugging was asked for; Ctrl-C becomes one
    line saying where the run stopped and the command that continues it, and exit code 130. The libraries' own
    progress bars are off first, and a process other than the main one prints no warnings (`quiet_libraries`).
    """
    from .processes import quiet_libraries

    quiet_libraries()  # one bar per stage of ours, and only the main process prints
    debug = debug_requested(argv)
    try:
        result = function([arg for arg in argv if arg != DEBUG_FLAG])
    except UsageError as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, however the message was wrapped
        print(f"{prog}: error: {message}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt as interrupt:  # Ctrl-C: finished work is on disk (checkpoints, stages, batches)
        if debug:
            raise
        where = f" {interrupt.where}" if isinstance(interrupt, RunInterrupted) else ""
        command = resume_command(prog, [arg for arg in argv if arg != DEBUG_FLAG])
        print(f"{prog}: interrupted (Ctrl-C){where}; to continue, run: {command}", file=sys.stderr, flush=True)
        return INTERRUPT_EXIT_CODE
    return result if isinstance(result, int) else 0


def script_main(prog: str, function: Callable[[list[str]], object]) -> None:
    """The ``if __name__ == "__main__"`` of a script: run ``function`` on ``sys.argv[1:]`` as the command ``prog``
    (`run_command`) and exit with its code, so a script reports errors as its ``duo-llm`` command does."""
    sys.exit(run_command(prog, function, sys.argv[1:]))
