"""Sparse probing (Gurnee et al. 2023; SAEBench's ``sparse_probing``, Kantamneni et al. 2025): how well
k latents of a dictionary, picked by a simple rule, classify a labelled concept, beside probes on the raw
residual stream.

**Tasks.** Binary, token-level tasks from a Brown store's labels (`brown_tasks`):

* one per coarse POS class, *class vs every other tagged word token*. The fine Brown tags are grouped
  by helpers.activations.corpus.coarse_tag (the universal tag of a tag's first part: ``nn*``/``np*``/``nr*`` ->
  noun; ``vb*``/``be*``/``do*``/``hv*``/``md`` -> verb; ``jj*``/``od`` -> adjective; ``rb*``/``wrb``/
  ``ql*``/``rn``/``*`` -> adverb; ``in`` -> preposition (ADP); ``at``/``dt*``/``ap``/``abn``/``wdt``
  -> determiner; ``pp*``/``pn``/``wp*``/``ex`` -> pronoun). Tokens without a tag (BOS, whitespace)
  are left out;
* one per chosen genre, *genre vs the rest*, over all tokens except each context's BOS.

Each task takes positives and negatives in equal numbers (at most `max_per_class` of each, in train and
in test alike) and splits them **by group**: every context (every document, for genre tasks, whose label
is constant over a document) lies wholly in train or wholly in test. Given a massive-activation rule
(helpers.activations.massive), only ordinary tokens are used.

**Probes.** For each dictionary (anything with helpers.dictionaries.dictionary's interface) and task, the k latents
with the largest |mean code on positives - mean code on negatives| over the train split are kept
(k in `ks`), and a logistic regression (scikit-learn, on standardised codes) is fitted on them. Two
references on the raw residual: a full logistic-regression probe on all d_model standardised
dimensions (SAEBench's ``llm_test_accuracy``) and the difference-of-means direction, whose threshold is
a one-dimensional logistic regression fitted on train. The residual's own top-k dimensions (the same
mean-difference rule; SAEBench's ``llm_top_k``) are reported as method "residual".

**Results.** One row per (task, method, probe, k): test accuracy and F1 with 95% percentile intervals
from resampling test groups (contexts) with replacement. `run` and `evaluate_layer` return them as a
`SparseProbing` result (one `ProbeScore` per row) that shows the mean accuracy of every method at every
k and says how the dictionaries compare; `saebench_json` reshapes them into SAEBench's sparse_probing
result files.

Differences from SAEBench: its tasks are sequence-level (activations mean-pooled over a text,
datasets such as Amazon reviews, Europarl languages, bias-in-bios professions), ours are token-level
on Brown; it picks latents by signed mean difference and trains its own probes, we rank by the absolute
difference and use scikit-learn; we add F1, intervals and the difference-of-means reference (kept
under ``eval_result_unstructured``).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.activations.corpus import COARSE_TAGS, NO_TAG, load_brown
from helpers.dictionaries.baselines import is_session, layer_eval_inputs, write_saebench
from helpers.dictionaries.dictionary import encode_batched
from helpers.results import Estimate, Result, Table

KS = (1, 2, 5, 20)
# name -> helpers.activations.corpus.COARSE_TAGS entry
POS_CLASSES = {"noun": "NOUN", "verb": "VERB", "adjective": "ADJ", "adverb": "ADV", "preposition": "ADP",
               "determiner": "DET", "pronoun": "PRON"}
GENRES = ("news", "fiction", "learned", "religion")
RESIDUAL = "residual"


class ProbingError(ValueError):
    """A task or probe cannot be built as asked."""


@dataclass
class ProbeTask:
    """A balanced binary task: rows of the activation matrix for train and test, and their labels."""

    name: str
    kind: str                 # "pos" or "genre" (or anything for custom tasks)
    train: np.ndarray         # int row indices
    test: np.ndarray
    y_train: np.ndarray       # bool
    y_test: np.ndarray
    groups_train: np.ndarray  # group (context / document) of each row
    groups_test: np.ndarray
    info: dict = field(default_factory=dict)


def balanced_task(name: str, positive: np.ndarray, eligible: np.ndarray, groups: np.ndarray,
                  test_fraction: float = 0.3, max_per_class: int = 1000, min_per_class: int = 20,
                  seed: int = 0, kind: str = "") -> ProbeTask:
    """Split the eligible rows by group (each group wholly in train or in test), then take as many
    positives as negatives in each split (at most `max_per_class` each). Raises ProbingError when a
    split would have fewer than `min_per_class` of either class."""
    from sklearn.model_selection import GroupShuffleSplit

    positive, eligible, groups = np.asarray(positive, bool), np.asarray(eligible, bool), np.asarray(groups)
    if not (len(positive) == len(eligible) == len(groups)):
        raise ProbingError("positive, eligible and groups must have one entry per row")
    rows = np.flatnonzero(eligible)
    if len(np.unique(groups[rows])) < 2:
        raise ProbingError(f"task {name!r}: its tokens come from fewer than 2 groups; nothing to split")
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
                  .split(rows, groups=groups[rows]))
    rng = np.random.default_rng(seed)
    out = []
    for part, split in ((rows[tr], "train"), (rows[te], "test")):
        pos, neg = part[positive[part]], part[~positive[part]]
        n = min(len(pos), len(neg), max_per_class)
        if n < min_per_class:
            raise ProbingError(f"task {name!r}: the {split} split has {len(pos)} positives and {len(neg)} "
                               f"negatives, fewer than min_per_class={min_per_class} of one class")
        idx = np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))
        out.append(idx)
    train, test = out
    return ProbeTask(name, kind, train, test, positive[train], positive[test], groups[train], groups[test])


def brown_tasks(meta: np.ndarray, eligible: np.ndarray | None = None, classes: dict | None = None,
                genres=GENRES, test_fraction: float = 0.3, max_per_class: int = 1000, min_per_class: int = 20,
                seed: int = 0) -> list[ProbeTask]:
    """POS-class and genre tasks from a Brown store's token labels (`store.tokens()`), over the rows
    where `eligible` is true (all by default). Classes or genres too rare to fill both splits are
    skipped; why is listed in every returned task's ``info["skipped"]``."""

    corpus = load_brown()
    classes = POS_CLASSES if classes is None else classes
    eligible = np.ones(len(meta), bool) if eligible is None else np.asarray(eligible, bool)
    if len(eligible) != len(meta):
        raise ProbingError(f"eligible has {len(eligible)} entries for {len(meta)} tokens")
    if (meta["doc"] < 0).all():
        raise ProbingError("the store's tokens carry no Brown labels (a streamed corpus): sparse probing needs "
                           "the POS-tagged Brown store (profile.scoring)")
    coarse = corpus.coarse_of_tag[meta["pos"]]
    tagged = eligible & (meta["pos"] != NO_TAG)
    text = eligible & (meta["tok_pos"] >= 0)
    first = np.r_[True, meta["ctx"][1:] != meta["ctx"][:-1]]  # each context's first row (BOS)
    text &= ~first
    tasks, skipped = [], []
    for name, tag in classes.items():
        if tag not in COARSE_TAGS:
            raise ProbingError(f"unknown coarse tag {tag!r} for class {name!r}: one of {COARSE_TAGS}")
        try:
            tasks.append(balanced_task(name, coarse == COARSE_TAGS.index(tag), tagged, meta["ctx"], test_fraction,
                                       max_per_class, min_per_class, seed, kind="pos"))
        except ProbingError as e:
            skipped.append(str(e))
    for g in genres:
        if g not in corpus.genres:
            raise ProbingError(f"unknown genre {g!r}: one of {corpus.genres}")
        try:
            tasks.append(balanced_task(f"genre:{g}", meta["genre"] == corpus.genres.index(g), text, meta["doc"],
                                       test_fraction, max_per_class, min_per_class, seed, kind="genre"))
        except ProbingError as e:
            skipped.append(str(e))
    if not tasks:
        raise ProbingError("no task could be built: " + "; ".join(skipped))
    for t in tasks:
        t.info["skipped"] = skipped
    return tasks


