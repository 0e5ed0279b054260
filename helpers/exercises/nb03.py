"""The exercises of notebook 03: references, random cases and known mistakes.

03.1 feature statistics (density, max, mean when active), 03.2 the density histogram's statistics (dead
and dense shares, median log density), 03.3 a feature's top activating contexts, 03.4 the concept score
(MCC of "feature active" with "concept present"), 03.5 the held-out concept score (the concept chosen on
one half of the contexts, scored on the other), 03.6 the sparsity-matched null (a direction active on
exactly its top-k tokens, and its best concept's MCC). The references are the workbook's
own code (helpers.evals.features.feature_stats, helpers.evals.heldout) wherever it has one, fed the exercise's
tensors through a small in-memory store; the top contexts have a short reference here (the workbook
ranks tokens, not contexts).
"""
from __future__ import annotations

import numpy as np
import torch

from helpers.evals.features import feature_stats
from helpers.evals.heldout import heldout_score, mcc_from_counts

from .core import Exercise, register

HOOK = "exercise"


# ------------------------------------------------------------------ the workbook's helpers on plain tensors

class _Codes:
    """A stand-in Dictionary whose "activations" are already codes: encode is the identity, so the
    workbook's store-based helpers (feature_stats, top_tokens) run on an exercise's codes [N, F]."""

    name = "codes"
    hook_name = HOOK

    def __init__(self, n_features: int):
        self.n_features = n_features

    def check_store(self, store, hook=None):
        return HOOK

    def encode(self, x):
        return x


class _Store:
    """A stand-in activation store holding one tensor [N, F] under the hook ``HOOK``."""

    hooks = [HOOK]

    def __init__(self, x: torch.Tensor, batch_rows: int | None = None):
        self.x = x.float()
        self.n_tokens, self.d_model = x.shape
        self.batch_rows = batch_rows  # serve smaller batches than asked (exercises the merge across batches)

    def iter_batches(self, hook, batch_size, *, shuffle=False, return_index=False, **kw):
        step = min(batch_size, self.batch_rows or batch_size)
        for i in range(0, self.n_tokens, step):
            xb = self.x[i:i + step]
            yield (xb, torch.arange(i, i + len(xb))) if return_index else xb


# ------------------------------------------------------------------ 03.1 feature statistics

def _stats_reference(codes: torch.Tensor):
    st = feature_stats(_Codes(codes.shape[1]), _Store(codes, batch_rows=512), k=1, sample=1,
                       progress=False)
    return st.density, st.max_act, st.mean_act


def _stats_mean_over_all(codes):
    a = codes > 0
    return a.float().mean(0), codes.max(0).values.clamp_min(0), codes.mean(0)


def _stats_count(codes):
    a = codes > 0
    return a.float().sum(0), codes.max(0).values.clamp_min(0), codes.sum(0) / a.sum(0).clamp_min(1)


def _stats_nonnegative(codes):
    a = codes >= 0
    return a.float().mean(0), codes.max(0).values.clamp_min(0), codes.sum(0) / (codes > 0).sum(0).clamp_min(1)


def _sparse_codes(gen, n, f, p=0.1):
    """Non-negative codes [n, f], each feature active on about a share p of the rows, one feature dead."""
    on = torch.rand(n, f, generator=gen) < p
    codes = torch.rand(n, f, generator=gen) * 3 * on
    codes[:, -1] = 0.0  # a dead feature: its mean activation is 0 by the workbook's rule, not 0/0
    return codes


def _stats_cases(gen):
    return [dict(codes=_sparse_codes(gen, 200, 12)), dict(codes=_sparse_codes(gen, 37, 5, p=0.4)),
            dict(codes=_sparse_codes(gen, 500, 30, p=0.02))]


register(Exercise(
    id="03.1", name="feature_statistics", reference=_stats_reference, random_cases=_stats_cases,
    mistakes=((_stats_mean_over_all, "the mean activation is over the tokens where the feature is active "
                                     "(code > 0), not over every token"),
              (_stats_count, "density is the share of tokens on which the feature is active, not their number"),
              (_stats_nonnegative, "a feature is active where its code is > 0: with >= 0 every token counts")),
))


