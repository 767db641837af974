"""Checks of command-line arguments, shared by every command, and the dataclass argument parser.

Every command's arguments are a dataclass (each field also a flag, ``--name-with-dashes`` and
``--name_with_underscores``), parsed by `parse_arguments`. Each command checks all its arguments before it does
any work (``validate()`` of its arguments dataclass) with these helpers; a value out of its domain raises
`UsageError`, which the command line prints as one line (`utils.errors.run_command`). Messages name the argument
by its field name (``num_blocks``, also a flag), or as the flag ``--num-blocks`` for a dataclass with
``flag_labels = True`` (the oracle, the study and the model card, whose messages always named flags).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from transformers import HfArgumentParser as _HfArgumentParser

from .errors import MissingFileError, UsageError, UsageErrors

# What a seed may be: numpy's seeding (`accelerate.utils.set_seed`) takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# Bytes read from the start of a text file to tell text from binary data.
SNIFF_BYTES = 1 << 13

Arguments = TypeVar("Arguments")


class HfArgumentParser(UsageErrors, _HfArgumentParser):
    """transformers' `HfArgumentParser` whose errors are `UsageError`s, with `parse` for one or more dataclasses.

    Each flag is spelled ``--name-with-dashes`` first (then ``--name_with_underscores``) in ``--help``, and only
    so in errors; a field whose metadata has ``positional=True`` is a positional argument instead of a flag.
    """

    def __init__(self, dataclass_types=None, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            action.option_strings.sort(key=lambda option: "_" in option)  # stable: only moves dashes first

    def error(self, message: str):
        # argparse names a flag by all its spellings (``--best-of-k/--best_of_k``): keep the first, as users write it.
        super().error(re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message))

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        # transformers makes every field a flag; a positional one (`duo-llm card MODEL_DIR`) is added here.
        if not field.metadata.get("positional"):
            return _HfArgumentParser._parse_dataclass_field(parser, field)
        kwargs = {key: value for key, value in field.metadata.items() if key != "positional"}
        parser.add_argument(field.name, type=field.type, **kwargs)

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """The dataclasses of ``argv``; an unknown flag is a `UsageError` (transformers raises a bare ValueError)."""
        *outputs, remaining = self.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)


class RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with the description as written (its line breaks and examples) and the default of each flag."""


def build_parser(arguments: type, **kwargs) -> HfArgumentParser:
    """The command-line parser of an arguments dataclass: its ``prog`` and ``description`` (class attributes) name
    the command in ``--help`` and in errors, and an optional ``formatter_class`` lays out ``--help``; ``kwargs`` go
    to `argparse.ArgumentParser`."""
    kwargs.setdefault("prog", arguments.prog)
    kwargs.setdefault("description", arguments.description)
    if hasattr(arguments, "formatter_class"):
        kwargs.setdefault("formatter_class", arguments.formatter_class)
    return HfArgumentParser(arguments, **kwargs)


def parse_arguments(arguments: type[Arguments], argv: Sequence[str] | None = None) -> Arguments:
    """Parse ``argv`` (default: the command line) into the dataclass ``arguments``; a parse error or an unknown flag
    is a `UsageError`. Every command parses its flags this way."""
    (args,) = build_parser(arguments).parse(argv)
    return args


def label(args, name: str) -> str:
    """How the user wrote argument ``name``: ``--name-with-dashes`` on a command whose messages name flags (its
    arguments dataclass has ``flag_labels = True``), else the field name."""
    return f"--{name.replace('_', '-')}" if getattr(args, "flag_labels", False) else name


