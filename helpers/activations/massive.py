"""Massive activations: detect them by a stated rule, measure them, and give them their own treatment.

In many transformers a few tokens carry residual-stream vectors far larger than the rest (Sun et al.
2024, "Massive activations in large language models"). In SmolLM2-135M at layers 3 and 6 about 2% of
tokens (mostly " the") have norms above 4× the median and carry 55-65% of the variance; they point
almost exactly along one fixed vector (cosine ≈ 0.999 with their mean, dominated by dimension 507);
layer 9 has none. Left alone they dominate every metric averaged over tokens.

**The rule.** A token is *massive* at a hook when its activation's norm exceeds `FACTOR` (4) times the
median norm at that hook, the median taken over the training store.

**The treatment (one transform, used everywhere).** A massive token is, to within a few percent of its
variance, a constant vector plus an ordinary-sized remainder. So every dictionary in the workbook (the
SAEs and the baselines alike) sees ``x - flag(x) · offset``, where `offset` is the mean massive
activation of the training store, and a reconstruction adds ``flag(x) · offset`` back. The offset
acts like a decoder bias that switches on for flagged tokens: one fixed vector, the same for every
method, learned from the training data. Training, evaluation, concept scores and splicing all go
through it, so no method, and no baseline, can win or lose by catching the massive tokens; metrics are
reported over all tokens and over ordinary tokens (see helpers.evals.reconstruction, helpers.evals.features).

`fit_tensor(x)` measures activations x [N, d] of one hook and returns a `Massive` (threshold, offset and
the measurements; a typed result that shows its numbers as a table and says what they mean);
`fit(store, hook)` does the same on a store's hook (streamed, cached in the store); a hook with no
massive token gets an inert one (threshold as measured, offset 0) and a note; a rule that would flag
every token is refused. `massive_tokens(flags, token_ids, positions)` says which tokens are massive
(`describe(store, hook, rule)` on a store), and `report(store)` gathers both for every hook.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from helpers.results import Result

FACTOR = 4.0  # a token is massive when its norm exceeds FACTOR × the hook's median norm
_VERSION = 4  # of what fit() measures (its cache entries)


class MassiveError(ValueError):
    """The rule cannot be applied as asked."""


@dataclass
class Massive(Result):
    """The rule's result at one hook: which tokens are massive and the offset they get."""

    hook: str
    threshold: float                 # flag tokens whose norm exceeds this (model units)
    offset: torch.Tensor = field(repr=False)  # [d]: mean massive activation (zeros if there is none)
    median_norm: float = 0.0
    factor: float = FACTOR
    share: float = 0.0               # of tokens flagged (training store)
    variance_share: float = 0.0      # of the total variance they carry
    note: str = ""
    top_dims: list = field(default_factory=list)  # [(dim, share of the massive tokens' variance)]
    cosine: float = 0.0              # median cosine of a massive token with the offset
    offset_residual: float = 0.0     # share of the massive tokens' variance the offset leaves unexplained

    @property
    def any(self) -> bool:
        return self.share > 0

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        """[...] bool: which rows of x [..., d] are massive."""
        return x.float().norm(dim=-1) > self.threshold

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """x with the offset removed from its massive rows (what every dictionary encodes)."""
        if not self.any:
            return x
        return x - self.flags(x).unsqueeze(-1).to(x.dtype) * self.offset.to(x.device, x.dtype)

    def to_json(self) -> dict:
        return {**asdict(self), "offset": [float(v) for v in self.offset],
                "top_dims": [list(t) for t in self.top_dims]}

    @classmethod
    def from_json(cls, d: dict) -> "Massive":
        return cls(**{**d, "offset": torch.tensor(d["offset"], dtype=torch.float32),
                      "top_dims": [tuple(t) for t in d.get("top_dims", [])]})

    @classmethod
    def from_dict(cls, d: dict) -> "Massive":
        return cls.from_json({k: v for k, v in d.items() if k != "type"})

    def rows(self) -> list[dict]:
        return [{"hook": self.hook, "median norm": self.median_norm, "threshold": self.threshold,
                 "tokens massive": self.share, "variance they carry": self.variance_share,
                 "cosine with offset": self.cosine if self.any else None,
                 "variance offset leaves": self.offset_residual if self.any else None}]

    def verdicts(self) -> list[str]:
        out = [self.note] if self.note else []
        if self.any:
            out.append("their variance lies along " + ", ".join(f"dimension {d} ({s:.0%})" for d, s in self.top_dims)
                       + f"; median cosine with their mean vector {self.cosine:.4f}; that one vector leaves "
                       f"{self.offset_residual:.1%} of their variance unexplained")
        return out

    @classmethod
    def none(cls, hook: str, d: int) -> "Massive":
        """An inert rule: flags nothing."""
        return cls(hook, math.inf, torch.zeros(d), note="no rule applied")


