"""The tensor-level held-out score (helpers.evals.heldout.heldout_score and friends) on synthetic codes
with planted features, with no store, profile or tokenizer."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers.evals.heldout import (HeldoutComparison, HeldoutScore, HeldoutScorer, HeldoutSplit, Labels, compare,
                                   heldout_score, heldout_scores, token_labels)

N_CTX, PER = 250, 16


@pytest.fixture(scope="module")
def data():
    """4,000 tokens in 250 contexts of 16, ids 0..39 with Zipf-like frequencies. `planted` [N, 8]: feature
    j fires on token id j + 1 (90% of its occurrences, with random strengths); `random` [N, 30]: each
    feature on 300 random tokens (denser than any planted one)."""
    rng = np.random.default_rng(0)
    n = N_CTX * PER
    p = 1 / np.arange(1, 41)
    ids = rng.choice(40, size=n, p=p / p.sum())
    contexts = np.repeat(np.arange(N_CTX), PER)
    planted = np.zeros((n, 8), np.float32)
    for j in range(8):
        on = (ids == j + 1) & (rng.random(n) < 0.9)
        planted[on, j] = rng.random(on.sum()) + 0.5
    random = np.zeros((n, 30), np.float32)
    for j in range(30):
        random[rng.choice(n, 300, replace=False), j] = rng.random(300) + 0.1
    return ids, contexts, torch.as_tensor(planted), torch.as_tensor(random)


def test_planted_features_beat_their_null_and_random_codes_do_not(data):
    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    a = heldout_score(planted, labels, contexts, name="planted", n_boot=50, min_count=10)
    b = heldout_score(random, labels, contexts, name="random", n_boot=50, min_count=10)
    assert isinstance(a, HeldoutScore) and a.n_features == 8 and a.n_scored == 8
    assert a.features["concept"][:3] == ["token id 1", "token id 2", "token id 3"]
    assert a.mcc.value > 0.8 and a.mcc.low > a.null_mcc.high, (a.mcc, a.null_mcc)
    assert a.beats_null() and "beats its same-sparsity null" in a.verdicts()[0]
    assert abs(b.mcc.value) < 0.05 and not b.beats_null(), b.excess_mcc
    assert b.in_sample_mcc > b.mcc.value + 0.03, "in-sample, features that mean nothing still find a concept"
    d = compare(a, b)
    assert d.better == "planted" and d.value.low > 0.5 and "planted scores higher than random" in d.verdicts()[0]
    assert compare(a, a).value.value == 0 and compare(a, a).better is None


def test_heldout_scores_matches_the_sparsity_of_a_reference(data):
    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    res = heldout_scores({"planted": planted, "random": random}, labels, contexts, match={"random": "planted"},
                         n_boot=30, min_count=10)
    assert isinstance(res, HeldoutComparison) and list(res.scores) == ["planted", "random"]
    pool = set(res["planted"].counts.tolist())
    assert set(res["random"].counts.tolist()) <= pool, "each random feature is active on a count drawn from the planted ones"
    assert res["random"].counts.max() < 300, "matched: fewer active tokens than its 300 positives"
    assert [(d.a, d.b, d.better) for d in res.differences] == [("planted", "random", "planted")]
    assert res["planted"].resamples == res["random"].resamples
    assert len(res.to_frame()) == 2 and any("beats" in v for v in res.verdicts())
    # match_active does the same for a single call, on the same resamples
    one = heldout_score(random, labels, contexts, name="random", match_active=res["planted"], n_boot=30, min_count=10)
    assert np.array_equal(one.counts, res["random"].counts) and one.mcc == res["random"].mcc


def test_results_round_trip_through_json(data, tmp_path):
    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    res = heldout_scores({"planted": planted, "random": random}, labels, contexts, n_boot=10, min_count=10)
    back = HeldoutComparison.load(res.save(tmp_path / "cmp.json"))
    a, b = res["planted"], back["planted"]
    assert isinstance(b, HeldoutScore) and b.mcc == a.mcc and b.excess_corr == a.excess_corr
    assert b.resamples == a.resamples and b.features["concept"] == a.features["concept"]
    for k in ("counts", "mcc", "null_mcc", "scored"):
        assert np.array_equal(b.features[k], a.features[k]) and b.features[k].dtype.kind == a.features[k].dtype.kind, k
    assert np.array_equal(b.boot["mcc"], a.boot["mcc"])
    assert compare(b, back["random"]) == compare(a, res["random"]), "paired differences survive the round trip"
    assert back.differences[0].value == res.differences[0].value
    single = HeldoutScore.load(a.save(tmp_path / "one.json"))
    assert single.to_dict() == a.to_dict() and str(single) == str(a)


def test_contexts_need_not_be_contiguous(data):
    """Interleaving two contexts' tokens (each context's order and the contexts' first appearances kept)
    changes nothing: halves, positions, nulls and resamples follow the context ids."""
    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10).matrix
    order = np.arange(len(ids)).reshape(N_CTX // 2, 2, PER).transpose(0, 2, 1).ravel()   # 0,16,1,17,...
    assert not (np.diff(contexts[order]) == 0).all()
    codes = torch.cat([planted, random], 1)
    a = heldout_score(codes, labels, contexts, n_boot=10, min_count=10)
    b = heldout_score(codes[order], labels[order], contexts[order], n_boot=10, min_count=10)
    for k in ("counts", "mcc", "corr", "null_mcc", "null_corr"):
        assert np.array_equal(a.features[k], b.features[k]), k
    assert np.array_equal(a.boot["excess_mcc"], b.boot["excess_mcc"])


def test_token_labels_without_and_with_a_tokenizer(model):
    ids = np.array([[5, 6, 5, 7], [5, 5, 6, 8]])
    lab = token_labels(ids, min_count=2)
    m = lab.matrix.toarray().astype(bool)
    col = {name: m[:, i] for i, name in enumerate(lab.names)}
    assert set(lab.names) >= {"token id 5", "token id 6", "after id 5", "before id 6", "context position 1-3"}
    assert "token id 7" not in lab.names, "seen once: fewer than min_count"
    assert col["token id 5"].tolist() == [1, 0, 1, 0, 1, 1, 0, 0]
    assert col["after id 5"].tolist() == [0, 1, 0, 1, 0, 1, 1, 0], "the previous token, within each context only"
    flat = token_labels(ids.ravel(), np.repeat([3, 9], 4), min_count=2)
    assert flat.names == lab.names and (flat.matrix != lab.matrix).nnz == 0
    words = model.tokenizer.encode("The cat sat. The cat ran, 2 dogs sat.", add_special_tokens=False)
    rich = token_labels(torch.tensor(words), tokenizer=model.tokenizer, min_count=2)
    assert {"class capitalised", "class digit", "class punctuation", "first word of a sentence"} <= set(rich.names)
    assert {"token", "previous token", "class", "context"} <= set(rich.families)


def test_the_tensor_core_and_the_store_scorer_agree(array_store, model):
    """HeldoutScorer reads codes from a store and scores them with the same core: scoring the same codes
    as a tensor, with its labels and contexts, gives the same numbers."""
    from helpers.dictionaries.dictionary import LinearDictionary

    rng = np.random.default_rng(1)
    x = torch.as_tensor(np.where(rng.random((1200, 12)) < 0.04, rng.random((1200, 12)) + 0.2, 0.0), dtype=torch.float32)
    store = array_store(x, shard_tokens=100)            # contexts of 100 tokens
    d = LinearDictionary(torch.eye(12), torch.eye(12), name="eye", hook_name="blocks.0.hook_resid_post", model_name="toy")
    labels = Labels(["a", "b"], ["label"] * 2, sp.csr_matrix((rng.random((1200, 2)) < 0.1).astype(np.float32)))
    sc = HeldoutScorer(store, model.tokenizer, labels=labels, n_boot=8, min_count=3)
    r = sc.score(d, progress=False)
    t = HeldoutSplit(labels, store.tokens()["ctx"], n_boot=8, min_count=3).score_codes(
        d.encode(store.activations("blocks.0.hook_resid_post")), "eye")
    for k in ("counts", "mcc", "corr", "null_mcc", "in_sample_mcc"):
        assert np.array_equal(getattr(r, k), getattr(t, k)), k
    assert all(np.array_equal(r.boot[k], t.boot[k]) for k in r.boot)


def test_clear_errors(data):
    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    with pytest.raises(ValueError, match="labels have 4000 rows .* contexts 3999"):
        heldout_score(planted, labels, contexts[:-1])
    with pytest.raises(ValueError, match=r"activity must be \[4000 tokens, features\]"):
        heldout_score(planted[:-5], labels, contexts)
    with pytest.raises(ValueError, match="counts for 3 features, the codes have 8"):
        heldout_score(planted, labels, contexts, counts=[5, 5, 5], n_boot=0)
    with pytest.raises(ValueError, match="2 label names for"):
        heldout_score(planted, labels.matrix, contexts, label_names=["x", "y"])
    with pytest.raises(ValueError, match="scored has 10 entries"):
        heldout_score(planted, labels, contexts, scored=np.ones(10, bool))
    a = heldout_score(planted, labels, contexts, n_boot=5, seed=0, min_count=10)
    b = heldout_score(random, labels, contexts, n_boot=5, seed=1, min_count=10)
    with pytest.raises(ValueError, match="different resamples"):
        compare(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        token_labels(ids[:4], np.array([0, 1, 0, 1]))


def test_codes_on_an_accelerator_are_scored_where_they_are(data):
    """Codes (and the scored mask) on "cuda" are read there batch by batch, and give the CPU's numbers."""
    from fake_cuda import fake_cuda

    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    on_cpu = heldout_score(planted, labels, contexts, n_boot=5, min_count=10, scored=torch.ones(len(ids), dtype=torch.bool))
    with fake_cuda():
        on_gpu = heldout_score(planted.to("cuda"), labels, contexts, n_boot=5, min_count=10,
                               scored=torch.ones(len(ids), dtype=torch.bool).to("cuda"))
    assert on_gpu.to_dict() == on_cpu.to_dict()


