"""Run the whole workbook headless: execute every notebook in order and save the results.

    python -m helpers.runs.run_all                  # profile from $SAE_PROFILE (default cpu / gpu)
    SAE_PROFILE=test python -m helpers.runs.run_all
    python -m helpers.runs.run_all --only 03 04     # some notebooks (by name prefix)
    python -m helpers.runs.run_all --report         # the last run's time by notebook and by step; runs nothing

Executed notebooks (with their outputs and figures) are written to <cache>/<profile>/runs/.
A notebook that fails stops the run with its error; the ones before it are kept, and so is the
failing one, executed up to the cell that failed.

While a notebook runs, a progress bar counts its code cells and names the section (the last
markdown heading) of the running cell, with the time so far and the resource plan's estimate for the
notebook (helpers.runs.plan; none when the plan cannot be made). On a terminal the bar redraws in
place; in a log (stdout not a terminal) it prints one line as each cell starts and one a minute
during a long cell.

Every cell's wall time is recorded, with its notebook, index and section, in
<cache>/<profile>/runs/timings.json, rewritten after each cell (an interrupted run keeps what it
measured). A run replaces the timings of the notebooks it runs and keeps the others'. `RunTimings`
reads the file back as a typed result, by notebook and by step (section).

Each executed notebook records where it ran (`Provenance`: profile, commit, UTC date, machine, the
command that reproduces it, wall seconds and status) in its metadata under ``workbook_run``, and
<cache>/<profile>/runs/runs.json keeps the same record per notebook. `python -m helpers.runs.report`
collects the notebooks' result cells with these records into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

from helpers.results import Result
from helpers.runs.plan import plan
from helpers.settings.paths import NOTEBOOKS_DIR, REPO_ROOT
from helpers.settings.profiles import ENV_VAR, default_profile_name, get_profile

TIMINGS = "timings.json"
RUNS = "runs.json"              # {notebook stem: Provenance.to_dict()} of the runs in a profile's runs/
RUN_KEY = "workbook_run"        # the executed notebook's metadata key holding its Provenance
HEADING = re.compile(r"^\s{0,3}(#{1,4})\s+(.+?)\s*#*\s*$")
HEADING_WIDTH = 36      # characters of a section heading shown in the bar
TICK_TTY = 1.0          # seconds between redraws of the bar on a terminal
TICK_LOG = 60.0         # seconds between the lines a long cell prints in a log


def notebooks() -> list:
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def _plain_heading(text: str) -> str:
    """A markdown heading's text without its emphasis, code marks and links."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[*_`]+", "", text).strip()


def section_headings(nb) -> dict[int, str]:
    """For every code cell of notebook `nb` that runs (non-empty source), the last markdown heading
    (``#`` to ``####``) above it, or "" when there is none: {cell index: heading}."""
    out, heading = {}, ""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                m = HEADING.match(line)
                if m:
                    heading = _plain_heading(m.group(2))
        elif cell.cell_type == "code" and cell.source.strip():
            out[i] = heading
    return out