def group_bootstrap(correct: np.ndarray, pred: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int = 200,
                    seed: int = 0) -> dict:
    """Accuracy and F1 with 95% percentile intervals over groups resampled with replacement."""
    from sklearn.metrics import f1_score

    acc, f1 = float(correct.mean()), float(f1_score(y, pred, zero_division=0))
    out = {"accuracy": acc, "f1": f1, "accuracy_low": acc, "accuracy_high": acc, "f1_low": f1, "f1_high": f1}
    if n_boot <= 0:
        return out
    ug, inv = np.unique(groups, return_inverse=True)
    # per-group counts: correct, true positives, predicted positives, actual positives, rows
    tp = np.bincount(inv, pred & y, len(ug))
    pp = np.bincount(inv, pred, len(ug))
    ap = np.bincount(inv, y, len(ug))
    cr = np.bincount(inv, correct, len(ug))
    n = np.bincount(inv, minlength=len(ug))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(ug), np.full(len(ug), 1 / len(ug)), size=n_boot)  # [n_boot, groups]: multiplicities
    accs = (w @ cr) / np.maximum(w @ n, 1)
    f1s = 2 * (w @ tp) / np.maximum(w @ pp + w @ ap, 1)
    out.update(accuracy_low=float(np.percentile(accs, 2.5)), accuracy_high=float(np.percentile(accs, 97.5)),
               f1_low=float(np.percentile(f1s, 2.5)), f1_high=float(np.percentile(f1s, 97.5)))
    return out


