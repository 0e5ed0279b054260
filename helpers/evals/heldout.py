"""Held-out, sparsity-matched concept scores: the interpretability comparison that sparsity, shared
seeds and selection on the scored data cannot flatter.

helpers.evals.features scores each feature by the labelled concept that agrees best with it, chosen and
scored on the same tokens. That is fine for *describing* a feature and biased for *comparing*
methods: a feature active on 25 tokens will match some rare token identity by chance (a random set
of 25 active tokens already has a median best-token MCC of about 0.2), so a sparser method looks more
interpretable whatever its features mean. Here every comparison is made fair in four ways:

1. **Selection held out.** The scored contexts are split in two halves (even and odd context
   index). A feature's best concept is chosen on one half and its score (MCC, and the Pearson
   correlation of its code with the concept) read on the other; both directions, averaged
   ("cross-fitting"). Only concepts seen at least `min_count` times in the choosing half compete.
2. **One exact activity rule.** Every feature of every method counts as active on its exact top
   `k` scored tokens, k = min(tokens where its code is > 0, `max_density` of the scored tokens, 5% by
   default): all of a sparse feature's tokens (an SAE's features nearly all fire on fewer), a dense
   direction's strongest ones. No sampled quantiles.
   `counts=` imposes other counts, e.g. a baseline direction made active on exactly as many tokens
   as an SAE feature (`matched_counts`).
3. **A null with the same sparsity.** Beside every feature, a chance feature: its own active
   tokens moved, position by position, into other contexts (one random permutation of the
   contexts per feature), so it keeps its count, its positions and its clustering within
   contexts, and loses its meaning. Its held-out score is the chance level at that sparsity; a
   method's *excess* is the median over features of (score − null score).
4. **Intervals over contexts.** The contexts of each half are resampled with replacement (the
   same resamples for every method, so differences are paired) and everything is re-scored on
   each resample, the choice of concept included (among each feature's best `candidates`
   concepts of the full sample), so the interval covers the token sample and the selection.

Concepts (`concept_labels`) reach past the current token, so that a contextual feature can be
recognised as an LLM explainer would recognise it; each family is documented in `FAMILIES`.

From plain tensors: `heldout_score(codes [N, F], labels [N, C], contexts [N])` scores one set of
features (a typed `HeldoutScore`: medians with intervals, per-feature arrays, verdicts, JSON save/load);
`heldout_scores({"SAE": codes, "random": other}, labels, contexts, match={"random": "SAE"})` scores
several on the same resamples, one at another's sparsity, with their paired differences (`compare`);
`token_labels(token_ids, ...)` builds concepts from token ids alone. `HeldoutSplit` is the core they
share; `HeldoutScorer` is the same core reading codes from an activation store.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from helpers.activations import massive
from helpers.activations.corpus import COARSE_TAGS, NO_TAG, coarse_tag
from helpers.activations.models import resolve_device
from helpers.activations.store import META_DTYPE
from helpers.dictionaries.dictionary import SAEDictionary, device_of, random_directions
from helpers.evals.features import TOKEN_CLASSES, token_classes, top_tokens, top_tokens_of
from helpers.results import Estimate, Result, Table
from helpers.runs.sweep import SAE_KEYS, halving_steps, sweep_snapshots, train_config
from helpers.saes.stack import SAEConfig, SAEStack
from helpers.settings.paths import digest
from helpers.saes.train import train_sweep
from helpers.show import plots

FAMILIES = {
    "token": "the current token's identity",
    "previous token": "the identity of the token before it (same context)",
    "next token": "the identity of the token after it: what the model is about to predict",
    "POS": "the coarse part of speech of the token's word (Brown tags, universal classes)",
    "tag": "the fine Brown tag of the token's word (tags with at least 0.2% of tokens)",
    "previous POS": "the coarse part of speech of the previous token's word",
    "genre": "the Brown genre of the document",
    "class": "token classes: " + ", ".join(TOKEN_CLASSES) + "; word continuation (a piece inside a word); "
             "suffixes -s, -ed, -ing, -ly, -er, -tion at a word's last piece",
    "context": "inside quotation marks; first word of a sentence; word position in the sentence (1, 2-3, 4-7, "
               "8-15, 16+); position in the context (1-3, 4-15, 16-63, 64+)",
}
SUFFIXES = ("s", "ed", "ing", "ly", "er", "tion")
SENTENCE_BINS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 10**9))
POSITION_BINS = ((0, 2), (3, 14), (15, 62), (63, 10**9))
MAX_DENSITY = 0.05
MIN_COUNT = 20
MIN_ACTIVE = 5


@dataclass
class Labels:
    """Binary concepts of scored tokens: `matrix` [n_tokens, n_concepts] (scipy CSR, 0/1)."""

    names: list[str]
    families: list[str]
    matrix: sp.csr_matrix

    def __len__(self):
        return len(self.names)


_VOCAB: dict = {}


def _vocab(tokenizer) -> tuple[list[str], np.ndarray]:
    """Every token id's text and token classes, decoded once per tokenizer."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _VOCAB:
        _VOCAB[key] = (tokenizer.batch_decode([[i] for i in range(len(tokenizer))]), token_classes(tokenizer))
    return _VOCAB[key]


def concept_labels(meta: np.ndarray, tokenizer, tags=(), genres=(), min_count: int = MIN_COUNT,
                   min_tag_share: float = 0.002) -> Labels:
    """The concepts of `meta` (store.tokens() records of whole contexts, in store order). Identity
    concepts (token, previous token, next token) are kept when seen at least `min_count` times."""
    n = len(meta)
    tok = meta["token"].astype(np.int64)
    ctx = meta["ctx"]
    first = np.r_[True, ctx[1:] != ctx[:-1]]
    last = np.r_[ctx[1:] != ctx[:-1], True]
    prev = np.where(first, -1, np.r_[-1, tok[:-1]])
    nxt = np.where(last, -1, np.r_[tok[1:], -1])
    texts, classes = _vocab(tokenizer)                       # classes: [vocab, 5]
    rows_of: list[np.ndarray] = []
    names, fams = [], []

    def add(name, fam, mask):
        idx = np.flatnonzero(mask)
        if len(idx):
            rows_of.append(idx), names.append(name), fams.append(fam)

    def identity(values, fam, prefix):
        ok = values >= 0
        counts = np.bincount(values[ok], minlength=len(texts))
        keep = np.flatnonzero(counts >= min_count)
        order = np.argsort(values, kind="stable")
        sv = values[order]
        for t in keep:
            lo, hi = np.searchsorted(sv, t), np.searchsorted(sv, t, side="right")
            rows_of.append(np.sort(order[lo:hi])), names.append(f"{prefix}{texts[t]!r}"), fams.append(fam)

    identity(tok, "token", "token ")
    identity(prev, "previous token", "after ")
    identity(nxt, "next token", "before ")
    pos = meta["pos"]
    if len(tags):
        coarse = np.array([COARSE_TAGS.index(coarse_tag(t)) for t in tags] + [-1] * (256 - len(tags)))
        c_of = np.where(pos == NO_TAG, -1, coarse[np.minimum(pos, 255)])
        for i, c in enumerate(COARSE_TAGS):
            add(f"POS {c}", "POS", c_of == i)
        tag_counts = np.bincount(pos[pos != NO_TAG], minlength=256)
        for i, t in enumerate(tags):
            if tag_counts[i] >= min_tag_share * n:
                add(f"tag {t}", "tag", pos == i)
        c_prev = np.where(first, -1, np.r_[-1, c_of[:-1]])
        for i, c in enumerate(COARSE_TAGS):
            add(f"after POS {c}", "previous POS", c_prev == i)
    if len(genres):
        for i, g in enumerate(genres):
            add(f"genre {g}", "genre", meta["genre"] == i)
    cls = classes[tok]
    for j, c in enumerate(TOKEN_CLASSES):
        add(f"class {c}", "class", cls[:, j])
    # word structure from the token strings: a piece that continues a word, and a word's last piece
    word_start = classes[:, TOKEN_CLASSES.index("word start")]
    alnum_end = np.array([bool(t) and t[-1].isalnum() for t in texts])
    alnum_start = np.array([bool(t) and t[0].isalnum() for t in texts])
    cont = ~first & alnum_start[tok] & ~word_start[tok] & np.r_[False, alnum_end[tok[:-1]]]
    add("class word continuation", "class", cont)
    ends_word = alnum_end[tok] & ~np.r_[cont[1:], False]
    word_tok = np.array([t.strip()[:1].isalnum() for t in texts])
    words, current = [], ""
    for i in range(n):                      # the word each token ends (pieces joined), for the suffixes
        t = texts[tok[i]]
        current = (current + t) if cont[i] else t
        words.append(current.strip().lower())
    words = np.array(words, dtype=object)
    for s in SUFFIXES:
        add(f"class suffix -{s}", "class",
            ends_word & np.fromiter((len(w) > len(s) + 1 and w.endswith(s) for w in words), bool, n))
    # sentence and quotation structure, within each context
    sent_end = np.array([t.strip().rstrip("\"”')")[-1:] in (".", "!", "?") for t in texts])
    opening = np.array([t.startswith((' "', " “", "“")) for t in texts])
    closing = np.array([("\"" in t or "”" in t) and not o for t, o in zip(texts, opening)])
    inside = np.zeros(n, bool)
    word_no = np.zeros(n, np.int64)
    starts = np.flatnonzero(first)
    for a, b in zip(starts, np.r_[starts[1:], n]):
        q = [i for i in range(a, b) if opening[tok[i]] or closing[tok[i]]]
        state = bool(q) and bool(closing[tok[q[0]]])    # a context that opens inside a quotation
        # word numbers are known from a sentence end on (or from the document's start)
        count, after_end, known = 0, bool(meta["tok_pos"][a] == 0), False
        for i in range(a, b):
            t = tok[i]
            if opening[t]:
                state = True
            if word_tok[t] and not cont[i]:             # a new word
                if after_end:
                    count, known, after_end = 1, True, False
                else:
                    count += 1
                word_no[i] = count if known else 0
            inside[i] = state and not opening[t] and not closing[t]
            if closing[t]:
                state = False
            if sent_end[t]:
                after_end = True
    sent_start = word_no == 1
    add("inside quotes", "context", inside)
    add("first word of a sentence", "context", sent_start)
    for lo, hi in SENTENCE_BINS:
        add(f"sentence word {lo}" + (f"-{hi}" if hi != lo and hi < 10**9 else "+" if hi >= 10**9 else ""),
            "context", (word_no >= lo) & (word_no <= hi) & (word_no > 0))
    position = np.arange(n) - starts[np.cumsum(first) - 1]
    for lo, hi in POSITION_BINS:
        add(f"context position {lo + 1}" + (f"-{hi + 1}" if hi < 10**9 else "+"), "context",
            (position >= lo) & (position <= hi))
    indptr = np.r_[0, np.cumsum([len(r) for r in rows_of])]
    csc = sp.csc_matrix((np.ones(indptr[-1], np.float32), np.concatenate(rows_of) if rows_of else np.zeros(0, int),
                         indptr), shape=(n, len(names)))
    return Labels(names, fams, csc.tocsr())


