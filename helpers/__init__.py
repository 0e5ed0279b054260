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
"""
from helpers.activations.corpus import iter_contexts, load_brown, tokenize_document
from helpers.activations.harvest import get_store, harvest, store_path, valid_hooks
from helpers.activations.models import ModelUnavailable, load_model
from helpers.settings.profiles import EMBEDDED_MODEL, PAPER_MODEL, PROFILES, Profile, get_profile
from helpers.activations.store import ActivationStore, CorruptShard, StoreError, StoreMismatch

__all__ = [
    "ActivationStore", "CorruptShard", "EMBEDDED_MODEL", "ModelUnavailable", "PAPER_MODEL", "PROFILES",
    "Profile", "StoreError", "StoreMismatch", "get_profile", "get_store", "harvest", "iter_contexts",
    "load_brown", "load_model", "store_path", "tokenize_document", "valid_hooks",
]
