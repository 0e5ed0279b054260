"""Feature statistics in one pass over a store, and the LLM-free concept scores.

`feature_stats` encodes every stored activation with a Dictionary, batch by batch (never a Python
loop over tokens or features), and keeps for every feature at once: activation density, maximum
and mean activation, its top-k activating tokens, a uniform random sample of its activating tokens
(for the lower quantiles and histograms), and (in a second pass, `concept_scores`) agreement with labelled concepts.

Concepts come from what the store recorded for each token: its identity (every token seen, up
to the 20,000 most frequent), its word's part of speech (coarse and fine Brown tags), the document's genre, and simple
token classes (capitalised, digit, punctuation, word start, apostrophe). `concept_scores` gives
each feature its best concept by the Matthews correlation (MCC, chance-corrected) of "feature
active" against "concept present", with precision, recall and F1. It shows whether a feature lines
up with one of these labels; it cannot credit
a feature for a concept outside the list (a topic, a syntactic position), so it is a lower bound
on interpretability, and the same bound for every method.
"""
from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.activations.corpus import COARSE_TAGS, NO_TAG, coarse_tag
from helpers.dictionaries.dictionary import device_of
from helpers.results import Estimate, Result, Table

TOKEN_CLASSES = ["capitalised", "digit", "punctuation", "word start", "apostrophe"]


def token_classes(tokenizer) -> np.ndarray:
    """Multi-hot [vocab, len(TOKEN_CLASSES)] of each token id's classes."""
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    out = np.zeros((vocab, len(TOKEN_CLASSES)), dtype=bool)
    punct = set(string.punctuation) | set("“”‘’—–")
    for i, t in enumerate(texts):
        s = t.strip()
        out[i] = [bool(s) and s[0].isupper(), bool(s) and any(c.isdigit() for c in s),
                  bool(s) and all(c in punct for c in s), t[:1] in (" ", "\n"), "'" in t or "’" in t]
    return out


@dataclass
class Concepts:
    """Named binary labels of stored tokens, computed from their token id, POS tag and genre."""

    names: list[str]
    token_ids: np.ndarray        # concept index of each of the top tokens
    token_lut: np.ndarray        # [vocab] -> concept index or -1
    coarse_lut: np.ndarray       # [256] fine tag -> concept index of its coarse tag, or -1
    fine_lut: np.ndarray         # [256] fine tag -> concept index, or -1
    genre_offset: int
    n_genres: int
    class_offset: int
    classes: np.ndarray          # [vocab, n_classes]

    @classmethod
    def from_store(cls, store, tokenizer, n_tokens: int = 20_000, min_tag_share: float = 0.002) -> "Concepts":
        meta = store.tokens()
        tags, genres = store.manifest.get("tags", []), store.manifest.get("genres", [])
        names = []
        counts = np.bincount(meta["token"], minlength=len(tokenizer))
        top = np.argsort(-counts)[:n_tokens]
        top = top[counts[top] > 0]
        token_lut = np.full(len(tokenizer), -1, dtype=np.int64)
        for tid in top:
            token_lut[tid] = len(names)
            names.append(f"token {tokenizer.decode([int(tid)])!r}")
        coarse_lut = np.full(256, -1, dtype=np.int64)
        fine_lut = np.full(256, -1, dtype=np.int64)
        if tags:
            base = len(names)
            names += [f"POS {c}" for c in COARSE_TAGS]
            for i, t in enumerate(tags):
                coarse_lut[i] = base + COARSE_TAGS.index(coarse_tag(t))
            tag_counts = np.bincount(meta["pos"][meta["pos"] != NO_TAG], minlength=256)
            for i, t in enumerate(tags):
                if tag_counts[i] >= min_tag_share * len(meta):
                    fine_lut[i] = len(names)
                    names.append(f"tag {t}")
        genre_offset = len(names)
        names += [f"genre {g}" for g in genres]
        class_offset = len(names)
        names += [f"class {c}" for c in TOKEN_CLASSES]
        return cls(names, top, token_lut, coarse_lut, fine_lut, genre_offset, len(genres), class_offset,
                   token_classes(tokenizer))

    def __len__(self):
        return len(self.names)

    @property
    def n_token_concepts(self) -> int:
        """Token-identity concepts come first: columns 0 .. n_token_concepts-1."""
        return len(self.token_ids)

    def token_column(self, meta: np.ndarray) -> np.ndarray:
        """Each token's token-identity concept column, or -1."""
        return self.token_lut[meta["token"]]

    def label_multi_hot(self, meta: np.ndarray) -> torch.Tensor:
        """[n_tokens, n_concepts - n_token_concepts] 0/1 labels of the other concepts."""
        n, off = len(meta), self.n_token_concepts
        m = torch.zeros(n, len(self.names) - off)
        rows = np.arange(n)

        def put(cols):
            ok = cols >= 0
            m[torch.as_tensor(rows[ok]), torch.as_tensor(cols[ok] - off)] = 1.0

        put(self.coarse_lut[meta["pos"]])
        put(self.fine_lut[meta["pos"]])
        if self.n_genres:
            g = meta["genre"].astype(np.int64)
            put(np.where(g < self.n_genres, self.genre_offset + g, -1))
        cls_ = torch.as_tensor(self.classes[meta["token"]], dtype=torch.float32)
        m[:, self.class_offset - off:self.class_offset - off + cls_.shape[1]] = cls_
        return m

    def multi_hot(self, meta: np.ndarray) -> torch.Tensor:
        """[n_tokens, n_concepts] float 0/1 labels of a slice of store.tokens()."""
        tok = torch.zeros(len(meta), self.n_token_concepts)
        col = self.token_column(meta)
        ok = col >= 0
        tok[torch.as_tensor(np.flatnonzero(ok)), torch.as_tensor(col[ok])] = 1.0
        return torch.cat([tok, self.label_multi_hot(meta)], dim=1)