def test_scorer_compare_matches_sparsity_and_pairs_differences(array_store, model):
    """HeldoutScorer.compare scores dictionaries on one set of resamples, one at another's sparsity
    (the counts `matched_counts` draws with the scorer's seed), with the paired differences asked for."""
    from helpers.dictionaries.dictionary import LinearDictionary
    from helpers.evals.heldout import HeldoutDifference, matched_counts

    rng = np.random.default_rng(2)
    x = torch.as_tensor(np.where(rng.random((1200, 12)) < 0.04, rng.random((1200, 12)) + 0.2, 0.0), dtype=torch.float32)
    store = array_store(x, shard_tokens=100)
    hook = "blocks.0.hook_resid_post"
    sparse = LinearDictionary(torch.eye(12), torch.eye(12), name="eye", hook_name=hook, model_name="toy")
    dense = LinearDictionary(torch.randn(12, 12), torch.eye(12), name="mix", hook_name=hook, model_name="toy")
    labels = Labels(["a", "b"], ["label"] * 2, sp.csr_matrix((rng.random((1200, 2)) < 0.1).astype(np.float32)))
    sc = HeldoutScorer(store, model.tokenizer, labels=labels, n_boot=8, min_count=3, seed=3)
    res = sc.compare({"eye": sparse, "mix": dense, "mix at eye's": dense}, match={"mix at eye's": "eye"},
                     keys=("mcc", "corr"), progress=False)
    assert isinstance(res, HeldoutComparison) and list(res.scores) == ["eye", "mix", "mix at eye's"]
    want = sc.score(dense, counts=matched_counts(torch.as_tensor(res["eye"].counts), 24, seed=3), progress=False)
    assert np.array_equal(res["mix at eye's"].counts, want.counts)
    assert not np.array_equal(res["mix"].counts, res["mix at eye's"].counts)
    assert [(d.a, d.b, d.key) for d in res.differences] == [("mix at eye's", "eye", "mcc"), ("mix at eye's", "eye", "corr")]
    assert isinstance(res.difference("eye", "mix"), HeldoutDifference)          # computed on demand
    assert len(res.difference_table().rows()) == 2 and res.difference_table().verdicts()
    with pytest.raises(ValueError, match="names of dictionaries"):
        sc.compare({"eye": sparse}, match={"eye": "nope"}, progress=False)


