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
import difflib
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .errors import MissingFileError, UsageError, UsageErrors

# What a seed may be: numpy's seeding (`accelerate.utils.set_seed`) takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# Bytes read from the start of a text file to tell text from binary data.
SNIFF_BYTES = 1 << 13

Arguments = TypeVar("Arguments")
# Field metadata read by the parser itself rather than handed to `argparse.ArgumentParser.add_argument`.
METADATA_KEYS = ("positional", "aliases", "no_help", "flag", "value_flags", "deprecated_aliases", "deprecated_values")
# When the spellings a field's ``deprecated_aliases`` / ``deprecated_values`` keep working will be removed.
DEPRECATED_UNTIL = "0.3"
# A help line that names its default in words: "(default: the model's)", "(default --batch-size)", "Default: ...".
SAYS_DEFAULT = re.compile(r"\(default\b|\bdefault:", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, unless its help already says the default in words ("default: the
    model's"): argparse would print it a second time, as "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if SAYS_DEFAULT.search(help_text) else super()._get_help_string(action)


class DataclassArgumentParser(UsageErrors, argparse.ArgumentParser):
    """A flag per dataclass field, typed by its annotation, as transformers' ``HfArgumentParser`` reads them, built
    on argparse alone so that ``--help`` imports neither transformers nor torch; its errors are `UsageError`s.

    Each flag is spelled ``--name-with-dashes`` first (then ``--name_with_underscores``) in ``--help``, and only
    so in errors; a field whose metadata has ``positional=True`` is a positional argument instead of a flag. As in
    transformers: ``X | None`` is ``X``; a ``Literal`` gives choices; a ``list[X]`` takes one or more values; a
    ``bool`` flag takes an optional yes/no value, and one that defaults to True also has ``--no-name``, whose help is
    the field's ``no_help`` metadata (default: "Turn off --name."). A field's ``aliases`` metadata names other
    spellings of its flag (transformers' ``TrainingArguments`` names, where the meaning is the same), and its
    ``value_flags`` metadata maps a switch to a value (``{"bf16": "bf16"}``: ``--bf16`` sets the field to "bf16").
    Renamed flags and values keep working for a while: the ``deprecated_aliases`` metadata names a flag's former
    spellings (not in ``--help``) and ``deprecated_values`` maps a choice's former value to its new one; either,
    used, prints one deprecation line on stderr naming the new spelling.
    A flag must be written in full (no prefix matching); an unknown one is answered with the nearest known flag.
    """

    def __init__(self, dataclass_types=None, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a typo (--num-layer) must not pick a flag (--num-layers)
        super().__init__(**kwargs)
        if dataclass_types is None:
            dataclass_types = []
        elif dataclasses.is_dataclass(dataclass_types):
            dataclass_types = [dataclass_types]
        self.dataclass_types = list(dataclass_types)
        for dataclass_type in self.dataclass_types:
            hints = typing.get_type_hints(dataclass_type)
            for field in dataclasses.fields(dataclass_type):
                if field.init:
                    _add_field(self, field, hints[field.name])

    def error(self, message: str):
        # argparse names a flag by all its spellings (``--best-of-k/--best_of_k``): keep the first, as users write it.
        super().error(re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message))

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """The dataclasses of ``argv`` (default: the command line); an unknown flag is a `UsageError`."""
        namespace, remaining = self.parse_known_args(args=argv)
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}{self.nearest_flags(remaining)}")
        values = vars(namespace)
        return tuple(
            dataclass_type(**{f.name: values.pop(f.name) for f in dataclasses.fields(dataclass_type) if f.init})
            for dataclass_type in self.dataclass_types
        )

    def nearest_flags(self, arguments: Sequence[str]) -> str:
        """"; did you mean --batch-size?" for the unknown flags among ``arguments`` that are close to a known flag
        (compared with underscores as dashes); "" when none is."""
        known: dict[str, str] = {}  # each spelling, with dashes -> the flag's first spelling, as --help shows it
        for action in self._actions:
            if isinstance(action, _DeprecatedFlag):
                continue  # a hint names the current spelling
            for option in action.option_strings:
                known.setdefault(option.replace("_", "-"), action.option_strings[0])
        hints = []
        for argument in arguments:
            flag = argument.split("=", 1)[0].replace("_", "-")
            if not flag.startswith("--"):
                continue
            matches = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if matches and known[matches[0]] not in hints:
                hints.append(known[matches[0]])
        return f"; did you mean {' or '.join(hints)}?" if hints else ""


def string_to_bool(text: str | bool) -> bool:
    """``yes/no``, ``true/false``, ``t/f``, ``y/n``, ``1/0`` (any case), as transformers reads a bool flag's value."""
    if isinstance(text, bool):
        return text
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, true/false, t/f, y/n or 1/0, got {text!r}")


def flag_name(field: dataclasses.Field) -> str:
    """The flag of a dataclass field, with underscores: its ``flag`` metadata where the flag follows a convention
    its field name predates (the study's ``out`` is ``--output-dir``, as in transformers; ``--out`` stays an
    alias), else the field name."""
    return field.metadata.get("flag", field.name)


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, kind) -> None:
    """Add the flag (or positional argument) of one dataclass field of type ``kind``."""
    kwargs = {key: value for key, value in field.metadata.items() if key not in METADATA_KEYS}
    if field.metadata.get("positional"):
        parser.add_argument(field.name, type=kind, **kwargs)
        return
    flag = flag_name(field)
    names = [f"--{flag.replace('_', '-')}", *([f"--{flag}"] if "_" in flag else [])]
    if flag != field.name:
        kwargs.update(dest=field.name, metavar=flag.upper())
    aliases = field.metadata.get("aliases", [])
    for alias in [aliases] if isinstance(aliases, str) else aliases:
        alias = alias.lstrip("-")
        names += [name for name in (f"--{alias.replace('_', '-')}", f"--{alias}") if name not in names]
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args and bool not in args:
        (kind,) = [arg for arg in args if arg is not type(None)]  # ``X | None`` is read as X
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if default is dataclasses.MISSING and kind is not bool:
        kwargs.update(required=True, default=argparse.SUPPRESS)  # ``--help`` shows no "(default: None)"
    else:
        kwargs["default"] = False if default is dataclasses.MISSING else default
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        by_text = {str(choice): choice for choice in choices}
        renamed = field.metadata.get("deprecated_values", {})
        kwargs.update(
            choices=choices, type=lambda text: by_text.get(renamed_value(parser.prog, names[0], text, renamed), text)
        )
    elif kind is bool or kind == (bool | None):
        kwargs.update(type=string_to_bool, nargs="?", const=True)
    elif origin is list or kind is list:
        kwargs.update(type=typing.get_args(kind)[0] if typing.get_args(kind) else str, nargs="+")
    else:
        kwargs["type"] = kind
    parser.add_argument(*names, **kwargs)
    if default is True and kwargs.get("type") is string_to_bool:
        no_help = field.metadata.get("no_help", f"Turn off {names[0]}.")
        parser.add_argument(
            f"--no-{flag.replace('_', '-')}",
            f"--no_{flag}",
            action="store_false",
            dest=field.name,
            default=argparse.SUPPRESS,
            help=no_help,
        )
    for alias in field.metadata.get("deprecated_aliases", []):
        spellings = dict.fromkeys((f"--{alias.replace('_', '-')}", f"--{alias}"))
        hidden = {key: value for key, value in kwargs.items() if key not in ("required", "default", "help")}
        parser.add_argument(
            *spellings, **hidden, dest=field.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
            action=_DeprecatedFlag, new_flag=names[0],
        )  # fmt: skip
    for switch, value in field.metadata.get("value_flags", {}).items():
        parser.add_argument(
            *dict.fromkeys((f"--{switch.replace('_', '-')}", f"--{switch}")),
            action=_ValueFlag,
            value=value,
            dest=field.name,
            metavar="YES/NO",
            default=argparse.SUPPRESS,
            help=f"Same as {names[0]} {value} (yes/no; no: {names[0]} no).",
        )


