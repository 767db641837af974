"""The paper's ablations of stage 1 training (Section 3.4, Fig. 8): Duo against dense, scratch against frozen-big.

``run.py`` holds the whole ablation (`run_ablation`, the command line `main`) and describes it; it reads top to
bottom through ``arguments.py`` (flags and presets), ``plan.py`` (the runs to train), ``runs.py`` (training them),
``evaluation.py`` (perplexity and benchmarks, with ``benchmarks.py`` for the benchmark data), ``results.py`` (the
table files) and ``figure.py`` (``fig8.png``).
"""

import importlib

# Each public name and the module that defines it, imported on first use, so that ``duo-llm ablation --help``
# (which reads `arguments` only) imports neither torch nor the training code.
_NAMES = {
    "arguments": ["PRESETS", "AblationArguments", "build_arg_parser", "parse_ablation_args"],
    "benchmarks": ["BenchmarkSpec"],
    "plan": ["P_BIGS", "AblationPlan", "PlannedRun", "plan_ablation"],
    "results": ["model_flops", "planned_config"],
    "run": ["AblationResult", "main", "run_ablation"],
    "runs": ["run_is_finished"],
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


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