@dataclass
class FeatureStats:
    dictionary_name: str
    hook: str
    n_tokens: int
    density: torch.Tensor      # [F] share of tokens with code > 0
    max_act: torch.Tensor      # [F]
    mean_act: torch.Tensor     # [F] mean over the tokens where active
    top_acts: torch.Tensor     # [F, k] descending
    top_idx: torch.Tensor      # [F, k] global token index (-1: none)
    sample_acts: torch.Tensor  # [F, S] a uniform sample of activating tokens
    sample_idx: torch.Tensor   # [F, S] (-1: none)
    active_counts: torch.Tensor  # [F] number of active tokens

    @property
    def n_features(self) -> int:
        return len(self.density)


@torch.no_grad()
def feature_stats(dictionary, store, hook: str | None = None,
                  k: int = 20, sample: int = 128, batch_size: int = 4096, max_tokens: int | None = None,
                  seed: int = 0, progress: bool = True) -> FeatureStats:
    """Statistics of every feature of `dictionary` over the store (one pass, in store order), computed
    on the dictionary's device and returned on the CPU."""
    hook = dictionary.check_store(store, hook)
    device = device_of(dictionary)
    F = dictionary.n_features
    n = store.n_tokens if max_tokens is None else min(max_tokens, store.n_tokens)
    count = torch.zeros(F, dtype=torch.int64, device=device)
    total = torch.zeros(F, dtype=torch.float64, device=device)
    mx = torch.zeros(F, device=device)
    top_a = torch.full((F, k), -1.0, device=device)
    top_i = torch.full((F, k), -1, dtype=torch.int64, device=device)
    smp_p = torch.full((F, sample), -1.0, device=device)
    smp_a = torch.zeros(F, sample, device=device)
    smp_i = torch.full((F, sample), -1, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)

    bar = tqdm(total=n, unit="tok", unit_scale=True, desc=f"feature stats ({F} features)", disable=not progress)
    done = 0
    for x, idx in store.iter_batches(hook, batch_size, shuffle=False, return_index=True):
        if done >= n:
            break
        x, idx = x[: n - done], idx[: n - done]
        idx = idx.to(device)
        c = dictionary.encode(x.to(device)).float()           # [B, F]
        active = c > 0
        count += active.sum(0)
        total += c.sum(0, dtype=torch.float64)
        mx = torch.maximum(mx, c.max(0).values)
        ct = c.T                                                # [F, B]
        cand_a = torch.cat([top_a, ct], 1)
        cand_i = torch.cat([top_i, idx.expand(F, -1)], 1)
        top_a, pos = cand_a.topk(k, dim=1)
        top_i = cand_i.gather(1, pos)
        prio = torch.where(active.T, torch.rand(ct.shape, generator=gen, device=device), torch.full_like(ct, -1.0))
        cand_p = torch.cat([smp_p, prio], 1)
        smp_p, pos = cand_p.topk(sample, dim=1)
        smp_a = torch.cat([smp_a, ct], 1).gather(1, pos)
        smp_i = torch.cat([smp_i, idx.expand(F, -1)], 1).gather(1, pos)
        done += len(x)
        bar.update(len(x))
    bar.close()
    top_i = torch.where(top_a > 0, top_i, torch.full_like(top_i, -1))
    smp_i = torch.where(smp_p >= 0, smp_i, torch.full_like(smp_i, -1))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return FeatureStats(dictionary.name, hook, done, cpu(count.double() / max(done, 1)).float(), cpu(mx),
                        cpu((total / count.clamp_min(1)).float()), cpu(top_a.clamp_min(0)), cpu(top_i),
                        cpu(torch.where(smp_i >= 0, smp_a, torch.zeros_like(smp_a))), cpu(smp_i), cpu(count))


