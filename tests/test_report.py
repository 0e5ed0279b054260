"""helpers.runs.report: docs/results.md from executed notebooks, on synthetic notebooks (nbformat)."""
import dataclasses
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers.results import Estimate, Result, Table, markdown_table
from helpers.runs.report import html_to_markdown, main, notebook_report, output_markdown, report
from helpers.runs.run_all import RUN_KEY, Provenance

FRAME_HTML = """<div><style scoped>.dataframe tbody tr th {vertical-align: top;}</style>
<table border="1" class="dataframe"><thead><tr style="text-align: right;"><th></th><th>method</th>
<th>median</th></tr></thead><tbody><tr><th>0</th><td>SAE</td><td>0.137</td></tr>
<tr><th>1</th><td>random | dirs</td><td>0.133</td></tr></tbody></table></div>"""
RESULT_HTML = ("<b>Comparison</b><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td>"
               "<td>2</td></tr></tbody></table><ul><li>SAE beats random.</li><li>It holds.</li></ul>")


@dataclasses.dataclass
class Score(Result):
    name: str
    value: Estimate
    n: int

    def verdicts(self):
        return [f"{self.name} scores {self.value}: it holds."]


def cell(source, cid, outputs=(), title=None):
    c = new_code_cell(source, id=cid)
    c.outputs = list(outputs)
    if title:
        c.metadata["results"] = title
    return c


def display(data):
    return new_output("display_data", data=data)


def write(path, cells, provenance=None):
    nb = new_notebook(cells=cells)
    if provenance is not None:
        nb.metadata[RUN_KEY] = provenance.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_a_result_shows_as_a_markdown_table_and_bullets():
    md = Score("SAE", Estimate(0.5, 0.4, 0.6), 12)._repr_markdown_()
    assert md.splitlines()[:4] == ["**Score**", "", "| name | value | n |", "|---|---|---|"]
    assert "| SAE | 0.500 [0.400, 0.600] | 12 |" in md
    assert md.rstrip().endswith("* SAE scores 0.500 [0.400, 0.600]: it holds.")
    t = Table([{"a": 1.234567, "b": "x|y"}, {"a": None, "c": 3}], title="My table", notes=["A note."])
    md = t._repr_markdown_()
    assert md.startswith("**My table**") and "| a | b | c |" in md and "| 1.235 | x\\|y |  |" in md
    assert "|  |  | 3 |" in md and "* A note." in md
    assert "<table" in t._repr_html_()  # the HTML display is kept
    assert markdown_table([]) == ""


def test_html_tables_become_markdown_with_their_sentences():
    md = html_to_markdown(FRAME_HTML)
    assert md.splitlines() == ["|  | method | median |", "|---|---|---|", "| 0 | SAE | 0.137 |",
                               "| 1 | random \\| dirs | 0.133 |"]
    assert "vertical-align" not in md
    md = html_to_markdown(RESULT_HTML)
    assert md == "**Comparison**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n* SAE beats random.\n* It holds."
    multi = ("<table><thead><tr><th></th><th colspan='2'>MCC</th></tr><tr><th>m</th><th>median</th><th>mean</th>"
             "</tr></thead><tbody><tr><th>SAE</th><td>1</td><td>2</td></tr></tbody></table>")
    assert html_to_markdown(multi).splitlines()[:3] == ["| m | MCC median | MCC mean |", "|---|---|---|",
                                                        "| SAE | 1 | 2 |"]


def synthetic(tmp_path, provenance=True):
    """A repository notebook tagging cells a1 and c3 (c3 renamed since the run), an executed copy tagging
    a1 and b2 (b2 untagged in the repository since), and a cell d4 the run predates."""
    repo = write(tmp_path / "notebooks" / "03_x.ipynb", [
        new_markdown_cell("# 03"), cell("r", "a1", title="Key table"), cell("s", "b2"),
        cell("t", "c3", title="Verdicts now"), cell("u", "d4", title="Added later")])
    prov = Provenance("03_x", "test", "abc123+dirty", "2026-01-02T03:04:05+00:00",
                      {"platform": "Linux", "cpu": "Some CPU", "cores": 2, "torch": "2.0", "device": "cpu"},
                      "SAE_PROFILE=test python -m helpers.runs.run_all --only 03", 75.0, "ok")
    ex = write(tmp_path / "cache" / "test" / "runs" / "03_x.ipynb", [
        new_markdown_cell("# 03"),
        cell("r", "a1", [display({"text/html": FRAME_HTML, "text/plain": "frame"}),
                         display({"application/vnd.jupyter.widget-view+json": {}, "text/plain": "bar 0%"})],
             title="Old title"),
        cell("s", "b2", [display({"text/markdown": "**Typed**\n\n| a |\n|---|\n| 1 |"})], title="Typed result"),
        cell("t", "c3", [new_output("stream", name="stdout", text="plain words\n"),
                         new_output("stream", name="stderr", text="a warning\n"),
                         new_output("execute_result", data={"text/plain": "42"}, execution_count=1)]),
    ], prov if provenance else None)
    os.utime(ex, (1_700_000_000, 1_700_000_000))
    return repo, ex


