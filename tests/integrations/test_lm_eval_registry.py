"""Where the `duo` lm-eval model is registered: by importing `duo_llm_hf.integrations.lm_eval` (Python,
`duo-llm eval`), with no start-up hook; the plain `lm_eval` command uses `--model hf` (see test_lm_eval.py).

Each check runs in a fresh interpreter, because what is tested is what a new process sees.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lm_eval")


def run_python(code: str) -> list[str]:
    """Run `code` in a fresh interpreter of this environment; its printed words."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.slow
def test_start_up_and_package_import_leave_lm_eval_alone():
    """Nothing of ours runs at interpreter start, and `import duo_llm_hf` does not import the harness."""
    loaded = run_python("""
        import sys
        print([name for name in ("lm_eval", "duo_llm_hf", "_duo_llm_hf_lm_eval") if name in sys.modules])
        import duo_llm_hf
        print([name for name in ("lm_eval", "_duo_llm_hf_lm_eval") if name in sys.modules])
    """)
    assert loaded == ["[]", "[]"]


@pytest.mark.slow
def test_integration_import_registers_duo_next_to_the_harness_models():
    """The harness fills its registry only when it is empty at lookup: registering `duo` must not hide `hf`."""
    lines = run_python("""
        import duo_llm_hf.integrations.lm_eval
        from lm_eval.api.registry import get_model
        print(get_model("duo").__name__, get_model("hf").__name__)
    """)
    assert lines == ["DuoLM", "HFLM"]


@pytest.mark.slow
def test_duo_llm_eval_knows_duo():
    """`duo-llm eval` hands the harness's command line a registry that has `duo` (the harness's `cli_evaluate` is
    replaced by a probe of the registry)."""
    lines = run_python("""
        import lm_eval.__main__
        from lm_eval.api.registry import get_model

        lm_eval.__main__.cli_evaluate = lambda: print(get_model("duo").__name__, get_model("hf").__name__)
        from duo_llm_hf.cli import main
        main(["eval", "--model", "duo"])
    """)
    assert lines == ["DuoLM", "HFLM"]
