"""Makes `lm_eval --model duo` work in any process, without importing torch, lm-eval or duo_llm_hf at startup.

lm-eval 0.4 has no plugin entry points for models: a model name is known to it only once something registers it
in the running process, and the harness's own `lm_eval` command imports nothing of ours. Installing duo-llm-hf
therefore puts `duo_llm_hf_lm_eval.pth` in site-packages; Python runs its one line (`import
_duo_llm_hf_lm_eval`) at interpreter start, and this module adds an import hook that waits for the harness's
model package, `lm_eval.models`. Right after that package has run (it fills the harness's model registry with
lazy placeholders for its own models) the hook registers `duo` the same way, pointing at
`duo_llm_hf.integrations.lm_eval:DuoLM`, which is imported only when the harness builds a `duo` model.

Hooking `lm_eval.models` rather than the registry module matters: the harness imports its models only when the
registry is empty at lookup, so a `duo` entry made any earlier would hide `hf` and the others.
"""

# No importlib.abc base classes: importing it costs ~10 ms, paid by every Python process in the environment.
from __future__ import annotations

import sys

MODEL_NAME = "duo"
MODEL_TARGET = "duo_llm_hf.integrations.lm_eval:DuoLM"
_HOOKED_MODULE = "lm_eval.models"


def register(model_registry) -> None:
    """Register `duo` in lm-eval's model registry as a lazy placeholder (no-op when it is already there)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterAfterExec:
    """Runs the harness's own loader for `lm_eval.models`, then registers `duo`; everything else is delegated."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        from lm_eval.api.registry import model_registry

        register(model_registry)

    def __getattr__(self, name: str):
        # get_source / get_resource_reader / is_package ... keep inspect, linecache and importlib.resources working
        return getattr(self._loader, name)


class LmEvalModelFinder:
    """Meta path finder that answers only for `lm_eval.models`, wrapping the loader the other finders give it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Add the finder once; if the harness's models are already imported, register `duo` right away."""
    if any(isinstance(finder, LmEvalModelFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, LmEvalModelFinder())
    if _HOOKED_MODULE in sys.modules:
        from lm_eval.api.registry import model_registry

        register(model_registry)


install()
