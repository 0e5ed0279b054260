"""The exercises of notebook 01: references, random cases and known mistakes."""
from .core import Exercise, register  # noqa: F401