def norms(store, hook: str, max_tokens: int | None = None) -> np.ndarray:
    """Per-token activation norms at `hook`, in store order (one pass over the store)."""
    out = []
    n = 0
    for i in range(len(store.shards)):
        if max_tokens is not None and n >= max_tokens:
            break
        x = store.shard_activations(i, hook).float()
        out.append(x.norm(dim=-1).numpy())
        n += len(x)
    out = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return out if max_tokens is None else out[:max_tokens]


def fit(store, hook: str = "", factor: float = FACTOR, max_tokens: int | None = None) -> Massive:
    """Apply the rule at `hook` of a (training) store: threshold, offset and measurements. Given a
    tensor (or array) of activations [N, d] instead of a store, this is `fit_tensor` (nothing cached).

    Raises MassiveError if the rule would flag every token (a factor below 1, say); a hook with no
    massive token gets an inert rule with a note saying so. The result is cached in the store's
    folder (``massive.json``), keyed by hook, factor and token count."""
    if torch.is_tensor(store) or isinstance(store, np.ndarray):
        return fit_tensor(store if max_tokens is None else store[:max_tokens], factor, hook)
    if not factor > 0:
        raise MassiveError(f"the factor must be positive, not {factor}")

    cache = store.path / "massive.json"
    key = f"v{_VERSION}|{hook}|{factor}|{store.n_tokens}|{max_tokens}"
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
    except ValueError:
        known = {}
    if key in known:
        return Massive.from_json(known[key])
    rule = _fit(store, hook, factor, max_tokens)
    known = {k: v for k, v in known.items() if k.startswith(f"v{_VERSION}|")}  # drop entries of older versions
    known[key] = rule.to_json()
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, cache)
    return rule


def fit_tensor(x: torch.Tensor, factor: float = FACTOR, hook: str = "") -> Massive:
    """Apply the rule to activations x [N, d] (one hook's tokens): threshold (factor × the median
    norm), offset (the mean massive row) and measurements. Raises MassiveError if the rule would
    flag every token; with no massive token the rule is inert (offset 0) and says so in its note."""
    if not factor > 0:
        raise MassiveError(f"the factor must be positive, not {factor}")
    x = torch.as_tensor(x).cpu()
    return _rule(x.float().norm(dim=-1).numpy(), lambda: [x], x.shape[-1], hook, factor, "the tensor")


def _fit(store, hook: str, factor: float, max_tokens: int | None) -> Massive:
    """The rule on a store's activations at `hook`, streamed shard by shard (`fit_tensor`'s numbers
    when the store holds one shard)."""
    nrm = norms(store, hook, max_tokens)

    def shards():
        seen = 0
        for i in range(len(store.shards)):
            if seen >= len(nrm):
                return
            x = store.shard_activations(i, hook)
            seen += len(x)
            yield x

    return _rule(nrm, shards, store.d_model, hook, factor, str(store.path))


def _rule(nrm: np.ndarray, chunks, d: int, hook: str, factor: float, where: str) -> Massive:
    """The rule from per-token norms `nrm` [N] and `chunks()`, an iterable of the activations in the
    same order (the first N rows count), d wide: one pass for the massive tokens' mean and their share
    of the variance."""
    if len(nrm) == 0:
        raise MassiveError(f"no activations at {hook} in {where}")
    finite = np.isfinite(nrm)
    if not finite.any():
        raise MassiveError(f"no finite activation at {hook} in {where}")
    med = float(np.median(nrm[finite]))
    threshold = factor * med
    flag = finite & (nrm > threshold)
    if flag.all():
        raise MassiveError(f"every token at {hook} would be flagged massive (norm > {factor:g} × the median "
                           f"{med:.1f}): with no ordinary token left the rule is meaningless; use a factor above 1")
    if not flag.any():
        return Massive(hook, threshold, torch.zeros(d), med, factor, 0.0, 0.0,
                       note=f"no massive activations at {hook}: no token's norm exceeds {factor:g} × the median "
                            f"({threshold:.1f}); ordinary tokens are all tokens here")
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros((), dtype=torch.float64)
    m_sum = torch.zeros(d, dtype=torch.float64)
    m_n = int(flag.sum())
    start = 0
    rows = []
    for chunk in chunks():
        if start >= len(nrm):
            break
        x = chunk.double()[: len(nrm) - start]
        f = torch.as_tensor(flag[start:start + len(x)])
        ok = torch.as_tensor(finite[start:start + len(x)])
        total += x[ok].sum(0)
        total_sq += x[ok].pow(2).sum()
        m_sum += x[f].sum(0)
        rows.append(x[f])
        start += len(x)
    n = int(finite.sum())
    mean = total / n
    xm = torch.cat(rows)
    var_total = float(total_sq - n * mean.pow(2).sum())
    var_massive = float((xm - mean).pow(2).sum())
    per_dim = (xm - mean).pow(2).sum(0)
    top = per_dim.argsort(descending=True)[:3]
    offset = m_sum / m_n
    cosine = torch.nn.functional.cosine_similarity(xm, offset.unsqueeze(0), dim=-1).median()
    return Massive(hook, threshold, offset.float(), med, factor, m_n / n, var_massive / var_total,
                   note=f"{m_n:,} of {n:,} tokens ({m_n / n:.1%}) at {hook} have a norm above {factor:g} × the median "
                        f"({threshold:.1f}) and carry {var_massive / var_total:.0%} of the variance",
                   top_dims=[(int(j), float(per_dim[j] / per_dim.sum())) for j in top],
                   cosine=float(cosine), offset_residual=float((xm - offset).pow(2).sum() / var_massive))


