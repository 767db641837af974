"""Held-out perplexity against realised budget: conventional router, router distilled from the oracle, fixed, oracle.

`compare_routers` takes a stage 1 Duo model over small / big and, for each budget of ``k`` BIG layers out of ``L``:

- **oracle** and **fixed**: the oracle study (`oracle.run.run_oracle_study`) of the held-out blocks under exactly
  ``k`` BIG layers: each token's best pattern, and the best single pattern. Both are chosen *on the held-out tokens
  themselves* (they see the labels), as in the paper; their BIG fraction is exactly ``k / L``;
- **router**: the paper's router, trained by `training.routers.train_router` with the budget ``k / L``
  (``supervision="conventional"``), and the **distilled router** (``supervision="oracle"``: trained on the oracle's
  routes under ``big=k``, computed once on ``oracle_blocks`` training blocks); both are evaluated with hard routing
  on the same held-out blocks, at the BIG fraction they realise there.

The all-small and all-big patterns are the references at ``k = 0`` and ``k = L``. Results go to
``<output_dir>/router_vs_oracle.json`` and a markdown table ``router_vs_oracle.md``; the oracle studies and router
runs keep their own folders below, and a rerun reuses the finished ones (the oracle study resumes per batch).
``eval/router_vs_oracle.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.tokenization import load_tokenizer
from ..models.routes import BIG, CHOICE_NAMES, SMALL
from ..oracle.run import run_oracle_study, study_space
from ..oracle.spaces import parse_layer_budget
from ..training.arguments import current_names
from ..training.loaders import load_corpora, make_eval_loaders
from ..training.router_arguments import DEFAULT_BLOCK_SIZE, RouterTrainArguments, target_usage_flag
from ..training.routers import train_router
from ..utils.arguments import DataclassArgumentParser, check_float_fields, check_integer_fields, check_output_dir
from ..utils.errors import UsageError
from ..utils.loading import inspect_duo_source, load_duo_model
from ..utils.run_files import ROUTER_REPORT_FILE, TRAINING_ARGS_FILE
from ..utils.schema import ROUTER_REPORT_SCHEMA, TRAINING_ARGS_SCHEMA, read_state_file
from ..utils.tables import markdown_table

PROG = "eval/router_vs_oracle.py"
RESULT_FILE = "router_vs_oracle.json"
TABLE_FILE = "router_vs_oracle.md"
ROUTERS = {"conventional": "router (conventional)", "oracle": "router (distilled from the oracle)"}


@dataclass
class ComparisonArguments:
    """Arguments of `compare_routers` (each is also a flag of ``eval/router_vs_oracle.py``)."""

    model: str = field(metadata={"help": "Folder of a stage 1 Duo model over small / big (training/train_duo.py)."})
    output_dir: str = field(metadata={"help": "Folder for the table, the JSON results, oracle studies and routers."})
    budgets: list[int] | None = field(
        default=None, metadata={"help": "BIG layers per token to compare (default: 1 .. layers - 1)."}
    )
    router_steps: int = field(default=60, metadata={"help": "Optimizer steps of each router."})
    batch_size: int = field(default=8, metadata={"help": "Training blocks per router step."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Router learning rate (AdamW, constant)."})
    alpha: float = field(default=1.0, metadata={"help": "Usage loss weight of both routers."})
    block_size: int | None = field(
        default=None, metadata={"help": f"Tokens per block (default: {DEFAULT_BLOCK_SIZE} or the model's positions)."}
    )
    eval_blocks: int = field(default=32, metadata={"help": "Held-out blocks of each set (English, code)."})
    builtin_max_chars: int | None = field(
        default=500_000, metadata={"help": "Characters of each built-in split to read (the training text)."}
    )
    oracle_batch_size: int = field(default=8, metadata={"help": "Sequences per oracle batch (and checkpoint)."})
    oracle_blocks: int = field(
        default=256, metadata={"help": "Training blocks the distilled router's oracle targets are computed on."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the routers' weights and data order."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def validate(self) -> None:
        """Check every argument before any work is done (the budgets' upper bound needs the model's layers and is
        checked by `compare_routers`); raise `UsageError`."""
        check_output_dir(self)
        check_integer_fields(
            self,
            positive=("router_steps", "batch_size", "eval_blocks", "oracle_batch_size", "oracle_blocks"),
            optional=("block_size", "builtin_max_chars"),
            seeds=("seed",),
        )
        check_float_fields(self, positive=("learning_rate",), non_negative=("alpha",))
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"block_size: {self.block_size} must be at least 2 tokens.")
        if self.budgets is not None and (not self.budgets or any(k < 1 for k in self.budgets)):
            raise UsageError(f"budgets: {self.budgets} must be BIG layer counts >= 1 (0 and all are references).")
        inspect_duo_source(self.model)


def router_preset(args: ComparisonArguments) -> RouterTrainArguments:
    """The `train_router` arguments both routers of the comparison share (small / big, the comparison's sizes)."""
    shared = ("alpha", "builtin_max_chars", "block_size", "batch_size", "learning_rate", "eval_blocks", "seed")
    return RouterTrainArguments(
        model=args.model,
        output_dir=str(Path(args.output_dir) / "routers"),
        route_options="small,big",
        max_steps=args.router_steps,
        checkpoint_every=0,
        report_to="jsonl",
        progress=args.progress,
        **{name: getattr(args, name) for name in shared},
    )


def router_run_arguments(args: ComparisonArguments, num_layers: int, k: int, supervision: str) -> RouterTrainArguments:
    """The `train_router` arguments of one router of the comparison (``k`` BIG layers of ``num_layers``): the
    `router_preset` with its folder, target usage and supervision."""
    oracle = supervision == "oracle"
    layer_budget = parse_layer_budget(k)
    return dataclasses.replace(
        router_preset(args),
        output_dir=str(Path(args.output_dir) / "routers" / f"{supervision}-big{k}"),
        target_usage=target_usage_flag(layer_budget.fractions(num_layers)),
        supervision=supervision,
        oracle_budget=layer_budget.label if oracle else None,
        **({"oracle_blocks": args.oracle_blocks, "oracle_batch_size": args.oracle_batch_size} if oracle else {}),
        # Distillation fits P = softmax(logits) to the oracle's choices: no annealing needed.
        temperature_schedule="constant" if oracle else "exponential",
    )


def _finished_report(run: RouterTrainArguments) -> dict | None:
    """The report of a router run already finished with the same arguments, else None."""
    folder = Path(run.output_dir)
    if not (folder / ROUTER_REPORT_FILE).is_file() or not (folder / TRAINING_ARGS_FILE).is_file():
        return None
    saved = current_names(read_state_file(folder / TRAINING_ARGS_FILE, TRAINING_ARGS_SCHEMA))
    wanted = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("progress", "output_dir")}
    if any(saved.get(k) != v for k, v in wanted.items()):
        return None
    return read_state_file(folder / ROUTER_REPORT_FILE, ROUTER_REPORT_SCHEMA)


