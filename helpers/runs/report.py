"""docs/results.md from the executed notebooks: every result cell of every run, with where it ran.

    python -m helpers.runs.report --profile cpu --profile test --out docs/results.md
    python -m helpers.runs.report --profile test              # to stdout
    python -m helpers.runs.report --profile cpu=/data/cache --profile test   # a profile's runs in another cache

A notebook marks a code cell as a result by its cell metadata ``"results": "<title>"``. For each profile
and notebook, the report reads the executed copy that `helpers.runs.run_all` wrote to
<cache>/<profile>/runs/<notebook>.ipynb (cache: $SAE_CACHE, see helpers.settings.paths) and the
repository's notebooks/0*.ipynb, and copies the output of each result cell: the cells are the ones the
repository's notebook tags (its title wins, so an older run still shows the cells tagged now) and
those the executed copy tags, matched by cell ``id``. An output shows as its ``text/markdown`` (typed
results carry one, see helpers.results), else an HTML table converted to a markdown table with the
sentences around it, else its ``text/plain`` in a fence. Each notebook's section opens with its run's
provenance (profile, commit, date, machine, command; `helpers.runs.run_all.Provenance`), or says it was
not recorded and gives the executed file's date. A profile or notebook that was not run is named, with
the command that runs it. The output depends only on the files read, so regenerating without new runs
changes nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from bs4 import BeautifulSoup, NavigableString, Tag

from helpers.results import markdown_table
from helpers.runs.run_all import RUN_KEY, RUNS, Provenance, duration, reproduce_command
from helpers.settings.paths import NOTEBOOKS_DIR, cache_root

RESULTS_KEY = "results"              # the cell metadata key naming a result cell's title
PROFILES = ("cpu", "test")           # the profiles reported when none is named
COMMAND = "python -m helpers.runs.report --profile cpu --profile test --out docs/results.md"
MAX_PLAIN = 4000                     # characters of a text/plain output kept

HEADER = f"""# Results

This page is generated: it collects the key result of each notebook (the cells tagged as results) from
the executed notebooks of a run, with where and how that run was made. Do not edit it by hand;
regenerate it with

```bash
{COMMAND}
```

