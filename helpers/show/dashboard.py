"""Feature dashboards and a feature browser for notebooks.

`top_contexts(tokens, acts, feature)` finds a feature's top contexts in plain tensors (token ids
[n_ctx, T] and activations) and returns them as a typed result that shows as a table or as HTML with
shaded tokens. `FeatureView` gathers, once, everything a dashboard shows (statistics, concept scores,
logit effects, token labels), from tensors (`FeatureView.from_tensors(tokens, codes, tokenizer)`) or
from a store (`FeatureView.from_store`, or the constructor); `dashboard(view, f)` displays one
feature the way Anthropic's and Neuronpedia's dashboards do: its top contexts with tokens coloured by
activation and a sample
across lower activation ranges (circuitsvis, which inlines its script when offline), a histogram
of its activations, the tokens and parts of speech it fires on, and the tokens its direction
promotes and suppresses through the unembedding. `side_by_side({"SAE": top, "random": top2})` shows
several features' top contexts in columns (`matched_feature` picks, among another method's features,
one with about the same activity count and a given score), and `browser(view)` pages through features with
ipywidgets (sort by density, score or max activation, search by token) without recomputing.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch

from helpers.activations.corpus import COARSE_TAGS, NO_TAG, coarse_tag
from helpers.dictionaries.dictionary import Dictionary
from helpers.evals.features import context_codes, feature_stats, ranked
from helpers.results import Result

# Contexts "across the activation range" start at this fraction of the feature's largest activation:
# circuitsvis shades a token in proportion to it, and a fainter one is indistinguishable from white.
VISIBLE_FRACTION = 0.05


class _Codes(Dictionary):
    """Codes given as they are (a Dictionary whose `encode` is the identity on [N, F] codes): lets the
    store-free view reuse helpers.evals.features.feature_stats unchanged."""

    def __init__(self, n_features: int, name: str):
        self._n, self.name = n_features, name

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode(self, x):
        return x.float()

    def check_store(self, store, hook=None) -> str:
        return hook or "codes"


class _CodesStore:
    """Just enough of an activation store for feature_stats: the rows of codes [N, F], in order."""

    def __init__(self, codes: torch.Tensor):
        self.codes, self.n_tokens = codes, len(codes)

    def iter_batches(self, hook, batch_size, shuffle=False, return_index=False):
        for i in range(0, self.n_tokens, batch_size):
            yield self.codes[i:i + batch_size], torch.arange(i, min(i + batch_size, self.n_tokens))


def _as_codes(tokens: torch.Tensor, acts, feature: int | None = None) -> torch.Tensor:
    """Codes [N, F] (float32, CPU) in the order of tokens [n_ctx, T] flattened, from acts [n_ctx, T] (one
    feature), [n_ctx, T, F] or [n_ctx·T, F]; with `feature`, only that column ([N, 1])."""
    a = torch.as_tensor(np.asarray(acts) if not torch.is_tensor(acts) else acts).detach().float().cpu()
    n = tokens.numel()
    if a.shape == tokens.shape:
        a = a.reshape(n, 1)
        if feature not in (None, 0):
            raise IndexError(f"acts [n_ctx, T] hold one feature (0), not feature {feature}")
        return a
    if a.dim() == 3 and a.shape[:2] == tokens.shape:
        a = a.reshape(n, a.shape[-1])
    elif not (a.dim() == 2 and len(a) == n):
        raise ValueError(f"acts {tuple(a.shape)} do not fit tokens {tuple(tokens.shape)}: give [n_ctx, T], "
                         "[n_ctx, T, F] or [n_ctx·T, F]")
    if feature is None:
        return a
    if not 0 <= int(feature) < a.shape[1]:
        raise IndexError(f"feature {feature} is out of range: the codes have {a.shape[1]} features")
    return a[:, int(feature):int(feature) + 1]


def _token_ids(tokens) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens).long().cpu()
    if t.dim() != 2:
        raise ValueError(f"tokens must be [n_ctx, T] token ids, not {tuple(t.shape)}")
    return t


def _token_strings(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i)) for i in ids]


@dataclass
class Context(Result):
    """One context around a feature's strongest activation in it: the window's tokens (ids and text)
    from position `start`, the activation on each, and the peak's position in the context."""
    context: int
    position: int
    activation: float
    start: int
    token_ids: list
    tokens: list
    acts: list