def as_labels(labels, names=None) -> Labels:
    """`labels` as `Labels`: a `Labels` as it is, or a [N, C] boolean tensor, array or scipy sparse
    matrix, its concepts named by `names` (default "concept 0", "concept 1", ...)."""
    if isinstance(labels, Labels):
        return labels
    if sp.issparse(labels):
        matrix = sp.csr_matrix(labels, dtype=np.float32)
    else:
        arr = _numpy(labels)
        if arr.ndim != 2:
            raise ValueError(f"labels must be [tokens, concepts], got shape {arr.shape}")
        matrix = sp.csr_matrix(arr.astype(bool).astype(np.float32))
    names = [f"concept {j}" for j in range(matrix.shape[1])] if names is None else [str(x) for x in names]
    if len(names) != matrix.shape[1]:
        raise ValueError(f"{len(names)} label names for {matrix.shape[1]} label columns")
    return Labels(names, ["label"] * len(names), matrix)


def token_labels(token_ids, contexts=None, tokenizer=None, min_count: int = MIN_COUNT) -> Labels:
    """Concepts of plain token ids, no tagged corpus needed. `token_ids`: [N] ids with `contexts` [N]
    context ids (a context's tokens contiguous and in order), or [n_contexts, T] (one row a context).

    With a `tokenizer`: every family of `concept_labels` but the tagged ones (POS, tag, genre): each
    token, previous token and next token identity seen at least `min_count` times, token classes
    (capitalised, digit, punctuation, word start, ...), word continuations and suffixes, quotes,
    sentence and context positions. Without one: the three identity families (named by token id) and
    the context positions."""
    ids = _numpy(token_ids).astype(np.int64)
    if ids.ndim == 2:
        if contexts is not None:
            raise ValueError("token_ids [n_contexts, T] number their contexts by row: give no contexts")
        contexts = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
        ids = ids.ravel()
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be [tokens] or [contexts, tokens], got shape {ids.shape}")
    ctx = np.zeros(len(ids), np.int64) if contexts is None else _numpy(contexts).astype(np.int64).ravel()
    if len(ctx) != len(ids):
        raise ValueError(f"contexts has {len(ctx)} entries for {len(ids)} token ids")
    first = np.r_[True, ctx[1:] != ctx[:-1]] if len(ids) else np.zeros(0, bool)
    if len(ids) and len(np.unique(ctx)) != int(first.sum()):
        raise ValueError("each context's tokens must be contiguous (in order)")
    meta = np.zeros(len(ids), dtype=META_DTYPE)
    meta["token"], meta["ctx"], meta["pos"] = ids, ctx, NO_TAG
    meta["tok_pos"] = np.arange(len(ids)) - np.flatnonzero(first)[np.cumsum(first) - 1] if len(ids) else 0
    if tokenizer is not None:
        return concept_labels(meta, tokenizer, min_count=min_count)
    vocab = int(ids.max()) + 1 if len(ids) else 0
    prev = np.where(first, -1, np.r_[-1, ids[:-1]])
    last = np.r_[first[1:], True]
    nxt = np.where(last, -1, np.r_[ids[1:], -1])
    cols, names, fams = [], [], []
    for values, fam, prefix in ((ids, "token", "token id "), (prev, "previous token", "after id "),
                                (nxt, "next token", "before id ")):
        ok = values >= 0
        for t in np.flatnonzero(np.bincount(values[ok], minlength=vocab) >= min_count):
            cols.append(values == t), names.append(f"{prefix}{t}"), fams.append(fam)
    position = meta["tok_pos"]
    for lo, hi in POSITION_BINS:
        mask = (position >= lo) & (position <= hi)
        if mask.any():
            cols.append(mask), fams.append("context")
            names.append(f"context position {lo + 1}" + (f"-{hi + 1}" if hi < 10**9 else "+"))
    matrix = sp.csr_matrix(np.stack(cols, 1).astype(np.float32)) if cols else sp.csr_matrix((len(ids), 0), dtype=np.float32)
    return Labels(names, fams, matrix)


# ------------------------------------------------------------------ active sets

def matched_counts(counts: torch.Tensor, n_features: int, seed: int = 0, min_active: int = MIN_ACTIVE) -> torch.Tensor:
    """Active counts for `n_features` baseline features drawn (seeded, with replacement) from the
    scored features' `counts` of another dictionary: "random directions of the same sparsity"."""
    pool = counts[counts >= min_active]
    if len(pool) == 0:
        raise ValueError("the reference dictionary has no feature active on enough tokens to match")
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (n_features,), generator=g)]


def active_sets(values: torch.Tensor, index: torch.Tensor, n_pos: torch.Tensor, k_max: int, counts=None):
    """The one activity rule, applied to each feature's top-`k_max` tokens (`top_tokens`): a feature is
    active on its top k = min(positive tokens, k_max) tokens, or min(`counts`, positive tokens, k_max).
    Returns numpy (values [F, k_max] with 0 padding, token indices [F, k_max] with -1 padding, k [F])."""
    if counts is not None and torch.as_tensor(counts).ndim == 1 and len(counts) != len(n_pos):
        raise ValueError(f"counts for {len(counts)} features, the codes have {len(n_pos)}")
    k = torch.minimum(n_pos, torch.tensor(k_max)) if counts is None else \
        torch.minimum(torch.as_tensor(counts, dtype=torch.int64), n_pos.clamp_max(k_max))
    keep = torch.arange(k_max)[None, :] < k[:, None]
    return torch.where(keep, values, 0.0).numpy(), torch.where(keep, index, -1).numpy(), k.numpy()