class TopTokens:
    """Running exact per-feature top-`k_max` tokens by code, fed batch by batch (`add`): one home for
    the rule of `top_tokens` (a store) and `top_tokens_of` (a tensor of codes). Batches are gathered
    into chunks of about `chunk_elements` codes; each chunk's top k is selected unsorted and merged
    unsorted, and `result` sorts once: by code, equal codes by token index (the lower first). Where
    more tokens share the k_max-th code than fit, which of them are kept is `torch.topk`'s choice."""

    def __init__(self, n_features: int, k_max: int, device="cpu", chunk_elements: int = 2 ** 25):
        self.k_max = k_max
        self.chunk = max(1, chunk_elements // max(1, n_features))      # tokens a chunk holds
        self.v = torch.zeros(n_features, 0, device=device)
        self.i = torch.zeros(n_features, 0, dtype=torch.int64, device=device)
        self.n_pos = torch.zeros(n_features, dtype=torch.int64, device=device)
        self._codes, self._idx, self._held = [], [], 0

    def add(self, c: torch.Tensor, idx: torch.Tensor):
        """Codes `c` [B, F] (unscored tokens already zeroed) of the tokens `idx` [B]."""
        self.n_pos += (c > 0).sum(0)
        self._codes.append(c)
        self._idx.append(idx.to(c.device))
        self._held += len(c)
        if self._held >= self.chunk:
            self._merge()

    def _merge(self):
        if not self._codes:
            return
        c = torch.cat(self._codes).T.contiguous()                       # [F, chunk]: each feature's codes contiguous
        idx = torch.cat(self._idx)
        self._codes, self._idx, self._held = [], [], 0
        bv, bi = c.topk(min(self.k_max, c.shape[1]), dim=1, sorted=False)
        cand_v, cand_i = torch.cat([self.v, bv], 1), torch.cat([self.i, idx[bi]], 1)
        if cand_v.shape[1] > self.k_max:
            cand_v, pos = cand_v.topk(self.k_max, dim=1, sorted=False)
            cand_i = cand_i.gather(1, pos)
        self.v, self.i = cand_v, cand_i

    def result(self):
        """(values [F, k_max], descending, 0 where not positive; token indices [F, k_max], -1 where not
        positive; positive counts [F]), on the CPU."""
        self._merge()
        v, i = self.v.clamp_min(0), self.i
        if v.shape[1] < self.k_max:                                      # fewer tokens than k_max
            v = torch.nn.functional.pad(v, (0, self.k_max - v.shape[1]))
            i = torch.nn.functional.pad(i, (0, self.k_max - i.shape[1]), value=-1)
        pos = i.sort(dim=1, stable=True).indices                        # equal codes: the lower token index first
        v, i = v.gather(1, pos), i.gather(1, pos)
        pos = v.sort(dim=1, descending=True, stable=True).indices
        v, i = v.gather(1, pos), i.gather(1, pos)
        return v.cpu(), torch.where(v > 0, i, torch.full_like(i, -1)).cpu(), self.n_pos.cpu()


@torch.no_grad()
def top_tokens(dictionary, store, hook: str, n_tokens: int, scored: np.ndarray, k_max: int,
               batch_size: int = 4096, progress: bool = True):
    """Exact per-feature top-`k_max` scored tokens by code (the first `n_tokens` of the store): values [F, k_max] (descending, 0 where
    fewer tokens are positive), token indices [F, k_max] (-1: none) and the number of scored tokens
    with a positive code [F]. Unscored tokens (`scored` False) never count."""

    device = device_of(dictionary)
    F = dictionary.n_features
    top = TopTokens(F, k_max, device)
    ok_all = torch.as_tensor(np.asarray(scored[:n_tokens], bool))
    done = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"top tokens of {F} features", disable=not progress)
    for x, idx in store.iter_batches(hook, batch_size, shuffle=False, return_index=True):
        if done >= n_tokens:
            break
        x, idx = x[: n_tokens - done], idx[: n_tokens - done]
        ok = ok_all[idx].to(device)
        top.add(dictionary.encode(x.to(device)).float() * ok[:, None], idx)
        done += len(x)
        bar.update(len(x))
    bar.close()
    return top.result()