def check_integer_fields(
    args,
    positive: Sequence[str] = (),
    optional: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    seeds: Sequence[str] = (),
) -> None:
    """Raise a `UsageError` at the first field of ``args`` (a dataclass or namespace) outside its group's domain.

    ``positive``: integers >= 1; ``optional``: integers >= 1 or None; ``non_negative``: integers >= 0; ``seeds``:
    integers in 0 .. 2**32 - 1, or None.
    """
    for group, may_be_unset, test, domain in (
        (positive, False, lambda v: v >= 1, "must be a positive integer"),
        (optional, True, lambda v: v >= 1, "must be a positive integer (or left unset)"),
        (non_negative, False, lambda v: v >= 0, "must be an integer >= 0"),
        (seeds, True, lambda v: 0 <= v <= MAX_SEED, f"is not a seed; use an integer in 0 .. {MAX_SEED}"),
    ):
        for name in group:
            value = getattr(args, name)
            if not (value is None and may_be_unset) and not (_is_int(value) and test(value)):
                raise UsageError(f"{label(args, name)}: {value!r} {domain}.")


def check_float_fields(
    args, positive: Sequence[str] = (), non_negative: Sequence[str] = (), fractions: Sequence[str] = ()
) -> None:
    """Raise a `UsageError` at the first field of ``args`` that is not a finite number in its group's domain.

    ``positive``: > 0; ``non_negative``: >= 0; ``fractions``: in [0, 1).
    """
    for group, test, domain in (
        (positive, lambda v: v > 0, "a finite number > 0"),
        (non_negative, lambda v: v >= 0, "a finite number >= 0"),
        (fractions, lambda v: 0 <= v < 1, "in [0, 1)"),
    ):
        for name in group:
            value = getattr(args, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not test(value):
                raise UsageError(f"{label(args, name)}: {value!r} must be {domain}.")


def check_choices(args, name: str, allowed: Iterable[str], text: str | None = None) -> list[str]:
    """The comma-separated names of ``text`` (default: the field ``name``); each must be in ``allowed`` and one at
    least be given."""
    allowed = list(allowed)
    text = getattr(args, name) if text is None else text
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if not items or bad:
        what = f"{bad} are not allowed" if bad else "names none"
        raise UsageError(f"{label(args, name)}: {text!r} {what}; give a comma-separated subset of {allowed}.")
    return items


def check_output_dir(args, name: str = "output_dir") -> None:
    """The output folder ``name`` is a non-empty path that is not an existing file."""
    value = getattr(args, name)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{label(args, name)}: {value!r} is not a folder name; give the folder to write to.")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{label(args, name)}: {value!r} is a file; give a folder to write to.")


def check_folder(field: str, path: str | Path, what: str = "folder") -> Path:
    """``path`` is an existing folder (``what`` says which kind, for the message); return it expanded."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        state = "it is a file" if folder.exists() else "it does not exist"
        raise MissingFileError(f"{field}: {str(path)!r} is not a {what} ({state}).")
    return folder


def check_text_file(field: str, path: str | Path) -> None:
    """``path`` starts as UTF-8 text (its first 8 KiB decode and hold no NUL byte): binary data would otherwise
    fail deep inside tokenization or `datasets` with an error that does not name the file."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{field}: {str(path)!r} is not UTF-8 text (byte {err.start} is {head[err.start:err.start + 1]!r}); "
            "give a text file (or, for the oracle, token blocks as .safetensors)."
        ) from None
    if "\x00" in text:
        raise UsageError(f"{field}: {str(path)!r} holds NUL bytes, so it is binary data, not text; give a text file.")


@contextmanager
def user_values(prefix: str = "") -> Iterator[None]:
    """Inside, a `ValueError` from a library check of values the user gave (a config built from flags, a budget
    parsed from a flag) becomes a `UsageError` with ``prefix`` before its message. Only around such calls: a
    ValueError elsewhere is a bug and keeps its traceback."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(f"{prefix}{err}") from err


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "HfArgumentParser",
    "MAX_SEED",
    "RawDescriptionDefaultsFormatter",
    "build_parser",
    "check_choices",
    "check_float_fields",
    "check_folder",
    "check_integer_fields",
    "check_output_dir",
    "check_text_file",
    "label",
    "parse_arguments",
    "user_values",
]
