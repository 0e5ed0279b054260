"""The profile's SAEs, end to end: the sweep's grid, training, evaluation, and the SAE it picks.

`get_sweep(profile)` trains the grid in one pass (helpers.saes.train):

* the SAEs of the profile's ``grid``, {architecture: settings} (helpers.settings.profiles; `grid`
  expands it): L1 SAEs ("standard") of Anthropic's 2023 recipe, a unit-norm dictionary and resampling
  (recipe "anthropic2023": see helpers.saes.stack for how it differs from the seed paper's code), tied
  or not (the seed paper's residual-stream SAEs were tied), and of the improved recipe (Anthropic, April
  2024; ``"recipe": "improved"``); TopK, BatchTopK, Matryoshka BatchTopK and JumpReLU SAEs (the
  architectures of helpers.saes.architectures, or any architecture registered since);
* a control: the middle improved-recipe SAE again, trained without the massive-activation treatment
  (``massive_control``), so that notebook 02 can show what the treatment does. It is never chosen.

While they train it records a learning curve (held-out FVU over all and ordinary tokens for every
SAE; CE-loss recovered for those at ``pick_ratio``) at ``curve_points`` log-spaced points. It then
evaluates every SAE on held-out activations and inside the model (helpers.evals.reconstruction), on two disjoint
halves of the held-out contexts (`eval_split`): the rule below chooses on the first half ("select",
columns ``select_*``), and every reported figure comes from the second ("report"). It saves each SAE
in SAELens layout and the table in ``results.json``; MMCS between sizes is reported beside the MMCS of
the same pair at initialisation and of random dictionaries (`mmcs_table`). A finished sweep is loaded, not retrained; an
interrupted one resumes from its checkpoint. `get_sae(profile)` returns the chosen SAE.

The cache: a sweep's folder is named by a hash of its `fingerprint`, what its results depend on (the
profile's sections in SECTIONS, the train config less NOT_RESULT_TRAIN_FIELDS, VERSION), and its
``results.json`` keeps the whole fingerprint, configs included; a results.json whose fingerprint is
not the current one (code that changed the grid without a VERSION bump, a hash collision) is not
reused: the folder is moved aside to ``<name>.stale-<date>`` (`move_aside`: never deleted, and the
warning says where) and the sweep is trained again (`load_results`). While a sweep is trained and
saved its folder is locked (helpers.settings.locks), so two notebooks asking for it train it once. An SAE whose
loss stops being finite is stopped there (helpers.saes.train), not saved, and never chosen.

The choice, as a rule, on the "select" half of the held-out contexts: among the L1 SAEs of either
recipe at the profile's ``pick_ratio`` with at most 20% dead latents and an L0 of at most
``pick_max_l0``, the one with the highest CE-loss recovered (mean-ablation reference); if none qualifies, the one of that ratio with the lowest FVU (among those
with at most 20% dead latents, if any). So the improved recipe becomes the default for later
notebooks exactly when it wins; the table keeps the paper's best beside it.

`layer_saes(profile, store, sweep)` trains the chosen L1 SAE's settings and its matched TopK SAE at
every other harvested layer, all in one more pass over the store (notebooks 04 and 05).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from helpers.activations import massive
from helpers.results import Result, Table
from helpers.activations.harvest import get_store
from helpers.activations.models import load_model
from helpers.evals.reconstruction import contexts_from_store, mmcs, reconstruction_metrics, spliced_loss
from helpers.saes import architectures
from helpers.saes.stack import SAEConfig, config_dict, initial_dictionary, load_saelens, normalise_recipe, save_saelens
from helpers.saes.train import CHECKPOINT, NOT_RESULT_TRAIN_FIELDS, TrainConfig, TrainingError, train_sweep
from helpers.settings.locks import FolderLock, tmp_name
from helpers.settings.paths import scratch_dir

MAX_DEAD = 0.2
VERSION = 6  # bump when the training or evaluation changes what a cached sweep holds
# The profile's sections a sweep's results depend on: the activations it trains on and its own settings
# (helpers.settings.profiles.SECTIONS). A field added to one of them is in the fingerprint.
SECTIONS = ("data", "sweep")


PAPER_FAMILY = architectures.ANTHROPIC2023.family_name  # (called "paper L1" before)


# ---- the sweep as a typed result -----------------------------------------------------------------
SELECT_KEYS = ("l0", "fvu", "fvu_ordinary", "dead", "ce_recovered", "ce_recovered_mean")


@dataclasses.dataclass
class SweepRow(Result):
    """One SAE of the sweep: its config (SAEConfig's fields, `ratio`, `label`, `family`), its figures
    on the "report" half of the held-out contexts (helpers.evals.reconstruction: L0, MSE, FVU over
    all / ordinary / massive tokens, dead and dense shares; CE loss with it spliced in, KL, CE-loss
    recovered against zero and mean ablation), the reference losses of that half, the figures the
    rule chose on (``select_*``, the "select" half) and `diverged` (the step its loss stopped being
    finite, None if it trained to the end). Figures a table was made without are None; fields of
    tables made by other code are kept in `extra`. Saved as the flat dict results.json holds."""
    # the config
    d_in: int = 0
    d_sae: int = 0
    architecture: str = "standard"
    tied: bool = False
    l1_coefficient: float = 0.0
    k: int = 0
    hook_name: str = ""
    model_name: str = ""
    recipe: str = "anthropic2023"
    massive: bool = True
    l0_coefficient: float = 0.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.04
    matryoshka_widths: list = dataclasses.field(default_factory=list)
    ratio: float = 0.0
    label: str = ""
    family: str = ""
    # reported figures ("report" half)
    l0: float | None = None
    mse: float | None = None
    fvu: float | None = None
    fvu_ordinary: float | None = None
    fvu_massive: float | None = None
    massive_share: float | None = None
    dead: float | None = None
    dense: float | None = None
    ce_sae: float | None = None
    kl: float | None = None
    ce_recovered: float | None = None
    ce_recovered_mean: float | None = None
    # that half's references: CE clean, zero- and mean-ablated, their KL
    ce_clean: float | None = None
    ce_zero: float | None = None
    ce_mean: float | None = None
    kl_zero: float | None = None
    kl_mean: float | None = None
    # the figures the rule chose on ("select" half)
    select_l0: float | None = None
    select_fvu: float | None = None
    select_fvu_ordinary: float | None = None
    select_dead: float | None = None
    select_ce_recovered: float | None = None
    select_ce_recovered_mean: float | None = None
    diverged: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["matryoshka_widths"] = list(self.matryoshka_widths)
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepRow":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names and k != "type"})

    def selected(self, key: str):
        """The figure `key` on the "select" half (what the rule reads), or the reported one in rows
        made without a split."""
        v = getattr(self, f"select_{key}", None)
        return getattr(self, key) if v is None else v

    @property
    def usable(self) -> bool:
        """Whether the SAE trained to the end with finite figures (not diverged)."""
        return usable(self)

    def config(self, **changes) -> SAEConfig:
        """The row's SAEConfig (with `changes`, e.g. another hook_name)."""
        return SAEConfig(**{**{k: getattr(self, k) for k in SAE_KEYS}, "hook_name": self.hook_name, **changes})

    def rows(self) -> list[dict]:
        return [_table_row(self)]


def _table_row(r: SweepRow) -> dict:
    return {"SAE": r.label, "L0": r.l0, "FVU": r.fvu, "FVU ordinary": r.fvu_ordinary, "dead": r.dead,
            "dense": r.dense, "CE recovered (zero)": r.ce_recovered, "CE recovered (mean)": r.ce_recovered_mean,
            "KL": r.kl}


def as_row(row) -> SweepRow:
    """A SweepRow as it is, a dict of its fields (a row of results.json) as a SweepRow."""
    return row if isinstance(row, SweepRow) else SweepRow.from_dict(row)


@dataclasses.dataclass
class MMCSPair(Result):
    """MMCS between two anthropic2023-recipe L1 SAEs of successive sizes with the same α and decoder:
    trained (`mmcs`, also `mmcs_trained`), at initialisation and for random dictionaries (chance)."""
    alpha: float
    tied: bool
    ratio_small: float
    ratio_large: float
    mmcs: float
    mmcs_trained: float | None = None
    mmcs_init: float | None = None
    mmcs_random: float | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def pair(self) -> str:
        return f"α={self.alpha:g} R={self.ratio_small:g} -> {self.ratio_large:g}{' tied' if self.tied else ''}"

    @property
    def learned(self) -> bool:
        """Whether training put the pair's MMCS clearly (0.03) above both initialisation and chance."""
        ref = max(v for v in (self.mmcs_init, self.mmcs_random, -1.0) if v is not None)
        return self.trained > ref + 0.03

    @property
    def trained(self) -> float:
        return self.mmcs if self.mmcs_trained is None else self.mmcs_trained

    def rows(self) -> list[dict]:
        return [{"pair": self.pair, "trained": self.trained, "at init": self.mmcs_init, "random": self.mmcs_random}]


@dataclasses.dataclass
class CurvePoint(Result):
    """One point of the learning curve: tokens seen per SAE, and every SAE's held-out figures there
    (l0, fvu, fvu_ordinary, dead; ce_recovered and ce_recovered_mean for those the curve splices in)."""
    tokens: int
    rows: list

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "rows": self.rows}


