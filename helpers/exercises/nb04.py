"""The exercises of notebook 04: references, random cases and known mistakes.

04.1 PCA as a dictionary (fitted with scikit-learn, encoded by the signed-halves rule), 04.2 matched
sparsity (each feature active on exactly its top-k tokens), 04.3 sparse probing's choice of latents,
04.4 random directions as a dictionary, 04.5 a paired difference of medians with a bootstrap interval over
contexts. The references are the workbook's own: helpers.dictionaries.baselines.fit_pca with
LinearDictionary.encode, helpers.evals.heldout.active_sets (on helpers.evals.features.top_tokens_of),
helpers.evals.probing.top_k_mean_diff, LinearDictionary.encode for 04.4, and for 04.5 the re-centred
percentile interval of helpers.evals.protocols (`_estimate`) on resamples drawn here.
"""
from __future__ import annotations

import numpy as np
import torch

from helpers.dictionaries.baselines import fit_pca
from helpers.dictionaries.dictionary import LinearDictionary
from helpers.evals.features import top_tokens_of
from helpers.evals.heldout import active_sets
from helpers.evals.probing import top_k_mean_diff
from helpers.evals.protocols import _estimate

from .core import Exercise, register
from .nb03 import HOOK, _Store


class _Activations(_Store):
    """The in-memory store of nb03, with `activations` too (what fit_pca reads)."""

    def activations(self, hook, max_tokens=None, dtype=torch.float32):
        return self.x[:max_tokens].to(dtype)


# ------------------------------------------------------------------ 04.1 PCA as a dictionary

def _pca_reference(x: torch.Tensor, n_components: int):
    d = fit_pca(_Activations(x), HOOK, n_components=n_components, max_tokens=len(x))
    return d.encode(x)


def _pca_parts(x, n_components):
    from sklearn.decomposition import PCA

    pca = PCA(n_components=n_components, svd_solver="full").fit(x.double().numpy())
    return torch.as_tensor(pca.components_, dtype=torch.float32), torch.as_tensor(pca.mean_, dtype=torch.float32)


def _pca_uncentred(x, n_components):
    comps, _ = _pca_parts(x, n_components)
    s = x.float() @ comps.T
    return torch.cat([s.relu(), (-s).relu()], dim=-1)


def _pca_halves_swapped(x, n_components):
    comps, mean = _pca_parts(x, n_components)
    s = (x.float() - mean) @ comps.T
    return torch.cat([(-s).relu(), s.relu()], dim=-1)


def _pca_interleaved(x, n_components):
    comps, mean = _pca_parts(x, n_components)
    s = (x.float() - mean) @ comps.T
    return torch.stack([s.relu(), (-s).relu()], dim=-1).flatten(-2)


def _pca_cases(gen):
    cases = []
    for n, d, k in ((200, 8, 4), (60, 12, 12), (300, 6, 2)):
        scales = torch.linspace(3.0, 0.3, d)                     # distinct variances: well-defined components
        rot = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
        x = (torch.randn(n, d, generator=gen) * scales) @ rot.T + torch.randn(d, generator=gen) * 2
        cases.append(dict(x=x, n_components=k))
    return cases


register(Exercise(
    id="04.1", name="pca_codes", reference=_pca_reference, random_cases=_pca_cases, atol=1e-4,
    mistakes=((_pca_uncentred, "the codes are taken around the data mean: s = (x - pca.mean_) @ components.T"),
              (_pca_halves_swapped, "the positive halves come first (features 0..k-1: ReLU(s)), then the negative "
                                    "ones (k..2k-1: ReLU(-s))"),
              (_pca_interleaved, "the halves are two blocks, [ReLU(s), ReLU(-s)] concatenated along the last "
                                 "dimension, not interleaved direction by direction")),
))


# ------------------------------------------------------------------ 04.2 matched sparsity: exact top-k activity

def _active_reference(codes: torch.Tensor, counts: torch.Tensor):
    n, f = codes.shape
    k_max = max(1, min(n, int(torch.as_tensor(counts).max())))
    _, idx, _ = active_sets(*top_tokens_of(codes, k_max, batch_size=64), k_max, counts)
    out = torch.zeros(n, f, dtype=torch.bool)
    rows, cols = np.nonzero(idx >= 0)
    out[torch.as_tensor(idx[rows, cols]), torch.as_tensor(rows)] = True
    return out


def _active_all_positive(codes, counts):
    return codes > 0


