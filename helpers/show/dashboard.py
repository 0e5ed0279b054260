"""Feature dashboards and a feature browser for notebooks.

`FeatureView` gathers, once, everything a dashboard shows (statistics, concept scores, logit
effects, token labels); `dashboard(view, f)` displays one feature the way Anthropic's and
Neuronpedia's dashboards do: its top contexts with tokens coloured by activation and a sample
across lower activation ranges (circuitsvis, which inlines its script when offline), a histogram
of its activations, the tokens and parts of speech it fires on, and the tokens its direction
promotes and suppresses through the unembedding. `browser(view)` pages through features with
ipywidgets (sort by density, score or max activation, search by token) without recomputing.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from helpers.activations.corpus import COARSE_TAGS, NO_TAG, coarse_tag
from helpers.evals.features import context_codes, ranked


# Contexts "across the activation range" start at this fraction of the feature's largest activation:
# circuitsvis shades a token in proportion to it, and a fainter one is indistinguishable from white.
VISIBLE_FRACTION = 0.05


@dataclass
class FeatureView:
    dictionary: object
    store: object
    stats: object
    scores: dict
    effects: dict
    tokenizer: object
    meta: np.ndarray = None

    def __post_init__(self):
        if self.meta is None:
            self.meta = self.store.tokens()
        self.per_ctx = self.store.manifest["ctx_len"] - 1
        self._tok = {}

    def token_str(self, tid: int) -> str:
        if tid not in self._tok:
            self._tok[tid] = self.tokenizer.decode([int(tid)])
        return self._tok[tid]

    def check(self, f: int) -> int:
        if not 0 <= int(f) < self.stats.n_features:
            raise IndexError(f"feature {f} is out of range: {self.dictionary.name} has "
                             f"{self.stats.n_features} features (0 to {self.stats.n_features - 1})")
        return int(f)

    def context(self, index: int, f: int, before: int = 10, after: int = 3):
        """Tokens around stored token `index` (within its context) and feature f's codes on them."""
        ids, codes = context_codes(self.dictionary, self.store, self.meta, self.stats.hook, index, f, before, after)
        return [self.token_str(t) for t in ids], codes

    def examples(self, f: int, which: str = "top", n: int = 8) -> list[int]:
        """Token indices: the top-n activations, or n spread over the activation range ("quantiles")
        from VISIBLE_FRACTION of the feature's maximum up (weaker ones would show as uncoloured)."""
        f = self.check(f)
        if which == "top":
            idx = self.stats.top_idx[f]
            return [int(i) for i in idx[idx >= 0][:n]]
        ok = (self.stats.sample_idx[f] >= 0) & (self.stats.sample_acts[f] >= VISIBLE_FRACTION * self.stats.max_act[f])
        acts, idx = self.stats.sample_acts[f][ok], self.stats.sample_idx[f][ok]
        if len(idx) == 0:
            return []
        order = acts.argsort()
        picks = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
        return [int(idx[order[p]]) for p in picks[::-1]]


def contexts_props(view: FeatureView, f: int, n: int = 8) -> dict | None:
    """The props for circuitsvis's `TopkSamples`: feature f's top contexts and contexts across its
    activation range, as two groups ("Examples") of one dictionary. `tokens` and `activations` have
    the nesting circuitsvis documents, [dictionaries x groups x samples x tokens], the same for both,
    with strings and Python floats at the leaves, and the same number of samples in each group.
    circuitsvis inserts each token as HTML, so tokens are HTML-escaped. None when f never fires."""
    groups = {label: view.examples(f, which, n)
              for which, label in (("top", "top activations"), ("quantiles", "across the activation range"))}
    groups = {label: idx for label, idx in groups.items() if idx}
    if not groups:
        return None
    # every group shows as many samples (TopkSamples pages through the first group's count)
    k = min(map(len, groups.values()))
    tokens, acts, labels = [], [], []
    for label, idx in groups.items():
        ctx = [view.context(i, f) for i in idx[:k]]
        tokens.append([[html.escape(str(t), quote=False) for t in toks] for toks, _ in ctx])
        acts.append([[float(a) for a in codes] for _, codes in ctx])
        labels.append(f"feature {f}: {label}")
    return dict(tokens=[tokens], activations=[acts],
                zeroth_dimension_name="Dictionary", first_dimension_name="Examples",
                zeroth_dimension_labels=[view.dictionary.name], first_dimension_labels=labels)


