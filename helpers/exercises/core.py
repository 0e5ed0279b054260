"""The exercise checker: run a reader's function and a reference on the same inputs and say what differs.

An ``Exercise`` names the function the reader writes, its reference (the workbook's own code where it has
one), a generator of random inputs, and known mistakes: wrong variants with the cause they point to ("you
divided by the per-dimension variance"). ``check`` runs random cases, then the real cases a notebook passes
in, and raises ``ExerciseFailed`` with the first difference: shape, dtype, NaNs, the first differing
element, a pattern (transposed, sign, constant factor) and the likely cause when a known mistake matches.

Exercises are functional: a reader's function returns its results and does not change its inputs (every
input is cloned before each call, so an in-place edit cannot leak into the reference's inputs).
"""
from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


class ExerciseFailed(AssertionError):
    """The reader's function is not written yet, raised, or differs from the reference."""

    def _render_traceback_(self):
        """In Jupyter (IPython), show the check's message alone: the traceback would point into the
        checker, not into the reader's code (an error the reader's function raises is chained below it)."""
        lines = [f"\x1b[1;31mExerciseFailed\x1b[0m: {self}"]
        if self.__cause__ is not None:
            lines += ["", "raised by your function:"] + "".join(
                traceback.format_exception(self.__cause__)).rstrip().splitlines()
        return lines


@dataclass
class Exercise:
    id: str  # "02.1": notebook, then the exercise's number in it
    name: str  # the function the reader writes
    reference: Callable
    random_cases: Callable[[torch.Generator], list[dict]] | None = None  # seeded inputs (keyword arguments)
    mistakes: tuple[tuple[Callable, str], ...] = ()  # (a wrong variant, what the reader probably did)
    atol: float = 1e-5
    rtol: float = 1e-4
    # Cases that need the embedded model (a TransformerBridge): the test suite builds them with its model;
    # in a notebook the reader's real inputs stand in. Exercises with only these need real cases in check().
    model_cases: Callable[[Any, torch.Generator], list[dict]] | None = None
    extra: dict = field(default_factory=dict)


EXERCISES: dict[str, Exercise] = {}


def register(ex: Exercise) -> Exercise:
    """Add an exercise to the registry (ids are unique)."""
    if ex.id in EXERCISES:
        raise ValueError(f"exercise {ex.id} is registered twice ({EXERCISES[ex.id].name}, {ex.name})")
    EXERCISES[ex.id] = ex
    return ex


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"ndarray {value.dtype}{list(value.shape)}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in value[:4]) + (", …" if len(value) > 4 else "")
        return f"{type(value).__name__}[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in list(value.items())[:6]) + "}"
    if isinstance(value, (int, float, bool, str)) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return type(value).__name__


def describe_inputs(kwargs: dict) -> str:
    return ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items())


def _clone(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        elif isinstance(v, (np.ndarray, list, dict, tuple)):
            out[k] = copy.deepcopy(v)
        else:
            out[k] = v  # models, tokenizers, stores: passed as they are
    return out


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=False))


def _tensor_diff(got: torch.Tensor, want: torch.Tensor, where: str, atol: float, rtol: float) -> str | None:
    if got.shape != want.shape:
        hint = ""
        if got.dim() == want.dim() == 2 and tuple(got.shape) == tuple(want.shape)[::-1]:
            hint = " (transposed?)"
        elif got.numel() == want.numel():
            hint = " (same number of elements: a reshape or a missing/extra dimension?)"
        elif got.dim() == want.dim() - 1:
            hint = " (one dimension fewer: did you sum or average over one too many?)"
        elif got.dim() == want.dim() + 1:
            hint = " (one dimension more: a sum or average left out?)"
        return f"{where}: shape {list(got.shape)}, expected {list(want.shape)}{hint}"
    if want.dtype == torch.bool and got.dtype != torch.bool:
        return f"{where}: dtype {got.dtype}, expected a boolean tensor"
    if want.is_floating_point() != got.is_floating_point() and want.dtype != torch.bool:
        return f"{where}: dtype {got.dtype}, expected {want.dtype}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if torch.isnan(g).any() and not torch.isnan(w).any():
        idx = tuple(torch.nonzero(torch.isnan(g))[0].tolist())
        return f"{where}: NaN at {list(idx)} (a division by zero, or the log/sqrt of a negative number?)"
    if _close(g, w, atol, rtol):
        return None
    if w.numel() == 1:  # one number: no positions to report, but a ratio can name a missing factor
        got_v, want_v = g.item(), w.item()
        msg = f"{where}: got {got_v:.6g}, expected {want_v:.6g}"
        if want_v != 0 and got_v != 0:
            msg += f" ({got_v / want_v:.4g} × the expected value)"
        return msg
    bad = ~torch.isclose(g, w, atol=atol, rtol=rtol)
    idx = tuple(torch.nonzero(bad)[0].tolist())
    frac = bad.double().mean().item()
    head = f"{where}: {bad.sum().item():,} of {bad.numel():,} values differ ({frac:.0%}); first at {list(idx)}: "
    if want.dtype == torch.bool:
        return (head + f"got {bool(g[idx].item())}, expected {bool(w[idx].item())} "
                f"({int((g > 0.5).sum()):,} True, expected {int((w > 0.5).sum()):,})")
    msg = head + (f"got {g[idx].item():.6g}, expected {w[idx].item():.6g}; largest difference "
                  f"{(g - w).abs().max().item():.3g}")
    if _close(g, -w, atol, rtol):
        msg += " (the sign is flipped)"
    elif w.abs().max() > 0 and _close(g, torch.zeros_like(w), atol, rtol):
        msg += " (you return all zeros)"
    else:
        nz = w.abs() > 1e-6
        if nz.sum() > 1:
            ratio = g[nz] / w[nz]
            spread = (ratio - ratio.mean()).abs().max()
            if spread < 1e-3 * max(1.0, ratio.mean().abs().item()) and abs(ratio.mean().item() - 1) > 1e-3:
                msg += f" (every value is {ratio.mean().item():.4g} × the expected one: a missing or extra factor?)"
    return msg


