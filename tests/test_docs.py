"""The README is a reader's page and docs/ holds the rest: the README stays short, names the install and
the test command that `.ci/run` runs, links every notebook and exercise notebook with a Colab badge; no
page in README.md or docs/*.md cites issue numbers, and every relative link points to a file that exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 220
DOCS = {"results.md", "performance.md", "design.md", "colab.md", "testing.md", "research.md"}
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB = "https://colab.research.google.com/github/sae-workbook/sae-workbook/blob/main/"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")          # [text](target); an image's ![alt](src) too
ISSUE = re.compile(r"\bissues?\s*#?\d+", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)     # https:, mailto:, ...


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
