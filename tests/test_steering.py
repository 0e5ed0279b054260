"""helpers.causal.steering: the intervention, generation, cost, the index and the comparison."""
import json
from dataclasses import FrozenInstanceError, fields, replace

import numpy as np
import pytest
import torch

from helpers.causal import steering
from helpers.dictionaries.dictionary import neuron_basis
from helpers.causal.steering import SteeringIndex, add_hook, steering_vector
from helpers.results import Estimate

HOOK = "blocks.6.hook_resid_post"


def test_add_hook_adds_exactly_the_vector_after_bos():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(2, 5, 8, generator=g)
    u = torch.randn(8, generator=g)
    v = steering_vector(u, 0.5, 10.0)
    assert torch.allclose(v.norm(), torch.tensor(5.0)) and torch.allclose(v / v.norm(), u / u.norm())
    out = add_hook(v)(act)
    assert torch.equal(out[:, 0], act[:, 0])                                   # BOS untouched
    assert torch.allclose(out[:, 1:] - act[:, 1:], v.expand(2, 4, 8), atol=1e-6)
    rows = torch.stack([v, -2 * v])                                            # one vector per row
    out = add_hook(rows)(act)
    assert torch.allclose(out[1, 1:] - act[1, 1:], -2 * v.expand(4, 8), atol=1e-5)
    assert torch.equal(add_hook(torch.zeros(8))(act), act)                     # scale 0: bit for bit


def test_scale_for_interpolates_sqrt_kl():
    assert steering._scale_for([1.0, 2.0], [1.0, 4.0], 1.0) == (1.0, True)
    s, ok = steering._scale_for([1.0, 2.0], [1.0, 4.0], 2.25)                  # sqrt: 1.5, half-way
    assert ok and abs(s - 1.5) < 1e-9
    s, ok = steering._scale_for([1.0, 2.0], [1.0, 4.0], 0.25)                  # below the grid: through (0, 0)
    assert ok and abs(s - 0.5) < 1e-9
    assert steering._scale_for([1.0, 2.0], [1.0, 4.0], 9.0) == (2.0, False)    # not reached


def test_shows_whole_words_any_case():
    assert steering.shows("Then Her hat fell.", ("her",))
    assert not steering.shows("over there", ("her",))
    assert steering.shows("holy water!", ("god", "water"))


def toy_index(x, tokens, vocab, dictionary):
    meta = np.zeros(len(x), dtype=[("token", np.int64)])
    meta["token"] = tokens
    c = dictionary.encode(x)
    return SteeringIndex(dictionary, HOOK, x, meta, float(x.norm(dim=-1).median()), None, vocab,
                         (c > 0).sum(0), torch.full((dictionary.n_features, 1), -1), torch.zeros(dictionary.n_features, 1,
                                                                                                   dtype=torch.int64),
                         torch.zeros(dictionary.n_features, 1), word_concepts={"bee": ("b",)})


def test_diff_of_means_and_mcc_by_hand():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    tokens = torch.randint(0, 4, (40,), generator=g).numpy()
    tokens[:2] = (1, 3)
    d = neuron_basis(3)
    index = toy_index(x, tokens, ["a", " b", "c", " B"], d)
    present = np.isin(tokens, [1, 3])                                           # " b" and " B" read as "b"
    assert index.word_ids(("b",)) == [1, 3] and (index.mask("bee") == present).all()
    want = x[torch.as_tensor(present)].mean(0) - x[~torch.as_tensor(present)].mean(0)
    assert torch.allclose(index.diff_of_means("bee"), want, atol=1e-6)
    active = (d.encode(x) > 0).numpy()
    for f in range(d.n_features):
        tp = (active[:, f] & present).sum()
        fp = (active[:, f] & ~present).sum()
        fn = (~active[:, f] & present).sum()
        tn = (~active[:, f] & ~present).sum()
        mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        assert abs(float(index.feature_mcc("bee")[f]) - mcc) < 1e-5, f
    best, v = index.fires_on("bee", k=1, min_active=1)[0]
    assert best == int(np.nanargmax([float(m) for m in index.feature_mcc("bee")]))


