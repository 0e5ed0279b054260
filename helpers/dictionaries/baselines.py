"""The baselines the paper compares SAE features with, as Dictionaries, and the layer-by-layer
comparison of notebook 04.

* PCA: the orthonormal directions of largest variance (scikit-learn; when the activations are too many
  for memory, the eigenvectors of their covariance, accumulated in one streamed pass).
* ICA: scikit-learn FastICA's independent components. A component's sign is arbitrary, so each is
  flipped to make its heavy tail (skewness) positive; non-convergence is reported with its numbers.
* The neuron (standard) basis and random unit directions (helpers.dictionaries.dictionary).

All of them have signed codes, split into positive and negative halves by the rule of
helpers.dictionaries.dictionary, and all are centred on the data mean. PCA, ICA and neurons give at most
2·d_in features; random directions match the SAE's count. Given a massive-activation rule
(helpers.activations.massive), every baseline is fitted on, and encodes, the activations with the massive offset
removed, exactly as the SAEs do. `compare_layers` scores the SAEs and every baseline at each of the
profile's layers with the held-out, sparsity-matched concept scores of helpers.evals.heldout (intervals over
resampled contexts), over ordinary (non-massive) tokens and over all tokens, and returns them as a
`LayerComparison` (one `MethodScore` per layer and method) that shows its table and says its verdicts.
`layer_protocols` scores the L1 SAE, random directions and the neuron basis at each layer by the paper's
LLM-free protocols too (helpers.evals.protocols: the explanation's correlation and delphi's detection),
dense and at the SAE's sparsity; `LayerComparison.claims(protocols)` puts claim 1 at every layer by every
protocol and statistic in one `LayerClaims` (a verdict table per layer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from helpers.activations import massive
from helpers.activations.models import resolve_device
from helpers.dictionaries.dictionary import LinearDictionary, SAEDictionary, neuron_basis, random_directions
from helpers.evals import heldout
from helpers.evals.heldout import STATS, HeldoutScorer, Scored, difference, matched_counts
from helpers.evals.protocols import (CLAIM_STATS, ClaimTable, Distribution, ProtocolComparison, claim_table,
                                     dictionary_protocol_scores, heldout_distribution)
from helpers.results import Estimate, Result, Table, plain
from helpers.runs.sweep import layer_saes
from helpers.settings.paths import stored

IN_MEMORY_TOKENS = 200_000


def _fit_data(store, hook: str, max_tokens: int, n_components: int, method: str, massive=None) -> torch.Tensor:
    x = store.activations(hook, max_tokens=max_tokens)
    x = x if massive is None else massive.shift(x)
    if len(x) < n_components:
        raise ValueError(f"{method} needs at least as many samples as directions: {len(x)} activations "
                         f"of {hook} for {n_components} components; harvest more tokens or ask for fewer components")
    return x


def fit_pca(store, hook: str, n_components: int | None = None, max_tokens: int = IN_MEMORY_TOKENS,
            model_name: str = "", massive=None, tokens: int | None = None) -> LinearDictionary:
    """PCA directions of `hook`'s activations (all d_in of them by default): fitted in memory when the
    store holds at most `max_tokens`, else streamed over the whole store (`streamed_pca`); with
    `tokens`, fitted in memory on the store's first `tokens` activations (its contexts are in random
    order, so a prefix is a fair sample)."""
    n_components = n_components or store.d_model
    max_tokens = tokens if tokens is not None else max_tokens
    n = min(store.n_tokens, max_tokens)
    if n < n_components:
        raise ValueError(f"PCA needs at least as many samples as directions: {n} activations of {hook} for "
                         f"{n_components} components; harvest more tokens or ask for fewer components")
    if store.n_tokens <= max_tokens or tokens is not None:
        from sklearn.decomposition import PCA

        x = _fit_data(store, hook, max_tokens, n_components, "PCA", massive).double().numpy()
        pca = PCA(n_components=n_components, svd_solver="full").fit(x)
        comps, mean = pca.components_, pca.mean_
    else:  # stream the whole store in batches: memory stays bounded
        batches = store.iter_batches(hook, 8192, shuffle=False)
        comps, mean = streamed_pca(xb if massive is None else massive.shift(xb) for xb in batches)
        comps = comps[:n_components]
    comps = torch.as_tensor(comps, dtype=torch.float32)
    return LinearDictionary(comps.T, comps, torch.as_tensor(mean, dtype=torch.float32), name="PCA",
                            hook_name=hook, model_name=model_name, massive=massive)


def streamed_pca(batches) -> tuple[np.ndarray, np.ndarray]:
    """PCA of activations given as batches ([b, d] tensors on any device, or arrays), in one pass:
    (components [d, d], rows by decreasing variance, mean [d]), numpy arrays. The covariance is accumulated
    on the CPU in float64 around the first batch's mean (no cancellation against a large mean), then
    diagonalised; each component is signed as scikit-learn signs PCA's (its largest-magnitude entry
    positive). The same directions as a PCA of all the rows at once, up to float64 rounding, for d x d
    memory and one product per batch."""
    from sklearn.utils.extmath import svd_flip

    n, pilot = 0, None
    for xb in batches:
        xb = torch.as_tensor(xb).detach().to("cpu", torch.float64)
        if pilot is None:
            pilot = xb.mean(0)
            total, square = torch.zeros_like(pilot), torch.zeros(len(pilot), len(pilot), dtype=torch.float64)
        xc = xb - pilot
        n += len(xc)
        total += xc.sum(0)
        square += xc.T @ xc
    if n < 2:
        raise ValueError(f"PCA needs at least two activations, got {n}")
    shift = total / n
    cov = (square - n * torch.outer(shift, shift)) / (n - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    _, comps = svd_flip(None, vecs.flip(1).T.numpy(), u_based_decision=False)
    return comps, (pilot + shift).numpy()


def fit_ica(store, hook: str, n_components: int | None = None, max_tokens: int = 50_000, max_iter: int = 400,
            tol: float = 1e-3, seed: int = 0, model_name: str = "", massive=None) -> LinearDictionary:
    """FastICA components, each signed so that its heavy tail is positive. Fitted in float32, the
    activations' own precision (scikit-learn keeps its input's; PCA's SVD stays in float64)."""
    from scipy.stats import skew
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    n_components = n_components or store.d_model
    x = _fit_data(store, hook, max_tokens, n_components, "ICA", massive).float().numpy()
    ica = FastICA(n_components=n_components, whiten="unit-variance", max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(x)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        warnings.warn(f"FastICA on {hook} did not converge: {ica.n_iter_} iterations (max_iter={max_iter}) "
                      f"without reaching tol={tol} on {len(x):,} activations × {n_components} components; "
                      "its components are used as they are. Raise max_iter or tol to change that.",
                      RuntimeWarning, stacklevel=2)
    sign = np.where(skew(sources, axis=0) < 0, -1.0, 1.0)
    enc = torch.as_tensor(ica.components_.T * sign, dtype=torch.float32)      # [d, k]
    dec = torch.as_tensor(ica.mixing_.T * sign[:, None], dtype=torch.float32)  # [k, d]
    d = LinearDictionary(enc, dec, torch.as_tensor(ica.mean_, dtype=torch.float32), name="ICA",
                         hook_name=hook, model_name=model_name, massive=massive)
    d.n_iter, d.converged = int(ica.n_iter_), not caught
    return d


def _cached_fit(cache_dir, name: str, key: list, fit, massive=None) -> LinearDictionary:
    """fit() once, then load it from cache_dir (safetensors); a cached ICA that had not converged
    warns again on load."""
    if cache_dir is None:
        return fit()

    path = Path(cache_dir) / f"{name}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]}.safetensors"
    if path.exists():
        t = load_file(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        d = LinearDictionary(t["encoder"], t["decoder"], t["mean"], name=meta["name"], hook_name=meta["hook_name"],
                             model_name=meta["model_name"], massive=massive)
        if "n_iter" in meta:
            d.n_iter, d.converged = meta["n_iter"], meta["converged"]
            if not d.converged:
                warnings.warn(meta["warning"], RuntimeWarning, stacklevel=3)
        return d
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        d = fit()
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": d.name, "hook_name": d.hook_name, "model_name": d.model_name}
    if hasattr(d, "converged"):
        meta.update(n_iter=d.n_iter, converged=d.converged,
                    warning=next((str(w.message) for w in caught if "FastICA" in str(w.message)), ""))
    tmp = path.with_name(path.name + ".tmp")
    save_file({"encoder": d.encoder.contiguous(), "decoder": d.decoder.contiguous(), "mean": d.mean.contiguous()}, tmp)
    path.with_suffix(".json").write_text(json.dumps(meta))
    tmp.replace(path)
    return d


def baselines(store, hook: str, n_features: int, seed: int = 0, model_name: str = "",
              ica_tokens: int = 50_000, ica_max_iter: int = 400, cache_dir=None, massive=None,
              pca_tokens: int | None = None) -> dict:
    """PCA, ICA, neuron basis and random directions for `hook` (random: n_features features), all
    seeing the activations through the massive-activation rule `massive` if one is given.
    With `cache_dir`, PCA and ICA are fitted once per store, hook and settings, then loaded."""
    x = store.activations(hook, max_tokens=IN_MEMORY_TOKENS)
    mean = (x if massive is None else massive.shift(x)).mean(0)
    key = [str(store.path), store.n_tokens, hook, model_name, None if massive is None else massive.threshold]
    return {
        "PCA": _cached_fit(cache_dir, "pca", key + ([pca_tokens] if pca_tokens else []), lambda: fit_pca(
            store, hook, model_name=model_name, massive=massive, tokens=pca_tokens), massive),
        "ICA": _cached_fit(cache_dir, "ica", key + [ica_tokens, ica_max_iter, seed, "float32"], lambda: fit_ica(
            store, hook, max_tokens=ica_tokens, max_iter=ica_max_iter, seed=seed, model_name=model_name,
            massive=massive), massive),
        "neurons": neuron_basis(store.d_model, mean, hook_name=hook, model_name=model_name, massive=massive),
        "random": random_directions(store.d_model, n_features, mean, seed=seed, hook_name=hook, model_name=model_name,
                                    massive=massive),
    }


def massive_rule(profile, store, layer: int):
    """The massive-activation rule of a layer, fitted on the training store (inert if the profile
    turns the treatment off)."""

    hook = profile.hook_at(layer)
    return massive.fit(store, hook) if profile.massive else massive.Massive.none(hook, store.d_model)


def layer_dictionaries(profile, layer: int, store, sweep, progress: bool = True, saes: dict | None = None) -> dict:
    """Every dictionary compared at one layer, by name: "SAE" (the L1 SAE the sweep chose), "TopK SAE"
    (the sweep's TopK SAE nearest to it in L0, if any), "PCA", "ICA", "neurons" and "random" (as many
    features as the L1 SAE). The SAEs come from helpers.runs.sweep.layer_saes (pass its result as `saes`
    to reuse it): the sweep's own at its layer, SAEs with the same settings elsewhere."""

    if layer not in profile.layers:
        raise ValueError(f"layer {layer} was not harvested: the profile's layers are {profile.layers}")
    hook = profile.hook_at(layer)
    saes = saes if saes is not None else layer_saes(profile, store, sweep, progress=progress)
    dicts = {name: SAEDictionary(sae, name=name) for (lay, name), sae in saes.items() if lay == layer}
    dicts.update(baselines(store, hook, dicts["SAE"].n_features, seed=profile.seed, model_name=profile.model,
                           ica_tokens=profile.ica_tokens, ica_max_iter=profile.ica_max_iter,
                           pca_tokens=profile.pca_tokens, cache_dir=profile.cache_dir / "baselines", massive=massive_rule(profile, store, layer)))
    device = resolve_device(profile.device)
    return {name: d.to(device) for name, d in dicts.items()}


RANDOM_TOPK = "random (TopK)"  # random directions at the TopK SAE's sparsity
MATCHED = "(SAE's sparsity)"  # a dense baseline scored with the L1 SAE's active-token counts
CLAIM_1 = "SAE features are more interpretable than the baselines"
PROTOCOL_METHODS = ("SAE", "random", "neurons")
SHARE_COLUMN = "share (> middle threshold)"  # each protocol's middle threshold: 0.5, or 0.75 for detection



def layer_eval_inputs(profile, store, sweep, layer: int | None = None, dictionaries: dict | None = None,
                      progress: bool = True):
    """What notebook 04's later evaluations (helpers.evals.probing, helpers.evals.absorption) need at one layer
    (default: the SAE's): (layer, hook, dictionaries, massive rule or None). The dictionaries are
    `layer_dictionaries`' unless given."""
    layer = profile.sae_layer if layer is None else layer
    hook = profile.hook_at(layer)
    dicts = dictionaries if dictionaries is not None else layer_dictionaries(profile, layer, store, sweep, progress=progress)
    return layer, hook, dicts, (massive_rule(profile, store, layer) if profile.massive else None)


def write_saebench(results: dict, path, eval_name: str) -> None:
    """Write {method: SAEBench-shaped result} as one JSON file per method, `<method>_<eval_name>.json`."""

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for m, res in results.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in m)
        (folder / f"{safe}_{eval_name}.json").write_text(json.dumps(res, indent=2))


def is_session(obj) -> bool:
    """Whether `obj` is a helpers.runs.session.Session (it names the profile, stores, model and SAEs)."""
    return hasattr(obj, "profile") and hasattr(obj, "layer_saes") and hasattr(obj, "score_store")


class _SavesTensors:
    """Results whose `to_dict` keeps per-feature arrays as tensors (compact in `stored`'s cache files):
    `save` writes them as JSON lists."""

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(plain(self.to_dict()), indent=1, allow_nan=True))
        os.replace(tmp, path)
        return path


