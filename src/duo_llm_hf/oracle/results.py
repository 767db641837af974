"""Results of an oracle study: assembled from per-batch reductions, saved as safetensors + JSON, loaded back.

``OracleResult`` answers the questions of the paper's Section 3.2 from the reductions alone: perplexity per method
(oracle, fixed, best-of-K per token and as one pattern, causal oracle, all-small, all-big) and budget, the oracle's
per-layer x per-position usage of each choice (Fig. 2), and per-token difficulty (Figs. 5, 6).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.routes import BIG, CHOICE_LETTERS, CHOICE_NAMES, route_usage
from ..utils.errors import UsageError
from ..utils.files import atomic_save_tensors, atomic_write_json
from ..utils.run_files import ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE, file_hash
from ..utils.schema import ORACLE_SUMMARY_SCHEMA, read_state_file
from .reducers import NO_PATTERN, BatchReduction
from .spaces import PatternSet, RouteSpace, index_to_pattern

METHODS = ("oracle", "fixed", "best_of_k", "best_of_k_pattern", "causal_oracle")
RESULTS_HASH_KEY = "results_sha256"  # in the summary: the sha256 of the tensors file, checked by `OracleResult.load`


_AGAIN = (
    "compute it again (rerun the oracle into that folder with --overwrite-output-dir; for a study's stage, delete "
    "that folder and rerun the study)."
)


class DamagedResultError(UsageError):
    """An oracle result whose tensors file is not the one its summary records (changed, or never hashed)."""


class OracleResult:
    """The reductions of an oracle study over ``N`` sequences of ``T`` tokens, for every budget of ``space``.

    Tensors (``tensors[name]``): ``input_ids`` / ``token_mask`` ``[N, T]``; ``oracle_loss`` / ``oracle_index``
    ``[budgets, N, T]`` (and ``best_of_k_*``, ``causal_*`` when computed); ``pattern_loss_sum`` ``[P]`` and
    ``schedule_loss_sum`` ``[S, P]`` (float64) over the space's patterns (``space.indices``); ``best_of_k_samples``
    ``[budgets, P]``; ``uniform_loss`` ``[U, N, T]`` for ``meta["uniform"]`` (``small`` / ``big`` everywhere).
    """

    def __init__(self, space: RouteSpace, tensors: Mapping[str, torch.Tensor], meta: Mapping):
        self.space = space
        self.tensors = dict(tensors)
        self.meta = dict(meta)

    @classmethod
    def from_batches(
        cls,
        space: RouteSpace,
        batches: Sequence[BatchReduction],
        input_ids: torch.Tensor,
        meta: Mapping,
    ) -> OracleResult:
        """Join the reductions of consecutive batches of sequences (in order: sums add in a fixed order)."""
        if not batches:
            raise ValueError("OracleResult.from_batches: no batch reductions to join.")
        parts = [b.tensors() for b in batches]
        tensors = {"input_ids": input_ids.cpu(), "token_mask": torch.cat([p["token_mask"] for p in parts])}
        for name in parts[0]:
            if name == "token_mask":
                continue
            if name.endswith("_sum"):
                total = parts[0][name].clone()
                for p in parts[1:]:
                    total += p[name]
                tensors[name] = total
            else:
                tensors[name] = torch.cat([p[name] for p in parts], dim=1)
        if meta.get("best_of_k", 0) > 0:
            tensors["best_of_k_samples"] = space.sample(meta["best_of_k"], meta.get("seed", 0))
        return cls(space, tensors, meta)

    # -- reading ------------------------------------------------------------------------------------------------

    @property
    def budgets(self) -> list[str]:
        return self.space.labels

    @property
    def num_tokens(self) -> int:
        """Tokens with a target (those every loss is averaged over)."""
        return int(self.tensors["token_mask"].sum())

    def _g(self, budget) -> int:
        return self.space.budget_index(budget)

    def _mean(self, losses: torch.Tensor) -> float:
        mask = self.tensors["token_mask"]
        return float((losses.double() * mask).sum() / mask.sum())

    def mean_loss(self, method: str = "oracle", budget="all") -> float:
        """Mean token loss of a method under a budget.

        Methods: ``oracle``, ``fixed`` (best single pattern by mean loss), ``best_of_k`` (per-token minimum over
        the K sampled patterns), ``best_of_k_pattern`` (the best of the K as one pattern), ``causal_oracle``,
        ``small_all`` / ``big_all`` (every layer small / big; no budget).
        """
        if method in ("small_all", "big_all"):
            return self._mean(self.uniform_loss(method.removesuffix("_all")))
        g = self._g(budget)
        if method == "oracle":
            return self._mean(self.tensors["oracle_loss"][g])
        if method == "best_of_k":
            return self._mean(self._need("best_of_k_loss", "--best-of-k")[g])
        if method == "causal_oracle":
            return self._mean(self._need("causal_loss", "--causal")[g])
        if method == "fixed":
            return sum(loss for _, loss in self._best_patterns(g, None)) / self.num_tokens
        if method == "best_of_k_pattern":
            samples = self._need("best_of_k_samples", "--best-of-k")[g]
            return sum(loss for _, loss in self._best_patterns(g, samples)) / self.num_tokens
        raise ValueError(f"method {method!r} is not one of {list(METHODS) + ['small_all', 'big_all']}.")

    def perplexity(self, method: str = "oracle", budget="all") -> float:
        """``exp`` of `mean_loss`."""
        return math.exp(self.mean_loss(method, budget))

    def _need(self, name: str, flag: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"this oracle result has no {name}; run the study with {flag}.")
        return self.tensors[name]

    def _best_patterns(self, g: int, restrict: torch.Tensor | None) -> list[tuple[int, float]]:
        """(pattern index, summed loss) of the best single pattern of budget ``g`` (one per BIG count for a
        position schedule, over the positions where that count applies); ``restrict`` limits the candidates."""
        space, budget = self.space, self.space.budgets[g]
        candidates = space.members[g] if restrict is None else space.members[g] & restrict.bool()
        if budget.big_schedule is None:
            classes, sums = [candidates], self.tensors["pattern_loss_sum"]
        else:
            used = sorted(set(budget.big_at(self.tensors["token_mask"].shape[1]).tolist()))
            classes = [candidates & (space.counts[:, BIG] == k) for k in used]
            scheduled = [i for i, b in enumerate(space.budgets) if b.big_schedule is not None]
            sums = self.tensors["schedule_loss_sum"][scheduled.index(g)]
        best = []
        for members in classes:
            ranks = members.nonzero().squeeze(1)
            i = int(torch.argmin(sums[ranks]))  # first minimum: the lowest index
            best.append((int(space.indices[ranks[i]]), float(sums[ranks[i]])))
        return best

    def fixed_pattern(self, budget="all", method: str = "fixed") -> str:
        """Letters of the best single pattern (``fixed``) or of the best of the K samples (``best_of_k_pattern``);
        for a position schedule, one per BIG count in ascending order: ``"Bsss|BBss"``."""
        g = self._g(budget)
        restrict = None if method == "fixed" else self._need("best_of_k_samples", "--best-of-k")[g]
        return "|".join(self.space.pattern_str(i) for i, _ in self._best_patterns(g, restrict))

    def routes(self, budget="all", method: str = "oracle") -> torch.Tensor:
        """The per-token patterns ``[N, T, layers]`` of ``oracle``, ``best_of_k`` or ``causal_oracle``."""
        name = {"oracle": "oracle_index", "best_of_k": "best_of_k_index", "causal_oracle": "causal_index"}[method]
        index = self._need(name, "--best-of-k" if method == "best_of_k" else "--causal")[self._g(budget)]
        if (index == NO_PATTERN).any():
            raise ValueError(f"{method} has tokens without a pattern under {budget!r}; the result is incomplete.")
        return index_to_pattern(index, self.space.choices, self.space.num_layers)

    def usage(self, budget="all", method: str = "oracle") -> torch.LongTensor:
        """Per-layer x per-position counts of each choice in the per-token patterns, over the tokens with a
        target: ``[3, layers, T]`` indexed by code (`routes.route_usage`; the data of the paper's Fig. 2).
        `analysis.usage_fraction` turns them into fractions."""
        return route_usage(self.routes(budget, method), self.tensors["token_mask"])

    def uniform_loss(self, choice: str) -> torch.Tensor:
        """Per-token loss ``[N, T]`` with every layer on ``choice`` (``small`` or ``big``)."""
        names = self.meta.get("uniform", [])
        if choice not in names:
            raise KeyError(f"this oracle result has no all-{choice} losses (it has {names}).")
        return self.tensors["uniform_loss"][names.index(choice)]

    def token_difficulty(self, budget="all") -> dict[str, torch.Tensor]:
        """Per token (``[N, T]``): ``loss_small_all``, ``loss_big_all``, ``loss_oracle`` (under ``budget``) and
        ``gap`` = ``loss_small_all - loss_oracle``, the benefit of more compute (Section 3.2.2); 0 without target."""
        out = {"loss_oracle": self.tensors["oracle_loss"][self._g(budget)]}
        for choice in self.meta.get("uniform", []):
            out[f"loss_{choice}_all"] = self.uniform_loss(choice)
        if "loss_small_all" in out:
            out["gap"] = out["loss_small_all"] - out["loss_oracle"]
        return out

    def summary(self) -> dict:
        """JSON-ready summary: perplexity per method and budget, route-space sizes, tokens, identifiers."""
        space = self.space
        budgets = {}
        for label, size, full in zip(space.labels, space.budget_sizes(), space.budget_full_sizes()):
            # patterns: those searched (and evaluated); budget_size: all the budget holds (the same when exact)
            entry = {"patterns": size, "budget_size": full, "perplexity": {}}
            for method in METHODS:
                try:
                    entry["perplexity"][method] = self.perplexity(method, label)
                except KeyError:
                    continue
            entry["fixed_pattern"] = self.fixed_pattern(label)
            if "best_of_k_samples" in self.tensors:
                entry["best_of_k_pattern"] = self.fixed_pattern(label, "best_of_k_pattern")
            budgets[label] = entry
        n, t = self.tensors["token_mask"].shape
        return {
            **{k: v for k, v in self.meta.items()},
            "sequences": n,
            "seq_len": t,
            "tokens_evaluated": self.num_tokens,
            "space": space.describe(),
            "uniform_perplexity": {f"{c}_all": self.perplexity(f"{c}_all") for c in self.meta.get("uniform", [])},
            "budgets": budgets,
        }

    def table(self) -> str:
        """Perplexity per budget and method, as a text table."""
        summary = self.summary()
        methods = [m for m in METHODS if any(m in b["perplexity"] for b in summary["budgets"].values())]
        width = max(12, *(len(label) for label in summary["budgets"]))
        lines = [f"{'budget':<{width}} {'patterns':>9} " + " ".join(f"{m:>17}" for m in methods)]
        for label, entry in summary["budgets"].items():
            cells = " ".join(f"{entry['perplexity'].get(m, float('nan')):>17.3f}" for m in methods)
            lines.append(f"{label:<{width}} {entry['patterns']:>9} {cells}")
        for name, ppl in summary["uniform_perplexity"].items():
            lines.append(f"{name:<{width}} {1:>9} {ppl:>17.3f}")
        return "\n".join(lines)

    # -- files --------------------------------------------------------------------------------------------------

    def save(self, output_dir: str | os.PathLike) -> None:
        """Write ``oracle_results.safetensors`` (tensors) and, after it, ``oracle_summary.json`` (summary, the
        tensors file's sha256, and what `load` needs)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        atomic_save_tensors(tensors, output_dir / ORACLE_RESULTS_FILE)
        summary = self.summary()
        summary["_space"] = space_spec(self.space)
        summary[RESULTS_HASH_KEY] = file_hash(output_dir / ORACLE_RESULTS_FILE)
        atomic_write_json(output_dir / ORACLE_SUMMARY_FILE, summary)

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> OracleResult:
        """Read back a result written by `save`, after checking the tensors file against the sha256 its summary
        records (`DamagedResultError` when it differs or is not recorded)."""
        output_dir = Path(output_dir)
        for name in (ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE):
            if not (output_dir / name).exists():
                raise FileNotFoundError(f"{output_dir / name} is missing; is {output_dir} an oracle study's output?")
        summary = read_state_file(output_dir / ORACLE_SUMMARY_FILE, ORACLE_SUMMARY_SCHEMA)
        check_results_hash(output_dir, summary)
        derived = {"sequences", "seq_len", "tokens_evaluated", "space", "uniform_perplexity", "budgets", "_space"}
        meta = {k: v for k, v in summary.items() if k not in derived | {RESULTS_HASH_KEY}}
        return cls(space_from_spec(summary["_space"]), load_file(output_dir / ORACLE_RESULTS_FILE), meta)


def check_results_hash(output_dir: Path, summary: Mapping) -> None:
    """Raise `DamagedResultError` unless ``output_dir``'s tensors file has the sha256 its ``summary`` records."""
    path = output_dir / ORACLE_RESULTS_FILE
    recorded = summary.get(RESULTS_HASH_KEY) if isinstance(summary, Mapping) else None
    if recorded is None:
        raise DamagedResultError(
            f"{output_dir / ORACLE_SUMMARY_FILE} records no sha256 of {path.name} (written by an older version?), so "
            f"the result cannot be checked; {_AGAIN}"
        )
    if file_hash(path) != recorded:
        raise DamagedResultError(
            f"{path} is not the file this oracle run wrote (its sha256 differs from the one in {ORACLE_SUMMARY_FILE}); "
            f"{_AGAIN}"
        )


def space_spec(space: RouteSpace) -> dict:
    """What rebuilds a route space: layers, choices, budget labels, extra classes; for a `PatternSet` also its
    patterns (letters) and, per budget, the best-of-K patterns drawn with their K and seed."""
    spec = {
        "num_layers": space.num_layers,
        "choices": [CHOICE_NAMES[c] for c in space.choices],
        "budgets": space.labels,
        "extra_classes": [list(v) for v in space.extra_classes],
    }
    if isinstance(space, PatternSet):
        spec["patterns"] = space.pattern_strings()
        spec["samples"] = {label: space.pattern_strings(mask) for label, mask in zip(space.labels, space.sampled)}
        spec["sample_k"], spec["sample_seed"] = space.sample_k, space.sample_seed
    return spec


def space_from_spec(spec: Mapping) -> RouteSpace:
    if "patterns" not in spec:
        return RouteSpace(spec["num_layers"], spec["choices"], spec["budgets"], extra_classes=spec["extra_classes"])
    samples = [[pattern_codes(p) for p in spec["samples"][label]] for label in spec["budgets"]]
    return PatternSet(
        spec["num_layers"],
        spec["choices"],
        spec["budgets"],
        [pattern_codes(p) for p in spec["patterns"]],
        samples=[torch.tensor(s, dtype=torch.long).reshape(-1, spec["num_layers"]) for s in samples],
        sample_k=spec["sample_k"],
        sample_seed=spec["sample_seed"],
        extra_classes=spec["extra_classes"],
    )


def pattern_codes(letters: str) -> list[int]:
    """Choice codes of a pattern written in letters (``BB-B``)."""
    return [CHOICE_LETTERS.index(letter) for letter in letters]
