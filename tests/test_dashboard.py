"""What the dashboards hand to the page: circuitsvis props with the nesting it documents, and
plain-HTML contexts whose strongest tokens are shaded. No browser, no model (tests/test_browser.py
checks the rendered result in JupyterLab)."""
import json
import re

import pytest
import torch

from helpers.show.dashboard import FeatureView, contexts_plain_html, contexts_props, contexts_vis
from helpers.dictionaries.dictionary import neuron_basis
from helpers.evals.features import feature_stats

HOOK = "blocks.0.hook_resid_post"


class Tokenizer:
    """Token id i reads " t<i>", except that ids ending in 5 read "<b>", which must reach the page escaped.
    (The store numbers its tokens 0, 1, 2, ...)"""

    def decode(self, ids):
        return "".join("<b>" if int(i) % 10 == 5 else f" t{int(i)}" for i in ids)


@pytest.fixture
def view(array_store):
    g = torch.Generator().manual_seed(0)
    store = array_store(torch.randn(600, 6, generator=g), hook=HOOK, shard_tokens=128)
    d = neuron_basis(6, hook_name=HOOK, model_name="toy")  # ReLU'd ± neurons: about half the codes are 0
    st = feature_stats(d, store, k=8, sample=32, progress=False)
    return FeatureView(d, store, st, scores={}, effects={}, tokenizer=Tokenizer())


def shape(x):
    """The nested list's shape, with the leaves' types: lists at one depth must all have the same depth."""
    if isinstance(x, list):
        inner = {json.dumps(shape(v)) for v in x}
        assert len(inner) <= 1, f"ragged nesting: {inner}"
        return ["list", json.loads(inner.pop()) if inner else None]
    return type(x).__name__


def lengths(x):
    return [lengths(v) for v in x] if isinstance(x, list) and x and isinstance(x[0], list) else len(x)


def test_circuitsvis_props_have_the_documented_nesting(view):
    f = 3
    props = contexts_props(view, f, n=8)
    # [dictionaries x groups x samples x tokens], strings and numbers at the leaves
    assert shape(props["tokens"]) == ["list", ["list", ["list", ["list", "str"]]]]
    assert shape(props["activations"]) == ["list", ["list", ["list", ["list", "float"]]]]
    assert lengths(props["tokens"]) == lengths(props["activations"])
    assert len(props["tokens"]) == len(props["zeroth_dimension_labels"]) == 1
    assert len(props["tokens"][0]) == len(props["first_dimension_labels"]) == 2
    top, spread = props["activations"][0]
    assert len(top) == len(spread) == 8  # circuitsvis pages every group by the first one's count
    # the first top context holds the feature's largest activation
    assert max(top[0]) == pytest.approx(float(view.stats.max_act[f]), rel=1e-3)
    # what circuitsvis receives is exactly these props
    cdn = str(contexts_vis(view, f, n=8))
    sent = json.loads(re.search(r"TopkSamples,\s*(\{.*\})\s*\)", cdn, re.S).group(1))
    assert sent["tokens"] == props["tokens"] and sent["activations"] == props["activations"]


def test_circuitsvis_tokens_are_escaped(view):
    """circuitsvis inserts tokens as HTML: a token "<b>" must arrive as text, not as a tag."""
    toks = [t for g in contexts_props(view, 0, n=8)["tokens"][0] for s in g for t in s]
    assert "<b>" not in toks
    assert "&lt;b&gt;" in toks


def spans(page):
    """[(activation, background rgb or None, text colour or None)] per context row of the plain HTML."""
    rows = []
    for row in re.findall(r"<div class='sae-context'[^>]*>(.*?)</div>", page):
        cells = []
        for act, style in re.findall(r"data-act='([^']*)'[^>]*style='([^']*)'", row):
            bg = re.search(r"background-color:rgb\((\d+),(\d+),(\d+)\)", style)
            fg = re.search(r"(?<!-)color:(\w+)", style)
            cells.append((float(act), tuple(map(int, bg.groups())) if bg else None, fg and fg.group(1)))
        rows.append(cells)
    return rows


def contrast(a, b):
    def lum(c):
        lin = [v / 255 / 12.92 if v / 255 <= 0.03928 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_plain_html_shades_the_strongest_token_of_every_context(view):
    for f in range(view.stats.n_features):
        rows = spans(contexts_plain_html(view, f, n=6))
        assert len(rows) >= 7, f  # 6 top contexts and some across the range
        for cells in rows:
            act, bg, fg = max(cells)
            assert act > 0 and bg is not None and fg in ("black", "white")
            assert 255 * 3 - sum(bg) >= 0.15 * 255 * 2 * 0.99, (f, cells)  # visibly tinted, even when weak
            for a, bg0, fg0 in cells:
                if a <= 0:
                    assert bg0 is None and fg0 is None  # unshaded: the theme's own colours
                else:
                    rgb = {"black": (0, 0, 0), "white": (255, 255, 255)}[fg0]
                    assert contrast(bg0, rgb) >= 4.5, (f, a, bg0, fg0)  # WCAG AA for text
        # the feature's largest activation: full blue, white text
        act, bg, fg = max(rows[0])
        assert bg == (0, 0, 255) and fg == "white"
