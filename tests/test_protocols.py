"""The LLM-free paper protocol and delphi detection score (helpers.evals.protocols) on synthetic codes
with planted features, checked against brute-force recomputations on a tiny case."""
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from conftest import sparse_data

from helpers.dictionaries.dictionary import random_directions
from helpers.evals.heldout import heldout_score, token_labels
from helpers.evals.protocols import (BudgetCurve, Distribution, ProtocolComparison, ProtocolScore, ProtocolSplit,
                                     budget_curve, difference, heldout_distribution, protocol_scores,
                                     snapshot_protocol_scores, summarize)
from helpers.results import Estimate
from helpers.saes.stack import SAEConfig
from helpers.settings.profiles import PROFILES

matplotlib.use("Agg")

N_CTX, PER = 200, 64


@pytest.fixture(scope="module")
def data():
    """12,800 tokens in 200 contexts of 64, ids 0..59 (Zipf-like). `planted` [N, 6]: feature j is the
    indicator of token id 10 + j times a random strength in [0.5, 1.5); `dense` [N, 20]: Gaussian
    codes (dense random directions); `split_feature` [N, 1]: token id 20 in the even (explaining)
    contexts, token id 21 in the odd (scoring) ones."""
    rng = np.random.default_rng(0)
    n = N_CTX * PER
    p = 1 / np.arange(1, 61) ** 0.7
    ids = rng.choice(60, size=n, p=p / p.sum())
    contexts = np.repeat(np.arange(N_CTX), PER)
    planted = np.zeros((n, 6), np.float32)
    for j in range(6):
        on = ids == 10 + j
        planted[on, j] = rng.random(on.sum()) + 0.5
    dense = rng.standard_normal((n, 20)).astype(np.float32)
    even = contexts % 2 == 0
    split_feature = (np.where(even, ids == 20, ids == 21) * (rng.random(n) + 0.5)).astype(np.float32)[:, None]
    labels = token_labels(ids, contexts, min_count=10)
    return ids, contexts, labels, torch.as_tensor(planted), torch.as_tensor(dense), torch.as_tensor(split_feature)


@pytest.fixture(scope="module")
def comparison(data):
    ids, contexts, labels, planted, dense, _ = data
    return protocol_scores({"planted": planted, "random": dense}, labels, contexts,
                           match={"random matched": ("random", "planted")}, n_boot=40, window=16)


def test_planted_features_score_high_and_random_directions_at_chance(comparison):
    res = comparison
    assert isinstance(res, ProtocolComparison) and list(res.scores) == ["planted", "random", "random matched"]
    a, r, m = res["planted"], res["random"], res["random matched"]
    assert a.features["concept"] == [f"token id {10 + j}" for j in range(6)], "the explainer names the planted concept"
    assert a.correlation.n_scored == 6 and a.correlation.median.value > 0.9 and a.correlation.median.low > 0.85
    assert a.detection.median.value > 0.9, a.detection
    assert abs(r.correlation.median.value) < 0.1 and r.correlation.shares["share > 0.5"].value == 0
    assert abs(r.detection.median.value - 0.5) < 0.08 and r.detection.shares["share > 0.75"].value == 0
    assert abs(m.correlation.median.value) < 0.1 and abs(m.detection.median.value - 0.5) < 0.08
    assert r.activity == "natural" and m.activity == "matched to planted"
    assert set(m.counts.tolist()) <= set(a.counts.tolist()), "matched counts are drawn from the reference's"
    assert r.counts.min() > a.counts.max(), "dense directions are active on max_density of the tokens"
    d = res.difference("planted", "random", "correlation", "share > 0.5")
    assert d.paired and d.value.value == 1.0 and d.value.low > 0.9
    assert "planted above random by the share > 0.5 (correlation): +1.000" in " ".join(res.verdicts())
    assert res.difference("planted", "random", "detection", "median").value.above(0.3)