def contexts_vis(view: FeatureView, f: int, n: int = 8):
    """circuitsvis view of feature f's top contexts and of contexts across its activation range.
    circuitsvis colours each token blue in proportion to its activation over the largest one in the
    selected group (white at zero)."""
    import circuitsvis as cv

    props = contexts_props(view, f, n)
    return None if props is None else cv.topk_samples.topk_samples(**props)


# Token shading of the plain-HTML contexts, the same blue as circuitsvis: white at zero, pure blue
# at the feature's max activation, and never fainter than MIN_SHADE for an active token, so that
# the strongest token of even a weak context is visibly coloured. A shaded token gets an opaque
# background and whichever of black or white text contrasts more with it, readable in JupyterLab's
# light and dark themes; an inactive token keeps the theme's own colours.
SHADE_RGB = (0, 0, 255)
MIN_SHADE = 0.15


def _luminance(rgb) -> float:
    lin = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def token_style(a: float, top: float) -> str:
    """Inline CSS for a token with activation a, when the feature's largest activation is top."""
    if not a > 0:
        return ""
    x = MIN_SHADE + (1 - MIN_SHADE) * min(1.0, a / max(top, 1e-8))
    rgb = [round(255 + (c - 255) * x) for c in SHADE_RGB]
    lum = _luminance(rgb)
    text = "white" if 1.05 / (lum + 0.05) > (lum + 0.05) / 0.05 else "black"
    return f"background-color:rgb({rgb[0]},{rgb[1]},{rgb[2]});color:{text}"


def contexts_plain_html(view: FeatureView, f: int, n: int = 6) -> str:
    """The same contexts as plain HTML (no script): tokens shaded by activation. For widgets,
    where scripts do not run."""
    rows = []
    top = max(float(view.stats.max_act[f]), 1e-8)
    for which, label in (("top", "top activations"), ("quantiles", "across the activation range")):
        rows.append(f"<div style='margin-top:6px'><b>{label}</b></div>")
        for i in view.examples(f, which, n):
            toks, acts = view.context(i, f)
            spans = "".join(
                f"<span class='sae-token' data-act='{a:.4g}' title='{a:.2f}' style='{token_style(a, top)}'>"
                f"{html.escape(t).replace(' ', '&nbsp;')}</span>" for t, a in zip(toks, acts))
            rows.append(f"<div class='sae-context' style='font-family:monospace;white-space:nowrap'>{spans}</div>")
    return "".join(rows)


def feature_figure(view: FeatureView, f: int):
    """Activation histogram, top activating tokens, and parts of speech of activating tokens."""
    f = view.check(f)
    ok = view.stats.sample_idx[f] >= 0
    acts = view.stats.sample_acts[f][ok].numpy()
    idx = torch.cat([view.stats.sample_idx[f][ok], view.stats.top_idx[f][view.stats.top_idx[f] >= 0]]).numpy()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 2.8))
    a.hist(acts, bins=30, color="tab:blue")
    a.set_title(f"activations (sample of {len(acts)} active tokens)", fontsize=9)
    if len(idx):
        tok_ids, counts = np.unique(view.meta["token"][idx], return_counts=True)
        order = np.argsort(-counts)[:10][::-1]
        b.barh([repr(view.token_str(t)) for t in tok_ids[order]], counts[order], color="tab:orange")
        tags = view.store.manifest.get("tags", [])
        pos = view.meta["pos"][idx]
        coarse = [coarse_tag(tags[p]) if p != NO_TAG and tags else "none" for p in pos]
        names = COARSE_TAGS + ["none"]
        c.bar(names, [coarse.count(t) for t in names], color="tab:green")
    b.set_title("tokens it fires on (top + sample)", fontsize=9)
    b.tick_params(labelsize=7)
    c.set_title("their part of speech", fontsize=9)
    c.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    return fig