@torch.no_grad()
def top_tokens_of(codes, k_max: int, scored=None, batch_size: int = 4096):
    """`top_tokens` of a tensor or array of codes [N, F] (booleans count as codes 1/0), kept on its
    device and read in batches of `batch_size` rows: values [F, k_max], token indices [F, k_max] (-1:
    none), positive scored tokens per feature [F]."""
    codes = torch.as_tensor(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [tokens, features], got shape {tuple(codes.shape)}")
    n = len(codes)
    ok_all = torch.ones(n, dtype=torch.bool) if scored is None else torch.as_tensor(scored).cpu().bool()
    if len(ok_all) != n:
        raise ValueError(f"scored has {len(ok_all)} entries for {n} tokens")
    top = TopTokens(codes.shape[1], k_max, codes.device)
    for a in range(0, n, batch_size):
        idx = torch.arange(a, min(n, a + batch_size))
        top.add(codes[a:a + batch_size].float() * ok_all[idx].to(codes.device)[:, None], idx)
    return top.result()


def activity_thresholds(dictionary, store, hook: str, n_tokens: int, max_density: float = 0.005,
                        scored=None) -> torch.Tensor:
    """Per feature, the code above which it counts as active: 0 for features positive on at most
    `max_density` of the (scored) tokens, else its exact k-th largest code, k = ceil(max_density x
    tokens), so that exactly its top k tokens count (ties aside). One rule for every method, so that a
    dense direction is judged on its strongest activations, as a sparse feature is on all of its own."""
    scored = np.ones(n_tokens, bool) if scored is None else np.asarray(scored[:n_tokens], bool)
    k = max(1, int(np.ceil(max_density * scored.sum())))
    vals, _, n_pos = top_tokens(dictionary, store, hook, n_tokens, scored, k, progress=False)
    return torch.where(n_pos > k, vals[:, -1], torch.zeros(len(vals)))


@torch.no_grad()
def concept_scores(dictionary, store, stats: FeatureStats, concepts: Concepts, max_density: float = 0.005,
                   batch_size: int = 4096, progress: bool = True, massive=None) -> "ConceptScores":
    """Each feature's best concept by two scores, over the tokens of `stats` (a `ConceptScores`):
    * ``mcc``: the Matthews correlation of "feature active" with "concept present" (activity by
      `activity_thresholds`: exact top 0.5%), with precision, recall and F1 at that concept. Chance-corrected: a
      feature that fires everywhere, or at random, scores about 0 with every concept.
    * ``corr``: the Pearson correlation of the feature's activation (its code, zeros included) with
      the concept's 0/1 indicator: the formula of the paper's autointerp score (correlation of
      simulated with true activations), over all tokens rather than sampled excerpts, for the
      explanation "fires on <concept>" and a simulator that follows it exactly. It weighs strong
      activations more than weak ones and needs no activity threshold.

    massive: optional [n_tokens] bool flags of the massive tokens (helpers.activations.massive.flags); if any is
    set, the result's `ordinary` holds the same scores over the other tokens (one pass for both).

    The best concept is chosen and scored on the same tokens: right for describing a feature, biased
    for comparing methods (sparser features match rare concepts by chance). Compare methods with
    helpers.evals.heldout, which holds the choice out and matches sparsity.
    """
    hook = dictionary.check_store(store, stats.hook)
    device = device_of(dictionary)
    tau = activity_thresholds(dictionary, store, hook, stats.n_tokens, max_density).to(device)
    meta_all = store.tokens()[: stats.n_tokens]
    F, C, T = stats.n_features, len(concepts), concepts.n_token_concepts
    split = massive is not None and bool(np.asarray(massive)[: stats.n_tokens].any())

    def accumulators():
        z = lambda *s: torch.zeros(*s, device=device, dtype=torch.float64)  # noqa: E731
        return {"joint": z(F, C), "mass": z(F, C), "a_sum": z(F), "a_sq": z(F), "active_n": z(F), "totals": z(C), "n": 0}

    acc = {"all": accumulators()}
    if split:
        acc["massive"] = accumulators()
        flags_all = torch.as_tensor(np.asarray(massive)[: stats.n_tokens])

    def add(a, codes, active, col, ok, m):
        # token identity is one-hot: scatter-add instead of a matmul with a [B, vocab] matrix
        a["joint"][:, :T].index_add_(1, col[ok], active[ok].T)
        a["mass"][:, :T].index_add_(1, col[ok], codes[ok].T)
        a["totals"][:T].index_add_(0, col[ok], torch.ones(int(ok.sum()), device=device, dtype=torch.float64))
        a["joint"][:, T:] += active.T @ m
        a["mass"][:, T:] += codes.T @ m
        a["a_sum"] += codes.sum(0)
        a["a_sq"] += (codes * codes).sum(0)
        a["active_n"] += active.sum(0)
        a["totals"][T:] += m.sum(0)
        a["n"] += len(codes)

    bar = tqdm(total=stats.n_tokens, unit="tok", unit_scale=True, desc="concept scores", disable=not progress)
    done = 0
    for x, idx in store.iter_batches(hook, batch_size, shuffle=False, return_index=True):
        if done >= stats.n_tokens:
            break
        x, idx = x[: stats.n_tokens - done], idx[: stats.n_tokens - done]
        codes = dictionary.encode(x.to(device)).double()
        active = (codes > tau).double()
        meta = meta_all[idx.numpy()]
        col = torch.as_tensor(concepts.token_column(meta), device=device)
        ok = col >= 0
        m = concepts.label_multi_hot(meta).to(device).double()
        add(acc["all"], codes, active, col, ok, m)
        if split:
            f = flags_all[idx].to(device)
            if f.any():
                add(acc["massive"], codes[f], active[f], col[f], ok[f], m[f])
        done += len(x)
        bar.update(len(x))
    bar.close()
    out = _best_concepts(acc["all"], concepts, tau, dictionary.name)
    if split:
        ordinary = {k: (v - acc["massive"][k]) for k, v in acc["all"].items()}
        out.ordinary = _best_concepts(ordinary, concepts, tau, dictionary.name)
    return out


def _best_concepts(a: dict, concepts: Concepts, tau: torch.Tensor, name: str = "", chunk: int = 32) -> "ConceptScores":
    """Scores from the accumulated counts of `concept_scores` (one token set). The [features x
    concepts] tables are scored a few feature rows at a time, so that the temporaries stay in cache."""
    n = float(a["n"])
    active_n, totals, a_sum, a_sq = a["active_n"], a["totals"], a["a_sum"], a["a_sq"]
    F = len(active_n)
    var_a = (n * a_sq - a_sum ** 2).clamp_min(0)
    var_c = (n * totals - totals ** 2).clamp_min(0)
    # a constant feature (or concept) has no correlation; guard against rounding noise over ~0
    flat_a = var_a <= 1e-9 * n * a_sq.clamp_min(1e-30)
    flat_c = var_c <= 0
    parts = []  # per chunk: (best MCC, its concept, best correlation, its concept)
    for s in range(0, F, chunk):
        r = slice(s, min(F, s + chunk))
        tp = a["joint"][r]
        fp = active_n[r, None] - tp
        fn = totals[None, :] - tp
        tn = n - tp - fp - fn
        mcc = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).clamp_min(1e-12).sqrt()
        den = (var_a[r, None] * var_c[None, :]).sqrt()
        corr = torch.where(flat_a[r, None] | flat_c[None, :], torch.zeros_like(den),
                           (n * a["mass"][r] - a_sum[r, None] * totals[None, :]) / den.clamp_min(1e-30)).clamp(-1, 1)
        parts.append((*mcc.max(1), *corr.max(1)))
    mcc_b, best, corr_b, corr_best = (torch.cat(t) for t in zip(*parts))
    rows = torch.arange(F, device=active_n.device)
    tp_b, t_b = a["joint"][rows, best], totals[best]
    precision = tp_b / active_n.clamp_min(1)
    recall = tp_b / t_b.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    cpu = lambda t: t.float().cpu()  # noqa: E731
    return ConceptScores(name, [concepts.names[i] for i in best.tolist()], best.cpu(), cpu(mcc_b), cpu(precision),
                         cpu(recall), cpu(f1), cpu(corr_b), [concepts.names[i] for i in corr_best.tolist()],
                         cpu(active_n), tau.cpu(), int(n))


