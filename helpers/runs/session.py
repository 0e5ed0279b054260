"""One object a notebook starts from: the profile, and what it names (the model, the activation stores,
the sweep and the SAE it chose, the SAEs at every layer, the massive-activation rules), each made on
first use and kept in the cache, and `cached` for any result that should survive an interrupted run.

    S = Session()                  # the profile $SAE_PROFILE names; Session("cpu", train_tokens=...) overrides
    S.model, S.store, S.sae        # the model, the training store, the chosen SAE (a Dictionary on the model's device)
    S.cached("curve", compute, inputs={"sae": S.sae, "tokens": 20_000}, code=("helpers.evals.heldout",))

Everything here is a convenience over the tensor-level functions (helpers' research API): what a
notebook cell computes from `S.model`, `S.store` or `S.sae` a reader can compute from their own.
"""
from __future__ import annotations

import re
import shutil
from functools import cached_property
from pathlib import Path

import torch

from helpers.activations.harvest import get_store
from helpers.activations.massive import Massive
from helpers.activations.models import load_model
from helpers.dictionaries.baselines import layer_dictionaries, massive_rule
from helpers.dictionaries.dictionary import Dictionary, SAEDictionary, device_of, load_sae
from helpers.results import rebuild, unbuild
from helpers.runs.sweep import Sweep, SweepRow, get_eval_store, get_sweep, layer_saes, load_sweep_sae, matched_topk
from helpers.settings.locks import tmp_name
from helpers.settings.paths import digest, stored
from helpers.settings.profiles import Profile, get_profile

NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)*$")