def flags(store, hook: str, rule: Massive) -> np.ndarray:
    """[n_tokens] bool: the massive tokens of a store by `rule` (fitted on the training store)."""
    return norms(store, hook) > rule.threshold


@dataclass
class MassiveTokens(Result):
    """Which tokens are massive at one hook: the most frequent ones, with the share of each token's
    occurrences that are massive, and how many of them sit first in their context."""

    hook: str = ""
    n: int = 0                         # massive tokens
    share: float = 0.0                 # of all tokens
    tokens: list = field(default_factory=list)  # [(token text, times massive, share of its occurrences)]
    first_position_share: float = 0.0  # of the massive tokens, those first in their context

    def __post_init__(self):
        self.tokens = [tuple(t) for t in self.tokens]

    def rows(self) -> list[dict]:
        return [{"token": t, "times massive": n, "share of its occurrences": s} for t, n, s in self.tokens]

    def verdicts(self) -> list[str]:
        if not self.n:
            return [f"{self.hook}: no massive token"]
        return [f"{self.hook}: most often massive: " + ", ".join(f"{t!r} ×{n} ({s:.0%} of its occurrences)"
                                                               for t, n, s in self.tokens[:6])
                + f"; {self.first_position_share:.0%} of them are a context's first token"]


def _numpy(v) -> np.ndarray:
    return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)


def massive_tokens(flags, token_ids, positions, tokenizer=None, top: int = 8, hook: str = "") -> MassiveTokens:
    """What the massive tokens are: `flags` [N] bool (a rule's `flags(x)`), `token_ids` [N] the token of
    each row, `positions` [N] its position in its context (0: first). Tokens are decoded with
    `tokenizer` when one is given, else named by id."""
    flag = _numpy(flags).astype(bool)
    ids = _numpy(token_ids).astype(np.int64)[: len(flag)]
    pos = _numpy(positions)[: len(flag)]
    toks, counts = np.unique(ids[flag], return_counts=True)
    all_counts = np.bincount(ids, minlength=int(ids.max()) + 1 if len(ids) else 1)
    order = np.argsort(-counts)[:top]
    name = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
    return MassiveTokens(hook, int(flag.sum()), float(flag.mean()) if len(flag) else 0.0,
                         [(name(int(toks[i])), int(counts[i]), float(counts[i] / all_counts[toks[i]])) for i in order],
                         float((pos[flag] == 0).mean()) if flag.any() else 0.0)


def describe(store, hook: str, rule: Massive, tokenizer=None, top: int = 8) -> MassiveTokens:
    """What the massive tokens of a store are at `hook` by `rule` (`massive_tokens` on the store's labels)."""
    flag = flags(store, hook, rule)
    meta = store.tokens()[: len(flag)]
    per_ctx = store.manifest["ctx_len"] - 1
    return massive_tokens(flag, meta["token"], np.arange(len(flag)) % per_ctx, tokenizer, top, hook)


@dataclass
class MassiveReport(Result):
    """The rule at every hook of a store, and what its massive tokens are."""

    rules: dict[str, Massive] = field(default_factory=dict)
    tokens: dict[str, MassiveTokens] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        out = []
        for h, r in self.rules.items():
            row = r.rows()[0]
            t = self.tokens.get(h)
            if t is not None and t.tokens:
                row["most often massive"] = ", ".join(repr(tok) for tok, _, _ in t.tokens[:3])
                row["first in context"] = t.first_position_share
            out.append(row)
        return out

    def verdicts(self) -> list[str]:
        out = []
        for h, r in self.rules.items():
            out += r.verdicts()
            if r.any and h in self.tokens:
                out += self.tokens[h].verdicts()
        return out


def report(store, tokenizer=None, hooks=None, factor: float = FACTOR, top: int = 8) -> MassiveReport:
    """The rule fitted at every hook of a (training) store (`fit`), with what the massive tokens are
    where there are any (`describe`)."""
    hooks = list(store.hooks) if hooks is None else list(hooks)
    rules = {h: fit(store, h, factor) for h in hooks}
    return MassiveReport(rules, {h: describe(store, h, r, tokenizer, top) for h, r in rules.items() if r.any})
