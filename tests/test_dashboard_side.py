"""Features of several methods side by side (helpers.show.dashboard.side_by_side) and the pick of a
feature at a given activity count and score (matched_feature), on plain tensors and arrays."""
import numpy as np
import pytest
import torch

from helpers.show.dashboard import FeatureView, SideBySide, matched_feature, side_by_side, top_contexts


class Tokenizer:
    def decode(self, ids):
        return "".join(f" t{int(i)}" for i in ids)


def test_side_by_side_shows_each_method_in_its_own_column():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (8, 12), generator=g)
    codes = torch.rand(8, 12, 3, generator=g) * torch.rand(8, 12, 3, generator=g).gt(0.7)
    codes[5, 4, 1] = 9.0                      # feature 1's strongest context is context 5
    codes[:, :, 2] = 0.0                      # feature 2 never fires
    view = FeatureView.from_tensors(tokens, codes, Tokenizer())
    sbs = side_by_side({"SAE": (view, 1), "random": top_contexts(tokens, codes, 0, k=4, tokenizer=Tokenizer()),
                        "silent": (view, 2)},
                       {"SAE": "held-out MCC 0.90", "random": "held-out MCC <0.1>"}, title="median features", k=3)
    assert isinstance(sbs, SideBySide) and list(sbs.panels) == ["SAE", "random", "silent"]
    assert sbs.panels["SAE"].feature == 1 and sbs.panels["SAE"].contexts[0].context == 5
    assert len(sbs.panels["SAE"].contexts) <= 3 and len(sbs.panels["random"].contexts) <= 4
    assert not sbs.panels["silent"].contexts
    page = sbs._repr_html_()
    assert page.count("sae-context") == sum(len(t.contexts) for t in sbs.panels.values())
    assert "display:flex" in page and "median features" in page and "never fires" in page
    assert "held-out MCC &lt;0.1&gt;" in page                      # captions are escaped
    assert page.index("<b>SAE</b>") < page.index("<b>random</b>") < page.index("<b>silent</b>")
    rows = sbs.rows()
    assert [r["method"] for r in rows] == ["SAE", "random", "silent"] and rows[2]["top context"] == ""
    assert any("never fires" in v for v in sbs.verdicts())


def test_matched_feature_picks_by_count_then_score():
    scores = np.array([0.1, 0.5, 0.3, np.nan, 0.9, 0.2, 0.95])
    counts = np.array([10, 11, 9, 10, 100, 12, 40])
    # near 10 tokens (within 25%): features 0, 1, 2, 5 (3 is not scored); their median score is 0.25
    assert matched_feature(scores, counts, 10, "median") in (2, 5)
    assert matched_feature(scores, counts, 10, "best") == 1           # not 4 or 6: too many tokens
    assert matched_feature(scores, counts, 100, "best") == 4
    # nothing within the band: the nearest tenth of the features by count (here the one at 40 tokens)
    assert matched_feature(scores, counts, 30, "best", band=0.1) == 6
    with pytest.raises(ValueError):
        matched_feature(scores, counts, 10, "worst")
    with pytest.raises(ValueError):
        matched_feature([np.nan, np.nan], [5, 5], 5)