# ------------------------------------------------------------------ scoring

def mcc_from_counts(tp, pos, tot, n):
    """Matthews correlation from counts (numpy, broadcasting): tp tokens active with the concept, pos active,
    tot with the concept, n in all; 0 where undefined (nothing active, or the concept everywhere or nowhere)."""
    fp, fn = pos - tp, tot - tp
    tn = n - tp - fp - fn
    den = (pos * (n - pos) * tot * (n - tot))
    return np.where(den > 0, (tp * tn - fp * fn) / np.sqrt(np.maximum(den, 1e-30)), 0.0)


def _corr(mass, vsum, vsq, tot, n):
    var_a = np.maximum(n * vsq - vsum ** 2, 0)
    var_c = np.maximum(n * tot - tot ** 2, 0)
    den = np.sqrt(var_a * var_c)
    return np.where(den > 0, (n * mass - vsum * tot) / np.maximum(den, 1e-30), 0.0)


@dataclass
class Scored:
    """Held-out scores of one dictionary's features (see the module docstring)."""

    name: str
    counts: np.ndarray           # [F] active tokens per feature
    scored: np.ndarray           # [F] bool: active on at least min_active tokens
    mcc: np.ndarray              # [F] held-out MCC (cross-fitted)
    corr: np.ndarray             # [F] held-out correlation
    null_mcc: np.ndarray         # [F] the same for the feature's context-shuffled null
    null_corr: np.ndarray
    concept: list[str]           # [F] concept chosen on the first half (A)
    in_sample_mcc: np.ndarray    # [F] best MCC chosen and read on all scored tokens (the biased score)
    null_in_sample_mcc: np.ndarray
    boot: dict = field(default_factory=dict)   # statistic -> [n_boot] medians over features

    def summary(self) -> dict:
        """Medians over scored features with 95% intervals over resampled contexts."""
        s = self.scored
        out = {"features": int(len(s)), "n_scored": int(s.sum()), "median_count": float(np.median(self.counts[s]))
               if s.any() else float("nan")}
        for k in STATS:
            v = _stat(self, k)
            out[k] = float(np.median(v[s])) if s.any() else float("nan")
            out[f"{k}_low"], out[f"{k}_high"] = _interval(out[k], self.boot.get(k))
        return out

    def to_dict(self) -> dict:
        """The scores as plain values (arrays as tensors), for `helpers.settings.paths.stored`; `from_dict` rebuilds them."""
        def plain(v):
            return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "boot"}
        return {**out, "concept": list(self.concept), "boot": {k: plain(v) for k, v in self.boot.items()}}

    def result(self, resamples: str = "") -> "HeldoutScore":
        """These scores as a typed `HeldoutScore` (medians with their intervals, per-feature arrays kept)."""
        return HeldoutScore.from_scored(self, resamples)

    @classmethod
    def from_dict(cls, d: dict) -> "Scored":
        def array(v):
            return v.numpy() if isinstance(v, torch.Tensor) else v if v is None else np.asarray(v)
        names = [f.name for f in dataclasses.fields(cls)]
        if set(d) != set(names):
            raise ValueError(f"Scored.from_dict: fields {sorted(d)}, expected {sorted(names)}")
        return cls(**{k: d[k] if k == "name" else list(d[k]) if k == "concept" else
                      {b: array(v) for b, v in d[k].items()} if k == "boot" else array(d[k]) for k in names})


def _interval(value: float, boot) -> tuple[float, float]:
    """95% interval from resampled statistics, re-centred on the full-sample value: re-choosing a
    concept on a resample with duplicated contexts lowers held-out scores a little, a bias that a
    plain percentile interval would report as if it were the estimate."""
    if boot is None or not len(boot):
        return float("nan"), float("nan")
    lo, hi = np.percentile(boot, [2.5, 97.5]) - np.median(boot) + value
    return float(lo), float(hi)


STATS = ("mcc", "null_mcc", "excess_mcc", "corr", "null_corr", "excess_corr")
# Summaries of the per-feature held-out scores over the scored features, each with its interval over
# resampled contexts: "mcc" is the median; "mcc mean", "mcc share > 0.5", "mcc top decile" (the 90th
# percentile), ... the others (for mcc and corr). A share says how many features are clearly
# interpretable, which a median over many dull features can hide.
SUMMARIES = {
    "median": lambda x: np.median(x, axis=0),
    "mean": lambda x: np.mean(x, axis=0),
    "share > 0.3": lambda x: np.mean(x > 0.3, axis=0),
    "share > 0.5": lambda x: np.mean(x > 0.5, axis=0),
    "share > 0.7": lambda x: np.mean(x > 0.7, axis=0),
    "top decile": lambda x: np.percentile(x, 90, axis=0),
}


def statistic_key(key: str, summary: str = "median") -> str:
    """The name of a summary of a held-out score: "mcc" (its median), "mcc mean", "corr share > 0.5", ..."""
    if summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {tuple(SUMMARIES)}, got {summary!r}")
    return key if summary == "median" else f"{key} {summary}"


def _split_key(key: str) -> tuple[str, str]:
    """("mcc", "share > 0.5") from "mcc share > 0.5"; ("excess_mcc", "median") from "excess_mcc"."""
    base, _, summary = key.partition(" ")
    summary = summary or "median"
    if base not in STATS or summary not in SUMMARIES or (summary != "median" and base not in ("mcc", "corr")):
        raise ValueError(f"statistic {key!r}: one of {STATS} (medians), or 'mcc' or 'corr' followed by one of "
                         f"{tuple(s for s in SUMMARIES if s != 'median')}, e.g. 'mcc share > 0.5'")
    return base, summary


def _stat(r: Scored, k: str) -> np.ndarray:
    if k.startswith("excess_"):
        base = k[len("excess_"):]
        return getattr(r, base) - getattr(r, f"null_{base}")
    return getattr(r, k)


def statistic(r: Scored, key: str) -> float:
    """A summary (`statistic_key`) of the per-feature held-out scores over the scored features."""
    base, summary = _split_key(key)
    v = _stat(r, base)[r.scored]
    return float(SUMMARIES[summary](v)) if len(v) else float("nan")


