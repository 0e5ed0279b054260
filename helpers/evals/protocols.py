"""The paper's interpretability protocol without an LLM, delphi's detection score, and distributions of
per-feature scores (median, mean, shares above thresholds, top decile) with context-resampled intervals.

**The explainer.** An LLM explainer shown a feature's top-activating excerpts names the pattern it sees.
Here the explainer may only name one of the labelled concepts (`Labels`, e.g. `token_labels`): the
one whose 0/1 indicator correlates best (Pearson, over tokens) with the feature's activation over the
excerpts it is shown: the feature's `explain_top` top-activating excerpts of the explaining half
(contexts 0, 2, 4, ... in order of first appearance) and `explain_random` random excerpts of that
half. A concept competes only if it occurs in at least `min_excerpts` of those excerpts (a pattern
seen once is no pattern).

**Excerpts.** An excerpt is a window of `window` consecutive tokens of one context (32 by default,
delphi's ``example_ctx_len``): each context is cut into windows from its first token on, the last
one shorter when the context length is no multiple of `window`. A window is *top-activating* by its
largest activation, and counts as activating when it holds an active token (below).

**Activity.** Every method is read at its natural activity: its codes as they are (a dense direction's
projections, negative values included, as the paper scored PCA, ICA and neurons). Which tokens are
*active* follows `helpers.evals.heldout`'s one rule (`active_sets`): a feature's top
min(positive tokens, `max_density` of the tokens) tokens. At matched sparsity (`counts`, e.g.
`matched_counts` of an SAE's counts), a feature's code is kept on its top-n tokens and zeroed
elsewhere, and those n tokens are its active ones. Top-activating excerpts are drawn only from
windows holding an active token.

The explanation is scored on the other half (contexts 1, 3, 5, ...) in two ways:

* ``correlation`` (Cunningham et al. 2023, sec. 3, after Bills et al. 2023): the simulated
  activation is the concept's indicator per token; the score is its Pearson correlation with the
  true activation over the tokens of `score_top` top-activating and `score_random` random excerpts
  of the scoring half (an even mix by default, 10 + 10).
* ``detection`` (EleutherAI delphi's detection scorer): a perfect reader of the explanation says an
  excerpt activates the feature when the concept occurs in it. Activating excerpts: the windows of
  the scoring half holding an active token, ranked by their largest activation and cut into
  `n_quantiles` equal slices (delphi's ``split_quantiles``), `n_activating // n_quantiles` drawn at
  random from each (all of a slice when it has fewer); non-activating: `n_non_activating` random
  windows with no active token. Score: balanced accuracy (mean of the true-positive and
  true-negative rates), chance 0.5.

**Intervals over contexts.** The contexts of the scoring half are resampled with replacement
(`n_boot` resamples drawn once per split, seeded), so every method scored on one split shares them
and differences between methods are paired. The explainer's choice and the excerpts are held fixed;
each excerpt counts as often as its context is drawn. Every score is a function of per-excerpt sums
(tokens, sums of activation, of its square, of the indicator and of their product; hits and misses for
detection), aggregated per context, so a resample is one weighted sum (a sparse product), not a
rescoring.

From plain tensors: `protocol_scores({"SAE": codes, "random": dirs}, labels, contexts, match={"random
matched": ("random", "SAE")})` scores several methods on one split (a `ProtocolComparison`
with a `ProtocolScore` per method and their paired differences; `verdicts()`, `rows()`, `plot()`);
`ProtocolSplit` is the core; `summarize` and `heldout_distribution` give the same `Distribution`
summary of any per-feature scores, e.g. `helpers.evals.heldout`'s held-out MCC.

**Over training budgets.** `snapshot_protocol_scores` trains a sweep SAE again with the settings and
budgets of `helpers.evals.heldout.interpretability_curve` (the same snapshots) and scores each snapshot
by both protocols beside random directions; `budget_curve({tokens: ProtocolComparison}, heldout={tokens:
Estimate})` gathers the paired gaps SAE - random of every protocol per budget (a `BudgetCurve`: table,
verdicts saying how far each gap moves, `plot()`).
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from helpers.evals.heldout import (MAX_DENSITY, MIN_ACTIVE, SUMMARIES, HeldoutScore, Scored, active_sets, as_labels,
                                   context_halves, curve_snapshots, matched_counts, statistic_key)
from helpers.dictionaries.dictionary import SAEDictionary, encode_batched
from helpers.results import Estimate, Result

PROTOCOLS = ("correlation", "detection")
THRESHOLDS = {"correlation": (0.3, 0.5, 0.7), "detection": (0.6, 0.75, 0.9), "heldout mcc": (0.3, 0.5, 0.7),
              "heldout corr": (0.3, 0.5, 0.7)}
WINDOW = 32


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _share_key(t: float) -> str:
    return f"share > {t:g}"


# ------------------------------------------------------------------ distributions

def _stats(values: np.ndarray, thresholds) -> dict[str, np.ndarray]:
    """The summary statistics over features (last axis; NaN = not scored) of `values` [..., F]."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"median": np.nanmedian(np.where(n[..., None] > 0, v, 0.0), -1) if v.shape[-1] else np.full(n.shape, np.nan),
               "mean": np.where(n > 0, np.nansum(v, -1) / np.maximum(n, 1), np.nan)}
        for t in thresholds:
            out[_share_key(t)] = np.where(n > 0, (np.where(ok, v, -np.inf) > t).sum(-1) / np.maximum(n, 1), np.nan)
        out["top decile"] = np.nanpercentile(np.where(n[..., None] > 0, v, 0.0), 90, axis=-1) if v.shape[-1] \
            else np.full(n.shape, np.nan)
    for k in ("median", "top decile"):
        out[k] = np.where(n > 0, out[k], np.nan)
    return out


