"""The versions the GPU check runs with, checked before anything heavy is imported.

The device machine's image has its own torch, transformers and accelerate (docs/gpu.md); our models need the
transformers of ``constraints.txt``, which travels as a wheel (``make device-wheels``, `device_wheels`). So the
check first prints the versions it found (python, torch, CUDA, transformers, accelerate) and, when they do not meet
the pins, stops at once with one line that names the wheel to carry, instead of failing minutes later:

- transformers (`CARRIED`): exactly the version ``constraints.txt`` pins (the carried wheel's);
- torch and accelerate (`RANGED`): the machine's own, within the ranges of ``pyproject.toml``'s dependencies.

Only the standard library and ``packaging`` are imported here, then the three packages themselves.
"""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors tomli, tomllib's origin
    from pip._vendor import tomli as tomllib

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion
except ModuleNotFoundError:  # pip vendors packaging; any python that can install the carry has it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion

REPO = Path(__file__).resolve().parents[1]
CARRIED = ("transformers",)
RANGED = ("torch", "accelerate")
GUARD_EXIT_CODE = 2


def pinned_versions(constraints: Path = REPO / "constraints.txt") -> dict[str, str]:
    """``name == version`` lines of a constraints file, by canonical name (``huggingface-hub``)."""
    pins = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version.strip()
    return pins


def dependency_ranges(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Requirement]:
    """The package's dependencies (``[project] dependencies``) by canonical name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {canonicalize_name(req.name): req for req in map(Requirement, project["dependencies"])}


def found_versions() -> dict[str, str | None]:
    """python, torch, CUDA, transformers and accelerate as imported here (``__version__``, so the package that
    ``PYTHONPATH`` puts first), and where transformers came from; a package that fails to import is ``None``, with
    its error under ``<name>_error``."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", *CARRIED, "accelerate"):
        try:
            module = importlib.import_module(name)
        except Exception as err:  # an import that fails (a missing requirement) is reported, not raised
            found[name], found[f"{name}_error"] = None, " ".join(f"{type(err).__name__}: {err}".split())
            continue
        found[name] = str(getattr(module, "__version__", None))
        if name == "torch":
            found["cuda"] = module.version.cuda
        if name in CARRIED:
            found[f"{name}_path"] = str(Path(module.__file__).parent)
    return found


def guard_problem(found: dict, pins: dict[str, str], ranges: dict[str, Requirement]) -> str | None:
    """The one line that says which wheel is missing, or None when the versions meet the pins."""
    for name in CARRIED:
        wanted = pins[name]
        wheel = f"the wheel {name}=={wanted} (`make device-wheels` writes it into .whl/; docs/gpu.md)"
        if found.get(name) is None:
            return f"{name} does not import here ({found.get(f'{name}_error')}); carry {wheel}."
        if found[name] != wanted:
            return f"{name} is {found[name]} here, the pins need {wanted}: carry {wheel}."
    for name in RANGED:
        spec = ranges[name].specifier
        version = found.get(name)
        try:
            met = version is not None and spec.contains(version, prereleases=True)
        except InvalidVersion:
            met = False
        if not met:
            wanted = pins.get(name, str(spec))
            why = found.get(f"{name}_error") if version is None else f"{name} is {version} here"
            return f"{why}; the check needs {name}{spec}: carry the wheel {name}=={wanted} (docs/gpu.md)."
    return None


def check_or_exit() -> dict:
    """Print the versions; exit with `GUARD_EXIT_CODE` and one line on stderr when they miss the pins."""
    found = found_versions()
    shown = ", ".join(f"{k} {found.get(k)}" for k in ("python", "torch", "cuda", "transformers", "accelerate"))
    print(f"device_check: {shown}", flush=True)
    problem = guard_problem(found, pinned_versions(), dependency_ranges())
    if problem:
        print(f"device_check: {problem}", file=sys.stderr, flush=True)
        sys.exit(GUARD_EXIT_CODE)
    return found
