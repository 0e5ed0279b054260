"""Dashboards from plain tensors: top contexts of planted maxima, a FeatureView built from token ids and
codes that equals the store's view, and the typed result's round trip."""
import numpy as np
import pytest
import torch

from helpers.dictionaries.dictionary import neuron_basis
from helpers.evals.features import feature_stats
from helpers.show.dashboard import (FeatureView, TopContexts, contexts_plain_html, contexts_props, dashboard_html,
                                    top_contexts)

HOOK = "blocks.0.hook_resid_post"


class Tokenizer:
    def decode(self, ids):
        return "".join(f" t{int(i)}" for i in ids)


def planted(n_ctx=12, T=16, F=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 500, (n_ctx, T), generator=g)
    codes = torch.rand(n_ctx, T, F, generator=g) * torch.rand(n_ctx, T, F, generator=g).gt(0.6)
    peaks = {(7, 3): 9.0, (2, 12): 7.5, (10, 0): 5.0}  # feature 2's planted maxima: (context, position)
    for (c, p), v in peaks.items():
        codes[c, p, 2] = v
    codes[4, :, 3] = 0.0
    codes[:, :, 4] = 0.0  # feature 4 never fires
    return tokens, codes, peaks


def test_top_contexts_finds_planted_maxima(tmp_path):
    tokens, codes, peaks = planted()
    top = top_contexts(tokens, codes, feature=2, k=3, tokenizer=Tokenizer(), before=2, after=1)
    assert [(c.context, c.position, c.activation) for c in top.contexts] == [(7, 3, 9.0), (2, 12, 7.5), (10, 0, 5.0)]
    first = top.contexts[0]
    assert first.start == 1 and first.token_ids == tokens[7, 1:5].tolist()
    assert first.tokens == [f" t{int(t)}" for t in tokens[7, 1:5]] and first.acts[2] == 9.0
    assert top.contexts[2].start == 0 and len(top.contexts[2].acts) == 2  # clipped at the context's start
    # the same from [n_ctx, T] activations of the feature, and from [N, F] codes
    assert top_contexts(tokens, codes[..., 2], k=3).contexts[0].context == 7
    assert top_contexts(tokens, codes.reshape(-1, 5), feature=2, k=3).contexts[1].position == 12
    rows = top.rows()
    assert rows[0]["activation"] == 9.0 and f"[[ t{int(tokens[7, 3])}]]" in rows[0]["text"]
    page = top._repr_html_()
    assert page.count("class='sae-context'") == 3 and "rgb(0,0,255)" in page  # the peak is full blue
    assert "fires in" in str(top) and dashboard_html(top) == top.html()
    assert TopContexts.load(top.save(tmp_path / "top.json")) == top
    never = top_contexts(tokens, codes, feature=4)
    assert never.contexts == [] and "never fires" in never.verdicts()[0]
    with pytest.raises(IndexError):
        top_contexts(tokens, codes, feature=5)
    with pytest.raises(ValueError, match="do not fit"):
        top_contexts(tokens, codes[:3], feature=0)


def test_view_from_tensors_shows_the_planted_maxima():
    tokens, codes, _ = planted()
    view = FeatureView.from_tensors(tokens, codes, Tokenizer(), k=6, sample=16)
    assert view.stats.n_features == 5 and view.stats.max_act[2] == 9.0
    assert int(view.stats.top_idx[2, 0]) == 7 * 16 + 3
    assert view.top_contexts(2, k=3) == top_contexts(tokens, codes, 2, k=3, tokenizer=Tokenizer())
    page = dashboard_html(view, 2)
    assert "feature 2" in page and "<img" in page and "best concept" not in page
    props = contexts_props(view, 2, n=4)
    assert max(props["activations"][0][0][0]) == 9.0
    with pytest.raises(IndexError, match="out of range"):
        dashboard_html(view, 5)
    one = FeatureView.from_tensors(tokens, codes[..., 2], Tokenizer())  # one feature's activations [n_ctx, T]
    assert one.stats.n_features == 1 and float(one.stats.max_act[0]) == 9.0


def test_the_store_view_is_the_tensor_view(array_store):
    """A store's view and the view of the same codes from tensors: same statistics, same pages."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 6, generator=g).half().float()
    store = array_store(x, hook=HOOK, shard_tokens=128)
    d = neuron_basis(6, hook_name=HOOK, model_name="toy")
    st = feature_stats(d, store, k=8, sample=32, progress=False)
    from_store = FeatureView.from_store(d, store, st, tokenizer=Tokenizer())
    assert FeatureView(d, store, st, tokenizer=Tokenizer()).per_ctx == from_store.per_ctx == 8
    tokens = torch.as_tensor(store.tokens()["token"].astype(np.int64)).reshape(-1, 8)
    from_tensors = FeatureView.from_tensors(tokens, d.encode(x), Tokenizer(), dictionary=d, k=8, sample=32)
    for name in ("density", "max_act", "mean_act", "top_acts", "top_idx", "sample_acts", "sample_idx", "active_counts"):
        assert torch.equal(getattr(from_store.stats, name), getattr(from_tensors.stats, name)), name
    for f in (0, 5, 11):
        assert contexts_plain_html(from_store, f) == contexts_plain_html(from_tensors, f)
        a, b = from_store.top_contexts(f, k=4), from_tensors.top_contexts(f, k=4)
        assert [c.context for c in a.contexts] == [c.context for c in b.contexts][:len(a.contexts)]
        assert a.contexts[0] == b.contexts[0]