@dataclasses.dataclass
class EvalSplit(Result):
    """The held-out contexts [first, end) the rule chooses on ("select") and the table reports on ("report")."""
    select: list
    report: list

    def to_dict(self) -> dict:
        return {"select": list(self.select), "report": list(self.report)}

    def rows(self) -> list[dict]:
        return [{"half": name, "first context": a, "last context": b - 1}
                for name, (a, b) in (("select", self.select), ("report", self.report))]


@dataclasses.dataclass
class Sweep(Result):
    """The sweep's results (`get_sweep`): one `SweepRow` per SAE, the index of the one the rule chose
    (`chosen`; `chosen_row`) and of the anthropic2023 recipe's best (`best_paper`), MMCS between sizes,
    the training log (`history`: dicts of per-step figures), the learning curve, the held-out split,
    the massive-activation rule at the SAE hook (`massive`, as Massive.to_json writes it; `massive_rule`),
    training time and tokens per SAE, the SAEs that diverged, the folder (`dir`, not saved: where the
    results were found) and the settings' `fingerprint`. Shows as the sweep's table, says which SAE was
    chosen and why; `to_dict` is results.json's content."""
    rows_: list[SweepRow] = dataclasses.field(default_factory=list)
    chosen: int = 0
    best_paper: int | None = None
    mmcs: list[MMCSPair] = dataclasses.field(default_factory=list)
    history: list = dataclasses.field(default_factory=list)
    curve: list[CurvePoint] = dataclasses.field(default_factory=list)
    eval_split: EvalSplit | None = None
    massive: dict | None = None
    seconds: float = 0.0
    tokens: int = 0
    diverged: dict = dataclasses.field(default_factory=dict)
    fingerprint: dict = dataclasses.field(default_factory=dict)
    dir: str = ""

    # -- results.json ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """results.json's content: the fields (rows as "rows"), less `dir`."""
        d = {"fingerprint": self.fingerprint, "rows": [r.to_dict() for r in self.rows_]}
        for f in dataclasses.fields(self):
            if f.name not in ("rows_", "dir", "fingerprint"):
                v = getattr(self, f.name)
                d[f.name] = [x.to_dict() for x in v] if f.name in ("mmcs", "curve") else (
                    v.to_dict() if isinstance(v, Result) else v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        d = {("rows_" if k == "rows" else k): v for k, v in d.items() if k != "type"}
        return cls(**{**d, "rows_": [as_row(r) for r in d.get("rows_", [])],
                      "mmcs": [m if isinstance(m, MMCSPair) else MMCSPair(**m) for m in d.get("mmcs", [])],
                      "curve": [c if isinstance(c, CurvePoint) else CurvePoint(**c) for c in d.get("curve", [])],
                      "eval_split": (None if d.get("eval_split") is None else d["eval_split"]
                                     if isinstance(d["eval_split"], EvalSplit) else EvalSplit(**d["eval_split"]))})

    @classmethod
    def load(cls, path) -> "Sweep":
        """A results.json (`path`, or the folder holding it), `dir` set to its folder."""
        path = Path(path)
        path = path / "results.json" if path.is_dir() else path
        return dataclasses.replace(cls.from_dict(json.loads(path.read_text())), dir=str(path.parent))

    def save(self, path=None) -> Path:
        """Write results.json (into `dir` by default), atomically."""
        path = Path(path) if path is not None else Path(self.dir) / "results.json"
        tmp = tmp_name(path)
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    # -- reading it -----------------------------------------------------------------------------------
    @property
    def chosen_row(self) -> SweepRow:
        """The row of the SAE the rule chose."""
        return self.rows_[self.chosen]

    @property
    def best_paper_row(self) -> SweepRow | None:
        return None if self.best_paper is None else self.rows_[self.best_paper]

    def __len__(self) -> int:
        return len(self.rows_)

    def __iter__(self):
        return iter(self.rows_)

    def __getitem__(self, i: int) -> SweepRow:
        return self.rows_[i]

    def index(self, **match) -> int | None:
        """Index of the first row whose fields equal `match` (e.g. massive=False), None if none."""
        return next((i for i, r in enumerate(self.rows_) if all(getattr(r, k) == v for k, v in match.items())), None)

    @property
    def massive_rule(self) -> massive.Massive | None:
        """The massive-activation rule the sweep trained with (None if the results hold none)."""
        return None if self.massive is None else massive.Massive.from_json(self.massive)

    @property
    def pick_ratio(self) -> float | None:
        return self._sweep_setting("pick_ratio")

    @property
    def pick_max_l0(self) -> float | None:
        return self._sweep_setting("pick_max_l0")

    def _sweep_setting(self, name: str):
        """A setting of the profile's sweep section, as the fingerprint recorded it."""
        return ((self.fingerprint.get("settings") or {}).get("sweep") or {}).get(name)

    @property
    def sparse_share(self) -> float:
        """Share of the logged training steps taken on the sparse path, over all stacks."""
        return float(np.mean([np.mean(h["sparse_steps"]) for h in self.history if "sparse_steps" in h]))

    def curve_of(self, i: int, key: str) -> list:
        """SAE i's figure `key` at each point of the learning curve (None where it was not measured)."""
        return [c.rows[i].get(key) for c in self.curve]

    @property
    def curve_tokens(self) -> list[int]:
        return [c.tokens for c in self.curve]

    def topk_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.rows_) if r.architecture == "topk"]

    def why_chosen(self, i: int | None = None) -> str:
        """Why SAE i (default: the chosen one) is the one the rule picks among its candidates."""
        i = self.chosen if i is None else i
        r, max_l0 = self.rows_[i], self.pick_max_l0
        ok = r.selected("dead") <= MAX_DEAD and (max_l0 is None or r.selected("l0") <= max_l0)
        if ok:
            return (f"the highest CE-loss recovered (mean ablation) on the select half, "
                    f"{r.selected('ce_recovered_mean'):.1%}, among the L1 SAEs at R={r.ratio:g} with at most "
                    f"{MAX_DEAD:.0%} dead latents and L0 ≤ {max_l0:g} (its L0 there: {r.selected('l0'):.1f})")
        return (f"no L1 SAE at R={r.ratio:g} met the dead-latent and L0 limits on the select half, so the rule "
                f"fell back to the lowest FVU there ({r.selected('fvu'):.3f})")

    # -- tables -------------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """The sweep's table (reported figures), the chosen SAE marked."""
        return [{**_table_row(r), "chosen": "<-" if i == self.chosen else ""} for i, r in enumerate(self.rows_)]

    def to_frame(self, full: bool = False):
        """The table as a DataFrame; full=True: every field of every row."""
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.rows_] if full else self.rows())

    def table(self, indices, columns=("label", "l0", "fvu", "fvu_ordinary", "fvu_massive", "ce_recovered",
                                      "ce_recovered_mean", "dead"), title: str = "", notes=()) -> Table:
        """Some rows (by index), some fields, as a Table."""
        return Table([{c: getattr(self.rows_[i], c) for c in columns} for i in indices], title, list(notes))

    def massive_control(self) -> Table | None:
        """The SAE trained without the massive-activation treatment beside its twin (the same family,
        size and α, treated), or None when the sweep has no such control."""
        control = self.index(massive=False)
        if control is None:
            return None
        c = self.rows_[control]
        twin = next(i for i, r in enumerate(self.rows_) if r.massive and f"{r.family} (no massive treatment)" == c.family
                    and r.ratio == c.ratio and r.l1_coefficient == c.l1_coefficient)
        return self.table([twin, control], title="the massive-activation treatment: an SAE and its untreated control")

    def choice(self) -> Table:
        """The chosen SAE and the anthropic2023 recipe's best: the figures the rule read (select half) and
        those reported (the other half), with the reason for the choice."""
        picks = [("chosen", self.chosen), ("Anthropic-2023 best", self.best_paper)]
        rows = [{"": name, "SAE": self.rows_[i].label, "select L0": self.rows_[i].selected("l0"),
                 "select CE recovered (mean)": self.rows_[i].selected("ce_recovered_mean"),
                 **{k: v for k, v in _table_row(self.rows_[i]).items() if k != "SAE"}}
                for name, i in picks if i is not None]
        return Table(rows, "the SAE carried forward", [f"{self.chosen_row.label} was chosen: {self.why_chosen()}."])

    def mmcs_table(self) -> Table:
        """MMCS between sizes: trained, at initialisation, random dictionaries."""
        notes = [f"{sum(m.learned for m in self.mmcs)} of {len(self.mmcs)} pairs: training put MMCS clearly above "
                 "its level at initialisation and for random dictionaries."] if self.mmcs else []
        return Table([m.rows()[0] for m in self.mmcs], "MMCS between sizes (smaller -> larger)", notes)

    def learning(self, indices=None) -> Table:
        """Held-out ordinary-token FVU of some SAEs (default: the chosen one and the TopK SAEs) at the
        learning curve's first, next-to-last and last points."""
        indices = [self.chosen] + self.topk_indices() if indices is None else indices
        pts = sorted({0, max(0, len(self.curve) - 2), len(self.curve) - 1})
        rows = [{"SAE": self.rows_[i].label, **{f"FVU ordinary at {self.curve[p].tokens:,}": self.curve[p].rows[i].get(
            "fvu_ordinary") for p in pts}} for i in indices]
        return Table(rows, "learning curve (held-out)")

    def grad_clipping(self) -> Table:
        """The improved-recipe SAEs' largest logged pre-clip gradient norm, the clip, and the share of logged
        windows above it."""
        logs = [h for h in self.history if h.get("grad_norm")]
        clip = logs[-1]["grad_clip"] if logs else None
        rows = []
        for i, r in enumerate(self.rows_):
            g = [h["grad_norm"][i] for h in logs if h["grad_norm"][i] is not None]
            if r.recipe == "improved" and g:
                rows.append({"SAE": r.label, "largest pre-clip gradient norm": max(g), "clip": clip,
                             "windows above the clip": float(np.mean([v > clip for v in g]))})
        return Table(rows, "gradient clipping (improved recipe)")

    def versus_pca(self, pca) -> Table:
        """Each SAE's FVU against PCA keeping as many components as its L0 (`pca`: a PCAFVU, or
        helpers.evals.reconstruction.pca_fvu's dict), over all and over ordinary tokens."""
        all_, ordinary = (pca.all, pca.ordinary) if hasattr(pca, "ordinary") else (pca["all"], pca["ordinary"])
        d = max(all_)
        rows = []
        for r in self.rows_:
            k = max(1, min(d, round(r.l0)))
            rows.append({"SAE": r.label, "PCA k": k, "FVU": r.fvu, "PCA FVU": all_[k],
                         "better": r.fvu < all_[k], "FVU ordinary": r.fvu_ordinary,
                         "PCA FVU ordinary": ordinary[k], "better (ordinary)": r.fvu_ordinary < ordinary[k]})
        n = sum(x["better (ordinary)"] for x in rows)
        return Table(rows, "SAE against PCA with as many components as its L0",
                     [f"{n} of {len(rows)} SAEs reconstruct ordinary tokens better than PCA at their L0."])

    def verdicts(self) -> list[str]:
        out = [f"{len(self.rows_)} SAEs, {self.tokens:,} tokens each, trained together in {self.seconds:.1f} s."]
        if self.rows_:
            r = self.chosen_row
            out.append(f"Chosen: {r.label}, {self.why_chosen()}. On the other (report) half: L0 {r.l0:.1f}, "
                       f"FVU {r.fvu:.3f} (ordinary {r.fvu_ordinary:.3f}), CE recovered {r.ce_recovered:.1%} / "
                       f"{r.ce_recovered_mean:.1%} (zero / mean ablation), dead {r.dead:.1%}.")
            p = self.best_paper_row
            if p is not None and self.best_paper != self.chosen:
                out.append(f"The Anthropic-2023 recipe's best: {p.label} (CE recovered {p.ce_recovered_mean:.1%} "
                           f"with mean ablation, L0 {p.l0:.1f}).")
            if r.ce_clean is not None:
                out.append(f"Reference CE (nats/token): clean {r.ce_clean:.3f}, mean-ablated {r.ce_mean:.3f}, "
                           f"zero-ablated {r.ce_zero:.3f}.")
        if self.eval_split is not None:
            (a, b), (c, d) = self.eval_split.select, self.eval_split.report
            out.append(f"Held-out contexts: chosen on {a}-{b - 1}, reported on {c}-{d - 1}.")
        if self.diverged:
            out.append("Diverged (not saved, never chosen): "
                       + ", ".join(f"{k} at step {v}" for k, v in self.diverged.items()) + ".")
        return out


