"""The benchmark data of the ablation (ARC-Easy, HellaSwag through lm-evaluation-harness): where it comes
from (``--lm-eval-tasks``, ``--lm-eval-data``) and how its columns are labelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...utils.errors import MissingDependencyError, MissingFileError, UsageError

BENCHMARK_SOURCES = ("hub", "local", "fixtures", "none")


# The paper's metrics: ARC-Easy accuracy, HellaSwag length-normalised accuracy.
BENCHMARK_METRICS = {"arc_easy": "acc", "hellaswag": "acc_norm"}


BENCHMARK_NAMES = {"arc_easy": "ARC-Easy", "hellaswag": "HellaSwag"}


# Chance level of a metric (HellaSwag: one of 4 endings). ARC-Easy's depends on each question's 3 to 5 choices.
BENCHMARK_CHANCE = {"hellaswag": 0.25}


# The splits the official tasks score, as a local copy holds them (see `find_local_file` for the lookup).
BENCHMARK_FILES = {"arc_easy": "arc_easy/test.jsonl", "hellaswag": "hellaswag/hellaswag_val.jsonl"}


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where the benchmark data comes from, which benchmarks it scores, and how its columns are labelled."""

    source: str
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 8
    benchmarks: tuple[str, ...] = tuple(BENCHMARK_METRICS)  # those scored (a local copy may hold only some)

    @property
    def enabled(self) -> bool:
        return self.source != "none"

    def task_names(self) -> dict[str, str]:
        """Benchmark -> the lm-eval task that scores it."""
        if self.source == "hub":
            return {name: name for name in self.benchmarks}
        from ...integrations.lm_eval import LOCAL_TASKS

        return {name: LOCAL_TASKS[name] for name in self.benchmarks}

    def resolved_data_dir(self) -> str | None:
        if self.source == "fixtures":
            from ...integrations.lm_eval import FIXTURE_DATA_DIR

            return str(FIXTURE_DATA_DIR)
        return self.data_dir

    def _limited(self, counts: Mapping[str, int]) -> bool:
        # Only worth saying where the limit cut a benchmark short.
        return bool(self.limit) and any(counts.get(b, 0) >= self.limit for b in self.benchmarks)

    def note(self, counts: Mapping[str, int]) -> str:
        """What the benchmark columns were computed on; says plainly when they are not benchmark scores."""
        sizes = ", ".join(f"{BENCHMARK_NAMES[b]} n={counts[b]}" for b in self.benchmarks if b in counts)
        limit = f", first {self.limit} examples" if self._limited(counts) else ""
        chance = "".join(
            f"; chance level of {BENCHMARK_NAMES[b]} {BENCHMARK_METRICS[b]}: {BENCHMARK_CHANCE[b]:g}"
            for b in self.benchmarks
            if b in BENCHMARK_CHANCE
        )
        skipped = "".join(
            f"; {BENCHMARK_NAMES[b]} not scored ({self.data_dir} holds no {BENCHMARK_FILES[b]})"
            for b in BENCHMARK_METRICS
            if b not in self.benchmarks
        )
        if self.source == "fixtures":
            return (
                f"fixture smoke set ({sizes}): the hand-written test examples shipped with the lm-eval integration, a "
                "check of the code path; NOT benchmark scores and not comparable to the paper"
            )
        if self.source == "local":
            where = f"official task definitions on the local copy in {self.data_dir}"
            return f"{where} ({sizes}{limit}), zero-shot{chance}{skipped}"
        return f"official lm-eval tasks, Hub data ({sizes}{limit}), zero-shot{chance}"

    def short_label(self, counts: Mapping[str, int]) -> str:
        """Suffix of the benchmark column names."""
        if self.source == "fixtures":
            return "[fixture smoke set, n=" + "/".join(str(counts[b]) for b in self.benchmarks if b in counts) + "]"
        if self._limited(counts):
            return f"[first {self.limit}]"
        return "[local data]" if self.source == "local" else ""


def benchmark_spec(settings: dict[str, Any]) -> BenchmarkSpec:
    source, data_dir = settings["lm_eval_tasks"], settings["lm_eval_data"]
    scored: dict[str, Any] = {}
    if source not in BENCHMARK_SOURCES:
        raise UsageError(f"lm_eval_tasks: {source!r} is not a benchmark source; use one of {list(BENCHMARK_SOURCES)}.")
    if data_dir is not None and source != "local":
        raise UsageError(
            f"lm_eval_data is only read with --lm-eval-tasks local (got --lm-eval-tasks {source}); drop one of them."
        )
    if source == "local":
        if data_dir is None:
            raise UsageError("--lm-eval-tasks local needs --lm-eval-data DIR, the folder of the local benchmark copy.")
        from ...integrations.tasks.local_data import find_local_file

        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise MissingFileError(f"lm_eval_data: {data_dir!r} is not a folder (of local benchmark files).")
        benchmarks = tuple(b for b, name in BENCHMARK_FILES.items() if find_local_file(folder, name))
        if not benchmarks:
            raise MissingFileError(
                f"lm_eval_data: {data_dir!r} holds none of {list(BENCHMARK_FILES.values())} (each may also lie "
                "directly in the folder); see docs/evaluation.md ('Benchmarks with lm-evaluation-harness') for their "
                "format."
            )
        data_dir = str(folder.resolve())
        scored["benchmarks"] = benchmarks
    if source != "none":
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise MissingDependencyError(
                "The benchmarks need lm-evaluation-harness: pip install -e .[eval], or pass --lm-eval-tasks none."
            )
    return BenchmarkSpec(source, data_dir, settings["lm_eval_limit"], settings["lm_eval_batch_size"], **scored)
