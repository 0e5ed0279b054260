"""Settings profiles: every size, budget and path a notebook uses comes from one `Profile`.

Pick a preset with the environment variable ``SAE_PROFILE`` (``test``, ``cpu``, ``gpu``, ``paper``)
or in a notebook's first cell, where any field can also be overridden::
    P = get_profile()                           # $SAE_PROFILE, else "gpu" with CUDA, else "cpu"
    P = get_profile("cpu", harvest_tokens=50_000)

A JSON object in ``SAE_OVERRIDES`` overrides fields of whichever profile is selected, before the
keyword overrides (``SAE_OVERRIDES='{"harvest_tokens": 50000, "layers": [1, 2]}'``): any profile can be
shrunk without editing a notebook. Every profile is checked when it is made (a preset, `get_profile`,
`Profile.replace`, ``SAE_OVERRIDES``), before any work: an unknown field, a value of the wrong type or
outside its field's range (each field's `setting(section, default, allowed)`: ``batch_contexts`` at
least 1, ``lr`` a finite number above 0, ``layers`` distinct and not negative, ...) or a malformed
``grid`` is refused with a message naming the field, the value and what is allowed.

A profile is in sections (`SECTIONS`: run, data, layers, sweep, lab, scoring, baselines, editing); a
cached result is keyed by the sections it depends on (`Profile.settings`). The sweep's SAEs are one
field, ``grid``: {architecture: settings}, e.g. ``{"standard": {"ratio": (1, 4), "l1_coefficient":
(2e-3, 4e-3)}, "topk": {"ratio": 4, "k": 32}}`` (a list value is an axis of a product), so a new
architecture joins a sweep by being named in it.

``test`` is what the test suite (nbval) runs: seconds to a couple of minutes per notebook.
``cpu`` is a laptop: the whole workbook on 2 CPU cores, 16 SAEs in notebook 02 (docs/performance.md has the times).
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
from helpers.saes import architectures
from helpers.saes.stack import SAEConfig
from helpers.settings.paths import cache_root

ENV_VAR = "SAE_PROFILE"
OVERRIDES_VAR = "SAE_OVERRIDES"
EMBEDDED_MODEL = "smollm2-135m-instruct"
PAPER_MODEL = "EleutherAI/pythia-70m-deduped"


# The sections of a profile: what each group of settings is for. A cached result is keyed by the
# sections it depends on (`Profile.settings`), so a setting added to a section changes exactly the
# results that read that section.
SECTIONS = {
    "run": "where it runs and the name of its cache folder (no result depends on these)",
    "data": "the activations: model, corpus, hook kind, context length, tokens harvested and their storage",
    "layers": "the residual-stream layers harvested and compared (notebooks 01 and 04)",
    "sweep": "the SAEs of notebook 02: the grid, training, evaluation, and the rule that picks the SAE later "
             "notebooks use",
    "lab": "the ground-truth lab (notebook 02)",
    "scoring": "scoring features (notebook 03)",
    "baselines": "the baselines fitted at every layer (notebook 04)",
    "editing": "patching and editing (notebook 05)",
}


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


def setting(section: str, default=dataclasses.MISSING, allowed: Range | None = None, *, factory=None):
    """A profile field in `section` (one of SECTIONS) whose number (or each list element) must lie in
    `allowed`."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}: one of {tuple(SECTIONS)}")
    meta = {"section": section, "allowed": allowed}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _default_grid() -> dict:
    return {"standard": {"ratio": (0.5, 2), "l1_coefficient": (3e-3, 5e-3, 1e-2)},
            "topk": {"ratio": 2, "k": 16}}