def _numpy(x) -> np.ndarray:
    """A tensor, array or list as a numpy array (tensors moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def context_halves(contexts, halves=None) -> tuple[np.ndarray, np.ndarray]:
    """(ctx [N], ctx_half [n_ctx]): each token's context numbered 0.. in order of first appearance, and
    each context's half: alternating (0, 1, 0, ...) in that order, or as `halves` [N] (0/1, the same
    for every token of a context) says."""
    contexts = _numpy(contexts).ravel()
    _, first_at, inverse = np.unique(contexts, return_index=True, return_inverse=True)
    number = np.empty(len(first_at), np.int64)
    number[np.argsort(first_at, kind="stable")] = np.arange(len(first_at))
    ctx = number[inverse.ravel()]
    if halves is None:
        return ctx, np.arange(len(first_at)) % 2
    halves = _numpy(halves).astype(np.int64).ravel()
    if len(halves) != len(contexts):
        raise ValueError(f"halves has {len(halves)} entries for {len(contexts)} tokens")
    ctx_half = np.zeros(len(first_at), np.int64)
    ctx_half[ctx] = halves
    if not (ctx_half[ctx] == halves).all() or not np.isin(halves, (0, 1)).all():
        raise ValueError("halves must be 0 or 1 and the same for every token of a context")
    return ctx, ctx_half


class HeldoutSplit:
    """The held-out scoring of features against binary concepts, from plain arrays: `labels` ([N, C]
    booleans, or `Labels`) of N tokens grouped by `contexts` ([N] integer context ids; a context's
    tokens in their order). Contexts alternate between the two halves in order of first appearance
    (or as `halves` [N] 0/1 says, constant within a context); `scored` [N] bool picks the tokens that
    count. The context resamples are drawn once (seeded by `seed`), so every feature set scored on one
    split, or on two splits built from the same contexts and seed, shares them (paired differences).
    `score(activity)` scores a tensor of codes; `HeldoutScorer` reads them from a store."""

    def __init__(self, labels, contexts, scored=None, *, halves=None, label_names=None,
                 max_density: float = MAX_DENSITY, min_count: int = MIN_COUNT, min_active: int = MIN_ACTIVE,
                 n_boot: int = 200, candidates: int = 8, seed: int = 0):
        self.labels = as_labels(labels, label_names)
        contexts = _numpy(contexts)
        if contexts.ndim != 1:
            raise ValueError(f"contexts must be [tokens] context ids, got shape {contexts.shape}")
        n = len(contexts)
        if self.labels.matrix.shape[0] != n:
            raise ValueError(f"labels have {self.labels.matrix.shape[0]} rows (tokens) and contexts {n}: one row per token")
        scored = np.ones(n, bool) if scored is None else _numpy(scored).astype(bool).ravel()
        if len(scored) != n:
            raise ValueError(f"scored has {len(scored)} entries for {n} tokens")
        self.n = n
        self.scored_tokens = scored.copy()
        self.ctx, self.ctx_half = context_halves(contexts, halves)
        self.n_ctx = len(self.ctx_half)
        self.half = self.ctx_half[self.ctx].astype(np.int64)
        self._order = np.argsort(self.ctx, kind="stable")                   # tokens grouped by context, in order
        self._ctx_len = np.bincount(self.ctx, minlength=self.n_ctx)
        self._ctx_start = np.r_[0, np.cumsum(self._ctx_len)[:-1]].astype(np.int64)  # in `_order`
        self.position = np.empty(n, np.int64)                               # position within the context
        self.position[self._order] = np.arange(n) - self._ctx_start[self.ctx[self._order]]
        self.k_max = max(1, int(np.ceil(max_density * self.scored_tokens.sum())))
        self.max_density, self.min_count, self.min_active = max_density, min_count, min_active
        self.candidates, self.seed = candidates, seed
        L = self.labels.matrix.multiply(self.scored_tokens[:, None]).tocsr().astype(np.float64)
        self.L = L
        self.L_half = [L.multiply((self.half == h)[:, None]).tocsr() for h in (0, 1)]
        self.tot = [np.asarray(Lh.sum(0)).ravel() for Lh in self.L_half]
        self.n_half = [float((self.scored_tokens & (self.half == h)).sum()) for h in (0, 1)]
        # per-context concept counts and scored-token counts, for the resampled totals
        onehot = sp.csr_matrix((np.ones(n), (self.ctx, np.arange(n))), shape=(self.n_ctx, n))
        self.ctx_tot = np.asarray((onehot @ L).todense(), dtype=np.float64)  # [n_ctx, C]
        self.ctx_n = np.bincount(self.ctx, weights=self.scored_tokens.astype(float), minlength=self.n_ctx)
        rng = np.random.default_rng([seed, 1])
        self.weights = np.zeros((n_boot, self.n_ctx))
        for h in (0, 1):
            members = np.flatnonzero(self.ctx_half == h)
            for b in range(n_boot):
                self.weights[b] += np.bincount(rng.choice(members, size=len(members)), minlength=self.n_ctx)
        self.L_dense = np.asarray(L.todense(), dtype=np.uint8) if L.shape[0] * L.shape[1] <= 2e9 else None

    @property
    def resamples(self) -> str:
        """A fingerprint of the halves, scored tokens and context resamples: equal fingerprints, paired scores."""
        h = hashlib.sha1(self.half.tobytes() + self.scored_tokens.tobytes() + self.weights.tobytes())
        return f"{self.n} tokens, {self.n_ctx} contexts, {len(self.weights)} resamples, {h.hexdigest()[:12]}"

    # -- active sets -------------------------------------------------------------
    def active_of(self, activity, counts=None):
        """(values [F, k_max], token indices [F, k_max] with -1 padding, counts [F]) of a tensor of codes
        [N, F] (or booleans): each feature's exact top-k scored tokens, k = min(positive tokens, k_max) or
        the given `counts`."""
        shape = tuple(getattr(activity, "shape", ()))
        if len(shape) != 2 or shape[0] != self.n:
            raise ValueError(f"activity must be [{self.n} tokens, features] like the labels, got shape {shape}")
        return active_sets(*top_tokens_of(activity, self.k_max, self.scored_tokens), self.k_max, counts)

    def null_of(self, idx: np.ndarray) -> np.ndarray:
        """Each feature's active tokens moved into other contexts at the same positions (one
        permutation of the contexts per feature, seeded by the feature's index); a target that does
        not exist (a shorter context) or is not scored is dropped (-1)."""
        out = np.full_like(idx, -1)
        for f in range(len(idx)):
            ok = idx[f] >= 0
            t = idx[f][ok]
            perm = np.random.default_rng([self.seed, 2, f]).permutation(self.n_ctx)
            c, p = perm[self.ctx[t]], self.position[t]
            good = p < self._ctx_len[c]
            u = np.where(good, self._order[self._ctx_start[c] + np.minimum(p, self._ctx_len[c] - 1)], 0)
            good &= self.scored_tokens[u]
            out[f, np.flatnonzero(ok)] = np.where(good, u, -1)
        return out

    # -- scores ------------------------------------------------------------------
    def _tables(self, vals, idx):
        """Per half: active counts, value sums and the joint [F, C] tables of an active set."""
        F = len(idx)
        rows, cols = np.nonzero(idx >= 0)
        toks = idx[rows, cols]
        out = []
        for h in (0, 1):
            sel = self.half[toks] == h
            S = sp.csr_matrix((np.ones(sel.sum()), (rows[sel], toks[sel])), shape=(F, self.n))
            V = sp.csr_matrix((vals[rows[sel], cols[sel]].astype(np.float64), (rows[sel], toks[sel])), shape=(F, self.n))
            out.append({"pos": np.asarray(S.sum(1)).ravel(), "vsum": np.asarray(V.sum(1)).ravel(),
                        "vsq": np.asarray(V.multiply(V).sum(1)).ravel(),
                        "tp": np.asarray((S @ self.L_half[h]).todense()),
                        "mass": np.asarray((V @ self.L_half[h]).todense())})
        return out

    def _held_out(self, vals, idx):
        t = self._tables(vals, idx)
        res = {"mcc": [], "corr": [], "best": []}
        for a, b in ((0, 1), (1, 0)):
            eligible = self.tot[a] >= self.min_count
            m_a = np.where(eligible[None, :], mcc_from_counts(t[a]["tp"], t[a]["pos"][:, None], self.tot[a][None, :], self.n_half[a]), -np.inf)
            c_a = np.where(eligible[None, :], _corr(t[a]["mass"], t[a]["vsum"][:, None], t[a]["vsq"][:, None],
                                                    self.tot[a][None, :], self.n_half[a]), -np.inf)
            bm, bc = m_a.argmax(1), c_a.argmax(1)
            r = np.arange(len(idx))
            m_b = mcc_from_counts(t[b]["tp"][r, bm], t[b]["pos"], self.tot[b][bm], self.n_half[b])
            c_b = _corr(t[b]["mass"][r, bc], t[b]["vsum"], t[b]["vsq"], self.tot[b][bc], self.n_half[b])
            res["mcc"].append(m_b), res["corr"].append(c_b)
            res["best"].append(np.argsort(-m_a, 1, kind="stable")[:, : self.candidates])
            res.setdefault("best_corr", []).append(np.argsort(-c_a, 1, kind="stable")[:, : self.candidates])
        return res

    def _in_sample(self, idx):
        rows, cols = np.nonzero(idx >= 0)
        toks = idx[rows, cols]
        S = sp.csr_matrix((np.ones(len(toks)), (rows, toks)), shape=(len(idx), self.n))
        tot = self.tot[0] + self.tot[1]
        n = self.n_half[0] + self.n_half[1]
        return mcc_from_counts(np.asarray((S @ self.L).todense()), np.asarray(S.sum(1)), tot[None, :], n).max(1)

    def _per_ctx(self, rows: np.ndarray, ctx: np.ndarray, weights: np.ndarray, n_rows: int) -> sp.csr_matrix:
        """Sparse [n_rows, n_ctx] per-context sums of `weights` at (rows, ctx), `rows` sorted: built as
        CSR directly (its entries need not be sorted or unique within a row to be multiplied)."""
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
        return sp.csr_matrix((weights, ctx, indptr), shape=(n_rows, self.n_ctx))

    def _boot(self, vals, idx, best, best_corr, scored, chunk: int = 250) -> dict:
        """Per resample, the median over `scored` features of the held-out MCC and correlation, the
        concept re-chosen on the resampled half among each feature's candidates. Every count is a sum
        over contexts, so each is first aggregated per context (a sparse [rows, contexts] matrix) and
        then weighted by all resamples at once with one matrix product; on the half a concept is
        scored on, only the chosen concept's statistic is computed."""
        B = len(self.weights)
        if B == 0 or not scored.any():
            return {statistic_key(k, summ): np.zeros(0) for k in ("mcc", "corr") for summ in SUMMARIES}
        f_idx = np.flatnonzero(scored)
        idx, vals = idx[f_idx], vals[f_idx].astype(np.float64)
        F, K = idx.shape
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        ctx_of, half_of = self.ctx[safe], self.half[safe]
        parity = self.ctx_half
        active = {h: np.nonzero(valid & (half_of == h)) for h in (0, 1)}      # (features, slots) sorted
        # per half: each feature's active tokens, value sums and squares, per context
        per_half = {}
        for h, (f_, k_) in active.items():
            v, c = vals[f_, k_], ctx_of[f_, k_]
            per_half[h] = [self._per_ctx(f_, c, w, F) for w in (np.ones(len(f_)), v, v * v)]
        # per (statistic, choosing half a, half h): each feature-candidate pair's hits (and their values), per context
        hits = {}
        for key, cand in (("mcc", best), ("corr", best_corr)):
            for a in (0, 1):
                c = cand[a][f_idx]                                               # [F, M]
                M = c.shape[1]
                full = None if self.L_dense is not None else self._gather(safe, c)  # [F, K, M]
                for h, (f_, k_) in active.items():
                    lab = (self.L_dense[safe[f_, k_][:, None], c[f_]].astype(bool) if full is None
                           else full[f_, k_])                                   # [active, M]: candidate m present
                    r, m_ = np.nonzero(lab)
                    rows = f_[r] * M + m_
                    order = np.argsort(rows, kind="stable")
                    r, rows = r[order], rows[order]
                    hits[key, a, h] = self._per_ctx(rows, ctx_of[f_[r], k_[r]],
                                                    vals[f_[r], k_[r]] if key == "corr" else np.ones(len(rows)), F * M)
        out = {statistic_key(k, summ): np.zeros(B) for k in ("mcc", "corr") for summ in SUMMARIES}
        for s0 in range(0, B, chunk):
            W = self.weights[s0:s0 + chunk].T                                   # [n_ctx, b]
            n_h = [(self.ctx_n * (parity == h)) @ W for h in (0, 1)]             # [b]
            tot_h = [((self.ctx_tot * (parity == h)[:, None]).T @ W) for h in (0, 1)]  # [C, b]
            pos, vsum, vsq = ({h: per_half[h][i] @ W for h in (0, 1)} for i in range(3))  # each [F, b]
            for key, cand in (("mcc", best), ("corr", best_corr)):
                scores = []
                for a, b in ((0, 1), (1, 0)):
                    c = cand[a][f_idx]                                          # [F, M]
                    M = c.shape[1]
                    got = {h: (hits[key, a, h] @ W).reshape(F, M, -1) for h in (a, b)}  # tp (mcc) or mass (corr)
                    tot_a = tot_h[a][c]                                         # [F, M, b]
                    if key == "mcc":
                        res_a = mcc_from_counts(got[a], pos[a][:, None, :], tot_a, n_h[a][None, None, :])
                    else:
                        res_a = _corr(got[a], vsum[a][:, None, :], vsq[a][:, None, :], tot_a, n_h[a][None, None, :])
                    pick = np.where(tot_a >= self.min_count, res_a, -np.inf).argmax(1)[:, None, :]  # [F, 1, b]
                    at_pick = lambda t: np.take_along_axis(t, pick, 1)[:, 0, :]  # noqa: E731  [F, M, b] -> [F, b]
                    tot_b = at_pick(tot_h[b][c])
                    if key == "mcc":
                        scores.append(mcc_from_counts(at_pick(got[b]), pos[b], tot_b, n_h[b][None, :]))
                    else:
                        scores.append(_corr(at_pick(got[b]), vsum[b], vsq[b], tot_b, n_h[b][None, :]))
                held_out = (scores[0] + scores[1]) / 2                          # [F, b]
                for summ, fn in SUMMARIES.items():
                    out[statistic_key(key, summ)][s0:s0 + chunk] = fn(held_out)
        return out

    def _gather(self, toks: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """L[toks[f, j], cand[f, m]]: [f, K, M], whether token j of feature f has candidate concept m."""
        if self.L_dense is not None:
            return self.L_dense[toks[:, :, None], cand[:, None, :]].astype(bool)
        out = np.zeros((*toks.shape, cand.shape[1]), bool)
        for f in range(len(toks)):
            out[f] = np.asarray(self.L[toks[f]][:, cand[f]].todense()) > 0
        return out

    def score_active(self, vals: np.ndarray, idx: np.ndarray, k: np.ndarray, name: str) -> Scored:
        """Held-out scores of features given their active sets (`active_of`), with their nulls and the
        resampled medians."""
        null_idx = self.null_of(idx)
        null_vals = np.where(null_idx >= 0, vals, 0.0)
        ho, nho = self._held_out(vals, idx), self._held_out(null_vals, null_idx)
        scored = k >= self.min_active
        boot = self._boot(vals, idx, ho["best"], ho["best_corr"], scored)
        nboot = self._boot(null_vals, null_idx, nho["best"], nho["best_corr"], scored)
        mean = lambda x: (x[0] + x[1]) / 2  # noqa: E731
        r = Scored(name, k, scored, mean(ho["mcc"]), mean(ho["corr"]), mean(nho["mcc"]),
                   mean(nho["corr"]), [self.labels.names[i] for i in ho["best"][0][:, 0]],
                   self._in_sample(idx), self._in_sample(null_idx))
        r.boot = {**boot, "null_mcc": nboot["mcc"], "null_corr": nboot["corr"]}
        # the excess's interval: the median over features of (score - null), per resample
        r.boot["excess_mcc"] = r.boot["mcc"] - r.boot["null_mcc"]
        r.boot["excess_corr"] = r.boot["corr"] - r.boot["null_corr"]
        return r

    def score_codes(self, activity, name: str = "features", counts=None) -> Scored:
        """Held-out scores of the features of `activity` [N, F] (codes, active where > 0, or booleans);
        `counts` [F] caps each feature's active tokens (e.g. `matched_counts`)."""
        return self.score_active(*self.active_of(activity, counts), name)


class HeldoutScorer(HeldoutSplit):
    """Scores dictionaries on the first `n_tokens` tokens of a store (whole contexts), held out by
    context halves, against `labels` (default: `concept_labels` of those tokens). `scored` [n_tokens]
    bool picks the tokens that count (e.g. the ordinary, non-massive ones). The resamples of the
    contexts are drawn once (seeded), so every dictionary scored by one scorer shares them."""

    def __init__(self, store, tokenizer, n_tokens: int | None = None, scored: np.ndarray | None = None,
                 labels: Labels | None = None, max_density: float = MAX_DENSITY, min_count: int = MIN_COUNT,
                 min_active: int = MIN_ACTIVE, n_boot: int = 200, candidates: int = 8, seed: int = 0):
        meta = store.tokens()
        n = len(meta) if n_tokens is None else min(n_tokens, len(meta))
        ctx = meta["ctx"][:n]
        # whole contexts only: drop a context cut by n_tokens
        if n < len(meta) and meta["ctx"][n] == ctx[-1]:
            n = int(np.flatnonzero(ctx != ctx[-1])[-1]) + 1 if (ctx != ctx[-1]).any() else n
        self.store = store
        self.meta = meta[:n]
        scored = np.ones(n, bool) if scored is None else np.asarray(scored[:n], bool)
        labels = labels if labels is not None else concept_labels(
            self.meta, tokenizer, store.manifest.get("tags", []), store.manifest.get("genres", []), min_count)
        first = np.r_[True, self.meta["ctx"][1:] != self.meta["ctx"][:-1]]
        super().__init__(labels, np.cumsum(first) - 1, scored, max_density=max_density, min_count=min_count,
                         min_active=min_active, n_boot=n_boot, candidates=candidates, seed=seed)

    def top(self, dictionary, hook: str | None = None, progress: bool = True):
        """`top_tokens` of `dictionary` on this scorer's tokens: (values [F, k_max], token indices
        [F, k_max], positive scored tokens [F]); what `active` cuts to each feature's active set."""
        hook = dictionary.check_store(self.store, hook)
        return top_tokens(dictionary, self.store, hook, self.n, self.scored_tokens, self.k_max, progress=progress)

    def active(self, dictionary, hook: str | None = None, counts=None, progress: bool = True, top=None):
        """(values [F, k_max], token indices [F, k_max] with -1 padding, counts [F]): each feature's
        exact top-k scored tokens, k = min(positive tokens, k_max) or the given `counts`. `top`: the
        dictionary's `top` on this scorer, computed before (e.g. to score it at two sparsities)."""
        return active_sets(*(top if top is not None else self.top(dictionary, hook, progress)), self.k_max, counts)

    def score(self, dictionary, name: str | None = None, hook: str | None = None, counts=None,
              progress: bool = True, top=None) -> Scored:
        """Held-out scores of every feature of `dictionary`, with its null and the resampled medians
        (`top`: as in `active`)."""
        return self.score_active(*self.active(dictionary, hook, counts, progress=progress, top=top),
                                 name or dictionary.name)

    def compare(self, dictionaries: dict, match: dict | None = None, pairs=None, keys=("mcc",),
                hook: str | None = None, progress: bool = True) -> "HeldoutComparison":
        """Held-out scores of several dictionaries ({name: dictionary}) on this scorer's resamples, with
        `match` {name: reference name}: that dictionary made active on as many tokens as the reference's
        features (`matched_counts`, seeded by the scorer's seed), e.g. random directions at the SAE's
        sparsity; and the paired differences (`compare`) of `pairs` [(a, b), ...] (default: each matched
        dictionary against its reference) for each statistic in `keys`. A name may be given twice, with
        and without a match, as two entries of `dictionaries` holding the same dictionary."""
        match = dict(match or {})
        for m, ref in match.items():
            if m not in dictionaries or ref not in dictionaries:
                raise ValueError(f"match {m!r}: {ref!r}: both must be names of dictionaries ({list(dictionaries)})")
            if ref in match:
                raise ValueError(f"{ref!r} is matched to {match[ref]!r} itself: match to one scored at its own sparsity")
        done: dict[str, Scored] = {}
        order = sorted(dictionaries, key=lambda m: m in match)           # references first
        left = {}                                                         # names still to score, by dictionary
        for name in order:
            left[id(dictionaries[name])] = left.get(id(dictionaries[name]), 0) + 1
        tops = {}  # a dictionary given under several names: its top tokens read once, kept until its last
        for name in order:
            d = dictionaries[name]
            counts = None if name not in match else matched_counts(
                torch.as_tensor(done[match[name]].counts), d.n_features, seed=self.seed, min_active=self.min_active)
            top = tops.pop(id(d), None)
            top = top if top is not None else self.top(d, hook, progress=progress)
            done[name] = self.score(d, name=name, hook=hook, counts=counts, top=top)
            left[id(d)] -= 1
            if left[id(d)]:
                tops[id(d)] = top
        scores = {name: done[name].result(self.resamples) for name in dictionaries}
        pairs = list(match.items()) if pairs is None else list(pairs)
        return HeldoutComparison(scores, [compare(scores[a], scores[b], key) for a, b in pairs for key in keys])


@dataclass
class HeldoutScore(Result):
    """The held-out, sparsity-matched concept score of one set of features (see the module docstring):
    medians over scored features (active on at least `min_active` tokens) with 95% intervals over
    resampled contexts. `mcc`: held-out MCC; `null_mcc`: the same for each feature's context-shuffled
    null (chance at its sparsity); `excess_mcc`: the median of (score - null); `corr`: the same for the
    correlation of code and concept; `in_sample_mcc`: the biased score chosen and read on the same tokens.
    `features` holds per-feature arrays (counts, scored, mcc, corr, null_mcc, null_corr, concept,
    in_sample_mcc, null_in_sample_mcc), `boot` the resampled medians, `resamples` which resamples
    they were (scores with equal `resamples` compare as paired)."""

    name: str
    mcc: Estimate
    null_mcc: Estimate
    excess_mcc: Estimate
    corr: Estimate
    null_corr: Estimate
    excess_corr: Estimate
    in_sample_mcc: float
    n_features: int
    n_scored: int
    median_count: float
    features: dict = field(default_factory=dict)
    boot: dict = field(default_factory=dict)
    resamples: str = ""

    def __post_init__(self):
        self.features = {k: list(v) if k == "concept" else np.asarray(v, dtype=bool if k == "scored" else None)
                         for k, v in self.features.items()}
        self.boot = {k: np.asarray(v, dtype=np.float64) for k, v in self.boot.items()}

    @classmethod
    def from_scored(cls, r: Scored, resamples: str = "") -> "HeldoutScore":
        s = r.summary()
        est = {k: Estimate(s[k], s[f"{k}_low"], s[f"{k}_high"]) for k in STATS}
        arrays = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("name", "boot")}
        return cls(r.name, **est, in_sample_mcc=float(np.median(r.in_sample_mcc[r.scored])) if r.scored.any()
                   else float("nan"), n_features=s["features"], n_scored=s["n_scored"], median_count=s["median_count"],
                   features=arrays, boot=dict(r.boot), resamples=resamples)

    def scored_features(self) -> Scored:
        """The per-feature scores as a `Scored` (what the workbook's plots read)."""
        names = [f.name for f in dataclasses.fields(Scored) if f.name not in ("name", "boot")]
        return Scored(self.name, **{k: self.features[k] for k in names}, boot=dict(self.boot))

    @property
    def counts(self) -> np.ndarray:
        """[F] active tokens per feature: the counts to match another method's sparsity to (`matched_counts`)."""
        return self.features["counts"]

    def rows(self) -> list[dict]:
        return [{"method": self.name, "features": self.n_features, "scored": self.n_scored,
                 "median active": self.median_count, "held-out MCC": format(self.mcc, ".3f"),
                 "null MCC": format(self.null_mcc, ".3f"), "excess MCC": format(self.excess_mcc, ".3f"),
                 "held-out corr": format(self.corr, ".3f"), "in-sample MCC": self.in_sample_mcc}]

    def summary(self, key: str = "mcc") -> dict[str, Estimate]:
        """{summary: Estimate} of the per-feature held-out `key` ("mcc" or "corr") over the scored
        features: median, mean, the shares above 0.3 / 0.5 / 0.7 and the top decile, each with its 95%
        interval over resampled contexts (`SUMMARIES`)."""
        r = self.scored_features()
        out = {}
        for summ in SUMMARIES:
            k = statistic_key(key, summ)
            value = statistic(r, k)
            out[summ] = Estimate(value, *_interval(value, self.boot.get(k)))
        return out

    def nearest(self, value: float, key: str = "mcc") -> int:
        """The scored feature whose held-out `key` ("mcc" or "corr") is nearest `value`: what a score of
        that size looks like (e.g. its dashboard)."""
        v = np.asarray(self.features[key], dtype=np.float64)
        gap = np.where(np.asarray(self.features["scored"], bool) & np.isfinite(v), np.abs(v - value), np.inf)
        if not np.isfinite(gap).any():
            raise ValueError(f"{self.name}: no feature was scored")
        return int(gap.argmin())

    def beats_null(self, key: str = "mcc") -> bool:
        """Whether the excess over the same-sparsity null (`excess_mcc` or `excess_corr`) lies above 0."""
        return getattr(self, f"excess_{key}").above(0)

    def verdicts(self) -> list[str]:
        if not self.n_scored:
            return [f"{self.name}: no feature is active on enough tokens to be scored."]
        e = self.excess_mcc
        if not e.has_interval:
            word = "no interval (no resamples)"
        elif e.above(0):
            word = "beats its same-sparsity null"
        elif e.below(0):
            word = "scores below its same-sparsity null"
        else:
            word = "does not beat its same-sparsity null (the interval includes 0)"
        return [f"{self.name}: held-out MCC {self.mcc} against {self.null_mcc} for its null, excess {e}: {word}.",
                f"{self.name}: chosen and read on the same tokens the median MCC would be {self.in_sample_mcc:.3f}, "
                f"{self.in_sample_mcc - self.mcc.value:+.3f} of selection bias."]


