"""The paper's ablations of stage 1 training (Section 3.4, Fig. 8): Duo against dense, scratch against frozen-big.

One call, `run_ablation` (``python eval/ablation.py --preset cpu --output-dir DIR``; later ``duo-llm ablation``), trains
every model the figure needs with `duo_llm_hf.training.train.train`, evaluates them, and writes the table and the plots:

- (a), (b) Duo against dense. One Duo model is trained from scratch with random routing at p_big = 0.5 (the
  paper's stage 1) and evaluated under random routing at each p_big in {0, 0.25, 0.5, 0.75, 1} (p_big = 0: every
  token on the small FFNs, 1: every token on the big ones). Against it, one dense Llama per p_big whose FFN inner
  size gives the Duo model's forward FLOPs at that p_big (`training.dense_baseline_config`: inner size
  ``p_big * big + (1 - p_big) * small``, rounded to an integer), trained on the same tokens (same corpus, batch
  order and number of steps).
- (c) From scratch against frozen-big, at equal total tokens. Frozen-big first trains a dense model with the big
  FFN size, then freezes it, adds small FFNs and trains only those, with random routing at the Duo model's
  p_big. The paper trains the big model on 200B tokens and the small modules on 100B more, and calls the total,
  300B, equal to the from-scratch run's 300B. Tokens are counted the same way here: the dense pre-training gets
  ``frozen_pretrain_fraction`` (default 2/3) of the token budget and the small-module stage the rest, and the
  table's token column for frozen-big is their sum, the pre-training included. (Tokens are those fed to the
  model, not per module: in both methods a big FFN only sees the tokens routed to it once small FFNs exist.)
  The small-module stage draws its batches in a new seeded order (seed + 1) from the same corpus, as the
  trainer has no data offset; it may therefore repeat some pre-training text, where the paper's 100B tokens were
  new ones. The frozen-big model is evaluated at every p_big like the Duo model.

Every run uses one tokenizer (trained once on the training corpus), the same seed and the same micro-batch, so
a token budget is the same number of optimizer steps for each; ``train_tokens`` is rounded up to whole steps.

Metrics: held-out perplexity on an English and a code holdout (the paper holds out C4 and Python code; the
``cpu`` preset uses the built-in corpus' holdouts, and perplexity is the meaningful metric at that scale);
ARC-Easy accuracy and HellaSwag length-normalised accuracy, zero-shot, through lm-evaluation-harness (`duo`
model for Duo models under random routing at the p_big, `hf` for dense ones). The benchmark data is chosen by
``lm_eval_tasks``: ``hub`` (the harness's `arc_easy` / `hellaswag`, which read the Hub), ``local`` (the same task
definitions on a local copy in ``lm_eval_data``, see `integrations.lm_eval`; each benchmark whose file the folder
holds is scored, the others are named as not scored), ``fixtures`` (the few hand-written examples shipped for tests:
a smoke test of the code path, labelled so in every output, never benchmark scores) or ``none``. ``lm_eval_limit``
scores the first N items of each (``cpu`` preset: 2000). Each score comes with its standard error, and the outputs
give HellaSwag's chance level (0.25, `BENCHMARK_CHANCE`).

Outputs in ``out``: ``results.md``, ``results.json``, ``results.csv`` (one row per model and p_big), ``fig8.png``
(top row: the paper's three panels on the benchmarks; bottom row: the same comparisons on held-out perplexity),
``runs/<name>/`` (each trained model, a ``save_pretrained`` folder with its tokenizer), ``tokenizer/`` and
``evals/<run>/<setting>.json``. A re-run reuses every finished training run and evaluation and resumes an
interrupted run from its newest checkpoint; a finished run made with other arguments is an error (use a new
``out``). Under ``accelerate launch`` the training runs use every process (DDP/FSDP as the accelerate config
says), the holdout evaluation is sharded, the harness uses its data parallelism, and the main process writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...utils.processes import process_state
from ...utils.run_folder import run_lock
from .arguments import AblationArguments, parse_ablation_args
from .evaluation import evaluate_runs
from .plan import plan_ablation
from .results import build_rows, write_outputs
from .runs import prepare_tokenizer, train_runs


@dataclass
class AblationResult:
    """What `run_ablation` produced: the table rows and the files written."""

    out: str
    rows: list[dict[str, Any]]
    files: dict[str, str]
    trained: list[str]  # runs trained (or resumed) by this call
    reused: list[str]  # finished runs found and reused
    seconds: float


def run_ablation(args: AblationArguments) -> AblationResult:
    """Plan, train (or reuse), evaluate (or reuse) and write the table and plots; see the module docstring."""
    start = time.perf_counter()
    plan = plan_ablation(args)
    with run_lock(plan.out, "ablation"):  # one writer; each training run locks its own folder inside it
        return _run_ablation(args, plan, start)


def _run_ablation(args: AblationArguments, plan, start: float) -> AblationResult:
    threads = torch.get_num_threads()
    if plan.settings["threads"]:
        torch.set_num_threads(plan.settings["threads"])
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        tokenizer = prepare_tokenizer(plan)
        trained, reused = train_runs(plan, args.overwrite_output_dir)
        records = evaluate_runs(plan, tokenizer)
        rows, counts = build_rows(plan, records)
        seconds = time.perf_counter() - start
        files: dict[str, str] = {}
        state = process_state()
        if state.is_main_process:
            files = write_outputs(plan, rows, counts, seconds)
        state.wait_for_everyone()
    finally:
        torch.set_num_threads(threads)
    return AblationResult(str(plan.out), rows, files, trained, reused, seconds)


def main(argv: Sequence[str] | None = None) -> AblationResult:
    """Command line: ``python eval/ablation.py --preset cpu --output-dir runs/ablation`` (``--help`` for all flags)."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("duo_llm_hf").setLevel(logging.INFO)
    # The harness warns on every load of a local-data task (its custom_dataset hook); that is not news here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    result = run_ablation(parse_ablation_args(argv))
    state = process_state()
    if state.is_main_process:
        print(Path(result.files["results.md"]).read_text())
        print(f"Wrote {', '.join(result.files.values())} in {result.seconds:.0f} s "
              f"(trained {len(result.trained)} runs, reused {len(result.reused)}).")  # fmt: skip
    state.destroy_process_group()  # a multi-process launch ends here (no-op in one process)
    return result