def shorten(text: str, width: int = HEADING_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def duration(seconds: float | None) -> str:
    """Seconds as ``45 s``, ``12.5 min`` or ``1.2 h``; "" for None."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimates(profile) -> dict[str, float]:
    """The plan's estimated seconds per notebook ("01".."05") for `profile` on this machine; {} when the
    plan cannot be made (the run goes on without estimates)."""
    try:
        return {k: float(v) for k, v in plan(profile).seconds.items()}
    except Exception as e:  # an estimate is a courtesy: never stop a run for want of one
        print(f"(no time estimates: the plan failed with {type(e).__name__}: {e})", file=sys.stderr)
        return {}


@dataclass
class CellTime(Result):
    """One executed code cell: its notebook (file stem), index in the notebook, section heading, wall
    seconds, and status ("ok", "error" for a cell that raised, "interrupted" for one that never replied)."""
    notebook: str
    index: int
    heading: str
    seconds: float
    status: str = "ok"


@dataclass
class NotebookTime(Result):
    """One notebook of a run: status ("running", "ok" or "FAILED: <error>"), wall seconds (kernel start
    included), the plan's estimate (None: none), code cells run of those it has, and when it finished."""
    notebook: str
    status: str = "running"
    seconds: float = 0.0
    estimate: float | None = None
    cells_run: int = 0
    cells: int = 0
    finished: str = ""


@dataclass
class RunTimings(Result):
    """Where a run of the workbook spent its time: per notebook and per cell (with the cell's section).

    ``rows(by)`` / ``to_frame(by)`` give the table by "notebook" (the default), by "step" (the section
    headings, in notebook order) or by "cell"; ``top_steps(n)`` the n steps that took longest;
    ``report()`` the text that ``python -m helpers.runs.run_all --report`` prints."""
    profile: str = ""
    notebooks: list[NotebookTime] = field(default_factory=list)
    cells: list[CellTime] = field(default_factory=list)

    @classmethod
    def path(cls, profile) -> Path:
        """The timings file of `profile` (a Profile): <cache>/<profile>/runs/timings.json."""
        return profile.cache_dir / "runs" / TIMINGS

    def notebook(self, name: str) -> NotebookTime | None:
        return next((n for n in self.notebooks if n.notebook == name), None)

    def restart(self, entry: NotebookTime) -> None:
        """Start `entry`'s notebook afresh: drop its earlier timings, keep the other notebooks'."""
        self.notebooks = sorted([n for n in self.notebooks if n.notebook != entry.notebook] + [entry],
                                key=lambda n: n.notebook)
        self.cells = [c for c in self.cells if c.notebook != entry.notebook]

    @property
    def total(self) -> float:
        return sum(n.seconds for n in self.notebooks)

    def steps(self) -> list[dict]:
        """One dict per (notebook, section) in notebook order: cells, seconds and share of the total."""
        out: dict = {}
        for c in self.cells:
            s = out.setdefault((c.notebook, c.heading), {"notebook": c.notebook, "step": c.heading,
                                                           "cells": 0, "seconds": 0.0})
            s["cells"] += 1
            s["seconds"] += c.seconds
        total = self.total or sum(c.seconds for c in self.cells) or 1.0
        return [{**s, "share %": round(100 * s["seconds"] / total, 1)} for s in out.values()]

    def top_steps(self, n: int = 15) -> list[dict]:
        return sorted(self.steps(), key=lambda s: -s["seconds"])[:n]

    def rows(self, by: str = "notebook") -> list[dict]:
        if by == "notebook":
            out = []
            for n in self.notebooks:
                cell_s = sum(c.seconds for c in self.cells if c.notebook == n.notebook)
                out.append({"notebook": n.notebook, "status": n.status, "cells": f"{n.cells_run}/{n.cells}",
                            "seconds": round(n.seconds, 1), "in cells": round(cell_s, 1),
                            "plan": None if n.estimate is None else round(n.estimate, 1),
                            "measured / plan": (round(n.seconds / n.estimate, 2)
                                                if n.estimate and n.status == "ok" else None),
                            "finished": n.finished})
            return out
        if by == "step":
            return [{**s, "seconds": round(s["seconds"], 1)} for s in self.steps()]
        if by == "cell":
            return [{"notebook": c.notebook, "cell": c.index, "step": c.heading, "seconds": round(c.seconds, 2),
                     "status": c.status} for c in self.cells]
        raise ValueError(f"rows by 'notebook', 'step' or 'cell', not {by!r}")

    def to_frame(self, by: str = "notebook"):
        import pandas as pd

        return pd.DataFrame(self.rows(by))

    def verdicts(self) -> list[str]:
        if not self.notebooks:
            return []
        planned = [n for n in self.notebooks if n.estimate and n.status == "ok"]
        line = f"profile {self.profile!r}: {len(self.notebooks)} notebook(s), {duration(self.total)} in all"
        if planned:
            took = duration(sum(n.seconds for n in planned))
            line += (f"; the plan estimated {duration(sum(n.estimate for n in planned))} for the "
                     f"{len(planned)} that ran to the end with one, which took {took}")
        return [line]

    def report(self, top: int = 15) -> str:
        """The by-notebook table and the `top` steps that took longest, as text."""
        import pandas as pd

        def text(rows):
            with pd.option_context("display.width", 200, "display.max_columns", 20,
                                   "display.max_colwidth", 60):
                return pd.DataFrame(rows).to_string(index=False) if rows else "(none)"
        return "\n".join([f"Run timings of profile {self.profile!r}", "", "By notebook:", text(self.rows()),
                          "", f"Top {top} steps by time (section headings):",
                          text([{**s, "seconds": round(s["seconds"], 1)} for s in self.top_steps(top)]),
                          "", *self.verdicts()])


def git_commit(root: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the repository at `root`, with "+dirty" when its tree has uncommitted
    changes; "unknown" outside git (or without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode != 0 or dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform's), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """This machine, as a run records it: platform, CPU model, core count, torch version, and the CUDA
    device's name ("cpu" without one)."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count() or 0,
            "torch": torch.__version__, "device": device}


def reproduce_command(profile: str, notebook: str) -> str:
    """The command that runs notebook `notebook` (its stem, or a prefix such as "03") of `profile` again."""
    return f"SAE_PROFILE={profile} python -m helpers.runs.run_all --only {notebook[:2]}"


@dataclass
class Provenance(Result):
    """Where and how one notebook of a run ran: profile, repository commit ("+dirty" for uncommitted
    changes, "unknown" outside git), UTC date (ISO), machine (`machine()`), the command that reproduces it,
    wall seconds and status."""
    notebook: str
    profile: str
    commit: str = "unknown"
    date: str = ""
    machine: dict = field(default_factory=dict)
    command: str = ""
    seconds: float = 0.0
    status: str = ""

    @classmethod
    def here(cls, notebook: str, profile: str, seconds: float = 0.0, status: str = "") -> "Provenance":
        """The provenance of a run of `notebook` on this machine, now."""
        return cls(notebook, profile, git_commit(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   machine(), reproduce_command(profile, notebook), round(float(seconds), 1), status)

    def machine_text(self) -> str:
        m = self.machine
        if not m:
            return "not recorded"
        return (f"{m.get('device', '?')}; {m.get('cpu', '?')} ({m.get('cores', '?')} cores); "
                f"{m.get('platform', '?')}; torch {m.get('torch', '?')}")

    def verdicts(self) -> list[str]:
        return [f"{self.notebook} ran on profile {self.profile!r} at commit {self.commit} on {self.date} "
                f"({self.machine_text()}) in {duration(self.seconds)}: {self.status}; rerun with `{self.command}`"]


def record_run(out_dir: Path, prov: Provenance) -> Path:
    """Add (or replace) `prov` in out_dir/runs.json, keeping the other notebooks' records."""
    path = out_dir / RUNS
    try:
        runs = json.loads(path.read_text())
        runs = runs if isinstance(runs, dict) else {}
    except (OSError, ValueError):
        runs = {}
    runs[prov.notebook] = prov.to_dict()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(runs.items())), indent=1))
    os.replace(tmp, path)
    return path


