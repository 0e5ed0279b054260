"""The notebooks' exercises: every exercise cell of every solved notebook against the registry
(helpers.exercises), its solution passing its check, its stub failing it, every known mistake caught,
and the exercise notebooks in sync with the build. Generic: new exercises are covered as they are added.
"""
from __future__ import annotations

import ast
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.exercises import EXERCISES, ExerciseFailed, build, compare
from helpers.exercises.core import run_cases

HEADING = re.compile(r"^### Exercise (\d\d\.\d+) · \S")
LEVELS = re.compile(r"^Difficulty [●○]{5} · Importance [●○]{5}$", re.M)


def _cells():
    """[(notebook name, exercise id, the exercise's code cell source, the markdown cell before it)]."""
    out = []
    for path in build.solved_notebooks():
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            ex_id = build.exercise_id(cell)
            if ex_id is not None:
                before = build._source(cells[i - 1]) if i and cells[i - 1]["cell_type"] == "markdown" else ""
                out.append((path.name, ex_id, build._source(cell), before))
    return out


CELLS = _cells()
BY_ID = {ex_id: (nb, src) for nb, ex_id, src, _ in CELLS}


def _defs(source: str, name: str):
    """The function `name` defined by a cell: only the cell's function definitions are executed (its
    check call needs the notebook's variables), in a namespace with torch, np and F."""
    tree = ast.parse(source)
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef)], type_ignores=[])
    ns = {"torch": torch, "np": np, "F": F}
    exec(compile(module, f"<exercise {name}>", "exec"), ns)
    if name not in ns:
        raise AssertionError(f"the cell defines no function {name}()")
    return ns[name]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The cases are tiny (a few tokens through the model, matrices of a few hundred numbers): one thread
    does them as fast as two on a quiet machine, and several times faster on a busy one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model_for(ex, request):
    return request.getfixturevalue("model") if ex.model_cases is not None else None


# ---- (a) the notebooks and the registry agree ----------------------------------------------------
def test_every_exercise_is_in_exactly_one_cell():
    ids = [ex_id for _, ex_id, _, _ in CELLS]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"exercises in more than one cell: {dupes}"
    assert set(ids) == set(EXERCISES), (f"in the notebooks but not registered: {sorted(set(ids) - set(EXERCISES))}; "
                                        f"registered but in no notebook: {sorted(set(EXERCISES) - set(ids))}")


def test_exercises_are_numbered_in_order():
    per_notebook = {}
    for nb, ex_id, _, _ in CELLS:
        per_notebook.setdefault(nb, []).append(ex_id)
    for nb, ids in per_notebook.items():
        want = [f"{nb[:2]}.{k}" for k in range(1, len(ids) + 1)]
        assert ids == want, f"{nb}: exercises {ids}, expected {want} (numbered by notebook, in order)"


@pytest.mark.parametrize("nb,ex_id,source,before", CELLS, ids=[c[1] for c in CELLS])
def test_cell_form(nb, ex_id, source, before):
    ex = EXERCISES[ex_id]
    m = HEADING.match(before)
    assert m and m.group(1) == ex_id, f"{nb}: the cell before exercise {ex_id} must be markdown starting " \
                                      f"'### Exercise {ex_id} · <title>', not {before[:60]!r}"
    assert LEVELS.search(before), f"{nb}: exercise {ex_id}'s markdown needs a 'Difficulty ●●○○○ · Importance ●●●○○' line"
    assert re.search(rf"^def {ex.name}\(", source, re.M), f"{nb}: exercise {ex_id}'s cell does not define {ex.name}()"
    assert re.search(rf"""check\(\s*["']{re.escape(ex_id)}["']\s*,\s*{ex.name}\b""", source), \
        f"{nb}: exercise {ex_id}'s cell must call check({ex_id!r}, {ex.name}, real=...)"
    build.stub_source(source, ex_id)  # the solution markers are well formed


def test_every_exercise_is_checkable():
    no_cases = [i for i, ex in EXERCISES.items() if ex.random_cases is None and ex.model_cases is None]
    assert not no_cases, f"exercises the test cannot check (neither random_cases nor model_cases): {no_cases}"


def _markdown(path) -> list[str]:
    return [build._source(c) for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "markdown"]


