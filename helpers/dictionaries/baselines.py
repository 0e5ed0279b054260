"""The baselines the paper compares SAE features with, as Dictionaries, and the layer-by-layer
comparison of notebook 04.

* PCA: the orthonormal directions of largest variance (scikit-learn; IncrementalPCA when the
  activations are too many for memory).
* ICA: scikit-learn FastICA's independent components. A component's sign is arbitrary, so each is
  flipped to make its heavy tail (skewness) positive; non-convergence is reported with its numbers.
* The neuron (standard) basis and random unit directions (helpers.dictionaries.dictionary).

All of them have signed codes, split into positive and negative halves by the rule of
helpers.dictionaries.dictionary, and all are centred on the data mean. PCA, ICA and neurons give at most
2·d_in features; random directions match the SAE's count. Given a massive-activation rule
(helpers.activations.massive), every baseline is fitted on, and encodes, the activations with the massive offset
removed, exactly as the SAEs do. `compare_layers` scores the SAEs and every baseline at each of the
profile's layers with the held-out, sparsity-matched concept scores of helpers.evals.heldout (intervals over
resampled contexts), over ordinary (non-massive) tokens and over all tokens.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from helpers.activations import massive
from helpers.activations.models import resolve_device
from helpers.dictionaries.dictionary import LinearDictionary, SAEDictionary, neuron_basis, random_directions
from helpers.evals import heldout
from helpers.evals.heldout import HeldoutScorer, difference, matched_counts
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
    store holds at most `max_tokens`, else streamed over the whole store (IncrementalPCA); with
    `tokens`, fitted in memory on the store's first `tokens` activations (its contexts are in random
    order, so a prefix is a fair sample; streaming millions of tokens takes hours on 2 vCPUs)."""
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
    else:  # stream the whole store in batches: memory stays bounded
        from sklearn.decomposition import IncrementalPCA

        pca = IncrementalPCA(n_components=n_components)
        batch = max(n_components, min(8192, store.n_tokens // 2))
        for xb in store.iter_batches(hook, batch, shuffle=False):
            if len(xb) >= n_components:  # partial_fit needs a batch of at least n_components rows
                pca.partial_fit((xb if massive is None else massive.shift(xb)).double().numpy())
    comps = torch.as_tensor(pca.components_, dtype=torch.float32)
    return LinearDictionary(comps.T, comps, torch.as_tensor(pca.mean_, dtype=torch.float32), name="PCA",
                            hook_name=hook, model_name=model_name, massive=massive)


def fit_ica(store, hook: str, n_components: int | None = None, max_tokens: int = 50_000, max_iter: int = 400,
            tol: float = 1e-3, seed: int = 0, model_name: str = "", massive=None) -> LinearDictionary:
    """FastICA components, each signed so that its heavy tail is positive."""
    from scipy.stats import skew
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    n_components = n_components or store.d_model
    x = _fit_data(store, hook, max_tokens, n_components, "ICA", massive).double().numpy()
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
        "ICA": _cached_fit(cache_dir, "ica", key + [ica_tokens, ica_max_iter, seed], lambda: fit_ica(
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

def compare_layers(profile, store, model, sweep, progress: bool = True, score_store=None, n_boot: int = 200) -> list[dict]:
    """Held-out, sparsity-matched concept scores (helpers.evals.heldout) of the SAEs and each baseline at
    every harvested layer: one row per (layer, method).

    "SAE" is the L1 SAE the sweep chose, "TopK SAE" the sweep's TopK SAE nearest to it in L0 (if the
    sweep has one); at the sweep's layer they are the sweep's own, elsewhere SAEs trained with the
    same settings on that layer (all layers in one pass). The SAEs' features are active on their own
    tokens (the module's one rule); every baseline feature (PCA, ICA, neurons, random) is made active
    on as many tokens as a feature of the L1 SAE (`heldout.matched_counts`), so each method is judged
    at the SAE's sparsity; "random (TopK)" is the same random directions at the TopK SAE's sparsity.
    Each row holds the medians over features on ordinary tokens with 95% intervals over resampled
    contexts (`heldout.Scored.summary` keys: mcc, null_mcc, excess_mcc, corr, ...), `vs_random` (the
    paired difference from the random directions at the same sparsity), `all` (the same medians
    over all tokens, without intervals) and `scored` (per-feature results).
    Dictionaries are fitted on `store`; features are scored on `score_store` (default: `store`; for a
    model trained on the Pile, the Brown store of `profile.scoring`, whose tokens carry POS tags)."""

    score_store = store if score_store is None else score_store
    saes = layer_saes(profile, store, sweep, progress=progress)
    n_saes = len({name for _, name in saes})
    rows = []
    bar = tqdm(total=len(profile.layers) * (n_saes + 4 + (n_saes > 1)), desc="compare layers", unit="dictionary",
               disable=not progress)
    shared = {}  # the scored tokens' concept labels, the same at every layer: built once
    for layer in profile.layers:
        hook = profile.hook_at(layer)
        dicts = layer_dictionaries(profile, layer, store, sweep, progress=progress, saes=saes)
        # each layer's rows are kept in the cache as soon as they are scored: a rerun resumes at the next layer
        key = [repr(profile), sweep["dir"], layer, n_boot, str(score_store.path), score_store.n_tokens, list(dicts)]
        path = profile.cache_dir / "compare_layers" / f"layer{layer:02d}-{str(sweep['dir']).rstrip('/').split('-')[-1]}.pt"
        n_done = bar.n
        layer_rows = stored(path, key, lambda: [{**r, "scored": r["scored"].to_dict()} for r in _score_layer(
            profile, store, score_store, model, layer, hook, dicts, shared, n_boot, bar)],
                            code=(_score_layer, heldout, massive))
        bar.update(n_done + len(layer_rows) - bar.n)
        layer_rows = [{**r, "scored": heldout.Scored.from_dict(r["scored"]),
                       "dictionary": dicts["random" if r["method"] == RANDOM_TOPK else r["method"]]}
                      for r in layer_rows]
        rows += layer_rows
        if progress:
            bar.write(f"layer {layer}: " + ", ".join(
                f"{r['method']} {r['mcc']:.3f} (chance {r['null_mcc']:.3f})" for r in layer_rows)
                + "  (held-out MCC, ordinary tokens)")
    bar.close()
    return rows


def _score_layer(profile, store, score_store, model, layer, hook, dicts, shared, n_boot, bar):
    """compare_layers' rows at one layer, without their dictionaries; `shared` keeps the scored tokens'
    concept labels for the next layer."""

    flags = massive.flags(score_store, hook, massive_rule(profile, store, layer))
    ordinary = HeldoutScorer(score_store, model.tokenizer, n_tokens=profile.score_tokens, scored=~flags,
                             labels=shared.get("labels"), n_boot=n_boot, seed=profile.seed)
    shared["labels"] = ordinary.labels
    every = HeldoutScorer(score_store, model.tokenizer, n_tokens=profile.score_tokens, labels=ordinary.labels,
                          n_boot=0, seed=profile.seed)
    sae_counts = None
    layer_rows = []
    for name, d in dicts.items():
        bar.set_postfix_str(f"layer {layer} {name}")
        counts = None
        if "SAE" not in name:
            counts = matched_counts(sae_counts, d.n_features, seed=profile.seed)
        sc = ordinary.score(d, name=name, hook=hook, counts=counts, progress=False)
        if name == "SAE":
            sae_counts = torch.as_tensor(sc.counts)
        al = every.score(d, name=name, hook=hook, counts=counts, progress=False)
        layer_rows.append({"layer": layer, "method": name, "features": d.n_features,
                           "massive_share": float(flags[: ordinary.n].mean()),
                           "converged": getattr(d, "converged", None), "dictionary": d, "scored": sc,
                           "sparsity": "own" if counts is None else "L1 SAE's", **sc.summary(),
                           "all": al.summary()})
        bar.update(1)
    rnd = next(r for r in layer_rows if r["method"] == "random")
    topk = next((r for r in layer_rows if r["method"] == "TopK SAE"), None)
    if topk is not None:  # random directions at the TopK SAE's sparsity, its own fair reference
        counts = matched_counts(torch.as_tensor(topk["scored"].counts), rnd["features"], seed=profile.seed)
        d = rnd["dictionary"]
        sc = ordinary.score(d, name=RANDOM_TOPK, hook=hook, counts=counts, progress=False)
        al = every.score(d, name=RANDOM_TOPK, hook=hook, counts=counts, progress=False)
        layer_rows.append({**rnd, "method": RANDOM_TOPK, "scored": sc, "sparsity": "TopK SAE's", **sc.summary(),
                           "all": al.summary()})
        bar.update(1)
    for r in layer_rows:
        ref = RANDOM_TOPK if r["method"] in ("TopK SAE", RANDOM_TOPK) and topk is not None else "random"
        r["vs_random"] = difference(r["scored"], next(x["scored"] for x in layer_rows if x["method"] == ref))
    return [{k: v for k, v in r.items() if k != "dictionary"} for r in layer_rows]