def as_sweep(sweep) -> Sweep:
    """A Sweep as it is, results.json's dict (with "dir") as a Sweep."""
    return sweep if isinstance(sweep, Sweep) else Sweep.from_dict(sweep)


def family_groups(rows):
    """{(family, ratio, tied): rows sorted by the architecture's setting (α, k, λ)} (rows of old tables,
    family "paper L1", read as PAPER_FAMILY). Rows are SweepRows (or dicts of their fields)."""
    groups = {}
    for r in map(as_row, rows):
        fam = PAPER_FAMILY if r.family == "paper L1" else r.family
        groups.setdefault((fam, r.ratio, r.tied), []).append(r)
    return {k: sorted(v, key=lambda r: getattr(r, architectures.get(r.architecture).setting, 0) or 0)
            for k, v in sorted(groups.items())}


def grid(profile) -> list[tuple[str, dict]]:
    """The sweep's SAEs as (architecture, settings) pairs, settings being SAEConfig fields plus
    ``ratio`` (R = d_sae/d_in), in training order: the profile's ``grid`` expanded (each settings dict
    a product over its listed values, in the order written; an SAE listed twice is trained once), then
    the massive-treatment control: the middle improved-recipe SAE without the treatment."""
    out = []
    for name, blocks in profile.grid.items():
        for block in blocks:
            for values in itertools.product(*block.values()):
                s = (name, dict(zip(block, values)))
                if s not in out:
                    out.append(s)
    improved = [s for name, s in out if name == "standard" and s.get("recipe") == architectures.IMPROVED.name
                and s.get("massive", True)]
    if profile.massive and profile.massive_control and improved:
        out.append(("standard", {**improved[len(improved) // 2], "massive": False}))
    return out


def sweep_configs(profile, d_in: int) -> list[SAEConfig]:
    """The sweep's SAE configs for activations of width d_in (`grid`)."""
    common = {"hook_name": profile.sae_hook, "model_name": profile.model}
    configs = []
    for name, settings in grid(profile):
        settings = dict(settings)
        ratio = settings.pop("ratio")
        try:
            configs.append(SAEConfig.from_ratio(d_in, ratio, architecture=name, **settings, **common))
        except (TypeError, ValueError) as e:
            raise ValueError(f"profile {profile.name!r}: the grid's {name} SAE {settings | {'ratio': ratio}} "
                             f"is not a valid SAE for d_in={d_in}: {e}") from None
    return configs


def halving_steps(steps: int, points: int) -> tuple:
    """`points` step counts halving down from `steps` (all, a half, a quarter, ..., rounded), ascending:
    where a sweep measures its learning curve, and the budgets of the interpretability curve."""
    return tuple(sorted({max(1, int(round(steps * 2.0 ** -j))) for j in range(max(0, points))}))


def train_config(profile, tokens: int | None = None) -> TrainConfig:
    tokens = tokens or profile.train_tokens
    steps = tokens // profile.train_batch
    eval_at = halving_steps(steps, profile.curve_points)
    return TrainConfig(total_tokens=tokens, batch_size=profile.train_batch, lr=profile.lr,
                       warmup_steps=max(1, steps // 20), dead_window=min(tokens // 4, 1_000_000),
                       resample_every=max(1, steps // 5), resample_until=0.7, log_every=max(1, steps // 100),
                       checkpoint_every=max(1, steps // 10), seed=profile.seed, device=profile.device,
                       massive=profile.massive, eval_at=eval_at)


def fingerprint(profile, *extra, d_in: int | None = None) -> dict:
    """What a sweep's results depend on: VERSION, the profile's SECTIONS, the train config (less
    NOT_RESULT_TRAIN_FIELDS), `extra`, and, given d_in (the model's width, known once the store is),
    the SAE configs themselves. JSON-ready."""
    tc = dataclasses.asdict(train_config(profile))
    out = {"version": VERSION, "settings": profile.settings(*SECTIONS),
           "train": {k: v for k, v in tc.items() if k not in NOT_RESULT_TRAIN_FIELDS},
           "extra": list(extra)}
    if d_in is not None:
        out["configs"] = [config_dict(c) for c in sweep_configs(profile, d_in)]
    return json.loads(json.dumps(out))  # tuples as lists: what results.json gives back


def _key(profile, *extra) -> str:
    """The short hash naming a sweep's folder: of its fingerprint (without the configs, which follow
    from the profile and the model's width)."""
    return hashlib.sha1(json.dumps(fingerprint(profile, *extra), sort_keys=True).encode()).hexdigest()[:8]


def sweep_dir(profile) -> Path:
    return profile.cache_dir / "sae" / f"sweep-{_key(profile, profile.sae_hook)}"


def load_results(profile) -> Sweep | None:
    """The sweep's saved results, if there are any and their fingerprint is the current one (configs
    included, for the d_in they were made with); None otherwise (a stale file is reported, not used)."""
    folder = sweep_dir(profile)
    results = folder / "results.json"
    if not results.exists():
        return None
    saved = json.loads(results.read_text())
    old = saved.get("fingerprint") or {}
    d_in = (old.get("configs") or [{}])[0].get("d_in")
    now = fingerprint(profile, profile.sae_hook, d_in=d_in)
    if old != now:
        diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        warnings.warn(f"{results} was made with other settings ({', '.join(diff)} differ): training the sweep again",
                      stacklevel=2)
        return None
    return dataclasses.replace(Sweep.from_dict(saved), dir=str(folder))


def usable(row) -> bool:
    """Whether a table row's SAE trained to the end with finite figures (not diverged)."""
    row = as_row(row)
    if row.diverged is not None:
        return False
    return all(math.isfinite(row.selected(k)) for k in ("l0", "fvu", "dead", "ce_recovered_mean")
               if isinstance(row.selected(k), (int, float)))


def choose(rows: list[SweepRow], ratio: float, max_l0: float) -> int:
    """Index of the chosen SAE in the sweep table (the rule in this module's docstring), read from the
    rows' selection-slice columns (``select_dead``, ``select_l0``, ``select_ce_recovered_mean``,
    ``select_fvu``), never from the columns that are reported. A diverged SAE, or one with a non-finite
    figure, is never chosen (`usable`)."""
    rows = [as_row(r) for r in rows]
    l1 = [i for i, r in enumerate(rows) if architectures.get(r.architecture).l1 and r.ratio == ratio and r.massive]
    if not l1:
        raise ValueError(f"the sweep has no L1 SAE of ratio {ratio}")
    diverged = [rows[i].label or i for i in l1 if not usable(rows[i])]
    l1 = [i for i in l1 if usable(rows[i])]
    if not l1:
        raise ValueError(f"every L1 SAE of ratio {ratio} diverged or has non-finite figures ({diverged}): "
                         "none can be chosen; lower the learning rate")
    ok = [i for i in l1 if rows[i].selected("dead") <= MAX_DEAD and rows[i].selected("l0") <= max_l0]
    if ok:
        return max(ok, key=lambda i: rows[i].selected("ce_recovered_mean"))
    alive = [i for i in l1 if rows[i].selected("dead") <= MAX_DEAD] or l1
    return min(alive, key=lambda i: rows[i].selected("fvu"))


def best_of_recipe(rows: list[SweepRow], recipe: str, ratio: float, max_l0: float) -> int | None:
    """The SAE the rule would choose among one recipe's L1 SAEs only (None if it has none that trained to
    the end); "paper" is read as "anthropic2023", its current name."""
    recipe = normalise_recipe(recipe)
    rows = [as_row(r) for r in rows]
    idx = [i for i, r in enumerate(rows)
           if not architectures.get(r.architecture).l1 or normalise_recipe(r.recipe) == recipe]
    if not any(architectures.get(rows[i].architecture).l1 and rows[i].ratio == ratio and usable(rows[i])
               for i in idx):
        return None
    return idx[choose([rows[i] for i in idx], ratio, max_l0)]


def eval_split(eval_store) -> dict:
    """The held-out store's contexts split in two disjoint halves: the first ("select") is what the
    rule chooses an SAE on, the second ("report") what every reported figure is measured on, so the
    chosen SAE's figures are not those it was picked for. {name: (first context, end)}."""
    per = eval_store.manifest["ctx_len"] - 1
    n = eval_store.n_tokens // per
    if n < 2:
        raise ValueError(f"the held-out store {eval_store.path} holds {n} context(s): at least 2 are needed "
                         "(one to choose on, one to report on); raise eval_tokens")
    return {"select": (0, n // 2), "report": (n // 2, n)}



@torch.no_grad()
def _evaluate_slice(saes, x, flags, tokens, hook, model) -> tuple[list[dict], dict]:
    device = next(model.parameters()).device

    def reconstruct(a):
        return torch.stack([s(a.to(device))[0] for s in saes])

    spliced = spliced_loss(model, tokens, hook, reconstruct, mean_act=x.mean(0))
    rows = []
    for j, sae in enumerate(saes):
        r = reconstruction_metrics(sae, x, flags=flags)[0]
        rows.append({**r, "ce_sae": spliced["ce_sae"][j], "kl": spliced["kl_sae"][j],
                     "ce_recovered": spliced["ce_recovered"][j], "ce_recovered_mean": spliced["ce_recovered_mean"][j]})
    return rows, {k: spliced[k] for k in ("ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean")}


@torch.no_grad()
def evaluate(saes, configs, eval_store, hook, model, ce_contexts: int, rule=None) -> list[dict]:
    """One table row per SAE: config, L0/MSE/FVU (all, ordinary, massive: split by the hook's
    massive-activation `rule`)/dead/dense on held-out activations, CE loss spliced in (on
    `ce_contexts` contexts) and KL: measured on the "report" half of the held-out contexts
    (`eval_split`). The same figures on the "select" half, which `choose` reads, are kept under
    ``select_<name>`` (SELECT_KEYS). The mean-ablation reference is each half's own mean activation."""
    x_all = eval_store.activations(hook)
    per = eval_store.manifest["ctx_len"] - 1
    device = next(model.parameters()).device
    saes = [s.to(device) for s in saes]
    out = {}
    for name, (a, b) in eval_split(eval_store).items():
        x = x_all[a * per: b * per]
        flags = None if rule is None else rule.flags(x)
        tokens = contexts_from_store(eval_store, min(ce_contexts, b - a), model.tokenizer.bos_token_id, start=a)
        out[name] = _evaluate_slice(saes, x, flags, tokens, hook, model)
    (report, refs), (select, _) = out["report"], out["select"]
    rows = []
    for cfg, r, sr in zip(configs, report, select):
        rows.append({**dataclasses.asdict(cfg), "ratio": cfg.ratio, "label": cfg.label, "family": cfg.family, **r,
                     **refs, **{f"select_{k}": sr[k] for k in SELECT_KEYS}})
    return rows


def random_mmcs(d_in: int, m_small: int, m_large: int, seed: int = 0) -> float:
    """MMCS between two independent dictionaries of random unit directions of these sizes (chance)."""
    g = torch.Generator().manual_seed(seed * 7_919 + m_small * 31 + m_large)
    return mmcs(torch.randn(m_small, d_in, generator=g), torch.randn(m_large, d_in, generator=g))


def mmcs_table(saes, configs, seed: int = 0) -> list[MMCSPair]:
    """MMCS between each pair of anthropic2023-recipe L1 SAEs with the same α and decoder, of
    successive sizes: of the trained pair ("mmcs", also "mmcs_trained"), of the same pair at
    initialisation ("mmcs_init": the initial dictionaries are rebuilt from `seed` and each config, as
    training built them) and of two independent random unit dictionaries of the same sizes
    ("mmcs_random", the chance level). Only trained MMCS well above both says the two sizes found
    the same directions by learning them."""
    out = []
    l1 = [(c, s) for c, s in zip(configs, saes) if c.arch.l1 and c.training_recipe is architectures.ANTHROPIC2023
          and c.massive]
    for ca, sa in l1:
        larger = sorted([(cb, sb) for cb, sb in l1 if cb.l1_coefficient == ca.l1_coefficient
                         and cb.tied == ca.tied and cb.d_sae > ca.d_sae], key=lambda p: p[0].d_sae)
        if larger:
            cb, sb = larger[0]
            trained = mmcs(sa.directions()[0].cpu(), sb.directions()[0].cpu())
            out.append(MMCSPair(alpha=ca.l1_coefficient, tied=ca.tied, ratio_small=ca.ratio,
                                ratio_large=cb.ratio, mmcs=trained, mmcs_trained=trained,
                                mmcs_init=mmcs(initial_dictionary(ca, seed), initial_dictionary(cb, seed)),
                                mmcs_random=random_mmcs(ca.d_in, ca.d_sae, cb.d_sae, seed)))
    return out


def get_eval_store(profile, model=None, progress: bool = True):
    """Held-out activations: the profile's hooks on the corpus's test split (eval_tokens of them)."""
    return get_store(profile.replace(harvest_tokens=profile.eval_tokens), model=model, split="test",
                     progress=progress)


def learning_curve_fn(configs, eval_store, hook, model, profile, rule=None):
    """on_eval for train_sweep: held-out FVU (all, ordinary) and L0 of every SAE, and CE-loss recovered
    (on `curve_contexts` held-out contexts) of the SAEs at the profile's pick ratio and of the other
    architectures (TopK, BatchTopK, ...)."""
    x = eval_store.activations(hook)
    flags = None if rule is None else rule.flags(x)
    tokens = contexts_from_store(eval_store, profile.curve_contexts, model.tokenizer.bos_token_id)
    device = next(model.parameters()).device
    ce_idx = [i for i, c in enumerate(configs) if c.ratio == profile.pick_ratio or not c.arch.l1]
    refs = {}  # the zero and mean ablations' CE and KL: the same at every step, run once

    def on_eval(step, n_tokens, saes):
        rows = [{k: v for k, v in reconstruction_metrics(s.to(device), x, flags=flags)[0].items()
                 if k in ("l0", "fvu", "fvu_ordinary", "dead")} for s in saes]
        if ce_idx and profile.curve_contexts:
            sp = spliced_loss(model, tokens, hook, lambda a: torch.stack([saes[i](a.to(device))[0] for i in ce_idx]),
                              mean_act=x.mean(0), refs=refs)
            refs.update({k: sp[k] for k in ("ce_zero", "ce_mean", "kl_zero", "kl_mean")})
            for j, i in enumerate(ce_idx):
                rows[i].update(ce_recovered=sp["ce_recovered"][j], ce_recovered_mean=sp["ce_recovered_mean"][j])
        return rows

    return on_eval


def move_aside(folder: Path, why: str) -> Path:
    """Rename a sweep's folder to ``<name>.stale-<date and time>`` beside it (nothing in it is deleted), drop
    the working checkpoint kept for it in $SAE_SCRATCH (a copy of the one in the folder), and warn
    saying where it went. Returns the new path."""

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = folder.with_name(f"{folder.name}.stale-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = folder.with_name(f"{folder.name}.stale-{stamp}-{n}")
    folder.rename(dest)
    scratch = scratch_dir(folder)
    if scratch is not None and (scratch / CHECKPOINT).exists():
        (scratch / CHECKPOINT).unlink()
    warnings.warn(f"{folder} holds a sweep made with other settings ({why}): moved aside to {dest}, kept as it "
                  "was (delete it once you no longer need its results); the sweep is trained again", stacklevel=3)
    return dest


def _nan_row(cfg, like: dict) -> dict:
    """A table row for an SAE that diverged: its config, and NaN for every figure of a row like `like`."""
    out = {k: (float("nan") if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
           for k, v in like.items()}
    out.update({**dataclasses.asdict(cfg), "ratio": cfg.ratio, "label": cfg.label, "family": cfg.family})
    return out


def evaluate_result(result, eval_store, hook, model, ce_contexts: int, rule=None) -> list[SweepRow]:
    """`evaluate` the sweep's SAEs that trained to the end; a diverged one (`SweepResult.diverged`) gets a
    row of NaN figures with ``diverged`` set to the step it diverged at (None for the others)."""
    ok = [i for i in range(len(result.saes)) if i not in result.diverged]
    if not ok:
        raise TrainingError(f"every SAE of the sweep diverged ({result.diverged}): lower the learning rate")
    done = evaluate([result.saes[i] for i in ok], [result.configs[i] for i in ok], eval_store, hook, model,
                    ce_contexts, rule)
    rows = [None] * len(result.saes)
    for i, r in zip(ok, done):
        rows[i] = SweepRow.from_dict({**r, "diverged": None})
    for i, step in result.diverged.items():
        rows[i] = SweepRow.from_dict({**_nan_row(result.configs[i], done[0]), "diverged": step})
    return rows


def save_saes(result, rows, folder: Path) -> None:
    """Save each SAE that trained to the end in SAELens layout (``sae_<i>``); a diverged SAE is not saved."""
    for i, (sae, row) in enumerate(zip(result.saes, map(as_row, rows))):
        if row.diverged is not None or not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
            continue
        save_saelens(sae.cpu(), folder / f"sae_{i:02d}", extra={"eval": {k: getattr(row, k) for k in SELECT_KEYS}})


def get_sweep(profile, store=None, model=None, progress: bool = True) -> Sweep:
    """The profile's sweep results (training and evaluating first if needed), a `Sweep`: its rows,
    the chosen SAE and the anthropic2023 recipe's best, MMCS between sizes, the training log, the
    learning curve, the held-out split, the massive-activation rule at the SAE hook, the folder, the
    training time and tokens per SAE.

    The sweep's folder is locked while it is trained and saved (helpers.settings.locks): another process asking
    for the same sweep waits for it, then loads what it saved. A folder holding results made with other
    settings is moved aside (`move_aside`), never deleted. An SAE that diverged is listed in its row
    (``diverged``: the step), not saved, and never chosen.
    """
    folder = sweep_dir(profile)
    done = load_results(profile)
    if done is not None:
        return done
    with FolderLock(folder, f"training the sweep {folder.name}", wait=None):
        return _make_sweep(profile, folder, store, model, progress)


def _make_sweep(profile, folder: Path, store, model, progress: bool) -> Sweep:
    results = folder / "results.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once already, by get_sweep's own look
        done = load_results(profile)  # saved by another process while this one waited
    if done is not None:
        return done
    if results.exists():  # stale: the folder (its checkpoint too) belongs to other settings
        move_aside(folder, "its results.json has another fingerprint")
    if model is None:
        model = load_model(profile.model, device=profile.device)
    store = store or get_store(profile, model=model, progress=progress)
    hook = profile.sae_hook
    eval_store = get_eval_store(profile, model=model, progress=progress)
    configs = sweep_configs(profile, store.d_model)

    rule = massive.fit(store, hook) if profile.massive else None
    tc = train_config(profile)
    curve = learning_curve_fn(configs, eval_store, hook, model, profile, rule)
    keep = CurveSnapshots(configs, tc, profile.pick_ratio)

    def on_eval(step, n_tokens, saes):
        keep(step, n_tokens, saes)
        return curve(step, n_tokens, saes)

    result = train_sweep(store, hook, configs, tc, run_dir=folder, progress=progress,
                         on_eval=on_eval, rules={hook: rule} if rule else None)
    rows = evaluate_result(result, eval_store, hook, model, profile.ce_contexts, rule)
    save_saes(result, rows, folder)
    curve = [CurvePoint(h["tokens"], h["eval"]) for h in result.history if "eval" in h]
    history = [h for h in result.history if "eval" not in h]
    ok = [i for i in range(len(rows)) if rows[i].diverged is None]
    split = eval_split(eval_store)
    out = Sweep(fingerprint=fingerprint(profile, hook, d_in=store.d_model), rows_=rows,
                mmcs=mmcs_table([result.saes[i] for i in ok], [result.configs[i] for i in ok], profile.seed),
                history=history, curve=curve, eval_split=EvalSplit(list(split["select"]), list(split["report"])),
                chosen=choose(rows, profile.pick_ratio, profile.pick_max_l0),
                best_paper=best_of_recipe(rows, "anthropic2023", profile.pick_ratio, profile.pick_max_l0),
                massive=result.rules[hook].to_json(), seconds=result.seconds, tokens=result.tokens,
                diverged={result.configs[i].label: step for i, step in result.diverged.items()}, dir=str(folder))
    keep.save(folder, out.chosen, result, store)
    out.save(results)
    return out


CURVE_POINTS = 3  # the interpretability curve's budgets: a quarter, a half and all of the training


class CurveSnapshots:
    """on_eval beside the learning curve's, for `train_sweep`: keeps a CPU copy of every SAE the rule
    could choose (`choose`: an L1 SAE of the pick ratio, with the massive treatment) at the
    interpretability curve's budgets (`halving_steps(steps, CURVE_POINTS)`), where those are learning-curve
    steps; `save` writes the chosen one's to the sweep's folder, where `sweep_snapshots` finds them.
    A sweep trains exactly what training each SAE alone would, so these are the snapshots that
    helpers.evals.heldout.curve_snapshots would otherwise train the chosen SAE again to take. A sweep
    resumed from a checkpoint missed the budgets before it: it saves none."""

    def __init__(self, configs, tc: TrainConfig, pick_ratio):
        self.budgets = halving_steps(tc.total_tokens // tc.batch_size, CURVE_POINTS)
        self.batch_size = tc.batch_size
        self.on = set(self.budgets) <= set(tc.eval_at)
        self.rows = [i for i, c in enumerate(configs) if c.arch.l1 and c.ratio == pick_ratio and c.massive]
        self.kept: dict[int, dict[int, dict]] = {}

    def __call__(self, step, n_tokens, saes):
        if self.on and step in self.budgets[:-1]:  # the last budget is the trained SAE itself
            for i in self.rows:
                self.kept.setdefault(i, {})[int(n_tokens)] = {
                    k: v.detach().cpu().clone().contiguous() for k, v in saes[i].state_dict().items() if torch.is_tensor(v)}

    def save(self, folder: Path, chosen: int, result, store) -> None:
        """Write SAE `chosen`'s snapshots, its trained state as the last, to ``folder/curve``."""
        from safetensors.torch import save_file

        kept = dict(self.kept.get(chosen, {}))
        if not self.on or sorted(kept) != [s * self.batch_size for s in self.budgets[:-1]] or chosen in result.diverged:
            return
        kept[self.budgets[-1] * self.batch_size] = {k: v.detach().cpu().contiguous()
                                                    for k, v in result.saes[chosen].state_dict().items() if torch.is_tensor(v)}
        out = folder / "curve"
        out.mkdir(parents=True, exist_ok=True)
        for n, state in kept.items():
            path = out / f"sae_{chosen:02d}-{n}.safetensors"
            tmp = tmp_name(path)
            save_file(state, str(tmp), metadata={"store": Path(store.path).name})
            tmp.replace(path)
        self.kept.clear()


def sweep_snapshots(sweep, index: int, budgets, store) -> dict | None:
    """{training tokens: state tensors} of sweep SAE `index` as `CurveSnapshots` kept it at each of
    `budgets` (tokens), if the sweep kept them all, trained on `store`; else None."""
    from safetensors import safe_open

    folder = getattr(sweep, "dir", None)
    if not folder:
        return None
    paths = {n: Path(folder) / "curve" / f"sae_{index:02d}-{n}.safetensors" for n in budgets}
    if not all(p.exists() for p in paths.values()):
        return None
    out = {}
    for n, p in paths.items():
        with safe_open(str(p), framework="pt") as h:
            if (h.metadata() or {}).get("store") != Path(store.path).name:
                return None
            out[n] = {k: h.get_tensor(k) for k in h.keys()}
    return out


def matched_topk(sweep: Sweep) -> int | None:
    """Index of the sweep's TopK SAE whose L0 is closest to the chosen SAE's (None without TopK):
    the 'go beyond the paper' SAE, compared at about the same sparsity (the control trained without
    the massive-activation treatment is never matched)."""
    sweep = as_sweep(sweep)
    topk = [i for i, r in enumerate(sweep.rows_)
            if architectures.get(r.architecture).matched_comparison and r.massive and usable(r)]
    if not topk:
        return None
    l0 = sweep.chosen_row.l0
    return min(topk, key=lambda i: abs(sweep.rows_[i].l0 - l0))


def matched_others(sweep: Sweep) -> dict[str, int]:
    """{family: row index} for every other architecture the sweep trained (neither an L1 recipe nor the
    matched TopK: BatchTopK, JumpReLU, Matryoshka BatchTopK): its SAE whose L0 is closest to the chosen
    SAE's, so that later evaluations judge every architecture at about the same sparsity."""
    sweep = as_sweep(sweep)
    l0 = sweep.chosen_row.l0
    out: dict[str, int] = {}
    for i, r in enumerate(sweep.rows_):
        arch = architectures.get(r.architecture)
        if arch.l1 or arch.matched_comparison or not r.massive or not usable(r):
            continue
        j = out.get(r.family)
        if j is None or abs(r.l0 - l0) < abs(sweep.rows_[j].l0 - l0):
            out[r.family] = i
    return out


def load_sweep_sae(sweep: Sweep, i: int):
    """SAE i of the sweep, from its folder, as a one-SAE stack (a diverged one was not saved: an error)."""
    sweep = as_sweep(sweep)
    row = sweep.rows_[i]
    if row.diverged is not None:
        raise TrainingError(f"SAE {i} of the sweep in {sweep.dir} ({row.label}) diverged at "
                            f"step {row.diverged}: it was not saved")
    return load_saelens(Path(sweep.dir) / f"sae_{i:02d}")


def get_sae(profile, progress: bool = True):
    """The SAE that the sweep's rule chose (running the sweep first if needed), as a one-SAE stack."""
    sweep = get_sweep(profile, progress=progress)
    return load_sweep_sae(sweep, sweep.chosen)


SAE_KEYS = tuple(f.name for f in dataclasses.fields(SAEConfig) if f.name != "hook_name")  # a row's config


def layer_saes(profile, store, sweep: Sweep, progress: bool = True) -> dict:
    """{(layer, name): SAE} for name "SAE" (the chosen L1 SAE's settings) and "TopK SAE" (the matched
    TopK SAE's, if any) at every harvested layer: the sweep's own at its layer, and at every other
    layer SAEs with the same settings, all trained together in one pass over the store (each shard
    read once for every layer), then saved and loaded from then on."""
    sweep = as_sweep(sweep)
    named = {"SAE": sweep.chosen}
    if matched_topk(sweep) is not None:
        named["TopK SAE"] = matched_topk(sweep)
    out = {(profile.sae_layer, name): load_sweep_sae(sweep, i) for name, i in named.items()}
    others = [layer for layer in profile.layers if layer != profile.sae_layer]
    if not others:
        return out
    jobs = [(layer, name, sweep.rows_[i].config(hook_name=profile.hook_at(layer)))
            for layer in others for name, i in named.items()]
    folder = profile.cache_dir / "sae" / f"layers-{_key(profile, [repr(c) for _, _, c in jobs])}"
    paths = [folder / f"L{layer}-{name.replace(' ', '_')}" for layer, name, _ in jobs]
    if not all((p / "cfg.json").exists() for p in paths):
        with FolderLock(folder, f"training the layer SAEs {folder.name}", wait=None):
            if not all((p / "cfg.json").exists() for p in paths):  # saved by another process meanwhile
                tc = dataclasses.replace(train_config(profile), eval_at=())
                res = train_sweep(store, None, [c for _, _, c in jobs], tc, run_dir=folder, progress=progress)
                if res.diverged:
                    raise TrainingError("layer SAEs diverged: " + ", ".join(
                        f"L{jobs[i][0]} {jobs[i][1]} at step {step}" for i, step in res.diverged.items())
                        + f" (in {folder}); none of this run is saved: lower the learning rate")
                for sae, p in zip(res.saes, paths):
                    save_saelens(sae.cpu(), p)
    for (layer, name, _), p in zip(jobs, paths):
        out[(layer, name)] = load_saelens(p)
    return out