def compare_routers(args: ComparisonArguments) -> dict:
    """Run the comparison (see the module docstring); return the results that `comparison_table` prints."""
    args.validate()
    config = inspect_duo_source(args.model)
    num_layers = config.num_hidden_layers
    if sorted(config.route_options) != sorted(CHOICE_NAMES[c] for c in (SMALL, BIG)):
        raise UsageError(
            f"model {args.model!r} routes {config.route_options}; the comparison needs a model over small / big."
        )
    budgets = args.budgets or list(range(1, num_layers))
    bad = [k for k in budgets if not 0 < k < num_layers]
    if bad:
        raise UsageError(f"budgets {bad}: BIG layers must lie in 1 .. {num_layers - 1} (0 and all are references).")
    positions = config.max_position_embeddings
    args = dataclasses.replace(args, block_size=args.block_size or min(DEFAULT_BLOCK_SIZE, positions))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # The held-out blocks every method is measured on: those the router runs evaluate (same arguments).
    probe = router_run_arguments(args, num_layers, budgets[0], "conventional")
    probe.validate()
    tokenizer = load_tokenizer(args.model)
    _, holdouts = load_corpora(probe)
    loaders = make_eval_loaders(holdouts, tokenizer, probe)
    blocks = {name: torch.cat([batch["input_ids"] for batch in loader]) for name, loader in loaders.items()}

    model = load_duo_model(args.model).eval()
    space = study_space(model.config, budgets)
    sets: dict[str, dict] = {}
    for name, ids in blocks.items():
        result = run_oracle_study(
            model,
            ids,
            space,
            output_dir / "oracle" / name,
            batch_size=args.oracle_batch_size,
            model_id=str(args.model),
            data_id=f"builtin:holdout_{name}, first {len(ids)} blocks of {ids.shape[1]} tokens",
            progress=args.progress,
        )
        sets[name] = {
            "tokens": result.num_tokens,
            "small_all": result.perplexity("small_all"),
            "big_all": result.perplexity("big_all"),
            "oracle": {k: result.perplexity("oracle", k) for k in budgets},
            "fixed": {k: result.perplexity("fixed", k) for k in budgets},
            "fixed_pattern": {k: result.fixed_pattern(k) for k in budgets},
        }
    del model

    routers: dict[str, dict[int, dict]] = {supervision: {} for supervision in ROUTERS}
    for k in budgets:
        for supervision in ROUTERS:
            run = router_run_arguments(args, num_layers, k, supervision)
            report = _finished_report(run) or train_router(run).report
            routers[supervision][k] = {
                name: {"ppl": entry["ppl"], "realised_big": entry["realised"]["overall"]["big"]}
                for name, entry in report["holdouts"].items()
                if name in blocks
            }
    results = {
        "model": str(args.model),
        "num_layers": num_layers,
        "block_size": args.block_size,
        "budgets": budgets,
        "arguments": dataclasses.asdict(args),
        "sets": sets,
        "routers": routers,
    }
    (output_dir / RESULT_FILE).write_text(json.dumps(results, indent=2))
    (output_dir / TABLE_FILE).write_text(comparison_table(results) + "\n")
    return results


