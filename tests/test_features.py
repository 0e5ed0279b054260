"""Feature statistics, concept scores, dictionaries and dashboards on stores with known answers."""
import numpy as np
import pytest
import torch

from helpers.show.dashboard import FeatureView, dashboard_html, top_token_is
from helpers.dictionaries.dictionary import LinearDictionary, SAEDictionary, neuron_basis, random_directions
from helpers.evals.features import (Concepts, concept_scores, dictionary_score, feature_stats, logit_effects,
                                    top_token_share)
from helpers.saes.stack import SAEConfig, SAEStack
from helpers.activations.store import StoreMismatch

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def toy(array_store):
    """600 tokens; the store's token ids are 0..599 (see the fixture), activations random."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g)
    return array_store(x, hook=HOOK, shard_tokens=128), x.half().float()


def test_stats_match_brute_force(toy):
    store, x = toy
    d = neuron_basis(6, hook_name=HOOK, model_name="toy")
    st = feature_stats(d, store, k=5, sample=16, batch_size=100, progress=False)
    codes = d.encode(x)
    assert torch.allclose(st.density, (codes > 0).float().mean(0))
    assert torch.allclose(st.max_act, codes.max(0).values)
    top = codes.T.topk(5, dim=1)
    assert torch.allclose(st.top_acts, top.values)
    assert torch.allclose(codes.T.gather(1, st.top_idx), top.values)  # (ties may swap indices)
    ok = st.sample_idx >= 0
    assert ok.all()  # every feature has more than 16 active tokens here
    assert torch.allclose(st.sample_acts, codes.T.gather(1, st.sample_idx))
    assert (st.sample_acts > 0).all()


def test_concept_score_finds_the_planted_concept(array_store, model):
    """Feature 0 fires exactly on token id 11, feature 1 on every token (it must score ~0)."""
    n = 2000
    rng = np.random.default_rng(0)
    tokens = rng.choice([11, 12, 13, 14], size=n)
    x = torch.zeros(n, 4)
    x[:, 0] = torch.as_tensor(tokens == 11, dtype=torch.float32) * 2.0
    x[:, 1] = 1.0
    x[:, 2] = torch.as_tensor(rng.random(n) < 0.3, dtype=torch.float32)  # random, unrelated
    # token 11 strongly, plus weak noise on 30% of all tokens: poor when active means > 0, good by correlation
    x[:, 3] = x[:, 0] + 0.05 * torch.as_tensor(rng.random(n) < 0.3, dtype=torch.float32)
    store = array_store(x, hook=HOOK)
    meta_path = store.path / "shard_00000.meta.bin"
    assert meta_path.exists()
    # relabel the stored tokens with our planted ids (the fixture numbers them 0..n-1)
    from helpers.activations.store import ActivationStore, META_DTYPE, _crc32
    import json
    for s in store.shards:
        f = store.path / s["files"]["meta"]["name"]
        meta = np.fromfile(f, dtype=META_DTYPE)
        meta["token"] = tokens[meta["token"]]
        f.write_bytes(meta.tobytes())
        s["files"]["meta"]["crc32"] = _crc32(meta.tobytes())
    (store.path / "manifest.json").write_text(json.dumps(store.manifest))
    store = ActivationStore.open(store.path)
    d = LinearDictionary(torch.eye(4), torch.eye(4), name="planted", hook_name=HOOK, model_name="toy")
    concepts = Concepts.from_store(store, model.tokenizer)
    st = feature_stats(d, store, progress=False)
    sc = concept_scores(d, store, st, concepts, max_density=1.0, progress=False)
    assert sc["concept"][0] == f"token {model.tokenizer.decode([11])!r}"
    assert sc["mcc"][0] == pytest.approx(1.0, abs=1e-5) and sc["precision"][0] == pytest.approx(1.0)
    assert abs(float(sc["mcc"][1])) < 1e-6, "a feature that fires everywhere carries no information"
    assert abs(float(sc["mcc"][2])) < 0.1
    summary = dictionary_score(sc, n_boot=50)
    assert summary["low"] <= summary["value"] <= summary["high"] and summary["excluded"] == 4  # negative halves
    # the correlation score agrees on the clean features ...
    assert sc["corr_concept"][0] == sc["concept"][0] and sc["corr"][0] == pytest.approx(1.0, abs=1e-5)
    assert abs(float(sc["corr"][1])) < 1e-6 and abs(float(sc["corr"][2])) < 0.1
    # ... and, unlike MCC at threshold 0, sees through weak noise on a strong feature
    assert sc["corr_concept"][3] == sc["concept"][0] and float(sc["corr"][3]) > 0.95
    assert float(sc["mcc"][3]) < 0.8
    with pytest.raises(ValueError, match="key"):
        dictionary_score(sc, key="f1")


def test_dense_directions_are_judged_on_their_top_tokens(toy, model):
    store, x = toy
    d = random_directions(6, 8, seed=1, hook_name=HOOK, model_name="toy")
    st = feature_stats(d, store, progress=False)
    sc = concept_scores(d, store, st, Concepts.from_store(store, model.tokenizer), max_density=0.05,
                        progress=False)
    assert (sc["active_counts"] <= 0.05 * 600 + 10).all() and (sc["threshold"] > 0).all()


def test_dictionaries_refuse_other_stores_and_inputs(toy):
    store, _ = toy
    with pytest.raises(StoreMismatch, match="fitted on model 'gpt2'"):
        feature_stats(neuron_basis(6, hook_name=HOOK, model_name="gpt2"), store, progress=False)
    with pytest.raises(StoreMismatch, match="blocks.3.hook_resid_post"):
        feature_stats(neuron_basis(6, hook_name="blocks.3.hook_resid_post", model_name="toy"), store, progress=False)
    with pytest.raises(ValueError, match="d_model=5"):
        neuron_basis(6).encode(torch.randn(3, 5))


def test_linear_dictionary_round_trip_and_sae_wrapper():
    w = torch.linalg.qr(torch.randn(6, 6))[0]
    d = LinearDictionary(w, w.T, mean=torch.ones(6))
    x = torch.randn(20, 6)
    assert torch.allclose(d.decode(d.encode(x)), x, atol=1e-5)
    assert d.n_features == 12 and (d.encode(x) >= 0).all()
    sae = SAEDictionary(SAEStack([SAEConfig(6, 10, hook_name=HOOK)]))
    assert sae.directions.shape == (10, 6) and torch.allclose(sae.directions.norm(dim=-1), torch.ones(10))


def test_dashboard_and_browser_pieces(toy, model):
    store, x = toy
    d = neuron_basis(6, hook_name=HOOK, model_name="toy")
    st = feature_stats(d, store, k=5, progress=False)
    sc = concept_scores(d, store, st, Concepts.from_store(store, model.tokenizer), progress=False)
    fake_model = type("M", (), {})()
    fake_model.W_U = torch.randn(6, 50)
    fake_model.ln_final = torch.nn.LayerNorm(6)
    eff = logit_effects(d, fake_model, k=3)
    direct = (d.directions[2] * fake_model.ln_final.weight) @ fake_model.W_U
    assert torch.equal(eff["up_ids"][2], direct.topk(3).indices)
    view = FeatureView(d, store, st, sc, eff, model.tokenizer)
    page = dashboard_html(view, 3)
    assert "feature 3" in page and "<img" in page and "<span" in page
    with pytest.raises(IndexError, match="feature 12 is out of range.*0 to 11"):
        dashboard_html(view, 12)
    first = model.tokenizer.decode([int(store.tokens()["token"][int(st.top_idx[0, 0])])])
    assert bool(top_token_is(view, first)[0])


def test_describe_features(toy, model):
    from helpers.evals.features import describe_features

    store, x = toy
    d = neuron_basis(6, hook_name=HOOK, model_name="toy")
    out = describe_features(d, store, [0, 7], model.tokenizer, k=5)
    assert set(out) == {0, 7} and all("×" in v for v in out.values())
    assert sum(int(part.rsplit("×", 1)[1]) for part in out[0].split(", ")) <= 5
    with pytest.raises(ValueError, match="features must lie"):
        describe_features(d, store, [12], model.tokenizer)


def test_ranked_puts_features_with_too_few_scored_tokens_last():
    """A perfect score on a handful of tokens (e.g. a feature that fires almost only on massive
    tokens, scored on ordinary ones) must not rank first."""
    from helpers.evals.features import ranked

    scores = {"mcc": torch.tensor([0.3, 1.0, 0.8, 0.5]), "active_counts": torch.tensor([40.0, 1.0, 12.0, 5.0])}
    assert ranked(scores).tolist() == [2, 3, 0, 1]
    assert ranked(scores, min_active=1).tolist() == [1, 2, 3, 0]


def test_best_concepts_do_not_depend_on_the_chunk_of_features():
    """_best_concepts scores a few features at a time; the result equals scoring them all at once."""
    from helpers.evals.features import _best_concepts

    g = torch.Generator().manual_seed(1)
    F, C, n = 70, 40, 5000
    totals = torch.randint(0, 400, (C,), generator=g).double()
    active_n = torch.randint(0, 300, (F,), generator=g).double()
    joint = torch.minimum(torch.rand(F, C, generator=g, dtype=torch.float64) * 50, torch.minimum(
        active_n[:, None], totals[None, :])).floor()
    mass = joint * 1.7
    a = {"joint": joint, "mass": mass, "a_sum": active_n * 2.0, "a_sq": active_n * 5.0, "active_n": active_n,
         "totals": totals, "n": n}
    concepts = type("C", (), {"names": [f"c{i}" for i in range(C)]})()
    one, chunked = _best_concepts(a, concepts, torch.zeros(F), chunk=F), _best_concepts(a, concepts, torch.zeros(F), chunk=7)
    for key in ("mcc", "corr", "precision", "recall", "f1", "concept_index"):
        assert torch.equal(one[key], chunked[key]), key
    assert one["concept"] == chunked["concept"] and one["corr_concept"] == chunked["corr_concept"]


def test_random_directions_reconstruct_and_are_not_an_sae_initialisation():
    """The random baseline decodes what it encodes (orthonormal, or the pseudo-inverse when there are
    more directions than dimensions), and its seed is not the SAE's: drawn with the SAE's seed, it would
    be the SAE's initial dictionary row for row."""
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    for n in (32, 64):  # 16 directions (an orthonormal basis) and 32 (overcomplete, pseudo-inverse decoder)
        d = random_directions(16, n, seed=0)
        assert torch.allclose(d.decode(d.encode(x)), x, atol=1e-4), n
    few = random_directions(16, 8, seed=0)  # 4 orthonormal directions: decoding projects onto their span
    p = few.decode(few.encode(x))
    assert torch.allclose(few.decode(few.encode(p)), p, atol=1e-5) and not torch.allclose(p, x, atol=1e-2)
    sae = SAEStack([SAEConfig(d_in=16, d_sae=64, l1_coefficient=1e-3)], seed=0)
    w = sae.W_dec[0] / sae.W_dec[0].norm(dim=-1, keepdim=True)
    r = random_directions(16, 64, seed=0).encoder.T
    assert (w @ r.T).abs().max() < 0.99