def test_generation_scale_zero_is_the_model_and_seeds_reproduce(model):
    d = model.cfg.d_model
    plain = steering.generate_ids(model, "The cat sat on the", HOOK, None, n_new=4)
    assert torch.equal(steering.generate_ids(model, "The cat sat on the", HOOK, torch.zeros(1, d), n_new=4), plain)
    u = model.W_U[:, model.tokenizer.encode(" dog")[0]].detach().float().cpu()  # a direction that says " dog"
    big = steering.generate_ids(model, "The cat sat on the", HOOK, steering_vector(u, 2.0, 100.0)[None], n_new=4)
    assert not torch.equal(big, plain)
    a = steering.generate(model, "I think", HOOK, torch.zeros(4, d), n_new=4, sample=True, seeds=[1, 2, 3, 4])
    assert a == steering.generate(model, "I think", HOOK, torch.zeros(4, d), n_new=4, sample=True, seeds=[1, 2, 3, 4])
    assert len(set(a)) > 1                                                       # other seeds, other samples


def test_the_key_value_cache_holds_the_prompt_and_generates_what_full_passes_do(model):
    """The bridge keeps a key-value cache (transformers 5 passes it to attention as ``cache=``, which
    transformer_lens 4 reads only through `kv_cache_fix`): after the prompt it holds every prompt
    position, and cached generation, steered after BOS and sampled, writes what full passes write."""
    toks = model.to_tokens("The cat sat on the")
    with torch.no_grad():
        full = model(toks)[:, -1]
        _, cache = model(toks[:, :-1], return_type="logits_and_cache", use_cache=True)
        assert cache.get_seq_length() == toks.shape[1] - 1
        step, _ = model(toks[:, -1:], return_type="logits_and_cache", past_key_values=cache)
    assert torch.allclose(step[:, -1], full, atol=1e-3)
    u = model.W_U[:, model.tokenizer.encode(" dog")[0]].detach().float().cpu()
    vecs = torch.stack([torch.zeros_like(u), steering_vector(u, 1.0, 100.0)])
    for sample in (False, True):
        kw = dict(n_new=6, sample=sample, seeds=[1, 2])
        cached = steering.generate_ids(model, "The cat sat on the", HOOK, vecs, **kw)
        assert torch.equal(cached, steering.generate_ids(model, "The cat sat on the", HOOK, vecs, kv_cache=False, **kw))
        assert not torch.equal(cached[0], cached[1])                             # the steered row differs


def test_rows_keep_their_order_and_seeds_whatever_the_batch(model):
    """Row i of a sampled batch is what a one-row call with seeds[i] gives, and batching by max_rows keeps
    the rows' order (greedy decoding, so that the last bits of the logits, which can differ between batch
    shapes, do not decide a sample)."""
    g = torch.Generator().manual_seed(3)
    vecs = torch.stack([steering_vector(torch.randn(model.cfg.d_model, generator=g), s, 100.0) for s in (0, 1, 2)])
    batched = steering.generate_ids(model, "I think", HOOK, vecs, n_new=5)
    assert torch.equal(steering.generate_ids(model, "I think", HOOK, vecs, n_new=5, max_rows=1), batched)
    assert torch.equal(steering.generate_ids(model, "I think", HOOK, vecs[2:], n_new=5)[0], batched[2])
    zeros = torch.zeros(3, model.cfg.d_model)
    sampled = steering.generate_ids(model, "I think", HOOK, zeros, n_new=5, sample=True, seeds=[5, 6, 7], max_rows=2)
    alone = steering.generate_ids(model, "I think", HOOK, zeros[:1], n_new=5, sample=True, seeds=[7])
    assert torch.equal(sampled[2], alone[0])


def test_continuation_loss_stops_at_the_end_of_sequence(model):
    """The fluency column scores the text `decode` shows and its end-of-sequence token, not what follows."""
    eos = model.tokenizer.eos_token_id
    a, b, c = model.tokenizer.encode(" the dog barked")[:3]
    nll = steering.continuation_nll(model, "I think", torch.tensor([[a, eos, b, c], [a, eos, c, b], [a, b, c, eos]]))
    assert torch.allclose(nll[0], nll[1]) and not torch.allclose(nll[0], nll[2])
    assert steering.decode(model.tokenizer, [a, eos, b, c]) == model.tokenizer.decode([a])


