"""Settings profiles: every size, budget and path a notebook uses comes from one `Profile`.

Pick a preset with the environment variable ``SAE_PROFILE`` (``test``, ``cpu``, ``gpu``, ``paper``)
or in a notebook's first cell, where any field can also be overridden::
    P = get_profile()                           # $SAE_PROFILE, else "gpu" with CUDA, else "cpu"
    P = get_profile("cpu", harvest_tokens=50_000)

A JSON object in ``SAE_OVERRIDES`` overrides fields of whichever profile is selected, before the
keyword overrides (``SAE_OVERRIDES='{"harvest_tokens": 50000, "layers": [1, 2]}'``): any profile can be
shrunk without editing a notebook. Every profile is checked when it is made (a preset, `get_profile`,
`Profile.replace`, ``SAE_OVERRIDES``), before any work: an unknown field, a value of the wrong type or
outside its field's range (`RANGES`: ``batch_contexts`` at least 1, ``lr`` a finite number above 0,
``layers`` distinct and not negative, ...) is refused with a message naming the field, the value and
what is allowed.

``test`` is what the test suite (nbval) runs: seconds to a couple of minutes per notebook.
``cpu`` is a laptop: the whole workbook on 2 CPU cores, 16 SAEs in notebook 02 (the README has the times).
``gpu`` is the embedded model at full scale on one GPU. ``colab`` is the paper's model and data
(Pythia-70M-deduped on the Pile) sized for Colab's free T4 (15 GB GPU, 12 GB RAM, a cache that fits
15 GB of Google Drive, each notebook well under an hour); ``paper`` is the paper's full setting for a
bigger GPU (A100/L4) with disk to match. `helpers.runs.plan` says what a profile needs before it runs.

A model trained on the Pile has no POS tags to score features against: `Profile.scoring` is the
profile whose store notebooks 03 and 04 score on: the profile itself on the Brown Corpus, else the
embedded Brown Corpus harvested through the same model (``score_tokens`` of it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.activations.hooks import name as hook_name
from helpers.settings.paths import cache_root

ENV_VAR = "SAE_PROFILE"
OVERRIDES_VAR = "SAE_OVERRIDES"
EMBEDDED_MODEL = "smollm2-135m-instruct"
PAPER_MODEL = "EleutherAI/pythia-70m-deduped"


@dataclass(frozen=True)
class Profile:
    """One named set of settings. Fields are documented where they are used."""

    name: str
    model: str = EMBEDDED_MODEL           # helpers.activations.models.load_model name
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
    tied_alphas: tuple[float, ...] = ()                # extra tied L1 SAEs (anthropic2023 recipe) at pick_ratio
    improved_alphas: tuple[float, ...] = ()            # improved-recipe L1 SAEs (at pick_ratio)
    topk_ks: tuple[int, ...] = (16,)                   # TopK SAEs for comparison ...
    topk_ratio: float = 2                              # ... at this R, as the other architectures below
    batchtopk_ks: tuple[int, ...] = ()                 # BatchTopK SAEs (k per token on average)
    matryoshka_ks: tuple[int, ...] = ()                # Matryoshka BatchTopK SAEs (doubling groups)
    jumprelu_coefficients: tuple[float, ...] = ()      # JumpReLU SAEs: their L0 coefficients λ
    lab_tokens: int = 200_000             # ground-truth lab (notebook 02): training tokens per setting
    train_tokens: int = 32_256            # activations seen by each SAE (epochs over the store)
    train_batch: int = 256
    lr: float = 2e-3
    massive: bool = True                  # give massive activations their own treatment (helpers.activations.massive)
    massive_control: bool = True          # ... and train a twin of an improved-L1 SAE without it, for comparison
    curve_points: int = 4                 # learning-curve points (log-spaced in tokens seen)
    curve_contexts: int = 4               # held-out contexts for the learning curve's CE-loss recovered
    eval_tokens: int = 4_032              # held-out (test split) activations for evaluation
    ce_contexts: int = 16                 # held-out contexts for CE-loss recovered
    # --- interpretation (notebook 03) and baselines (04) ---
    score_tokens: int | None = None       # store tokens for feature statistics and concept scores (None: all)
    autointerp_features: int = 2          # features per dictionary scored by explain-simulate-score
    # --- baselines (notebook 04) ---
    pca_tokens: int | None = None         # activations PCA is fitted on (None: the whole store, streamed)
    ica_tokens: int = 16_128              # activations FastICA is fitted on
    ica_max_iter: int = 30                # FastICA iterations (non-convergence is reported)
    # --- patching and editing (notebook 05) ---
    ioi_prompts: int = 64                 # IOI prompts generated (those the model fails are dropped)
    pronoun_prompts: int = 64             # pronoun prompts generated
    patch_layer_step: int = 4             # plain residual patching at every n-th layer (and the last)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # checked; values kept as given (they name the cached results)
            value = _check_value(f.name, getattr(self, f.name), f"profile {self.name!r}")
            if isinstance(getattr(self, f.name), list):  # but a list given for a tuple field becomes a tuple
                object.__setattr__(self, f.name, value)
        _check_profile(self)

    def hook_at(self, layer: int) -> str:
        """This profile's hook kind at a layer (blocks.<layer>.hook_<kind>)."""
        return hook_name(layer, self.hook)

    @property
    def hooks(self) -> list[str]:
        return [self.hook_at(layer) for layer in self.layers]

    @property
    def sae_hook(self) -> str:
        return self.hook_at(self.sae_layer)

    @property
    def cache_dir(self) -> Path:
        """Where this profile's activations and runs live (git-ignored)."""
        return cache_root() / self.name

    def replace(self, **changes) -> "Profile":
        """A copy with `changes` applied, checked as every profile is (a ValueError names a bad field)."""
        return dataclasses.replace(self, **changes)

    @property
    def scoring(self) -> "Profile":
        """The profile whose store concept scores are computed on: this one where the corpus carries
        POS tags (Brown), else the embedded Brown Corpus through the same model, `score_tokens` of it
        (50k if unset). Its store lives beside the training store, under its own name."""
        if self.corpus == "brown":
            return self
        return self.replace(corpus="brown", harvest_tokens=self.score_tokens or 50_000)


