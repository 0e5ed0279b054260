"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench's
``absorption_first_letter`` eval), on the tokens of an activation store.

**Data.** A token is a *word token* when it is a space-prefixed alphabetic token of at least two
letters (``" house"``; not ``" a"`` or ``" I"``) that ends its word (the next token of its context does not continue it with a letter); its label is its
first letter. Given a massive-activation rule, massive tokens are left out. Word tokens are split by
context into train and test (`letter_data`).

**Ground-truth probes.** For each letter with at least `min_count` train tokens, a logistic regression
"starts with L" vs the other word tokens, on the raw residual (fitted on standardised inputs and mapped
back, so its weight vector is a direction in activation space); its test F1 decides whether the letter
is evaluated (F1 > `min_probe_f1`, 0.6 as in SAEBench).

**Main latents and splitting (SAEBench's rule).** On the train word tokens, the dictionary's latents are
ranked by (mean code on L-tokens - mean code on other word tokens); a logistic regression is fitted on
the top k for k = 1..`max_k` and scored by test F1; k grows while F1 rises by more than `f1_jump`
(0.03). The latents of the last k kept are the *main* latents; their number is ``num_split_features``.

**Absorption (SAEBench's definitions), on the test tokens where the probe is right (true letter L, probe
score > 0, "probe true positives").** With p the unit probe direction, a latent's *projection* is its
code times (its decoder row · p), the token's is (x - bias)·p (bias: the dictionary's decode of zero codes):

