"""The exercises of notebook 05: references, random cases and known mistakes."""
from .core import Exercise, register  # noqa: F401
