"""Held-out, sparsity-matched concept scores (helpers.evals.heldout) on stores with known answers."""
import json

import numpy as np
import pytest
import torch

from helpers.dictionaries.dictionary import LinearDictionary, random_directions
from helpers.evals.features import activity_thresholds
from helpers.evals.heldout import HeldoutScorer, concept_labels, difference, matched_counts
from helpers.activations.store import META_DTYPE, ActivationStore, _crc32

HOOK = "blocks.0.hook_resid_post"


def relabel(store, tokens, ctx, tok_pos=None):
    """Give the stored tokens these ids and context numbers (the fixture numbers tokens 0..n-1)."""
    for s in store.shards:
        f = store.path / s["files"]["meta"]["name"]
        meta = np.fromfile(f, dtype=META_DTYPE)
        i = meta["token"].copy()
        meta["token"], meta["ctx"] = tokens[i], ctx[i]
        meta["tok_pos"] = i if tok_pos is None else tok_pos[i]
        f.write_bytes(meta.tobytes())
        s["files"]["meta"]["crc32"] = _crc32(meta.tobytes())
    (store.path / "manifest.json").write_text(json.dumps(store.manifest))
    return ActivationStore.open(store.path)


@pytest.fixture
def planted(array_store):
    """4,000 tokens in 250 contexts of 16; token ids drawn from 40 ids with Zipf-like frequencies.
    Feature 0 fires exactly on token id 20 (2% of tokens); feature 1 on 6 random tokens (means nothing); feature 2
    on every token, more strongly on id 12; feature 3 on random 3% of tokens; features 4-103 on 6
    random tokens each (mean nothing)."""
    n, per = 4000, 16
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, 41)
    tokens = rng.choice(np.arange(10, 50), size=n, p=p / p.sum())
    ctx = np.arange(n) // per
    x = torch.zeros(n, 104)
    x[:, 0] = torch.as_tensor(tokens == 20, dtype=torch.float32) * 2.0
    for f in [1, *range(4, 104)]:
        x[rng.choice(n, 6, replace=False), f] = 1.0
    x[:, 2] = 0.5 + torch.as_tensor(tokens == 12, dtype=torch.float32)
    x[:, 3] = torch.as_tensor(rng.random(n) < 0.03, dtype=torch.float32)
    store = relabel(array_store(x, hook=HOOK, shard_tokens=1000), tokens, ctx)
    d = LinearDictionary(torch.eye(104), torch.eye(104), name="planted", hook_name=HOOK, model_name="toy")
    return store, d, tokens


def test_a_planted_concept_scores_one_and_chance_scores_zero(planted, model):
    store, d, tokens = planted
    sc = HeldoutScorer(store, model.tokenizer, n_boot=20, max_density=0.05, min_count=5, min_active=5)
    r = sc.score(d, progress=False)
    assert r.concept[0] == f"token {model.tokenizer.decode([20])!r}"
    assert r.mcc[0] == pytest.approx(1.0, abs=1e-6)
    assert abs(r.null_mcc[0]) < 0.1, "the null of a token feature keeps its count and loses its meaning"
    # 6-token features that mean nothing: in-sample they find a concept by chance, held out they cannot
    chance = np.r_[1, 4:104]
    assert r.scored[chance].all() and not r.scored[104:].any(), "negative halves never fire: not scored"
    assert np.median(r.in_sample_mcc[chance]) > 0.05, np.median(r.in_sample_mcc[chance])
    assert abs(np.median(r.mcc[chance])) < 0.02, np.median(r.mcc[chance])


def test_the_null_keeps_counts_and_positions_in_other_contexts(planted, model):
    store, d, _ = planted
    sc = HeldoutScorer(store, model.tokenizer, n_boot=0, max_density=0.05)
    _, idx, _ = sc.active(d, progress=False)
    null = sc.null_of(idx)
    for f in range(8):
        a, b = idx[f][idx[f] >= 0], null[f][idx[f] >= 0]
        assert (b >= 0).all(), "equal-length contexts, every token scored: no target is dropped"
        assert (sc.position[a] == sc.position[b]).all()
        if len(a) > 1:
            assert (sc.ctx[a] != sc.ctx[b]).mean() > 0.9


def test_the_resampled_scores_with_unit_weights_equal_the_full_sample(planted, model):
    """The bootstrap re-chooses each concept among candidates: with every context once, it must
    reproduce the point estimate exactly (ties between concepts included)."""
    store, d, _ = planted
    sc = HeldoutScorer(store, model.tokenizer, n_boot=2, max_density=0.2, min_count=5)
    sc.weights[:] = 1.0
    r = sc.score(random_directions(104, 300, seed=3, hook_name=HOOK, model_name="toy"), progress=False)
    for key in ("mcc", "corr", "null_mcc", "null_corr"):
        assert np.allclose(r.boot[key], np.median(getattr(r, key)[r.scored]), atol=1e-12), key