# ------------------------------------------------------------------ 03.2 the density histogram's statistics

def _density_reference(density: torch.Tensor, dense_above: float):
    d = density.double()
    alive = d > 0
    med = d[alive].log10().median() if alive.any() else torch.tensor(float("nan"), dtype=torch.float64)
    return torch.stack([(~alive).double().mean(), (d > dense_above).double().mean(), med])


def _density_median_all(density, dense_above):
    d = density.double()
    return torch.stack([(d == 0).double().mean(), (d > dense_above).double().mean(),
                        d.clamp_min(1e-12).log10().median()])


def _density_ln(density, dense_above):
    d = density.double()
    alive = d > 0
    return torch.stack([(~alive).double().mean(), (d > dense_above).double().mean(), d[alive].log().median()])


def _density_counts(density, dense_above):
    d = density.double()
    alive = d > 0
    return torch.stack([(~alive).double().sum(), (d > dense_above).double().sum(), d[alive].log10().median()])


def _density_cases(gen):
    cases = []
    for f, dead, dense in ((40, 5, 3), (101, 0, 10), (17, 4, 0)):
        d = 10 ** (-4 * torch.rand(f, generator=gen, dtype=torch.float64) - 1)   # alive: 1e-5 to 1e-1
        d[:dead] = 0.0
        d[dead:dead + dense] = 0.2 + 0.5 * torch.rand(dense, generator=gen, dtype=torch.float64)
        cases.append(dict(density=d[torch.randperm(f, generator=gen)], dense_above=0.1))
    return cases


register(Exercise(
    id="03.2", name="density_summary", reference=_density_reference, random_cases=_density_cases,
    mistakes=((_density_median_all, "the median log density is over the features that fire (density > 0): a dead "
                                    "feature has no log density, and counting it drags the median down"),
              (_density_ln, "the histogram's axis is log10 of the density, not the natural log"),
              (_density_counts, "the first two are shares of the features (a mean), not their numbers")),
))


# ------------------------------------------------------------------ 03.3 top activating contexts

def _contexts_max(codes, ctx):
    ids, inv = torch.unique(ctx, return_inverse=True)  # sorted context ids
    mx = torch.zeros(len(ids), dtype=codes.dtype).scatter_reduce(0, inv, codes, "amax", include_self=True)
    return ids, mx


def _top_contexts_reference(codes: torch.Tensor, ctx: torch.Tensor, k: int):
    ids, mx = _contexts_max(codes, ctx)
    order = torch.argsort(mx, descending=True, stable=True)  # ties: the lower context id first
    order = order[mx[order] > 0][:k]
    return ids[order], mx[order]


def _top_contexts_tokens(codes, ctx, k):
    vals, idx = codes.topk(min(k, int((codes > 0).sum())))
    return ctx[idx], vals


def _top_contexts_sum(codes, ctx, k):
    ids, inv = torch.unique(ctx, return_inverse=True)
    total = torch.zeros(len(ids), dtype=codes.dtype).index_add(0, inv, codes)
    order = torch.argsort(total, descending=True, stable=True)
    order = order[total[order] > 0][:k]
    return ids[order], total[order]


def _top_contexts_with_silent(codes, ctx, k):
    ids, mx = _contexts_max(codes, ctx)
    order = torch.argsort(mx, descending=True, stable=True)[:k]
    return ids[order], mx[order]


def _top_contexts_cases(gen):
    cases = []
    for n_ctx, per, k, p in ((6, 8, 3, 0.3), (12, 5, 5, 0.2), (5, 10, 8, 0.1)):
        ctx = torch.arange(n_ctx).repeat_interleave(per) * 7 + 3      # ids need not start at 0 or be contiguous
        on = torch.rand(len(ctx), generator=gen) < p
        codes = torch.randint(1, 5, (len(ctx),), generator=gen).float() / 2 * on  # few values: ties happen
        cases.append(dict(codes=codes, ctx=ctx, k=k))
    return cases