def summarise(values: torch.Tensor, n_boot: int = 1000, seed: int = 0, stat=torch.median) -> dict:
    """A statistic of per-feature scores with a bootstrap 95% confidence interval over features."""
    v = values.float().flatten()
    if len(v) == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    g = torch.Generator().manual_seed(seed)
    boots = torch.stack([stat(v[torch.randint(len(v), (len(v),), generator=g)]) for _ in range(n_boot)])
    return {"value": float(stat(v)), "low": float(boots.quantile(0.025)), "high": float(boots.quantile(0.975)),
            "n": len(v)}


MIN_ACTIVE = 5  # a feature active on fewer tokens than this (in the scored token set) is not scored


@dataclass(eq=False)
class ConceptScores(Result):
    """Each feature's best concept, chosen and scored on the same tokens (`concept_scores`): per feature
    [F], the concept with the highest MCC and its `mcc`, `precision`, `recall`, `f1`; the concept with
    the highest correlation of code and indicator (`corr_concept`) and that `corr`; the tokens it counts
    as active on (`active_counts`) and the code above which it does (`threshold`). `ordinary`: the
    same over the tokens that are not massive, where the scoring was given massive-token flags.
    Shows as its `dictionary_score` summary; `top(n)` lists the best-explained features. Reads like
    the dict it stands for too (``scores["mcc"]``), for code written against that."""

    name: str
    concept: list
    concept_index: torch.Tensor
    mcc: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    corr: torch.Tensor
    corr_concept: list
    active_counts: torch.Tensor
    threshold: torch.Tensor
    n_tokens: int
    ordinary: "ConceptScores | None" = None

    FIELDS = ("concept", "concept_index", "mcc", "precision", "recall", "f1", "corr", "corr_concept",
              "active_counts", "threshold", "n_tokens")

    def __getitem__(self, key: str):
        if key == "ordinary" and self.ordinary is not None:
            return self.ordinary
        if key not in self.FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.FIELDS or (key == "ordinary" and self.ordinary is not None)

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptScores":
        d = {k: v for k, v in d.items() if k != "type"}
        for k in ("concept_index", "active_counts"):
            d[k] = torch.as_tensor(d[k], dtype=torch.int64 if k == "concept_index" else torch.float32)
        for k in ("mcc", "precision", "recall", "f1", "corr", "threshold"):
            d[k] = torch.as_tensor(d[k], dtype=torch.float32)
        if d.get("ordinary") is not None:
            d["ordinary"] = cls.from_dict(d["ordinary"])
        return cls(**d)

    @property
    def n_features(self) -> int:
        return len(self.mcc)

    @property
    def judged(self) -> "ConceptScores":
        """The scores over ordinary tokens where there are such, else these."""
        return self.ordinary if self.ordinary is not None else self

    def ranked(self, key: str = "mcc", min_active: int = MIN_ACTIVE) -> torch.Tensor:
        """Feature indices by descending score (`ranked`)."""
        return ranked(self, key, min_active)

    def best_for(self, prefix: str, min_active: int = MIN_ACTIVE) -> int | None:
        """The feature (active on at least `min_active` tokens) with the highest MCC among those whose best
        concept starts with `prefix` (e.g. "POS", "token", "class apostrophe"), or None."""
        idx = [i for i, c in enumerate(self.concept) if c.startswith(prefix) and self.active_counts[i] >= min_active]
        return max(idx, key=lambda i: float(self.mcc[i])) if idx else None

    def sample(self, n: int, seed: int = 0, min_active: int = 10) -> list[int]:
        """`n` features active on at least `min_active` tokens, drawn at random (seeded): a fair sample,
        not the best-explained ones."""
        alive = (self.active_counts >= min_active).nonzero().flatten()
        g = torch.Generator().manual_seed(seed)
        return alive[torch.randperm(len(alive), generator=g)[:n]].tolist()

    def reading(self, f: int) -> str:
        """Feature `f`'s best concept in a sentence, from the measured numbers."""
        return (f"feature {f} best matches {self.concept[f]!r}: of the tokens where it is active, "
                f"{float(self.precision[f]):.0%} carry that label, and it is active on {float(self.recall[f]):.0%} "
                f"of the tokens that carry it (MCC {float(self.mcc[f]):.2f}).")

    def top(self, n: int = 10, stats: "FeatureStats | None" = None, min_active: int = MIN_ACTIVE) -> Table:
        """The `n` best-explained features (those active on fewer than `min_active` tokens last) as a
        table: concept, MCC, precision, recall, active tokens (and density, given the `stats`)."""
        rows = []
        for f in self.ranked(min_active=min_active)[:n].tolist():
            row = {"feature": f, "concept": self.concept[f], "MCC": float(self.mcc[f]),
                   "precision": float(self.precision[f]), "recall": float(self.recall[f]),
                   "active tokens": int(self.active_counts[f])}
            if stats is not None:
                row["density (%)"] = 100 * float(stats.density[f])
            rows.append(row)
        return Table(rows, title=f"{self.name}: best-explained features (in-sample)")

    def summary(self, min_active: int = MIN_ACTIVE, **kw) -> "ConceptSummary":
        """The median MCC and correlation over live features, with bootstrap intervals (`dictionary_score`)."""
        return ConceptSummary.of({self.name: self}, min_active=min_active, **kw)

    def rows(self) -> list[dict]:
        return self.summary().rows()

    def verdicts(self) -> list[str]:
        return self.summary().verdicts()