TUPLE_FIELDS = ("layers", "sae_ratios", "sae_alphas", "sae_tied", "improved_alphas", "tied_alphas", "topk_ks",
                "batchtopk_ks", "matryoshka_ks", "jumprelu_coefficients")
EMPTY_TUPLE_FIELDS = ("tied_alphas", "improved_alphas", "batchtopk_ks", "matryoshka_ks", "jumprelu_coefficients")  # may be empty lists


@dataclass(frozen=True)
class Range:
    """The values a number field (or each element of a list field) may take: from `low` (excluded when
    `above`) to `high`; `finite` refuses inf and nan."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    finite: bool = True

    def __contains__(self, v) -> bool:
        if v != v or (self.finite and v in (math.inf, -math.inf)):
            return False
        if self.low is not None and (v <= self.low if self.above else v < self.low):
            return False
        return self.high is None or v <= self.high

    def describe(self, kind: type) -> str:
        """"an int ≥ 1", "a finite number > 0", ..."""
        def num(x):
            return str(int(x)) if float(x).is_integer() else f"{x:g}"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.above else '≥'} {num(self.low)}")
        if self.high is not None:
            bounds.append(f"≤ {num(self.high)}")
        what = "an int" if kind is int else "a finite number" if self.finite else "a number (inf allowed)"
        return f"{what} {' and '.join(bounds)}"


AT_LEAST_1, ABOVE_0 = Range(1), Range(0, above=True)
# The allowed values of each number field (of each element, for list fields); fields not named are checked
# for type only, or below (corpus, store_dtype, hook, device).
RANGES: dict[str, Range] = {
    "layers": Range(0), "ctx_len": Range(2), "harvest_tokens": AT_LEAST_1, "batch_contexts": AT_LEAST_1,
    "shard_contexts": AT_LEAST_1, "seed": Range(0, 2**32 - 1), "sae_layer": Range(0), "sae_ratios": ABOVE_0,
    "sae_alphas": ABOVE_0, "pick_ratio": ABOVE_0, "pick_max_l0": Range(0, above=True, finite=False),
    "tied_alphas": ABOVE_0, "improved_alphas": ABOVE_0, "topk_ks": AT_LEAST_1, "topk_ratio": ABOVE_0,
    "batchtopk_ks": AT_LEAST_1, "matryoshka_ks": AT_LEAST_1, "jumprelu_coefficients": ABOVE_0,
    "lab_tokens": AT_LEAST_1, "train_tokens": AT_LEAST_1, "train_batch": AT_LEAST_1, "lr": ABOVE_0,
    "curve_points": AT_LEAST_1, "curve_contexts": AT_LEAST_1, "eval_tokens": AT_LEAST_1, "ce_contexts": AT_LEAST_1,
    "score_tokens": AT_LEAST_1, "autointerp_features": Range(0), "pca_tokens": Range(2), "ica_tokens": Range(2),
    "ica_max_iter": AT_LEAST_1, "ioi_prompts": Range(2), "pronoun_prompts": Range(2), "patch_layer_step": AT_LEAST_1,
}


def _check_value(name: str, value, source: str):
    """`value` for field `name`, as the field's type (lists become tuples) and within its `RANGES`;
    else a ValueError naming `source`, the field, the value and what is allowed."""
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    if name not in fields:
        raise ValueError(f"unknown profile field {name!r} in {source}; fields are {sorted(fields)}")
    hint = typing.get_type_hints(Profile)[name]
    default = fields[name].default
    allowed = RANGES.get(name)
    if name in TUPLE_FIELDS:
        elem = typing.get_args(hint)[0]
        example = list(default) or [{int: 16, float: 1e-3, bool: False}[elem]]
        if not isinstance(value, (list, tuple)) or not (value or name in EMPTY_TUPLE_FIELDS):
            raise ValueError(f"{source}: {name} must be a non-empty list, e.g. {example}, not {value!r}")
        ok = all(isinstance(v, bool) if elem is bool else
                 isinstance(v, (int, float)) and not isinstance(v, bool) and (elem is float or float(v).is_integer())
                 for v in value)
        if not ok:
            raise ValueError(f"{source}: {name} must be a list of {elem.__name__}, e.g. {example}, not {value!r}")
        out = tuple(elem(v) for v in value)
        bad = [v for v in out if allowed is not None and v not in allowed]
        if bad:
            raise ValueError(f"{source}: {name}={list(value)!r} holds {bad[0]!r}; each must be "
                             f"{allowed.describe(elem)}")
        if len(set(out)) != len(out):
            raise ValueError(f"{source}: {name}={list(value)!r} repeats {next(v for v in out if out.count(v) > 1)!r}; "
                             "each value may appear once")
        return out
    if value is None and "None" in str(hint):
        return None
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        example = "" if default is dataclasses.MISSING else f", e.g. {default!r}"
        raise ValueError(f"{source}: {name} must be {kind.__name__}{' or null' if 'None' in str(hint) else ''}"
                         f"{example}, not {value!r}")
    given = value
    if kind is int:
        value = int(value)
    elif kind is float and not isinstance(value, float):  # an int stays one where the default is (pick_ratio=2)
        value = type(default)(value) if isinstance(default, (int, float)) else float(value)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{source}: {name}={given!r} is out of range: it must be {allowed.describe(kind)}")
    return value


def _check_profile(p: "Profile") -> None:
    """The checks that concern several fields, or a string field's allowed values."""
    if p.pick_ratio not in p.sae_ratios:
        raise ValueError(f"pick_ratio {p.pick_ratio} is not among sae_ratios {p.sae_ratios}")
    if p.sae_layer not in p.layers:
        raise ValueError(f"sae_layer {p.sae_layer} is not among the harvested layers {p.layers}")
    if p.corpus not in ("brown", "pile"):
        raise ValueError(f"corpus {p.corpus!r}: choose 'brown' (embedded) or 'pile'")
    if p.store_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"store_dtype {p.store_dtype!r}: choose 'float16' or 'bfloat16'")
    if not p.name or not all(c.isalnum() or c in "-_." for c in p.name) or p.name.startswith("."):
        raise ValueError(f"profile name {p.name!r}: use letters, digits, '-', '_' and '.' (it names a cache folder)")
    if not p.hook or not p.hook.replace("_", "").isalnum():
        raise ValueError(f"hook {p.hook!r}: a hook kind such as 'resid_post' (letters, digits and '_')")
    if p.device != "auto":
        try:
            torch.device(p.device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"device {p.device!r}: 'auto', 'cpu', 'cuda', 'cuda:1', ... ({e})") from None
    if p.train_tokens < p.train_batch:
        raise ValueError(f"train_tokens {p.train_tokens} is less than one training batch (train_batch "
                         f"{p.train_batch}): each SAE would take no step")


