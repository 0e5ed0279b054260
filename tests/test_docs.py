"""The README is a reader's page and docs/ holds the rest: the README stays short, names the install and
the test command that `.ci/run` runs and the command that generates docs/results.md, links every notebook
and exercise notebook with a Colab badge; no page in README.md or docs/*.md cites issue numbers, and every
relative link points to a file that exists. The solved notebooks' markdown types no number of a run
(those are printed by the code from the run the reader is looking at)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200
DOCS = {"results.md", "performance.md", "design.md", "colab.md", "testing.md", "research.md"}
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB = "https://colab.research.google.com/github/sae-workbook/sae-workbook/blob/main/"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")          # [text](target); an image's ![alt](src) too
ISSUE = re.compile(r"\bissues?\s*#?\d+", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)     # https:, mailto:, ...
GENERATOR = "python -m helpers.runs.report"
CITES = re.compile(r"et al\.|arxiv\.org|doi\.org", re.I)
NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?![\w]|[.,]\d)")


def relative_links(page: Path) -> list[str]:
    """Every link target of a markdown page that is a path in this repository, its #anchor stripped."""
    targets = [t for t in LINK.findall(page.read_text()) if not EXTERNAL.match(t) and not t.startswith("#")]
    return [t.split("#", 1)[0] for t in targets]


def ci_commands() -> dict[str, str]:
    """The install and the test command that .ci/run runs, as it writes them."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = [line for line in lines if line.startswith("bash install.sh")]
    test = [line for line in lines if line.startswith("pytest ")]
    assert len(install) == 1 and len(test) == 1, ".ci/run should have one install and one test command"
    return {"install": install[0], "test": test[0]}


def shell_blocks(page: Path) -> list[str]:
    """The lines of the page's ```bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


def notebooks() -> list[str]:
    """Every notebook and exercise notebook, as a path from the repository root."""
    found = [*sorted((ROOT / "notebooks").glob("0*_*.ipynb")),
             *sorted((ROOT / "notebooks" / "exercises").glob("0*_*.ipynb"))]
    return [str(p.relative_to(ROOT)) for p in found]


def significant_digits(number: str) -> int:
    """Significant digits of a number as written: 0.123 and 98.1 have 3, 2,577 has 4, 20,000 has 1."""
    digits = number.replace(",", "")
    if "." in digits:
        return len(digits.replace(".", "").lstrip("0"))
    return len(digits.strip("0"))


def exempt(number: str, before: str) -> bool:
    """Whether a number is a fixed fact rather than a measurement: an exercise id (02.3), a year, an arXiv
    id (2309.08600), or a power of two."""
    if re.fullmatch(r"0\d\.\d+", number) or re.search(r"Exercise\s+$", before):
        return True
    if re.fullmatch(r"\d{4}\.\d{4,5}", number):
        return True
    if re.fullmatch(r"\d+", number.replace(",", "")):
        n = int(number.replace(",", ""))
        return 1900 <= n <= 2099 and "," not in number or (n > 0 and n & (n - 1) == 0)
    return False


def measured_numbers(markdown: str) -> list[str]:
    """The numbers in `markdown` that look measured: three or more significant digits (0.123, 98.1%, 12.3,
    2,577), outside code spans, code blocks, link targets and URLs, in paragraphs that cite nothing (a
    paragraph with "et al." or an arXiv or DOI link quotes the literature), and not `exempt`."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    found = []
    for para in re.split(r"\n\s*\n", text):
        if CITES.search(para):
            continue
        para = re.sub(r"\]\([^)]*\)", "]", para)
        para = re.sub(r"`[^`]*`", "", para)
        para = re.sub(r"https?://\S+", "", para)
        for m in NUMBER.finditer(para):
            if significant_digits(m.group(1)) >= 3 and not exempt(m.group(1), para[:m.start()]):
                found.append(m.group(1))
    return found


@pytest.mark.parametrize("text, numbers", [
    ("The SAE scores 0.123 and recovers 98.1% of the loss.", ["0.123", "98.1"]),
    ("It trained in 2,577 s at 12.3 steps per second on 372 concepts.", ["2,577", "12.3", "372"]),
    ("Exercise 02.3 and exercise 03.12 (Bricken-style).", []),
    ("Round numbers: 20,000 tokens, 100 features, 0.5 and 0.25 and 1.5e-3.", []),
    ("Powers of two: 4096 latents, 1,024 tokens, 512, 128. Years: 1961, 2023.", []),
    ("The paper reports 0.837 (Cunningham et al. 2023).", []),
    ("See [the paper](https://arxiv.org/abs/2309.08600): 0.837.", []),
    ("In code: `d_sae = 1152`, `0.123`; a link [here](notebooks/x_0.123.ipynb).", []),
    ("A version 2.13.0 and a url https://x.org/1234.5678 are not measured.", []),
    ("```python\nx = 0.123\n```\n\nbut 0.456 is.", ["0.456"]),
])
def test_the_number_finder(text, numbers):
    assert measured_numbers(text) == numbers


SOLVED = sorted((ROOT / "notebooks").glob("0[1-5]_*.ipynb"))


@pytest.mark.parametrize("notebook", SOLVED, ids=lambda p: p.name)
def test_notebooks_type_no_run_numbers(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    found = {i: measured_numbers("".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"}
    found = {i: hits for i, hits in found.items() if hits}
    assert not found, (f"{notebook.name}'s markdown types numbers that look measured, by cell: {found}; print them "
                       "from the run (a typed result's verdicts or a computed Markdown cell), put a fixed fact in "
                       "a code span, or cite the paper the figure is from")


def test_the_readme_names_the_results_generator():
    assert GENERATOR in "\n".join(shell_blocks(README)), f"README.md's bash blocks should show {GENERATOR!r}"
    assert GENERATOR in (ROOT / "docs" / "results.md").read_text(), "docs/results.md should say how it is made"


def test_the_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_the_docs_pages_exist():
    names = {p.name for p in PAGES}
    missing = sorted(DOCS - names)
    assert not missing, f"docs/ lacks {missing}"


def test_the_pages_cite_no_issue_numbers():
    found = {p.relative_to(ROOT).as_posix(): ISSUE.findall(p.read_text()) for p in PAGES}
    found = {page: hits for page, hits in found.items() if hits}
    assert not found, f"issue numbers are history, not documentation: {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file(page):
    missing = [t for t in relative_links(page) if t and not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to paths that do not exist: {missing}"


def test_the_readme_names_what_ci_runs():
    commands = shell_blocks(README)
    for what, command in ci_commands().items():
        assert command in commands, f"README.md's bash blocks lack .ci/run's {what} command: {command!r}"


def test_every_notebook_has_a_colab_badge():
    paths = notebooks()
    assert len(paths) >= 10, f"expected five notebooks and five exercise notebooks, found {paths}"
    text = README.read_text()
    missing = [p for p in paths if f"[![Open In Colab]({BADGE})]({COLAB}{p})" not in text]
    assert not missing, f"README.md has no Colab badge for {missing}"
