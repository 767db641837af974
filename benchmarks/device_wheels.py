"""``make device-wheels``: the wheels the device machine lacks at our pinned versions, written into ``.whl/``.

The device machine runs the GPU check with its own Python 3.12 and packages and cannot reach a package index, so
what it lacks travels with the call as wheels (the call's ``carry``, at most 64 MiB). This writes exactly those:
transformers at the version ``constraints.txt`` pins, then every requirement of a carried wheel (its METADATA
``Requires-Dist``, markers evaluated for Python 3.12 on Linux) that the device's packages do not meet, at its pinned
version, and so on for what those require. A requirement is met on the device when

- the version the device has (`DEVICE_VERSIONS`) is inside the requirement's range, or
- the device has the package at a version nobody read (`DEVICE_UNREAD`) and the device's own transformers
  (`DEVICE_VERSIONS`) requires the very same range: pip met it when the image was built.

Wheels are downloaded with ``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on manylinux x86-64, as
the device tool's notes give it; wheels in the folder that are not part of the carry are removed, so that the
device's ``pip install .whl/*.whl`` installs one version of each. Prints each decision and the carry's total size,
and exits 1 when it is 64 MiB or more (or a download fails).

    python3 benchmarks/device_wheels.py                  # = make device-wheels (writes .whl/)
    python3 benchmarks/device_wheels.py --dest /tmp/w    # elsewhere (the test does this)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_versions import REPO, canonicalize_name, pinned_versions  # noqa: E402

try:
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
except ModuleNotFoundError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import parse_wheel_filename

# The device image ('cuda') as the device tool's KINDS.md lists it (pip list read on a machine, 2026-11).
DEVICE_PYTHON = "3.12"
DEVICE_VERSIONS = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "numpy": "2.5.2",
}
# Installed there too (KINDS.md's package list), at versions no session has read.
DEVICE_UNREAD = frozenset(
    {"packaging", "pyyaml", "regex", "tqdm", "typer", "filelock", "fsspec", "requests", "jinja2", "psutil"}
)
CARRIED = "transformers"
# Markers of the device's interpreter, for the requirements that hold only on some platforms or Pythons.
DEVICE_MARKERS = {
    "python_version": DEVICE_PYTHON,
    "python_full_version": f"{DEVICE_PYTHON}.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
# The device's glibc runs any manylinux tag up to 2.39; pip matches each tag exactly, so all are named.
PLATFORMS = [
    "manylinux1_x86_64",
    "manylinux2014_x86_64",
    *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)),
]
MAX_CARRY_BYTES = 64 * 2**20


class DownloadFailed(RuntimeError):
    """pip could not download a wheel (no index reachable, or no wheel for the device)."""


def pip_download(name: str, version: str, dest: Path, timeout: float = 60) -> Path:
    """Download the wheel ``name==version`` for the device into ``dest``; returns its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", DEVICE_PYTHON, "--implementation", "cp",
        *(item for platform in PLATFORMS for item in ("--platform", platform)),
        "--timeout", str(timeout), "--retries", "1", "--dest", str(dest), f"{name}=={version}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = find_wheel(dest, name, version)
    if done.returncode or wheel is None:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise DownloadFailed(f"pip download {name}=={version} for Python {DEVICE_PYTHON} failed: {last}")
    return wheel


def find_wheel(folder: Path, name: str, version: str | None = None) -> Path | None:
    """The wheel of ``name`` (at ``version``, if given) in ``folder``."""
    for path in sorted(folder.glob("*.whl")):
        wheel_name, wheel_version, _, _ = parse_wheel_filename(path.name)
        if wheel_name == canonicalize_name(name) and (version is None or str(wheel_version) == version):
            return path
    return None


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` that apply on the device (no extras; markers for Python 3.12 on Linux)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(metadata).decode())
    found = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    return [req for req in found if req.marker is None or req.marker.evaluate(DEVICE_MARKERS)]


def met_on_device(req: Requirement, device_requires: dict[str, Requirement]) -> tuple[bool, str]:
    """Whether the device's packages meet ``req``, and why."""
    name = canonicalize_name(req.name)
    if name in DEVICE_VERSIONS:
        version = DEVICE_VERSIONS[name]
        return req.specifier.contains(version, prereleases=True), f"the device has {version}"
    if name in DEVICE_UNREAD:
        theirs = device_requires.get(name)
        same = theirs is not None and theirs.specifier == req.specifier
        why = f"the device's transformers {DEVICE_VERSIONS[CARRIED]} requires {theirs}" if theirs else "no reading"
        return same, f"version not read; {why}"
    return False, "the device does not have it"


def plan_carry(dest: Path, pins: dict[str, str], device_requires: dict[str, Requirement]) -> list[tuple]:
    """Download the carry into ``dest``: ``[(name, version, wheel, reason)]``, transformers first."""
    carry, queue, seen = [], [(CARRIED, "pinned by constraints.txt")], set()
    while queue:
        name, reason = queue.pop(0)
        name = canonicalize_name(name)
        if name in seen:
            continue
        seen.add(name)
        if name not in pins:
            raise DownloadFailed(f"{name} must travel but constraints.txt pins no version of it ({reason}).")
        wheel = find_wheel(dest, name, pins[name]) or pip_download(name, pins[name], dest)
        carry.append((name, pins[name], wheel, reason))
        for req in requirements(wheel):
            met, why = met_on_device(req, device_requires)
            print(f"  {name} requires {req}: {'met' if met else 'CARRIED'} ({why})")
            if not met:
                queue.append((req.name, f"{name} requires {req}; {why}"))
    return carry


def device_transformers_requires(work: Path) -> dict[str, Requirement]:
    """The requirements of the device's own transformers, read off its wheel (downloaded to ``work``)."""
    wheel = pip_download(CARRIED, DEVICE_VERSIONS[CARRIED], work)
    return {canonicalize_name(req.name): req for req in requirements(wheel)}


def build_carry(dest: Path) -> dict:
    """Write the carry into ``dest`` and remove every other wheel there; returns the carry and its size."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        device_requires = device_transformers_requires(Path(work))
    carry = plan_carry(dest, pinned_versions(), device_requires)
    kept = {wheel for _, _, wheel, _ in carry}
    for stale in sorted(set(dest.glob("*.whl")) - kept):
        print(f"  removed {stale.name}: not part of the carry")
        stale.unlink()
    total = sum(wheel.stat().st_size for wheel in kept)
    return {
        "wheels": [
            {"name": n, "version": v, "file": w.name, "bytes": w.stat().st_size, "why": r} for n, v, w, r in carry
        ],
        "total_bytes": total,
        "fits": total < MAX_CARRY_BYTES,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(REPO / ".whl"), help="the carry's folder (default: .whl/)")
    args = parser.parse_args(argv)
    try:
        carry = build_carry(Path(args.dest))
    except DownloadFailed as err:
        print(f"device_wheels: {err}", file=sys.stderr)
        return 1
    for wheel in carry["wheels"]:
        print(f"{wheel['file']}: {wheel['bytes'] / 2**20:.1f} MiB ({wheel['why']})")
    verdict = "under" if carry["fits"] else "NOT under"
    print(f"carry {args.dest}: {carry['total_bytes'] / 2**20:.1f} MiB, {verdict} the device call's 64 MiB")
    return 0 if carry["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