@dataclass(frozen=True)
class Profile:
    """One named set of settings, in sections (SECTIONS; each field says its own). Fields are read by
    name (``P.harvest_tokens``) and set by name (`get_profile`, `replace`, ``SAE_OVERRIDES``)."""

    name: str = setting("run")
    device: str = setting("run", "auto")            # "auto": cuda if available, else cpu
    # --- the activations (notebook 01) ---
    model: str = setting("data", EMBEDDED_MODEL)    # helpers.activations.models.load_model name
    corpus: str = setting("data", "brown")          # "brown" (embedded) or "pile" (online only)
    hook: str = setting("data", "resid_post")       # hook kind at each layer: blocks.{L}.hook_{hook}
    ctx_len: int = setting("data", 128, Range(2))   # tokens per context, BOS included (paper: 256)
    harvest_tokens: int = setting("data", 200_000, AT_LEAST_1)  # activations harvested per hook (BOS excluded)
    batch_contexts: int = setting("data", 16, AT_LEAST_1)       # contexts per forward pass while harvesting
    shard_contexts: int = setting("data", 256, AT_LEAST_1)      # contexts per store shard (one file per hook)
    store_dtype: str = setting("data", "float16")   # on-disk activation dtype: float16 or bfloat16
    seed: int = setting("data", 0, Range(0, 2**32 - 1))  # the corpus sample's, the SAEs' and the baselines' seed
    layers: tuple[int, ...] = setting("layers", (6,), Range(0))  # residual-stream layers to harvest
    # --- the SAE sweep (notebook 02) ---
    sae_layer: int = setting("sweep", 6, Range(0))  # the layer whose residual stream the SAEs learn
    # The SAEs trained: {architecture: settings}, settings a dict of SAEConfig fields plus ``ratio``
    # (R = d_sae / d_in), or a list of such dicts; a list value in a dict is one axis of a product
    # ({"ratio": (1, 4), "l1_coefficient": (1e-3, 2e-3)} is four SAEs). helpers.runs.sweep.grid.
    grid: dict = setting("sweep", factory=_default_grid)
    pick_ratio: float = setting("sweep", 2, ABOVE_0)  # R of the L1 SAE that later notebooks use ...
    pick_max_l0: float = setting("sweep", 50, Range(0, above=True, finite=False))  # ... with at most this L0
    train_tokens: int = setting("sweep", 32_256, AT_LEAST_1)  # activations seen by each SAE (epochs over the store)
    train_batch: int = setting("sweep", 256, AT_LEAST_1)
    lr: float = setting("sweep", 2e-3, ABOVE_0)
    massive: bool = setting("sweep", True)          # give massive activations their own treatment (helpers.activations.massive)
    massive_control: bool = setting("sweep", True)  # ... and train a twin of an improved-L1 SAE without it, for comparison
    curve_points: int = setting("sweep", 4, AT_LEAST_1)    # learning-curve points (log-spaced in tokens seen)
    curve_contexts: int = setting("sweep", 4, AT_LEAST_1)  # held-out contexts for the learning curve's CE-loss recovered
    eval_tokens: int = setting("sweep", 4_032, AT_LEAST_1)  # held-out (test split) activations for evaluation
    ce_contexts: int = setting("sweep", 16, AT_LEAST_1)    # held-out contexts for CE-loss recovered
    lab_tokens: int = setting("lab", 200_000, AT_LEAST_1)  # ground-truth lab: training tokens per setting
    # --- interpretation (notebook 03) ---
    score_tokens: int | None = setting("scoring", None, AT_LEAST_1)  # store tokens for feature statistics and concept scores (None: all)
    autointerp_features: int = setting("scoring", 2, Range(0))  # features per dictionary scored by explain-simulate-score
    # --- baselines (notebook 04) ---
    pca_tokens: int | None = setting("baselines", None, Range(2))  # activations PCA is fitted on (None: the whole store, streamed)
    ica_tokens: int = setting("baselines", 16_128, Range(2))       # activations FastICA is fitted on
    ica_max_iter: int = setting("baselines", 30, AT_LEAST_1)       # FastICA iterations (non-convergence is reported)
    # --- patching and editing (notebook 05) ---
    ioi_prompts: int = setting("editing", 64, Range(2))      # IOI prompts generated (those the model fails are dropped)
    pronoun_prompts: int = setting("editing", 64, Range(2))  # pronoun prompts generated
    patch_layer_step: int = setting("editing", 4, AT_LEAST_1)  # plain residual patching at every n-th layer (and the last)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # checked; lists become tuples, the grid its normal form
            object.__setattr__(self, f.name, _check_value(f.name, getattr(self, f.name), f"profile {self.name!r}"))
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

    def settings(self, *sections: str) -> dict:
        """{section: {field: value}} for `sections` (default: every section but "run"), JSON-ready:
        what a result that depends on those sections is keyed by."""
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown section {unknown[0]!r}: one of {tuple(SECTIONS)}")
        wanted = sections or tuple(s for s in SECTIONS if s != "run")
        out = {s: {} for s in wanted}
        for f in dataclasses.fields(self):
            if f.metadata["section"] in out:
                out[f.metadata["section"]][f.name] = getattr(self, f.name)
        return json.loads(json.dumps(out))

    @staticmethod
    def section_of(field: str) -> str:
        """The section a field belongs to."""
        return _FIELDS[field].metadata["section"] if field in _FIELDS else _unknown_field(field, "Profile.section_of")

    @property
    def scoring(self) -> "Profile":
        """The profile whose store concept scores are computed on: this one where the corpus carries
        POS tags (Brown), else the embedded Brown Corpus through the same model, `score_tokens` of it
        (50k if unset). Its store lives beside the training store, under its own name."""
        if self.corpus == "brown":
            return self
        return self.replace(corpus="brown", harvest_tokens=self.score_tokens or 50_000)


