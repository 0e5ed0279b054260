"""The exercises of notebook 02: references, random cases and known mistakes."""
from .core import Exercise, register  # noqa: F401
