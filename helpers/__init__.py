"""helpers: everything the workbook's notebooks compute, in wings.

* ``settings``:     profiles (the presets $SAE_PROFILE picks), cache and scratch paths, cache locks, memory
* ``activations``:  model, corpus, activation store, harvest, massive activations, hook names
* ``saes``:         the SAE stack and its architectures, sparse kernels, the trainer, SAELens files, ground truth
* ``dictionaries``: one interface for SAEs and baselines (random directions, neurons, PCA, ICA)
* ``evals``:        reconstruction, features and concepts, held-out scoring, probing, absorption, autointerp
* ``causal``:       prompt sets, patching and editing, steering
* ``runs``:         the profile's sweep and layer comparisons, the resource plan, claims, run_all
* ``show``:         plots and dashboards
* ``exercises``:    the notebooks' exercises and ``python -m helpers.exercises.build``
* ``results``:      typed results (``Estimate``, ``Result``): they save, load, show as tables and say their verdicts

The research API, importable from here: each method on plain objects (a Hugging Face or TransformerLens
model, tensors, an SAE as anything with encode/decode); the notebooks' profile, store and cache are
conveniences on top of it.

Each name is imported on first use (`import helpers.settings.locks` does not load torch, the model code or
the plots), so that a process that needs one part of the package starts in a fraction of the time.
"""
import importlib

_EXPORTS = {  # name: the module it comes from
    **dict.fromkeys(["iter_contexts", "load_brown", "tokenize_document"], "helpers.activations.corpus"),
    **dict.fromkeys(["collect", "get_store", "harvest", "store_path", "valid_hooks"], "helpers.activations.harvest"),
    **dict.fromkeys(["ModelUnavailable", "hooked", "load_model"], "helpers.activations.models"),
    **dict.fromkeys(["ActivationStore", "CorruptShard", "StoreError", "StoreMismatch"], "helpers.activations.store"),
    **dict.fromkeys(["direct_logit_attribution", "feature_attribution", "patch_features"], "helpers.causal.patching"),
    **dict.fromkeys(["steer"], "helpers.causal.steering"),
    **dict.fromkeys(["frozen_encoder_sae", "reinitialised", "shared_latents", "token_mean_directions"], "helpers.dictionaries.controls"),
    **dict.fromkeys(["as_dictionary", "load_sae", "neuron_basis", "random_directions"], "helpers.dictionaries.dictionary"),
    **dict.fromkeys(["DetectionScores", "detection_scores"], "helpers.evals.autointerp"),
    **dict.fromkeys(["compare", "heldout_score", "heldout_scores", "token_labels"], "helpers.evals.heldout"),
    **dict.fromkeys(["budget_curve", "claim_table", "dictionary_protocol_scores", "heldout_distribution", "protocol_scores"], "helpers.evals.protocols"),
    **dict.fromkeys(["ce_loss_recovered", "fvu", "reconstruction"], "helpers.evals.reconstruction"),
    **dict.fromkeys(["Estimate", "Result"], "helpers.results"),
    **dict.fromkeys(["train_sae"], "helpers.saes.train"),
    **dict.fromkeys(["EMBEDDED_MODEL", "PAPER_MODEL", "PROFILES", "Profile", "get_profile"], "helpers.settings.profiles"),
    **dict.fromkeys(["FeatureView", "dashboard", "matched_feature", "side_by_side", "top_contexts"], "helpers.show.dashboard"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