def test_concept_scores_are_a_typed_result():
    from helpers.evals.features import ConceptScores, ConceptSummary, DictionaryScore, dictionary_score

    mcc = torch.tensor([0.9, 0.2, 0.95, 0.5])
    sc = ConceptScores("toy", ["token 'a'", "POS NOUN", "token 'b'", "class apostrophe"], torch.arange(4), mcc,
                       torch.tensor([1.0, 0.5, 0.9, 0.6]), torch.tensor([0.8, 0.1, 0.7, 0.4]), mcc, mcc / 2,
                       ["x"] * 4, torch.tensor([50.0, 40.0, 3.0, 20.0]), torch.zeros(4), 1000)
    assert sc["mcc"] is sc.mcc and "concept" in sc and sc.get("ordinary") is None and sc.judged is sc
    assert sc.ranked().tolist() == [0, 3, 1, 2]                       # feature 2 fires on too few tokens: last
    assert sc.best_for("token") == 0 and sc.best_for("class") == 3 and sc.best_for("genre") is None
    assert "90% carry that label" in sc.reading(2) and "MCC 0.95" in sc.reading(2)
    assert [r["feature"] for r in sc.top(2).rows()] == [0, 3]
    assert sc.sample(2, seed=0, min_active=10) == sc.sample(2, seed=0, min_active=10)
    assert set(sc.sample(5, seed=1, min_active=10)) == {0, 1, 3}
    d = dictionary_score(sc, n_boot=20)
    assert isinstance(d, DictionaryScore) and d.n == 3 and d.excluded == 1 and d["value"] == d.value == pytest.approx(0.5)
    summary = ConceptSummary.of({"A": sc, "B": sc}, n_boot=20)
    assert [r["dictionary"] for r in summary.rows()] == ["A", "B"] and summary["B"].name == "B"
    assert "favours sparse features" in summary.verdicts()[0]
    again = ConceptScores.from_dict(sc.to_dict())
    assert torch.equal(again.mcc, sc.mcc) and again.concept == sc.concept and torch.is_tensor(again.active_counts)


