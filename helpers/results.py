"""Typed results: small dataclasses that save and load themselves as JSON, show as a table in Jupyter
(a pandas DataFrame, or its HTML), and say their verdicts in words.

A result class is a ``@dataclass`` that inherits `Result`. Its fields are plain values (numbers,
strings, lists, dicts), `Estimate`s (a value with an interval), or other results; `to_dict` /
`from_dict` round-trip them through JSON, rebuilding nested results from the field types. `rows()`
gives the table (by default one row of the scalar fields), `verdicts()` the sentences a reader should
take away; both show in `str(result)` and in a notebook's display of it (HTML, and markdown: a table
of `rows()` then the verdicts as bullets, which `helpers.runs.report` copies into docs/results.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from html import escape
from pathlib import Path

import numpy as np


def plain(value):
    """`value` as JSON-ready Python: tensors and arrays become lists, numpy scalars numbers, results dicts."""
    if isinstance(value, (Result, Estimate)):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _rebuild(tp, value):
    """`value` (from JSON) as type `tp`: nested results and estimates are rebuilt, the rest kept."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        for a in args:
            if a is not type(None):
                try:
                    return _rebuild(a, value)
                except (TypeError, KeyError, ValueError):
                    continue
        return value
    if origin in (list, tuple) and args:
        return [_rebuild(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _rebuild(args[1], v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, (Result, Estimate)) and isinstance(value, dict):
        return tp.from_dict(value)
    return value


def _fields_from_dict(cls, d: dict) -> dict:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(d) - names - {"type"}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return {k: _rebuild(hints.get(k, typing.Any), v) for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A value with a confidence interval (`low`, `high`; NaN when none was computed) and its level."""
    value: float
    low: float = math.nan
    high: float = math.nan
    level: float = 0.95

    @classmethod
    def from_samples(cls, value: float, samples, level: float = 0.95) -> "Estimate":
        """`value` with the percentile interval of bootstrap `samples` (NaNs ignored)."""
        s = np.asarray(plain(samples), dtype=float)
        s = s[np.isfinite(s)]
        if len(s) == 0:
            return cls(float(value), level=level)
        a = (1 - level) / 2
        return cls(float(value), float(np.quantile(s, a)), float(np.quantile(s, 1 - a)), level)

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval lies wholly above or below `x`."""
        return self.has_interval and (self.low > x or self.high < x)

    def above(self, x: float = 0.0) -> bool:
        return self.has_interval and self.low > x

    def below(self, x: float = 0.0) -> bool:
        return self.has_interval and self.high < x

    def to_dict(self) -> dict:
        return {"type": "Estimate", "value": self.value, "low": self.low, "high": self.high, "level": self.level}

    @classmethod
    def from_dict(cls, d: dict) -> "Estimate":
        return cls(**{k: (math.nan if d.get(k) is None else float(d[k])) for k in ("value", "low", "high")},
                   level=float(d.get("level", 0.95)))

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        if not self.has_interval:
            return format(self.value, spec)
        return f"{format(self.value, spec)} [{format(self.low, spec)}, {format(self.high, spec)}]"

    def __str__(self) -> str:
        return format(self, ".3f")


RESULT_TYPES: dict[str, type] = {}


def rebuild(value):
    """`value` with every dict that a `Result.to_dict` wrote (its "type" a known Result class) made that
    Result again; other values as they are."""
    if isinstance(value, dict):
        cls = RESULT_TYPES.get(value.get("type")) if isinstance(value.get("type"), str) else None
        if cls is not None:
            return cls.from_dict(value)
        return {k: rebuild(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rebuild(v) for v in value]
    return value


def unbuild(value):
    """`value` with every Result in it (alone, or in dicts, lists and tuples) made its `to_dict()`; tensors,
    arrays and other values as they are. `rebuild` undoes it."""
    if isinstance(value, (Result, Estimate)):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: unbuild(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unbuild(v) for v in value)
    return value


RESULT_TYPES["Estimate"] = Estimate


def markdown_cell(value) -> str:
    """One value as the text of a markdown table cell: floats to 4 significant digits, None empty,
    pipes escaped and line breaks made spaces."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = ""
    elif isinstance(value, (float, np.floating)) and not isinstance(value, bool):
        text = f"{float(value):.4g}"
    else:
        text = str(value)
    return " ".join(text.replace("|", "\\|").split())


def markdown_table(rows: list[dict], columns: list | None = None) -> str:
    """`rows` (dicts; a missing key is an empty cell) as a GitHub-flavoured markdown table with the
    columns in order of first appearance (or `columns`); "" when there are no rows."""
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(markdown_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class Result:
    """Mixin for result dataclasses: JSON save/load, a table (`rows`, `to_frame`), verdicts, display.
    Every subclass is known by its name to `rebuild` (what reads results back from the cache)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        RESULT_TYPES[cls.__name__] = cls

    def to_dict(self) -> dict:
        d = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, **d}

    @classmethod
    def from_dict(cls, d: dict):
        if "type" in d and d["type"] != cls.__name__:
            raise ValueError(f"this is a {d['type']}, not a {cls.__name__}")
        return cls(**_fields_from_dict(cls, d))

    def save(self, path) -> Path:
        """Write the result as JSON to `path` (atomically: an interrupted save leaves the old file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def rows(self) -> list[dict]:
        """The table: by default one row of the scalar fields, estimates written with their intervals."""
        row = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Estimate):
                row[f.name] = format(v, ".3f")
            elif isinstance(v, (int, float, str, bool, np.generic)) or v is None:
                row[f.name] = v
        return [row]

    def to_frame(self):
        """The table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def verdicts(self) -> list[str]:
        """What the result says, in sentences (none by default)."""
        return []

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
            text = self.to_frame().to_string(index=False)
        return "\n".join([f"{type(self).__name__}", text, *self.verdicts()])

    def _repr_html_(self) -> str:
        table = self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
        notes = "".join(f"<li>{escape(v)}</li>" for v in self.verdicts())
        return f"<b>{type(self).__name__}</b>{table}" + (f"<ul>{notes}</ul>" if notes else "")

    def _repr_markdown_(self) -> str:
        """The table of `rows()` in markdown, then the verdicts as bullets."""
        title = getattr(self, "title", "")
        title = title if isinstance(title, str) and title else type(self).__name__
        parts = [f"**{title}**", markdown_table(self.rows())]
        notes = "\n".join(f"* {' '.join(v.split())}" for v in self.verdicts())
        return "\n\n".join(p for p in (*parts, notes) if p) + "\n"


@dataclasses.dataclass
class Table(Result):
    """A list of rows (dicts) as a result: a sweep, a layer comparison, anything tabular."""
    rows_: list = dataclasses.field(default_factory=list)
    title: str = ""
    notes: list = dataclasses.field(default_factory=list)

    def rows(self) -> list[dict]:
        return [{k: (format(v, ".3f") if isinstance(v, Estimate) else v) for k, v in r.items()} for r in self.rows_]

    def verdicts(self) -> list[str]:
        return list(self.notes)