def ranked(scores, key: str = "mcc", min_active: int = MIN_ACTIVE) -> torch.Tensor:
    """Feature indices by descending best-concept score, the features active on fewer than
    `min_active` scored tokens last: a feature that fires almost only on massive tokens has a handful
    of ordinary ones, and a perfect but meaningless score on them."""
    alive = scores["active_counts"] >= min_active
    return torch.argsort(torch.where(alive, scores[key].float(), torch.full_like(scores[key].float(), -2.0)),
                         descending=True, stable=True)


@dataclass
class DictionaryScore(Result):
    """A dictionary's median best-concept score (`key`: mcc or corr) over its live features, with a
    bootstrap 95% interval over features, and how many features were left out as (nearly) dead."""

    name: str
    key: str
    median: Estimate
    n: int
    excluded: int

    @property
    def value(self) -> float:
        return self.median.value

    @property
    def low(self) -> float:
        return self.median.low

    @property
    def high(self) -> float:
        return self.median.high

    def __getitem__(self, key: str):
        """The numbers as the dict `summarise` gives ("value", "low", "high", "n", "excluded")."""
        if key not in ("value", "low", "high", "n", "excluded"):
            raise KeyError(key)
        return getattr(self, key)

    def rows(self) -> list[dict]:
        return [{"dictionary": self.name, f"median {self.key}": format(self.median, ".3f"), "features": self.n,
                 "left out as dead": self.excluded}]