_FIELDS = {f.name: f for f in dataclasses.fields(Profile)}
_HINTS = typing.get_type_hints(Profile)


def _unknown_field(name: str, source: str):
    raise ValueError(f"unknown profile field {name!r} in {source}; fields are {sorted(_FIELDS)}")


def _check_value(name: str, value, source: str):
    """`value` for field `name`, as the field's type (lists become tuples, the grid its normal form)
    and within the field's allowed range; else a ValueError naming `source`, the field, the value and
    what is allowed."""
    if name not in _FIELDS:
        _unknown_field(name, source)
    if name == "grid":
        return _check_grid(value, source)
    hint = _HINTS[name]
    field = _FIELDS[name]
    default = field.default
    allowed = field.metadata["allowed"]
    if typing.get_origin(hint) is tuple:
        elem = typing.get_args(hint)[0]
        example = list(default)
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{source}: {name} must be a non-empty list, e.g. {example}, not {value!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and (elem is float or float(v).is_integer())
                   for v in value):
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


# The SAEConfig fields a grid entry may set (with "ratio"); the rest follow from the model and profile.
GRID_SETTINGS = tuple(f.name for f in dataclasses.fields(SAEConfig)
                      if f.name not in ("d_in", "d_sae", "architecture", "hook_name", "model_name"))
GRID_EXAMPLE = '{"standard": {"ratio": [1, 4], "l1_coefficient": [2e-3, 4e-3]}, "topk": {"ratio": 4, "k": 32}}'


def _check_grid(value, source: str) -> dict:
    """The sweep grid in its normal form, {architecture: (settings, ...)}, each settings a dict of
    {field: (values, ...)}; else a ValueError saying what is wrong and how a grid is written."""
    def refuse(what):
        raise ValueError(f"{source}: grid {what}; a grid is {{architecture: settings or a list of settings}}, "
                         f"e.g. {GRID_EXAMPLE}")

    if not isinstance(value, dict) or not value:
        refuse(f"must be a non-empty dict, not {value!r}")
    out = {}
    for arch, blocks in value.items():
        if arch not in architectures.ARCHITECTURES:
            refuse(f"names {arch!r}, which is not a registered architecture ({', '.join(architectures.ARCHITECTURES)})")
        blocks = [blocks] if isinstance(blocks, dict) else blocks
        if not isinstance(blocks, (list, tuple)) or not blocks or not all(isinstance(b, dict) for b in blocks):
            refuse(f"{arch!r}: its settings must be a dict or a non-empty list of dicts, not {blocks!r}")
        normal = []
        for block in blocks:
            if "ratio" not in block:
                refuse(f"{arch!r}: {block!r} has no ratio (R = d_sae / d_in)")
            entry = {}
            for key, values in block.items():
                if key != "ratio" and key not in GRID_SETTINGS:
                    refuse(f"{arch!r}: {key!r} is not an SAE setting (ratio, {', '.join(GRID_SETTINGS)})")
                values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
                if not values or len(set(values)) != len(values):
                    refuse(f"{arch!r}: {key} must list each value once, not {list(values)!r}")
                for v in values:
                    number = isinstance(v, (int, float)) and not isinstance(v, bool)
                    if not (number or isinstance(v, (bool, str))) or number and not math.isfinite(v):
                        refuse(f"{arch!r}: {key}={v!r} is not a finite number, a bool or a name")
                if key == "ratio" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                              for v in values):
                    refuse(f"{arch!r}: ratio {list(values)!r} must be numbers > 0")
                entry[key] = values
            normal.append(entry)
        out[arch] = tuple(normal)
    return out


def grid_ratios(grid: dict, architecture: str = "standard") -> set:
    """The ratios an architecture is trained at in a grid."""
    return {r for block in grid.get(architecture, ()) for r in block["ratio"]}