def test_exact_top_k_and_matched_counts(planted, model):
    store, d, _ = planted
    sc = HeldoutScorer(store, model.tokenizer, n_boot=0, max_density=0.01)
    assert sc.k_max == 40
    _, idx, k = sc.active(d, progress=False)
    assert k[2] == 40 and (idx[2] >= 0).sum() == 40, "a dense feature is active on exactly its top k tokens"
    assert k[0] == 40 and k[1] == 6
    counts = matched_counts(torch.tensor([5, 7, 1]), 208, seed=0)
    assert set(counts.tolist()) <= {5, 7}, "counts are drawn from the scored features only"
    _, idx, k = sc.active(d, counts=counts, progress=False)
    assert (k <= counts.numpy()).all() and k[2] == counts[2]


def test_activity_thresholds_are_exact(planted):
    store, d, _ = planted
    tau = activity_thresholds(d, store, HOOK, store.n_tokens, max_density=0.005)
    codes = d.encode(store.activations(HOOK))
    assert tau[0] > 0 and tau[1] == 0
    assert int((codes[:, 3] > tau[3]).sum()) <= 20 <= int((codes[:, 3] >= tau[3]).sum())


def test_difference_is_paired_over_the_same_resamples(planted, model):
    store, d, _ = planted
    sc = HeldoutScorer(store, model.tokenizer, n_boot=30, max_density=0.05, min_count=5)
    a = sc.score(d, progress=False)
    same = difference(a, a)
    assert same["value"] == 0 and same["low"] == 0 and same["high"] == 0


def test_contextual_concepts(model):
    tok = model.tokenizer
    words = ['He', ' said', ' "', 'walk', 'ing', ' home', '."', ' Then', ' he', ' left', '.']
    ids = [tok.encode(w, add_special_tokens=False) for w in words]
    assert all(len(i) == 1 for i in ids), ids
    ids = np.array([i[0] for i in ids])
    meta = np.zeros(len(ids), dtype=META_DTYPE)
    meta["token"], meta["tok_pos"] = ids, np.arange(len(ids))
    lab = concept_labels(meta, tok, min_count=1)
    m = lab.matrix.toarray().astype(bool)

    def on(name):
        return [words[i] for i in np.flatnonzero(m[:, lab.names.index(name)])]

    assert on("inside quotes") == ['walk', 'ing', ' home']
    assert on(f"after {' said'!r}") == [' "']
    assert on(f"before {' home'!r}") == ['ing']
    assert on("class word continuation") == ['ing']
    assert on("class suffix -ing") == ['ing']
    assert on("first word of a sentence") == ['He', ' Then']
    assert on("sentence word 2-3") == [' said', 'walk', ' he', ' left']


def test_a_dictionary_scored_under_two_names_reads_its_top_tokens_once(planted, model, monkeypatch):
    """`compare` reads the top tokens of a dictionary given under two names (e.g. random directions at
    two sparsities) once, and scores each name as scoring it alone would."""
    from helpers.evals import heldout

    store, d, _ = planted
    sc = HeldoutScorer(store, model.tokenizer, n_boot=10, max_density=0.05, min_count=5, min_active=5)
    other = LinearDictionary(torch.eye(104).flip(0), torch.eye(104).flip(0), name="flipped", hook_name=HOOK,
                             model_name="toy")
    calls = []
    real = heldout.top_tokens
    monkeypatch.setattr(heldout, "top_tokens", lambda dictionary, *a, **kw: calls.append(dictionary.name) or
                        real(dictionary, *a, **kw))
    cmp = sc.compare({"planted": d, "flipped": other, "flipped (planted's sparsity)": other},
                     match={"flipped (planted's sparsity)": "planted"}, progress=False)
    assert sorted(calls) == ["flipped", "planted"]                        # each dictionary read once
    alone = sc.score(other, name="flipped (planted's sparsity)", progress=False,
                     counts=heldout.matched_counts(torch.as_tensor(sc.score(d, progress=False).counts), other.n_features, seed=0,
                                                   min_active=5))
    got = cmp.scores["flipped (planted's sparsity)"]
    np.testing.assert_array_equal(got.features["counts"], alone.counts)
    np.testing.assert_array_equal(got.features["mcc"], alone.mcc)