@dataclass
class MethodScore(_SavesTensors, Result):
    """One method's held-out, sparsity-matched concept scores at one layer (helpers.evals.heldout):
    medians over its scored features on ordinary tokens with 95% intervals over resampled contexts,
    the paired difference from random directions at the same sparsity, the medians over all tokens,
    and the per-feature scores (`scored`)."""

    layer: int
    method: str
    features: int
    sparsity: str              # whose active-token counts the features were held to: "own", "L1 SAE's", "TopK SAE's"
    n_scored: int
    median_count: float        # median active tokens per scored feature
    massive_share: float       # share of the scored tokens that are massive (left out here)
    converged: bool | None     # ICA: whether FastICA converged; None for other methods
    mcc: Estimate
    null_mcc: Estimate         # chance: the same features' context-shuffled nulls
    excess_mcc: Estimate
    corr: Estimate
    null_corr: Estimate
    excess_corr: Estimate
    vs_random: Estimate        # median held-out MCC minus random directions' at the same sparsity (paired)
    all_tokens: dict           # heldout.Scored.summary over all tokens, massive ones included (no intervals)
    scored: Scored | None = field(default=None, repr=False)
    resamples: str = ""        # the layer's scorer's resamples: scores with equal ones compare as paired

    def distribution(self, key: str = "mcc") -> Distribution:
        """The per-feature held-out `key` summarised every way (median, mean, shares, top decile), with
        intervals over the layer's resampled contexts (helpers.evals.protocols.heldout_distribution)."""
        if self.scored is None:
            raise ValueError(f"{self.method} at layer {self.layer} keeps no per-feature scores")
        return heldout_distribution(self.scored.result(self.resamples), key)

    @classmethod
    def from_row(cls, r: dict) -> "MethodScore":
        """A score from `_score_layer`'s row (heldout.Scored.summary keys, `vs_random`, `all`, `scored`)."""
        v = r["vs_random"]
        return cls(layer=int(r["layer"]), method=r["method"], features=int(r["features"]), sparsity=r["sparsity"],
                   n_scored=int(r["n_scored"]), median_count=float(r["median_count"]),
                   massive_share=float(r["massive_share"]), converged=r["converged"],
                   **{k: Estimate(r[k], r[f"{k}_low"], r[f"{k}_high"]) for k in STATS},
                   vs_random=Estimate(v["value"], v["low"], v["high"]), all_tokens=dict(r["all"]), scored=r["scored"],
                   resamples=r.get("resamples", ""))

    def to_dict(self) -> dict:
        d = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "scored"}
        return {"type": type(self).__name__, **d, "scored": None if self.scored is None else self.scored.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodScore":
        d = dict(d)
        scored = d.pop("scored", None)
        out = super().from_dict(d)
        out.scored = None if scored is None else Scored.from_dict(scored)
        return out

    def rows(self) -> list[dict]:
        return [{"layer": self.layer, "method": self.method, "features": self.features, "active": self.median_count,
                 "held-out MCC": format(self.mcc, ".3f"), "chance": self.null_mcc.value,
                 "excess": self.excess_mcc.value, "held-out corr": format(self.corr, ".3f"),
                 "minus random (MCC)": format(self.vs_random, "+.3f"), "all tokens (MCC)": self.all_tokens["mcc"]}]

    def best_features(self, n: int = 3) -> list[tuple[int, str, float]]:
        """The n scored features with the highest held-out MCC: (feature, its concept, its held-out MCC)."""
        s = self.scored
        top = np.argsort(-np.where(s.scored, s.mcc, -1))[:n].tolist()
        return [(f, s.concept[f], float(s.mcc[f])) for f in top]


SAES = ("SAE", "TopK SAE")
BASELINES = ("PCA", "ICA", "neurons")


@dataclass
class LayerComparison(_SavesTensors, Result):
    """`compare_layers`' result: one `MethodScore` per (layer, method). Shows the table of medians and
    intervals, and says which baselines reach the SAEs and how each SAE stands against random directions."""

    scores: list[MethodScore] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return list(dict.fromkeys(s.layer for s in self.scores))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(s.method for s in self.scores))

    def at(self, layer: int) -> dict[str, MethodScore]:
        """{method: score} at `layer`."""
        return {s.method: s for s in self.scores if s.layer == layer}

    def get(self, layer: int, method: str) -> MethodScore:
        try:
            return next(s for s in self.scores if s.layer == layer and s.method == method)
        except StopIteration:
            raise KeyError(f"no {method!r} at layer {layer}: methods {self.methods}, layers {self.layers}") from None

    def rows(self) -> list[dict]:
        return [row for s in self.scores for row in s.rows()]

    def at_least(self, sae: str = "SAE", key: str = "mcc") -> list[tuple[int, str]]:
        """(layer, method) of every baseline whose median held-out `key` (mcc or corr) reaches `sae`'s."""
        return [(s.layer, s.method) for s in self.scores if "SAE" not in s.method
                and getattr(s, key).value >= getattr(self.get(s.layer, sae), key).value]

    def intervals_above(self, layer: int, sae: str = "SAE") -> list[str]:
        """The classical baselines (PCA, ICA, neurons) whose held-out MCC interval lies wholly below `sae`'s."""
        at, mine = self.at(layer), self.get(layer, sae).mcc
        return [b for b in BASELINES if b in at and mine.low > at[b].mcc.high]

    def claim(self, stats=CLAIM_STATS) -> ClaimTable:
        """Claim 1 at every layer by the held-out MCC: each SAE against random directions at its own
        sparsity (the L1 SAE's, the TopK SAE's), by each statistic, with paired intervals and words."""
        measures = {}
        for layer in self.layers:
            at = self.at(layer)
            for sae, ref in (("SAE", "random"), ("TopK SAE", RANDOM_TOPK)):
                if sae in at and ref in at and at[sae].scored is not None and at[ref].scored is not None:
                    measures[f"layer {layer}: {sae} vs {ref}"] = (at[sae].distribution(), at[ref].distribution())
        return claim_table("SAE features are more interpretable than random directions (held-out MCC)", measures,
                           stats)

    def claims(self, protocols: dict | None = None, stats=CLAIM_STATS) -> "LayerClaims":
        """Claim 1 at every layer, one verdict table per layer: the L1 SAE against random directions and
        against the neuron basis, by the held-out MCC (both at the SAE's sparsity) and, where
        `protocols` ({layer: ProtocolComparison}, `layer_protocols`' result) has the layer, by the paper's
        correlation and by delphi's detection, each against the baseline dense (its natural activity, as
        the paper read it) and at the SAE's sparsity; each statistic with its paired interval and its word."""
        protocols = protocols or {}
        tables = []
        for layer in self.layers:
            at, pc = self.at(layer), protocols.get(layer)
            if "SAE" not in at or at["SAE"].scored is None:
                continue
            measures = {}
            for base, label in (("random", "random"), ("neurons", "neurons")):
                if base in at and at[base].scored is not None:
                    measures[f"held-out MCC (ours), {label} at the SAE's sparsity"] = (
                        at["SAE"].distribution(), at[base].distribution())
                if pc is None or "SAE" not in pc.scores:
                    continue
                for protocol, word in (("correlation", "paper's correlation"), ("detection", "detection")):
                    if base in pc.scores:
                        measures[f"{word}, {label} dense"] = (pc["SAE"][protocol], pc[base][protocol])
                    if f"{base} {MATCHED}" in pc.scores:
                        measures[f"{word}, {label} at the SAE's sparsity"] = (
                            pc["SAE"][protocol], pc[f"{base} {MATCHED}"][protocol])
            tables.append(claim_table(CLAIM_1, measures, stats, where=f"layer {layer}"))
        return LayerClaims(CLAIM_1, [int(t.where.split()[-1]) for t in tables], tables)

    def best_features(self, layer: int, n: int = 3) -> Table:
        """Each method's n best features at `layer` by held-out MCC, with the concept each was matched to."""
        return Table([{"method": s.method, "feature": f, "concept": c, "held-out MCC": round(m, 2)}
                      for s in self.at(layer).values() for f, c, m in s.best_features(n)],
                     title=f"best features at layer {layer}")

    def verdicts(self) -> list[str]:
        out = []
        saes = [m for m in SAES if m in self.methods]
        for sae in saes:
            for key, word in (("mcc", "MCC"), ("corr", "correlation")):
                beaten = ", ".join(f"{m} (layer {lay})" for lay, m in self.at_least(sae, key))
                out.append(f"Baselines scoring at least the {sae} by held-out {word}: {beaten or 'none'}.")
        for layer in self.layers:
            for sae in saes:
                v = self.get(layer, sae).vs_random
                side = "above" if v.above(0) else "below" if v.below(0) else "tied with"
                out.append(f"Layer {layer}: the {sae} is {side} random directions at its sparsity (held-out MCC "
                           f"{v:+.3f}); its interval lies above: {', '.join(self.intervals_above(layer, sae)) or 'none'}.")
        return out


