"""Baselines: PCA and ICA as dictionaries, their sign rule, and their errors."""
import warnings

import pytest
import torch

from helpers.dictionaries.baselines import fit_ica, fit_pca, streamed_pca
from helpers.evals.reconstruction import mmcs

HOOK = "blocks.0.hook_resid_post"


def laplace_mixture(n=6000, d=8, seed=0):
    """x = A s with independent, heavy-tailed (Laplace) sources s: ICA's home ground."""
    g = torch.Generator().manual_seed(seed)
    s = torch.distributions.Laplace(0.0, 1.0).sample((n, d))
    a = torch.randn(d, d, generator=g)
    return s @ a.T + 3.0, a


def test_pca_is_orthonormal_and_reconstructs(array_store):
    x, _ = laplace_mixture()
    store = array_store(x, hook=HOOK, shard_tokens=1000)
    pca = fit_pca(store, HOOK)
    xs = store.activations(HOOK)
    assert pca.n_features == 16 and torch.allclose(pca.decoder @ pca.decoder.T, torch.eye(8), atol=1e-4)
    assert torch.allclose(pca.decode(pca.encode(xs)), xs, atol=2e-3)
    streamed = fit_pca(store, HOOK, max_tokens=2000)  # streamed over the store
    assert mmcs(pca.decoder, streamed.decoder) > 0.99


def test_streamed_pca_is_the_pca_of_every_row(array_store):
    """Streamed over the store, PCA finds the in-memory fit's directions, signs and mean, every row counted
    (a last batch smaller than the number of components too)."""
    from sklearn.decomposition import PCA

    x, _ = laplace_mixture(n=6001)
    x[-1] += 40.0  # an outlier in the last row
    store = array_store(x, hook=HOOK, shard_tokens=1000)
    full = fit_pca(store, HOOK)
    streamed = fit_pca(store, HOOK, max_tokens=2000)
    assert torch.allclose(streamed.mean, full.mean, atol=1e-5)
    assert torch.allclose(streamed.decoder, full.decoder, atol=1e-5)
    ref = PCA(svd_solver="full").fit(x.double().numpy())
    comps, mean = streamed_pca(x[i:i + 700] for i in range(0, len(x), 700))  # the last batch: 401 rows
    assert abs(comps - ref.components_).max() < 1e-8 and abs(mean - ref.mean_).max() < 1e-10


def test_ica_recovers_sources_with_positive_heavy_tails(array_store):
    x, a = laplace_mixture()
    store = array_store(x, hook=HOOK, shard_tokens=1000)
    ica = fit_ica(store, HOOK, max_iter=1000, tol=1e-4)
    assert ica.converged
    mixing_dirs = (a / a.norm(dim=0)).T
    assert mmcs(mixing_dirs, torch.cat([ica.decoder, -ica.decoder])) > 0.95
    s = ica.signed_codes(store.activations(HOOK))
    skew = ((s - s.mean(0)) ** 3).mean(0) / s.std(0) ** 3
    assert (skew > -0.2).all()  # Laplace sources are symmetric; the rule leaves no clearly negative tail
    # asymmetric sources: the heavy tail must come out positive whatever sign ICA picked
    g = torch.Generator().manual_seed(1)
    src = torch.distributions.Exponential(1.0).sample((6000, 4)) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    mix = torch.randn(4, 4, generator=g)
    store2 = array_store(src @ mix.T, hook=HOOK, shard_tokens=1000, name="store2")
    ica2 = fit_ica(store2, HOOK, max_iter=1000, tol=1e-4)
    s2 = ica2.signed_codes(store2.activations(HOOK))
    skew2 = ((s2 - s2.mean(0)) ** 3).mean(0) / s2.std(0) ** 3
    assert (skew2 > 1.0).all(), skew2


def test_ica_fits_in_the_activations_float32(array_store, monkeypatch):
    """FastICA's iterations are matrix products: they run in float32, as the activations are stored."""
    from sklearn.decomposition import FastICA

    seen = []
    fit_transform = FastICA.fit_transform
    monkeypatch.setattr(FastICA, "fit_transform", lambda self, x, *a, **k: seen.append(x.dtype) or fit_transform(self, x, *a, **k))
    x, a = laplace_mixture()
    ica = fit_ica(array_store(x, hook=HOOK, shard_tokens=1000), HOOK, max_iter=1000, tol=1e-4)
    assert [str(t) for t in seen] == ["float32"] and ica.converged
    assert mmcs((a / a.norm(dim=0)).T, torch.cat([ica.decoder, -ica.decoder])) > 0.95


def test_ica_non_convergence_is_reported_with_numbers(array_store):
    x, _ = laplace_mixture()
    store = array_store(x, hook=HOOK, shard_tokens=1000)
    with pytest.warns(RuntimeWarning, match=r"did not converge: 2 iterations \(max_iter=2\).*6,000 activations × 8 components"):
        d = fit_ica(store, HOOK, max_iter=2, tol=1e-12)
    assert not d.converged


