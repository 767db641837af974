"""The import hook that registers `duo` with lm-eval (`_duo_llm_hf_lm_eval`, run at start-up by the installed .pth).

Each check runs in a fresh interpreter, because what is tested is what a new process sees.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lm_eval")


def run_python(code: str, *flags: str) -> list[str]:
    """Run `code` in a fresh interpreter of this environment; its printed lines."""
    done = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_start_up_installs_the_hook_and_imports_nothing_heavy():
    loaded = run_python("""
        import sys
        heavy = [name for name in ("torch", "lm_eval", "duo_llm_hf") if name in sys.modules]
        print("_duo_llm_hf_lm_eval" in sys.modules, *heavy)
    """)
    assert loaded == ["True"], "duo_llm_hf_lm_eval.pth is not installed here: reinstall with `pip install -e .`"


def test_harness_registry_gets_duo_lazily_next_to_its_own_models():
    """Importing the harness's models registers `duo` as a placeholder (no import of duo_llm_hf); `get_model`
    then builds our class, and `hf` is still found: the registry was not made non-empty too early."""
    lines = run_python("""
        import sys
        from lm_eval.api.registry import get_model, model_registry
        print(len(model_registry))
        import lm_eval.models
        print(model_registry._objs["duo"], "duo_llm_hf" in sys.modules)
        print(get_model("duo").__module__, get_model("hf").__name__)
    """)
    assert lines == ["0", "duo_llm_hf.integrations.lm_eval:DuoLM", "False", "duo_llm_hf.integrations.lm_eval", "HFLM"]


@pytest.mark.parametrize("order", ["package first", "harness first"])
def test_import_of_the_package_registers_duo_without_the_pth(order):
    """With site-packages' .pth files skipped (`python -S`), importing duo_llm_hf installs the same hook, whether
    the harness's models are imported before or after it."""
    first, second = ("import duo_llm_hf", "import lm_eval.models")
    if order == "harness first":
        first, second = second, first
    lines = run_python(f"""
        import sys
        assert "_duo_llm_hf_lm_eval" not in sys.modules
        sys.path[:] = {sys.path!r}  # this process's folders (site-packages, the editable source), no .pth run
        {first}
        {second}
        from lm_eval.api.registry import get_model
        print(get_model("duo").__name__, get_model("hf").__name__)
    """, "-S")
    assert lines == ["DuoLM", "HFLM"]
