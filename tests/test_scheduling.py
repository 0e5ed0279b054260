"""The test command's two workers (conftest.py): the units of work, their order, and when notebook 03's unit
goes out. The scheduler is driven here as pytest-xdist drives it, with stand-ins for the two workers."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("workbook_root_conftest", ROOT / "conftest.py")
conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conf)

NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def collection():
    """Node ids in pytest's own order for `pytest --nbval-lax notebooks tests`: three cells a notebook."""
    ids = [f"notebooks/{nb}::Cell {i}" for nb in NOTEBOOKS for i in range(3)]
    units = [f"tests/test_{c}.py::test_it" for c in "abcdef"]
    return ids + units[:2] + ["tests/test_browser.py::test_notebook"] + units[2:]


def test_the_prefixes_name_the_notebooks_and_the_browser_test():
    paths = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("tests/*.py")]]
    for prefix in conf.LATER + conf.BEFORE_LATER:
        assert len([p for p in paths if p.startswith(prefix)]) == 1, f"{prefix!r} must name one file"


def test_notebook_03_and_the_browser_test_come_last():
    items = [SimpleNamespace(nodeid=n) for n in collection()]
    conf.pytest_collection_modifyitems(None, items)
    order = [i.nodeid.split("::")[0] for i in items]
    assert order == ([f"notebooks/{nb}" for nb in NOTEBOOKS if not nb.startswith("03_") for _ in range(3)]
                     + [f"tests/test_{c}.py" for c in "abcdef"] + [f"notebooks/{NOTEBOOKS[2]}"] * 3
                     + ["tests/test_browser.py"])


class Worker:
    """What the scheduler sees of a worker: the item indices it is sent."""

    def __init__(self, name):
        self.name, self.sent, self.shutting_down = name, [], False
        self.gateway = SimpleNamespace(id=name)

    def send_runtest_some(self, indices):
        self.sent += indices

    def shutdown(self):
        self.shutting_down = True


def test_notebook_03_goes_out_once_notebooks_01_and_02_have_run():
    pytest.importorskip("xdist")
    option = SimpleNamespace(loadscopereorder=True)
    config = SimpleNamespace(option=option, getvalue=lambda name: {"dist": "load", "tx": ["2*popen"]}[name])
    sched = conf.pytest_xdist_make_scheduler(config, None)
    items = [SimpleNamespace(nodeid=n) for n in collection()]
    conf.pytest_collection_modifyitems(None, items)
    ids = [i.nodeid for i in items]
    a, b = Worker("a"), Worker("b")
    for w in (a, b):
        sched.add_node(w)
        sched.add_node_collection(w, ids)
    sched.schedule()
    notebooks = [n for n in ids if n.startswith("notebooks/") and not n.startswith(conf.LATER)]
    later = [n for n in ids if n.startswith(conf.LATER)]
    assert [ids[i] for i in a.sent] == notebooks  # one worker: 01, 02, 04, 05, in order
    assert [ids[i] for i in b.sent] == ["tests/test_a.py::test_it", "tests/test_b.py::test_it"]

    def report(worker):  # the worker reports its next item; the scheduler may send it more
        i = next(i for i in worker.sent if i not in worker.done)
        worker.done.add(i)
        sched.mark_test_complete(worker, i)

    a.done, b.done = set(), set()
    report(b)  # while notebook 01 runs, the unit tests go on
    assert ids[b.sent[-1]] == "tests/test_c.py::test_it"
    for _ in range(3):  # notebook 01
        report(a)
    report(b)
    assert ids[b.sent[-1]] == "tests/test_d.py::test_it"
    for _ in range(3):  # notebook 02: the harvest and the sweep that 03 reads are built
        report(a)
    report(b)  # the next worker asking for work gets notebook 03 and the browser test, before the units left
    assert [ids[i] for i in b.sent[-len(later):]] == later
    assert "tests/test_e.py::test_it" not in [ids[i] for i in a.sent + b.sent]