def test_fewer_samples_than_directions(array_store):
    store = array_store(torch.randn(10, 16), hook=HOOK)
    with pytest.raises(ValueError, match="PCA needs at least as many samples as directions: 10 .* 16 components"):
        fit_pca(store, HOOK)
    with pytest.raises(ValueError, match="ICA needs at least as many samples as directions"):
        fit_ica(store, HOOK)


def test_layer_dictionaries_rejects_a_layer_that_was_not_harvested():
    from helpers.dictionaries.baselines import layer_dictionaries
    from helpers.settings.profiles import get_profile

    with pytest.raises(ValueError, match="layer 5 was not harvested"):
        layer_dictionaries(get_profile("test"), 5, store=None, sweep=None)


def test_matched_topk_is_nearest_in_l0():
    from helpers.runs.sweep import matched_topk

    rows = [{"architecture": "standard", "l0": 30}, {"architecture": "topk", "l0": 64},
            {"architecture": "topk", "l0": 32}, {"architecture": "topk", "l0": 16}]
    assert matched_topk({"rows": rows, "chosen": 0}) == 2
    assert matched_topk({"rows": rows[:1], "chosen": 0}) is None


def test_baselines_are_fitted_once_and_cached(array_store, tmp_path):
    from helpers.dictionaries.baselines import baselines

    x, _ = laplace_mixture()
    store = array_store(x, hook=HOOK, shard_tokens=1000)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        first = baselines(store, HOOK, 16, ica_tokens=6000, ica_max_iter=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # loaded, not refitted: identical, and the cached ICA still says it did not converge
    with pytest.warns(RuntimeWarning, match="did not converge: 2 iterations"):
        again = baselines(store, HOOK, 16, ica_tokens=6000, ica_max_iter=2, cache_dir=tmp_path)
    for name in ("PCA", "ICA"):
        assert torch.equal(first[name].encoder, again[name].encoder) and torch.equal(first[name].mean, again[name].mean)
    assert again["ICA"].converged is False and again["random"].n_features == 16
    # other settings: fitted afresh
    baselines(store, HOOK, 16, ica_tokens=6000, ica_max_iter=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ica-*.safetensors"))) == 2


def _scored(method, level, n=40, seed=0):
    """Per-feature held-out scores whose MCC sit around `level`, with resampled medians around it."""
    import numpy as np

    from helpers.evals.heldout import Scored

    rng = np.random.default_rng(seed)
    mcc = (level + 0.01 * rng.normal(size=n)).astype(np.float32)
    null = (0.001 * rng.normal(size=n)).astype(np.float32)
    boot = {k: np.median(v) + 0.005 * rng.normal(size=50) for k, v in (("mcc", mcc), ("null_mcc", null),
            ("excess_mcc", mcc - null), ("corr", mcc), ("null_corr", null), ("excess_corr", mcc - null))}
    return Scored(method, rng.integers(5, 50, n), np.ones(n, bool), mcc, mcc.copy(), null, null.copy(),
                  [f"concept{i}" for i in range(n)], mcc + 0.05, null, boot)


def _score(layer, sc, random, sparsity="own"):
    """compare_layers' MethodScore of `sc` at `layer`, against the random directions' scores `random`."""
    from helpers.dictionaries.baselines import MethodScore
    from helpers.evals.heldout import difference

    return MethodScore.from_row({"layer": layer, "method": sc.name, "features": len(sc.mcc), "sparsity": sparsity,
                                 "massive_share": 0.01, "converged": None, "scored": sc, **sc.summary(),
                                 "all": sc.summary(), "vs_random": difference(sc, random)})


def test_layer_comparison_round_trips_through_the_cache_and_says_its_verdicts(tmp_path):
    import numpy as np

    from helpers.dictionaries.baselines import LayerComparison, MethodScore
    from helpers.settings.paths import stored

    scores = []
    for layer in (1, 2):
        rnd = _scored("random", 0.12, seed=layer)
        scores += [_score(layer, rnd, rnd), _score(layer, _scored("SAE", 0.10, seed=10 + layer), rnd),
                   _score(layer, _scored("PCA", 0.05, seed=20 + layer), rnd, sparsity="L1 SAE's")]
    comp = LayerComparison(scores)
    assert comp.layers == [1, 2] and comp.methods == ["random", "SAE", "PCA"]
    # the random directions reach the SAE at both layers; the SAE's interval lies above PCA's
    assert comp.at_least("SAE") == [(1, "random"), (2, "random")]
    assert comp.intervals_above(1, "SAE") == ["PCA"]
    assert comp.get(2, "SAE").vs_random.below(0)
    verdicts = comp.verdicts()
    assert "Baselines scoring at least the SAE by held-out MCC: random (layer 1), random (layer 2)." in verdicts
    assert any(v.startswith("Layer 1: the SAE is below random directions") and v.endswith("above: PCA.") for v in verdicts)
    assert comp.to_frame().shape[0] == 6 and comp.best_features(1, n=2).to_frame().shape[0] == 6
    with pytest.raises(KeyError, match="no 'TopK SAE' at layer 1"):
        comp.get(1, "TopK SAE")
    # through `stored` (what compare_layers keeps per layer) and through JSON
    path = tmp_path / "layer.pt"
    stored(path, ["k"], lambda: [s.to_dict() for s in scores])
    again = [MethodScore.from_dict(d) for d in stored(path, ["k"], lambda: pytest.fail("recomputed"))]
    json_again = LayerComparison.load(comp.save(tmp_path / "comparison.json")).scores
    for got in (again, json_again):
        for a, b in zip(got, scores):
            assert a.rows() == b.rows() and a.vs_random == b.vs_random and a.all_tokens == b.all_tokens
            assert np.array_equal(a.scored.mcc, b.scored.mcc) and a.scored.concept == b.scored.concept
            assert np.array_equal(a.scored.boot["mcc"], b.scored.boot["mcc"])
    assert again[0].scored.mcc.dtype == np.float32  # the cache keeps per-feature arrays as they were


def test_claims_at_every_layer_by_every_protocol(tmp_path):
    """LayerComparison.claims: one verdict table per layer, by the held-out MCC and by both protocols
    (dense and at the SAE's sparsity), each row with its word; planted token features beat random codes."""
    import numpy as np

    from helpers.dictionaries.baselines import (CLAIM_1, MATCHED, SHARE_COLUMN, LayerClaims, LayerComparison,
                                                MethodScore)
    from helpers.evals.heldout import HeldoutSplit, token_labels
    from helpers.evals.protocols import protocol_scores
    from helpers.results import rebuild, unbuild

    rng = np.random.default_rng(0)
    n_ctx, per = 160, 16
    n = n_ctx * per
    p = 1 / np.arange(1, 31)
    ids = rng.choice(30, size=n, p=p / p.sum())
    contexts = np.repeat(np.arange(n_ctx), per)
    planted = np.zeros((n, 6), np.float32)
    for j in range(6):
        on = (ids == j + 1) & (rng.random(n) < 0.9)
        planted[on, j] = rng.random(on.sum()) + 0.5
    dense = rng.standard_normal((n, 12)).astype(np.float32)           # dense "random directions"
    codes = {"SAE": torch.as_tensor(planted), "random": torch.as_tensor(dense),
             "neurons": torch.as_tensor(rng.standard_normal((n, 12)).astype(np.float32))}
    labels = token_labels(ids, contexts, min_count=10)
    split = HeldoutSplit(labels, contexts, n_boot=20, min_count=10)
    rows, protocols = [], {}
    for layer in (1, 2):
        for name, c in codes.items():
            sc = split.score_codes(c.clamp_min(0), name)
            rows.append(MethodScore.from_row({
                "layer": layer, "method": name, "sparsity": "own", "massive_share": 0.0, "converged": None,
                "scored": sc, **sc.summary(), "all": {}, "vs_random": {"value": 0.0, "low": 0.0, "high": 0.0},
                "resamples": split.resamples}))
        if layer == 2:   # the protocols at one layer only: the other keeps the held-out rows alone
            protocols[layer] = protocol_scores(codes, labels, contexts, n_boot=20, pairs=[], min_excerpts=1,
                                               match={f"{m} {MATCHED}": (m, "SAE") for m in ("random", "neurons")})
    claims = LayerComparison(rows).claims(protocols)
    assert isinstance(claims, LayerClaims) and claims.claim == CLAIM_1 and claims.layers == [1, 2]
    one, two = claims.at(1), claims.at(2)
    assert {r.measure for r in one.rows_} == {"held-out MCC (ours), random at the SAE's sparsity",
                                             "held-out MCC (ours), neurons at the SAE's sparsity"}
    measures = {r.measure for r in two.rows_}
    assert "paper's correlation, random dense" in measures and "detection, neurons at the SAE's sparsity" in measures
    assert len(two.rows_) == 10 * 4                                     # 10 measures, 4 statistics
    assert all(r.word in ("holds", "fails", "cannot tell") for r in two.rows_)
    # planted token features against random codes: the held-out MCC's median says "holds" at both layers
    for t in (one, two):
        med = next(r for r in t.rows_ if r.measure.startswith("held-out MCC (ours), random") and r.statistic == "median")
        assert med.word == "holds" and med.difference.low > 0
    pivot = claims.rows()
    assert len(pivot) == 2 + 10 and {"median", "mean", "top decile", SHARE_COLUMN} <= set(pivot[0])
    assert all(set(r) == set(pivot[0]) for r in pivot)  # one column per statistic, every protocol alike
    assert claims.verdicts()[0].startswith("Layer 1: claim 1 holds by")
    assert "<b>layer 2</b>" in claims._repr_html_()
    assert sum(claims.words().values()) == len(one.rows_) + len(two.rows_)
    again = rebuild(unbuild(claims))
    assert isinstance(again, LayerClaims) and again.rows() == pivot
    assert LayerClaims.load(claims.save(tmp_path / "claims.json")).rows() == pivot
    with pytest.raises(KeyError, match="no claim table at layer 3"):
        claims.at(3)
