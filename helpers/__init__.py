"""helpers: everything the workbook's notebooks compute, in wings.

* ``settings``:     profiles (the presets $SAE_PROFILE picks), cache and scratch paths, cache locks
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
"""
from helpers.activations.corpus import iter_contexts, load_brown, tokenize_document
from helpers.activations.harvest import collect, get_store, harvest, store_path, valid_hooks
from helpers.activations.models import ModelUnavailable, hooked, load_model
from helpers.activations.store import ActivationStore, CorruptShard, StoreError, StoreMismatch
from helpers.causal.patching import direct_logit_attribution, feature_attribution, patch_features
from helpers.causal.steering import steer
from helpers.dictionaries.controls import frozen_encoder_sae, reinitialised, shared_latents, token_mean_directions
from helpers.dictionaries.dictionary import as_dictionary, load_sae, neuron_basis, random_directions
from helpers.evals.autointerp import DetectionScores, detection_scores
from helpers.evals.heldout import compare, heldout_score, heldout_scores, token_labels
from helpers.evals.protocols import budget_curve, claim_table, dictionary_protocol_scores, heldout_distribution, protocol_scores
from helpers.evals.reconstruction import ce_loss_recovered, fvu, reconstruction
from helpers.results import Estimate, Result
from helpers.saes.train import train_sae
from helpers.settings.profiles import EMBEDDED_MODEL, PAPER_MODEL, PROFILES, Profile, get_profile
from helpers.show.dashboard import FeatureView, dashboard, matched_feature, side_by_side, top_contexts

__all__ = [
    # the research API
    "DetectionScores", "Estimate", "FeatureView", "Result", "as_dictionary", "budget_curve", "ce_loss_recovered", "claim_table", "collect", "compare",
    "dashboard", "detection_scores", "direct_logit_attribution", "dictionary_protocol_scores", "feature_attribution", "frozen_encoder_sae", "fvu", "heldout_distribution", "heldout_score",
    "heldout_scores", "hooked", "load_sae", "matched_feature", "neuron_basis", "patch_features", "protocol_scores", "random_directions",
    "reconstruction", "reinitialised", "shared_latents", "side_by_side", "steer", "token_labels", "token_mean_directions",
    "top_contexts", "train_sae",
    # the notebooks' conveniences
    "ActivationStore", "CorruptShard", "EMBEDDED_MODEL", "ModelUnavailable", "PAPER_MODEL", "PROFILES",
    "Profile", "StoreError", "StoreMismatch", "get_profile", "get_store", "harvest", "iter_contexts",
    "load_brown", "load_model", "store_path", "tokenize_document", "valid_hooks",
]
