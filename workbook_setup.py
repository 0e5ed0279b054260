"""The setup that the notebooks' first cell runs on Colab, and the pins of `bash install.sh --runtime`.

Standard library only (plus `packaging`, or pip's copy of it), because it runs before anything is
installed. In a notebook's first cell, after the clone::

    import workbook_setup
    workbook_setup.check_gpu()            # refuses the `colab` and `paper` profiles without a GPU
    workbook_setup.install(WORKBOOK_DIR)  # once: a failed install shows its output and runs again next time

From a shell::

    python workbook_setup.py constraints  # pins for the runtime install into this python (install.sh --runtime)
    python workbook_setup.py freeze       # writes constraints.txt from this environment's versions

`constraints.txt` holds the versions the workbook was tested with, for the packages that the runtime
requirements (requirements-runtime.txt) pull in. Colab's own packages are never in it: a pin forces pip to
replace any installed version that differs, so torch (with its CUDA stack), numpy, ipywidgets and the
Jupyter/IPython stack are left out. When installing, `runtime_constraints` adapts the pins to the python
at hand: a package it already has is kept (pip replaces it only if a requirement's bound demands it),
unless it is one of the workbook's own requirements at a version outside that requirement's bound;
and the protected packages, with everything the `google-colab` package itself requires, are pinned to
their installed versions, so that pip stops with an error rather than replace them.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

HERE = Path(__file__).resolve().parent
RUNTIME_REQUIREMENTS = HERE / "requirements-runtime.txt"
CONSTRAINTS = HERE / "constraints.txt"
GPU_PROFILES = ("colab", "paper")
CLONE_MARKER = ".workbook-cloned"      # written by the notebooks' first cell after a complete clone
INSTALL_MARKER = ".workbook-installed"  # written by `install` after an install that succeeded
# The runtime's own packages, never pinned to our versions; installed ones are pinned to theirs.
PROTECTED = {
    "torch", "triton", "numpy", "ipywidgets", "widgetsnbextension", "jupyterlab-widgets",
    "ipykernel", "ipython", "jupyter-client", "jupyter-core", "jupyter-server", "jupyterlab", "notebook",
    "traitlets", "tornado", "pyzmq", "comm", "debugpy", "nbformat", "nbclient", "nbconvert",
}
NEVER_PINNED = {"pip", "setuptools", "wheel"}  # the installer's own tools: pip chooses
PROTECTED_PREFIXES = ("nvidia-",)  # torch's CUDA libraries
COLAB_PACKAGE = "google-colab"


class NoGPU(RuntimeError):
    """A GPU profile on a runtime without CUDA."""


class InstallFailed(RuntimeError):
    """The install command exited with an error (its output is printed above the error)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_protected(name: str) -> bool:
    name = canonical(name)
    return name in PROTECTED or name.startswith(PROTECTED_PREFIXES)


# ---------------------------------------------------------------- the GPU check

def refusal(profile: str) -> str:
    return (f"The `{profile}` profile needs a GPU, and this runtime has none (torch.cuda.is_available() is "
            "False): on a CPU its notebooks would run for hours. Either\n"
            "  * choose a GPU: Runtime → Change runtime type → T4 GPU (or any GPU), then run this cell again; or\n"
            "  * run the laptop-sized `cpu` profile here: set SAE_PROFILE=cpu before this cell runs "
            "(os.environ[\"SAE_PROFILE\"] = \"cpu\" in a cell above, or \"cpu\" for \"colab\" in this cell's "
            "SAE_PROFILE line).\n"
            f"To run `{profile}` on the CPU all the same, set SAE_OVERRIDES='{{\"device\": \"cpu\"}}'.")


def check_gpu(environ=None, cuda_available=None) -> None:
    """Refuse the `colab` and `paper` profiles ($SAE_PROFILE) on a runtime without CUDA, unless
    $SAE_OVERRIDES sets the profile's device to "cpu"; raise `NoGPU` with the ways out."""
    environ = os.environ if environ is None else environ
    profile = environ.get("SAE_PROFILE", "")
    if profile not in GPU_PROFILES:
        return
    try:
        overrides = json.loads(environ.get("SAE_OVERRIDES") or "{}")
    except ValueError:
        overrides = {}  # helpers.settings.profiles reports a malformed $SAE_OVERRIDES with its own message
    if isinstance(overrides, dict) and overrides.get("device") == "cpu":
        return
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise NoGPU(refusal(profile))


# ---------------------------------------------------------------- the install, once