@dataclass
class HeldoutDifference(Result):
    """`a`'s median held-out `key` minus `b`'s, with the paired 95% interval over their shared resamples."""

    a: str
    b: str
    key: str
    value: Estimate

    def rows(self) -> list[dict]:
        return [{"a": self.a, "b": self.b, "statistic": self.key, "a - b": format(self.value, ".3f")}]

    @property
    def better(self) -> str | None:
        """The name of the method that scores higher (the interval excludes 0), else None."""
        return self.a if self.value.above(0) else self.b if self.value.below(0) else None

    def verdicts(self) -> list[str]:
        if not self.value.has_interval:
            return [f"{self.a} - {self.b} ({self.key}): {self.value} (no interval: no shared resamples)."]
        if self.better is None:
            return [f"{self.a} and {self.b} are not told apart on {self.key}: {self.a} - {self.b} = {self.value}."]
        worse = self.b if self.better == self.a else self.a
        return [f"{self.better} scores higher than {worse} on {self.key}: {self.a} - {self.b} = {self.value}."]


@dataclass
class HeldoutComparison(Result):
    """Held-out scores of several feature sets on the same resamples, and their paired differences."""

    scores: dict[str, HeldoutScore] = field(default_factory=dict)
    differences: list[HeldoutDifference] = field(default_factory=list)

    def __getitem__(self, name: str) -> HeldoutScore:
        return self.scores[name]

    def difference(self, a: str, b: str, key: str = "mcc") -> HeldoutDifference:
        """The paired difference `a` - `b` (held-out `key`): the one computed, or computed now."""
        found = [d for d in self.differences if (d.a, d.b, d.key) == (a, b, key)]
        return found[0] if found else compare(self.scores[a], self.scores[b], key)

    def distribution_table(self, key: str = "mcc", methods=None):
        """Each method's per-feature held-out `key` summarised every way (`HeldoutScore.summary`): one
        row per method, 95% intervals over the shared resampled contexts."""
        rows = [{"method": name, **{summ: format(e, ".3f") for summ, e in self.scores[name].summary(key).items()}}
                for name in (methods or self.scores)]
        return Table(rows, title=f"held-out {key.upper()} over each method's scored features")

    def difference_table(self):
        """The paired differences as a table (one row each), with their verdicts."""
        return Table([row for d in self.differences for row in d.rows()], title="paired differences",
                     notes=[v for d in self.differences for v in d.verdicts()])

    def rows(self) -> list[dict]:
        return [row for r in self.scores.values() for row in r.rows()]

    def verdicts(self) -> list[str]:
        return [r.verdicts()[0] for r in self.scores.values()] + [v for d in self.differences for v in d.verdicts()]