def dictionary_score(scores, min_active: int = MIN_ACTIVE, key: str = "mcc", **kw) -> DictionaryScore:
    """Median best-concept score (`key`: "mcc" or "corr") over the features active on at least
    `min_active` tokens, with a bootstrap 95% CI; also how many features were left out as (nearly) dead."""
    if key not in ("mcc", "corr"):
        raise ValueError(f"key must be 'mcc' or 'corr', not {key!r}")
    alive = scores["active_counts"] >= min_active
    out = summarise(scores[key][alive], **kw)
    return DictionaryScore(getattr(scores, "name", ""), key, Estimate(out["value"], out["low"], out["high"]),
                           out["n"], int((~alive).sum()))


@dataclass
class ConceptSummary(Result):
    """In-sample concept scores of several dictionaries side by side: per dictionary the median
    best-concept MCC and correlation over its live features (`dictionary_score`)."""

    mcc: dict[str, DictionaryScore] = field(default_factory=dict)
    corr: dict[str, DictionaryScore] = field(default_factory=dict)

    @classmethod
    def of(cls, scores: dict, min_active: int = MIN_ACTIVE, **kw) -> "ConceptSummary":
        """The summary of {name: ConceptScores (or the dict of `concept_scores`)}."""
        mcc = {n: dictionary_score(s, min_active, "mcc", **kw) for n, s in scores.items()}
        corr = {n: dictionary_score(s, min_active, "corr", **kw) for n, s in scores.items()}
        for n in scores:
            mcc[n].name = corr[n].name = n
        return cls(mcc, corr)

    def __getitem__(self, name: str) -> DictionaryScore:
        return self.mcc[name]

    def rows(self) -> list[dict]:
        return [{"dictionary": n, "median best-concept MCC": format(m.median, ".3f"),
                 "median correlation": format(self.corr[n].median, ".3f"), "features scored": m.n,
                 "left out as dead": m.excluded} for n, m in self.mcc.items()]

    def verdicts(self) -> list[str]:
        if not self.mcc:
            return []
        best = max(self.mcc, key=lambda n: self.mcc[n].value)
        return [f"In-sample, {best} has the highest median best-concept MCC ({self.mcc[best].median}); "
                "the concept is chosen and scored on the same tokens, which favours sparse features: "
                "compare methods held out (helpers.evals.heldout)."]


@torch.no_grad()
def logit_effects(dictionary, model, features=None, k: int = 10) -> dict:
    """Each feature's direct effect on the logits: its direction through the final norm's weight
    and the unembedding. Returns top promoted and suppressed token ids and values [len, k]."""
    dirs = dictionary.directions if features is None else dictionary.directions[torch.as_tensor(features)]
    w_u = model.W_U.detach().float().cpu()
    gain = None
    for name, p in model.ln_final.named_parameters():
        if name.endswith("weight"):
            gain = p.detach().float().cpu()
    d = dirs.float().cpu() * (gain if gain is not None else 1.0)
    up_v, up_i, down_v, down_i = [], [], [], []
    for i in range(0, len(d), 512):
        logits = d[i:i + 512] @ w_u
        a = logits.topk(k, dim=-1)
        b = (-logits).topk(k, dim=-1)
        up_v.append(a.values), up_i.append(a.indices), down_v.append(-b.values), down_i.append(b.indices)
    return {"up_ids": torch.cat(up_i), "up": torch.cat(up_v), "down_ids": torch.cat(down_i), "down": torch.cat(down_v)}


