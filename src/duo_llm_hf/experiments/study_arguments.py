"""The arguments of ``duo-llm study`` and their checks, apart from the study's code so that ``--help`` answers at
once (this module imports neither torch nor transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..utils.arguments import check_folder, check_output_dir
from ..utils.errors import MissingFileError, UsageError
from .presets import preset_names

# Names a user holdout cannot take: the built-in holdouts', and the evaluation's name of all sets together.
RESERVED_HOLDOUT_NAMES = ("all",)


def parse_holdouts(values: list) -> dict[str, str]:
    """``--holdout NAME=PATH`` values (repeated, or several after one flag) as name -> path; each path an existing
    text file or folder of text files (`data.corpus.parse_corpus_spec`); raise `UsageError` on a malformed value,
    a name used twice or taken by a built-in holdout, or a missing file."""
    from ..data import HUB_PREFIX
    from ..data.corpus import HOLDOUTS, parse_corpus_spec

    flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
    holdouts: dict[str, str] = {}
    for value in flat:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--holdout: {value!r} is not NAME=PATH (e.g. --holdout wiki=valid.txt).")
        if not all(c.isalnum() or c in "_-" for c in name):
            raise UsageError(f"--holdout: name {name!r} may hold only letters, digits, '_' and '-' (it names folders).")
        if name in HOLDOUTS or name in RESERVED_HOLDOUT_NAMES:
            raise UsageError(f"--holdout: name {name!r} is taken by a built-in holdout or the report; choose another.")
        if name in holdouts:
            raise UsageError(f"--holdout: name {name!r} is given twice; give each holdout its own name.")
        if path.startswith(HUB_PREFIX) or parse_corpus_spec(path, "train", f"--holdout {name}").kind != "local":
            raise UsageError(f"--holdout {name}: {path!r} is not a local text file or folder.")
        holdouts[name] = str(Path(path).expanduser().resolve())
    return holdouts


@dataclass(kw_only=True)
class StudyArguments:
    """Arguments of ``duo-llm study`` (each field is also a flag, ``--name-with-dashes``)."""

    # The command's name and description in --help and errors (`build_parser`); unannotated, so not fields.
    prog = "duo-llm study"
    description = (
        "The Duo-LLM study end to end: stage 1 training, the oracle (all budgets, fixed, best-of-100, skip, position "
        "budgets, causal), routers, token difficulty; report.md/.html, metrics.json, figures. A re-run with the "
        "same --output-dir reuses the finished stages."
    )
    flag_labels = True  # messages name the flags (--output-dir), as the study's always did

    out: str = field(
        metadata={
            "flag": "output_dir",
            "aliases": ["--out"],
            "help": "Folder of the study (stages, report, figures). (--out: the former spelling, still accepted.)",
        }
    )
    preset: str = field(default="default", metadata={"help": "Sizes of every stage.", "choices": preset_names("study")})
    model: str | None = field(
        default=None,
        metadata={
            "help": "Study this trained Duo model folder (DuoLlama or DuoOPT, with its tokenizer) instead of "
            "training one."
        },
    )
    holdout: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A holdout of your own, NAME=PATH (a text file or folder of them, tokenized with the model's "
            "tokenizer); repeat the flag for several. The oracle, routers, token difficulty and report run on it too.",
            "action": "append",
            "metavar": "NAME=PATH",
        },
    )
    holdout_only: bool = field(
        default=False, metadata={"help": "Evaluate only the --holdout sets, not the built-in English and code ones."}
    )
    hellaswag: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a local HellaSwag copy (hellaswag_val.jsonl) for the pretrained-model study's "
            "benchmark (default: the preset's, ../shared/data/hellaswag for the smollm2 presets); absent, HellaSwag is "
            "left out with one line.",
            "metavar": "DIR",
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars (--no-progress hides them)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "If --output-dir holds a study with other settings, remove its stages and start over (else "
            "refused)."
        },
    )

    def validate(self) -> None:
        """Check the flags before any work is done: ``--output-dir`` is not a file, and ``--model``, if given, is a Duo
        model folder (its config, no weights, is read) with its tokenizer; raise `UsageError`."""
        from ..data.tokenization import has_tokenizer
        from ..utils.loading import inspect_duo_source

        check_output_dir(self, "out")
        self.holdouts = parse_holdouts(self.holdout)
        if self.holdout_only and not self.holdouts:
            raise UsageError("--holdout-only leaves no holdout: give at least one --holdout NAME=PATH.")
        if self.model is not None:
            folder = check_folder("--model", self.model, "Duo model folder")
            inspect_duo_source(folder, "--model")
            if not has_tokenizer(folder):
                raise MissingFileError(f"--model: {self.model!r} holds no tokenizer; the study tokenizes its holdouts.")