* *full absorption*: no main latent fires, the latent with the largest projection has cosine with p of
  at least 0.025, the token's projection is positive, and that latent carries at least 0.4 of it;
  ``full_absorption_rate`` = full absorptions / probe true positives (SAEBench's "Absorption" score);
* *absorption fraction*: the share of the token's projection not carried by the main latents that the
  (at most 3) largest-projecting other latents with cosine >= 0.1 carry, 0 when they carry less than 0.4
  of the projection or the main latents carry all of it, 1 when the main latents carry none;
  ``mean_absorption_fraction`` is its mean over probe true positives;
* ``main_recall``: the share of probe true positives on which some main latent fires.

`run` and `evaluate_layer` return an `Absorption` result: one `LetterAbsorption` per (dictionary,
letter) and one `MethodAbsorption` per dictionary (means over the included letters, with intervals over
letters); it shows the per-dictionary table, says its verdicts and writes SAEBench's JSON.

Deviations from SAEBench: tokens in running Brown text instead of single vocabulary words in an ICL
prompt (``"{word} has the first letter:"``); one-vs-rest scikit-learn probes instead of one 26-way
probe; latents ranked by mean difference instead of an L1-regularised probe's weights; projections use
the decoder row as it is (SAEBench's code assumes unit-norm rows: act × cosine), and are taken
relative to the dictionary's bias.
"""
from __future__ import annotations

import statistics
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.dictionaries.baselines import is_session, layer_eval_inputs, write_saebench
from helpers.dictionaries.dictionary import device_of, encode_batched
from helpers.evals.features import summarise
from helpers.results import Estimate, Result

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8
FULL_COS = 0.025          # full absorption: cosine of the top-projecting latent with the probe
FRACTION_COS = 0.1        # absorption fraction: cosine of a candidate absorbing latent with the probe
PROJECTION_SHARE = 0.4    # both: share of the probe projection the absorbing latent(s) must carry
MAX_ABSORBERS = 3         # absorption fraction: absorbing latents considered together


class AbsorptionError(ValueError):
    """The evaluation cannot run as asked."""


def word_letters(tokens: np.ndarray, ctx: np.ndarray, decode, min_letters: int = 2) -> np.ndarray:
    """[N] str: the first letter (lower case) of each row that is a whole space-prefixed alphabetic
    word token of at least `min_letters` letters (one-letter words such as " a" and " I" would make
    "starts with a" mostly "is the article"), '' elsewhere. `decode(token_id) -> str`; `tokens` and
    `ctx` in store order (a row's successor in the same context is the next token)."""
    tokens, ctx = np.asarray(tokens), np.asarray(ctx)
    strings = {int(t): decode(int(t)) for t in np.unique(tokens)}
    word = {t: len(s) >= 1 + min_letters and s[0] == " " and s[1:].isascii() and s[1:].isalpha() for t, s in strings.items()}
    cont = {t: len(s) > 0 and s[0].isalpha() for t, s in strings.items()}  # continues the previous word
    out = np.full(len(tokens), "", dtype="<U1")
    for i, t in enumerate(tokens.tolist()):
        if not word[t]:
            continue
        if i + 1 >= len(tokens) or ctx[i + 1] != ctx[i] or cont[int(tokens[i + 1])]:
            continue  # the word goes on in the next token, or we cannot see where it ends
        out[i] = strings[t][1].lower()
    return out


@dataclass
class LetterData:
    x_train: torch.Tensor      # [n, d] word tokens' activations
    x_test: torch.Tensor
    letters_train: np.ndarray  # [n] first letters
    letters_test: np.ndarray
    groups_train: np.ndarray
    groups_test: np.ndarray


def split_letters(x: torch.Tensor, letters: np.ndarray, groups: np.ndarray, test_fraction: float = 0.3,
                  seed: int = 0) -> LetterData:
    """The labelled rows (letter != '') split by group: no group in both train and test."""
    from sklearn.model_selection import GroupShuffleSplit

    letters, groups = np.asarray(letters), np.asarray(groups)
    rows = np.flatnonzero(letters != "")
    if len(np.unique(groups[rows])) < 2:
        raise AbsorptionError("the word tokens come from fewer than 2 contexts: nothing to split")
    tr, te = next(GroupShuffleSplit(1, test_size=test_fraction, random_state=seed).split(rows, groups=groups[rows]))
    tr, te = rows[tr], rows[te]
    return LetterData(x[tr].float(), x[te].float(), letters[tr], letters[te], groups[tr], groups[te])


def letter_data(store, hook: str, tokenizer, massive=None, max_tokens: int = 100_000, test_fraction: float = 0.3,
                seed: int = 0) -> LetterData:
    """Word tokens of a store (its first `max_tokens`) at `hook`, ordinary ones only when a massive
    rule is given, split by context."""
    if hook not in store.hooks:
        raise AbsorptionError(f"{hook!r} is not in the store at {store.path}: it holds {store.hooks}")
    x = store.activations(hook, max_tokens=max_tokens).float()
    meta = store.tokens()[: len(x)]
    letters = word_letters(meta["token"], meta["ctx"], lambda t: tokenizer.decode([t]))
    if massive is not None:
        letters[massive.flags(x).numpy()] = ""
    return split_letters(x, letters, meta["ctx"], test_fraction, seed)


@dataclass
class LetterProbes:
    letters: list            # the letters probed
    weights: torch.Tensor    # [L, d]: decision = x @ w + b (activation space)
    bias: torch.Tensor       # [L]
    f1: np.ndarray           # [L] test F1
    n_train: np.ndarray      # [L] train tokens of the letter

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weights.T.double() + self.bias.double()


def fit_probes(data: LetterData, min_count: int = 20, C: float = 1.0, progress: bool = True) -> LetterProbes:
    """One-vs-rest logistic-regression probes "starts with L" on the raw residual, for each letter with
    at least `min_count` train and test tokens."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(data.x_train.double().numpy())
    xtr, xte = sc.transform(data.x_train.double().numpy()), sc.transform(data.x_test.double().numpy())
    letters = [c for c in LETTERS if (data.letters_train == c).sum() >= min_count
               and (data.letters_test == c).sum() >= max(1, min_count // 4)]
    if not letters:
        raise AbsorptionError(f"no letter has {min_count} train word tokens: use a larger store or a smaller min_count")
    W, B, F, N = [], [], [], []
    for c in tqdm(letters, desc="first-letter probes", disable=not progress):
        lr = LogisticRegression(C=C, max_iter=2000).fit(xtr, data.letters_train == c)
        w = lr.coef_[0] / sc.scale_
        W.append(w)
        B.append(lr.intercept_[0] - float(w @ sc.mean_))
        F.append(f1_score(data.letters_test == c, lr.predict(xte), zero_division=0))
        N.append(int((data.letters_train == c).sum()))
    return LetterProbes(letters, torch.tensor(np.array(W)), torch.tensor(B), np.array(F), np.array(N))


def _rows_and_bias(d):
    try:
        rows = d.decoder_rows.detach().float().cpu()
    except NotImplementedError:
        rows = d.directions.detach().float().cpu()
    try:
        with torch.no_grad():
            bias = d.decode(torch.zeros(1, d.n_features, device=device_of(d))).float().cpu()[0]
    except NotImplementedError:
        bias = torch.zeros(rows.shape[1])
    return rows, bias


def main_latents(ctr: np.ndarray, ytr: np.ndarray, cte: np.ndarray, yte: np.ndarray, max_k: int = 10,
                 f1_jump: float = 0.03) -> tuple[list, list]:
    """SAEBench's feature-splitting rule on k-sparse probes: (main latents, test F1 per k tried)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    diff = ctr[ytr].mean(0) - ctr[~ytr].mean(0)
    order = np.argsort(-diff, kind="stable")[:max_k]
    best, chosen, f1s = -np.inf, [], []
    for k in range(1, len(order) + 1):
        sel = order[:k]
        if ctr[:, sel].std(0).max() == 0:
            f1 = 0.0
        else:
            lr = LogisticRegression(max_iter=1000, class_weight="balanced").fit(ctr[:, sel], ytr)
            f1 = float(f1_score(yte, lr.predict(cte[:, sel]), zero_division=0))
        f1s.append(f1)
        if f1 > best + f1_jump:
            best, chosen = f1, [int(i) for i in sel]
        else:
            break
    return chosen, f1s


def evaluate(dictionary, data: LetterData, probes: LetterProbes, max_k: int = 10, f1_jump: float = 0.03,
             min_probe_f1: float = 0.6, progress: bool = True) -> list[dict]:
    """Absorption rows, one per probed letter, for one dictionary (see the module docstring). A row's
    ``included`` is False when its probe's test F1 is at most `min_probe_f1` or it has no probe true
    positive; summaries use included rows only."""

    ctr_t, cte_t = encode_batched(dictionary, data.x_train), encode_batched(dictionary, data.x_test)
    ctr, cte = ctr_t.numpy(), cte_t.numpy()
    rows_dec, bias = _rows_and_bias(dictionary)
    if rows_dec.shape[0] != cte.shape[1]:
        raise AbsorptionError(f"{dictionary.name}: {rows_dec.shape[0]} decoder rows for {cte.shape[1]} codes")
    scores = probes.scores(data.x_test).numpy()
    out = []
    for j, c in enumerate(tqdm(probes.letters, desc=f"absorption {dictionary.name}", disable=not progress)):
        ytr, yte = data.letters_train == c, data.letters_test == c
        main, f1s = main_latents(ctr, ytr, cte, yte, max_k, f1_jump)
        p = probes.weights[j].float() / probes.weights[j].float().norm()
        dots = rows_dec @ p                                                 # [F]: row · p
        cos = dots / rows_dec.norm(dim=-1).clamp_min(EPS)
        tp = np.flatnonzero(yte & (scores[:, j] > 0))
        acts = cte_t[tp]                                                    # [n, F]
        proj = acts * dots                                                  # each latent's projection
        total = ((data.x_test[tp] - bias) @ p).numpy()                      # the token's projection
        main_proj = proj[:, main].sum(1).numpy() if main else np.zeros(len(tp))
        main_fires = (acts[:, main] > EPS).any(1).numpy() if main else np.zeros(len(tp), bool)
        # absorption fraction
        cand = proj.clone()
        cand[:, main] = 0
        cand[:, cos < FRACTION_COS] = 0
        cand = cand.clamp_min(0)
        top_sum = cand.topk(min(MAX_ABSORBERS, cand.shape[1]), dim=1).values.sum(1).numpy() if len(tp) else np.zeros(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = top_sum / total
            frac = np.where((main_proj >= total) | ~(share >= PROJECTION_SHARE), 0.0,
                            np.where(main_proj <= 0, 1.0,
                                     np.clip(np.minimum(top_sum, total - main_proj)
                                             / (np.minimum(top_sum, total - main_proj) + main_proj), 0, 1)))
        # full absorption by a single latent
        if len(tp):
            top_val, top_idx = proj.max(1)
            top_val, top_idx = top_val.numpy(), top_idx.numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                full = (~main_fires & (cos.numpy()[top_idx] >= FULL_COS) & (total > 0)
                        & (top_val / total >= PROJECTION_SHARE))
            absorbers = np.unique(top_idx[full], return_counts=True)
            absorbers = [int(a) for a, _ in sorted(zip(*absorbers), key=lambda t: -t[1])][:5]
        else:
            full, absorbers = np.zeros(0, bool), []
        n = len(tp)
        out.append({"method": dictionary.name, "letter": c, "probe_f1": float(probes.f1[j]),
                    "included": bool(probes.f1[j] > min_probe_f1 and n > 0),
                    "num_probe_true_positives": n, "main_latents": main, "num_split_features": len(main),
                    "k_sparse_f1": f1s, "main_cos": [float(cos[i]) for i in main],
                    "main_recall": float(main_fires.mean()) if n else float("nan"),
                    "mean_absorption_fraction": float(frac.mean()) if n else float("nan"),
                    "num_full_absorption": int(full.sum()),
                    "full_absorption_rate": float(full.mean()) if n else float("nan"),
                    "top_absorbing_latents": absorbers})
    return out


INTERVAL_KEYS = ("mean_absorption_fraction_score", "mean_full_absorption_score")


def summary(rows: list[dict] | "Absorption", n_boot: int = 1000, seed: int = 0) -> dict:
    """{method: means over the included letters}: SAEBench's mean metrics plus main_recall, and for the
    two absorption scores a 95% interval over letters (bootstrap: `<score>_low`, `<score>_high`)."""
    rows = rows.as_rows() if isinstance(rows, Absorption) else rows

    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m and r["included"]]
        if not rs:  # no letter passed the probe-F1 bar: every mean is undefined
            nan = float("nan")
            out[m] = {"letters": 0, **{k: nan for k in (
                "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features",
                "mean_main_recall", *(f"{k}_{e}" for k in INTERVAL_KEYS for e in ("low", "high")))}}
            continue

        def sd(v):
            return statistics.stdev(v) if len(v) > 1 else 0.0

        frac = [r["mean_absorption_fraction"] for r in rs]
        full = [r["full_absorption_rate"] for r in rs]
        split = [r["num_split_features"] for r in rs]
        out[m] = {"letters": len(rs), "mean_absorption_fraction_score": statistics.mean(frac),
                  "mean_full_absorption_score": statistics.mean(full), "mean_num_split_features": statistics.mean(split),
                  "std_dev_absorption_fraction_score": sd(frac), "std_dev_full_absorption_score": sd(full),
                  "std_dev_num_split_features": sd(split),
                  "mean_main_recall": statistics.mean(r["main_recall"] for r in rs)}
        for key, v in zip(INTERVAL_KEYS, (frac, full)):
            ci = summarise(torch.tensor(v, dtype=torch.float64), n_boot=n_boot, seed=seed, stat=torch.mean)
            out[m][f"{key}_low"], out[m][f"{key}_high"] = ci["low"], ci["high"]
    return out


@dataclass
class LetterAbsorption(Result):
    """One dictionary's absorption on one letter (`evaluate`'s row; see the module docstring)."""

    method: str
    letter: str
    probe_f1: float
    included: bool
    num_probe_true_positives: int
    main_latents: list
    num_split_features: int
    k_sparse_f1: list
    main_cos: list
    main_recall: float
    mean_absorption_fraction: float
    num_full_absorption: int
    full_absorption_rate: float
    top_absorbing_latents: list
    layer: int | None = None

    @classmethod
    def from_row(cls, r: dict) -> "LetterAbsorption":
        return cls(**r)

    def as_row(self) -> dict:
        """The row as `evaluate` gives it (what `summary` and `saebench_json` read)."""
        row = asdict(self)
        if self.layer is None:
            del row["layer"]
        return row


@dataclass
class MethodAbsorption(Result):
    """One dictionary's absorption, averaged over the letters whose probe passed (`summary`): the two
    absorption scores with 95% intervals over letters (bootstrap), split features and main-latent recall."""

    method: str
    letters: int
    full_absorption: Estimate
    absorption_fraction: Estimate
    split_features: float
    main_recall: float
    std_full_absorption: float
    std_absorption_fraction: float
    std_split_features: float

    @classmethod
    def from_summary(cls, method: str, s: dict) -> "MethodAbsorption":
        full, frac = INTERVAL_KEYS[1], INTERVAL_KEYS[0]
        return cls(method, s["letters"], Estimate(s[full], s[f"{full}_low"], s[f"{full}_high"]),
                   Estimate(s[frac], s[f"{frac}_low"], s[f"{frac}_high"]), s["mean_num_split_features"],
                   s["mean_main_recall"], s["std_dev_full_absorption_score"], s["std_dev_absorption_fraction_score"],
                   s["std_dev_num_split_features"])

    def rows(self) -> list[dict]:
        return [{"method": self.method, "letters": self.letters,
                 "full absorption": format(self.full_absorption, ".3f"),
                 "absorption fraction": format(self.absorption_fraction, ".3f"),
                 "split features": self.split_features, "main recall": self.main_recall}]


@dataclass
class Absorption(Result):
    """The first-letter absorption eval of some dictionaries: `per_letter` (one `LetterAbsorption` per
    dictionary and letter) and `methods` (one `MethodAbsorption` per dictionary). Shows the
    per-dictionary means (intervals: bootstrap over letters) and says which dictionaries absorb most."""

    per_letter: list[LetterAbsorption] = field(default_factory=list)
    methods: list[MethodAbsorption] = field(default_factory=list)
    layer: int | None = None
    hook: str = ""

    @classmethod
    def from_rows(cls, rows: list[dict], layer: int | None = None, hook: str = "", n_boot: int = 1000,
                  seed: int = 0) -> "Absorption":
        """`evaluate`'s rows with their `summary`."""
        return cls([LetterAbsorption.from_row(r) for r in rows],
                   [MethodAbsorption.from_summary(m, s) for m, s in summary(rows, n_boot, seed).items()], layer, hook)

    def as_rows(self) -> list[dict]:
        return [r.as_row() for r in self.per_letter]

    def method(self, name: str) -> MethodAbsorption:
        try:
            return next(m for m in self.methods if m.method == name)
        except StopIteration:
            raise KeyError(f"no {name!r}: methods {[m.method for m in self.methods]}") from None

    @property
    def letters(self) -> dict[str, int]:
        """{method: the number of letters its means are over}."""
        return {m.method: m.letters for m in self.methods}

    def rows(self) -> list[dict]:
        return [row for m in self.methods for row in m.rows()]

    def verdicts(self) -> list[str]:
        where = "" if self.layer is None else f", layer {self.layer}"
        out = [f"First-letter absorption{where}: means over the letters whose probe has test F1 > 0.6; "
               "intervals from resampling the letters."]
        ms = [m for m in self.methods if m.letters]
        if ms:
            hi = max(ms, key=lambda m: m.full_absorption.value)
            lo = min(ms, key=lambda m: m.full_absorption.value)
            out.append(f"Full absorption is highest for {hi.method} ({hi.full_absorption}) and lowest for "
                       f"{lo.method} ({lo.full_absorption}).")
        out += [f"{m.method}: no letter has a usable probe." for m in self.methods if not m.letters]
        return out

    def saebench_json(self, path=None, model_name: str = "", hook: str | None = None, config: dict | None = None) -> dict:
        """SAEBench absorption_first_letter result objects, one per dictionary (the module's `saebench_json`)."""
        return saebench_json(self.as_rows(), path, model_name=model_name, hook=self.hook if hook is None else hook,
                             config=config)


def run(store, hook: str, dictionaries: dict, tokenizer, massive=None, max_tokens: int = 100_000,
        min_count: int = 20, max_k: int = 10, seed: int = 0, progress: bool = True) -> Absorption:
    """The first-letter absorption eval of every dictionary {name: Dictionary} at `hook` of `store`:
    word tokens (ordinary only, given a massive rule), one set of probes shared by all dictionaries."""
    for d in dictionaries.values():
        d.check_store(store, hook)
    data = letter_data(store, hook, tokenizer, massive, max_tokens, seed=seed)
    probes = fit_probes(data, min_count=min_count, progress=progress)
    rows = []
    for name, d in dictionaries.items():
        rows += [{**r, "method": name} for r in evaluate(d, data, probes, max_k=max_k, progress=progress)]
    return Absorption.from_rows(rows, hook=hook)


def saebench_json(rows: list[dict] | Absorption, path=None, model_name: str = "", hook: str = "",
                  config: dict | None = None) -> dict:
    """SAEBench ``absorption_first_letter`` result objects, one per dictionary {name: result}: the same
    keys (eval_result_metrics.mean.{mean_absorption_fraction_score, mean_full_absorption_score,
    mean_num_split_features, std_dev_*}, eval_result_details per letter with first_letter,
    mean_absorption_fraction, full_absorption_rate, num_full_absorption, num_probe_true_positives,
    num_split_features); main-latent recall and the rows go in ``eval_result_unstructured``. With
    `path` (a folder), each is written there as ``<name>_absorption.json``."""

    if isinstance(rows, Absorption):
        hook, rows = hook or rows.hook, rows.as_rows()
    summ = summary(rows)
    eval_id, now = str(uuid.uuid4()), int(datetime.now().timestamp() * 1000)
    out = {}
    for m, s in summ.items():
        rs = [r for r in rows if r["method"] == m and r["included"]]
        mean = {k: v for k, v in s.items() if k not in ("letters", "mean_main_recall")
                and not k.endswith(("_low", "_high"))}
        out[m] = {"eval_type_id": "absorption_first_letter",
                  "eval_config": {"model_name": model_name, "hook": hook, "f1_jump_threshold": 0.03,
                                  "max_k_value": max((len(r["k_sparse_f1"]) for r in rows), default=0),
                                  "min_GT_probe_f1": 0.6, **(config or {})},
                  "eval_id": eval_id, "datetime_epoch_millis": now,
                  "eval_result_metrics": {"mean": mean},
                  "eval_result_details": [{k: r[k] for k in ("mean_absorption_fraction", "full_absorption_rate",
                                                             "num_full_absorption", "num_probe_true_positives",
                                                             "num_split_features")} | {"first_letter": r["letter"]}
                                          for r in rs],
                  "sae_bench_commit_hash": None, "sae_lens_id": m, "sae_lens_release_id": "sae-workbook",
                  "sae_lens_version": None, "sae_cfg_dict": {"hook_name": hook, "model_name": model_name},
                  "eval_result_unstructured": {"letters_evaluated": s.get("letters", 0),
                                               "intervals_over_letters": {k: v for k, v in s.items()
                                                                          if k.endswith(("_low", "_high"))},
                                               "mean_main_recall": s.get("mean_main_recall"),
                                               "rows": [r for r in rows if r["method"] == m]}}
    if path is not None:
        write_saebench(out, path, "absorption")
    return out


def evaluate_layer(profile, store=None, sweep=None, tokenizer=None, layer: int | None = None, score_store=None,
                   dictionaries: dict | None = None, progress: bool = True, **kw) -> Absorption:
    """The absorption eval of notebook 04's dictionaries at `layer` (default: the SAE's layer): those
    of helpers.dictionaries.baselines.layer_dictionaries (or `dictionaries`), fitted on `store`, evaluated on the
    word tokens of `score_store` (default `store`), ordinary tokens only when the profile treats
    massive activations. `profile` may be a helpers.runs.session.Session, which supplies the stores,
    the sweep, the tokenizer and the dictionaries. Keyword arguments go to `run` (max_tokens,
    min_count, max_k)."""

    if is_session(profile):
        S = profile
        profile, store, tokenizer = S.profile, S.store, S.model.tokenizer if tokenizer is None else tokenizer
        score_store = S.score_store if score_store is None else score_store
        dictionaries = S.dictionaries(layer) if dictionaries is None else dictionaries
    layer, hook, dicts, rule = layer_eval_inputs(profile, store, sweep, layer, dictionaries, progress)
    kw.setdefault("max_tokens", profile.score_tokens)
    kw.setdefault("seed", profile.seed)
    result = run(score_store if score_store is not None else store, hook, dicts, tokenizer, massive=rule,
                 progress=progress, **kw)
    result.layer = layer
    for r in result.per_letter:
        r.layer = layer
    return result
