"""The notebooks as a course: each opens with what the reader will learn and how long it takes, closes with
what was learned and what is open, and links the papers it rests on."""
from __future__ import annotations

import json
import re

import pytest

from helpers.exercises import build

NOTEBOOKS = build.solved_notebooks()


def _markdown(path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [build._source(c) for c in cells if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_opens_with_objectives_and_time(path):
    opening = "\n".join(_markdown(path)[:3])
    assert re.search(r"you will", opening, re.I), f"{path.name}: the opening states no learning objectives"
    assert re.search(r"\b\d+\s*(min|minutes|hours?)\b", opening), f"{path.name}: the opening gives no time"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_closes_with_what_we_learned(path):
    md = _markdown(path)
    at = [i for i, m in enumerate(md) if re.search(r"^## .*What we learned", m, re.M)]
    assert at, f"{path.name}: no section 'What we learned, what is open'"
    closing = "\n".join(md[at[0]:])
    assert re.search(r"https://(arxiv\.org|transformer-circuits\.pub)/", closing), \
        f"{path.name}: the closing section links no paper"


def test_the_workbook_ends_with_a_synthesis():
    md = "\n".join(_markdown(NOTEBOOKS[-1]))
    assert re.search(r"^#+ .*(synthesis|across the workbook)", md, re.M | re.I), \
        f"{NOTEBOOKS[-1].name}: no closing synthesis across the workbook"