def _check_profile(p: "Profile") -> None:
    """The checks that concern several fields, or a string field's allowed values."""
    ratios = grid_ratios(p.grid)
    if p.pick_ratio not in ratios:
        raise ValueError(f"pick_ratio {p.pick_ratio} is not among the ratios of the grid's L1 SAEs "
                         f"(grid['standard']: {sorted(ratios)})")
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
        "test", layers=(2, 6), ctx_len=64, harvest_tokens=16_128, batch_contexts=16,
        grid={"standard": [{"ratio": (0.5, 2), "l1_coefficient": (3e-3, 5e-3, 1e-2)},
                           {"ratio": 2, "l1_coefficient": (3e-3, 5e-3, 1e-2), "recipe": "improved"}],
              "topk": {"ratio": 2, "k": 16}},
        shard_contexts=64, ioi_prompts=16, pronoun_prompts=16, patch_layer_step=6, autointerp_features=1, lab_tokens=60_000,
        curve_points=3, curve_contexts=2, ce_contexts=8, ica_tokens=8_064,
    ),
    "cpu": Profile(
        "cpu", layers=(3, 6, 9), ctx_len=128, harvest_tokens=300_000, batch_contexts=16, shard_contexts=256,
        grid={"standard": [{"ratio": (1, 4), "l1_coefficient": (2e-3, 3e-3, 4e-3)},
                           {"ratio": 4, "l1_coefficient": 3e-3, "tied": True},
                           {"ratio": 4, "l1_coefficient": (2e-3, 3e-3, 4e-3), "recipe": "improved"}],
              "topk": {"ratio": 4, "k": 32}, "batchtopk": {"ratio": 4, "k": 32},
              "matryoshka_batchtopk": {"ratio": 4, "k": 32}, "jumprelu": {"ratio": 4, "l0_coefficient": JUMPRELU_CPU}},
        pick_ratio=4, train_tokens=1_228_800,
        train_batch=1024, lr=4e-3, curve_points=4, curve_contexts=2, eval_tokens=16_256, ce_contexts=16,
        score_tokens=50_000, autointerp_features=1, ica_tokens=20_000, ica_max_iter=60, ioi_prompts=48,
        pronoun_prompts=48, patch_layer_step=4,
    ),
    "gpu": Profile(
        "gpu", layers=tuple(range(0, 30, 2)), ctx_len=256, harvest_tokens=1_200_000,
        batch_contexts=64, shard_contexts=1024, store_dtype="bfloat16",
        grid={"standard": [{"tied": (True, False), "ratio": (0.5, 1, 2, 4, 8, 16, 32),
                            "l1_coefficient": (1e-3, 2e-3, 4e-3, 8e-3)},
                           {"ratio": 8, "l1_coefficient": (5e-4, 1e-3, 2e-3, 4e-3), "recipe": "improved"}],
              "topk": {"ratio": 8, "k": (16, 32, 64)}},
        pick_ratio=8, train_tokens=10_000_000,
        train_batch=4096, lr=1e-3, eval_tokens=100_000, ce_contexts=256, autointerp_features=40,
        ica_tokens=100_000, ica_max_iter=400, ioi_prompts=256, pronoun_prompts=256, patch_layer_step=1,
    ),
    "colab": Profile(
        "colab", model=PAPER_MODEL, corpus="pile", layers=(1, 2, 3), ctx_len=256,
        harvest_tokens=2_000_000, batch_contexts=64, shard_contexts=512, store_dtype="float16", sae_layer=2,
        grid={"standard": [{"tied": (True, False), "ratio": (1, 2, 4, 8), "l1_coefficient": (1e-3, 2e-3, 4e-3)},
                           {"ratio": 8, "l1_coefficient": (1e-3, 2e-3, 4e-3), "recipe": "improved"}],
              "topk": {"ratio": 8, "k": (32, 64)}},
        pick_ratio=8, train_tokens=10_000_000, train_batch=4096, lr=1e-3, eval_tokens=100_000, ce_contexts=128,
        score_tokens=50_000, autointerp_features=10, pca_tokens=200_000, ica_tokens=20_000, ica_max_iter=100,
        ioi_prompts=128, pronoun_prompts=128, patch_layer_step=1,
    ),
    "paper": Profile(
        "paper", model=PAPER_MODEL, corpus="pile", layers=tuple(range(6)), ctx_len=256,
        harvest_tokens=5_000_000, batch_contexts=64, shard_contexts=1024, store_dtype="bfloat16", sae_layer=2,
        grid={"standard": [{"tied": (True, False), "ratio": (0.5, 1, 2, 4, 8, 16, 32),
                            "l1_coefficient": (1e-3, 2e-3, 4e-3, 8e-3)},
                           {"ratio": 8, "l1_coefficient": (5e-4, 1e-3, 2e-3, 4e-3), "recipe": "improved"}],
              "topk": {"ratio": 8, "k": (16, 32, 64)}},
        pick_ratio=8, train_tokens=20_000_000,
        train_batch=4096, lr=1e-3, eval_tokens=200_000, ce_contexts=256, score_tokens=300_000,
        autointerp_features=40, pca_tokens=200_000, ica_tokens=50_000, ica_max_iter=200, ioi_prompts=256,
        pronoun_prompts=256, patch_layer_step=1,
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
