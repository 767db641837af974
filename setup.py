"""The one build step pyproject.toml cannot state: put `duo_llm_hf_lm_eval.pth` at the root of the wheel.

Python runs the file's single line at every interpreter start in the environment, which installs the import hook
in `src/_duo_llm_hf_lm_eval.py` so that the harness's own `lm_eval --model duo ...` finds our model (lm-eval 0.4
has no plugin entry points for models). The hook imports nothing until `lm_eval.models` is imported.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "duo_llm_hf_lm_eval.pth"
PTH_LINE = "import _duo_llm_hf_lm_eval\n"


class BuildPyWithPth(build_py):
    """`build_py` that also writes the `.pth` at the root of the wheel, in regular and editable builds."""

    def run(self) -> None:
        super().run()
        # An editable (PEP 660) wheel holds what is written to the install command's install_lib, not build_lib.
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / PTH_NAME).write_text(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth})
