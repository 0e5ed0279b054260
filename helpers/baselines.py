"""The baselines the paper compares SAE features with, as Dictionaries, and the layer-by-layer
comparison of notebook 04.

* PCA: the orthonormal directions of largest variance (scikit-learn; IncrementalPCA when the
  activations are too many for memory).
* ICA: scikit-learn FastICA's independent components. A component's sign is arbitrary, so each is
  flipped to make its heavy tail (skewness) positive; non-convergence is reported with its numbers.
* The neuron (standard) basis and random unit directions (helpers.dictionary).

All of them have signed codes, split into positive and negative halves by the rule of
helpers.dictionary, and all are centred on the data mean. PCA, ICA and neurons give at most
2·d_in features; random directions match the SAE's count. `compare_layers` scores an SAE and every
baseline at each of the profile's layers with the same concept score and bootstrap CIs.
"""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import torch

from .dictionary import LinearDictionary, SAEDictionary, neuron_basis, random_directions
from .features import Concepts, concept_scores, dictionary_score, feature_stats

IN_MEMORY_TOKENS = 200_000


def _fit_data(store, hook: str, max_tokens: int, n_components: int, method: str) -> torch.Tensor:
    x = store.activations(hook, max_tokens=max_tokens)
    if len(x) < n_components:
        raise ValueError(f"{method} needs at least as many samples as directions: {len(x)} activations "
                         f"of {hook} for {n_components} components; harvest more tokens or ask for fewer components")
    return x


def fit_pca(store, hook: str, n_components: int | None = None, max_tokens: int = IN_MEMORY_TOKENS,
            model_name: str = "") -> LinearDictionary:
    """PCA directions of `hook`'s activations (all d_in of them by default)."""
    n_components = n_components or store.d_model
    n = min(store.n_tokens, max_tokens)
    if n < n_components:
        raise ValueError(f"PCA needs at least as many samples as directions: {n} activations of {hook} for "
                         f"{n_components} components; harvest more tokens or ask for fewer components")
    if store.n_tokens <= max_tokens:
        from sklearn.decomposition import PCA

        x = _fit_data(store, hook, max_tokens, n_components, "PCA").double().numpy()
        pca = PCA(n_components=n_components, svd_solver="full").fit(x)
    else:  # stream the whole store in batches: memory stays bounded
        from sklearn.decomposition import IncrementalPCA

        pca = IncrementalPCA(n_components=n_components)
        batch = max(n_components, min(8192, store.n_tokens // 2))
        for xb in store.iter_batches(hook, batch, shuffle=False):
            if len(xb) >= n_components:  # partial_fit needs a batch of at least n_components rows
                pca.partial_fit(xb.double().numpy())
    comps = torch.as_tensor(pca.components_, dtype=torch.float32)
    return LinearDictionary(comps.T, comps, torch.as_tensor(pca.mean_, dtype=torch.float32), name="PCA",
                            hook_name=hook, model_name=model_name)


def fit_ica(store, hook: str, n_components: int | None = None, max_tokens: int = 50_000, max_iter: int = 400,
            tol: float = 1e-3, seed: int = 0, model_name: str = "") -> LinearDictionary:
    """FastICA components, each signed so that its heavy tail is positive."""
    from scipy.stats import skew
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    n_components = n_components or store.d_model
    x = _fit_data(store, hook, max_tokens, n_components, "ICA").double().numpy()
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
                         hook_name=hook, model_name=model_name)
    d.n_iter, d.converged = int(ica.n_iter_), not caught
    return d


def baselines(store, hook: str, n_features: int, seed: int = 0, model_name: str = "",
              ica_tokens: int = 50_000, ica_max_iter: int = 400) -> dict:
    """PCA, ICA, neuron basis and random directions for `hook` (random: n_features features)."""
    mean = store.activations(hook, max_tokens=IN_MEMORY_TOKENS).mean(0)
    return {
        "PCA": fit_pca(store, hook, model_name=model_name),
        "ICA": fit_ica(store, hook, max_tokens=ica_tokens, max_iter=ica_max_iter, seed=seed, model_name=model_name),
        "neurons": neuron_basis(store.d_model, mean, hook_name=hook, model_name=model_name),
        "random": random_directions(store.d_model, n_features, mean, seed=seed, hook_name=hook, model_name=model_name),
    }


def layer_sae(profile, layer: int, store, config, progress: bool = True):
    """An SAE with the chosen SAE's settings at another layer: trained once, then loaded."""
    from .sae import SAEConfig, load_saelens, save_saelens
    from .sweep import train_config
    from .train import train_sweep

    hook = f"blocks.{layer}.hook_{profile.hook}"
    cfg = SAEConfig(**{**config, "hook_name": hook})
    key = json.dumps([profile.model, profile.corpus, profile.ctx_len, profile.harvest_tokens, hook, repr(cfg),
                      profile.train_tokens, profile.train_batch, profile.lr, profile.seed])
    folder = profile.cache_dir / "sae" / f"layer{layer}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if (folder / "sae" / "cfg.json").exists():
        return load_saelens(folder / "sae")
    res = train_sweep(store, hook, [cfg], train_config(profile), run_dir=folder, progress=progress)
    save_saelens(res.saes[0].cpu(), folder / "sae")
    return load_saelens(folder / "sae")


def compare_layers(profile, store, model, sweep, progress: bool = True) -> list[dict]:
    """Concept scores (median MCC, 95% CI) of the SAE and each baseline at every harvested layer.
    The SAE at the sweep's layer is the chosen one; elsewhere one with the same settings."""
    from .sweep import load_sweep_sae

    chosen = sweep["rows"][sweep["chosen"]]
    keys = ("d_in", "d_sae", "architecture", "tied", "l1_coefficient", "k", "model_name")
    config = {k: chosen[k] for k in keys}
    concepts = Concepts.from_store(store, model.tokenizer)
    rows = []
    for layer in profile.layers:
        hook = f"blocks.{layer}.hook_{profile.hook}"
        sae = load_sweep_sae(sweep, sweep["chosen"]) if hook == profile.sae_hook else \
            layer_sae(profile, layer, store, config, progress)
        dicts = {"SAE": SAEDictionary(sae, name="SAE"),
                 **baselines(store, hook, sae.d_sae, seed=profile.seed, model_name=profile.model,
                             ica_tokens=profile.ica_tokens, ica_max_iter=profile.ica_max_iter)}
        for name, d in dicts.items():
            st = feature_stats(d, store, hook=hook, progress=False)
            sc = concept_scores(d, store, st, concepts, progress=False)
            s = dictionary_score(sc)
            rows.append({"layer": layer, "method": name, "features": d.n_features, "median_mcc": s["value"],
                         "low": s["low"], "high": s["high"], "n_scored": s["n"], "dead": s["excluded"],
                         "median_density": float(st.density.median()),
                         "converged": getattr(d, "converged", None), "scores": sc["mcc"], "concepts": sc["concept"],
                         "dictionary": d, "stats": st})
        if progress:
            print(f"layer {layer}: " + ", ".join(f"{r['method']} {r['median_mcc']:.3f}" for r in rows[-len(dicts):]))
    return rows
