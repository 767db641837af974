"""The arguments of ``duo-llm oracle`` (`OracleArguments`) and the checks of its data files.

Only light modules here: ``--help`` builds its parser from `OracleArguments` without torch or transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..utils.arguments import (
    RawDescriptionDefaultsFormatter,
    check_choices,
    check_folder,
    check_integer_fields,
    check_output_dir,
    check_text_file,
)
from ..utils.errors import MissingFileError, UsageError
from ..utils.run_files import ORACLE_SUMMARY_FILE

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")
# How the oracle searches a budget (`oracle.search.SearchSettings`): every pattern, or a beam / greedy walk.
SEARCH_METHODS = ("exact", "beam", "greedy")


def check_data_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The ``--data`` files as a list, checked before any work: each is an existing file (not a folder); one
    tensor file, or text files that start as UTF-8 text."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise UsageError("data: no data file given.")
    for path in paths:
        state = "is a folder" if Path(path).is_dir() else "does not exist"
        if not Path(path).is_file():
            raise MissingFileError(f"data: {str(path)!r} {state}; give text files, or one .safetensors/.pt file.")
    tensors = [p for p in paths if Path(p).suffix in TENSOR_SUFFIXES]
    if tensors and len(paths) > 1:
        raise UsageError(f"data: give one pre-tokenized tensor file ({tensors[0]}) alone, not {len(paths)} files.")
    for path in paths if not tensors else ():
        check_text_file("data", path)
    return [str(p) for p in paths]


STUDY_USAGE = """Stage 2 of Duo-LLM: the oracle study of a trained Duo model.

Evaluates every route pattern of the model (or those under budgets) on held-out token blocks, with the prefix-tree
engine of `duo_llm_hf.oracle.engine`, and reports per budget: the oracle, the best fixed pattern, best-of-K random
patterns (per token and as one pattern), optionally the causally consistent oracle, plus the all-small / all-big
losses (token difficulty) and the oracle's per-layer x per-position usage (saved tensors).

    python eval/oracle_study.py --model runs/duo --data holdout.txt --block-size 128 --num-blocks 32 \\
        --budget all --budget classes --budget 6:2 --best-of-k 100 --output-dir runs/oracle
    accelerate launch --num_processes 8 eval/oracle_study.py ...   # the pattern space split over 8 processes
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 eval/oracle_study.py ...   # 2 CPU processes

