"""exercises: the checks behind the notebooks' exercises (what a reader writes, compared with a reference).

``check("02.1", my_fn, real=[...])`` runs the reader's function and the reference on random inputs and on
real ones from the notebook, and says what differs (shape, dtype, values, the first differing element, a
likely cause). The framework is in ``core``; each notebook's exercises are registered by its own module
(``nb01`` ... ``nb05``). ``build`` writes the exercise versions of the notebooks (solutions replaced by stubs).
"""
from . import nb01, nb02, nb03, nb04, nb05  # noqa: F401  (registers every exercise)
from .core import EXERCISES, Exercise, ExerciseFailed, check, compare, register

__all__ = ["EXERCISES", "Exercise", "ExerciseFailed", "check", "compare", "register"]