def comparison_table(results: dict) -> str:
    """A markdown table: per budget and method, the BIG fraction realised and the perplexity on each held-out set."""
    names = list(results["sets"])
    n = results["num_layers"]
    header = ["BIG layers", "method", *(f"BIG fraction ({s})" for s in names), *(f"ppl {s}" for s in names)]
    rows = []

    def row(k: str, method: str, fractions: list[float], ppls: list[float]) -> None:
        rows.append([k, method, *(f"{f:.3f}" for f in fractions), *(f"{p:.2f}" for p in ppls)])

    sets = results["sets"]
    row(f"0 of {n}", "all small", [0.0] * len(names), [sets[s]["small_all"] for s in names])
    for k in results["budgets"]:
        key = str(k) if str(k) in sets[names[0]]["oracle"] else k  # JSON turns int keys into strings
        exact = [parse_layer_budget(k).fractions(n)[BIG]] * len(names)
        row(f"{k} of {n}", "oracle", exact, [sets[s]["oracle"][key] for s in names])
        patterns = " / ".join(f"`{sets[s]['fixed_pattern'][key]}`" for s in names)
        row(f"{k} of {n}", f"fixed {patterns}", exact, [sets[s]["fixed"][key] for s in names])
        for supervision, label in ROUTERS.items():
            entry = results["routers"][supervision][key]
            row(f"{k} of {n}", label, [entry[s]["realised_big"] for s in names], [entry[s]["ppl"] for s in names])
    row(f"{n} of {n}", "all big", [1.0] * len(names), [sets[s]["big_all"] for s in names])
    return markdown_table(header, rows, align=["", ""] + ["right"] * (2 * len(names)))


def main(argv: list[str] | None = None) -> dict:
    """``eval/router_vs_oracle.py``: parse the flags, run the comparison, print the table."""
    parser = DataclassArgumentParser(ComparisonArguments, prog=PROG, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse(argv)
    results = compare_routers(args)
    print(comparison_table(results))
    print(f"Results: {Path(args.output_dir) / RESULT_FILE}, {Path(args.output_dir) / TABLE_FILE}")
    return results


__all__ = ["ComparisonArguments", "compare_routers", "comparison_table", "main", "router_run_arguments"]