def compare_layers(profile, store=None, model=None, sweep=None, progress: bool = True, score_store=None,
                   n_boot: int = 200, saes: dict | None = None) -> LayerComparison:
    """Held-out, sparsity-matched concept scores (helpers.evals.heldout) of the SAEs and each baseline at
    every harvested layer: a `LayerComparison` with one `MethodScore` per (layer, method).

    `profile` is a profile (then `store`, `model` and `sweep` are needed) or a
    helpers.runs.session.Session, which supplies them, the scoring store and the layers' SAEs.
    "SAE" is the L1 SAE the sweep chose, "TopK SAE" the sweep's TopK SAE nearest to it in L0 (if the
    sweep has one); at the sweep's layer they are the sweep's own, elsewhere SAEs trained with the
    same settings on that layer (all layers in one pass; `saes` reuses helpers.runs.sweep.layer_saes'
    result). The SAEs' features are active on their own tokens (the module's one rule); every baseline
    feature (PCA, ICA, neurons, random) is made active on as many tokens as a feature of the L1 SAE
    (`heldout.matched_counts`), so each method is judged at the SAE's sparsity; "random (TopK)" is the
    same random directions at the TopK SAE's sparsity. Each score holds the medians over features on
    ordinary tokens with 95% intervals over resampled contexts, `vs_random` (the paired difference
    from the random directions at the same sparsity), `all_tokens` (the same medians over all tokens,
    without intervals) and `scored` (per-feature results).
    Dictionaries are fitted on `store`; features are scored on `score_store` (default: `store`; for a
    model trained on the Pile, the Brown store of `profile.scoring`, whose tokens carry POS tags)."""

    if is_session(profile):
        S = profile
        profile, store, model, sweep = S.profile, S.store, S.model, S.sweep
        score_store = S.score_store if score_store is None else score_store
        saes = S.layer_saes if saes is None else saes
    score_store = store if score_store is None else score_store
    saes = saes if saes is not None else layer_saes(profile, store, sweep, progress=progress)
    n_saes = len({name for _, name in saes})
    scores = []
    bar = tqdm(total=len(profile.layers) * (n_saes + 4 + (n_saes > 1)), desc="compare layers", unit="dictionary",
               disable=not progress)
    shared = {}  # the scored tokens' concept labels, the same at every layer: built once
    for layer in profile.layers:
        hook = profile.hook_at(layer)
        dicts = layer_dictionaries(profile, layer, store, sweep, progress=progress, saes=saes)
        # each layer's scores are kept in the cache as soon as they are made: a rerun resumes at the next layer
        key = [profile.settings("data", "sweep", "scoring", "baselines"), sweep.dir, layer, n_boot,
               str(score_store.path), score_store.n_tokens, list(dicts)]
        path = profile.cache_dir / "compare_layers" / f"layer{layer:02d}-{str(sweep.dir).rstrip('/').split('-')[-1]}.pt"
        n_done = bar.n
        layer_scores = stored(path, key, lambda: [s.to_dict() for s in _score_layer(
            profile, store, score_store, model, layer, hook, dicts, shared, n_boot, bar)],
                              code=(_score_layer, heldout, massive))
        bar.update(n_done + len(layer_scores) - bar.n)
        layer_scores = [MethodScore.from_dict(d) for d in layer_scores]
        scores += layer_scores
        if progress:
            bar.write(f"layer {layer}: " + ", ".join(
                f"{s.method} {s.mcc.value:.3f} (chance {s.null_mcc.value:.3f})" for s in layer_scores)
                + "  (held-out MCC, ordinary tokens)")
    bar.close()
    return LayerComparison(scores)