register(Exercise(
    id="03.3", name="top_contexts", reference=_top_contexts_reference, random_cases=_top_contexts_cases,
    mistakes=((_top_contexts_tokens, "you took the top k *tokens*: a context with several strong tokens then "
                                     "appears more than once. Take each context's maximum first"),
              (_top_contexts_sum, "a context is ranked by its largest activation, not by the sum of them"),
              (_top_contexts_with_silent, "contexts where the feature never fires (maximum 0) are not among "
                                          "its top contexts: keep only those with a maximum > 0")),
))


# ------------------------------------------------------------------ 03.4 the concept score (MCC)

def _counts(active, labels):
    a, lab = active.double(), labels.double()
    return (a.T @ lab).numpy(), a.sum(0)[:, None].numpy(), lab.sum(0)[None, :].numpy(), float(len(a))


def _mcc_reference(active: torch.Tensor, labels: torch.Tensor):
    return torch.as_tensor(mcc_from_counts(*_counts(active, labels)))


def _mcc_accuracy(active, labels):
    tp, pos, tot, n = _counts(active, labels)
    fp, fn = pos - tp, tot - tp
    return torch.as_tensor((tp + (n - tp - fp - fn)) / n)


def _mcc_precision(active, labels):
    tp, pos, tot, n = _counts(active, labels)
    return torch.as_tensor(np.where(pos > 0, tp / np.maximum(pos, 1), 0.0))


def _mcc_no_sqrt(active, labels):
    tp, pos, tot, n = _counts(active, labels)
    fp, fn = pos - tp, tot - tp
    tn = n - tp - fp - fn
    den = pos * (n - pos) * tot * (n - tot)
    return torch.as_tensor(np.where(den > 0, (tp * tn - fp * fn) / np.maximum(den, 1e-30), 0.0))


def _mcc_cases(gen):
    cases = []
    for n, f, c in ((300, 6, 5), (80, 4, 9), (1000, 10, 3)):
        labels = torch.rand(n, c, generator=gen) < torch.rand(c, generator=gen) * 0.5
        labels[:, -1] = False  # a concept never present: its MCC is 0 by convention, not 0/0
        # features that partly follow a concept, plus one that never fires
        follow = labels[:, torch.randint(c, (f,), generator=gen)]
        noise = torch.rand(n, f, generator=gen) < 0.1
        active = (follow & (torch.rand(n, f, generator=gen) < 0.8)) | noise
        active[:, 0] = False
        cases.append(dict(active=active, labels=labels))
    return cases


register(Exercise(
    id="03.4", name="mcc_table", reference=_mcc_reference, random_cases=_mcc_cases,
    mistakes=((_mcc_accuracy, "this is the accuracy (tp + tn) / n: not chance-corrected, so a feature that "
                              "never fires scores high with every rare concept. MCC = (tp·tn - fp·fn) / sqrt(...)"),
              (_mcc_precision, "this is the precision tp / (tp + fp): it ignores the tokens that carry the "
                               "concept where the feature is silent"),
              (_mcc_no_sqrt, "the denominator is the square root of (tp+fp)(tp+fn)(tn+fp)(tn+fn)")),
))


# ------------------------------------------------------------------ 03.5 the held-out concept score

def _heldout_reference(active: torch.Tensor, labels: torch.Tensor, half: torch.Tensor, min_count: int):
    """`heldout_score` with every active token counted (max_density 1) and every token its own context in
    the given half: its per-feature held-out MCC."""

    r = heldout_score(active, labels, torch.arange(len(half)), halves=half, max_density=1.0,
                      min_count=min_count, min_active=1, n_boot=0)
    return torch.as_tensor(r.features["mcc"])


def _table(active, labels):
    return _mcc_reference(active, labels)


def _heldout_in_sample(active, labels, half, min_count):
    m = _table(active, labels)
    ok = labels.sum(0) >= min_count
    return m.masked_fill(~ok[None, :], -torch.inf).max(1).values


def _heldout_same_half(active, labels, half, min_count):
    out = []
    for h in (0, 1):
        s = half == h
        m = _table(active[s], labels[s])
        ok = labels[s].sum(0) >= min_count
        out.append(m.masked_fill(~ok[None, :], -torch.inf).max(1).values)
    return (out[0] + out[1]) / 2


def _heldout_no_min_count(active, labels, half, min_count):
    return _heldout_reference(active, labels, half, 0)