class _Lines:
    """A stream for tqdm that prints each redraw of the bar as a line of its own (for logs), skipping a
    redraw that repeats the line before."""

    def __init__(self, stream):
        self.stream, self.last = stream, ""

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def _terminal_width(stream) -> int:
    """The width of the terminal `stream` writes to; 0 when it is not a terminal, or one of no width."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):
        return 0


class NotebookProgress:
    """The bar of one running notebook, and the timings of its cells.

    Hand `on_cell_execute` and `on_cell_executed` to nbclient (they run as a code cell is sent to the
    kernel and as its reply comes back); `fail` records the running cell when the notebook stops
    without a reply; `close` ends the bar. Every finished cell is appended to `timings` and the file
    at `path` rewritten."""

    def __init__(self, nb, name: str, timings: RunTimings, path: Path, estimate: float | None = None,
                 stream=None):
        self.headings = section_headings(nb)
        self.name, self.timings, self.path, self.estimate = name, timings, path, estimate
        self.entry = NotebookTime(name, estimate=estimate, cells=len(self.headings))
        timings.restart(self.entry)
        stream = stream or sys.stdout
        self.tty = _terminal_width(stream) > 0
        self.bar = tqdm(total=len(self.headings), desc=self._desc(""), unit="cell",
                        file=stream if self.tty else _Lines(stream),
                        mininterval=TICK_TTY if self.tty else TICK_LOG, dynamic_ncols=self.tty, ascii=not self.tty,
                        bar_format="{desc}: {n_fmt}/{total_fmt} cells |{bar}| {elapsed}{postfix}",
                        postfix=None if estimate is None else f"plan ~{duration(estimate)}")
        self.t0 = time.perf_counter()
        self.running: tuple[int, float] | None = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _desc(self, heading: str) -> str:
        return f"{self.name[:2]} § {shorten(heading)}" if heading else self.name

    def _tick(self) -> None:  # redraw while a long cell runs, so that the clock moves
        while not self._stop.wait(TICK_TTY if self.tty else TICK_LOG):
            self.bar.refresh()

    def on_cell_execute(self, cell, cell_index: int, **_) -> None:
        self.running = (cell_index, time.perf_counter())
        self.bar.set_description_str(self._desc(self.headings.get(cell_index, "")), refresh=False)
        self.bar.refresh()

    def on_cell_executed(self, cell, cell_index: int, execute_reply=None, **_) -> None:
        status = "ok"
        if execute_reply is not None and execute_reply.get("content", {}).get("status") == "error":
            status = "error"
        self._finish(cell_index, status)
        self.bar.update(1)

    def _finish(self, cell_index: int, status: str) -> None:
        if self.running is None or self.running[0] != cell_index:
            return
        seconds = time.perf_counter() - self.running[1]
        self.running = None
        self.timings.cells.append(CellTime(self.name, cell_index, self.headings.get(cell_index, ""), seconds, status))
        self.entry.cells_run += 1
        self.entry.seconds = time.perf_counter() - self.t0
        self.timings.save(self.path)

    def fail(self) -> None:
        """Record the cell that was running when the notebook stopped without its reply."""
        if self.running is not None:
            self._finish(self.running[0], "interrupted")

    def close(self, status: str) -> None:
        self._stop.set()
        self._ticker.join()
        self.entry.status = status
        self.entry.seconds = time.perf_counter() - self.t0
        self.entry.finished = datetime.now().isoformat(timespec="seconds")
        self.timings.save(self.path)
        self.bar.close()


def load_timings(path: Path, profile: str) -> RunTimings:
    """The timings at `path` if they are this profile's and readable, else empty ones."""
    try:
        t = RunTimings.load(path)
        if t.profile == profile:
            return t
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return RunTimings(profile)