def _as_scored(r) -> Scored:
    return r.scored_features() if isinstance(r, HeldoutScore) else r


def difference(a: Scored | HeldoutScore, b: Scored | HeldoutScore, key: str = "mcc") -> dict:
    """`a`'s statistic minus `b`'s (`key`: a median such as "mcc", or a summary such as "mcc share >
    0.5"), with the paired 95% interval over the shared resamples of one HeldoutScorer."""
    a, b = _as_scored(a), _as_scored(b)
    d = statistic(a, key) - statistic(b, key)
    ba, bb = a.boot.get(key), b.boot.get(key)
    if ba is None or bb is None or len(ba) != len(bb) or not len(ba):
        return {"value": d, "low": float("nan"), "high": float("nan")}
    lo, hi = _interval(d, ba - bb)
    return {"value": d, "low": lo, "high": hi}


def compare(a: Scored | HeldoutScore, b: Scored | HeldoutScore, key: str = "mcc") -> HeldoutDifference:
    """`difference` as a typed result that says which scores higher: `key` is one of mcc, null_mcc,
    excess_mcc, corr, null_corr, excess_corr (medians), or a summary of mcc or corr ("mcc mean",
    "mcc share > 0.5", "mcc top decile", ...: `SUMMARIES`). Scores on different resamples are refused
    (their difference would not be paired)."""
    _split_key(key)
    ra, rb = (getattr(r, "resamples", "") for r in (a, b))
    if ra and rb and ra != rb:
        raise ValueError(f"{a.name} and {b.name} were scored on different resamples ({ra} / {rb}): "
                         "score both on one HeldoutSplit (or the same contexts, halves, scored tokens and seed)")
    d = difference(a, b, key)
    return HeldoutDifference(a.name, b.name, key, Estimate(d["value"], d["low"], d["high"]))