def test_cells_are_matched_by_id_with_the_repository_titles(tmp_path):
    repo, ex = synthetic(tmp_path)
    r = notebook_report(repo, ex, "test")
    assert [(c.title, c.id, c.in_run) for c in r.cells] == [("Key table", "a1", True), ("Typed result", "b2", True),
                                                             ("Verdicts now", "c3", True), ("Added later", "d4", False)]
    md = r.markdown()
    assert "| 0 | SAE | 0.137 |" in md and "bar 0%" not in md and "frame" not in md
    assert "**Typed**\n\n| a |" in md
    assert "```text\nplain words\n```" in md and "```text\n42\n```" in md and "a warning" not in md
    assert "#### Added later" in md and "not in the executed copy" in md
    assert ("*Run:* profile `test`, commit `abc123+dirty`, 2026-01-02T03:04:05+00:00, cpu; Some CPU (2 cores); "
            "Linux; torch 2.0; 75 s, ok; rerun with `SAE_PROFILE=test python -m helpers.runs.run_all --only 03`.") in md


def test_a_run_without_provenance_says_so_and_gives_the_file_date(tmp_path):
    repo, ex = synthetic(tmp_path, provenance=False)
    md = notebook_report(repo, ex, "test").markdown()
    assert "commit, machine and wall time not recorded" in md and "2023-11-14T22:13:20+00:00" in md
    # runs.json stands in for the notebook's metadata
    prov = Provenance("03_x", "test", "fff", "2026-02-02T00:00:00+00:00", {}, "cmd", 1.0, "ok")
    md = notebook_report(repo, ex, "test", {"03_x": prov.to_dict()}).markdown()
    assert "commit `fff`" in md and "executed file dated" not in md


def test_the_page_covers_profiles_and_says_how_to_make_what_is_missing(tmp_path, capsys):
    synthetic(tmp_path)
    write(tmp_path / "notebooks" / "04_y.ipynb", [cell("x", "e5", title="Y")])
    page = report(["cpu", "test"], tmp_path / "cache", tmp_path / "notebooks")
    assert page.startswith("# Results\n") and "python -m helpers.runs.report --profile cpu" in page
    assert page.index("## Profile `cpu`") < page.index("## Profile `test`") < page.index("### 03_x")
    assert "No executed notebooks of this profile: run `SAE_PROFILE=cpu python -m helpers.runs.run_all`" in page
    assert "### 04_y\n\nNot run on this profile: run `SAE_PROFILE=test python -m helpers.runs.run_all --only 04`" in page
    header = page.split("## Profile")[0]
    assert not any(ch.isdigit() for ch in header.replace("<", "").split("```")[0])  # no numbers in the header
    assert report(["cpu", "test"], tmp_path / "cache", tmp_path / "notebooks") == page  # deterministic
    out = tmp_path / "results.md"
    assert main(["--profile", "test", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert "## Profile `test`" in out.read_text() and "## Profile `cpu`" not in out.read_text()
    # a profile read from a cache of its own; an executed copy that cannot be read is named, not fatal
    (tmp_path / "other" / "cpu" / "runs").mkdir(parents=True)
    (tmp_path / "other" / "cpu" / "runs" / "03_x.ipynb").write_text("{ torn")
    page = report(["cpu=" + str(tmp_path / "other"), "test"], tmp_path / "cache", tmp_path / "notebooks")
    cpu = page.split("## Profile `cpu`")[1].split("## Profile `test`")[0]
    assert "### 03_x\n\nThe executed copy could not be read" in cpu and "--only 03" in cpu
    assert "### 04_y\n\nNot run on this profile" in cpu and "#### Key table" in page


def test_the_cache_notices_are_left_out():
    notice = {"output_type": "stream", "name": "stdout",
              "text": "protocols-L2.pt: computing again, since the code of helpers.evals.protocols changed\n"}
    assert output_markdown(notice) == ""
    mixed = dict(notice, text=notice["text"] + "kept line\n")
    assert "kept line" in output_markdown(mixed) and "computing again" not in output_markdown(mixed)