def summary_html(view: FeatureView, f: int) -> str:
    f = view.check(f)
    st, sc, ef = view.stats, view.scores, view.effects
    up = ", ".join(f"{html.escape(repr(view.token_str(int(t))))} {v:+.2f}" for t, v in zip(ef["up_ids"][f][:8], ef["up"][f][:8]))
    down = ", ".join(f"{html.escape(repr(view.token_str(int(t))))} {v:+.2f}" for t, v in zip(ef["down_ids"][f][:8], ef["down"][f][:8]))
    return (f"<h4>{html.escape(view.dictionary.name)} · feature {f}</h4>"
            f"<p>density {100 * float(st.density[f]):.3f}% · max activation {float(st.max_act[f]):.2f} · "
            f"best concept <b>{html.escape(sc['concept'][f])}</b> (MCC {float(sc['mcc'][f]):.2f}, precision "
            f"{float(sc['precision'][f]):.2f}, recall {float(sc['recall'][f]):.2f})</p>"
            f"<p>logit effect, promotes: {up}<br>suppresses: {down}</p>")


def dashboard(view: FeatureView, f: int, n: int = 8) -> None:
    """Display feature f's dashboard in the notebook."""
    from IPython.display import HTML, display

    f = view.check(f)
    display(HTML(summary_html(view, f)))
    vis = contexts_vis(view, f, n)
    if vis is not None:
        display(vis)
    fig = feature_figure(view, f)
    display(fig)
    plt.close(fig)


def figure_html(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"


def dashboard_html(view: FeatureView, f: int, n: int = 6) -> str:
    """Feature f's dashboard as one self-contained HTML string (no scripts)."""
    f = view.check(f)
    return summary_html(view, f) + contexts_plain_html(view, f, n) + figure_html(feature_figure(view, f))


def top_token_is(view: FeatureView, text: str) -> torch.Tensor:
    """[F] bool: features whose strongest activation is on a token that reads `text` (stripped)."""
    if not hasattr(view, "_top_token"):
        view._top_token = np.array([view.token_str(int(t)).strip() for t in
                                    view.meta["token"][view.stats.top_idx.clamp_min(0)[:, 0].numpy()]])
    return torch.as_tensor(view._top_token == text.strip())


def browser(view: FeatureView, n: int = 6):
    """An ipywidgets feature browser over precomputed statistics (nothing heavy on a click). Returns the
    widget: a cell ending in the call shows it."""
    import ipywidgets as w

    orders = {
        "concept score (MCC)": ranked(view.scores),
        "density": torch.argsort(view.stats.density, descending=True),
        "max activation": torch.argsort(view.stats.max_act, descending=True),
        "feature index": torch.arange(view.stats.n_features),
    }
    sort = w.Dropdown(options=list(orders), description="sort by")
    search = w.Text(placeholder="token, e.g. ' the' or 's", description="fires on")
    rank = w.BoundedIntText(value=0, min=0, max=view.stats.n_features - 1, description="rank")
    prev, nxt = w.Button(description="◀"), w.Button(description="▶")
    info, page = w.HTML(), w.HTML()

    def candidates():
        order = orders[sort.value]
        if search.value.strip():
            order = order[top_token_is(view, search.value)[order]]
        return order

    def show(*_):
        order = candidates()
        if len(order) == 0:
            info.value = f"no feature whose top activation is on {html.escape(repr(search.value))}"
            page.value = ""
            return
        rank.max = len(order) - 1
        f = int(order[min(rank.value, len(order) - 1)])
        page.value = dashboard_html(view, f, n)  # the page first: the line above it never names another feature's page
        info.value = f"{len(order)} features match · showing rank {rank.value}: feature {f}"

    prev.on_click(lambda _: setattr(rank, "value", max(0, rank.value - 1)))
    nxt.on_click(lambda _: setattr(rank, "value", min(rank.max, rank.value + 1)))
    for widget in (sort, search, rank):
        widget.observe(show, names="value")
    ui = w.VBox([w.HBox([sort, search]), w.HBox([prev, rank, nxt]), info, page])
    show()
    return ui