def compare(got: Any, want: Any, atol: float = 1e-5, rtol: float = 1e-4, where: str = "output") -> str | None:
    """None if ``got`` matches ``want`` (tensors, arrays, numbers, tuples, lists, dicts, nested); else why not."""
    if isinstance(want, np.ndarray):
        want = torch.from_numpy(want)
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if isinstance(want, torch.Tensor):
        if isinstance(got, (int, float)) and want.numel() == 1:
            got = torch.tensor(got)
        if not isinstance(got, torch.Tensor):
            return f"{where}: got {_describe(got)}, expected a tensor {_describe(want)}"
        if want.numel() == 1 and got.numel() == 1 and got.shape != want.shape:
            got = got.reshape(want.shape)
        return _tensor_diff(got, want, where, atol, rtol)
    if isinstance(want, bool) or isinstance(want, str) or want is None:
        return None if got == want else f"{where}: got {got!r}, expected {want!r}"
    if isinstance(want, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)):
            return f"{where}: got {_describe(got)}, expected a number"
        return _tensor_diff(torch.tensor(float(got)), torch.tensor(float(want)), where, atol, rtol)
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{where}: got {_describe(got)}, expected a {type(want).__name__} of {len(want)}"
        if len(got) != len(want):
            return f"{where}: {len(got)} items, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            if (diff := compare(g, w, atol, rtol, f"{where}[{i}]")) is not None:
                return diff
        return None
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{where}: got {_describe(got)}, expected a dict with keys {sorted(want)}"
        if set(got) != set(want):
            return f"{where}: keys {sorted(got)}, expected {sorted(want)}"
        for k in want:
            if (diff := compare(got[k], want[k], atol, rtol, f"{where}[{k!r}]")) is not None:
                return diff
        return None
    return None if got == want else f"{where}: got {got!r}, expected {want!r}"


def run_cases(ex: Exercise, fn: Callable, real=None, seed: int = 0, model=None) -> int:
    """Run ``fn`` against the reference on every case (random ones, those built with ``model`` when given,
    then ``real``); raise ExerciseFailed at the first difference. Returns the number of cases."""
    cases = []
    if ex.random_cases is not None:
        cases += [("random", kw) for kw in ex.random_cases(torch.Generator().manual_seed(seed))]
    if model is not None and ex.model_cases is not None:
        cases += [("model", kw) for kw in ex.model_cases(model, torch.Generator().manual_seed(seed))]
    if real is not None:
        cases += [("real", kw) for kw in (real if isinstance(real, (list, tuple)) else [real])]
    if not cases:
        raise ValueError(f"exercise {ex.id} has no random cases: pass real=dict(...) inputs from the notebook")
    head = f"Exercise {ex.id} ({ex.name})"
    for n, (kind, kw) in enumerate(cases):
        want = ex.reference(**_clone(kw))
        try:
            got = fn(**_clone(kw))
        except NotImplementedError:
            raise ExerciseFailed(f"{head}: not written yet. Replace `raise NotImplementedError` with your code, "
                                 f"or open the solution below the cell.") from None
        except Exception as e:
            raise ExerciseFailed(f"{head} raised {type(e).__name__}: {e}\n  on {kind} inputs: "
                                 f"{describe_inputs(kw)}") from e
        diff = compare(got, want, ex.atol, ex.rtol)
        if diff is None:
            continue
        msg = f"{head} differs from the reference on {kind} inputs ({describe_inputs(kw)}):\n  {diff}"
        for wrong, cause in ex.mistakes:
            try:
                if compare(got, wrong(**_clone(kw)), ex.atol, ex.rtol) is None:
                    msg += f"\n  likely cause: {cause}"
                    break
            except Exception:
                continue
        raise ExerciseFailed(msg)
    return len(cases)


def check(id: str, fn: Callable, real=None, seed: int = 0) -> None:
    """Check the reader's ``fn`` for exercise ``id`` on random inputs and on ``real`` ones (a dict of keyword
    arguments, or a list of them). Prints a line when every case matches; raises ExerciseFailed otherwise."""
    if id not in EXERCISES:
        raise KeyError(f"no exercise {id!r}; known: {', '.join(sorted(EXERCISES))}")
    ex = EXERCISES[id]
    if ex.random_cases is None and real is None:
        raise ValueError(f"exercise {id} needs real inputs: check({id!r}, {ex.name}, real=dict(...))")
    n = run_cases(ex, fn, real, seed)
    n_real = 0 if real is None else len(real) if isinstance(real, (list, tuple)) else 1
    print(f"✔ Exercise {id} ({ex.name}): matches the reference on {n - n_real} random and {n_real} real "
          f"input{'s' if n_real != 1 else ''}.")