def heldout_score(activity, labels, contexts, *, label_names=None, name: str = "features", scored=None,
                  halves=None, counts=None, match_active=None, max_density: float = MAX_DENSITY,
                  min_count: int = MIN_COUNT, min_active: int = MIN_ACTIVE, n_boot: int = 200,
                  candidates: int = 8, seed: int = 0) -> HeldoutScore:
    """The held-out, sparsity-matched concept score of the features of `activity` [N, F] (codes, active
    where > 0, or booleans) against `labels` [N, C] (booleans or `Labels`; `token_labels` builds them
    from token ids) over N tokens grouped by `contexts` [N] (integer ids): the held-out split and the
    resamples take whole contexts. Each feature is active on its top min(positive, `max_density` of the
    tokens) tokens; `counts` [F] caps them, or `match_active` (another result, or its counts) draws the
    caps from another method's counts (`matched_counts`, seeded by `seed`): the same sparsity.
    Scores made with the same contexts, halves, `scored` tokens, `n_boot` and `seed` share their
    resamples, so `compare` pairs them."""
    split = HeldoutSplit(labels, contexts, scored, halves=halves, label_names=label_names, max_density=max_density,
                         min_count=min_count, min_active=min_active, n_boot=n_boot, candidates=candidates, seed=seed)
    if match_active is not None:
        if counts is not None:
            raise ValueError("give counts or match_active, not both")
        ref = match_active.counts if isinstance(match_active, (HeldoutScore, Scored)) else match_active
        counts = matched_counts(torch.as_tensor(np.asarray(_numpy(ref))), int(activity.shape[1]), seed=seed,
                                min_active=min_active)
    return split.score_codes(activity, name, counts).result(split.resamples)


def heldout_scores(codes: dict, labels, contexts, *, match: dict | None = None, label_names=None, scored=None,
                   halves=None, max_density: float = MAX_DENSITY, min_count: int = MIN_COUNT,
                   min_active: int = MIN_ACTIVE, n_boot: int = 200, candidates: int = 8, seed: int = 0,
                   key: str = "mcc") -> HeldoutComparison:
    """`heldout_score` of several feature sets ({name: activity [N, F]}) on one split, so that their
    differences are paired, with `match` {name: reference name}: that set made active on as many
    tokens as the reference's features (`matched_counts`), e.g. ``match={"random": "SAE"}`` for random
    directions at the SAE's sparsity. The comparison holds every score and the difference (`key`) of
    every pair, in the order given."""
    match = dict(match or {})
    for m, ref in match.items():
        if m not in codes or ref not in codes:
            raise ValueError(f"match {m!r}: {ref!r}: both must be names of codes ({list(codes)})")
        if ref in match:
            raise ValueError(f"{ref!r} is matched to {match[ref]!r} itself: match to a set scored at its own sparsity")
    split = HeldoutSplit(labels, contexts, scored, halves=halves, label_names=label_names, max_density=max_density,
                         min_count=min_count, min_active=min_active, n_boot=n_boot, candidates=candidates, seed=seed)
    done: dict[str, Scored] = {}
    for name in sorted(codes, key=lambda m: m in match):            # references before the sets matched to them
        counts = None
        if name in match:
            counts = matched_counts(torch.as_tensor(done[match[name]].counts), int(codes[name].shape[1]), seed=seed,
                                    min_active=min_active)
        done[name] = split.score_codes(codes[name], name, counts)
    scores = {name: done[name].result(split.resamples) for name in codes}
    names = list(codes)
    diffs = [compare(scores[a], scores[b], key) for i, a in enumerate(names) for b in names[i + 1:]]
    return HeldoutComparison(scores, diffs)