def _logreg(max_iter: int = 2000, C: float = 1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def top_k_mean_diff(codes: np.ndarray, y: np.ndarray, k: int, signed: bool = False) -> np.ndarray:
    """The k columns with the largest |mean on positives - mean on negatives| (or the largest signed
    difference, with `signed`), best first."""
    diff = codes[y].mean(0) - codes[~y].mean(0)
    score = diff if signed else np.abs(diff)
    k = min(k, codes.shape[1])
    return np.argsort(-score, kind="stable")[:k]


def _row(task, method, probe, k, pred, latents=None, n_boot=200, seed=0) -> dict:
    pred = np.asarray(pred, bool)
    return {"task": task.name, "kind": task.kind, "method": method, "probe": probe, "k": k,
            **group_bootstrap(pred == task.y_test, pred, task.y_test, task.groups_test, n_boot, seed),
            "n_train": len(task.train), "n_test": len(task.test), "test_groups": len(np.unique(task.groups_test)),
            "latents": None if latents is None else [int(i) for i in latents]}


def residual_rows(x: torch.Tensor, task: ProbeTask, ks=KS, n_boot: int = 200, seed: int = 0) -> list[dict]:
    """The raw-residual references of one task: a full standardised logistic-regression probe, the
    difference-of-means direction with a threshold fitted on train, and the top-k residual dimensions."""
    from sklearn.linear_model import LogisticRegression

    xtr, xte = x[task.train].double().numpy(), x[task.test].double().numpy()
    rows = [_row(task, RESIDUAL, "full", None, _logreg().fit(xtr, task.y_train).predict(xte), n_boot=n_boot, seed=seed)]
    w = xtr[task.y_train].mean(0) - xtr[~task.y_train].mean(0)
    thr = LogisticRegression(max_iter=1000).fit((xtr @ w)[:, None], task.y_train)
    rows.append(_row(task, RESIDUAL, "diff_means", None, thr.predict((xte @ w)[:, None]), n_boot=n_boot, seed=seed))
    rows += _top_k_rows(xtr, xte, task, RESIDUAL, ks, n_boot, seed)
    return rows


def _top_k_rows(ctr, cte, task, method, ks, n_boot, seed):
    rows = []
    order = top_k_mean_diff(ctr, task.y_train, max(ks))
    for k in ks:
        sel = order[:k]
        if ctr[:, sel].std(0).max() == 0:  # every chosen latent is constant on train: no probe to fit
            pred = np.full(len(cte), task.y_train.mean() >= 0.5)
        else:
            pred = _logreg().fit(ctr[:, sel], task.y_train).predict(cte[:, sel])
        rows.append(_row(task, method, "top_k", k, pred, sel, n_boot, seed))
    return rows


def probe_tasks(dictionaries: dict, x: torch.Tensor, tasks: list[ProbeTask], ks=KS, n_boot: int = 200,
                seed: int = 0, residual: bool = True, progress: bool = True) -> list[dict]:
    """Sparse-probing rows for every task: for each dictionary {name: Dictionary} the top-k latent
    probes (k in `ks`), and (with `residual`) the raw-residual references. `x` [N, d] holds the
    activations that the tasks' row indices point into."""

    if not tasks:
        raise ProbingError("no tasks given")
    ks = tuple(sorted(set(int(k) for k in ks)))
    if ks[0] < 1:
        raise ProbingError(f"k must be at least 1, not {ks[0]}")
    rows = []
    bar = tqdm(total=len(tasks) * (len(dictionaries) + residual), desc="sparse probing", disable=not progress)
    for task in tasks:
        if residual:
            bar.set_postfix_str(f"{task.name} {RESIDUAL}")
            rows += residual_rows(x, task, ks, n_boot, seed)
            bar.update(1)
        for name, d in dictionaries.items():
            bar.set_postfix_str(f"{task.name} {name}")
            ctr, cte = encode_batched(d, x[task.train]).numpy(), encode_batched(d, x[task.test]).numpy()
            rows += _top_k_rows(ctr, cte, task, name, ks, n_boot, seed)
            bar.update(1)
    bar.close()
    return rows


@dataclass
class ProbeScore(Result):
    """One probe's test accuracy and F1 on one task, with 95% intervals over resampled test contexts.
    `probe`: "top_k" (a logistic regression on the method's k best latents, `latents`), or for the
    residual stream "full" (all dimensions) and "diff_means" (the difference-of-means direction)."""

    task: str
    kind: str
    method: str
    probe: str
    k: int | None
    accuracy: Estimate
    f1: Estimate
    n_train: int
    n_test: int
    test_groups: int
    latents: list | None = None
    layer: int | None = None

    @classmethod
    def from_row(cls, r: dict) -> "ProbeScore":
        """A score from a row of `probe_tasks`."""
        return cls(r["task"], r["kind"], r["method"], r["probe"], r["k"],
                   Estimate(r["accuracy"], r["accuracy_low"], r["accuracy_high"]),
                   Estimate(r["f1"], r["f1_low"], r["f1_high"]), r["n_train"], r["n_test"], r["test_groups"],
                   r["latents"], r.get("layer"))

    def as_row(self) -> dict:
        """The score as `probe_tasks`' row (what `summary` and `saebench_json` read)."""
        a, f = self.accuracy, self.f1
        row = {"task": self.task, "kind": self.kind, "method": self.method, "probe": self.probe, "k": self.k,
               "accuracy": a.value, "f1": f.value, "accuracy_low": a.low, "accuracy_high": a.high,
               "f1_low": f.low, "f1_high": f.high, "n_train": self.n_train, "n_test": self.n_test,
               "test_groups": self.test_groups, "latents": self.latents}
        return row if self.layer is None else {**row, "layer": self.layer}


@dataclass
class SparseProbing(Result):
    """Sparse probing of some dictionaries beside the residual stream's references: one `ProbeScore` per
    (task, method, probe, k). Shows each method's test accuracy at every k, averaged over the tasks as
    SAEBench averages; `by_task` gives one k task by task, `saebench_json` SAEBench's result files."""

    scores: list[ProbeScore] = field(default_factory=list)
    layer: int | None = None
    hook: str = ""

    @classmethod
    def from_rows(cls, rows: list[dict], layer: int | None = None, hook: str = "") -> "SparseProbing":
        return cls([ProbeScore.from_row(r) for r in rows], layer, hook)

    def as_rows(self) -> list[dict]:
        return [s.as_row() for s in self.scores]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(s.task for s in self.scores))

    @property
    def methods(self) -> list[str]:
        """The methods probed, the residual stream first when it is."""
        return list(dict.fromkeys(s.method for s in self.scores))

    @property
    def ks(self) -> list[int]:
        return sorted({s.k for s in self.scores if s.probe == "top_k"})

    def mean(self, method: str, probe: str = "top_k", k: int | None = None, metric: str = "accuracy") -> float:
        """The test `metric` (accuracy or f1) of one probe, averaged over the tasks (NaN if it was not run)."""
        v = [getattr(s, metric).value for s in self.scores if (s.method, s.probe, s.k) == (method, probe, k)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def residual_full(self) -> float:
        """Mean test accuracy of the full logistic probe on the residual stream."""
        return self.mean(RESIDUAL, "full")

    @property
    def residual_diff_means(self) -> float:
        """Mean test accuracy of the residual stream's difference-of-means probe."""
        return self.mean(RESIDUAL, "diff_means")

    def rows(self) -> list[dict]:
        return [{"method": m, **{f"top-{k}": self.mean(m, "top_k", k) for k in self.ks}} for m in self.methods]

    def by_task(self, k: int = 1, methods=None) -> Table:
        """Each task's test accuracy (95% interval over test contexts) with the top-`k` probe of `methods`
        (default: every method)."""
        methods = self.methods if methods is None else list(methods)
        by = {(s.task, s.method): s for s in self.scores if s.probe == "top_k" and s.k == k}
        return Table([{"task": t, **{m: format(by[(t, m)].accuracy, ".2f") for m in methods if (t, m) in by}}
                      for t in self.tasks], title=f"test accuracy of the top-{k} probe, task by task")

    def verdicts(self) -> list[str]:
        where = "" if self.layer is None else f", layer {self.layer}"
        out = [f"Mean test accuracy over {len(self.tasks)} balanced tasks{where} ({', '.join(self.tasks)})."]
        if any(s.method == RESIDUAL and s.probe == "full" for s in self.scores):
            out.append(f"Residual-stream references: full logistic probe {self.residual_full:.3f}, "
                       f"difference of means {self.residual_diff_means:.3f}.")
        dicts = [m for m in self.methods if m != RESIDUAL]
        for k in dict.fromkeys([self.ks[0], self.ks[-1]] if self.ks and dicts else []):
            acc = {m: self.mean(m, "top_k", k) for m in dicts}
            best = max(acc, key=acc.get)
            out.append(f"Top-{k} probe: {best} is best ({acc[best]:.3f})"
                       + (f"; random directions {acc['random']:.3f}." if "random" in acc and best != "random" else "."))
        return out

    def saebench_json(self, path=None, model_name: str = "", hook: str | None = None, config: dict | None = None) -> dict:
        """SAEBench sparse_probing result objects, one per dictionary (see the module's `saebench_json`)."""
        return saebench_json(self.as_rows(), path, model_name=model_name, hook=self.hook if hook is None else hook,
                             config=config)


def run(store, hook: str, dictionaries: dict, massive=None, max_tokens: int = 100_000, ks=KS, genres=GENRES,
        classes: dict | None = None, max_per_class: int = 1000, n_boot: int = 200, seed: int = 0,
        progress: bool = True) -> SparseProbing:
    """Sparse probing on a Brown store at `hook` (its first `max_tokens` tokens): Brown tasks
    (`brown_tasks`, ordinary tokens only when a massive rule is given), every dictionary, and the
    raw-residual references: `probe_tasks`'s rows as a `SparseProbing`."""
    if hook not in store.hooks:
        raise ProbingError(f"{hook!r} is not in the store at {store.path}: it holds {store.hooks}")
    for name, d in dictionaries.items():
        d.check_store(store, hook)
    x = store.activations(hook, max_tokens=max_tokens).float()
    meta = store.tokens()[: len(x)]
    eligible = None if massive is None else ~massive.flags(x).numpy()
    tasks = brown_tasks(meta, eligible, classes, genres, max_per_class=max_per_class, seed=seed)
    return SparseProbing.from_rows(probe_tasks(dictionaries, x, tasks, ks, n_boot, seed, progress=progress), hook=hook)


def summary(rows: list[dict] | SparseProbing, metric: str = "accuracy") -> dict:
    """{(method, probe, k): mean of `metric` over tasks}: one number per probe, as SAEBench averages."""
    rows = rows.as_rows() if isinstance(rows, SparseProbing) else rows
    out: dict = {}
    for r in rows:
        out.setdefault((r["method"], r["probe"], r["k"]), []).append(r[metric])
    return {key: float(np.mean(v)) for key, v in out.items()}


SAEBENCH_KS = (1, 2, 5, 10, 20, 50, 100)  # the k SAEBench's result schema has keys for


def saebench_json(rows: list[dict] | SparseProbing, path=None, model_name: str = "", hook: str = "",
                  config: dict | None = None) -> dict:
    """SAEBench sparse_probing result objects, one per dictionary: {name: result}. Each has SAEBench's
    keys (eval_type_id "sparse_probing", eval_config, eval_id, datetime_epoch_millis,
    eval_result_metrics {"llm": {llm_test_accuracy, llm_top_k_test_accuracy}, "sae":
    {sae_top_k_test_accuracy}}, eval_result_details [per task, with dataset_name], sae_lens_id, ...);
    accuracies are means over tasks (ours are token-level tasks, theirs sequence-level datasets).
    SAEBench's ``sae_test_accuracy`` (a probe on all latents) is not computed and stays None; the
    difference-of-means reference, F1s and intervals go in ``eval_result_unstructured``. With `path`
    (a folder), each is written there as ``<name>_sparse_probing.json``."""

    if isinstance(rows, SparseProbing):
        hook, rows = hook or rows.hook, rows.as_rows()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != RESIDUAL]
    if not methods:
        raise ProbingError("no dictionary rows to write (only the residual references)")
    by = {(r["task"], r["method"], r["probe"], r["k"]): r for r in rows}

    def get(task, method, probe, k, key="accuracy"):
        r = by.get((task, method, probe, k))
        return None if r is None else r[key]

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    eval_id, now = str(uuid.uuid4()), int(datetime.now().timestamp() * 1000)
    ks_present = sorted({r["k"] for r in rows if r["probe"] == "top_k"})
    out = {}
    for m in methods:
        details = []
        for t in tasks:
            det = {"dataset_name": t, "llm_test_accuracy": get(t, RESIDUAL, "full", None)}
            for k in SAEBENCH_KS:
                det[f"llm_top_{k}_test_accuracy"] = get(t, RESIDUAL, "top_k", k)
            det["sae_test_accuracy"] = None
            for k in SAEBENCH_KS:
                det[f"sae_top_{k}_test_accuracy"] = get(t, m, "top_k", k)
            details.append(det)
        llm = {"llm_test_accuracy": mean(d["llm_test_accuracy"] for d in details)}
        llm.update({f"llm_top_{k}_test_accuracy": mean(d[f"llm_top_{k}_test_accuracy"] for d in details)
                    for k in SAEBENCH_KS})
        sae = {"sae_test_accuracy": None}
        sae.update({f"sae_top_{k}_test_accuracy": mean(d[f"sae_top_{k}_test_accuracy"] for d in details)
                    for k in SAEBENCH_KS})
        unstructured = {"token_level_tasks": True, "ks": ks_present,
                        "llm_diff_means_test_accuracy": mean(get(t, RESIDUAL, "diff_means", None) for t in tasks),
                        "rows": [{k: v for k, v in r.items()} for r in rows if r["method"] in (m, RESIDUAL)]}
        out[m] = {"eval_type_id": "sparse_probing",
                  "eval_config": {"model_name": model_name, "hook": hook, "k_values": ks_present,
                                  "dataset_names": tasks, **(config or {})},
                  "eval_id": eval_id, "datetime_epoch_millis": now,
                  "eval_result_metrics": {"llm": llm, "sae": sae},
                  "eval_result_details": details,
                  "sae_bench_commit_hash": None, "sae_lens_id": m, "sae_lens_release_id": "sae-workbook",
                  "sae_lens_version": None, "sae_cfg_dict": {"hook_name": hook, "model_name": model_name},
                  "eval_result_unstructured": unstructured}
    if path is not None:
        write_saebench(out, path, "sparse_probing")
    return out


