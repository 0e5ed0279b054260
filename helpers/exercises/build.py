"""Write the exercise versions of the notebooks from the solved ones: ``python -m helpers.exercises.build``.

The solved notebooks (``notebooks/NN_*.ipynb``, what the tests run) are the one source. In each, an exercise
is a code cell whose first line is ``# Exercise NN.k``, holding a function whose body lies between a
``# BEGIN SOLUTION`` and an ``# END SOLUTION`` line. The exercise version (``notebooks/exercises/NN_*.ipynb``)
is the same notebook with every such body replaced by
``raise NotImplementedError("Exercise NN.k: write this function")`` at the body's indentation, followed by
a markdown cell that reveals the solved cell (``<details><summary>Solution</summary>`` and a python code
block, which JupyterLab and Colab render as a collapsed section). Every other cell is copied unchanged;
outputs and execution counts are cleared. The output depends on the input alone: the same solved
notebook gives the same bytes, and the added cells' ids are derived from their exercise cell's id.
notebooks/exercises/ holds generated files only: an exercise notebook whose solved notebook is gone is
removed.

``python -m helpers.exercises.build --check`` writes nothing: it exits with status 1, naming each exercise
notebook that is missing, out of date or left over, if the committed versions differ from what the build
would write (the test suite runs it).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

from helpers.settings.paths import NOTEBOOKS_DIR

EXERCISES_DIR = NOTEBOOKS_DIR / "exercises"
HEADER = re.compile(r"^# Exercise (\d\d\.\d+)\s*$")
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"


class BuildError(ValueError):
    """A solved notebook's exercise cell is not in the expected form."""


def solved_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The solved notebooks, in order (notebooks/NN_*.ipynb)."""
    return sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _lines(text: str) -> list[str]:
    """A cell source in the notebook's own form: a list of lines, each but the last ending in a newline."""
    return text.splitlines(keepends=True)


def exercise_id(cell) -> str | None:
    """The exercise id of a code cell whose first line is ``# Exercise NN.k``, else None."""
    if cell.get("cell_type") != "code":
        return None
    first = _source(cell).split("\n", 1)[0]
    m = HEADER.match(first)
    return m.group(1) if m else None


def stub_source(source: str, ex_id: str) -> str:
    """The cell's source with each solution block (marker lines included) replaced by a
    ``raise NotImplementedError`` at the markers' indentation."""
    out, inside, indent, blocks = [], False, "", 0
    for n, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise BuildError(f"exercise {ex_id}: line {n}: {BEGIN} inside another solution block")
            inside, indent, blocks = True, line[: len(line) - len(line.lstrip())], blocks + 1
            out.append(f'{indent}raise NotImplementedError("Exercise {ex_id}: write this function")')
        elif stripped == END:
            if not inside:
                raise BuildError(f"exercise {ex_id}: line {n}: {END} without a {BEGIN}")
            if line[: len(line) - len(line.lstrip())] != indent:
                raise BuildError(f"exercise {ex_id}: line {n}: {END} is not indented like its {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise BuildError(f"exercise {ex_id}: {BEGIN} without an {END}")
    if not blocks:
        raise BuildError(f"exercise {ex_id}: no {BEGIN} / {END} block in the cell")
    return "\n".join(out)


def solution_source(source: str) -> str:
    """The solved cell without its marker lines."""
    return "\n".join(line for line in source.split("\n") if line.strip() not in (BEGIN, END))


def solution_markdown(source: str) -> str:
    return ("<details><summary>Solution</summary>\n\n```python\n" + solution_source(source).rstrip("\n")
            + "\n```\n\n</details>")


def _cleared(cell) -> dict:
    cell = copy.deepcopy(cell)
    if cell.get("cell_type") == "code":
        cell["outputs"] = []
        cell["execution_count"] = None
    return cell


def exercise_notebook(nb: dict, name: str = "notebook") -> dict:
    """The exercise version of a solved notebook (a dict in nbformat 4's JSON form)."""
    out = {k: copy.deepcopy(v) for k, v in nb.items() if k != "cells"}
    cells, seen = [], set()
    for i, cell in enumerate(nb["cells"]):
        ex_id = exercise_id(cell)
        cell = _cleared(cell)
        if ex_id is None:
            cells.append(cell)
            continue
        if ex_id in seen:
            raise BuildError(f"{name}: exercise {ex_id} appears twice")
        seen.add(ex_id)
        source = _source(cell)
        cell["source"] = _lines(stub_source(source, ex_id))
        cells.append(cell)
        base = cell.get("id") or f"exercise-{ex_id.replace('.', '-')}"
        cells.append({"cell_type": "markdown", "id": f"{base}-solution"[:64], "metadata": {},
                      "source": _lines(solution_markdown(source))})
    out["cells"] = cells
    ids = [c["id"] for c in cells if "id" in c]
    if len(ids) != len(set(ids)):
        raise BuildError(f"{name}: duplicate cell ids in the exercise version")
    return out


def dumps(nb: dict) -> str:
    """nbformat's own JSON layout (what Jupyter writes), so the same input gives the same bytes."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def build(notebooks_dir: Path = NOTEBOOKS_DIR, out_dir: Path | None = None) -> dict[Path, str]:
    """{exercise notebook path: its text} for every solved notebook (nothing written)."""
    notebooks_dir = Path(notebooks_dir)
    out_dir = notebooks_dir / "exercises" if out_dir is None else Path(out_dir)
    result = {}
    for path in solved_notebooks(notebooks_dir):
        nb = json.loads(path.read_text(encoding="utf-8"))
        result[out_dir / path.name] = dumps(exercise_notebook(nb, path.name))
    return result


def stale(notebooks_dir: Path = NOTEBOOKS_DIR, out_dir: Path | None = None) -> list[str]:
    """What differs between the committed exercise notebooks and the build's: one line each."""
    notebooks_dir = Path(notebooks_dir)
    out_dir = notebooks_dir / "exercises" if out_dir is None else Path(out_dir)
    want = build(notebooks_dir, out_dir)
    problems = []
    for path, text in want.items():
        if not path.exists():
            problems.append(f"{path.relative_to(notebooks_dir.parent)}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.relative_to(notebooks_dir.parent)}: out of date with "
                            f"{(notebooks_dir / path.name).relative_to(notebooks_dir.parent)}")
    for path in sorted(out_dir.glob("*.ipynb")) if out_dir.exists() else []:
        if path not in want:
            problems.append(f"{path.relative_to(notebooks_dir.parent)}: no solved notebook of that name")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.exercises.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the exercise notebooks differ from what the build would write")
    args = ap.parse_args(argv)
    if args.check:
        problems = stale()
        if problems:
            print("exercise notebooks out of date (run `python -m helpers.exercises.build`):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(f"exercise notebooks up to date ({len(solved_notebooks())} notebooks)")
        return 0
    EXERCISES_DIR.mkdir(parents=True, exist_ok=True)
    want = build()
    for path, text in want.items():
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old != text:
            path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(NOTEBOOKS_DIR.parent)}: {'unchanged' if old == text else 'written'}")
    for path in sorted(EXERCISES_DIR.glob("*.ipynb")):
        if path not in want:  # its solved notebook was renamed or removed: the folder holds generated files only
            path.unlink()
            print(f"{path.relative_to(NOTEBOOKS_DIR.parent)}: removed (no solved notebook of that name)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