def test_the_explainer_reads_only_its_half(data):
    """A feature that means token 20 in the explaining contexts and token 21 in the scoring ones: the
    explainer names token 20, and the held-out scores fall to chance."""
    ids, contexts, labels, _, _, split_feature = data
    split = ProtocolSplit(labels, contexts, n_boot=10, window=16)
    s = split.score(split_feature, "split")
    assert s.features["concept"] == ["token id 20"]
    assert s.features["explain_corr"][0] > 0.8
    assert abs(s.features["correlation"][0]) < 0.2 and s.features["detection"][0] < 0.6


def test_halves_are_disjoint_and_excerpts_follow_the_rules(data):
    ids, contexts, labels, planted, dense, _ = data
    split = ProtocolSplit(labels, contexts, n_boot=10, window=16)
    assert (split.ctx_half == np.arange(N_CTX) % 2).all()
    assert (split.weights[:, split.ctx_half == 0] == 0).all(), "only the scoring half is resampled"
    assert (split.weights.sum(1) == (split.ctx_half == 1).sum()).all()
    ex = split.excerpts(torch.cat([planted, dense], 1))
    for key, half in (("explain", 0), ("score", 1), ("activating", 1), ("non_activating", 1)):
        w = ex[key][ex[key] >= 0]
        assert len(w) and (split.win_half[w] == half).all(), key
    toks = split.window_tokens(ex["explain"])
    ctx_explain = set(contexts[toks[toks >= 0]].tolist())
    toks = split.window_tokens(ex["score"])
    assert ctx_explain.isdisjoint(contexts[toks[toks >= 0]].tolist())
    # activating excerpts hold an active token, non-activating ones none (planted: active = positive)
    for f in range(6):
        on = planted[:, f].numpy() > 0
        for key, want in (("activating", True), ("non_activating", False)):
            t = split.window_tokens(ex[key][f][ex[key][f] >= 0])
            assert (on[np.where(t >= 0, t, 0)] & (t >= 0)).any(1).tolist() == [want] * len(t), (f, key)
    # delphi's sampling: 50 activating excerpts of a dense direction, 5 from each tenth of its ranked windows
    f = 6
    x = dense[:, 0].numpy()
    act_win = np.zeros(split.n_windows, bool)
    act_win[split.win[np.argsort(-x)[:split.k_max]]] = True
    cand = np.flatnonzero(act_win & (split.win_half == 1))
    wmax = np.array([x[t[t >= 0]].max() for t in split.window_tokens(cand)])
    ranked = cand[np.argsort(-wmax, kind="stable")]
    rank = {w: i for i, w in enumerate(ranked)}
    chosen = ex["activating"][f]
    assert (chosen >= 0).sum() == 50
    size = len(ranked) // 10
    assert np.bincount([rank[w] // size for w in chosen], minlength=10).tolist() == [5] * 10


def _brute_correlation(split, codes, concept, windows, weights):
    """Pearson correlation over the tokens of `windows`, each repeated as often as its context's weight."""
    t = split.window_tokens(windows)
    t = t[t >= 0]
    rep = weights[contexts_of(split, t)].astype(int)
    x = np.repeat(codes[t], rep)
    lab = np.repeat(np.asarray(split.L[t, concept].todense()).ravel(), rep)
    if len(x) == 0:
        return np.nan
    if x.std() == 0 or lab.std() == 0:
        return 0.0
    return float(np.corrcoef(x, lab)[0, 1])


def contexts_of(split, tokens):
    return split.ctx[tokens]


def _brute_detection(split, concept, act, non, weights):
    def has(w):
        t = split.window_tokens(w)
        return bool(np.asarray(split.L[t[t >= 0], concept].todense()).any())

    def weighted(ws, want):
        ws = [w for w in ws if w >= 0]
        wt = np.array([weights[split.win_ctx[w]] for w in ws])
        hit = np.array([has(w) == want for w in ws])
        return (wt * hit).sum(), wt.sum()

    tp, p = weighted(act, True)
    tn, nn = weighted(non, False)
    return (tp / p + tn / nn) / 2 if p > 0 and nn > 0 else np.nan


def _recentred(value, samples):
    lo, hi = np.percentile(samples, [2.5, 97.5]) - np.median(samples) + value
    return lo, hi


def test_scores_and_intervals_match_a_brute_force_recomputation(data):
    """A tiny case: every per-feature score, on the full sample and on every context resample, and
    every summary statistic with its interval, recomputed by repeating excerpts token by token."""
    ids, contexts, labels, planted, dense, _ = data
    keep = contexts < 40
    codes = torch.cat([planted, dense[:, :4]], 1)[torch.from_numpy(keep)]
    split = ProtocolSplit(token_labels(ids[keep], contexts[keep], min_count=5), contexts[keep], n_boot=6, window=16,
                          score_top=4, score_random=4, n_activating=10, n_quantiles=5, n_non_activating=6)
    s = split.score(codes, "tiny")
    ex = split.excerpts(codes)
    F = codes.shape[1]
    full = split.full_weights
    for f in range(F):
        c = ex["concept"][f]
        assert c >= 0
        x = codes[:, f].numpy()
        want = _brute_correlation(split, x, c, ex["score"][f], full)
        assert s.features["correlation"][f] == pytest.approx(want, abs=1e-6)
        want = _brute_detection(split, c, ex["activating"][f], ex["non_activating"][f], full)
        assert s.features["detection"][f] == pytest.approx(want, abs=1e-9)
    boot_corr = np.array([[_brute_correlation(split, codes[:, f].numpy(), ex["concept"][f], ex["score"][f], w)
                           for f in range(F)] for w in split.weights])
    d = s.correlation
    for key, fn in (("median", np.median), ("mean", np.mean), ("share > 0.5", lambda v: (v > 0.5).mean()),
                    ("top decile", lambda v: np.percentile(v, 90))):
        value = fn(s.features["correlation"])
        per = np.array([fn(row[np.isfinite(row)]) for row in boot_corr])
        assert d.stat(key).value == pytest.approx(value, abs=1e-9), key
        assert d.boot[key] == pytest.approx(per, abs=1e-6), key
        lo, hi = _recentred(value, per)
        if key.startswith("share"):
            lo, hi = max(lo, 0), min(hi, 1)
        assert (d.stat(key).low, d.stat(key).high) == pytest.approx((lo, hi), abs=1e-6), key
    boot_det = np.array([[_brute_detection(split, ex["concept"][f], ex["activating"][f], ex["non_activating"][f], w)
                          for f in range(F)] for w in split.weights])
    assert s.detection.boot["mean"] == pytest.approx(np.nanmean(boot_det, 1), abs=1e-9)


def test_summarize_by_hand_and_the_difference_of_a_method_with_itself(comparison):
    v = np.array([0.1, 0.35, 0.6, np.nan, 0.8, -0.2])
    d = summarize(v, "m", "correlation", n_boot=50)
    assert d.n_features == 6 and d.n_scored == 5 and d.interval == "features"
    assert d.median.value == pytest.approx(0.35) and d.mean.value == pytest.approx(0.33)
    assert [d.shares[f"share > {t}"].value for t in (0.3, 0.5, 0.7)] == pytest.approx([0.6, 0.4, 0.2])
    assert d.top_decile.value == pytest.approx(np.percentile(v[np.isfinite(v)], 90))
    assert d.median.has_interval and 0 <= d.shares["share > 0.5"].low <= 0.4 <= d.shares["share > 0.5"].high <= 1
    a = comparison["planted"]
    for p in ("correlation", "detection"):
        for stat in a[p].keys:
            same = difference(a[p], a[p], stat)
            assert same.paired and (same.value.value, same.value.low, same.value.high) == (0, 0, 0), (p, stat)
    assert not difference(d, d).paired


def test_heldout_mcc_as_a_distribution(data):
    ids, contexts, labels, planted, dense, _ = data
    h = heldout_score(torch.cat([planted, dense[:, :10]], 1), labels, contexts, n_boot=10, min_count=10)
    d = heldout_distribution(h)
    mcc = np.asarray(h.features["mcc"])[np.asarray(h.features["scored"], bool)]
    assert d.protocol == "heldout mcc" and d.n_scored == len(mcc) and d.interval == "contexts"
    assert d.resamples == h.resamples and d.shares["share > 0.5"] == h.summary()["share > 0.5"]
    assert d.median.value == pytest.approx(np.median(mcc)) and d.mean.value == pytest.approx(mcc.mean())
    assert d.shares["share > 0.5"].value == pytest.approx((mcc > 0.5).mean())
    assert d.shares["share > 0.5"].value == pytest.approx(6 / 16), "the planted features, and only they"
    h.boot = {k: v for k, v in h.boot.items() if " " not in k}  # a score holding its resampled medians only
    assert heldout_distribution(h).interval == "features"


def test_results_round_trip_and_plot(comparison, tmp_path):
    res = comparison
    back = ProtocolComparison.from_dict(res.to_dict())
    assert isinstance(back["planted"], ProtocolScore) and isinstance(back["planted"].correlation, Distribution)
    assert back.rows() == res.rows() and back.verdicts() == res.verdicts()
    assert back["planted"].features["concept"] == res["planted"].features["concept"]
    np.testing.assert_array_equal(back["random"].correlation.values, res["random"].correlation.values)
    np.testing.assert_array_equal(back["random"].detection.boot["median"], res["random"].detection.boot["median"])
    d = res["random"].correlation
    loaded = Distribution.load(d.save(tmp_path / "d.json"))
    assert loaded.rows() == d.rows() and loaded.resamples == d.resamples
    assert difference(loaded, res["planted"].correlation, "mean").value == \
        difference(d, res["planted"].correlation, "mean").value, "a loaded distribution pairs as before"
    loaded = ProtocolComparison.load(res.save(tmp_path / "c.json"))
    assert loaded.difference_rows() == res.difference_rows()
    assert list(res.table("detection").columns)[:4] == ["method", "activity", "protocol", "scored"]
    fig = res.plot()
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) >= 3
    assert "planted" in str(res) and "<table" in res._repr_html_()


def test_bad_inputs_are_refused(data):
    ids, contexts, labels, planted, _, _ = data
    with pytest.raises(ValueError, match="one row per token"):
        ProtocolSplit(labels, contexts[:-1])
    split = ProtocolSplit(labels, contexts, n_boot=2)
    with pytest.raises(ValueError, match="codes must be"):
        split.score(planted[:-1])
    with pytest.raises(ValueError, match="counts for"):
        split.score(planted, counts=[3, 4])
    with pytest.raises(ValueError, match="must name codes"):
        protocol_scores({"a": planted}, labels, contexts, match={"b": ("a", "c")}, n_boot=2)


def test_match_by_name_scores_that_method_at_the_reference_sparsity_instead(data):
    ids, contexts, labels, planted, dense, _ = data
    res = protocol_scores({"planted": planted, "random": dense}, labels, contexts, match={"random": "planted"},
                          n_boot=5, window=16)
    assert list(res.scores) == ["planted", "random"] and res["random"].activity == "matched to planted"
    assert set(res["random"].counts.tolist()) <= set(res["planted"].counts.tolist())
    assert {(d.a, d.b) for d in res.differences} == {("planted", "random")}
    with pytest.raises(ValueError, match="matched to"):
        protocol_scores({"a": planted, "b": dense}, labels, contexts, match={"a": "b", "b": "a"}, n_boot=2)


def test_labels_as_a_sparse_or_boolean_matrix_with_names(data):
    ids, contexts, labels, planted, _, _ = data
    keep = contexts < 60
    m = labels.matrix[np.flatnonzero(keep)]
    a = ProtocolSplit(m, contexts[keep], label_names=labels.names, n_boot=3, window=16).score(planted[keep], "a")
    b = ProtocolSplit(m.toarray() > 0, contexts[keep], label_names=labels.names, n_boot=3, window=16).score(
        planted[keep].numpy(), "a")
    assert a.features["concept"] == b.features["concept"] == [f"token id {10 + j}" for j in range(6)]
    assert a.rows() == b.rows()


def test_a_claim_measured_every_way(data, comparison):
    from helpers.evals.protocols import ClaimTable, claim_table

    ids, contexts, labels, planted, dense, _ = data
    res = comparison
    held = {name: heldout_score(c, labels, contexts, name=name, n_boot=20, min_count=10)
            for name, c in (("planted", planted), ("random", dense))}
    measures = {"held-out MCC": (heldout_distribution(held["planted"]), heldout_distribution(held["random"])),
                "correlation, random dense": (res["planted"].correlation, res["random"].correlation),
                "detection, random matched": (res["planted"].detection, res["random matched"].detection)}
    table = claim_table("planted above random", measures, where="synthetic")
    assert len(table.rows_) == 12 and {r.word for r in table.rows_} == {"holds"}, table.rows()
    assert [r.statistic for r in table.rows_[4:8]] == ["median", "mean", "share > 0.5", "top decile"]
    assert table.rows_[-2].statistic == "share > 0.75", "detection's middle threshold"
    assert all(r.paired for r in table.rows_)
    assert table.verdicts()[0] == "planted above random (synthetic): holds by 12 of 12 measures, fails by 0, cannot tell by 0."
    flipped = claim_table("random above planted", {k: (b, a) for k, (a, b) in measures.items()})
    assert {r.word for r in flipped.rows_} == {"fails"}
    same = claim_table("planted above itself", {"correlation": (res["planted"].correlation,) * 2})
    assert {r.word for r in same.rows_} == {"cannot tell"}
    back = ClaimTable.from_dict(table.to_dict())
    assert back.rows() == table.rows() and back.verdicts() == table.verdicts()


def test_dictionaries_are_scored_as_their_codes(data):
    from helpers.evals.protocols import dictionary_protocol_scores

    class Axes:  # any object with encode: here it reads the planted coordinates back
        def encode(self, x):
            return torch.relu(x[:, :6])

    ids, contexts, labels, planted, dense, _ = data
    x = torch.cat([planted, dense[:, :4]], 1)                        # "activations" [N, 10]
    a = dictionary_protocol_scores({"axes": Axes()}, x, labels, contexts, n_boot=10, window=16)
    b = protocol_scores({"axes": x[:, :6]}, labels, contexts, n_boot=10, window=16)
    assert a.rows() == b.rows()
    other = dictionary_protocol_scores({"axes": Axes()}, torch.zeros_like(x), labels, contexts, inputs={"axes": x},
                                       n_boot=10, window=16)
    assert other.rows() == b.rows(), "a dictionary reads its own inputs where given"


def test_scored_tokens_are_kept_and_the_rest_dropped(data):
    ids, contexts, labels, planted, dense, _ = data
    keep = np.random.default_rng(1).random(len(contexts)) > 0.1       # drop a tenth of the tokens, as massive ones
    sub = type(labels)(labels.names, labels.families, labels.matrix[keep])
    a = ProtocolSplit(labels, contexts, scored=keep, n_boot=10, window=16).score(planted, "planted")
    b = ProtocolSplit(sub, contexts[keep], n_boot=10, window=16).score(planted[torch.as_tensor(keep)], "planted")
    assert a.rows() == b.rows() and a.correlation.median.value > 0.9
    with pytest.raises(ValueError, match="scored has 3 entries"):
        ProtocolSplit(labels, contexts, scored=keep[:3])


def test_the_gap_over_budgets_by_each_protocol(data, tmp_path):
    """budget_curve reads each budget's paired differences; its verdicts follow the numbers."""
    _, contexts, labels, planted, dense, _ = data
    g = torch.Generator().manual_seed(0)
    snaps = {}
    for t, strength in ((100, 0.2), (400, 1.0)):   # the planted features grow clearer with "training"
        sae = planted * strength + torch.rand(len(contexts), 6, generator=g) * 0.3
        snaps[t] = protocol_scores({"SAE": sae, "random directions": dense[:, :6]}, labels,
                                   contexts, match={"random (SAE's sparsity)": ("random directions", "SAE")},
                                   pairs=[("SAE", "random directions"), ("SAE", "random (SAE's sparsity)")], n_boot=30)
    held = {100: Estimate(0.05, -0.01, 0.11), 400: Estimate(-0.2, -0.3, -0.1)}
    curve = budget_curve(snaps, heldout=held)
    assert [p.tokens for p in curve.points] == [100, 400]
    ours, dense = "held-out MCC (ours), random at the SAE's sparsity", "paper's correlation, random dense"
    assert curve.measures[0] == ours and dense in curve.measures
    want = snaps[400].difference("SAE", "random directions", "correlation", "median").value
    assert curve.points[1].gaps[dense].value == pytest.approx(want.value)
    assert curve.moves(ours) == pytest.approx(-0.25)
    text = " ".join(curve.verdicts())
    assert "(cannot tell) at 100" in text and "(fails) at 400" in text       # the held-out gap's words
    assert curve.moves(dense) > 0                                             # the planted gap grows; ours falls
    assert "the protocols disagree" in text
    assert len(curve.rows()) == 2 and curve.to_frame().shape[1] == 1 + len(curve.measures)
    back = BudgetCurve.load(curve.save(tmp_path / "budget.json"))
    assert back.points[1].gaps[ours] == held[400] and back.verdicts() == curve.verdicts()
    curve.plot()
    # a gap whose intervals at the first and last budgets overlap has not clearly moved, whatever its sign
    flat = budget_curve(snaps, heldout={100: Estimate(0.05, -0.01, 0.11), 400: Estimate(0.03, -0.03, 0.09)})
    assert flat.moves(ours) < 0 and flat.clear_move(ours) == 0 and flat.clear_move(dense) == 1
    assert f"not clearly by {ours}" in " ".join(flat.verdicts())
    # a budget without the held-out gap keeps the others
    only = budget_curve({100: snaps[100]})
    assert ours not in only.measures and len(only.points) == 1


def test_snapshots_of_one_sae_over_training_by_both_protocols(array_store):
    """snapshot_protocol_scores trains the sweep's SAE once and scores it at the curve's budgets, beside
    random directions dense (the same at every budget) and at each snapshot's sparsity."""
    x, _ = sparse_data(n=2048, d=16, m=24)
    profile = PROFILES["test"].replace(layers=(0,), sae_layer=0, train_tokens=1024, train_batch=128, massive=False,
                                       device="cpu")
    store = array_store(x, hook=profile.sae_hook)
    sweep = SimpleNamespace(rows_=[SAEConfig(d_in=16, d_sae=32, l1_coefficient=1e-3, massive=False)], chosen=0)
    rand = random_directions(16, 32, x.mean(0), seed=1, hook_name=profile.sae_hook)
    ids = np.arange(len(x)) % 40
    labels = token_labels(ids, np.arange(len(x)) // 32, min_count=5)
    snaps = snapshot_protocol_scores(profile, store, sweep, rand, x, labels, np.arange(len(x)) // 32, n_boot=10,
                                     window=8)
    assert sorted(snaps) == [256, 512, 1024]                       # a quarter, a half and all of 8 steps of 128
    first, last = snaps[256], snaps[1024]
    assert list(last.scores) == ["SAE", "random directions", "random (SAE's sparsity)"]
    np.testing.assert_array_equal(first["random directions"].correlation.values, last["random directions"].correlation.values)
    assert not np.array_equal(first["SAE"].features["counts"], last["SAE"].features["counts"]) or \
        not np.allclose(first["SAE"].features["explain_corr"], last["SAE"].features["explain_corr"], equal_nan=True)
    matched = last["random (SAE's sparsity)"].counts
    assert 0 < matched.max() <= last["SAE"].counts.max()          # drawn from the snapshot's own counts
    assert last.difference("SAE", "random directions", "correlation").paired


def test_the_curve_and_the_budget_curve_share_one_training_kept_on_disk(array_store, tmp_path, monkeypatch):
    """curve_snapshots trains the sweep's SAE once per process for both curves, and a later process (its
    memory cleared) reads the same snapshots back from the checkpoint folder."""
    from helpers.evals import heldout

    x, _ = sparse_data(n=2048, d=16, m=24)
    profile = PROFILES["test"].replace(layers=(0,), sae_layer=0, train_tokens=1024, train_batch=128, massive=False,
                                       device="cpu")
    store = array_store(x, hook=profile.sae_hook)
    sweep = SimpleNamespace(rows_=[SAEConfig(d_in=16, d_sae=32, l1_coefficient=1e-3, massive=False)], chosen=0)
    steps = []
    real = heldout.train_sweep

    def counted(*args, **kw):
        result = real(*args, **kw)
        steps.append(len([h for h in result.history if "step" in h]))
        return result
    monkeypatch.setattr(heldout, "train_sweep", counted)
    monkeypatch.setattr(heldout, "_SNAPSHOTS", {})
    first = heldout.curve_snapshots(profile, store, sweep, checkpoint_dir=tmp_path, progress=False)
    again = heldout.curve_snapshots(profile, store, sweep, checkpoint_dir=tmp_path, progress=False)
    assert sorted(first) == [256, 512, 1024] and len(steps) == 1          # trained once for both
    assert all(again[n] is first[n] for n in first)
    assert not torch.equal(first[256].W_dec, first[1024].W_dec)          # snapshots of a training, not copies
    monkeypatch.setattr(heldout, "_SNAPSHOTS", {})                       # a new process
    read = heldout.curve_snapshots(profile, store, sweep, checkpoint_dir=tmp_path, progress=False)
    for n in first:
        for name, v in first[n].state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(read[n].state_dict()[name].cpu(), v.cpu()), (n, name)


@pytest.mark.parametrize("recipe", ["anthropic2023", "improved"])
def test_the_curve_reads_the_snapshots_the_sweep_kept_and_they_equal_a_retraining(recipe, array_store, tmp_path,
                                                                                  monkeypatch):
    """A sweep keeps the chosen SAE at the curve's budgets (helpers.runs.sweep.CurveSnapshots);
    curve_snapshots reads them instead of training again, and they are exactly what training the SAE
    again alone gives."""
    from helpers.activations import massive
    from helpers.evals import heldout
    from helpers.runs import sweep as sw
    from helpers.saes.train import train_sweep

    x, _ = sparse_data(n=2048, d=16, m=24)
    profile = PROFILES["test"].replace(layers=(0,), sae_layer=0, train_tokens=1024, train_batch=128, massive=True,
                                       device="cpu", curve_points=4, pick_ratio=2)
    hook = profile.sae_hook
    store = array_store(x, hook=hook)
    configs = [SAEConfig(d_in=16, d_sae=32, l1_coefficient=a, massive=True, hook_name=hook, recipe=recipe)
               for a in (1e-3, 3e-3)]
    configs.append(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, massive=True, hook_name=hook))
    tc = sw.train_config(profile)
    keep = sw.CurveSnapshots(configs, tc, profile.pick_ratio)
    assert keep.rows == [0, 1]                                           # the L1 SAEs the rule could choose
    result = train_sweep(store, hook, configs, tc, on_eval=keep, rules={hook: massive.fit(store, hook)}, progress=False)
    keep.save(tmp_path / "sweep", 1, result, store)
    assert sorted(p.name for p in (tmp_path / "sweep" / "curve").iterdir()) == [
        "sae_01-1024.safetensors", "sae_01-256.safetensors", "sae_01-512.safetensors"]

    trained = []
    real = heldout.train_sweep
    monkeypatch.setattr(heldout, "train_sweep", lambda *a, **kw: trained.append(1) or real(*a, **kw))
    monkeypatch.setattr(heldout, "_SNAPSHOTS", {})
    kept = heldout.curve_snapshots(profile, store, SimpleNamespace(rows_=configs, chosen=1, dir=str(tmp_path / "sweep")),
                                   progress=False)
    assert sorted(kept) == [256, 512, 1024] and not trained              # read, not trained
    monkeypatch.setattr(heldout, "_SNAPSHOTS", {})
    again = heldout.curve_snapshots(profile, store, SimpleNamespace(rows_=configs, chosen=1), progress=False)
    assert trained                                                       # no sweep folder: trained again
    for n in kept:
        for name, v in again[n].state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(kept[n].state_dict()[name], v), (n, name)
    assert not torch.equal(kept[256].W_dec, kept[1024].W_dec)
    other = array_store(x + 1, hook=hook, name="other")                  # another store: its own training
    assert sw.sweep_snapshots(SimpleNamespace(dir=str(tmp_path / "sweep")), 1, [256, 512, 1024], other) is None
