"""The paper's ablations of stage 1 training (Section 3.4, Fig. 8): Duo against dense, scratch against frozen-big.

``run.py`` holds the whole ablation (`run_ablation`, the command line `main`) and describes it; it reads top to
bottom through ``arguments.py`` (flags and presets), ``plan.py`` (the runs to train), ``runs.py`` (training them),
``evaluation.py`` (perplexity and benchmarks, with ``benchmarks.py`` for the benchmark data), ``results.py`` (the
table files) and ``figure.py`` (``fig8.png``).
"""

from .arguments import PRESETS, AblationArguments, build_arg_parser, parse_ablation_args
from .benchmarks import BenchmarkSpec
from .plan import P_BIGS, AblationPlan, PlannedRun, plan_ablation
from .results import model_flops, planned_config
from .run import AblationResult, main, run_ablation
from .runs import run_is_finished

__all__ = [
    "AblationArguments",
    "AblationPlan",
    "AblationResult",
    "BenchmarkSpec",
    "PRESETS",
    "P_BIGS",
    "PlannedRun",
    "build_arg_parser",
    "main",
    "model_flops",
    "parse_ablation_args",
    "plan_ablation",
    "planned_config",
    "run_ablation",
    "run_is_finished",
]