def _score_layer(profile, store, score_store, model, layer, hook, dicts, shared, n_boot, bar):
    """compare_layers' scores at one layer; `shared` keeps the scored tokens' concept labels for the
    next layer."""

    flags = massive.flags(score_store, hook, massive_rule(profile, store, layer))
    ordinary = HeldoutScorer(score_store, model.tokenizer, n_tokens=profile.score_tokens, scored=~flags,
                             labels=shared.get("labels"), n_boot=n_boot, seed=profile.seed)
    shared["labels"] = ordinary.labels
    every = HeldoutScorer(score_store, model.tokenizer, n_tokens=profile.score_tokens, labels=ordinary.labels,
                          n_boot=0, seed=profile.seed)
    sae_counts = None
    layer_rows = []
    random_tops = None  # the random directions' top tokens by scorer: scored again at the TopK SAE's sparsity
    for name, d in dicts.items():
        bar.set_postfix_str(f"layer {layer} {name}")
        counts = None
        if "SAE" not in name:
            counts = matched_counts(sae_counts, d.n_features, seed=profile.seed)
        top_o = ordinary.top(d, hook, progress=False)
        sc = ordinary.score(d, name=name, hook=hook, counts=counts, top=top_o)
        if name == "SAE":
            sae_counts = torch.as_tensor(sc.counts)
        top_e = every.top(d, hook, progress=False)
        al = every.score(d, name=name, hook=hook, counts=counts, top=top_e)
        if name == "random":
            random_tops = (top_o, top_e)
        del top_o, top_e
        layer_rows.append({"layer": layer, "method": name, "features": d.n_features,
                           "massive_share": float(flags[: ordinary.n].mean()),
                           "converged": getattr(d, "converged", None), "dictionary": d, "scored": sc,
                           "sparsity": "own" if counts is None else "L1 SAE's", **sc.summary(),
                           "all": al.summary(), "resamples": ordinary.resamples})
        bar.update(1)
    rnd = next(r for r in layer_rows if r["method"] == "random")
    topk = next((r for r in layer_rows if r["method"] == "TopK SAE"), None)
    if topk is not None:  # random directions at the TopK SAE's sparsity, its own fair reference
        counts = matched_counts(torch.as_tensor(topk["scored"].counts), rnd["features"], seed=profile.seed)
        d = rnd["dictionary"]
        sc = ordinary.score(d, name=RANDOM_TOPK, hook=hook, counts=counts, top=random_tops[0])
        al = every.score(d, name=RANDOM_TOPK, hook=hook, counts=counts, top=random_tops[1])
        layer_rows.append({**rnd, "method": RANDOM_TOPK, "scored": sc, "sparsity": "TopK SAE's", **sc.summary(),
                           "all": al.summary()})
        bar.update(1)
    for r in layer_rows:
        ref = RANDOM_TOPK if r["method"] in ("TopK SAE", RANDOM_TOPK) and topk is not None else "random"
        r["vs_random"] = difference(r["scored"], next(x["scored"] for x in layer_rows if x["method"] == ref))
    return [MethodScore.from_row(r) for r in layer_rows]