CURVE_CODE = ("helpers.evals.heldout", "helpers.saes.train", "helpers.saes.stack", "helpers.activations.massive")
_SNAPSHOTS: dict[str, dict] = {}  # curve_snapshots of this process, by what they depend on


@dataclass
class CurvePoint(Result):
    """One budget of `interpretability_curve`: the SAE's and the matched random directions' median
    held-out MCC (95% intervals over resampled contexts), their paired difference, and the SAE's
    median active tokens per feature."""

    tokens: int
    sae: Estimate
    random: Estimate
    difference: Estimate
    median_count: float


@dataclass
class InterpretabilityCurve(Result):
    """The held-out MCC of an SAE and of random directions at its sparsity, at several training budgets
    (`interpretability_curve`). `plot()` draws it."""

    points: list[CurvePoint] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "InterpretabilityCurve":
        """From the per-budget rows training reports: tokens, the two `Scored.summary()`s and their `difference`."""
        def est(s, k="mcc"):
            return Estimate(s[k], s[f"{k}_low"], s[f"{k}_high"])
        return cls([CurvePoint(int(r["tokens"]), est(r["sae"]), est(r["random"]),
                               Estimate(r["difference"]["value"], r["difference"]["low"], r["difference"]["high"]),
                               float(r["sae"]["median_count"])) for r in rows])

    def rows(self) -> list[dict]:
        return [{"training tokens": p.tokens, "SAE held-out MCC": format(p.sae, ".3f"),
                 "random (SAE's sparsity)": format(p.random, ".3f"), "SAE - random": format(p.difference, "+.3f"),
                 "median active tokens": p.median_count} for p in self.points]

    def verdicts(self) -> list[str]:
        out = []
        for p in self.points:
            d = p.difference
            word = ("the SAE scores higher" if d.above(0) else "the SAE scores lower" if d.below(0)
                    else "no interval" if not d.has_interval else "the two are not told apart")
            out.append(f"At {p.tokens:,} training tokens, SAE - random = {d:+.3f}: {word}.")
        if len(self.points) > 1:
            first, last = self.points[0].difference.value, self.points[-1].difference.value
            out.append(f"From {self.points[0].tokens:,} to {self.points[-1].tokens:,} tokens the difference moves "
                       f"by {last - first:+.3f}.")
        return out

    def plot(self):
        """The figure: held-out MCC against training tokens (helpers.show.plots.interpretability_curve)."""
        return plots.interpretability_curve(self)


def curve_training(profile, sweep, index: int | None = None, points: int = 3):
    """What the interpretability curve trains: the settings of one sweep SAE (default: the chosen one) at
    the profile's hook, and the profile's training settings with snapshots at `points` budgets halving
    down from the whole (1/4, 1/2 and all of it, by default). Returns (SAEConfig, TrainConfig)."""
    row = sweep.rows_[sweep.chosen if index is None else index]
    cfg = SAEConfig(**{**{k: getattr(row, k) for k in SAE_KEYS}, "hook_name": profile.sae_hook})
    tc = train_config(profile)
    return cfg, dataclasses.replace(tc, eval_at=halving_steps(tc.total_tokens // tc.batch_size, points))


def curve_snapshots(profile, store, sweep, index: int | None = None, points: int = 3, checkpoint_dir=None,
                    progress: bool = True) -> dict:
    """{training tokens: one-SAE stack}: one sweep SAE (default: the chosen one) as it was at `points`
    budgets halving down from the profile's (1/4, 1/2 and all of it, by default). The sweep keeps its
    chosen SAE's (helpers.runs.sweep.CurveSnapshots) where those budgets are learning-curve steps; any
    other is trained again alone with the sweep's settings (`curve_training`: a sweep trains exactly
    what training each SAE alone would).

    Made once per process for the same settings, store and code: the interpretability curve and the
    protocols' budget curve (helpers.evals.protocols.snapshot_protocol_scores) score the same snapshots.
    With `checkpoint_dir`, training keeps a checkpoint and each snapshot's weights (safetensors) in a
    folder under it named by what they depend on, so an interrupted run resumes and a later process
    reads the snapshots instead of training again."""
    from safetensors.torch import load_file, save_file

    cfg, tc = curve_training(profile, sweep, index, points)
    hook = profile.sae_hook
    key = digest([repr(cfg), repr(tc), profile.seed, str(Path(store.path).resolve())], CURVE_CODE)
    if key in _SNAPSHOTS:
        return dict(_SNAPSHOTS[key])
    budgets = sorted(step * tc.batch_size for step in tc.eval_at)
    kept = sweep_snapshots(sweep, sweep.chosen if index is None else index, budgets, store)
    if kept is not None:
        device = resolve_device(tc.device)
        snaps = {}
        for n, state in kept.items():
            snap = SAEStack([cfg])
            snap.load_state_dict({**snap.state_dict(), **state})
            snaps[n] = snap.to(device).eval()
        _SNAPSHOTS[key] = snaps
        return dict(snaps)
    folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"curve-snapshots-{key}"
    saved = {}

    def on_eval(step, n_tokens, saes):
        snap = copy.deepcopy(saes[0]).eval()
        saved[int(n_tokens)] = snap
        if folder is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in snap.state_dict().items()
                     if isinstance(v, torch.Tensor)}  # the recipe (extra state) is the run's own
            tmp = folder / f".snapshot-{n_tokens}.{os.getpid()}.tmp"
            save_file(state, str(tmp))
            tmp.replace(folder / f"snapshot-{n_tokens}.safetensors")  # atomic: never half a snapshot
        return {"tokens": int(n_tokens)}

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    rule = massive.fit(store, hook) if profile.massive else None
    result = train_sweep(store, hook, [cfg], tc, run_dir=None if folder is None else folder / "run",
                         progress=progress, on_eval=on_eval, rules={hook: rule} if rule else None)
    for n in budgets:  # snapshots taken before an interruption: read back from their files
        if n not in saved:
            if folder is None or not (folder / f"snapshot-{n}.safetensors").exists():
                raise RuntimeError(f"the snapshot at {n:,} tokens is missing: delete {folder} to train again")
            snap = copy.deepcopy(result.saes[0]).eval()
            state = snap.state_dict()
            state.update(load_file(str(folder / f"snapshot-{n}.safetensors")))
            snap.load_state_dict(state)
            saved[n] = snap
    _SNAPSHOTS[key] = {n: saved[n] for n in budgets}
    return dict(_SNAPSHOTS[key])


def interpretability_curve(profile, store, sweep, scorer: HeldoutScorer, index: int | None = None,
                           points: int = 3, checkpoint_dir=None, progress: bool = True) -> InterpretabilityCurve:
    """Does the gap open with training? The held-out score of one sweep SAE (default: the chosen
    one) at `points` budgets halving down from the profile's (1/4, 1/2 and all of it, by default),
    beside random directions made active on as many tokens as that snapshot's features. The snapshots
    are `curve_snapshots` (trained once, kept under `checkpoint_dir`), each scored on `scorer`. One
    `CurvePoint` per budget: tokens, the SAE's and the random directions' median held-out MCC and their
    paired difference."""

    snapshots = curve_snapshots(profile, store, sweep, index, points, checkpoint_dir=checkpoint_dir,
                                progress=progress)
    hook = profile.sae_hook
    rule = massive.fit(store, hook) if profile.massive else None
    x = store.activations(hook, max_tokens=20_000)
    mean = (x if rule is None else rule.shift(x)).mean(0)
    d_sae = next(iter(snapshots.values())).configs[0].d_sae
    rand = random_directions(store.d_model, d_sae, mean, seed=profile.seed, hook_name=hook,
                             model_name=profile.model, massive=rule)
    rows = []
    for n_tokens, snap in sorted(snapshots.items()):
        sae = scorer.score(SAEDictionary(snap, name="SAE"), hook=hook, progress=False)
        rnd = scorer.score(rand.to(device_of(snap)), name="random", hook=hook, progress=False,
                           counts=matched_counts(torch.as_tensor(sae.counts), rand.n_features, seed=profile.seed))
        rows.append({"tokens": n_tokens, "sae": sae.summary(), "random": rnd.summary(),
                     "difference": difference(sae, rnd)})
    return InterpretabilityCurve.from_rows(rows)