def evaluate_layer(profile, store=None, sweep=None, layer: int | None = None, score_store=None,
                   dictionaries: dict | None = None, progress: bool = True, **kw) -> SparseProbing:
    """Sparse probing of notebook 04's dictionaries at `layer` (default: the SAE's layer): the SAEs and
    baselines of helpers.dictionaries.baselines.layer_dictionaries (or `dictionaries`), fitted on `store`, probed on
    `score_store` (default `store`; it must be the POS-tagged Brown store), ordinary tokens only when
    the profile treats massive activations. `profile` may be a helpers.runs.session.Session, which
    supplies the stores, the sweep and the dictionaries. Keyword arguments go to `run` (max_tokens, ks,
    genres, ...)."""

    if is_session(profile):
        S = profile
        profile, store = S.profile, S.store
        score_store = S.score_store if score_store is None else score_store
        dictionaries = S.dictionaries(layer) if dictionaries is None else dictionaries
    layer, hook, dicts, rule = layer_eval_inputs(profile, store, sweep, layer, dictionaries, progress)
    kw.setdefault("max_tokens", profile.score_tokens)
    kw.setdefault("seed", profile.seed)
    result = run(score_store if score_store is not None else store, hook, dicts, massive=rule, progress=progress, **kw)
    result.layer = layer
    for s in result.scores:
        s.layer = layer
    return result
