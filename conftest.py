"""Test-suite settings, shared by the unit tests and the notebooks that nbval runs.

The notebooks run on the small `test` profile (the kernels nbval starts inherit the variable),
so that the README's bare `pytest` command works. Set SAE_TEST_PROFILE to run them at another size.
"""
import os
import sys

import pytest

os.environ["SAE_PROFILE"] = os.environ.get("SAE_TEST_PROFILE", "test")
os.environ.setdefault("MPLBACKEND", "Agg")

# The exercise versions of the notebooks (notebooks/exercises/, written by `python -m helpers.exercises.build`)
# stop at their first unwritten function by design: nbval runs the solved notebooks, and
# tests/test_exercises.py checks the exercise versions against them.
collect_ignore_glob = ["notebooks/exercises/*"]

# The test command runs in two pytest-xdist workers (pyproject.toml: `-n 2`; `-n 0` runs everything in this one
# process, e.g. for `-s` or a debugger). The notebooks are two units of work, each run in order by one worker:
# 01, 02, 04 and 05; and 03 followed by the browser test, which runs notebook 03 again in JupyterLab on the
# cache that nbval's run of it left. One worker starts on the first unit while the other takes the unit tests;
# the second unit goes to the next free worker once notebooks 01 and 02, whose harvest and sweep 03 reads,
# have run. (A notebook that finds something it needs being built elsewhere waits for it anyway:
# helpers.settings.locks.) In one process the second unit comes last, after the unit tests.
# Each worker computes on its share of the cores (one each on 2 cores): a matrix product on two threads runs at
# the speed of its slower thread, so two two-thread workers on two cores slow each other down. A test that
# asks for more threads than its share (tests/test_reproducible.py runs at 2) gets OpenMP threads that sleep
# rather than spin while they wait for each other (OMP_WAIT_POLICY=PASSIVE): spinning, they wait on a core
# that the other worker is using (docs/performance.md has the measurements).
LATER = ("notebooks/03_", "tests/test_browser.py")
BEFORE_LATER = ("notebooks/01_", "notebooks/02_")
LATER_UNIT = "notebook 03 and the browser test"


def unit_of_work(nodeid: str) -> str:
    if nodeid.startswith(LATER):
        return LATER_UNIT
    return "notebooks" if nodeid.startswith("notebooks/") else nodeid


if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = _threads  # this worker's torch, and the kernels and processes it starts
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(_threads))


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: unit_of_work(item.nodeid) == LATER_UNIT)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # a --dist of the caller's choosing
        return None
    from xdist.scheduler import LoadScopeScheduling

    class NotebookScheduling(LoadScopeScheduling):
        """xdist's loadscope scheduling with `unit_of_work`'s units, handed out in collection order, except
        that notebook 03's unit goes out as soon as notebooks 01 and 02 have run."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of_work(nodeid)

        def _assign_work_unit(self, node) -> None:
            if LATER_UNIT in self.workqueue and self._before_later_done():
                self.workqueue.move_to_end(LATER_UNIT, last=False)
            super()._assign_work_unit(node)

        def _before_later_done(self) -> bool:
            done = {nodeid: ok for work in self.assigned_work.values() for unit in work.values()
                    for nodeid, ok in unit.items() if nodeid.startswith(BEFORE_LATER)}
            return all(done.get(nodeid, False) for nodeid in self.collection if nodeid.startswith(BEFORE_LATER))

    config.option.loadscopereorder = False  # in collection order, not biggest first
    return NotebookScheduling(config, log)