class _ValueFlag(argparse.Action):
    """A switch that sets its field to one value: ``--bf16`` is ``--mixed-precision bf16``; ``--bf16 no`` (as
    transformers reads ``--bf16 False``) is ``--mixed-precision no``."""

    def __init__(self, option_strings, dest, value, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const=True, type=string_to_bool, **kwargs)
        self.value = value

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.value if values else "no")


def deprecation(prog: str, old: str, new: str) -> None:
    """One line on stderr: ``old`` (a flag or value of command ``prog``) is now spelled ``new``."""
    print(f"{prog}: {old} is deprecated (removed in {DEPRECATED_UNTIL}); use {new}.", file=sys.stderr)


def renamed_value(prog: str, flag: str, text: str, renamed: dict[str, str]) -> str:
    """``text``, or the value it was renamed to (with a `deprecation` line) when ``renamed`` names it."""
    if text in renamed:
        deprecation(prog, f"{flag} {text}", f"{flag} {renamed[text]}")
        return renamed[text]
    return text


class _DeprecatedFlag(argparse._StoreAction):
    """A former spelling of a flag: stores its value as the flag does, after a `deprecation` line."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        deprecation(parser.prog, option_string, self.new_flag)
        super().__call__(parser, namespace, values, option_string)


class RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """``--help`` with the description as written (its line breaks and examples) and the default of each flag."""


def build_parser(arguments: type, **kwargs) -> DataclassArgumentParser:
    """The command-line parser of an arguments dataclass: its ``prog`` and ``description`` (class attributes) name
    the command in ``--help`` and in errors, and an optional ``formatter_class`` lays out ``--help``; ``kwargs`` go
    to `argparse.ArgumentParser`."""
    kwargs.setdefault("prog", arguments.prog)
    kwargs.setdefault("description", arguments.description)
    if hasattr(arguments, "formatter_class"):
        kwargs.setdefault("formatter_class", arguments.formatter_class)
    return DataclassArgumentParser(arguments, **kwargs)


def parse_arguments(arguments: type[Arguments], argv: Sequence[str] | None = None) -> Arguments:
    """Parse ``argv`` (default: the command line) into the dataclass ``arguments``; a parse error or an unknown flag
    is a `UsageError`. Every command parses its flags this way."""
    (args,) = build_parser(arguments).parse(argv)
    return args


def label(args, name: str) -> str:
    """How the user wrote argument ``name``: ``--name-with-dashes`` on a command whose messages name flags (its
    arguments dataclass has ``flag_labels = True``), else the flag with underscores (`flag_name`: the field name
    unless its metadata names another flag)."""
    fields = {field.name: field for field in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
    flag = flag_name(fields[name]) if name in fields else name
    return f"--{flag.replace('_', '-')}" if getattr(args, "flag_labels", False) else flag


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
    check_writable(label(args, name), path)


def check_writable(field: str, path: Path) -> None:
    """``path`` (a folder, or one to be made) can be written: its nearest existing folder (itself, or the first
    existing parent) is a folder this process may create files in, on a file system mounted read-write.

    Checked before any work, so that a run does not fail at its first save, after the work. ``os.access`` answers
    for the real user (root passes any permission bits, but not a read-only mount)."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{field}: {str(path)!r} lies under {str(existing)!r}, which is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path.absolute() else f" (its nearest existing folder {str(existing)!r})"
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            reason = "is on a read-only file system"
        else:
            reason = "is not writable by this user"
        raise UsageError(f"{field}: {str(path)!r}{where} {reason}; give a folder you can write to.")


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
            f"{field}: {str(path)!r} is not UTF-8 text (byte {err.start} is {head[err.start : err.start + 1]!r}); "
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
    "DataclassArgumentParser",
    "DefaultsHelpFormatter",
    "MAX_SEED",
    "RawDescriptionDefaultsFormatter",
    "build_parser",
    "check_choices",
    "check_float_fields",
    "check_folder",
    "check_integer_fields",
    "check_output_dir",
    "check_text_file",
    "check_writable",
    "flag_name",
    "label",
    "parse_arguments",
    "user_values",
]
