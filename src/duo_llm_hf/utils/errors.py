"""User errors and how the command line shows them.

A user's mistake (an argument out of its domain, a missing or unreadable file, a run folder that would be
overwritten, a checkpoint that does not fit the run) raises `UsageError`. The command line prints it as one line,
``duo-llm <command>: error: <message>``, and exits 2 (argparse's convention), without a traceback; ``--debug`` or
``DUO_LLM_DEBUG=1`` shows the traceback. Any other exception is a bug and keeps its traceback.

The command-line parsers (`utils.arguments.HfArgumentParser`) raise `UsageError`s too (an unknown flag, a value
of the wrong type, an invalid choice, a missing required flag), so they print the same one line instead of
argparse's usage block.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "DUO_LLM_DEBUG"
DEBUG_FLAG = "--debug"
USAGE_EXIT_CODE = 2


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


def unpickler_reason(err: Exception) -> str:
    """What torch's weights-only unpickler refused (the global it names, if any), for an error message.

    torch's own message advises retrying with ``weights_only=False``, which would run whatever code the file holds:
    never pass that advice on (every loader of user files words its error with this instead)."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    return f"it refers to {found.group(1)}" if found else "it holds objects other than tensors and numbers"


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether the user asked for tracebacks (``--debug`` among the arguments, or ``DUO_LLM_DEBUG=1``)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(prog: str, function: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """Run ``function(argv)`` (``--debug`` removed) as the command ``prog``; return its exit code.

    A `UsageError` becomes one line on stderr and exit code 2 unless debugging was asked for. The libraries' own
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
    return result if isinstance(result, int) else 0


def script_main(prog: str, function: Callable[[list[str]], object]) -> None:
    """The ``if __name__ == "__main__"`` of a script: run ``function`` on ``sys.argv[1:]`` as the command ``prog``
    (`run_command`) and exit with its code, so a script reports errors as its ``duo-llm`` command does."""
    sys.exit(run_command(prog, function, sys.argv[1:]))
