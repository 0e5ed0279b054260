"""Test-suite settings, shared by the unit tests and the notebooks that nbval runs.

The notebooks run on the small `test` profile (the kernels nbval starts inherit the variable),
so that the README's bare `pytest` command works. Set SAE_TEST_PROFILE to run them at another size.
"""
import os

os.environ["SAE_PROFILE"] = os.environ.get("SAE_TEST_PROFILE", "test")
os.environ.setdefault("MPLBACKEND", "Agg")
