"""helpers.runs.run_all: progress per cell, per-cell timings, the summary and --report, on tiny notebooks."""
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers.runs import run_all
from helpers.runs.run_all import (RUN_KEY, CellTime, NotebookTime, Provenance, RunTimings, git_commit, main,
                                  record_run, section_headings)


def write(folder, name, cells):
    nb = new_notebook(cells=[new_markdown_cell(s[3:]) if s.startswith("md:") else new_code_cell(s) for s in cells])
    nbformat.write(nb, folder / f"{name}.ipynb")


@pytest.fixture
def workbook(tmp_path, monkeypatch):
    """A notebooks folder with two quick notebooks and one that fails, and a cache in tmp_path."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write(folder, "01_alpha", ["md:# 01 · Alpha\n\nSome text.", "md:## Set-up", "x = 1",
                               "md:### A **sleepy** step", "import time\ntime.sleep(0.2)", "y = x + 1", ""])
    write(folder, "02_beta", ["md:## Beta `part`", "print(1)"])
    write(folder, "03_gamma", ["md:## Before it breaks", "a = 1", "md:## Where it breaks",
                               "raise ValueError('boom')", "b = 2"])
    monkeypatch.setattr(run_all, "NOTEBOOKS_DIR", folder)
    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAE_PROFILE", "test")
    return tmp_path / "cache" / "test" / "runs"


def test_section_headings_name_each_code_cell():
    nb = new_notebook(cells=[new_code_cell("a = 1"), new_markdown_cell("# Top\n\ntext"), new_code_cell("b = 2"),
                             new_markdown_cell("text\n\n#### Deep [link](http://x) `code`"), new_code_cell("  "),
                             new_code_cell("c = 3"), new_markdown_cell("##### too deep\n#not a heading")])
    assert section_headings(nb) == {0: "", 2: "Top", 5: "Deep link code"}


def test_run_records_every_cell_and_shows_headings(workbook, capsys):
    assert main(["--only", "01", "02"]) == 0
    out = capsys.readouterr().out
    t = RunTimings.load(workbook / "timings.json")
    assert t.profile == "test"
    assert [(c.notebook, c.index, c.heading) for c in t.cells] == [
        ("01_alpha", 2, "Set-up"), ("01_alpha", 4, "A sleepy step"), ("01_alpha", 5, "A sleepy step"),
        ("02_beta", 1, "Beta part")]
    assert all(c.seconds > 0 and c.status == "ok" for c in t.cells)
    assert t.cells[1].seconds >= 0.2 > t.cells[0].seconds
    assert [(n.notebook, n.status, n.cells_run, n.cells) for n in t.notebooks] == [("01_alpha", "ok", 3, 3),
                                                                                  ("02_beta", "ok", 1, 1)]
    assert all(n.estimate and n.estimate > 0 for n in t.notebooks)  # the test profile's plan can be made here
    assert all(n.seconds >= sum(c.seconds for c in t.cells if c.notebook == n.notebook) for n in t.notebooks)
    # progress lines (stdout is not a terminal here) name the running cell's section and the plan
    assert "01 § Set-up" in out and "01 § A sleepy step" in out and "02 § Beta part" in out
    assert "3/3 cells" in out and "plan ~" in out
    assert "summary:" in out and "02_beta.ipynb" in out
    assert (workbook / "01_alpha.ipynb").exists() and (workbook / "02_beta.ipynb").exists()
    steps = {(s["notebook"], s["step"]): s for s in t.rows("step")}
    assert steps[("01_alpha", "A sleepy step")]["cells"] == 2
    assert list(t.to_frame("cell").columns) == ["notebook", "cell", "step", "seconds", "status"]

    assert main(["--report", "3"]) == 0
    report = capsys.readouterr().out
    assert "By notebook:" in report and "Top 3 steps" in report
    assert "A sleepy step" in report and "02_beta" in report
    lines = report.splitlines()
    top = lines[lines.index(next(x for x in lines if x.startswith("Top 3"))) + 2]
    assert "A sleepy step" in top  # the longest step comes first


def test_a_failing_cell_stops_the_run_and_keeps_what_ran(workbook, capsys, monkeypatch):
    def no_plan(profile):
        raise RuntimeError("no model config here")
    monkeypatch.setattr(run_all, "plan", no_plan)
    assert main(["--only", "01", "03"]) == 1
    captured = capsys.readouterr()
    assert "boom" in captured.err and "no time estimates" in captured.err
    assert "FAILED: CellExecutionError" in captured.out and "no plan estimate" in captured.out
    t = RunTimings.load(workbook / "timings.json")
    assert [n.notebook for n in t.notebooks] == ["01_alpha", "03_gamma"]
    assert t.notebook("03_gamma").status.startswith("FAILED") and t.notebook("03_gamma").estimate is None
    assert t.notebook("01_alpha").status == "ok" and (workbook / "01_alpha.ipynb").exists()
    assert [(c.index, c.heading, c.status) for c in t.cells if c.notebook == "03_gamma"] == [
        (1, "Before it breaks", "ok"), (3, "Where it breaks", "error")]
    assert len(t.cells) == 5 and all(c.seconds > 0 for c in t.cells)
    nb = json.loads((workbook / "03_gamma.ipynb").read_text())
    assert nb["cells"][1]["outputs"] == [] and nb["cells"][1]["execution_count"] == 1
    assert nb["cells"][3]["outputs"][0]["ename"] == "ValueError"
    assert nb["cells"][4]["execution_count"] is None
    # each executed notebook says where it ran, in its metadata and in runs.json
    prov = Provenance.from_dict(nb["metadata"][RUN_KEY])
    assert prov.notebook == "03_gamma" and prov.profile == "test" and prov.status.startswith("FAILED")
    assert prov.command == "SAE_PROFILE=test python -m helpers.runs.run_all --only 03"
    assert prov.commit == git_commit() and prov.date.endswith("+00:00") and prov.seconds > 0
    assert prov.machine["cores"] >= 1 and prov.machine["device"] and prov.machine["torch"]
    runs = json.loads((workbook / "runs.json").read_text())
    assert sorted(runs) == ["01_alpha", "03_gamma"] and runs["03_gamma"] == nb["metadata"][RUN_KEY]
    assert runs["01_alpha"]["status"] == "ok"


def test_timings_round_trip_and_keep_other_notebooks(tmp_path):
    t = RunTimings("cpu", [NotebookTime("01_a", "ok", 10.0, 20.0, 2, 2), NotebookTime("02_b", "ok", 5.0, None, 1, 1)],
                   [CellTime("01_a", 1, "Load", 2.0), CellTime("01_a", 3, "Train", 7.5), CellTime("02_b", 0, "", 4.0)])
    back = RunTimings.load(t.save(tmp_path / "t.json"))
    assert back == t and isinstance(back.cells[0], CellTime)
    assert back.top_steps(1) == [{"notebook": "01_a", "step": "Train", "cells": 1, "seconds": 7.5, "share %": 50.0}]
    assert back.rows()[0]["measured / plan"] == 0.5 and back.rows()[1]["plan"] is None
    back.restart(NotebookTime("01_a"))
    assert [c.notebook for c in back.cells] == ["02_b"] and [n.notebook for n in back.notebooks] == ["01_a", "02_b"]
    with pytest.raises(ValueError):
        back.rows("nope")


def test_git_commit_marks_a_dirty_tree_and_is_unknown_outside_git(tmp_path):
    import subprocess

    assert git_commit(tmp_path) == "unknown"
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == head + "+dirty"


def test_record_run_keeps_the_other_notebooks(tmp_path):
    record_run(tmp_path, Provenance("01_a", "cpu", "abc", "2026-01-01T00:00:00+00:00", {}, "cmd", 1.0, "ok"))
    record_run(tmp_path, Provenance("02_b", "cpu", "def", "2026-01-02T00:00:00+00:00", {}, "cmd", 2.0, "ok"))
    record_run(tmp_path, Provenance("01_a", "cpu", "ghi", "2026-01-03T00:00:00+00:00", {}, "cmd", 3.0, "ok"))
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert list(runs) == ["01_a", "02_b"] and runs["01_a"]["commit"] == "ghi" and runs["02_b"]["commit"] == "def"
    assert Provenance.here("03_c", "test").command == "SAE_PROFILE=test python -m helpers.runs.run_all --only 03"