def _estimate(value: float, samples, share: bool = False) -> Estimate:
    """`value` with the 95% interval of its resampled `samples`, re-centred on `value` (as
    `helpers.evals.heldout` does): resampling adds noise to every feature's score, which widens the
    spread of scores and so moves quantiles and shares of the resampled ones away from the estimate;
    the percentiles' distances from the resamples' median are kept, their centre is the estimate.
    Shares are kept within [0, 1]."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s) or not np.isfinite(value):
        return Estimate(value)
    lo, hi = np.percentile(s, [2.5, 97.5]) - np.median(s) + value
    if share:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return Estimate(value, float(lo), float(hi))


@dataclass
class Distribution(Result):
    """The distribution of one method's per-feature scores under one protocol: median, mean, the share
    of scored features above each threshold and the top decile (90th percentile), each with a 95%
    interval. `interval` says what was resampled: "contexts" (the scoring half's contexts; paired with
    any distribution of equal `resamples`) or "features" (the scored features; unpaired). `boot` holds
    each statistic per resample; `values` the per-feature scores (NaN: not scored)."""

    name: str
    protocol: str
    median: Estimate
    mean: Estimate
    shares: dict[str, Estimate]
    top_decile: Estimate
    n_features: int
    n_scored: int
    thresholds: list = field(default_factory=list)
    interval: str = "contexts"
    resamples: str = ""
    values: list = field(default_factory=list)
    boot: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        self.boot = {k: np.asarray(v, dtype=np.float64) for k, v in self.boot.items()}

    def stat(self, key: str) -> Estimate:
        """One statistic by its name: median, mean, top decile, or "share > 0.5" (and the other thresholds)."""
        if key == "median":
            return self.median
        if key == "mean":
            return self.mean
        if key == "top decile":
            return self.top_decile
        if key in self.shares:
            return self.shares[key]
        raise KeyError(f"no statistic {key!r}: median, mean, top decile, {', '.join(self.shares)}")

    @property
    def keys(self) -> list[str]:
        return ["median", "mean", *self.shares, "top decile"]

    def rows(self) -> list[dict]:
        return [{"method": self.name, "protocol": self.protocol, "scored": self.n_scored,
                 **{k: format(self.stat(k), ".3f") for k in self.keys}}]

    def verdicts(self) -> list[str]:
        if not self.n_scored:
            return [f"{self.name} ({self.protocol}): no feature scored."]
        top = self.thresholds[len(self.thresholds) // 2] if self.thresholds else None
        share = f", share > {top:g} {self.shares[_share_key(top)]}" if top is not None else ""
        return [f"{self.name} ({self.protocol}, {self.n_scored} features): median {self.median}, mean {self.mean}"
                f"{share}, top decile {self.top_decile} (intervals over {self.interval})."]

    def plot(self, ax=None):
        """The ECDF of the per-feature scores."""
        return plot_distributions([self], ax=ax)


@dataclass
class DistributionDifference(Result):
    """`a`'s statistic minus `b`'s under one protocol, with its 95% interval: paired (the same context
    resamples) when both were scored on one split, else from independent resamples."""

    a: str
    b: str
    protocol: str
    stat: str
    value: Estimate
    paired: bool = True

    def rows(self) -> list[dict]:
        return [{"a": self.a, "b": self.b, "protocol": self.protocol, "statistic": self.stat,
                 "a - b": format(self.value, "+.3f"), "paired": self.paired}]

    def verdicts(self) -> list[str]:
        v = self.value
        how = "" if self.paired else " (unpaired)"
        if not v.has_interval:
            return [f"{self.a} - {self.b} by the {self.stat} ({self.protocol}): {v:+.3f} (no interval)."]
        if v.above(0):
            return [f"{self.a} above {self.b} by the {self.stat} ({self.protocol}): {v:+.3f}{how}."]
        if v.below(0):
            return [f"{self.a} below {self.b} by the {self.stat} ({self.protocol}): {v:+.3f}{how}."]
        return [f"{self.a} and {self.b} not told apart by the {self.stat} ({self.protocol}): {v:+.3f}{how}."]


def difference(a: Distribution, b: Distribution, stat: str = "median") -> DistributionDifference:
    """`a`'s `stat` minus `b`'s, with the interval of the per-resample differences: paired when both
    share their context resamples (equal `resamples`), else over their independent resamples."""
    if a.protocol != b.protocol:
        raise ValueError(f"{a.name} is scored by {a.protocol}, {b.name} by {b.protocol}")
    value = a.stat(stat).value - b.stat(stat).value
    paired = a.interval == b.interval == "contexts" and bool(a.resamples) and a.resamples == b.resamples
    ba, bb = a.boot.get(stat), b.boot.get(stat)
    if ba is None or bb is None or len(ba) != len(bb) or not len(ba):
        return DistributionDifference(a.name, b.name, a.protocol, stat, Estimate(value), paired)
    return DistributionDifference(a.name, b.name, a.protocol, stat, _estimate(value, ba - bb), paired)


def summarize(values, name: str = "features", protocol: str = "scores", thresholds=None, boot=None,
              interval: str = "contexts", resamples: str = "", n_boot: int = 1000, seed: int = 0) -> Distribution:
    """The `Distribution` of per-feature scores `values` [F] (NaN: not scored). `boot` [B, F]: the
    scores on each resample (e.g. of contexts); without it the scored features are resampled
    (`n_boot` times, seeded by `seed` and `name`): an interval over features, unpaired."""
    thresholds = tuple(THRESHOLDS.get(protocol, (0.3, 0.5, 0.7)) if thresholds is None else thresholds)
    v = np.asarray(_numpy(values), dtype=np.float64).ravel()
    if boot is None:
        ok = np.flatnonzero(np.isfinite(v))
        if len(ok) and n_boot:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            boot = v[ok][rng.integers(0, len(ok), size=(n_boot, len(ok)))]
        else:
            boot = np.zeros((0, len(ok)))
        interval = "features"
        resamples = resamples or f"{n_boot} resamples of features"
    boot = np.asarray(boot, dtype=np.float64)
    full = _stats(v, thresholds)
    per = _stats(boot, thresholds) if boot.size else {k: np.zeros(0) for k in full}
    est = {k: _estimate(float(full[k]), per[k], k.startswith("share")) for k in full}
    return Distribution(name, protocol, est["median"], est["mean"], {_share_key(t): est[_share_key(t)] for t in thresholds},
                        est["top decile"], int(len(v)), int(np.isfinite(v).sum()), list(thresholds), interval,
                        resamples, v, {k: per[k] for k in per})


def heldout_distribution(score: HeldoutScore | Scored, key: str = "mcc", n_boot: int = 1000,
                         seed: int = 0) -> Distribution:
    """The `Distribution` (median, mean, shares above 0.3 / 0.5 / 0.7, top decile) of a held-out
    score's per-feature `key` (mcc or corr) over its scored features, with the held-out score's own
    intervals over resampled contexts (paired with any score of equal `resamples`); for a score that
    holds no resampled summaries, intervals over resampled features (`n_boot`, unpaired)."""
    score = score if isinstance(score, HeldoutScore) else score.result()
    per = score.features
    values = np.where(np.asarray(per["scored"], bool), np.asarray(per[key], dtype=np.float64), np.nan)
    boot = {summ: score.boot.get(statistic_key(key, summ)) for summ in SUMMARIES}
    if any(b is None or not len(b) for b in boot.values()):
        return summarize(values, score.name, f"heldout {key}", n_boot=n_boot, seed=seed)
    est = score.summary(key)
    thresholds = [0.3, 0.5, 0.7]
    return Distribution(score.name, f"heldout {key}", est["median"], est["mean"],
                        {_share_key(t): est[_share_key(t)] for t in thresholds}, est["top decile"],
                        int(len(values)), int(np.isfinite(values).sum()), thresholds, "contexts",
                        score.resamples, values, boot)


def plot_distributions(dists, ax=None):
    """ECDFs of the per-feature scores of `dists` (Distributions; one line each) on one axis."""
    dists = list(dists)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
    else:
        fig = ax.figure
    colors = plt.cm.tab20(np.arange(len(dists)) % 20) if len(dists) > 10 else [None] * len(dists)  # one colour each
    for d, color in zip(dists, colors):
        v = np.sort(d.values[np.isfinite(d.values)])
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color=color,
                    label=f"{d.name} (median {d.median.value:.2f})")
    for t in (dists[0].thresholds if dists else ()):
        ax.axvline(t, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel(f"{dists[0].protocol if dists else ''} score per feature")
    ax.set_ylabel("share of features at or below")
    if len(dists) > 4:  # many lines: the legend under the axis, clear of the curves
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.24), frameon=False)
    else:
        ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------ the split and its scores

class ProtocolSplit:
    """The two protocols from plain arrays: `labels` [N, C] (booleans, scipy sparse, or `Labels`) of N
    tokens grouped by `contexts` [N] (integer context ids; a context's tokens in their order). Contexts
    alternate between the explaining half (0) and the scoring half (1) in order of first appearance,
    or as `halves` [N] (0/1, constant within a context) says. The resamples of the scoring half's
    contexts are drawn once (`n_boot`, seeded by `seed`), and so are the random excerpts of each
    feature index, so every method scored on one split shares them. See the module docstring for the
    excerpts (`window`), the activity (`max_density`; features with fewer than `min_active` active
    tokens are not scored), the explainer (`explain_top`, `explain_random`, `min_excerpts`) and the
    scores (`score_top`, `score_random`; `n_activating`, `n_quantiles`, `n_non_activating`).
    `scored` [N] bool keeps the tokens that count (e.g. the ordinary, non-massive ones): the others are
    dropped before the contexts are cut into windows, and codes given for all N tokens are read at the
    kept ones. `score(codes)` scores one method, `chunk` features at a time; `excerpts(codes)` shows
    what it reads."""

    def __init__(self, labels, contexts, *, window: int = WINDOW, halves=None, label_names=None, scored=None,
                 n_boot: int = 200, seed: int = 0, max_density: float = MAX_DENSITY, min_active: int = MIN_ACTIVE,
                 explain_top: int = 10, explain_random: int = 5, min_excerpts: int = 2, score_top: int = 10,
                 score_random: int = 10, n_activating: int = 50, n_quantiles: int = 10,
                 n_non_activating: int = 50, chunk: int = 256):
        self.labels = as_labels(labels, label_names)
        L = sp.csr_matrix(self.labels.matrix, dtype=np.float64)
        L.data[:] = 1.0
        contexts = _numpy(contexts).ravel()
        self.n_given, self.keep = len(contexts), None
        if scored is not None:
            self.keep = _numpy(scored).astype(bool).ravel()
            if len(self.keep) != len(contexts) or L.shape[0] != len(contexts):
                raise ValueError(f"scored has {len(self.keep)} entries, contexts {len(contexts)}, labels "
                                 f"{L.shape[0]} rows: one per token each")
            L, contexts = L[self.keep], contexts[self.keep]
            halves = None if halves is None else _numpy(halves).ravel()[self.keep]
            self.labels = type(self.labels)(self.labels.names, self.labels.families, L)
        n = len(contexts)
        if L.shape[0] != n:
            raise ValueError(f"labels have {L.shape[0]} rows (tokens) and contexts {n}: one row per token")
        self.n, self.n_concepts, self.window = n, L.shape[1], int(window)
        self.n_boot, self.seed, self.max_density, self.min_active = n_boot, seed, max_density, min_active
        self.explain_top, self.explain_random, self.min_excerpts = explain_top, explain_random, min_excerpts
        self.score_top, self.score_random = score_top, score_random
        self.n_activating, self.n_quantiles, self.n_non_activating = n_activating, n_quantiles, n_non_activating
        self.chunk = chunk
        self.k_max = max(1, int(np.ceil(max_density * n)))
        self.ctx, self.ctx_half = context_halves(contexts, halves)
        self.n_ctx = len(self.ctx_half)
        # windows: each context cut into `window` consecutive tokens
        order = np.argsort(self.ctx, kind="stable")
        ctx_len = np.bincount(self.ctx, minlength=self.n_ctx)
        start = np.r_[0, np.cumsum(ctx_len)[:-1]]
        position = np.empty(n, np.int64)
        position[order] = np.arange(n) - start[self.ctx[order]]
        n_win = -(-ctx_len // self.window)
        win_start = np.r_[0, np.cumsum(n_win)[:-1]]
        self.win = win_start[self.ctx] + position // self.window                  # [N] window of each token
        self.n_windows = int(n_win.sum())
        self.win_ctx = np.repeat(np.arange(self.n_ctx), n_win)                    # [W]
        self.win_half = self.ctx_half[self.win_ctx]
        self.win_tokens = np.full((self.n_windows, self.window), -1, np.int64)     # [W, window], -1 padding
        self.win_tokens[self.win, position % self.window] = np.arange(n)
        self._win_rows = torch.from_numpy(np.where(self.win_tokens >= 0, self.win_tokens, n).ravel())
        onehot = sp.csr_matrix((np.ones(n), (self.win, np.arange(n))), shape=(self.n_windows, n))
        self.L = L
        Lw = (onehot @ L).tocoo()                                                 # [W, C] concept tokens per window
        self._token_keys = self._keys(L.tocoo())
        self._window_keys = self._keys(Lw)
        Lp = sp.csr_matrix((np.ones(len(Lw.data)), (Lw.row, Lw.col)), shape=Lw.shape)
        self.L_present = Lp                                                       # [W, C] 0/1 presence
        # the scoring half's context resamples: [B, n_ctx] counts (0 for the explaining half)
        rng = np.random.default_rng([seed, 11])
        members = np.flatnonzero(self.ctx_half == 1)
        self.weights = np.zeros((n_boot, self.n_ctx))
        if len(members) and n_boot:
            draws = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
            np.add.at(self.weights, (np.repeat(np.arange(n_boot), len(members)), draws.ravel()), 1.0)
        self.full_weights = (self.ctx_half == 1).astype(np.float64)

    def _keys(self, coo) -> np.ndarray:
        return np.unique(coo.row.astype(np.int64) * self.n_concepts + coo.col.astype(np.int64))

    @staticmethod
    def _member(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Whether each of `query` (int64 keys) is in the sorted `keys`."""
        if not len(keys):
            return np.zeros(query.shape, bool)
        pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return keys[pos] == query

    @property
    def resamples(self) -> str:
        """A fingerprint of the halves, windows and resamples: equal fingerprints, paired scores."""
        h = hashlib.sha1(self.ctx_half.tobytes() + self.win.tobytes() + self.weights.tobytes())
        return f"{self.n} tokens, {self.n_ctx} contexts, {len(self.weights)} resamples, {h.hexdigest()[:12]}"

    # -- pieces --------------------------------------------------------------------
    def _rng(self, tag: int, f0: int):
        return np.random.default_rng([self.seed, tag, f0])

    def _random_windows(self, half: int, n_pick: int, n_f: int, rng, allowed=None) -> np.ndarray:
        """[n_f, n_pick] windows of `half` drawn without replacement (an `allowed` [W, n_f] mask restricts
        them; -1 where too few)."""
        cand = np.flatnonzero(self.win_half == half)
        if n_pick <= 0 or not len(cand):
            return np.full((n_f, max(n_pick, 0)), -1, np.int64)
        keys = rng.random((n_f, len(cand)))
        if allowed is not None:
            keys = np.where(allowed[cand].T, keys, np.inf)
        m = min(n_pick, len(cand))
        pick = np.argpartition(keys, m - 1, axis=1)[:, :m] if m < len(cand) else np.argsort(keys, 1)[:, :m]
        out = np.where(np.isfinite(np.take_along_axis(keys, pick, 1)), cand[pick], -1)
        return np.pad(out, ((0, 0), (0, n_pick - m)), constant_values=-1)

    @staticmethod
    def _top_windows(key: torch.Tensor, n_pick: int) -> np.ndarray:
        """[F, n_pick] windows of the largest finite `key` [W, F] (-1 where fewer)."""
        m = min(n_pick, key.shape[0])
        v, i = key.topk(m, dim=0)
        out = torch.where(torch.isfinite(v), i, -1).T.numpy()
        return np.pad(out, ((0, 0), (0, n_pick - m)), constant_values=-1)

    def _explain(self, X: torch.Tensor, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The concept [F] whose indicator correlates best with the activation over each feature's
        excerpts [F, E] (-1 when no concept occurs in `min_excerpts` of them), and that correlation."""
        F = windows.shape[0]
        toks = self.window_tokens(windows)
        f, e, j = np.nonzero(toks >= 0)
        t = toks[f, e, j]
        x = X.numpy()[t, f].astype(np.float64)
        shape = (F, self.n)
        ones = sp.csr_matrix((np.ones(len(t)), (f, t)), shape=shape)
        xs = sp.csr_matrix((x, (f, t)), shape=shape)
        n = np.asarray(ones.sum(1)).ravel()[:, None]
        sx = np.asarray(xs.sum(1)).ravel()[:, None]
        sxx = np.bincount(f, weights=x * x, minlength=F)[:, None]
        sl = (ones @ self.L).toarray()
        sxl = (xs @ self.L).toarray()
        fw, ew = np.nonzero(windows >= 0)
        sel = sp.csr_matrix((np.ones(len(fw)), (fw, windows[fw, ew])), shape=(F, self.n_windows))
        support = (sel @ self.L_present).toarray()
        corr = _pearson(n, sx, sxx, sl, sxl)
        corr = np.where(support >= self.min_excerpts, np.nan_to_num(corr, nan=0.0), -np.inf)
        if not corr.shape[1]:
            return np.full(F, -1, np.int64), np.full(F, np.nan)
        best = corr.argmax(1)
        best_corr = corr[np.arange(F), best]
        return np.where(np.isfinite(best_corr), best, -1), np.where(np.isfinite(best_corr), best_corr, np.nan)

    def _per_context(self, values: np.ndarray, ctx: np.ndarray, W: np.ndarray) -> np.ndarray:
        """Σ over excerpts of `values` [F, E] weighted by their context's weight in each resample: [F, B]
        (`W` [n_ctx, B])."""
        F = values.shape[0]
        f = np.broadcast_to(np.arange(F)[:, None], values.shape)
        m = (values != 0) & (ctx >= 0)
        M = sp.csr_matrix((values[m], (f[m], ctx[m])), shape=(F, self.n_ctx))
        return np.asarray(M @ W)

    def _correlation(self, X: torch.Tensor, concept: np.ndarray, windows: np.ndarray, W: np.ndarray) -> np.ndarray:
        """The paper's score: correlation of the concept's indicator with the activation over the tokens
        of excerpts `windows` [F, E], per weighting in `W` [n_ctx, B]: [F, B]."""
        toks = self.window_tokens(np.where((concept >= 0)[:, None], windows, -1))
        valid = toks >= 0
        safe = np.maximum(toks, 0)
        f = np.arange(len(concept))[:, None, None]
        x = np.where(valid, X.numpy()[safe, np.broadcast_to(f, toks.shape)], 0.0).astype(np.float64)
        lab = valid & self._member(self._token_keys, safe * self.n_concepts + np.maximum(concept, 0)[:, None, None])
        ctx = np.where(windows >= 0, self.win_ctx[np.maximum(windows, 0)], -1)
        stats = [self._per_context(s.sum(2), ctx, W) for s in (valid.astype(float), x, x * x, lab.astype(float), x * lab)]
        n, sx, sxx, sl, sxl = stats
        out = np.nan_to_num(_pearson(n, sx, sxx, sl, sxl), nan=0.0)
        return np.where(n > 0, out, np.nan)

    def _detection_examples(self, key: torch.Tensor, active_win: torch.Tensor, rng) -> tuple[np.ndarray, np.ndarray]:
        """delphi's test examples of the scoring half: activating windows [F, n_activating] sampled
        across quantiles of their largest activation, non-activating windows [F, n_non_activating]."""
        cand = np.flatnonzero(self.win_half == 1)
        F = key.shape[1]
        nq, per = self.n_quantiles, max(1, self.n_activating // self.n_quantiles)
        if not len(cand):
            return np.full((F, nq * per), -1), np.full((F, self.n_non_activating), -1)
        k = torch.where(active_win[cand], key[cand], -torch.inf)                # [W1, F]
        ranked = k.argsort(dim=0, descending=True).T.numpy()                    # [F, W1] best first
        n_act = active_win[cand].sum(0).numpy()                                 # [F]
        size = np.maximum(n_act // nq, 1)                                       # delphi's quantile size
        j = np.arange(len(cand))[None, :]
        q = j // size[:, None]
        valid = (j < n_act[:, None]) & (q < nq)
        u = rng.random(ranked.shape)
        order = np.argsort(np.where(valid, q + u, np.inf), axis=1, kind="stable")
        q_sorted = np.take_along_axis(np.where(valid, q, nq), order, 1)
        rank = np.arange(len(cand))[None, :] - q_sorted * size[:, None]          # rank within its quantile
        take = (q_sorted < nq) & (rank < per)
        pos = np.argsort(~take, axis=1, kind="stable")[:, : nq * per]
        chosen = np.take_along_axis(np.take_along_axis(ranked, order, 1), pos, 1)
        act = np.where(np.take_along_axis(take, pos, 1), cand[chosen], -1)
        if act.shape[1] < nq * per:
            act = np.pad(act, ((0, 0), (0, nq * per - act.shape[1])), constant_values=-1)
        non = self._random_windows(1, self.n_non_activating, F, rng, allowed=~active_win.numpy())
        return act, non

    def _detection(self, concept: np.ndarray, act: np.ndarray, non: np.ndarray, W: np.ndarray) -> np.ndarray:
        """Balanced accuracy [F, B] of "the excerpt holds the concept" on activating `act` and
        non-activating `non` excerpts, per weighting in `W`."""
        has = lambda w: (w >= 0) & (concept >= 0)[:, None] & self._member(  # noqa: E731
            self._window_keys, np.maximum(w, 0) * self.n_concepts + np.maximum(concept, 0)[:, None])
        ctx = lambda w: np.where(w >= 0, self.win_ctx[np.maximum(w, 0)], -1)  # noqa: E731
        ok_a, ok_n = (act >= 0) & (concept >= 0)[:, None], (non >= 0) & (concept >= 0)[:, None]
        p = self._per_context(ok_a.astype(float), ctx(act), W)
        tp = self._per_context(has(act).astype(float), ctx(act), W)
        nn = self._per_context(ok_n.astype(float), ctx(non), W)
        tn = self._per_context((ok_n & ~has(non)).astype(float), ctx(non), W)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((p > 0) & (nn > 0), (tp / p + tn / nn) / 2, np.nan)

    # -- scores ----------------------------------------------------------------------
    def _check(self, codes, counts):
        shape = tuple(getattr(codes, "shape", ()))
        if self.keep is not None and len(shape) == 2 and shape[0] == self.n_given != self.n:
            codes = torch.as_tensor(codes)[torch.as_tensor(self.keep)]
            shape = tuple(codes.shape)
        if len(shape) != 2 or shape[0] != self.n:
            raise ValueError(f"codes must be [{self.n} tokens, features] like the labels, got shape {shape}")
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.int64)
            if len(counts) != shape[1]:
                raise ValueError(f"counts for {len(counts)} features, the codes have {shape[1]}")
        return torch.as_tensor(codes), counts

    def _chunk(self, codes: torch.Tensor, f0: int, f1: int, counts) -> dict:
        """The activity, the explainer's excerpts and choice, and the scoring excerpts of features f0..f1."""
        X = codes[:, f0:f1].detach().float().cpu()
        vals, idx, k = active_sets(*_top_tokens(X, self.k_max), self.k_max, None if counts is None else counts[f0:f1])
        fi, ki = np.nonzero(idx >= 0)
        if counts is not None:                                                   # the code on its top-n tokens only
            X = torch.zeros_like(X)
            X[torch.from_numpy(idx[fi, ki]), torch.from_numpy(fi)] = torch.from_numpy(vals[fi, ki]).float()
        padded = torch.cat([X, torch.full((1, f1 - f0), -torch.inf)])
        wmax = padded[self._win_rows].view(self.n_windows, self.window, f1 - f0).amax(1)   # [W, F]
        active_win = torch.zeros((self.n_windows, f1 - f0), dtype=torch.bool)
        active_win[torch.from_numpy(self.win[idx[fi, ki]]), torch.from_numpy(fi)] = True
        key = torch.where(active_win, wmax, -torch.inf)
        half = torch.from_numpy(self.win_half)[:, None]
        rng = self._rng(1, f0)
        explain = np.c_[self._top_windows(torch.where(half == 0, key, -torch.inf), self.explain_top),
                        self._random_windows(0, self.explain_random, f1 - f0, rng)]
        concept, explain_corr = self._explain(X, explain)
        scored = (k >= self.min_active) & (concept >= 0)
        score = np.c_[self._top_windows(torch.where(half == 1, key, -torch.inf), self.score_top),
                      self._random_windows(1, self.score_random, f1 - f0, rng)]
        activating, non_activating = self._detection_examples(wmax, active_win, rng)
        return {"X": X, "counts": k, "explain": explain, "concept": np.where(scored, concept, -1),
                "explain_corr": explain_corr, "scored": scored, "score": score, "activating": activating,
                "non_activating": non_activating}

    def excerpts(self, codes, counts=None) -> dict[str, np.ndarray]:
        """What `score` shows and reads, per feature of `codes` [N, F]: the windows [F, E] (-1: none) of
        the excerpts the explainer sees ("explain"), those the correlation is read on ("score"), and
        delphi's activating and non-activating test excerpts; the concept chosen (index, -1: not
        scored) and active tokens ("counts"). `window_tokens` gives a window's tokens."""
        codes, counts = self._check(codes, counts)
        keys = ("explain", "score", "activating", "non_activating", "concept", "counts")
        parts = [self._chunk(codes, f0, min(codes.shape[1], f0 + self.chunk), counts)
                 for f0 in range(0, codes.shape[1], self.chunk)]
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}

    def window_tokens(self, windows) -> np.ndarray:
        """The token indices [..., window] of `windows` (-1 padding: a short window, or no window)."""
        w = np.asarray(windows)
        return np.where((w >= 0)[..., None], self.win_tokens[np.maximum(w, 0)], -1)

    def score(self, codes, name: str = "features", counts=None, activity: str | None = None) -> "ProtocolScore":
        """Both protocols for the features of `codes` [N, F] (a tensor or array) at their natural
        activity, or with `counts` [F] at matched sparsity (each code kept on its top-n tokens)."""
        codes, counts = self._check(codes, counts)
        F = codes.shape[1]
        W = np.c_[self.full_weights, self.weights.T]                                 # [n_ctx, 1 + B]: all, resamples
        out = {k: np.full(F, np.nan) for k in ("explain_corr", "correlation", "detection")}
        out["concept"] = np.full(F, -1, np.int64)
        out["counts"] = np.zeros(F, np.int64)
        boot = {p: np.full((len(self.weights), F), np.nan) for p in PROTOCOLS}
        for f0 in range(0, F, self.chunk):
            f1 = min(F, f0 + self.chunk)
            c = self._chunk(codes, f0, f1, counts)
            for p, s in (("correlation", self._correlation(c["X"], c["concept"], c["score"], W)),
                         ("detection", self._detection(c["concept"], c["activating"], c["non_activating"], W))):
                s = np.where(c["scored"][:, None], s, np.nan)
                out[p][f0:f1], boot[p][:, f0:f1] = s[:, 0], s[:, 1:].T
            for key in ("concept", "explain_corr", "counts"):
                out[key][f0:f1] = c[key]
        names = [self.labels.names[c] if c >= 0 else "" for c in out["concept"]]
        dists = {p: summarize(out[p], name, p, boot=boot[p], resamples=self.resamples) for p in PROTOCOLS}
        features = {"concept": names, "concept_index": out["concept"].tolist(), "counts": out["counts"],
                    "explain_corr": out["explain_corr"], "correlation": out["correlation"], "detection": out["detection"]}
        return ProtocolScore(name, activity or ("natural" if counts is None else "matched"), dists["correlation"],
                             dists["detection"], features, self.resamples)


def _top_tokens(X: torch.Tensor, k_max: int):
    """`helpers.evals.features.top_tokens_of` of codes `X` [N, F] held in memory, in one `topk`: values
    [F, k_max], token indices [F, k_max] (-1 where not positive), positive tokens per feature [F] counted
    up to k_max (all that `active_sets` reads of them)."""
    v, i = X.topk(min(k_max, len(X)), dim=0)
    v, i = v.T.contiguous(), i.T.contiguous()
    if v.shape[1] < k_max:
        v = torch.nn.functional.pad(v, (0, k_max - v.shape[1]))
        i = torch.nn.functional.pad(i, (0, k_max - i.shape[1]), value=-1)
    return v, torch.where(v > 0, i, -1), (v > 0).sum(1)


def _pearson(n, sx, sxx, sl, sxl):
    """Pearson correlation of activation x and 0/1 indicator l from their sums (broadcasting); NaN where
    either has no variance."""
    var_x = np.maximum(n * sxx - sx ** 2, 0)
    var_l = np.maximum(n * sl - sl ** 2, 0)
    den = np.sqrt(var_x * var_l)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12 * np.maximum(n, 1) ** 2, (n * sxl - sx * sl) / np.where(den > 0, den, 1), np.nan)