@dataclass
class TopContexts(Result):
    """A feature's top contexts (each context once, ranked by its largest activation), shown as a
    table or as HTML with each token shaded by its activation."""
    feature: int
    contexts: list[Context] = field(default_factory=list)
    n_contexts: int = 0
    n_active: int | None = None      # contexts where the feature fires at all (None: not counted)

    @property
    def max_act(self) -> float:
        return max((c.activation for c in self.contexts), default=0.0)

    def rows(self) -> list[dict]:
        out = []
        for r, c in enumerate(self.contexts):
            peak = c.position - c.start
            text = "".join(f"[[{t}]]" if j == peak else t for j, t in enumerate(c.tokens))
            out.append({"rank": r, "context": c.context, "position": c.position, "activation": c.activation,
                        "text": text})
        return out

    def verdicts(self) -> list[str]:
        if not self.contexts:
            return [f"Feature {self.feature} never fires on these {self.n_contexts} contexts."]
        top = self.contexts[0]
        where = (f"fires in {self.n_active} of {self.n_contexts} contexts" if self.n_active is not None
                 else f"fires ({self.n_contexts} contexts)")
        return [f"Feature {self.feature} {where}; its largest "
                f"activation, {top.activation:.3g}, is on {top.tokens[top.position - top.start]!r} "
                f"(context {top.context}, position {top.position})."]

    def html(self) -> str:
        """The contexts as plain HTML (no script), tokens shaded by activation relative to the largest."""
        top = max(self.max_act, 1e-8)
        rows = [f"<div style='margin-top:6px'><b>feature {self.feature}: top contexts</b></div>"]
        for c in self.contexts:
            rows.append(_context_html(c.tokens, c.acts, top))
        notes = "".join(f"<li>{html.escape(v)}</li>" for v in self.verdicts())
        return "".join(rows) + (f"<ul>{notes}</ul>" if notes else "")

    def _repr_html_(self) -> str:
        return f"<b>{type(self).__name__}</b>" + self.html()


def top_contexts(tokens, acts, feature: int | None = 0, k: int = 8, tokenizer=None, before: int = 10,
                 after: int = 3) -> TopContexts:
    """The k contexts where `feature` fires most (each context once, ranked by its largest
    activation), with the window of tokens from `before` tokens before its peak to `after` after.

    tokens: token ids [n_ctx, T]; acts: one feature's activations [n_ctx, T], or codes [n_ctx, T, F]
    or [n_ctx·T, F] (then `feature` picks the column). Tokens read as `tokenizer.decode([id])` (the
    ids as text without a tokenizer)."""
    ids = _token_ids(tokens)
    a = _as_codes(ids, acts, feature)[:, 0].reshape(ids.shape)
    peak, pos = a.max(1)
    order = torch.argsort(peak, descending=True, stable=True)
    n_active = int((peak > 0).sum())
    out = []
    for c in order[:min(k, n_active)].tolist():
        p = int(pos[c])
        lo, hi = max(0, p - before), min(ids.shape[1], p + after + 1)
        window = ids[c, lo:hi].tolist()
        out.append(Context(c, p, float(peak[c]), lo, window, _token_strings(tokenizer, window),
                           [float(v) for v in a[c, lo:hi]]))
    return TopContexts(int(feature or 0), out, len(ids), n_active)