def test_the_hook_steers_the_model_after_bos(model):
    toks = model.to_tokens("The cat sat on the mat")
    u = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    v = steering_vector(u, 1.0, 100.0)
    got = {}

    def capture(act, hook):
        got["x"] = act.detach().clone()
        return act
    with torch.no_grad():
        clean = model.run_with_hooks(toks, fwd_hooks=[(HOOK, capture)])
        x0 = got["x"]
        steered = model.run_with_hooks(toks, fwd_hooks=[(HOOK, add_hook(v)), (HOOK, capture)])
    assert torch.allclose(got["x"][0, 1:] - x0[0, 1:], v.expand(toks.shape[1] - 1, -1), atol=1e-3)
    assert torch.equal(got["x"][0, 0], x0[0, 0])
    assert torch.allclose(steered[0, 0], clean[0, 0], atol=1e-5)                # BOS's prediction untouched
    assert not torch.allclose(steered[0, -1], clean[0, -1], atol=1e-2)


def test_cost_is_zero_at_scale_zero_and_grows(model):
    text = torch.cat([model.to_tokens("The old man walked slowly down the road")[:, :8],
                      model.to_tokens("She opened the letter and read it twice")[:, :8]])
    u = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    cost = steering.steering_cost(model, text, HOOK, torch.stack([steering_vector(u, s, 100.0) for s in (0, 0.25, 1.0)]))
    assert abs(float(cost.kl[0])) < 1e-6 and abs(float(cost.dce[0])) < 1e-6
    assert 0 < cost.kl[1] < cost.kl[2]
    assert cost.n_tokens == text[:, 1:].numel() and cost.kl_mean_ablation > 0
    # in groups of one vector: the same costs, with the mean ablation (the yardstick) run in the first group only
    rows = []
    model.blocks[-1].hook_out.add_hook(lambda act, hook: rows.append(len(act)), is_permanent=True)
    try:
        grouped = steering.steering_cost(model, text, HOOK, torch.stack([steering_vector(u, s, 100.0)
                                                                          for s in (0, 0.25, 1.0)]), max_vectors=1)
    finally:
        model.blocks[-1].hook_out.remove_hooks(including_permanent=True)
    assert rows == [2, 4, 2, 2, 2, 2]  # clean, mean + vector 1; then clean, vector, twice
    assert torch.allclose(grouped.kl, cost.kl, rtol=1e-4, atol=1e-6) and grouped.kl_mean_ablation == cost.kl_mean_ablation