def test_interpretability_curve_result_round_trips_and_says_the_gap():
    from helpers.evals.heldout import CurvePoint, InterpretabilityCurve

    def summary(m):
        return {"mcc": m, "mcc_low": m - 0.01, "mcc_high": m + 0.01, "median_count": 12.0}
    rows = [{"tokens": t, "sae": summary(s), "random": summary(r), "difference": {"value": s - r, "low": s - r - 0.005,
                                                                                   "high": s - r + 0.005}}
            for t, s, r in ((1000, 0.10, 0.12), (2000, 0.13, 0.12))]
    curve = InterpretabilityCurve.from_rows(rows)
    assert isinstance(curve.points[0], CurvePoint) and curve.points[1].sae.low == pytest.approx(0.12)
    again = InterpretabilityCurve.from_dict(curve.to_dict())
    assert again == curve and isinstance(again.points[0].difference, type(curve.points[0].difference))
    said = " ".join(curve.verdicts())
    assert "SAE scores lower" in said and "SAE scores higher" in said and "+0.030" in said
    assert len(curve.rows()) == 2 and curve.plot() is not None


def test_the_distribution_every_way_with_paired_intervals_over_contexts(data):
    """Median, mean, shares above 0.3/0.5/0.7 and the top decile, each with an interval over resampled
    contexts, and paired differences of any of them."""
    from helpers.evals.heldout import SUMMARIES, statistic_key

    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    both = torch.cat([planted, random], 1)  # 8 planted features and 30 that mean nothing
    res = heldout_scores({"mixed": both, "random": random}, labels, contexts, n_boot=40, min_count=10)
    mixed = res["mixed"].summary()
    assert list(mixed) == list(SUMMARIES)
    scored = res["mixed"].scored_features()
    v = scored.mcc[scored.scored]
    assert mixed["share > 0.5"].value == pytest.approx(np.mean(v > 0.5))
    assert mixed["mean"].value == pytest.approx(v.mean()) and mixed["median"].value == pytest.approx(np.median(v))
    assert mixed["top decile"].value == pytest.approx(np.percentile(v, 90))
    assert mixed["median"].value == res["mixed"].mcc.value
    # the median hides the planted tail that the share shows: 8 of 38 features
    assert mixed["median"].value < 0.1 and 0.15 < mixed["share > 0.5"].value <= 8 / 38 + 1e-9
    for e in mixed.values():
        assert e.low <= e.value <= e.high
    assert mixed["mean"].high > mixed["mean"].low  # resampled contexts move the mean (the share here stays 8/38)
    assert len(res["mixed"].boot[statistic_key("mcc", "share > 0.5")]) == 40
    d = compare(res["mixed"], res["random"], "mcc share > 0.5")
    assert d.better == "mixed" and d.value.low > 0.1
    same = compare(res["mixed"], res["mixed"], "mcc top decile").value
    assert (same.value, same.low, same.high) == (0, 0, 0)
    f = res["mixed"].nearest(0.9)
    assert scored.scored[f] and abs(scored.mcc[f] - 0.9) == np.min(np.abs(scored.mcc[scored.scored] - 0.9))
    table = res.distribution_table()
    assert [r["method"] for r in table.rows()] == ["mixed", "random"] and "share > 0.5" in table.rows()[0]
    with pytest.raises(ValueError, match="statistic 'mcc share > 0.9'"):
        compare(res["mixed"], res["random"], "mcc share > 0.9")