@dataclass
class LayerClaims(Result):
    """Claim 1 at every layer: one `ClaimTable` per layer (`LayerComparison.claims`). `rows()` is one
    row per layer and measure, a column per statistic holding the difference, its interval and its
    word (the share above each protocol's middle threshold in one column); the display shows one table per layer, and `verdicts()` a sentence per layer."""

    claim: str = CLAIM_1
    layers: list[int] = field(default_factory=list)
    tables: list[ClaimTable] = field(default_factory=list)

    def at(self, layer: int) -> ClaimTable:
        try:
            return self.tables[self.layers.index(layer)]
        except ValueError:
            raise KeyError(f"no claim table at layer {layer}: layers {self.layers}") from None

    def words(self, layer: int | None = None) -> dict[str, int]:
        """How many measures say "holds", "fails" and "cannot tell" (at `layer`, or over every layer)."""
        tables = self.tables if layer is None else [self.at(layer)]
        return {w: sum(len(t.words()[w]) for t in tables) for w in ("holds", "fails", "cannot tell")}

    def rows(self) -> list[dict]:
        out = []
        for layer, table in zip(self.layers, self.tables):
            by_measure = {}
            for r in table.rows_:
                row = by_measure.setdefault(r.measure, {"layer": layer, "measure": r.measure, "a - b": f"{r.a} - {r.b}"})
                column = SHARE_COLUMN if r.statistic.startswith("share") else r.statistic
                row[column] = f"{r.difference:+.3f} {r.word}"
            out += by_measure.values()
        return out

    def verdicts(self) -> list[str]:
        out = []
        for layer, table in zip(self.layers, self.tables):
            w = table.words()
            by = lambda rows: "; ".join(f"{r.measure}, {r.statistic}" for r in rows) or "none"  # noqa: E731
            out.append(f"Layer {layer}: claim 1 holds by {len(w['holds'])} of {len(table.rows_)} measures, fails by "
                       f"{len(w['fails'])} ({by(w['fails'])}), cannot tell by {len(w['cannot tell'])}.")
        return out

    def _repr_html_(self) -> str:
        import pandas as pd
        from html import escape

        parts = [f"<b>{escape(self.claim)}</b>"]
        rows = self.rows()
        for layer, line in zip(self.layers, self.verdicts()):
            frame = pd.DataFrame([{k: v for k, v in r.items() if k != "layer"} for r in rows if r["layer"] == layer])
            parts.append(f"<p><b>layer {layer}</b></p>" + frame.to_html(index=False, border=0) + f"<p>{escape(line)}</p>")
        return "".join(parts)