@pytest.fixture
def small_index(model, array_store):
    """A steering index over a toy store at the model's width: random activations, token ids 0..n-1."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, model.cfg.d_model, generator=g) * 3
    store = array_store(x, hook=HOOK)
    return steering.build_index(model, store, neuron_basis(model.cfg.d_model, hook_name=HOOK), progress=False)


def test_build_index_and_compare_smoke(model, small_index):
    index = small_index
    x = index.x
    assert abs(index.norm - float(x.norm(dim=-1).median())) < 1e-4
    assert torch.equal(index.active, (index.dictionary.encode(x) > 0).sum(0))
    f = 7
    best = int(index.top_rows[f, 0])
    assert best == int(index.dictionary.encode(x)[:, f].argmax())
    word = next(t.strip() for t in index.vocab[300:] if t.strip().isalpha())
    index.word_concepts["toy"] = (word,)
    assert index.n_present("toy") >= 1 and "toy" in index.search(word)
    text = model.to_tokens(["The old man walked slowly down the road", "She opened the letter and read it"])[:, :8]
    res = steering.compare_steering(model, index, text, text, concepts={"toy": (word,)}, prompts=("I think",),
                                    samples=1, n_new=2, targets=(0.1,), grid=(1.0,), min_present=1,
                                    progress=False, n_boot=20)
    methods = [r.method for r in res.measured]
    assert methods[0] == "unsteered" and "difference of means" in methods and "SAE: fires on" in methods
    for r in res.measured:
        assert 0 <= r.share.low <= r.share.value <= r.share.high <= 1 and r.n == 1
    assert "toy" in steering.table(res) and steering.verdicts(res) == res.verdicts() and "toy" in str(res)
    assert str(type(res).from_dict(json.loads(json.dumps(res.to_dict())))) == str(res)  # saves and loads
    # a difference not at equal cost (a direction missed its target KL) gets no verdict, whatever its interval
    res.settings["prompts"] = ["p"] * steering.MIN_PROMPTS
    res.differences = [replace(d, difference=Estimate(0.3, 0.2, 0.4), equal_cost=False) for d in res.differences]
    assert res.differences and all("not at equal cost" in v for v in res.verdicts()[1:1 + len(res.differences)])
    assert res.tally()["no verdict"] == len(res.differences)
    res.differences = [replace(d, equal_cost=True) for d in res.differences]
    assert all("ahead" in v for v in res.verdicts()[1:1 + len(res.differences)])
    assert res.tally()["SAE ahead"] == len(res.differences)
    # a word group redefined under the same name is not served from the cache
    before = index.diff_of_means("toy").clone()
    other = next(t.strip() for t in index.vocab[400:] if t.strip().isalpha() and t.strip() != word)
    index.word_concepts["toy"] = (other,)
    assert 0 < index.n_present("toy") < index.n
    assert not torch.allclose(index.diff_of_means("toy"), before)


def test_vectors_and_the_greedy_examples_table(model, small_index):
    index = small_index
    word = next(t.strip() for t in index.vocab[300:] if t.strip().isalpha())
    index.word_concepts["toy"] = (word,)
    vectors = index.vectors("toy")
    assert list(vectors)[0] == "SAE: fires on" and list(vectors)[-1] == "difference of means"
    fires, dim = vectors["SAE: fires on"], vectors["difference of means"]
    assert fires.feature == index.fires_on("toy", k=1)[0][0] and torch.equal(fires.u, index.direction(fires.feature))
    assert dim.feature is None and float(dim.u.norm()) == pytest.approx(1.0, abs=1e-5) and "tokens with" in dim.why
    scales = (0.0, 1.0)
    vecs = torch.stack([steering_vector(v.u, s, index.norm) for v in vectors.values() for s in scales])
    texts = steering.generate(model, "I think", index.hook, vecs, n_new=3)
    text = model.to_tokens(["The old man walked slowly down the road", "She opened the letter and read it"])[:, :8]
    cost = steering.steering_cost(model, text, index.hook, vecs)
    ex = steering.greedy_examples(model, index, "toy", "I think", vectors, scales, texts, cost)
    assert [(e.method, e.scale) for e in ex.examples] == [(m, s) for m in vectors for s in scales]
    assert [e.text for e in ex.examples] == texts and [e.kl for e in ex.examples] == cost.kl.tolist()
    assert [e.feature for e in ex.of("difference of means")] == [None, None] and ex.of("SAE: fires on")[1].kl > 0
    assert [d.split(":")[0] for d in ex.directions] == [m.split(":")[0] for m in vectors]
    assert f"feature {fires.feature} (fires most on" in ex.directions[0]
    assert ex.to_frame().shape == (len(texts), 5) and ex.verdicts()[1:] == ex.directions
    assert str(steering.GreedyExamples.from_dict(json.loads(json.dumps(ex.to_dict())))) == str(ex)
    with pytest.raises(ValueError, match="continuations and costs expected"):
        steering.greedy_examples(model, index, "toy", "I think", vectors, scales, texts[:-1], cost)


def test_comparison_settings_by_profile():
    from helpers.settings.profiles import get_profile

    assert steering.comparison_settings(get_profile("cpu")).prompts == steering.SETTINGS["cpu"].prompts == 10
    assert steering.comparison_settings(get_profile("gpu")) == steering.SETTINGS["default"]
    shrunk = get_profile("colab", harvest_tokens=4_032)                         # the simulated Colab run's size
    assert steering.comparison_settings(shrunk) == steering.SETTINGS["test"]
    st = steering.comparison_settings(get_profile("test"), samples=3)
    assert st.samples == 3 and st.n_new == steering.SETTINGS["test"].n_new
    assert steering.SETTINGS["test"].samples == 2                              # an override changes a copy
    assert st.to_dict()["samples"] == 3 and set(st.to_dict()) == {f.name for f in fields(st)}
    with pytest.raises(FrozenInstanceError):
        st.samples = 4
    with pytest.raises(ValueError, match="unknown steering setting"):
        steering.comparison_settings(get_profile("test"), sample=3)