# JumpReLU λ for the cpu profile, aimed at L0 ≈ 32 at R = 4. Not measured on the cpu sweep itself: a short run
# (300 steps of 1,024 tokens at lr 4e-3, R = 4, on the test profile's 16k layer-6 tokens) ended at L0 27.4, 19.1
# and 15.9 for λ = 1e-3, 3e-3, 1e-2, still falling slowly; so the cpu sweep's 1,200 steps should bracket 32 with these.
JUMPRELU_CPU = (5e-4, 1e-3)

PROFILES: dict[str, Profile] = {
    "test": Profile(
        "test", layers=(2, 6), ctx_len=64, harvest_tokens=16_128, batch_contexts=16, improved_alphas=(3e-3, 5e-3, 1e-2),
        shard_contexts=64, ioi_prompts=16, pronoun_prompts=16, patch_layer_step=6, autointerp_features=1, lab_tokens=60_000,
        curve_points=3, curve_contexts=2,
    ),
    "cpu": Profile(
        "cpu", layers=(3, 6, 9), ctx_len=128, harvest_tokens=300_000, batch_contexts=16,
        shard_contexts=256, sae_ratios=(1, 4), sae_alphas=(2e-3, 3e-3, 4e-3), pick_ratio=4,
        improved_alphas=(2e-3, 3e-3, 4e-3), tied_alphas=(3e-3,), topk_ks=(32,), topk_ratio=4, train_tokens=1_228_800,
        batchtopk_ks=(32,), matryoshka_ks=(32,), jumprelu_coefficients=JUMPRELU_CPU,
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
    "colab": Profile(
        "colab", model=PAPER_MODEL, corpus="pile", layers=(1, 2, 3), ctx_len=256,
        harvest_tokens=2_000_000, batch_contexts=64, shard_contexts=512, store_dtype="float16",
        sae_layer=2, sae_ratios=(1, 2, 4, 8), sae_alphas=(1e-3, 2e-3, 4e-3), pick_ratio=8,
        sae_tied=(True, False), improved_alphas=(1e-3, 2e-3, 4e-3), topk_ks=(32, 64), topk_ratio=8,
        train_tokens=10_000_000, train_batch=4096, lr=1e-3, eval_tokens=100_000, ce_contexts=128,
        score_tokens=50_000, autointerp_features=10, pca_tokens=200_000, ica_tokens=20_000, ica_max_iter=100,
        ioi_prompts=128, pronoun_prompts=128, patch_layer_step=1,
    ),
    "paper": Profile(
        "paper", model=PAPER_MODEL, corpus="pile", layers=tuple(range(6)), ctx_len=256,
        harvest_tokens=5_000_000, batch_contexts=64, shard_contexts=1024, store_dtype="bfloat16",
        sae_layer=2, sae_ratios=(0.5, 1, 2, 4, 8, 16, 32), sae_alphas=(1e-3, 2e-3, 4e-3, 8e-3), pick_ratio=8,
        sae_tied=(True, False), improved_alphas=(5e-4, 1e-3, 2e-3, 4e-3), topk_ks=(16, 32, 64), topk_ratio=8,
        train_tokens=20_000_000,
        train_batch=4096, lr=1e-3, eval_tokens=200_000, ce_contexts=256, score_tokens=300_000,
        autointerp_features=40, pca_tokens=200_000, ica_tokens=50_000, ica_max_iter=200, ioi_prompts=256,
        pronoun_prompts=256,
        patch_layer_step=1,
    ),
}


def default_profile_name() -> str:
    name = os.environ.get(ENV_VAR)
    if name:
        return name
    try:
        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def env_overrides() -> dict:
    """The profile fields set by $SAE_OVERRIDES (a JSON object), checked; {} when it is unset."""
    raw = os.environ.get(OVERRIDES_VAR, "").strip()
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"${OVERRIDES_VAR} is not valid JSON ({e}): write a JSON object such as "
                         '\'{"harvest_tokens": 50000}\'') from None
    if not isinstance(obj, dict):
        raise ValueError(f"${OVERRIDES_VAR} must be a JSON object of profile fields, not {type(obj).__name__}")
    if "name" in obj:
        raise ValueError(f"${OVERRIDES_VAR} cannot set 'name': choose the profile with ${ENV_VAR}")
    return {k: _check_value(k, v, f"${OVERRIDES_VAR}") for k, v in obj.items()}


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The named preset (default: $SAE_PROFILE), with the fields of $SAE_OVERRIDES and then any
    keyword overrides applied."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         f"(set ${ENV_VAR} or pass the name to get_profile)")
    changes = env_overrides()
    changes.update({k: _check_value(k, v, "get_profile") for k, v in overrides.items()})
    return PROFILES[name].replace(**changes)
