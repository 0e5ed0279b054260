"""helpers: everything the workbook's notebooks compute, in one small package.

Modules, one job each:

* ``profiles``: settings presets (test / cpu / gpu / colab / paper), chosen by $SAE_PROFILE, changed by
                $SAE_OVERRIDES
* ``plan``:     the resource plan (disk, host RAM, GPU memory, time) of a profile on this machine
* ``paths``:    repository, data and cache locations
* ``hooks``:    hook names (`blocks.{layer}.hook_{kind}`), built and parsed in one place
* ``models``:   load a model as a TransformerLens TransformerBridge (embedded SmolLM2 by default)
* ``corpus``:   the Brown Corpus (embedded) or the Pile (hub stream or local files), as labelled token contexts
* ``store``:    the on-disk activation store (shards, manifest, checksums, shuffled batches)
* ``harvest``:  one model pass writing chosen hooks' activations to a store
* ``massive``:  massive activations: the rule that flags them and the treatment every dictionary gets
* ``sae``:      the SAE models (ReLU + L1 by Anthropic's 2023 or April-2024 recipe, tied or untied;
                the other architectures) and SAELens files
* ``architectures``: one object per SAE architecture (ReLU + L1, TopK, BatchTopK, JumpReLU,
                Matryoshka BatchTopK) behind a registry: activation, active set, penalties, SAELens fields
* ``sparse``:   sparse-code kernels: decoder and backward passes that touch only the active latents
* ``train``:    one-pass sweep trainer, at one or several hooks (Adam, resampling, AuxK, checkpoints)
* ``metrics``:  L0, FVU (all / ordinary / massive tokens), dead/dense, CE-loss recovered and KL, MMCS,
                PCA reference
* ``sweep``:    the profile's sweep end to end, the SAE it picks, and its twins at the other layers
* ``groundtruth``: the ground-truth lab: synthetic activations from known features, every architecture
                trained on them and scored against the truth (MMCS, matched MCC, absorption)
* ``dictionary``: one interface for SAEs and baselines (directions + encode/decode)
* ``features``: feature statistics in one pass, in-sample concept scores (describing features), logit effects
* ``heldout``:  held-out, sparsity-matched concept scores with nulls and context-resampled intervals
                (comparing methods), and interpretability against training
* ``probing``:  sparse probing (k-sparse probes on POS and genre tasks, residual references), SAEBench JSON
* ``absorption``: first-letter feature absorption (SAEBench's definitions), SAEBench JSON
* ``dashboard``: feature dashboards and the ipywidgets browser
* ``autointerp``: explain -> simulate -> score (local model or an OpenAI-compatible endpoint)
* ``prompts``:  IOI and gendered-pronoun prompt sets for causal experiments
* ``patching``: activation patching, ablation-based editing and feature circuits in a dictionary's basis
* ``steering``: steering along an SAE feature or a difference of means at a measured cost (KL, ΔCE),
                the comparison of the two at equal cost, and the ipywidgets playground
* ``plots``:    the figures the notebooks show
* ``bench``:    ``python -m helpers.bench``: harvest speed against a bare forward pass, trainer speed
* ``bench_others``: one training step of SAELens and sparsify, for the trainer benchmark
* ``run_all``:  ``python -m helpers.run_all``: execute every notebook headless, saving the results
* ``exercises``: the notebooks' exercises: checks of a reader's function against the workbook's own code
                (one module per notebook) and ``python -m helpers.exercises.build``, which writes the
                exercise versions of the notebooks (notebooks/exercises/) from the solved ones
"""
from .corpus import iter_contexts, load_brown, tokenize_document
from .harvest import get_store, harvest, store_path, valid_hooks
from .models import ModelUnavailable, load_model
from .profiles import EMBEDDED_MODEL, PAPER_MODEL, PROFILES, Profile, get_profile
from .store import ActivationStore, CorruptShard, StoreError, StoreMismatch

__all__ = [
    "ActivationStore", "CorruptShard", "EMBEDDED_MODEL", "ModelUnavailable", "PAPER_MODEL", "PROFILES",
    "Profile", "StoreError", "StoreMismatch", "get_profile", "get_store", "harvest", "iter_contexts",
    "load_brown", "load_model", "store_path", "tokenize_document", "valid_hooks",
]