def run_notebook(path: Path, out_dir: Path, timings: RunTimings, estimate: float | None = None,
                 stream=None) -> str:
    """Execute notebook `path`, showing its progress and recording its cells' times in `timings` (saved
    beside the executed notebooks in `out_dir`); write the executed notebook, also when a cell fails,
    with its `Provenance` in its metadata (``workbook_run``) and in out_dir/runs.json.
    Returns "ok" or "FAILED: <error type>" (the error itself goes to stderr)."""
    nb = nbformat.read(path, as_version=4)
    progress = NotebookProgress(nb, path.stem, timings, out_dir / TIMINGS, estimate, stream)
    client = NotebookClient(nb, timeout=None, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_execute=progress.on_cell_execute, on_cell_executed=progress.on_cell_executed)
    try:
        client.execute()
        status = "ok"
    except KeyboardInterrupt:
        progress.fail()
        progress.close("INTERRUPTED")
        raise
    except Exception as e:  # keep the partly executed notebook: it shows where it failed
        progress.fail()
        status = f"FAILED: {type(e).__name__}"
        progress.close(status)
        print(str(e)[-3000:], file=sys.stderr)
    else:
        progress.close(status)
    finally:
        entry = progress.entry
        prov = Provenance.here(path.stem, timings.profile, entry.seconds, entry.status)
        nb.metadata[RUN_KEY] = prov.to_dict()
        nbformat.write(nb, out_dir / path.name)
        record_run(out_dir, prov)
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="profile name (default: $SAE_PROFILE)")
    ap.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 01 02")
    ap.add_argument("--report", nargs="?", type=int, const=15, default=None, metavar="TOP",
                    help="print the last run's time by notebook and its TOP steps (default 15) by time; "
                         "run nothing")
    a = ap.parse_args(argv)

    P = get_profile(a.profile or default_profile_name())
    out_dir = P.cache_dir / "runs"
    if a.report is not None:
        path = RunTimings.path(P)
        if not path.exists():
            print(f"no timings recorded for profile {P.name!r} (looked for {path})", file=sys.stderr)
            return 1
        print(load_timings(path, P.name).report(a.report))
        return 0

    os.environ[ENV_VAR] = P.name  # the kernels inherit it
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in notebooks() if not a.only or any(p.name.startswith(o) for o in a.only)]
    planned = estimates(P)
    print(f"profile {P.name}: running {len(todo)} notebook(s); results in {out_dir}"
          + (f"; the plan estimates {duration(sum(planned.get(p.name[:2], 0) for p in todo))}" if planned else ""),
          flush=True)
    timings = load_timings(out_dir / TIMINGS, P.name)
    done = []
    for path in todo:
        status = run_notebook(path, out_dir, timings, planned.get(path.name[:2]))
        done.append(timings.notebook(path.stem))
        if status != "ok":
            break
    print("summary:")
    for n in done:
        plan_s = f"plan {duration(n.estimate)}" if n.estimate is not None else "no plan estimate"
        print(f"  {n.notebook + '.ipynb':<32} {n.status:<28} {n.seconds:7.1f} s   {plan_s}")
    print(f"timings in {out_dir / TIMINGS} (python -m helpers.runs.run_all --report)")
    return 0 if all(n.status == "ok" for n in done) else 1


if __name__ == "__main__":
    sys.exit(main())