@dataclass
class ProtocolScore(Result):
    """One method's features by both protocols: the `Distribution` of the paper's correlation score
    and of delphi's detection balanced accuracy (intervals over the scoring half's contexts), and
    per-feature arrays in `features`: concept (the explainer's choice; "" when not scored),
    concept_index, counts (active tokens), explain_corr (the correlation the explainer saw), correlation,
    detection (NaN when not scored). `activity`: "natural", "matched" or what the caller named it."""

    name: str
    activity: str
    correlation: Distribution
    detection: Distribution
    features: dict = field(default_factory=dict)
    resamples: str = ""

    def __post_init__(self):
        self.features = {k: list(v) if k == "concept" else np.asarray(v) for k, v in self.features.items()}

    def __getitem__(self, protocol: str) -> Distribution:
        return getattr(self, protocol)

    @property
    def counts(self) -> np.ndarray:
        """[F] active tokens per feature: the counts to match another method's sparsity to (`matched_counts`)."""
        return self.features["counts"]

    def rows(self) -> list[dict]:
        return [{"method": r.pop("method"), "activity": self.activity, **r} for p in PROTOCOLS for r in self[p].rows()]

    def verdicts(self) -> list[str]:
        return [v for p in PROTOCOLS for v in self[p].verdicts()]

    def plot(self):
        """ECDFs of the per-feature scores, one panel per protocol."""
        return _plot_panels({self.name: self})