Interrupted, the same command resumes where it stopped (finished batch files are checked first; a damaged one is
named and computed again). A resumed run must have the same results-changing settings (weights, data, dtype,
route space, budgets, block size, number of blocks, best-of-K, seed, causal, batch size); --chunk-tokens and the
number of processes may change. A folder holding a finished run is refused unless --overwrite-output-dir.
--route-options may add skip to a model trained on small/big (skip needs no weights): --route-options big,skip
is the paper's BIG-or-SKIP setting. Budgets too large to enumerate (at 30 layers, more than 3 layers moved off
BIG) take --search beam (or greedy): an approximate search, level by level below all-BIG; --gap-from <exact run>
reports its gap to an exact run on the same data (docs/oracle-search.md).
Results: <output-dir>/oracle_results.safetensors and oracle_summary.json; load them with
`duo_llm_hf.oracle.results.OracleResult.load(output_dir)`."""


@dataclass(kw_only=True)
class OracleArguments:
    """Arguments of ``duo-llm oracle`` and ``eval/oracle_study.py`` (each field is also a flag,
    ``--name-with-dashes``)."""

    # The command's name, description and --help layout (`build_parser`); unannotated, so not fields.
    prog = "duo-llm oracle"
    description = STUDY_USAGE
    formatter_class = RawDescriptionDefaultsFormatter
    flag_labels = True  # messages name the flags (--num-blocks), as the oracle's always did

    model: str = field(metadata={"help": "folder (or Hub name) of a Duo causal LM"})
    data: list[str] = field(metadata={"help": "text files, or one .safetensors/.pt file of token blocks"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer for text data (default: the model's)"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per block when tokenizing text"})
    num_blocks: int | None = field(default=None, metadata={"help": "evaluate the first N blocks"})
    budget: list[str] | None = field(
        default=None,
        metadata={
            "action": "extend",  # repeatable: --budget all --budget 6:2
            "help": "budget (repeatable): all, a BIG count (4), counts per choice (big=6,skip=6), a BIG schedule over "
            "positions (6:2), or 'classes' for every count class. Default: all and classes.",
        },
    )
    route_options: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated route options to search, from the model's route_options plus skip (which "
            "needs no weights), e.g. big,skip"
        },
    )
    best_of_k: int = field(default=100, metadata={"help": "random patterns per budget for best-of-K (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the best-of-K draw"})
    causal: bool = field(
        default=False, metadata={"help": "also run the causally consistent oracle (one tree per token)"}
    )
    batch_size: int = field(default=8, metadata={"help": "sequences per batch (and per checkpoint)"})
    chunk_tokens: int | None = field(
        default=None,
        metadata={
            "help": "tokens per forward batch, bounds memory (default 4096 on CPU; on GPU, what half the free "
            "memory holds)"
        },
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the model's weights"}
    )
    output_dir: str = field(metadata={"help": "folder of the oracle run (results, batch checkpoints, state)"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "replace the oracle run in --output-dir (finished or not) instead of refusing or resuming it"
        },
    )
    stop_after_batches: int | None = field(
        default=None, metadata={"help": "stop after N batches (rerun the command to continue)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress hides it)"})
    search: Literal["exact", "beam", "greedy"] = field(
        default="exact",
        metadata={
            "help": "exact: every pattern of each budget; beam / greedy: an approximate search over the levels below "
            "all-BIG, for budgets that fix the BIG count (big=22: 8 layers moved off BIG); see docs/oracle-search.md"
        },
    )
    beam_width: int = field(
        default=8,
        metadata={"help": "--search beam: patterns kept per level by mean loss, and as many by tokens won"},
    )
    gap_from: str | None = field(
        default=None,
        metadata={"help": "folder of an exact oracle run on the same data: report the approximate search's gap to it"},
    )

    def validate(self) -> None:
        """Check every flag that needs no model, before any work is done; raise `UsageError`.

        The checks that need the model's config (block size against its positions, token ids against its
        vocabulary, budgets against its layers) follow in `main` once the config is read.
        """
        check_output_dir(self)
        check_integer_fields(
            self,
            positive=("batch_size", "beam_width"),
            optional=("num_blocks", "chunk_tokens", "stop_after_batches"),
            non_negative=("best_of_k",),
            seeds=("seed",),
        )
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"--block-size: {self.block_size} must be at least 2 tokens (one input and one target).")
        for budget in self.budget or ():
            if not budget.strip():
                raise UsageError(
                    "--budget: '' is empty; give all, classes, a BIG count (4), counts per choice (big=6,skip=6) or "
                    "a BIG schedule over positions (6:2)."
                )
        if self.route_options is not None:
            from ..models.routes import CHOICE_NAMES

            check_choices(self, "route_options", CHOICE_NAMES)
        paths = check_data_files(self.data)
        if Path(paths[0]).suffix not in TENSOR_SUFFIXES and self.block_size is None:
            raise UsageError("--block-size: text data is cut into blocks; give the tokens per block, e.g. 128.")
        if self.tokenizer is not None:
            check_folder("--tokenizer", self.tokenizer, "tokenizer folder")
        if self.gap_from is not None:
            if self.search == "exact":
                raise UsageError("--gap-from compares an approximate search with an exact run; add --search beam.")
            folder = check_folder("--gap-from", self.gap_from, "exact oracle run folder")
            if not (folder / ORACLE_SUMMARY_FILE).is_file():
                raise MissingFileError(f"--gap-from: {self.gap_from!r} holds no oracle run ({ORACLE_SUMMARY_FILE}).")


__all__ = ["OracleArguments", "SEARCH_METHODS", "STUDY_USAGE", "TENSOR_SUFFIXES", "check_data_files"]