def test_a_layer_comparison_says_claim_1_at_every_layer(data):
    from helpers.dictionaries.baselines import LayerComparison, MethodScore

    ids, contexts, planted, random = data
    split = HeldoutSplit(token_labels(ids, contexts, min_count=10), contexts, n_boot=20, min_count=10)
    rows = []
    for layer in (1, 2):
        for name, codes in (("SAE", planted), ("random", random)):
            sc = split.score_codes(codes, name)
            rows.append(MethodScore.from_row({
                "layer": layer, "method": name, "sparsity": "own", "massive_share": 0.0, "converged": None,
                "scored": sc, **sc.summary(), "all": {}, "vs_random": {"value": 0.0, "low": 0.0, "high": 0.0},
                "resamples": split.resamples}))
    table = LayerComparison(rows).claim()
    assert [r.measure for r in table.rows_][::4] == ["layer 1: SAE vs random", "layer 2: SAE vs random"]
    assert {r.word for r in table.rows_} == {"holds"} and all(r.paired for r in table.rows_)
    assert rows[0].distribution().median.value == rows[0].mcc.value


@pytest.mark.parametrize("labels_dense", [True, False])
def test_a_resample_that_keeps_every_context_once_gives_the_point_estimate(data, labels_dense):
    """The resampled statistics are counts reweighted per context: with every context weighted once, each
    feature's concept is chosen as on the sample itself, so every resampled median is the point estimate
    (with the labels held dense, and as the sparse matrix used when they are too many to hold dense)."""
    ids, contexts, planted, random = data
    labels = token_labels(ids, contexts, min_count=10)
    split = HeldoutSplit(labels, contexts, n_boot=3, min_count=10)
    split.weights = np.ones((2, split.n_ctx))
    if not labels_dense:
        split.L_dense = None
    codes = torch.cat([planted, random], 1)
    r = split.score_codes(codes, "codes")
    s = r.scored
    assert s.sum() > 30
    for key in ("mcc", "corr"):
        point = np.median(getattr(r, key)[s])
        assert np.allclose(r.boot[key], point, rtol=0, atol=1e-12), (key, r.boot[key], point)
        assert np.allclose(r.boot[f"{key} mean"], np.mean(getattr(r, key)[s]), rtol=0, atol=1e-12)
        null = np.median(getattr(r, f"null_{key}")[s])
        assert np.allclose(r.boot[f"null_{key}"], null, rtol=0, atol=1e-12), (key, r.boot[f"null_{key}"], null)