def _plot_panels(scores: dict):
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(5 * len(PROTOCOLS), 3.6))
    for ax, p in zip(np.atleast_1d(axes), PROTOCOLS):
        plot_distributions([s[p] for s in scores.values()], ax=ax)
        ax.set_title({"correlation": "paper: correlation of simulation and activation",
                      "detection": "delphi: detection balanced accuracy"}[p], fontsize=10)
    fig.tight_layout()
    return fig


@dataclass
class ProtocolComparison(Result):
    """Several methods by both protocols on one split (the same halves, excerpt draws and context
    resamples), and the paired differences of every statistic for the `pairs` compared."""

    scores: dict[str, ProtocolScore] = field(default_factory=dict)
    differences: list[DistributionDifference] = field(default_factory=list)

    def __getitem__(self, name: str) -> ProtocolScore:
        return self.scores[name]

    def difference(self, a: str, b: str, protocol: str = "correlation", stat: str = "median") -> DistributionDifference:
        """`a` - `b` by `stat` under `protocol`, paired over the shared resamples."""
        found = [d for d in self.differences if (d.a, d.b, d.protocol, d.stat) == (a, b, protocol, stat)]
        return found[0] if found else difference(self.scores[a][protocol], self.scores[b][protocol], stat)

    def difference_rows(self) -> list[dict]:
        """Every paired difference, one row each."""
        return [r for d in self.differences for r in d.rows()]

    def table(self, protocol: str = "correlation"):
        """One protocol's rows as a pandas DataFrame (its own share columns only)."""
        return pd.DataFrame([r for r in self.rows() if r["protocol"] == protocol])

    def rows(self) -> list[dict]:
        return [r for s in self.scores.values() for r in s.rows()]

    def verdicts(self) -> list[str]:
        """Each method's summary, and the differences by the median, the mean and the share above the
        middle threshold (all statistics: `difference_rows`)."""
        def headline(d):
            t = self.scores[d.a][d.protocol].thresholds
            return d.stat in ("median", "mean") or (bool(t) and d.stat == _share_key(t[len(t) // 2]))
        return [v for s in self.scores.values() for v in s.verdicts()] + \
            [v for d in self.differences if headline(d) for v in d.verdicts()]

    def plot(self):
        """ECDFs of the per-feature scores of every method, one panel per protocol."""
        return _plot_panels(self.scores)


def protocol_scores(codes: dict, labels, contexts, *, match: dict | None = None, pairs=None, label_names=None,
                    seed: int = 0, split: ProtocolSplit | None = None, progress: bool = False,
                    **split_options) -> ProtocolComparison:
    """Both protocols for several methods ({name: codes [N, F]}) on one `ProtocolSplit` (built from
    `labels`, `contexts` and `split_options`, or the `split` given), each at its natural activity.
    `match` sets matched sparsity, as `helpers.evals.heldout.heldout_scores` does: {name: reference}
    scores that method with as many active tokens as the reference's features instead of at its
    natural activity (`matched_counts` of the reference's counts, seeded by `seed`); {new name: (name,
    reference)} adds the matched scoring as a further entry, beside the natural one. `pairs` [(a, b),
    ...] (default: every pair in order) get paired differences of every statistic under both protocols.
    `progress` shows a bar over the methods scored."""
    split = split or ProtocolSplit(labels, contexts, label_names=label_names, seed=seed, **split_options)
    match = {new: (new, v) if isinstance(v, str) else tuple(v) for new, v in (match or {}).items()}
    for new, (src, ref) in match.items():
        if src not in codes or ref not in codes:
            raise ValueError(f"match {new!r}: {src!r} and {ref!r} must name codes ({list(codes)})")
        if ref in match and match[ref][0] == ref:
            raise ValueError(f"{ref!r} is matched to {match[ref][1]!r} itself: match to a set scored at its own sparsity")
        if new in codes and new != src:
            raise ValueError(f"match {new!r}: the name is taken by codes")
    natural = [name for name in codes if not (name in match and match[name][0] == name)]
    bar = tqdm(total=len(natural) + len(match), desc="protocol scores", disable=not progress)
    scores = {}
    for name in natural:
        bar.set_postfix_str(name)
        scores[name] = split.score(codes[name], name)
        bar.update()
    for new, (src, ref) in match.items():
        bar.set_postfix_str(new)
        counts = matched_counts(torch.as_tensor(scores[ref].counts), int(codes[src].shape[1]), seed=seed,
                                min_active=split.min_active)
        scores[new] = split.score(codes[src], new, counts=counts, activity=f"matched to {ref}")
        bar.update()
    bar.close()
    names = [n for n in codes if n in scores] + [n for n in match if n not in codes]
    scores = {n: scores[n] for n in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] if pairs is None else list(pairs)
    diffs = [difference(scores[a][p], scores[b][p], s) for a, b in pairs for p in PROTOCOLS for s in scores[a][p].keys]
    return ProtocolComparison(scores, diffs)


# ------------------------------------------------------------------ a claim, measured every way

CLAIM_STATS = ("median", "mean", "share", "top decile")  # "share": the share above the middle threshold


@dataclass
class ClaimRow(Result):
    """One measure of a claim "a scores higher than b": the paired difference a - b of one statistic
    under one protocol, and its word: "holds" (the interval lies above 0), "fails" (below 0: b scores
    higher) or "cannot tell" (the interval holds 0, or there is none)."""

    measure: str
    statistic: str
    a: str
    b: str
    difference: Estimate
    paired: bool = True

    @property
    def word(self) -> str:
        d = self.difference
        return "holds" if d.above(0) else "fails" if d.below(0) else "cannot tell"

    def rows(self) -> list[dict]:
        return [{"measure": self.measure, "statistic": self.statistic, "a": self.a, "b": self.b,
                 "a - b": format(self.difference, "+.3f"), "paired": self.paired, "claim": self.word}]


@dataclass
class ClaimTable(Result):
    """A claim ("SAE features are more interpretable than random directions") measured every way: one
    `ClaimRow` per measure (a protocol and what b is, e.g. random directions dense or matched in
    sparsity) and statistic (median, mean, share above the middle threshold, top decile), with
    `verdicts()` saying by which measures it holds, fails, or cannot be told."""

    claim: str
    rows_: list[ClaimRow] = field(default_factory=list)
    where: str = ""

    def rows(self) -> list[dict]:
        return [r for row in self.rows_ for r in row.rows()]

    def words(self) -> dict[str, list[ClaimRow]]:
        """{"holds": rows, "fails": rows, "cannot tell": rows}."""
        out = {"holds": [], "fails": [], "cannot tell": []}
        for r in self.rows_:
            out[r.word].append(r)
        return out

    def verdicts(self) -> list[str]:
        where = f" ({self.where})" if self.where else ""
        out = [f"{self.claim}{where}: holds by {len(self.words()['holds'])} of {len(self.rows_)} measures, fails by "
               f"{len(self.words()['fails'])}, cannot tell by {len(self.words()['cannot tell'])}."]
        for word, rows in self.words().items():
            if rows:
                out.append(f"{word}: " + "; ".join(f"{r.measure}, {r.statistic} ({r.difference.value:+.3f})"
                                                   for r in rows) + ".")
        return out


def claim_table(claim: str, measures: dict, stats=CLAIM_STATS, where: str = "") -> ClaimTable:
    """`claim` ("a scores higher than b") by every measure: `measures` {label: (a, b)}, two
    `Distribution`s of one protocol each (e.g. `ProtocolScore.correlation`, or `heldout_distribution`
    of a held-out score), scored on the same resamples for paired intervals; `stats` the statistics
    compared ("share": the share above the protocol's middle threshold)."""
    rows = []
    for label, (a, b) in measures.items():
        for stat in stats:
            key = _share_key(a.thresholds[len(a.thresholds) // 2]) if stat == "share" else stat
            d = difference(a, b, key)
            rows.append(ClaimRow(label, key, a.name, b.name, d.value, d.paired))
    return ClaimTable(claim, rows, where)


class _Encoded(Mapping):
    """{name: codes} read lazily: each dictionary's codes of its activations (`inputs[name]`, else `x`),
    computed when asked for, not kept."""

    def __init__(self, dictionaries: dict, x: torch.Tensor, inputs: dict, batch_size: int):
        self.dictionaries, self.x, self.inputs, self.batch_size = dictionaries, x, inputs, batch_size

    def __getitem__(self, name):
        return encode_batched(self.dictionaries[name], self.inputs.get(name, self.x), self.batch_size)

    def __iter__(self):
        return iter(self.dictionaries)

    def __len__(self):
        return len(self.dictionaries)


def dictionary_protocol_scores(dictionaries: dict, x, labels, contexts, *, inputs: dict | None = None,
                               match: dict | None = None, pairs=None, batch_size: int = 4096,
                               **options) -> ProtocolComparison:
    """`protocol_scores` for dictionaries ({name: anything with `encode`, e.g. a Dictionary or an SAE})
    on activations `x` [N, d_in] (`inputs` {name: activations of the same N tokens} for a dictionary
    that reads others, e.g. an SAE of another model): each dictionary's codes are computed when it is
    scored, so one [N, n_features] matrix is in memory at a time."""
    inputs = {name: torch.as_tensor(v) for name, v in (inputs or {}).items()}
    unknown = set(inputs) - set(dictionaries)
    if unknown:
        raise ValueError(f"inputs for {sorted(unknown)}, which are not among the dictionaries {list(dictionaries)}")
    return protocol_scores(_Encoded(dictionaries, torch.as_tensor(x), inputs, batch_size), labels, contexts,
                           match=match, pairs=pairs, **options)


# ------------------------------------------------------------------ the gap over training budgets, by each protocol

BUDGET_CODE = ("helpers.evals.protocols", "helpers.evals.heldout", "helpers.saes.train", "helpers.saes.stack",
               "helpers.activations.massive")


@dataclass
class BudgetPoint(Result):
    """One training budget: the paired gap SAE - random directions (`gaps` {measure: Estimate}, a
    statistic of the per-feature scores with its 95% interval over resampled contexts) by each measure."""

    tokens: int
    gaps: dict[str, Estimate] = field(default_factory=dict)


def _word(d: Estimate) -> str:
    return "holds" if d.above(0) else "fails" if d.below(0) else "cannot tell"


@dataclass
class BudgetCurve(Result):
    """Does the gap SAE - random directions move with training, by each protocol? One `BudgetPoint` per
    budget (the same SAE snapshots for every measure), the gaps of one `statistic` (e.g. the median).
    `verdicts()` says, per measure, how far the gap moves from the first budget to the last and the
    claim's word ("holds": the SAE scores higher) at each end; `plot()` draws the gaps against tokens."""

    points: list[BudgetPoint] = field(default_factory=list)
    statistic: str = "median"

    @property
    def measures(self) -> list[str]:
        return list(dict.fromkeys(m for p in self.points for m in p.gaps))

    def gap(self, measure: str) -> list[Estimate]:
        """The gaps of one measure, budget by budget (a valueless Estimate where a budget lacks it)."""
        return [p.gaps.get(measure, Estimate(float("nan"))) for p in self.points]

    def moves(self, measure: str) -> float:
        """The gap at the last budget minus the gap at the first."""
        g = self.gap(measure)
        return float(g[-1].value - g[0].value) if len(g) > 1 else 0.0

    def clear_move(self, measure: str) -> int:
        """+1 if the gap's interval at the last budget lies above its interval at the first, -1 if below,
        0 if they overlap (or a budget lacks the measure)."""
        g = self.gap(measure)
        if len(g) < 2 or not np.isfinite(g[0].value) or not np.isfinite(g[-1].value):
            return 0
        return 1 if g[-1].low > g[0].high else -1 if g[-1].high < g[0].low else 0

    def rows(self) -> list[dict]:
        return [{"training tokens": p.tokens, **{f"{m}: SAE - random": format(p.gaps[m], "+.3f")
                                                 for m in self.measures if m in p.gaps}} for p in self.points]

    def verdicts(self) -> list[str]:
        if not self.points:
            return ["No budget scored."]
        first, last = self.points[0].tokens, self.points[-1].tokens
        out = []
        for m in self.measures:
            g = self.gap(m)
            if len(g) > 1:
                out.append(f"{m}: the {self.statistic} gap SAE - random goes from {g[0]:+.3f} ({_word(g[0])}) at "
                           f"{first:,} training tokens to {g[-1]:+.3f} ({_word(g[-1])}) at {last:,}, "
                           f"a move of {self.moves(m):+.3f}.")
            else:
                out.append(f"{m}: the {self.statistic} gap SAE - random is {g[0]:+.3f} ({_word(g[0])}) at {first:,} tokens.")
        if len(self.points) > 1 and len(self.measures) > 1:
            way = {m: self.clear_move(m) for m in self.measures}
            ups, downs, flat = ([m for m in self.measures if way[m] == w] for w in (1, -1, 0))
            if len(ups) == len(self.measures):
                out.append("With more training the gap moves toward the SAE (up) by every measure.")
            elif len(downs) == len(self.measures):
                out.append("With more training the gap moves away from the SAE (down) by every measure.")
            elif len(flat) == len(self.measures):
                out.append("With more training the gap moves clearly by no measure (each measure's intervals at "
                           "the first and last budgets overlap).")
            else:
                parts = ([f"toward the SAE by {', '.join(ups)}"] if ups else []) + \
                        ([f"away from it by {', '.join(downs)}"] if downs else []) + \
                        ([f"not clearly by {', '.join(flat)} (intervals at the first and last budgets overlap)"]
                         if flat else [])
                out.append("With more training the gap moves " + "; ".join(parts) +
                           (": the protocols disagree on the trend." if ups and downs else "."))
        return out

    def plot(self, ax=None):
        """The gap of every measure against training tokens, with its 95% interval; 0 marked."""
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.5, 4))
        else:
            fig = ax.figure
        t = np.array([p.tokens for p in self.points], dtype=np.float64)
        for j, m in enumerate(self.measures):
            g = self.gap(m)
            y = np.array([e.value for e in g])
            lo = np.array([e.low if e.has_interval else e.value for e in g])
            hi = np.array([e.high if e.has_interval else e.value for e in g])
            shift = 1.0 + 0.03 * (j - (len(self.measures) - 1) / 2)  # side by side on the log axis
            ax.errorbar(t * shift, y, yerr=np.clip([y - lo, hi - y], 0, None), marker="o", capsize=3, label=m)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"SAE - random, {self.statistic} per feature")
        ax.set_title("Does the gap move with training? Each protocol on the same snapshots", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def budget_curve(snapshots: dict[int, ProtocolComparison], heldout=None, statistic: str = "median",
                 pairs: dict | None = None) -> BudgetCurve:
    """A `BudgetCurve` from each budget's `ProtocolComparison` ({training tokens: comparison}, e.g. one
    `protocol_scores` per SAE snapshot) and, optionally, the held-out MCC gaps of the same snapshots
    (`heldout`: {training tokens: Estimate}, e.g. from `helpers.evals.heldout.InterpretabilityCurve`).
    `pairs` {measure: (a, b, protocol)} names the differences read (default: the SAE against random
    directions dense and at the SAE's sparsity, by the paper's correlation and by detection)."""
    pairs = pairs or {
        "paper's correlation, random dense": ("SAE", "random directions", "correlation"),
        "paper's correlation, random at the SAE's sparsity": ("SAE", "random (SAE's sparsity)", "correlation"),
        "detection, random at the SAE's sparsity": ("SAE", "random (SAE's sparsity)", "detection"),
    }
    tokens = sorted(set(snapshots) | set(heldout or {}))
    points = []
    for t in tokens:
        gaps = {}
        if heldout and t in heldout:
            gaps["held-out MCC (ours), random at the SAE's sparsity"] = heldout[t]
        comp = snapshots.get(t)
        for label, (a, b, protocol) in pairs.items():
            if comp is not None and a in comp.scores and b in comp.scores:
                gaps[label] = comp.difference(a, b, protocol, statistic).value
        points.append(BudgetPoint(int(t), gaps))
    return BudgetCurve(points, statistic)


def snapshot_protocol_scores(profile, store, sweep, random, x, labels, contexts, *, index: int | None = None,
                             points: int = 3, scored=None, seed: int = 0, checkpoint_dir=None,
                             progress: bool = False, **options) -> dict[int, ProtocolComparison]:
    """Both protocols for snapshots of one sweep SAE (default: the chosen one) over training, beside
    `random` directions dense and at each snapshot's sparsity: {training tokens: ProtocolComparison}.

    The snapshots are `helpers.evals.heldout.curve_snapshots`, the interpretability curve's (trained
    once per process and, with `checkpoint_dir`, kept under it). Each snapshot's codes of `x` [N, d_in]
    (the activations of the tokens `labels` and `contexts` describe) are scored on one `ProtocolSplit`
    (`scored`, `seed`, `options`), shared by every snapshot, so the budgets' scores are paired too."""
    snapshots = curve_snapshots(profile, store, sweep, index, points, checkpoint_dir=checkpoint_dir,
                                progress=progress)
    x = torch.as_tensor(x)
    split = ProtocolSplit(labels, contexts, scored=scored, seed=seed, **options)
    rand_codes = encode_batched(random, x)
    dense = split.score(rand_codes, "random directions")
    out = {}
    for n_tokens, snap in tqdm(sorted(snapshots.items()), desc="snapshots by both protocols", disable=not progress):
        sae = split.score(encode_batched(SAEDictionary(snap, name="SAE"), x), "SAE")
        counts = matched_counts(torch.as_tensor(sae.counts), int(rand_codes.shape[1]), seed=seed,
                                min_active=split.min_active)
        matched = split.score(rand_codes, "random (SAE's sparsity)", counts=counts, activity="matched to SAE")
        scores = {"SAE": sae, "random directions": dense, "random (SAE's sparsity)": matched}
        diffs = [difference(sae[p], other[p], s) for other in (dense, matched) for p in PROTOCOLS for s in sae[p].keys]
        out[int(n_tokens)] = ProtocolComparison(scores, diffs)
    return out

