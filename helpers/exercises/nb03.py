"""The exercises of notebook 03: references, random cases and known mistakes."""
from .core import Exercise, register  # noqa: F401
