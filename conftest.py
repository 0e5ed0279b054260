"""Test-suite settings, shared by the unit tests and the notebooks that nbval runs.

The notebooks run on the small `test` profile (the kernels nbval starts inherit the variable),
so that the README's bare `pytest` command works. Set SAE_TEST_PROFILE to run them at another size.
"""
import os

os.environ["SAE_PROFILE"] = os.environ.get("SAE_TEST_PROFILE", "test")
os.environ.setdefault("MPLBACKEND", "Agg")

# The exercise versions of the notebooks (notebooks/exercises/, written by `python -m helpers.exercises.build`)
# stop at their first unwritten function by design: nbval runs the solved notebooks, and
# tests/test_exercises.py checks the exercise versions against them.
collect_ignore_glob = ["notebooks/exercises/*"]