def _heldout_one_way(active, labels, half, min_count):
    first, second = half == 0, half == 1
    m = _table(active[first], labels[first])
    ok = labels[first].sum(0) >= min_count
    best = m.masked_fill(~ok[None, :], -torch.inf).argmax(1)
    return _table(active[second], labels[second])[torch.arange(active.shape[1]), best]


def _heldout_cases(gen):
    cases = []
    for n_ctx, per, f, c, min_count in ((20, 10, 6, 8, 5), (30, 6, 4, 12, 3), (16, 16, 8, 6, 10)):
        n = n_ctx * per
        half = (torch.arange(n_ctx) % 2).repeat_interleave(per)          # contexts alternate between halves
        rate = torch.rand(c, generator=gen) * 0.3
        rate[-1] = 0.01                                                    # a rare concept: too rare to be chosen
        labels = torch.rand(n, c, generator=gen) < rate
        follow = labels[:, torch.randint(c, (f,), generator=gen)]
        active = (follow & (torch.rand(n, f, generator=gen) < 0.7)) | (torch.rand(n, f, generator=gen) < 0.05)
        active[:, -1] = labels[:, -1]                                      # follows the rare concept exactly
        cases.append(dict(active=active, labels=labels, half=half, min_count=min_count))
    return cases


register(Exercise(
    id="03.5", name="heldout_mcc", reference=_heldout_reference, random_cases=_heldout_cases,
    mistakes=((_heldout_in_sample, "you chose the best concept and read its score on the same tokens (in-sample): "
                                   "choose on one half, score on the other"),
              (_heldout_same_half, "each half's concept was scored on the half it was chosen on: score it on the "
                                   "*other* half"),
              (_heldout_one_way, "only one direction: choose on half 0 and score on half 1, then choose on half 1 "
                                 "and score on half 0, and average the two"),
              (_heldout_no_min_count, "a concept present fewer than min_count times in the choosing half may not "
                                      "compete (it could match a sparse feature by chance)")),
))


# ------------------------------------------------------------------ 03.6 the sparsity-matched null

def _top_k_active(codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(codes, dim=0, descending=True, stable=True)           # [n, F] each feature's ranking
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(len(codes))[:, None].expand_as(order))  # [n, F] each token's rank
    return rank < counts[None, :]


def _best_mcc(active, labels):
    return _mcc_reference(active, labels).max(1).values


def _null_reference(codes: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor):
    return _best_mcc(_top_k_active(codes, counts.long()), labels)


def _null_natural(codes, counts, labels):
    return _best_mcc(codes > 0, labels)


def _null_one_k(codes, counts, labels):
    return _best_mcc(_top_k_active(codes, torch.full_like(counts.long(), int(counts.max()))), labels)


def _null_global(codes, counts, labels):
    k = int(counts.sum())
    tau = codes.flatten().topk(k).values[-1]
    return _best_mcc(codes >= tau, labels)


def _null_cases(gen):
    cases = []
    for n, f, c in ((400, 8, 6), (150, 5, 10), (900, 12, 4)):
        codes = torch.randn(n, f, generator=gen, dtype=torch.float64).clamp_min(0) + \
            torch.rand(n, f, generator=gen, dtype=torch.float64) * 1e-3               # positive, no ties
        counts = torch.randint(3, n // 6, (f,), generator=gen)
        labels = torch.rand(n, c, generator=gen) < torch.rand(c, generator=gen) * 0.3
        labels[:, 0] |= codes[:, 0] > codes[:, 0].quantile(0.9)                      # one feature has a concept
        cases.append(dict(codes=codes, counts=counts, labels=labels))
    return cases


register(Exercise(
    id="03.6", name="matched_null_mcc", reference=_null_reference, random_cases=_null_cases,
    mistakes=((_null_natural, "the null is active on exactly counts[f] tokens (its largest codes), not wherever "
                              "its code is > 0: matching the sparsity is the point"),
              (_null_one_k, "each feature has its own count: counts[f] tokens for feature f, not one k for all"),
              (_null_global, "one threshold over the whole matrix gives each feature a different number of tokens: "
                             "rank the tokens per feature (along dim 0) and keep each one's top counts[f]")),
))