@torch.no_grad()
def context_codes(dictionary, store, meta: np.ndarray, hook: str, index: int, feature: int,
                  before: int = 10, after: int = 3) -> tuple[np.ndarray, list[float]]:
    """Token ids around stored token `index` (within its context) and `feature`'s codes on them."""
    per_ctx = store.manifest["ctx_len"] - 1
    start = index // per_ctx * per_ctx
    rows = np.arange(max(start, index - before), min(start + per_ctx, index + after + 1))
    x = store.rows(hook, rows)
    codes = dictionary.encode(x.to(device_of(dictionary)))[:, feature]
    return meta["token"][rows], codes.float().cpu().tolist()


def feature_excerpts(dictionary, store, stats: FeatureStats, feature: int, tokenizer, meta=None,
                     n_top: int = 10, n_random: int = 5, seed: int = 0, before: int = 12, after: int = 3):
    """Excerpts for explain-simulate-score: the feature's top-activating contexts split into an
    explanation half and a held-out half, plus random held-out contexts.
    Returns (train_top, test_top, test_random), lists of (tokens as strings, activations)."""
    meta = store.tokens() if meta is None else meta
    top = [int(i) for i in stats.top_idx[feature] if i >= 0][:n_top]
    rng = np.random.default_rng([seed, feature])
    rand = rng.choice(stats.n_tokens, size=n_random, replace=False).tolist()

    def excerpt(i):
        ids, acts = context_codes(dictionary, store, meta, stats.hook, i, feature, before, after)
        return [tokenizer.decode([int(t)]) for t in ids], acts

    ex = [excerpt(i) for i in top]
    return ex[0::2], ex[1::2], [excerpt(i) for i in rand]


@torch.no_grad()
def describe_features(dictionary, store, features, tokenizer, hook: str | None = None, k: int = 20,
                      max_tokens: int = 100_000, n_tokens: int = 3) -> dict[int, str]:
    """A short description of each of a few `features`: the tokens its top-k activations (over the
    first `max_tokens` stored tokens) fall on most often, e.g. "' she' ×9, ' her' ×4"; "(1st)" marks a
    context's first token, where residual streams are unusually large. One pass over (about)
    `max_tokens` tokens, keeping only those features' codes; for labelling graphs, not for scoring."""

    hook = dictionary.check_store(store, hook)
    feats = torch.as_tensor(list(features), dtype=torch.int64)
    if len(feats) == 0:
        return {}
    if int(feats.max()) >= dictionary.n_features or int(feats.min()) < 0:
        raise ValueError(f"features must lie in 0..{dictionary.n_features - 1}")
    top_a = torch.full((len(feats), k), -1.0)
    top_i = torch.full((len(feats), k), -1, dtype=torch.int64)
    done = 0
    for x, idx in store.iter_batches(hook, 4096, shuffle=False, return_index=True):
        if done >= max_tokens:
            break
        c = dictionary.encode(x.to(device_of(dictionary))).float().cpu()[:, feats].T   # [f, B]
        a = torch.cat([top_a, c], 1)
        i = torch.cat([top_i, idx.expand(len(feats), -1)], 1)
        top_a, pos = a.topk(k, dim=1)
        top_i = i.gather(1, pos)
        done += len(x)
    meta = store.tokens()
    first = np.r_[True, meta["ctx"][1:] != meta["ctx"][:-1]]  # a context's first token after BOS
    out = {}
    for row, f in enumerate(feats.tolist()):
        idx = [int(j) for j, v in zip(top_i[row], top_a[row]) if j >= 0 and v > 0]
        common = Counter(tokenizer.decode([int(meta["token"][j])]) + (" (1st)" if first[j] else "")
                         for j in idx).most_common(n_tokens)
        out[f] = ", ".join(f"{t!r} ×{n}" for t, n in common) if common else "(never active)"
    return out


def top_token_share(top_idx, token_ids, n: int = 20) -> np.ndarray:
    """Per feature, the share of its top-`n` activating tokens (`top_idx` [F, k] token indices, -1
    padding, as `FeatureStats.top_idx` holds them) that are one token: its most frequent token identity
    among them (`token_ids` [N], each token index's id). 1: a token feature; near 1/n: a jumble. NaN for
    a feature with no top token."""
    idx = np.asarray(top_idx)[:, :n]
    ids = np.asarray(token_ids)
    out = np.full(len(idx), np.nan)
    for f, row in enumerate(idx):
        row = row[row >= 0]
        if len(row):
            out[f] = np.unique(ids[row], return_counts=True)[1].max() / len(row)
    return out