def _active_uncapped(codes, counts):
    out = torch.zeros(codes.shape, dtype=torch.bool)
    for f in range(codes.shape[1]):
        out[codes[:, f].topk(min(int(counts[f]), len(codes))).indices, f] = True
    return out


def _active_cases(gen):
    cases = []
    for n, f, p in ((100, 6, 0.5), (40, 10, 0.2), (300, 4, 0.05)):
        codes = torch.relu(torch.randn(n, f, generator=gen)) * (torch.rand(n, f, generator=gen) < p)
        counts = torch.randint(1, max(2, int(n * p * 1.5)), (f,), generator=gen)  # some above the positives
        cases.append(dict(codes=codes, counts=counts))
    return cases


register(Exercise(
    id="04.2", name="active_at_counts", reference=_active_reference, random_cases=_active_cases,
    mistakes=((_active_all_positive, "every positive code counts as active here: make feature f active on its "
                                     "counts[f] highest codes only"),
              (_active_uncapped, "a feature is never active where its code is 0: when it is positive on fewer "
                                 "than counts[f] tokens, it is active on those only")),
))


# ------------------------------------------------------------------ 04.3 sparse probing: which latents

def _latents_reference(codes: torch.Tensor, y: torch.Tensor, k: int):
    return torch.as_tensor(top_k_mean_diff(codes.double().numpy(), y.numpy().astype(bool), k))


def _diff(codes, y):
    c = codes.double()
    return c[y].mean(0) - c[~y].mean(0)


def _latents_signed(codes, y, k):
    return torch.argsort(_diff(codes, y), descending=True, stable=True)[:k]


def _latents_mean_code(codes, y, k):
    return torch.argsort(codes.double()[y].mean(0), descending=True, stable=True)[:k]


def _latents_ascending(codes, y, k):
    return torch.argsort(_diff(codes, y).abs(), stable=True)[:k]


def _latents_cases(gen):
    cases = []
    for n, f, k in ((120, 10, 3), (60, 25, 5), (200, 6, 6)):
        y = torch.rand(n, generator=gen) < 0.5
        codes = torch.relu(torch.randn(n, f, generator=gen)) * (torch.rand(n, f, generator=gen) < 0.6)
        codes[:, 1] += 2.0 * y                # fires on the positives
        codes[:, 2] += 3.0 * ~y               # fires on the negatives: as informative, with the other sign
        codes[:, 3] += 5.0                    # large everywhere: says nothing
        codes[:, -1] = 0.0                    # dead
        cases.append(dict(codes=codes, y=y, k=k))
    return cases


register(Exercise(
    id="04.3", name="top_latents", reference=_latents_reference, random_cases=_latents_cases,
    mistakes=((_latents_signed, "rank by the absolute difference |mean on positives - mean on negatives|: a latent "
                                "that fires on the negatives tells the classes apart as well"),
              (_latents_mean_code, "the mean code on the positives alone favours latents that are large everywhere: "
                                   "rank by the difference between the classes"),
              (_latents_ascending, "best first: sort by descending |difference|")),
))


# ------------------------------------------------------------------ 04.4 random directions as a dictionary