def layer_protocols(session, layers=None, methods=PROTOCOL_METHODS, n_boot: int = 200,
                    progress: bool = False) -> dict[int, ProtocolComparison]:
    """The paper's LLM-free protocols (helpers.evals.protocols.dictionary_protocol_scores) at every layer
    of the session's profile (or `layers`): `methods` of the layer's dictionaries ("SAE", "random",
    "neurons" by default) on the scored tokens' ordinary activations, each at its natural activity, and
    every baseline again at the L1 SAE's sparsity ("random (SAE's sparsity)", ...), on one split per
    layer (paired intervals over `n_boot` resamples of the scoring half's contexts). Each layer's result
    is kept in the session's cache (`session.cached`), so a rerun loads it. {layer: ProtocolComparison}."""
    S, P = session, session.profile
    layers = list(P.layers) if layers is None else list(layers)
    shared = {}  # the scored tokens' concept labels, the same at every layer: built once
    out = {}
    for layer in tqdm(layers, desc="protocols by layer", disable=not progress):
        dicts = {m: d for m, d in S.dictionaries(layer).items() if m in methods}
        if "SAE" not in dicts:
            raise ValueError(f"layer {layer}: the protocols compare with the L1 SAE, which is not among {list(dicts)}")
        out[layer] = S.cached(
            f"baselines/protocols-L{layer}",
            lambda layer=layer, dicts=dicts: _layer_protocols(P, S.store, S.score_store, S.model, layer, dicts,
                                                              shared, n_boot),
            inputs={"dictionaries": dicts, "scored on": [S.score_store.path.name, S.score_store.n_tokens],
                    "score_tokens": P.score_tokens, "layer": layer, "n_boot": n_boot, "seed": P.seed,
                    "massive": P.massive},
            code=("helpers.evals.protocols", "helpers.evals.heldout"))
    return out


def _layer_protocols(profile, store, score_store, model, layer, dicts, shared, n_boot) -> ProtocolComparison:
    """layer_protocols' scores at one layer: the held-out scorer's tokens, concepts and ordinary tokens."""
    hook = profile.hook_at(layer)
    flags = massive.flags(score_store, hook, massive_rule(profile, store, layer))
    scorer = HeldoutScorer(score_store, model.tokenizer, n_tokens=profile.score_tokens, scored=~flags,
                           labels=shared.get("labels"), n_boot=0, seed=profile.seed)
    shared["labels"] = scorer.labels
    x = score_store.activations(hook, max_tokens=scorer.n)
    match = {f"{m} {MATCHED}": (m, "SAE") for m in dicts if "SAE" not in m}
    return dictionary_protocol_scores(dicts, x, scorer.labels, scorer.ctx, scored=scorer.scored_tokens,
                                      seed=profile.seed, pairs=[], match=match, n_boot=n_boot)
