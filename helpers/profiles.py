"""Settings profiles: every size, budget and path a notebook uses comes from one `Profile`.

Pick a preset with the environment variable ``SAE_PROFILE`` (``test``, ``cpu``, ``gpu``, ``paper``)
or in a notebook's first cell, where any field can also be overridden::

    P = get_profile()                           # $SAE_PROFILE, else "gpu" with CUDA, else "cpu"
    P = get_profile("cpu", harvest_tokens=50_000)

``test`` is what the test suite (nbval) runs: seconds to a couple of minutes per notebook.
``cpu`` is a laptop: about 30 minutes for the whole workbook on 2 CPU cores (measured: 30.1 minutes;
notebook 02 11 minutes, training 11 SAEs on 1.2M tokens each; 04 9 minutes; 05 5.5 minutes of patching).
``gpu`` is the embedded model at full scale on one GPU. ``paper`` is the paper's setting for Colab: Pythia-70M-deduped on the Pile.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .paths import cache_root

ENV_VAR = "SAE_PROFILE"
EMBEDDED_MODEL = "smollm2-135m-instruct"
PAPER_MODEL = "EleutherAI/pythia-70m-deduped"


@dataclass(frozen=True)
class Profile:
    """One named set of settings. Fields are documented where they are used."""

    name: str
    model: str = EMBEDDED_MODEL           # helpers.models.load_model name
    corpus: str = "brown"                 # "brown" (embedded) or "pile" (online only)
    layers: tuple[int, ...] = (6,)        # residual-stream layers to harvest
    hook: str = "resid_post"              # hook kind at each layer: blocks.{L}.hook_{hook}
    ctx_len: int = 128                    # tokens per context, BOS included (paper: 256)
    harvest_tokens: int = 200_000         # activations harvested per hook (BOS excluded)
    batch_contexts: int = 16              # contexts per forward pass while harvesting
    shard_contexts: int = 256             # contexts per store shard (one file per hook)
    store_dtype: str = "float16"          # on-disk activation dtype: float16 or bfloat16
    device: str = "auto"                  # "auto": cuda if available, else cpu
    seed: int = 0
    # --- SAE sweep (notebook 02) ---
    sae_layer: int = 6                    # the layer whose residual stream the SAEs learn
    sae_ratios: tuple[float, ...] = (0.5, 2)           # R = d_sae / d_in
    sae_alphas: tuple[float, ...] = (3e-3, 5e-3, 1e-2) # L1 coefficients α of the paper's SAEs
    pick_ratio: float = 2                              # R of the SAE that later notebooks use
    pick_max_l0: float = 50                            # ... with at most this L0
    sae_tied: tuple[bool, ...] = (False,)              # tied and/or untied decoders
    improved_alphas: tuple[float, ...] = ()            # improved-recipe L1 SAEs (at pick_ratio)
    topk_ks: tuple[int, ...] = (16,)                   # TopK SAEs for comparison ...
    topk_ratio: float = 2                              # ... at this R
    train_tokens: int = 32_256            # activations seen by each SAE (epochs over the store)
    train_batch: int = 256
    lr: float = 2e-3
    massive: bool = True                  # give massive activations their own treatment (helpers.massive)
    massive_control: bool = True          # ... and train a twin of an improved-L1 SAE without it, for comparison
    curve_points: int = 4                 # learning-curve points (log-spaced in tokens seen)
    curve_contexts: int = 4               # held-out contexts for the learning curve's CE-loss recovered
    eval_tokens: int = 4_032              # held-out (test split) activations for evaluation
    ce_contexts: int = 16                 # held-out contexts for CE-loss recovered
    # --- interpretation (notebook 03) and baselines (04) ---
    score_tokens: int | None = None       # store tokens for feature statistics and concept scores (None: all)
    autointerp_features: int = 2          # features per dictionary scored by explain-simulate-score
    # --- baselines (notebook 04) ---
    ica_tokens: int = 16_128              # activations FastICA is fitted on
    ica_max_iter: int = 30                # FastICA iterations (non-convergence is reported)
    # --- patching and editing (notebook 05) ---
    ioi_prompts: int = 64                 # IOI prompts generated (those the model fails are dropped)
    pronoun_prompts: int = 64             # pronoun prompts generated
    patch_layer_step: int = 4             # plain residual patching at every n-th layer (and the last)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def hooks(self) -> list[str]:
        return [f"blocks.{layer}.hook_{self.hook}" for layer in self.layers]

    @property
    def sae_hook(self) -> str:
        return f"blocks.{self.sae_layer}.hook_{self.hook}"

    @property
    def cache_dir(self) -> Path:
        """Where this profile's activations and runs live (git-ignored)."""
        return cache_root() / self.name

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, Profile] = {
    "test": Profile(
        "test", layers=(2, 6), ctx_len=64, harvest_tokens=16_128, batch_contexts=16, improved_alphas=(3e-3, 5e-3, 1e-2),
        shard_contexts=64, ioi_prompts=16, pronoun_prompts=16, patch_layer_step=6, autointerp_features=1,
        curve_points=3, curve_contexts=2,
    ),
    "cpu": Profile(
        "cpu", layers=(3, 6, 9), ctx_len=128, harvest_tokens=300_000, batch_contexts=16,
        shard_contexts=256, sae_ratios=(1, 4), sae_alphas=(2e-3, 3e-3, 4e-3), pick_ratio=4,
        improved_alphas=(2e-3, 3e-3, 4e-3), topk_ks=(32,), topk_ratio=4, train_tokens=1_228_800,
        train_batch=1024, lr=4e-3, curve_points=4, curve_contexts=2, eval_tokens=16_256, ce_contexts=16,
        score_tokens=50_000, autointerp_features=1, ica_tokens=20_000, ica_max_iter=60, ioi_prompts=48,
        pronoun_prompts=48, patch_layer_step=4,
    ),
    "gpu": Profile(
        "gpu", layers=tuple(range(0, 30, 2)), ctx_len=256, harvest_tokens=1_200_000,
        batch_contexts=64, shard_contexts=1024, store_dtype="bfloat16",
        sae_ratios=(0.5, 1, 2, 4, 8, 16, 32), sae_alphas=(1e-3, 2e-3, 4e-3, 8e-3), pick_ratio=8,
        sae_tied=(True, False), improved_alphas=(5e-4, 1e-3, 2e-3, 4e-3), topk_ks=(16, 32, 64), topk_ratio=8,
        train_tokens=10_000_000,
        train_batch=4096, lr=1e-3, eval_tokens=100_000, ce_contexts=256, autointerp_features=40,
        ica_tokens=100_000, ica_max_iter=400, ioi_prompts=256, pronoun_prompts=256, patch_layer_step=1,
    ),
    "paper": Profile(
        "paper", model=PAPER_MODEL, corpus="pile", layers=tuple(range(6)), ctx_len=256,
        harvest_tokens=5_000_000, batch_contexts=64, shard_contexts=1024, store_dtype="bfloat16",
        sae_layer=2, sae_ratios=(0.5, 1, 2, 4, 8, 16, 32), sae_alphas=(1e-3, 2e-3, 4e-3, 8e-3), pick_ratio=8,
        sae_tied=(True, False), improved_alphas=(5e-4, 1e-3, 2e-3, 4e-3), topk_ks=(16, 32, 64), topk_ratio=8,
        train_tokens=20_000_000,
        train_batch=4096, lr=1e-3, eval_tokens=200_000, ce_contexts=256, autointerp_features=40,
        ica_tokens=100_000, ica_max_iter=400, ioi_prompts=256, pronoun_prompts=256, patch_layer_step=1,
    ),
}


def default_profile_name() -> str:
    name = os.environ.get(ENV_VAR)
    if name:
        return name
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The named preset (default: $SAE_PROFILE), with any field overridden by keyword."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         f"(set ${ENV_VAR} or pass the name to get_profile)")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if unknown:
        raise ValueError(f"unknown profile field(s) {sorted(unknown)}; fields are "
                         f"{[f.name for f in dataclasses.fields(Profile)]}")
    for key in ("layers", "sae_ratios", "sae_alphas", "sae_tied", "improved_alphas", "topk_ks"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    profile = PROFILES[name].replace(**overrides)
    if profile.pick_ratio not in profile.sae_ratios:
        raise ValueError(f"pick_ratio {profile.pick_ratio} is not among sae_ratios {profile.sae_ratios}")
    if profile.sae_layer not in profile.layers:
        raise ValueError(f"sae_layer {profile.sae_layer} is not among the harvested layers {profile.layers}")
    return profile