def key_of(value):
    """`value` as a cache key: a Dictionary by its name and directions, a prompt set by its texts, a
    model by its name and revision, a Profile by its settings (every section but "run"), containers
    item by item; plain values and tensors as they are."""
    if isinstance(value, Dictionary):
        return {"dictionary": value.name, "directions": value.directions.detach().float().cpu()}
    if isinstance(value, torch.nn.Module) and hasattr(value, "workbook_name"):
        return {"model": value.workbook_name, "revision": getattr(value, "workbook_revision", None)}
    if isinstance(value, Profile):
        return value.settings()
    if hasattr(value, "texts") and not isinstance(value, (str, bytes)):
        return {"texts": list(value.texts)}
    if isinstance(value, dict):
        return {str(k): key_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [key_of(v) for v in value]
    return value


class Session:
    """The profile and everything it names, made on first use (see the module docstring)."""

    def __init__(self, profile: str | Profile | None = None, **overrides):
        if isinstance(profile, Profile):
            self.profile = profile.replace(**overrides) if overrides else profile
        else:
            self.profile = get_profile(profile, **overrides)

    P = property(lambda self: self.profile, doc="The profile (short name, as the notebooks use it).")

    def __repr__(self) -> str:
        P = self.profile
        made = [name for name in ("model", "store", "sweep", "sae") if name in self.__dict__]
        return (f"Session(profile {P.name!r}: {P.model} on {P.corpus}, SAE at {P.sae_hook}, device {P.device}; "
                f"made so far: {', '.join(made) or 'nothing'})")

    @cached_property
    def model(self):
        """The profile's model (a TransformerBridge on the profile's device)."""
        return load_model(self.profile.model, device=self.profile.device)

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @property
    def hook(self) -> str:
        """The hook the sweep's SAEs read."""
        return self.profile.sae_hook

    @cached_property
    def store(self):
        """The training activations (harvested on first use)."""
        return get_store(self.profile, model=self.model)

    @cached_property
    def eval_store(self):
        """Held-out activations: the corpus's test split."""
        return get_eval_store(self.profile, model=self.model)

    @cached_property
    def score_store(self):
        """The POS-tagged activations features are scored on: the training store on Brown, the embedded
        Brown Corpus through the same model otherwise."""
        P = self.profile
        return self.store if P.scoring is P else get_store(P.scoring, model=self.model)

    @cached_property
    def sweep(self) -> Sweep:
        """The profile's sweep (trained and evaluated on first use)."""
        return get_sweep(self.profile, store=self.store, model=self.model)

    @property
    def chosen(self) -> SweepRow:
        """The sweep's row of the SAE it chose."""
        return self.sweep.chosen_row

    @cached_property
    def sae(self) -> SAEDictionary:
        """The SAE the sweep chose, as a Dictionary on the model's device."""
        return SAEDictionary(load_sweep_sae(self.sweep, self.sweep.chosen), name="SAE").to(self.device)

    @cached_property
    def topk(self) -> SAEDictionary | None:
        """The sweep's TopK SAE nearest the chosen SAE in L0 (None when the sweep has no TopK SAE)."""
        i = matched_topk(self.sweep)
        return None if i is None else SAEDictionary(load_sweep_sae(self.sweep, i), name="TopK SAE").to(self.device)

    def massive(self, layer: int | None = None) -> Massive:
        """The massive-activation rule at `layer` (default: the SAE's), fitted on the training store
        (inert when the profile turns the treatment off)."""
        layer = self.profile.sae_layer if layer is None else layer
        return massive_rule(self.profile, self.store, layer)

    @cached_property
    def layer_saes(self) -> dict:
        """{(layer, name): SAE} at every harvested layer (helpers.runs.sweep.layer_saes)."""
        return layer_saes(self.profile, self.store, self.sweep)

    def dictionaries(self, layer: int | None = None) -> dict:
        """Every dictionary compared at `layer` (default: the SAE's), by name, on the profile's device:
        the SAEs, PCA, ICA, neurons and random directions (helpers.dictionaries.baselines)."""
        layer = self.profile.sae_layer if layer is None else layer
        return layer_dictionaries(self.profile, layer, self.store, self.sweep, saes=self.layer_saes)

    def trained(self, name: str, train, inputs=None, code=()) -> SAEDictionary:
        """The SAE `train()` returns (an SAEDictionary), kept in the cache in SAELens layout under `name`
        and what it depends on (`inputs` beyond the model and the store, and the modules in `code`, as
        for `cached`): trained the first time, loaded (`load_sae`) afterwards. The folder is
        written under a temporary name and renamed into place, so an interrupted run leaves none."""
        if not NAME.match(name):
            raise ValueError(f"name {name!r}: letters, digits, '.', '_', '-', in '/'-separated parts")
        key = {"model": key_of(self.model), "store": self.store.path.name, "inputs": key_of(inputs)}
        folder = Path(self.profile.cache_dir) / "results" / f"{name}-{digest(key, code)}"
        if not (folder / "cfg.json").exists():
            sae = train()
            tmp = tmp_name(folder)
            sae.save(tmp)
            try:
                tmp.replace(folder)
            except OSError:  # saved by another process meanwhile: keep that one
                shutil.rmtree(tmp, ignore_errors=True)
        return load_sae(folder, name=name.rsplit("/", 1)[-1]).to(self.device)

    def cached(self, name: str, compute, inputs=None, code=()):
        """`compute()`'s result, kept in the cache under `name` (a path such as "patching/plain"):
        computed the first time, loaded afterwards while `inputs` and `code` are unchanged (see
        helpers.settings.paths.stored). `inputs` names what the result depends on beyond the model and
        the store (settings, prompt sets, dictionaries: `key_of` reads each); `code` the modules that
        compute it. Typed results (helpers.results.Result, alone or in lists and dicts) are kept as their
        `to_dict()` and come back as the same types."""
        if not NAME.match(name):
            raise ValueError(f"name {name!r}: letters, digits, '.', '_', '-', in '/'-separated parts")
        key = {"model": key_of(self.model), "store": self.store.path.name, "inputs": key_of(inputs)}
        path = Path(self.profile.cache_dir) / "results" / f"{name}.pt"
        return rebuild(stored(path, key, lambda: unbuild(compute()), code=code))