@dataclass
class FeatureView:
    """Everything a feature's dashboard shows, gathered once: the dictionary (or just its name), its
    feature statistics (helpers.evals.features.FeatureStats), concept scores and logit effects (either
    may be empty), the tokenizer, and where the contexts come from: a store (re-encoded on demand) or
    `codes` [N, F] held in memory with the token labels `meta` and the context length `per_ctx`.
    `from_tensors` builds a view from token ids and codes; `from_store` from a store."""
    dictionary: object
    store: object
    stats: object
    scores: dict = None
    effects: dict = None
    tokenizer: object = None
    meta: np.ndarray = None
    codes: torch.Tensor = None
    per_ctx: int = None

    def __post_init__(self):
        if self.store is not None:
            if self.meta is None:
                self.meta = self.store.tokens()
            self.per_ctx = self.store.manifest["ctx_len"] - 1
        elif self.codes is None or self.meta is None or self.per_ctx is None:
            raise ValueError("a FeatureView needs a store, or codes with their token labels (meta) and per_ctx")
        self.scores = self.scores or {}
        self.effects = self.effects or {}
        self._tok = {}

    @classmethod
    def from_tensors(cls, tokens, acts, tokenizer=None, dictionary=None, scores: dict | None = None,
                     effects: dict | None = None, name: str | None = None, k: int = 20, sample: int = 128,
                     seed: int = 0) -> "FeatureView":
        """A view from token ids [n_ctx, T] and their codes: acts [n_ctx, T] (one feature), [n_ctx, T, F]
        or [n_ctx·T, F]. Statistics are helpers.evals.features.feature_stats of the codes (token index
        i is context i // T, position i % T). `dictionary` (optional) names the features; `scores`
        (helpers.evals.features.concept_scores) and `effects` (logit_effects) show where given."""
        ids = _token_ids(tokens)
        codes = _as_codes(ids, acts)
        name = name or getattr(dictionary, "name", None) or "features"
        stats = feature_stats(_Codes(codes.shape[1], name), _CodesStore(codes), k=k, sample=sample, seed=seed,
                              progress=False)
        meta = np.zeros(ids.numel(), dtype=[("token", "<i8")])
        meta["token"] = ids.reshape(-1).numpy()
        return cls(dictionary if dictionary is not None else _Codes(codes.shape[1], name), None, stats, scores,
                   effects, tokenizer, meta, codes, ids.shape[1])

    @classmethod
    def from_store(cls, dictionary, store, stats=None, scores: dict | None = None, effects: dict | None = None,
                   tokenizer=None, **stats_kw) -> "FeatureView":
        """A view of `dictionary` over a store; `stats` default to feature_stats(dictionary, store, **stats_kw)."""
        stats = feature_stats(dictionary, store, **stats_kw) if stats is None else stats
        return cls(dictionary, store, stats, scores, effects, tokenizer)

    def token_str(self, tid: int) -> str:
        if tid not in self._tok:
            self._tok[tid] = self.tokenizer.decode([int(tid)]) if self.tokenizer is not None else str(int(tid))
        return self._tok[tid]

    def check(self, f: int) -> int:
        if not 0 <= int(f) < self.stats.n_features:
            raise IndexError(f"feature {f} is out of range: {self.dictionary.name} has "
                             f"{self.stats.n_features} features (0 to {self.stats.n_features - 1})")
        return int(f)

    def context(self, index: int, f: int, before: int = 10, after: int = 3):
        """Tokens around token `index` (within its context) and feature f's codes on them."""
        if self.codes is None:
            ids, codes = context_codes(self.dictionary, self.store, self.meta, self.stats.hook, index, f, before, after)
        else:
            start = index // self.per_ctx * self.per_ctx
            rows = np.arange(max(start, index - before), min(start + self.per_ctx, index + after + 1))
            ids, codes = self.meta["token"][rows], self.codes[torch.as_tensor(rows), f].tolist()
        return [self.token_str(t) for t in ids], codes

    def top_contexts(self, f: int, k: int = 8, before: int = 10, after: int = 3) -> TopContexts:
        """Feature f's top contexts (`top_contexts`) as a typed result. Over a store, the contexts are
        those of the feature's top tokens in its statistics (as many distinct ones as they hold)."""
        f = self.check(f)
        if self.codes is not None:
            tokens = torch.as_tensor(self.meta["token"]).reshape(-1, self.per_ctx)
            return top_contexts(tokens, self.codes, f, k, self.tokenizer, before, after)
        seen, out = set(), []
        for i in self.examples(f, "top", self.stats.top_idx.shape[1]):
            ctx, pos = divmod(i, self.per_ctx)
            if ctx in seen:
                continue
            seen.add(ctx)
            toks, acts = self.context(i, f, before, after)
            lo = max(0, pos - before)
            out.append(Context(ctx, pos, float(acts[pos - lo]), lo, [int(t) for t in self.meta["token"][ctx * self.per_ctx + lo:
                               ctx * self.per_ctx + lo + len(toks)]], toks, [float(a) for a in acts]))
            if len(out) == k:
                break
        return TopContexts(f, out, len(self.meta) // self.per_ctx, None)

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
            rows.append(_context_html(*view.context(i, f), top))
    return "".join(rows)


def _context_html(tokens, acts, top: float) -> str:
    """One context as a row of spans, each token shaded by its activation (`token_style`)."""
    spans = "".join(
        f"<span class='sae-token' data-act='{a:.4g}' title='{a:.2f}' style='{token_style(a, top)}'>"
        f"{html.escape(t).replace(' ', '&nbsp;')}</span>" for t, a in zip(tokens, acts))
    return f"<div class='sae-context' style='font-family:monospace;white-space:nowrap'>{spans}</div>"


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
        tags = view.store.manifest.get("tags", []) if view.store is not None else []
        if tags and "pos" in (view.meta.dtype.names or ()):
            coarse = [coarse_tag(tags[p]) if p != NO_TAG else "none" for p in view.meta["pos"][idx]]
            names = COARSE_TAGS + ["none"]
            c.bar(names, [coarse.count(t) for t in names], color="tab:green")
    b.set_title("tokens it fires on (top + sample)", fontsize=9)
    b.tick_params(labelsize=7)
    c.set_title("their part of speech", fontsize=9)
    c.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    return fig


def summary_html(view: FeatureView, f: int) -> str:
    """Feature f's headline: density and max activation, its best concept and its logit effects (each
    where the view has them)."""
    f = view.check(f)
    st, sc, ef = view.stats, view.scores, view.effects
    concept = ""
    if "concept" in sc:
        concept = (f" · best concept <b>{html.escape(sc['concept'][f])}</b> (MCC {float(sc['mcc'][f]):.2f}, precision "
                   f"{float(sc['precision'][f]):.2f}, recall {float(sc['recall'][f]):.2f})")
    effect = ""
    if "up_ids" in ef:
        up = ", ".join(f"{html.escape(repr(view.token_str(int(t))))} {v:+.2f}" for t, v in zip(ef["up_ids"][f][:8], ef["up"][f][:8]))
        down = ", ".join(f"{html.escape(repr(view.token_str(int(t))))} {v:+.2f}" for t, v in zip(ef["down_ids"][f][:8], ef["down"][f][:8]))
        effect = f"<p>logit effect, promotes: {up}<br>suppresses: {down}</p>"
    return (f"<h4>{html.escape(view.dictionary.name)} · feature {f}</h4>"
            f"<p>density {100 * float(st.density[f]):.3f}% · max activation {float(st.max_act[f]):.2f}{concept}</p>"
            + effect)


def dashboard(view, f: int | None = None, n: int = 8) -> None:
    """Display feature f's dashboard in the notebook (view: a FeatureView; or a TopContexts, shown as it is)."""
    from IPython.display import HTML, display

    if isinstance(view, TopContexts):
        display(HTML(view.html()))
        return
    f = view.check(f)
    display(HTML(summary_html(view, f)))
    vis = contexts_vis(view, f, n)
    if vis is not None:
        display(vis)
    fig = feature_figure(view, f)
    display(fig)
    plt.close(fig)


def figure_html(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"


def dashboard_html(view, f: int | None = None, n: int = 6) -> str:
    """Feature f's dashboard as one self-contained HTML string (no scripts); a TopContexts as its HTML."""
    if isinstance(view, TopContexts):
        return view.html()
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
        **({"concept score (MCC)": ranked(view.scores)} if "mcc" in view.scores else {}),
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


@dataclass
class SideBySide(Result):
    """Several features' top contexts in columns, one per method (`panels` {label: TopContexts}),
    each under its caption (`captions` {label: text}, e.g. its score and activity count)."""
    panels: dict[str, TopContexts] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    title: str = ""

    def rows(self) -> list[dict]:
        return [{"method": label, "feature": t.feature, "caption": self.captions.get(label, ""),
                 "top context": t.rows()[0]["text"] if t.contexts else ""} for label, t in self.panels.items()]

    def verdicts(self) -> list[str]:
        return [f"{label}: {v}" for label, t in self.panels.items() for v in t.verdicts()]

    def html(self) -> str:
        cols = []
        for label, t in self.panels.items():
            top = max(t.max_act, 1e-8)
            body = "".join(_context_html(c.tokens, c.acts, top) for c in t.contexts) or "<i>never fires here</i>"
            cap = html.escape(self.captions.get(label, ""))
            cols.append(f"<div style='flex:1;min-width:0;overflow-x:auto;padding:0 6px;border-left:1px solid #ddd'>"
                        f"<div><b>{html.escape(label)}</b> · feature {t.feature}</div>"
                        f"<div style='font-size:85%;color:#555;margin-bottom:4px'>{cap}</div>{body}</div>")
        head = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        return head + f"<div style='display:flex;gap:4px;align-items:flex-start'>{''.join(cols)}</div>"

    def _repr_html_(self) -> str:
        return self.html()


def side_by_side(panels: dict, captions: dict | None = None, title: str = "", k: int = 6) -> SideBySide:
    """Features of several methods side by side: `panels` {label: a TopContexts, or (FeatureView,
    feature)} (a view's `top_contexts(feature, k)`), each column captioned by `captions` {label: text}."""
    tops = {label: p if isinstance(p, TopContexts) else p[0].top_contexts(int(p[1]), k=k)
            for label, p in panels.items()}
    return SideBySide(tops, dict(captions or {}), title)


def matched_feature(scores, counts, target_count: float, which: str = "median", band: float = 0.25,
                    min_count: int = 1) -> int:
    """A feature with about `target_count` active tokens: among the features whose count lies within
    a factor (1 ± `band`) of it (the nearest tenth of the features by count where none does), the one
    whose score is the median of theirs (`which="median"`) or the highest (`"best"`). `scores` [F]
    (NaN: not scored, never picked), `counts` [F] active tokens per feature."""
    s, c = np.asarray(scores, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    ok = np.isfinite(s) & (c >= min_count)
    if not ok.any():
        raise ValueError("no scored feature to pick from")
    near = ok & (np.abs(c - target_count) <= band * target_count)
    if not near.any():
        idx = np.flatnonzero(ok)
        gap = np.abs(c[idx] - target_count)
        near = np.zeros_like(ok)
        near[idx[gap <= np.quantile(gap, 0.1)]] = True
    idx = np.flatnonzero(near)
    if which == "best":
        return int(idx[np.argmax(s[idx])])
    if which != "median":
        raise ValueError(f"which={which!r}: 'median' or 'best'")
    med = np.median(s[idx])
    return int(idx[np.argmin(np.abs(s[idx] - med))])