def install(workbook_dir, command: str | None = None, tail_chars: int = 20_000) -> bool:
    """Install the workbook's runtime requirements into this python (`sys.executable`), unless an earlier
    install succeeded (its marker in `workbook_dir`). The command ($WORKBOOK_INSTALL, default
    `bash install.sh --runtime` for this python) runs quietly; when it fails its output is printed and
    `InstallFailed` raised, with no marker left, so the next run tries again. True if it installed."""
    workbook_dir = Path(workbook_dir)
    marker = workbook_dir / INSTALL_MARKER
    if marker.exists():
        return False
    command = command or os.environ.get("WORKBOOK_INSTALL") or \
        f"PYTHON={shlex.quote(sys.executable)} bash install.sh --runtime"
    print("installing the workbook's runtime requirements (a minute or two) ...", flush=True)
    done = subprocess.run(command, shell=True, cwd=workbook_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    if done.returncode != 0:
        out = done.stdout
        if len(out) > tail_chars:
            out = f"[... the first {len(out) - tail_chars:,} characters left out ...]\n" + out[-tail_chars:]
        print(out, flush=True)
        raise InstallFailed(f"the install ({command}) failed with exit status {done.returncode}: its output "
                            "is above. Run this cell again to retry it.")
    lines = done.stdout.strip().splitlines()
    if lines:
        print(lines[-1])
    marker.write_text(command + "\n")
    return True


# ---------------------------------------------------------------- the runtime pins

def read_requirements(path: Path = RUNTIME_REQUIREMENTS) -> list[Requirement]:
    """The requirements of a requirements file (comments and pip options left out; `-r` not followed)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} of a constraints file of `name==version` lines."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[canonical(name)] = version.strip()
    return out


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution this python has."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def colab_requirements() -> set[str]:
    """The packages that Colab's own `google-colab` package requires (empty elsewhere)."""
    try:
        requires = metadata.requires(COLAB_PACKAGE) or []
    except metadata.PackageNotFoundError:
        return set()
    env = {**default_environment(), "extra": ""}
    return {canonical(r.name) for r in map(Requirement, requires) if not r.marker or r.marker.evaluate(env)}


def _satisfies(requirement: Requirement, version: str) -> bool:
    return requirement.specifier.contains(Version(version), prereleases=True)


def runtime_constraints(tested: dict[str, str], installed: dict[str, str], requirements: list[Requirement],
                        keep: set[str] = frozenset()) -> list[str]:
    """The `name==version` pins for installing `requirements` into a python that has `installed`:

    * a protected package, or one in `keep` (what google-colab requires), that is installed: its
      installed version, so pip never replaces it;
    * a tested package that is not installed: its tested version;
    * a tested package that is installed: no pin (pip keeps it unless a bound demands another), except
      one of `requirements` whose installed version is outside the requirement's bound: the tested one.
    """
    bounds = {canonical(r.name): r for r in requirements}
    pins = {}
    for name, version in tested.items():
        if is_protected(name) or name in keep or name in NEVER_PINNED:
            continue
        if name not in installed or (name in bounds and not _satisfies(bounds[name], installed[name])):
            pins[name] = version
    for name, version in installed.items():
        if (is_protected(name) or name in keep) and name not in NEVER_PINNED:
            pins[name] = version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def tested_closure(requirements: list[Requirement]) -> dict[str, str]:
    """{name: version} of the requirements and everything they require, as installed here (for
    constraints.txt); protected packages are neither listed nor followed."""
    env = {**default_environment(), "extra": ""}
    found, todo = {}, [canonical(r.name) for r in requirements]
    while todo:
        name = todo.pop()
        if name in found or is_protected(name) or name in NEVER_PINNED:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist.version
        for r in map(Requirement, dist.requires or []):
            if not r.marker or r.marker.evaluate(env):
                todo.append(canonical(r.name))
    return dict(sorted(found.items()))


def freeze_text(requirements: list[Requirement]) -> str:
    py = ".".join(map(str, sys.version_info[:2]))
    head = ("# The versions the workbook was tested with (Python " + py + "), for what requirements-runtime.txt\n"
            "# pulls in; torch, numpy, ipywidgets and the Jupyter stack are left out (the runtime keeps its own).\n"
            "# Used by `bash install.sh --runtime` (the notebooks' first cell on Colab), through\n"
            "# workbook_setup.runtime_constraints. Written by `python workbook_setup.py freeze`.\n")
    return head + "".join(f"{n}=={v}\n" for n, v in tested_closure(requirements).items())


def main(argv: list[str]) -> int:
    if argv == ["constraints"]:
        pins = runtime_constraints(read_constraints(), installed_versions(), read_requirements(),
                                   keep=colab_requirements())
        print("\n".join(pins))
        return 0
    if argv == ["freeze"]:
        CONSTRAINTS.write_text(freeze_text(read_requirements()), encoding="utf-8")
        print(f"wrote {CONSTRAINTS}")
        return 0
    print(__doc__.split("\n\n")[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