def test_top_token_share_counts_the_most_frequent_token_among_the_top():
    token_ids = np.array([7, 7, 8, 9, 9, 9, 9, 5])
    top_idx = np.array([[0, 1, 2, -1],        # ids 7, 7, 8: two of three are one token
                        [3, 4, 5, 6],         # all id 9
                        [-1, -1, -1, -1],     # no top token
                        [0, 2, 3, 7]])        # four different ids
    share = top_token_share(top_idx, token_ids)
    assert np.allclose(share[[0, 1, 3]], [2 / 3, 1.0, 0.25]) and np.isnan(share[2])
    assert np.allclose(top_token_share(torch.as_tensor(top_idx), token_ids, n=2)[[0, 1, 3]], [1.0, 1.0, 0.5])


def test_top_tokens_are_exact_and_order_equal_codes_by_token_index():
    """Each feature's top tokens, streamed in batches and merged in chunks, are the exact top k: the
    k largest codes, and where a feature has fewer positive tokens than k, all of them; equal codes
    come in token order, whatever the batch and chunk sizes."""
    from helpers.evals.features import top_tokens_of

    g = torch.Generator().manual_seed(0)
    n, f, k = 1000, 7, 60
    codes = torch.randint(0, 4, (n, f), generator=g).float()                  # codes 0-3: many ties
    codes[:, :3] *= torch.rand(n, 3, generator=g) < 0.04                      # three features with < k positives
    expected = []
    for j in range(f):
        order = sorted(range(n), key=lambda t: (-float(codes[t, j]), t))[:k]
        expected.append([t if codes[t, j] > 0 else -1 for t in order])
    for batch in (n, 64, 7):
        v, i, n_pos = top_tokens_of(codes, k, batch_size=batch)
        assert torch.equal(n_pos, (codes > 0).sum(0))
        assert torch.equal(v, codes.T.topk(k, dim=1).values), batch           # the k largest codes, descending
        ok = i >= 0
        assert torch.equal(codes.T.gather(1, i.clamp_min(0))[ok], v[ok])      # each index holds its value
        for j in range(3):                                                     # fewer positives than k: all, in order
            assert i[j].tolist() == expected[j], (batch, j)
        for j in range(f):                                                     # within the codes above the k-th, in order
            above = v[j] > v[j, -1]
            assert i[j][above].tolist() == [t for t in expected[j][: int(above.sum())]], (batch, j)