after running the notebooks (`SAE_PROFILE=<profile> python -m helpers.runs.run_all`, which writes the
executed copies to `<cache>/<profile>/runs/`). The profiles differ in model, corpus, number of tokens and
training budget, so each gives other numbers, and a verdict can differ between them: a figure here is
true of the run named above it. The notebooks print their conclusions from their own run's numbers, and
each discusses what its findings mean in its closing section, "What we learned, what is open".
"""


# --------------------------------------------------------------------------- HTML to markdown

def _text(node) -> str:
    return " ".join(node.get_text(" ").split()) if isinstance(node, Tag) else " ".join(str(node).split())


def html_table_to_markdown(table: Tag) -> str:
    """One HTML <table> (e.g. a pandas DataFrame's) as a markdown table. Header rows (in <thead>, or
    rows of <th> only before the first data row) are joined per column; colspans are spread."""
    def cells(tr):
        out = []
        for c in tr.find_all(["th", "td"], recursive=False):
            out += [_text(c)] * max(1, int(c.get("colspan", 1) or 1))
        return out

    rows = table.find_all("tr")
    head, body = [], []
    for tr in rows:
        in_head = tr.find_parent("thead") is not None
        only_th = not tr.find_all("td", recursive=False)
        (head if (in_head or (only_th and not body)) else body).append(cells(tr))
    width = max([len(r) for r in head + body] or [0])
    if not width:
        return ""
    pad = lambda r: r + [""] * (width - len(r))  # noqa: E731
    columns = []
    for j in range(width):
        parts = [pad(r)[j] for r in head]
        parts = [p for i, p in enumerate(parts) if p and p not in parts[:i]]
        columns.append(" ".join(parts))
    if not any(columns) and body:
        columns, body = pad(body[0]), body[1:]
    keys = [f"{j}" for j in range(width)]
    table_md = markdown_table([dict(zip(keys, pad(r))) for r in body], keys) if body else \
        "| " + " | ".join(keys) + " |\n|" + "---|" * width
    lines = table_md.splitlines()
    lines[0] = "| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |"
    return "\n".join(lines)


def html_to_markdown(html: str) -> str:
    """An HTML output as markdown: tables as markdown tables, list items as bullets, bold or heading text
    in bold, other text as paragraphs; styles and scripts dropped."""
    soup = BeautifulSoup(html, "html.parser")
    blocks: list[str] = []

    def walk(node):
        for child in node.children:
            if isinstance(child, NavigableString):
                if type(child) is NavigableString and _text(child):
                    blocks.append(_text(child))
                continue
            if not isinstance(child, Tag) or child.name in ("style", "script"):
                continue
            if child.name == "table":
                blocks.append(html_table_to_markdown(child))
            elif child.name in ("ul", "ol"):
                items = [_text(li) for li in child.find_all("li")]
                blocks.append("\n".join(f"* {t}" for t in items if t))
            elif child.name in ("b", "strong", "h1", "h2", "h3", "h4", "h5", "h6"):
                if _text(child):
                    blocks.append(f"**{_text(child)}**")
            elif child.name in ("p", "span", "i", "em", "code", "a", "pre"):
                if child.find("table"):
                    walk(child)
                elif _text(child):
                    blocks.append(_text(child))
            else:
                walk(child)

    walk(soup)
    return "\n\n".join(b for b in blocks if b)


# --------------------------------------------------------------------------- cell outputs

def _source(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _fence(text: str) -> str:
    text = text.rstrip("\n")
    if len(text) > MAX_PLAIN:
        text = text[:MAX_PLAIN] + "\n…"
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text}\n{ticks}"


# The cache's notice that it recomputes a result (helpers.settings.paths): about this run, not a result.
CACHE_NOTICE = re.compile(r"^\S+: computing again, since .*\n?", re.M)


def output_markdown(output) -> str:
    """One output of a code cell as markdown ("" for one with nothing to show, such as stderr)."""
    kind = output.get("output_type")
    if kind == "stream":
        text = CACHE_NOTICE.sub("", _source(output.get("text", "")))
        return _fence(text) if output.get("name") == "stdout" and text.strip() else ""
    if kind == "error":
        return f"*The cell failed: {output.get('ename', '')}: {' '.join(str(output.get('evalue', '')).split())}*"
    data = output.get("data", {})
    if any(k.startswith("application/vnd.jupyter.widget") for k in data):
        return ""  # a progress bar or other widget: its text is a snapshot, not a result
    if "text/markdown" in data:
        return _source(data["text/markdown"]).strip()
    if "text/html" in data and "<table" in _source(data["text/html"]):
        return html_to_markdown(_source(data["text/html"]))
    if any(k.startswith("image/") for k in data):
        return "*(a figure: see the executed notebook)*"
    if "text/plain" in data:
        return _fence(_source(data["text/plain"]))
    if "text/html" in data:
        return html_to_markdown(_source(data["text/html"]))
    return ""


def cell_markdown(cell) -> str:
    parts = [output_markdown(o) for o in cell.get("outputs", [])]
    parts = [p for p in parts if p]
    return "\n\n".join(parts) if parts else "*(no output in this run)*"


# --------------------------------------------------------------------------- notebooks and runs

@dataclass
class ResultCell:
    """A result cell of a run: its title, id, and its output as markdown ("" when the run lacks it)."""
    title: str
    id: str
    markdown: str = ""
    in_run: bool = True


@dataclass
class NotebookReport:
    """One notebook of one profile: its provenance (None: not recorded), the executed file's date, and
    its result cells."""
    name: str
    profile: str
    provenance: Provenance | None = None
    file_date: str = ""
    cells: list[ResultCell] = field(default_factory=list)

    def provenance_line(self) -> str:
        p = self.provenance
        command = reproduce_command(self.profile, self.name)
        if p is None:
            return (f"*Run:* profile `{self.profile}`; commit, machine and wall time not recorded; "
                    f"executed file dated {self.file_date}; rerun with `{command}`.")
        return (f"*Run:* profile `{p.profile}`, commit `{p.commit}`, {p.date}, {p.machine_text()}; "
                f"{duration(p.seconds) or 'wall time not recorded'}, {p.status or 'status not recorded'}; "
                f"rerun with `{p.command or command}`.")

    def markdown(self) -> str:
        out = [f"### {self.name}", "", self.provenance_line(), ""]
        if not self.cells:
            out += ["No cell of this notebook is tagged as a result.", ""]
        for c in self.cells:
            out += [f"#### {c.title}", ""]
            out += [c.markdown if c.in_run else
                    f"*This cell is not in the executed copy (an older run): rerun with "
                    f"`{reproduce_command(self.profile, self.name)}`.*", ""]
        return "\n".join(out)


def tagged(nb) -> dict[str, str]:
    """{cell id: title} of the code cells of `nb` with a "results" title in their metadata."""
    return {c.get("id", ""): str(c.metadata[RESULTS_KEY]) for c in nb.cells
            if c.cell_type == "code" and c.metadata.get(RESULTS_KEY) and c.get("id")}


def _file_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def provenance_of(executed, runs: dict, name: str) -> Provenance | None:
    """The run's provenance: the executed notebook's metadata, else runs.json's record, else None."""
    for record in (executed.metadata.get(RUN_KEY), runs.get(name)):
        if isinstance(record, dict):
            try:
                return Provenance.from_dict(dict(record))
            except (TypeError, ValueError, KeyError):
                continue
    return None