def test_a_course_of_exercises():
    """Enough exercises to make a reader an SAE researcher: at least 30, at least four hard ones
    (difficulty 4 or 5 of 5), and no notebook without one."""
    difficulty = {ex_id: LEVELS.search(before).group(0).split(" · ")[0].count("●")
                  for _, ex_id, _, before in CELLS if LEVELS.search(before)}
    assert len(EXERCISES) >= 30, f"{len(EXERCISES)} exercises; the course has at least 30"
    hard = sorted(i for i, d in difficulty.items() if d >= 4)
    assert len(hard) >= 4, f"exercises at difficulty 4-5: {hard}; the course has at least four"
    assert {nb[:2] for nb, *_ in CELLS} == {p.name[:2] for p in build.solved_notebooks()}


@pytest.mark.parametrize("path", build.solved_notebooks(), ids=lambda p: p.name[:2])
def test_every_notebook_asks_a_prediction_and_an_exploration(path):
    """Besides the checked exercises, each notebook asks the reader to predict before a cell runs (the next
    cells reveal the answer) and leaves an open-ended exploration."""
    md = _markdown(path)
    assert any(re.search(r"predict before you run", m, re.I) for m in md), \
        f"{path.name}: no markdown cell asking 'Predict before you run'"
    assert any(re.search(r"^(#+ |\*\*)[^\n]*\bExplore\b", m, re.M) for m in md), \
        f"{path.name}: no 'Explore' task (a markdown heading or bold line naming it)"


# ---- (b) solutions pass, (c) stubs fail, (d) mistakes are caught ---------------------------------
@pytest.mark.parametrize("ex_id", sorted(BY_ID))
def test_solution_passes(ex_id, request):
    ex = EXERCISES[ex_id]
    fn = _defs(BY_ID[ex_id][1], ex.name)
    assert run_cases(ex, fn, model=_model_for(ex, request)) > 0


@pytest.mark.parametrize("ex_id", sorted(BY_ID))
def test_stub_fails(ex_id, request):
    ex = EXERCISES[ex_id]
    stub = build.stub_source(BY_ID[ex_id][1], ex_id)
    assert f'raise NotImplementedError("Exercise {ex_id}: write this function")' in stub
    fn = _defs(stub, ex.name)
    with pytest.raises(ExerciseFailed, match="not written yet"):
        run_cases(ex, fn, model=_model_for(ex, request))


MISTAKES = [(i, j) for i, ex in sorted(EXERCISES.items()) for j in range(len(ex.mistakes))]


@pytest.mark.parametrize("ex_id,j", MISTAKES, ids=[f"{i}-{j}" for i, j in MISTAKES])
def test_mistake_is_caught(ex_id, j, request):
    """A known wrong variant fails the check, and the message names its cause (unless it raised)."""
    ex = EXERCISES[ex_id]
    wrong, cause = ex.mistakes[j]
    with pytest.raises(ExerciseFailed) as info:
        run_cases(ex, wrong, model=_model_for(ex, request))
    msg = str(info.value)
    assert cause in msg or " raised " in msg, f"the check caught mistake {j} but names another cause:\n{msg}"


# ---- (e) the exercise notebooks are what the build writes ---------------------------------------
def test_exercise_notebooks_in_sync():
    problems = build.stale()
    assert not problems, "run `python -m helpers.exercises.build`:\n" + "\n".join(problems)