def _random_directions(n: int, d: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(w.T).Q.T if n <= d else w / w.norm(dim=-1, keepdim=True)


def _random_reference(x: torch.Tensor, n_directions: int, seed: int):
    w = _random_directions(n_directions, x.shape[1], seed).float()
    return LinearDictionary(w.T, w, x.float().mean(0)).encode(x.float())


def _random_raw(x, n_directions, seed):
    w = torch.randn(n_directions, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = (x.float() - x.float().mean(0)) @ w.float().T
    return torch.cat([s.relu(), (-s).relu()], dim=-1)


def _random_uncentred(x, n_directions, seed):
    w = _random_directions(n_directions, x.shape[1], seed).float()
    s = x.float() @ w.T
    return torch.cat([s.relu(), (-s).relu()], dim=-1)


def _random_normalised_only(x, n_directions, seed):
    w = torch.randn(n_directions, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = (w / w.norm(dim=-1, keepdim=True)).float()
    s = (x.float() - x.float().mean(0)) @ w.T
    return torch.cat([s.relu(), (-s).relu()], dim=-1)


def _random_cases(gen):
    cases = []
    for n, d, k, seed in ((50, 8, 4, 0), (40, 6, 10, 3), (30, 5, 5, 7)):
        x = torch.randn(n, d, generator=gen) * 2 + torch.randn(d, generator=gen) * 3
        cases.append(dict(x=x, n_directions=k, seed=seed))
    return cases


register(Exercise(
    id="04.4", name="random_codes", reference=_random_reference, random_cases=_random_cases, atol=1e-4,
    mistakes=((_random_raw, "the directions are unit vectors: a Gaussian draw has length about sqrt(d), which "
                            "scales every code by it"),
              (_random_uncentred, "the codes are taken around the data mean, as for every baseline: "
                                  "s = (x - x.mean(0)) @ directions.T"),
              (_random_normalised_only, "with no more directions than dimensions they are made orthonormal "
                                        "(torch.linalg.qr of the transposed draw), not only normalised")),
))


# ------------------------------------------------------------------ 04.5 a paired difference over contexts

def _median(v: torch.Tensor) -> torch.Tensor:
    return torch.quantile(v, 0.5, dim=-1)


def _resampled(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B]: the median over features of the per-feature means over each resample's contexts."""
    return _median(a[idx].mean(1))


def _paired_reference(a: torch.Tensor, b: torch.Tensor, n_boot: int, seed: int):
    a, b = a.double(), b.double()
    value = (_median(a.mean(0)) - _median(b.mean(0))).item()
    idx = torch.randint(0, a.shape[0], (n_boot, a.shape[0]), generator=torch.Generator().manual_seed(seed))
    est = _estimate(value, (_resampled(a, idx) - _resampled(b, idx)).numpy())
    return value, est.low, est.high


def _paired_unpaired(a, b, n_boot, seed):
    a, b = a.double(), b.double()
    g = torch.Generator().manual_seed(seed)
    value = (_median(a.mean(0)) - _median(b.mean(0))).item()
    ia = torch.randint(0, a.shape[0], (n_boot, a.shape[0]), generator=g)
    ib = torch.randint(0, a.shape[0], (n_boot, a.shape[0]), generator=g)
    est = _estimate(value, (_resampled(a, ia) - _resampled(b, ib)).numpy())
    return value, est.low, est.high


def _paired_not_recentred(a, b, n_boot, seed):
    a, b = a.double(), b.double()
    value = (_median(a.mean(0)) - _median(b.mean(0))).item()
    idx = torch.randint(0, a.shape[0], (n_boot, a.shape[0]), generator=torch.Generator().manual_seed(seed))
    diffs = (_resampled(a, idx) - _resampled(b, idx)).numpy()
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return value, float(lo), float(hi)


def _paired_lower_median(a, b, n_boot, seed):
    a, b = a.double(), b.double()
    med = lambda v: v.median(dim=-1).values  # noqa: E731
    value = (med(a.mean(0)) - med(b.mean(0))).item()
    idx = torch.randint(0, a.shape[0], (n_boot, a.shape[0]), generator=torch.Generator().manual_seed(seed))
    est = _estimate(value, (med(a[idx].mean(1)) - med(b[idx].mean(1))).numpy())
    return value, est.low, est.high


def _paired_cases(gen):
    cases = []
    for n_ctx, fa, fb, shift in ((30, 8, 6, 0.1), (25, 10, 10, 0.0), (40, 6, 9, -0.2)):
        ctx = torch.randn(n_ctx, 1, generator=gen)                # what a context does to every feature: shared
        a = 0.5 + shift + 0.3 * ctx + 0.2 * torch.randn(n_ctx, fa, generator=gen)
        b = 0.5 + 0.3 * ctx + 0.2 * torch.randn(n_ctx, fb, generator=gen)
        cases.append(dict(a=a, b=b, n_boot=200, seed=int(torch.randint(0, 1000, (1,), generator=gen))))
    return cases


register(Exercise(
    id="04.5", name="paired_median_difference", reference=_paired_reference, random_cases=_paired_cases,
    atol=1e-6, rtol=1e-6,
    mistakes=((_paired_unpaired, "draw the resampled contexts once and use the same draw for both methods: "
                                 "that is what makes the difference paired"),
              (_paired_not_recentred, "re-centre the interval on the estimate: subtract the resampled "
                                      "differences' median from their 2.5 and 97.5 percentiles, then add the "
                                      "difference on all contexts"),
              (_paired_lower_median, "with an even number of features the median is the mean of the two middle "
                                     "values (torch.quantile(v, 0.5)); Tensor.median returns the lower one")),
))