def notebook_report(repo_path: Path, executed_path: Path, profile: str, runs: dict | None = None) -> NotebookReport:
    """The result cells of one executed notebook: the cells tagged in the repository's notebook at
    `repo_path` (their titles) and in the executed copy, in the executed copy's order, then the tagged
    cells the executed copy lacks."""
    repo = nbformat.read(repo_path, as_version=4) if repo_path.exists() else None
    executed = nbformat.read(executed_path, as_version=4)
    want = tagged(repo) if repo is not None else {}
    report = NotebookReport(repo_path.stem, profile, provenance_of(executed, runs or {}, repo_path.stem),
                            _file_date(executed_path))
    seen = set()
    for cell in executed.cells:
        cid = cell.get("id", "")
        title = want.get(cid) or (str(cell.metadata.get(RESULTS_KEY)) if cell.cell_type == "code"
                                  and cell.metadata.get(RESULTS_KEY) else None)
        if title:
            seen.add(cid)
            report.cells.append(ResultCell(title, cid, cell_markdown(cell)))
    report.cells += [ResultCell(t, cid, in_run=False) for cid, t in want.items() if cid not in seen]
    return report


def _runs_json(folder: Path) -> dict:
    try:
        runs = json.loads((folder / RUNS).read_text())
        return runs if isinstance(runs, dict) else {}
    except (OSError, ValueError):
        return {}


def profile_markdown(profile: str, cache: Path, notebooks_dir: Path = NOTEBOOKS_DIR) -> str:
    """The section of one profile: each repository notebook's run, or how to make the missing ones."""
    folder = cache / profile / "runs"
    repo = sorted(notebooks_dir.glob("0*_*.ipynb"))
    executed = {p.stem for p in folder.glob("0*_*.ipynb")} if folder.is_dir() else set()
    out = [f"## Profile `{profile}`", ""]
    if not executed:
        return "\n".join(out + [f"No executed notebooks of this profile: run `SAE_PROFILE={profile} python -m "
                                f"helpers.runs.run_all`, then regenerate this page.", ""])
    runs = _runs_json(folder)
    names = sorted({p.stem for p in repo} | executed)
    for name in names:
        if name not in executed:
            out += [f"### {name}", "", f"Not run on this profile: run `{reproduce_command(profile, name)}`, "
                    "then regenerate this page.", ""]
            continue
        try:
            out.append(notebook_report(notebooks_dir / f"{name}.ipynb", folder / f"{name}.ipynb", profile,
                                       runs).markdown())
        except (OSError, ValueError, nbformat.reader.NotJSONError) as e:  # e.g. a copy being written
            out += [f"### {name}", "", f"The executed copy could not be read ({type(e).__name__}); rerun with "
                    f"`{reproduce_command(profile, name)}`, then regenerate this page.", ""]
    return "\n".join(out)


def report(profiles=PROFILES, cache: Path | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> str:
    """The whole page: the header, then each profile's section. A profile given as "name=folder" is read
    from that cache folder instead of `cache` (default: $SAE_CACHE, else cache/)."""
    body = [HEADER]
    for spec in dict.fromkeys(profiles):
        name, _, folder = str(spec).partition("=")
        root = Path(folder) if folder else (cache_root() if cache is None else Path(cache))
        body.append(profile_markdown(name, root, notebooks_dir))
    return "\n".join(body).rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="append", default=None,
                    help=f"a profile to report, or NAME=CACHE_FOLDER for one whose runs are in another cache "
                         f"(repeat for several; default: {' and '.join(PROFILES)})")
    ap.add_argument("--out", default=None, help="the file to write (default: print)")
    ap.add_argument("--cache", default=None, help="the cache folder (default: $SAE_CACHE, else cache/)")
    a = ap.parse_args(argv)
    text = report(a.profile or PROFILES, None if a.cache is None else Path(a.cache))
    if a.out is None:
        sys.stdout.write(text)
    else:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