def test_build_form(tmp_path):
    """Stubs at the body's indentation, the solution revealed below, other cells copied, outputs
    cleared, and the same bytes every time."""
    solved = {"cells": [
        {"cell_type": "markdown", "id": "a", "metadata": {}, "source": ["# Title"]},
        {"cell_type": "code", "execution_count": 3, "id": "b", "metadata": {}, "outputs": [{"output_type": "stream",
         "name": "stdout", "text": ["hi\n"]}], "source": ["x = 1"]},
        {"cell_type": "code", "execution_count": 4, "id": "c", "metadata": {}, "outputs": [], "source": [
            "# Exercise 01.1\n", "def f(x):\n", '    """Doc."""\n', "    # BEGIN SOLUTION\n", "    y = x + 1\n",
            "    return y\n", "    # END SOLUTION\n", "\n", "\n", 'check("01.1", f, real=dict(x=1))']},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "01_x.ipynb").write_text(json.dumps(solved))
    first = build.build(tmp_path)
    assert first == build.build(tmp_path)
    nb = json.loads(first[tmp_path / "exercises" / "01_x.ipynb"])
    cells = nb["cells"]
    assert [c["id"] for c in cells] == ["a", "b", "c", "c-solution"]
    assert cells[1]["outputs"] == [] and cells[1]["execution_count"] is None and cells[1]["source"] == ["x = 1"]
    assert "".join(cells[2]["source"]) == ('# Exercise 01.1\ndef f(x):\n    """Doc."""\n'
                                           '    raise NotImplementedError("Exercise 01.1: write this function")\n'
                                           '\n\ncheck("01.1", f, real=dict(x=1))')
    sol = "".join(cells[3]["source"])
    assert cells[3]["cell_type"] == "markdown" and sol.startswith("<details><summary>Solution</summary>\n\n```python\n")
    assert "    y = x + 1\n    return y\n" in sol and "BEGIN SOLUTION" not in sol and sol.endswith("```\n\n</details>")
    here = tmp_path.name  # the stale() lines name paths from the notebooks folder's parent
    assert build.stale(tmp_path) == [f"{here}/exercises/01_x.ipynb: missing"]
    (tmp_path / "exercises").mkdir()
    (tmp_path / "exercises" / "01_x.ipynb").write_text(first[tmp_path / "exercises" / "01_x.ipynb"])
    assert build.stale(tmp_path) == []
    (tmp_path / "01_x.ipynb").write_text(json.dumps(solved).replace("y = x + 1", "y = x + 2"))
    assert build.stale(tmp_path) == [f"{here}/exercises/01_x.ipynb: out of date with {here}/01_x.ipynb"]


def test_build_refuses_broken_markers():
    with pytest.raises(build.BuildError, match="without an"):
        build.stub_source("# Exercise 01.1\ndef f():\n    # BEGIN SOLUTION\n    return 1\n", "01.1")
    with pytest.raises(build.BuildError, match="no # BEGIN SOLUTION"):
        build.stub_source("# Exercise 01.1\ndef f():\n    return 1\n", "01.1")


# ---- what the checker says -----------------------------------------------------------------------
def test_compare_messages():
    a = torch.arange(12.0).reshape(3, 4)
    assert compare(a, a.clone()) is None
    assert "shape [4, 3], expected [3, 4] (transposed?)" in compare(a.T, a)
    assert "one dimension fewer" in compare(a.sum(0), a)
    b = a.clone()
    b[1, 2] += 1
    msg = compare(b, a)
    assert "1 of 12 values differ" in msg and "first at [1, 2]: got 7, expected 6" in msg
    assert "every value is 2 × the expected one" in compare(2 * (a + 1), a + 1)
    assert "the sign is flipped" in compare(-(a + 1), a + 1)
    assert "you return all zeros" in compare(torch.zeros(3, 4), a + 1)
    assert "NaN at [0, 0]" in compare(torch.full((3, 4), float("nan")), a)
    assert compare((a, 1.0), (a, 1.0)) is None
    assert compare((a, 24.0), (a, 1.0)) == "output[1]: got 24, expected 1 (24 × the expected value)"
    assert "first at [1]: got True, expected False" in compare(torch.tensor([0, 1, 1]) > 0, torch.tensor([0, 0, 1]) > 0)


def test_jupyter_shows_the_message_not_the_checker():
    """In Jupyter a failed check shows its message (IPython's _render_traceback_), not frames of the checker;
    an error raised by the reader's function keeps the reader's own frame."""
    def no_relu(x, W_enc, b_enc, W_dec, b_dec):
        codes = (x - b_dec) @ W_enc.T + b_enc
        return codes, codes @ W_dec + b_dec

    def broken(x, W_enc, b_enc, W_dec, b_dec):
        return x @ W_enc  # wrong shapes: raises in the reader's code

    with pytest.raises(ExerciseFailed) as info:
        run_cases(EXERCISES["02.1"], no_relu)
    shown = "\n".join(info.value._render_traceback_())
    assert "likely cause: the ReLU is left out" in shown and "core.py" not in shown, shown
    with pytest.raises(ExerciseFailed) as info:
        run_cases(EXERCISES["02.1"], broken)
    shown = "\n".join(info.value._render_traceback_())
    assert "raised RuntimeError" in shown and "in broken" in shown and "return x @ W_enc" in shown, shown
