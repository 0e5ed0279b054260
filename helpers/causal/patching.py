"""Causal experiments in a dictionary basis: patching, ablation-based editing, feature circuits.

All of them change the activation at one hook only along chosen dictionary directions and keep
everything else, including the dictionary's reconstruction error: changing feature f's code from
c to c' adds (c' - c) · decoder_rows[f] to the activation. So any Dictionary with a linear
decoder works: the SAE and the baselines alike.

* `patch_features`: the entry point that takes plain objects (a plain Hugging Face model or a
  TransformerLens-style one, prompt strings, any SAE): patch the corrupted prompt's codes of chosen
  features (or the top k by attribution) into the clean run at one hook and measure the answer's
  logit difference and the share of the gap closed, as a `Patched` result. `prompt_pairs` turns the
  strings and answers into a `PromptSet`; `code_change`, `prompt_attribution`, `patched_activation`
  and `ablate_activation` are the tensor-level steps that it, `patch_curve`, `edit_curve` and
  `ablate` share.
* `patch_curve`: move the clean IOI prompts' codes of the top-k features, at chosen positions
  (default: the repeated name), to their values on the counterfactual prompts (names swapped), and
  record the logit difference and the KL divergence of the next-token distribution from the clean
  run, for each k. Features are ranked by attribution (a first-order estimate from one backward
  pass) on one half of the prompts, and every point of the curve is measured by an actual patched
  forward pass on the *other* half (`PromptSet.split`), with a bootstrap interval over those prompts
  (`ratio_interval`). Ranking and measuring on the same prompts would select on the scored data: the
  features that happen to fit those prompts' noise best look better than they are on new prompts.
  The in-sample number is kept beside it as the contrast.
* `edit_curve`: zero-ablate the top-k features that carry a behaviour (e.g. the gendered pronoun),
  ranked and measured on separate halves the same way, and measure the edit (the behaviour's logit
  difference drop) against the collateral damage (CE loss increase on held-out text), beside k
  random features of the same dictionary.
* `candidate_pool`: a seeded subset of a dictionary's features, so that every method picks its top
  k from the same number of candidates.
* `upstream_features`: for a feature at one layer, the features at an earlier layer whose ablation
  changes it most (attribution, then verified by ablation), as a `FeatureCircuit`.
* `patch_positions_by_layer`: the plain (no dictionary) patch of the whole residual stream at chosen
  positions, layer by layer: where the information that decides the answer sits.
* `captured_share`: how much of the clean-to-counterfactual change in the activation a dictionary's
  reconstruction carries, which bounds what patching its features can do.
* `feature_attribution` (gradient × change of code, per prompt and feature, for any readout of the
  activation) and `direct_logit_attribution` (a feature's decoder direction through the final norm's
  gain and scale and the unembedding, onto the answer-minus-distractor logit direction): the two
  first-order ways to rank features by their effect on a logit difference. `position_readout` makes
  the model's logit difference a function of one position's activation, for `feature_attribution`.

Everything is batched over prompts, and the points of a curve share forward passes: what does not
depend on the dictionary (the clean and counterfactual runs, their activations and the gradient that
attribution needs) is computed once per hook and prompt set (`patch_context`, `edit_context`) and
reused by every dictionary; all the patched runs of a curve go through the model together, and only
the last position's logits are computed where only they are read. The positions before the first one
that a patch changes are the clean run's at every layer (attention is causal): they run once, and their
key-value cache carries the patched runs, which compute only the positions from there on
(`prefix_cache`, `run_with_activation(..., cache=)`).
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from helpers.activations.harvest import model_device
from helpers.activations.hooks import layer_of
from helpers.activations.hooks import name as hook_name
from helpers.activations.hooks import blocks_before
from helpers.activations.models import hooked, kv_cache_fix, skipping_blocks
from helpers.causal.prompts import PromptSet, logit_diff
from helpers.dictionaries.dictionary import as_dictionary, encode_batched
from helpers.evals.reconstruction import SPLICE_TOKENS
from helpers.results import Estimate, Result, Table


def check_hook(model, dictionary, hook: str) -> None:
    if layer_of(hook) >= model.cfg.n_layers:
        raise ValueError(f"{hook!r}: layer {layer_of(hook)} is beyond the model's {model.cfg.n_layers} layers")
    if dictionary.hook_name and dictionary.hook_name != hook:
        raise ValueError(f"{dictionary.name} was fitted on {dictionary.hook_name!r}, not {hook!r}: patch it at its "
                         "own hook, or fit one for this layer")


_device = model_device


@torch.no_grad()
def hook_acts(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations [n, pos, d] at `hook` (the forward pass stops after its layer)."""
    _, cache = model.run_with_cache(tokens.to(_device(model)), names_filter=[hook], stop_at_layer=layer_of(hook) + 1)
    return cache[hook].float()


def run_with_activation(model, tokens, hook: str, new_act: torch.Tensor, last_only: bool = False,
                        cache=None) -> torch.Tensor:
    """Logits with the activation at `hook` replaced by new_act (all positions); last_only: only the
    last position's logits, [n, vocab] (the unembedding of the other positions is skipped). The blocks
    before the hook, whose output the replacement discards, are skipped (`skipping_blocks`). With a
    key-value `cache` of the first positions (`prefix_cache`, repeated to the rows of `tokens`), `tokens`
    and `new_act` are the positions after them, and only those run."""
    def replace(act, hook):
        if act.shape != new_act.shape:
            raise ValueError(f"the activation at {hook.name} is {tuple(act.shape)}, the replacement "
                             f"{tuple(new_act.shape)}: give one [n, pos, d] for every prompt and position")
        return new_act.to(act.dtype)
    kwargs = {} if cache is None else {"past_key_values": cache, "use_cache": True}
    with skipping_blocks(model, blocks_before(hook)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        if last_only:
            return model.run_with_hooks(tokens.to(_device(model)), fwd_hooks=[(hook, replace)], logits_to_keep=1,
                                        **kwargs)[:, -1]
        return model.run_with_hooks(tokens.to(_device(model)), fwd_hooks=[(hook, replace)], **kwargs)


@torch.no_grad()
def prefix_cache(model, tokens: torch.Tensor, n_positions: int):
    """The model's key-value cache after a plain run of the first `n_positions` positions of `tokens`
    [n, pos], for `run_with_activation(..., cache=)`; None where the model keeps no cache this code can
    read and repeat (its callers then run every position)."""
    kv_cache_fix()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            _, cache = model.run_with_hooks(tokens[:, :n_positions].to(_device(model)), return_type="logits_and_cache",
                                            use_cache=True, logits_to_keep=1)
    except (TypeError, ValueError):
        return None
    length = getattr(cache, "get_seq_length", None)
    if not callable(length) or int(length()) != n_positions or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return cache


def first_change(acts: list[torch.Tensor], clean: torch.Tensor) -> int:
    """The first position where any of `acts` ([n, pos, d] each) differs from the `clean` activation
    (pos - 1 at most: the last position always runs)."""
    differs = torch.zeros(clean.shape[1], dtype=torch.bool)
    for a in acts:
        differs |= (a.to(clean.device) != clean).flatten(2).any(-1).any(0).cpu()
    return min(int(differs.float().argmax()) if differs.any() else clean.shape[1], clean.shape[1] - 1)


@torch.no_grad()
def _last_logits_and_acts(model, tokens, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, vocab] last-position logits and [n, pos, d] activations at `hook`, from one forward pass."""
    logits, cache = model.run_with_cache(tokens.to(_device(model)), names_filter=[hook], logits_to_keep=1)
    return logits[:, -1].float(), cache[hook].float()


@torch.no_grad()
def _patched_last_logits(model, tokens, hook: str, acts: list[torch.Tensor], max_rows: int = 256,
                         clean: torch.Tensor | None = None) -> list[torch.Tensor]:
    """For each activation in `acts` ([n, pos, d] each), the last-position logits [n, vocab] of the
    prompts `tokens` with that activation at `hook`: the patched runs go through the model together,
    in batches of at most `max_rows` prompts. With the `clean` activation at `hook`, the positions
    before the first one that any patch changes are the clean run's at every layer (attention is
    causal): they run once (`prefix_cache`), and the patched runs only from there on."""
    n = tokens.shape[0]
    per = max(1, max_rows // n)  # patches per pass
    start = first_change(acts, clean) if clean is not None else 0
    out = []
    for i in range(0, len(acts), per):
        group = acts[i:i + per]
        cache = prefix_cache(model, tokens, start) if start > 0 else None  # grows with the pass: one per pass
        if cache is None:
            logits = run_with_activation(model, tokens.repeat(len(group), 1), hook,
                                         torch.cat(group).to(_device(model)), last_only=True)
            out += list(logits.float().cpu().split(n))
            continue
        cache.batch_repeat_interleave(len(group))  # row j * len(group) + r: prompt j, patch r
        new = torch.stack(group, 1).flatten(0, 1)[:, start:].to(_device(model))
        logits = run_with_activation(model, tokens.repeat_interleave(len(group), 0)[:, start:], hook, new,
                                     last_only=True, cache=cache)
        out += list(logits.float().cpu().reshape(n, len(group), -1).unbind(1))
    return out


def _encode(dictionary, x):
    n, p, d = x.shape
    return encode_batched(dictionary, x.reshape(-1, d)).reshape(n, p, -1)


def _grad(model, tokens, hook: str, x: torch.Tensor, metric) -> torch.Tensor:
    """∂metric(last-position logits)/∂(activation at hook), [n, pos, d], at activation x."""
    leaf = x.clone().to(_device(model)).requires_grad_(True)
    with torch.enable_grad():
        metric(run_with_activation(model, tokens, hook, leaf, last_only=True)).backward()
    return leaf.grad.float().cpu()


def attribution(model, tokens, hook: str, dictionary, delta_codes: torch.Tensor, metric,
                x: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """First-order estimate, per feature, of the change in metric(last-position logits [n, vocab])
    when the codes at `hook` change by delta_codes [n, pos, F]: Σ_{n,pos} δc_f · (∂metric/∂x ·
    decoder_rows[f]). `x`: the clean activations at `hook`; `grad`: ∂metric/∂x, if the caller has it
    (it does not depend on the dictionary)."""
    if grad is None:
        x = hook_acts(model, tokens, hook) if x is None else x
        grad = _grad(model, tokens, hook, x, metric)
    return prompt_attribution(delta_codes, grad, dictionary.decoder_rows.float().cpu()).sum(0)


@torch.no_grad()
def _kl(clean_logits, logits) -> torch.Tensor:
    """[n] KL(clean || patched) of each prompt's next-token distribution, from [n, vocab] logits."""
    p = clean_logits.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


# ------------------------------------------------------------------------------- intervals

def ratio_interval(num: torch.Tensor, den: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(value, low, high): value = Σ num / Σ den over the prompts (a ratio of means, e.g. the share of
    the logit-difference gap closed), and its percentile bootstrap interval with the prompts (the
    entries of num and den, paired) resampled `n_boot` times (seeded)."""
    num, den = torch.as_tensor(num, dtype=torch.float64).flatten(), torch.as_tensor(den, dtype=torch.float64).flatten()
    if num.shape != den.shape or not len(num):
        raise ValueError(f"num {tuple(num.shape)} and den {tuple(den.shape)} must be the same non-empty shape")
    value = float(num.sum() / den.sum())
    idx = torch.randint(0, len(num), (n_boot, len(num)), generator=torch.Generator().manual_seed(seed))
    boot = num[idx].sum(1) / den[idx].sum(1)
    boot = boot[torch.isfinite(boot)]
    a = (1 - level) / 2
    low, high = (float(q) for q in torch.quantile(boot, torch.tensor([a, 1 - a], dtype=torch.float64)))
    return value, low, high



# ------------------------------------------------------------------------------- typed results

def _est(num, den, n_boot: int, seed: int) -> Estimate:
    return Estimate(*ratio_interval(num, den, n_boot, seed))


def _fmt(e: Estimate | None, spec: str = ".3f") -> str:
    return "" if e is None else format(e, spec)


def _versus(a: Estimate, b: Estimate, a_name: str, b_name: str) -> str:
    """Who is ahead where the two intervals are disjoint; "overlap" otherwise."""
    if a.low > b.high:
        return a_name
    if b.low > a.high:
        return b_name
    return "overlap"


@dataclass
class PatchPoint(Result):
    """One point of a patch curve: the top k features patched, measured on the held-out prompts (95%
    bootstrap intervals over them)."""

    k: int
    logit_diff: float
    gap_closed: Estimate                    # the share of the gap closed, held out
    kl: Estimate                            # KL(clean ‖ patched) of the next-token distribution
    gap_in_sample: Estimate | None = None   # the same prompts patched with features ranked on themselves


@dataclass
class PatchCurve(Result):
    """`patch_curve`: one dictionary's share of the gap closed against k, ranked on `rank` and measured
    on `measure` (prompt indices), with what its reconstruction can carry (`captured`)."""

    dictionary: str
    hook: str
    positions: str
    ld_clean: float
    ld_cf: float
    captured: float
    captured_candidates: float
    n_candidates: int
    n_rank: int
    n_measure: int
    rank: list
    measure: list
    points: list[PatchPoint]
    order: list
    order_in_sample: list | None = None
    attribution: list = field(default_factory=list)   # each feature's attribution summed over the rank half

    @property
    def ks(self) -> list[int]:
        return [p.k for p in self.points]

    def rows(self) -> list[dict]:
        return [{"dictionary": self.dictionary, "positions": self.positions, "k": p.k,
                 "gap closed (held-out)": _fmt(p.gap_closed), "in-sample": _fmt(p.gap_in_sample),
                 "KL": _fmt(p.kl, ".4f")} for p in self.points]

    def verdicts(self) -> list[str]:
        last = self.points[-1]
        return [f"{self.dictionary}: its reconstruction carries {self.captured:.2f} of the clean-to-counterfactual change "
                f"at the {self.positions} positions ({self.captured_candidates:.2f} for its {self.n_candidates} candidates)",
                f"{self.dictionary}: patching the top {last.k} closes {last.gap_closed:.2f} of the gap on "
                f"{self.n_measure} held-out prompts"]


@dataclass
class PatchComparison(Result):
    """Every dictionary's `PatchCurve` at one hook (all on the same split and number of candidates),
    and optionally the same patched at other positions (`contrast`). Its verdicts: what each dictionary
    captures, `reference` against `baseline` at each k (ahead only with disjoint intervals), and what
    ranking on the measured prompts themselves adds."""

    hook: str
    curves: dict[str, PatchCurve]
    contrast: dict[str, PatchCurve] = field(default_factory=dict)
    reference: str = "SAE"
    baseline: str = "random"

    def rows(self) -> list[dict]:
        out = []
        for kind, curves in (("held-out", self.curves), ("in-sample", self.curves), ("contrast, held-out", self.contrast)):
            for name, c in curves.items():
                row = {"dictionary": name, "positions": c.positions, "measured": kind,
                       "captured": c.captured, "candidates captured": c.captured_candidates}
                for p in c.points:
                    row[f"k={p.k}"] = _fmt(p.gap_in_sample if kind == "in-sample" else p.gap_closed, ".2f")
                out.append(row)
        return out

    def flattery(self) -> list[float]:
        """In-sample minus held-out gap closed, over every dictionary and every k below the last (all
        candidates)."""
        return [p.gap_in_sample.value - p.gap_closed.value for c in self.curves.values() for p in c.points[:-1]
                if p.gap_in_sample is not None]

    def verdicts(self) -> list[str]:
        if not self.curves:
            return []
        first = next(iter(self.curves.values()))
        out = [f"{self.hook}: gap closed by patching the top k of {first.n_candidates} candidates at the "
               f"{first.positions} positions, measured on {first.n_measure} held-out prompts [95% interval]",
               "captured (the share of the change each dictionary represents): "
               + ", ".join(f"{n} {c.captured:.2f}" for n, c in self.curves.items()),
               f"the same for its {first.n_candidates} candidates only: "
               + ", ".join(f"{n} {c.captured_candidates:.2f}" for n, c in self.curves.items())]
        ref, base = self.curves.get(self.reference), self.curves.get(self.baseline)
        if ref is not None and base is not None:
            out.append(f"held-out, {self.reference} vs {self.baseline} (who is ahead with disjoint intervals): "
                       + ", ".join(f"k={a.k}: {_versus(a.gap_closed, b.gap_closed, self.reference, self.baseline)}"
                                   for a, b in zip(ref.points, base.points)))
        flattery = self.flattery()
        if flattery:
            out.append(f"in-sample minus held-out gap closed, over every method and k below all: mean "
                       f"{float(np.mean(flattery)):+.3f}, largest {max(flattery):+.3f}")
        top = self.leader(first.points[0].k)
        out.append(f"the top feature alone (k={first.points[0].k}): {top[0]} closes the most held out, "
                   f"{top[1]:.2f}" + self._ahead_of_all(first.points[0].k))
        if len(first.points) > 1:
            k = first.points[-2].k
            best = self.leader(k)
            out.append(f"at k={k} (the largest below all candidates): {best[0]} closes the most held out, "
                       f"{best[1]:.2f}" + self._ahead_of_all(k))
        if self.contrast:
            most = max((c.points[-1].gap_closed.value, n) for n, c in self.contrast.items())
            out.append(f"contrast at the {next(iter(self.contrast.values())).positions} positions: the most any "
                       f"method closes with all its candidates is {most[0]:.2f} ({most[1]})")
        return out

    def at(self, name: str, k: int, contrast: bool = False) -> PatchPoint | None:
        """Dictionary `name`'s point at k (held out), or of the contrast; None where its curve has no k."""
        return next((p for p in (self.contrast if contrast else self.curves)[name].points if p.k == k), None)

    def leader(self, k: int) -> tuple[str, float]:
        """The dictionary that closes the most of the gap held out at k, and how much."""
        return max(((n, self.at(n, k).gap_closed.value) for n in self.curves if self.at(n, k) is not None),
                   key=lambda t: t[1])

    def _ahead_of_all(self, k: int) -> str:
        """", clearly ahead of every other method" where its interval lies above all the others'."""
        name = self.leader(k)[0]
        low = self.at(name, k).gap_closed.low
        clear = all(low > self.at(n, k).gap_closed.high for n in self.curves if n != name and self.at(n, k) is not None)
        return ", clearly ahead of every other method" if clear else ", not clearly ahead of every other method (intervals overlap)"


@dataclass
class EditPoint(Result):
    """One point of an edit curve: the top k features zero-ablated, measured on the held-out prompts."""

    k: int
    logit_diff: float
    accuracy: float
    edit: Estimate                           # the share of the logit difference removed, held out
    edit_in_sample: Estimate | None = None   # features ranked on the measured prompts themselves
    edit_random: Estimate | None = None      # k candidates drawn at random
    ce_increase: Estimate | None = None      # the CE increase on the held-out text (nats/token)
    ce_random: Estimate | None = None        # ... of the k random features


@dataclass
class EditCurve(Result):
    """`edit_curve`: one dictionary's edit and collateral damage against k."""

    dictionary: str
    hook: str
    ld_clean: float
    ce_clean: float
    n_candidates: int
    n_rank: int
    n_measure: int
    rank: list
    measure: list
    points: list[EditPoint]
    order: list
    order_in_sample: list | None = None

    def rows(self) -> list[dict]:
        return [{"dictionary": self.dictionary, "k": p.k, "edit (held-out)": _fmt(p.edit),
                 "in-sample": _fmt(p.edit_in_sample), "k random features": _fmt(p.edit_random),
                 "ΔCE (nats/token)": _fmt(p.ce_increase, "+.3f")} for p in self.points]

    def verdicts(self) -> list[str]:
        out = []
        for p in self.points:
            if p.edit_random is not None:
                who = _versus(p.edit, p.edit_random, "the attributed features", "random features")
                out.append(f"{self.dictionary}, k={p.k}: edit {p.edit:.2f} against {p.edit_random:.2f} for k random "
                           f"features: " + ("overlap" if who == "overlap" else f"{who} ahead"))
        return out


@dataclass
class EditComparison(Result):
    """Every dictionary's `EditCurve` at one hook, on the same split, text and number of candidates."""

    hook: str
    curves: dict[str, EditCurve]

    def rows(self) -> list[dict]:
        return [r for c in self.curves.values() for r in c.rows()]

    def verdicts(self) -> list[str]:
        if not self.curves:
            return []
        c = next(iter(self.curves.values()))
        out = [f"{self.hook}: clean logit difference {c.ld_clean:.2f} ({c.n_measure} held-out prompts), clean CE "
               f"{c.ce_clean:.3f} nats/token; {c.n_candidates} candidates per method; [95% intervals]"]
        for curve in self.curves.values():
            out.extend(curve.verdicts()[:1])
        k1 = c.points[0].k
        name, p = self.leader(k1)
        out.append(f"k={k1}: {name} removes the most held out, {p.edit:.2f}"
                   + (f", for ΔCE {p.ce_increase.value:+.3f} nats/token" if p.ce_increase is not None else ""))
        shrink = [(q.edit_in_sample.value - q.edit.value, n) for n, cu in self.curves.items() for q in cu.points[:1]
                  if q.edit_in_sample is not None]
        if shrink:
            most = max(shrink)
            out.append(f"k={k1}: in-sample minus held-out edit, largest {most[0]:+.2f} ({most[1]}): what ranking on "
                       "the measured prompts would have added")
        precise = self.precise()
        out.append("a precise edit (beats k random features of its dictionary with disjoint intervals at k ≤ "
                   f"{self.small_k}): " + (", ".join(f"{n} (k={k})" for n, k in precise.items()) if precise else "none"))
        return out

    small_k = 4

    def leader(self, k: int) -> tuple[str, EditPoint]:
        """The dictionary whose top k features remove the most of the behaviour held out, and its point."""
        pts = {n: p for n, c in self.curves.items() for p in c.points if p.k == k}
        name = max(pts, key=lambda n: pts[n].edit.value)
        return name, pts[name]

    def precise(self) -> dict[str, int]:
        """{dictionary: the smallest k ≤ small_k} at which its edit beats k random features of its own
        dictionary with disjoint 95% intervals."""
        out = {}
        for n, c in self.curves.items():
            for p in c.points:
                if p.k <= self.small_k and p.edit_random is not None and p.edit.low > p.edit_random.high:
                    out[n] = p.k
                    break
        return out


@dataclass
class LayerPatch(Result):
    """Plain patching at one layer: the share of the gap closed at each position set, and each prompt's
    logit difference ("clean", "cf" and one per position set)."""

    layer: int
    gap_closed: dict
    per_prompt: dict

    def __post_init__(self):
        self.per_prompt = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in self.per_prompt.items()}

    def ld(self, which: str) -> torch.Tensor:
        """[n]: each prompt's logit difference: "clean", "cf" or patched at a position set."""
        return self.per_prompt[which]

    def closed(self, positions: str) -> float:
        """The share of the gap closed by patching the position set `positions` (e.g. "changed", "last"),
        over all prompts."""
        return self.gap_closed[positions]

    def interval(self, positions: str, prompts=None, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """The share of the gap closed at `positions` over `prompts` (default all), with its bootstrap
        interval (`ratio_interval`)."""
        idx = slice(None) if prompts is None else torch.as_tensor(prompts, dtype=torch.long)
        clean, cf, ld = self.ld("clean")[idx], self.ld("cf")[idx], self.ld(positions)[idx]
        return _est(clean - ld, clean - cf, n_boot, seed)


@dataclass
class PatchByLayer(Result):
    """`patch_positions_by_layer`: plain patching of the whole residual stream, layer by layer."""

    layers: list[LayerPatch]
    positions: list

    def at(self, layer: int) -> LayerPatch:
        return next(r for r in self.layers if r.layer == layer)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerPatch:
        return self.layers[i]

    def rows(self) -> list[dict]:
        return [{"layer": r.layer, **{p: r.gap_closed[p] for p in self.positions}} for r in self.layers]

    def moved(self, early: str = "changed", late: str = "last") -> int | None:
        """The first layer where `late` carries more of the answer than `early` (None: none)."""
        return next((r.layer for r in self.layers if r.gap_closed[late] > r.gap_closed[early]), None)

    def intervals(self, layers=None, n_boot: int = 1000, seed: int = 0) -> Table:
        """The share of the gap closed at each position set, with its 95% interval over all prompts, at
        `layers` (default all)."""
        want = [r.layer for r in self.layers] if layers is None else list(layers)
        rows = [{"layer": layer, **{p: format(self.at(layer).interval(p, n_boot=n_boot, seed=seed), ".2f")
                                    for p in self.positions}} for layer in want]
        return Table(rows, title="share of the gap closed [95% interval over the prompts]")

    def verdicts(self) -> list[str]:
        if not {"changed", "last"} <= set(self.positions):
            return []
        return [f"first layer where the last position carries more of the answer than the changed position: "
                f"{self.moved()}"]


def gap_closed(ld_clean: torch.Tensor, ld_cf: torch.Tensor, ld: torch.Tensor) -> float:
    """The share of the logit-difference gap closed over a set of prompts, from per-prompt logit
    differences: mean(ld_clean - ld) / mean(ld_clean - ld_cf). 0: the clean answer; 1: the
    counterfactual run's."""
    return float((ld_clean - ld).mean() / (ld_clean - ld_cf).mean())


def candidate_pool(n_features: int, n: int | None, seed: int = 0, salt: str = "") -> torch.Tensor:
    """The features a dictionary may pick from, sorted: all of them when n is None or n >= n_features,
    else a seeded random subset of n (the seed mixed with `salt`, e.g. the dictionary's name, so that
    two dictionaries of the same size do not get the same subset). Giving every method the same
    number of candidates keeps a larger pool from winning by having more to choose from."""

    if n is None or n >= n_features:
        return torch.arange(n_features)
    if n < 1:
        raise ValueError(f"a candidate pool needs at least one feature, not {n}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(salt.encode()))
    return torch.randperm(n_features, generator=g)[:n].sort().values


POSITIONS = ("changed", "between", "last", "all")


def position_mask(ps, positions) -> torch.Tensor:
    """[n, pos] bool: where to patch. "changed": where each prompt differs from its counterfactual (IOI:
    the repeated name, the one name position whose residual stream differs: the names before it
    come before the change and are identical in both runs); "between": after the changed position
    and before the last; "last": the last position, where the answer is read; "all": every
    position but BOS (identical in both runs anyway); or a bool tensor [n, pos] of one's own."""
    n, p = ps.tokens.shape
    if isinstance(positions, torch.Tensor):
        if positions.shape != (n, p) or positions.dtype != torch.bool:
            raise ValueError(f"a position mask must be a bool tensor of shape {(n, p)}")
        return positions
    changed = changed_positions(ps)
    if positions == "changed":
        return changed
    if positions == "last":
        mask = torch.zeros(n, p, dtype=torch.bool)
        mask[:, -1] = True
        return mask
    if positions == "between":
        first = changed.float().argmax(1)
        col = torch.arange(p)
        return (col[None] > first[:, None]) & (col[None] < p - 1) & changed.any(1, keepdim=True)
    if positions == "all":
        mask = torch.ones(n, p, dtype=torch.bool)
        mask[:, 0] = False
        return mask
    raise ValueError(f"positions must be one of {POSITIONS} or a bool mask, not {positions!r}")


def _split(ps, split, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rank, measure = ps.split(seed) if split is None else (torch.as_tensor(s, dtype=torch.long) for s in split)
    if set(rank.tolist()) & set(measure.tolist()):
        raise ValueError("the ranking and the measuring prompts overlap: the measurement would not be held out")
    if not len(rank) or not len(measure):
        raise ValueError("both halves of the split need prompts")
    return rank, measure


def code_change(dictionary, x: torch.Tensor, x_cf: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, pos, F]: the dictionary's codes of the counterfactual activations x_cf minus those of the
    clean activations x ([n, pos, d] each), where `mask` [n, pos] is True, zero elsewhere: what
    patching every feature at those positions changes the codes by."""
    return (_encode(dictionary, x_cf) - _encode(dictionary, x)) * mask[..., None]


def prompt_attribution(delta: torch.Tensor, grad: torch.Tensor, decoder_rows: torch.Tensor) -> torch.Tensor:
    """[n, F]: each prompt's first-order estimate of the change in its metric when each feature's codes
    change by delta [n, pos, F]: Σ_pos δc_f · (∂metric/∂x · decoder_rows[f]), from grad [n, pos, d]."""
    return (delta * (grad @ decoder_rows.T)).sum(1)


def feature_attribution(metric, x: torch.Tensor, x_cf: torch.Tensor, encode, decoder_rows: torch.Tensor) -> torch.Tensor:
    """[n, F]: gradient × change of code. Each prompt's first-order estimate of how much its metric moves
    when each feature's code moves from its value on x to its value on x_cf, the rest of the activation
    kept: (c_f(x_cf) - c_f(x)) · (∂metric/∂x · decoder_rows[f]), the gradient taken at x.

    metric: a function from activations [n, d] to [n] (prompt i's metric reads row i only); x, x_cf:
    [n, d] clean and counterfactual activations; encode: activations [N, d] -> codes [N, F];
    decoder_rows: [F, d]. Summed over prompts, it ranks the features for `patch_curve`."""
    leaf = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(metric(leaf).sum(), leaf)
    with torch.no_grad():
        delta = encode(x_cf.float()).float() - encode(x.float()).float()
    return prompt_attribution(delta[:, None], grad.float()[:, None], decoder_rows.float())


def direct_logit_attribution(decoder_rows: torch.Tensor, unembed: torch.Tensor, answer, distractor,
                             gain: torch.Tensor | None = None, resid: torch.Tensor | None = None,
                             eps: float = 0.0) -> torch.Tensor:
    """[n, F]: each feature's direct effect on each prompt's answer-minus-distractor logit, per unit of
    its code: its decoder direction times the final norm's gain, divided by the norm's scale on that
    prompt (held fixed: the linear part of the norm), through the unembedding onto
    unembed[:, answer] - unembed[:, distractor].

    decoder_rows: [F, d]; unembed: [d, vocab]; answer, distractor: [n] token ids; gain: [d] the final
    norm's weight (None: 1); resid: [n, d] the final residual stream at the read position, whose root
    mean square (plus eps under the root, as RMSNorm) is the scale (None: 1). Only the direct path
    through the unembedding counts: what later layers make of the direction is left out."""
    answer, distractor = torch.as_tensor(answer, dtype=torch.long), torch.as_tensor(distractor, dtype=torch.long)
    w = unembed.float()
    rows = decoder_rows.float() * (1.0 if gain is None else gain.float())
    out = (rows @ (w[:, answer] - w[:, distractor])).T                      # [n, F]
    if resid is not None:
        out = out / (resid.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return out


def final_norm(model) -> tuple[torch.Tensor | None, float]:
    """The final norm's gain [d] (None where it has none) and eps, as `direct_logit_attribution` reads them."""
    gain = next((p.detach().float().cpu() for n, p in model.ln_final.named_parameters() if n.endswith("weight")), None)
    cfg = getattr(model, "cfg", None)
    eps = next((float(getattr(cfg, a)) for a in ("eps", "rms_norm_eps", "layer_norm_eps") if getattr(cfg, a, None)), 0.0)
    return gain, eps


def position_readout(model, tokens: torch.Tensor, hook: str, correct, wrong, position: int):
    """A function from activations [n, d] to [n]: each prompt's last-position logit difference (correct
    minus wrong) when the activation at `hook`, token `position`, is replaced by its row, the other
    positions keeping their clean values. Differentiable: `feature_attribution`'s metric for the model."""
    base = hook_acts(model, tokens, hook)
    correct, wrong = torch.as_tensor(correct, dtype=torch.long), torch.as_tensor(wrong, dtype=torch.long)
    mask = torch.zeros(base.shape[:2], dtype=torch.bool, device=base.device)
    mask[:, position] = True

    def metric(x: torch.Tensor) -> torch.Tensor:
        acts = torch.where(mask[..., None], x.to(base.device, base.dtype)[:, None], base)
        logits = run_with_activation(model, tokens, hook, acts, last_only=True).float().cpu()
        rows = torch.arange(len(tokens))
        return logits[rows, correct] - logits[rows, wrong]
    return metric


def patched_activation(x: torch.Tensor, delta: torch.Tensor, decoder_rows: torch.Tensor, features) -> torch.Tensor:
    """x [n, pos, d] with the codes of `features` changed by delta [n, pos, F]: x + Σ_f δc_f ·
    decoder_rows[f]. Everything else, the dictionary's reconstruction error included, is kept."""
    f = torch.as_tensor(features, dtype=torch.long)
    return x + delta[..., f] @ decoder_rows[f]


@dataclass
class PatchContext:
    """What the patch curves of every dictionary at one hook share, for one prompt set."""

    hook: str
    x: torch.Tensor        # [n, pos, d] clean activations at hook (CPU)
    x_cf: torch.Tensor     # [n, pos, d] counterfactual activations
    clean: torch.Tensor    # [n, vocab] clean last-position logits
    ld_clean: torch.Tensor  # [n] logit difference of each prompt, clean run
    ld_cf: torch.Tensor    # [n] ... counterfactual run (scored on the clean answers)
    grad: torch.Tensor     # [n, pos, d] ∂ Σ logit_diff / ∂x at the clean activations (prompt i's
    #                        row is the gradient of its own logit difference: prompts do not interact)


def patch_context(model, ps, hook: str) -> PatchContext:
    """The clean and counterfactual runs, their activations at `hook`, and the attribution gradient:
    three passes (two forward, one forward-backward), shared by every dictionary's `patch_curve`."""
    clean, x = _last_logits_and_acts(model, ps.tokens, hook)
    cf, x_cf = _last_logits_and_acts(model, ps.cf_tokens, hook)
    grad = _grad(model, ps.tokens, hook, x, lambda lg: logit_diff(lg, ps).sum())
    return PatchContext(hook, x.cpu(), x_cf.cpu(), clean.cpu(), logit_diff(clean, ps).cpu(),
                        logit_diff(cf, ps).cpu(), grad)


@torch.no_grad()
def patch_curve(model, ps, hook: str, dictionary, ks=(1, 2, 4, 8, 16, 32), context: PatchContext | None = None,
                split=None, positions="changed", candidates=None, in_sample: bool = True, n_boot: int = 1000,
                seed: int = 0) -> PatchCurve:
    """Patch the k features that most move the logit difference towards the counterfactual, at
    `positions` (see `position_mask`; default the repeated name), ranked on one half of the prompts
    and measured on the other.

    split: (rank, measure) prompt indices (default `ps.split(seed)`). Features are ranked by
    attribution summed over the rank half; every point of the curve is a real patched forward pass of
    the measure half, with a bootstrap interval over those prompts (`ratio_interval`). With
    `in_sample`, the same measure half is also patched with features ranked on itself ("gap_in_sample"):
    selection on the scored data, the contrast that shows what the held-out split removes.
    candidates: the features allowed (default all; see `candidate_pool`); the last point of a curve
    with k = len(candidates) patches them all.
    The result's "captured" is the dictionary's `captured_share` at these positions (all prompts,
    all features; "captured_candidates": only the candidates'). Pass the hook's `patch_context` to
    share its runs between dictionaries."""
    check_hook(model, dictionary, hook)
    ctx = context if context is not None else patch_context(model, ps, hook)
    if ctx.hook != hook:
        raise ValueError(f"the context was made for {ctx.hook!r}, not {hook!r}")
    rank, measure = _split(ps, split, seed)
    mask = position_mask(ps, positions)
    cand = torch.arange(dictionary.n_features) if candidates is None else torch.as_tensor(candidates).long()
    x, x_cf = ctx.x, ctx.x_cf
    delta = code_change(dictionary, x, x_cf, mask)
    rows = dictionary.decoder_rows.float().cpu()
    per_prompt = prompt_attribution(delta, ctx.grad, rows)          # [n, F] attribution of each prompt
    # most negative first: pushes the answer towards the counterfactual's
    order = cand[per_prompt[rank][:, cand].sum(0).argsort()]
    orders = {"held-out": order}
    if in_sample:
        orders["in-sample"] = cand[per_prompt[measure][:, cand].sum(0).argsort()]
    dx = (x_cf - x)[mask]
    captured = _captured(dx, (delta @ rows)[mask])
    captured_cand = _captured(dx, (delta[..., cand] @ rows[cand])[mask])
    xm, dm, pm = x[measure], delta[measure], ps.subset(measure)
    sets = [o[:k] for o in orders.values() for k in ks]
    # the same features in another order are the same patch (every candidate, for one): run once
    first = {}
    for i, f in enumerate(sets):
        first.setdefault(tuple(sorted(f.tolist())), i)
    unique = sorted(set(first.values()))
    run = dict(zip(unique, _patched_last_logits(model, pm.tokens, hook,
                                                [patched_activation(xm, dm, rows, sets[i]) for i in unique], clean=xm)))
    logits = [run[first[tuple(sorted(f.tolist()))]] for f in sets]
    ld_c, ld_cf = ctx.ld_clean[measure], ctx.ld_cf[measure]
    points = []
    for i, k in enumerate(ks):
        ld = logit_diff(logits[i], pm)
        in_s = _est(ld_c - logit_diff(logits[len(ks) + i], pm), ld_c - ld_cf, n_boot, seed) if in_sample else None
        points.append(PatchPoint(k=int(k), logit_diff=float(ld.mean()), gap_closed=_est(ld_c - ld, ld_c - ld_cf, n_boot, seed),
                                 kl=_est(_kl(ctx.clean[measure], logits[i]), torch.ones(len(ld)), n_boot, seed),
                                 gap_in_sample=in_s))
    return PatchCurve(dictionary=dictionary.name, hook=hook, positions=positions if isinstance(positions, str) else "mask",
                      ld_clean=float(ld_c.mean()), ld_cf=float(ld_cf.mean()), captured=captured,
                      captured_candidates=captured_cand, n_candidates=len(cand), n_rank=len(rank),
                      n_measure=len(measure), rank=rank.tolist(), measure=measure.tolist(), points=points,
                      order=order[: max(ks)].tolist(),
                      order_in_sample=orders["in-sample"][: max(ks)].tolist() if in_sample else None,
                      attribution=per_prompt[rank].sum(0).tolist())


@torch.no_grad()
def ce_losses(model, tokens, hook: str | None = None, new_act_fn=None, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of `tokens` (BOS first): the summed next-token CE [n] and the number of tokens
    predicted [n], optionally with the activation at `hook` replaced by new_act_fn(activation)."""
    counts = torch.full((len(tokens),), tokens.shape[1] - 1, dtype=torch.float64)
    if hook is not None:
        return ce_losses_edited(model, tokens, hook, [new_act_fn], batch_size)[0], counts
    batches = [tokens[i:i + batch_size].to(_device(model)) for i in range(0, len(tokens), batch_size)]
    return torch.cat([_summed_ce(model(t), t) for t in batches]), counts


@torch.no_grad()
def ce_losses_and_acts(model, tokens, hook: str, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ce_losses` of the unedited model and, from the same passes, the activations at `hook` [n, T, d]
    (on the CPU): what `ce_losses_edited(..., acts=)` edits."""
    sums, acts = [], []
    for i in range(0, len(tokens), batch_size):
        t = tokens[i:i + batch_size].to(_device(model))
        logits, cache = model.run_with_cache(t, names_filter=[hook])
        sums.append(_summed_ce(logits, t))
        acts.append(cache[hook].cpu())
    return torch.cat(sums), torch.full((len(tokens),), tokens.shape[1] - 1, dtype=torch.float64), torch.cat(acts)


def _summed_ce(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)[:, :-1]
    return -logp.gather(-1, t[:, 1:, None])[..., 0].sum(1).cpu().double()


@torch.no_grad()
def ce_losses_edited(model, tokens, hook: str, new_act_fns: list, batch_size: int = 8,
                     max_tokens: int = SPLICE_TOKENS, acts: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`ce_losses` with the activation at `hook` replaced by each of `new_act_fns` in turn: the summed CE
    [n] of each edit. The edited runs of a batch of sequences go through the model together, as many as
    fit in `max_tokens` tokens (at least one per pass). `acts`: the unedited activations at `hook` [n, T, d]
    of `tokens`, when you have them (`ce_losses_and_acts`); the edits are then applied to them and the
    passes skip the blocks before the hook."""
    if acts is not None and tuple(acts.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"acts {tuple(acts.shape)} are not the activations of tokens {tuple(tokens.shape)}")
    out = [[] for _ in new_act_fns]
    dev = _device(model)
    for i in range(0, len(tokens), batch_size):
        t = tokens[i:i + batch_size].to(dev)
        per_pass = max(1, max_tokens // t.numel())
        a_clean = None if acts is None else acts[i:i + batch_size].to(dev)
        for g in range(0, len(new_act_fns), per_pass):
            fns = new_act_fns[g:g + per_pass]

            def edit(act, hook):
                if a_clean is not None:
                    return torch.cat([fn(a_clean) for fn in fns]).to(act.dtype)
                return torch.cat([fn(a) for fn, a in zip(fns, act.split(len(t)))]).to(act.dtype)

            with skipping_blocks(model, 0 if a_clean is None else blocks_before(hook)):
                logits = model.run_with_hooks(t.repeat(len(fns), 1), fwd_hooks=[(hook, edit)])
            for j, lg in enumerate(logits.split(len(t))):
                out[g + j].append(_summed_ce(lg, t))
            del logits
    return [torch.cat(o) for o in out]


def ce_loss(model, tokens, hook: str | None = None, new_act_fn=None, batch_size: int = 8) -> float:
    """Mean next-token CE on `tokens` (BOS first), optionally with the activation at `hook` replaced
    by new_act_fn(activation)."""
    sums, counts = ce_losses(model, tokens, hook, new_act_fn, batch_size)
    return float(sums.sum() / counts.sum())


def ablate_activation(act: torch.Tensor, encode, decoder_rows: torch.Tensor, features) -> torch.Tensor:
    """act [n, pos, d] with the codes of `features` set to 0 at every position but the first (BOS):
    their contribution codes @ decoder_rows[features] subtracted, everything else (the other features,
    the reconstruction error, the bias) kept. `encode`: activations [N, d] -> codes [N, F]."""
    rows = decoder_rows.float()
    sel = torch.as_tensor(features, dtype=torch.int64)
    n, p, d = act.shape
    x = act[:, 1:].float()
    c = encode(x.reshape(-1, d).to(rows.device))[:, sel].float()
    out = act.clone()
    out[:, 1:] = (x.reshape(-1, d) - (c @ rows[sel]).to(x.device)).reshape(n, p - 1, d).to(act.dtype)
    return out


def ablate(dictionary, features) -> callable:
    """A function act -> act with the codes of `features` set to 0 (BOS position untouched): see
    `ablate_activation`."""
    rows = dictionary.decoder_rows.float()

    def fn(act):
        return ablate_activation(act, dictionary.encode, rows, features)
    return fn


@dataclass
class EditContext:
    """What the edit curves of every dictionary at one hook share, for one prompt set and text."""

    hook: str
    x: torch.Tensor        # [n, pos, d] the prompts' activations at hook
    grad: torch.Tensor     # [n, pos, d] ∂ Σ logit_diff / ∂x
    ld_clean: torch.Tensor  # [n] each prompt's logit difference, unedited
    ce_clean: torch.Tensor  # [n_text] summed CE of each held-out text sequence, unedited
    ce_count: torch.Tensor  # [n_text] tokens predicted in each
    text_x: torch.Tensor | None = None  # [n_text, T, d] the text's activations at hook, unedited


def edit_context(model, ps, text_tokens: torch.Tensor, hook: str) -> EditContext:
    """The prompts' clean run, activations and attribution gradient, and the text's clean CE loss,
    shared by every dictionary's `edit_curve` at `hook`."""
    clean, x = _last_logits_and_acts(model, ps.tokens, hook)
    grad = _grad(model, ps.tokens, hook, x, lambda lg: logit_diff(lg, ps).sum())
    ce, count, text_x = ce_losses_and_acts(model, text_tokens, hook)
    return EditContext(hook, x.cpu(), grad, logit_diff(clean, ps).cpu(), ce, count, text_x)


@torch.no_grad()
def edit_curve(model, ps, text_tokens: torch.Tensor, hook: str, dictionary, ks=(1, 4, 16),
               context: EditContext | None = None, split=None, candidates=None, in_sample: bool = True,
               random_control: bool = True, random_ce: bool = False, n_boot: int = 1000, seed: int = 0) -> EditCurve:
    """Remove a behaviour by zero-ablating its top-k features; measure edit and collateral damage.

    As `patch_curve`: features (from `candidates`, default all) are ranked by attribution on one half
    of the prompts (`split`, default `ps.split(seed)`) and the edit (the share of the mean logit
    difference removed) is measured on the other, with a bootstrap interval over those prompts; the
    collateral damage (CE increase on `text_tokens`) has one over the text's sequences.
    `in_sample` adds the edit of features ranked on the measured half itself ("edit_in_sample"), and
    `random_control` that of k candidates drawn at random (seeded; "edit_random"): what k features of
    this dictionary do without being chosen for the behaviour; `random_ce` adds their collateral
    damage ("ce_random"; one more pass over the text per k, the costly part of a curve).
    Pass the hook's `edit_context` to share its runs between dictionaries."""
    check_hook(model, dictionary, hook)
    ctx = context if context is not None else edit_context(model, ps, text_tokens, hook)
    if ctx.hook != hook:
        raise ValueError(f"the context was made for {ctx.hook!r}, not {hook!r}")
    rank, measure = _split(ps, split, seed)
    cand = torch.arange(dictionary.n_features) if candidates is None else torch.as_tensor(candidates).long()
    x = ctx.x
    c = _encode(dictionary, x)
    c[:, 0] = 0  # BOS is never ablated
    per_prompt = prompt_attribution(-c, ctx.grad, dictionary.decoder_rows.float().cpu())   # [n, F]
    order = cand[per_prompt[rank][:, cand].sum(0).argsort()]
    orders = {"edit": order}
    if in_sample:
        orders["edit_in_sample"] = cand[per_prompt[measure][:, cand].sum(0).argsort()]
    if random_control:
        g = torch.Generator().manual_seed(seed)
        orders["edit_random"] = cand[torch.randperm(len(cand), generator=g)]
    xm, pm, ld_c = x[measure], ps.subset(measure), ctx.ld_clean[measure]
    fns = {(name, k): ablate(dictionary, o[:k]) for name, o in orders.items() for k in ks}
    logits = dict(zip(fns, _patched_last_logits(model, pm.tokens, hook, [fn(xm) for fn in fns.values()], clean=xm)))
    costed = [(name, k) for k in ks for name in ("edit", "edit_random")
              if name in orders and (name == "edit" or random_ce)]  # the edits whose CE on the text is measured
    ce = dict(zip(costed, ce_losses_edited(model, text_tokens, hook, [fns[c] for c in costed], acts=ctx.text_x)))
    points = []
    for k in ks:
        ld = logit_diff(logits[("edit", k)], pm)
        est = {name: _est(ld_c - logit_diff(logits[(name, k)], pm), ld_c, n_boot, seed) for name in orders}
        for name, key in (("edit", "ce_increase"), ("edit_random", "ce_random")):
            if (name, k) in ce:
                est[key] = _est(ce[(name, k)] - ctx.ce_clean, ctx.ce_count, n_boot, seed)
        points.append(EditPoint(k=int(k), logit_diff=float(ld.mean()), accuracy=float((ld > 0).float().mean()), **est))
    return EditCurve(dictionary=dictionary.name, hook=hook, ld_clean=float(ld_c.mean()),
                     ce_clean=float(ctx.ce_clean.sum() / ctx.ce_count.sum()), n_candidates=len(cand),
                     n_rank=len(rank), n_measure=len(measure), rank=rank.tolist(), measure=measure.tolist(),
                     points=points, order=order[: max(ks)].tolist(),
                     order_in_sample=orders["edit_in_sample"][: max(ks)].tolist() if in_sample else None)


@dataclass
class UpstreamFeature(Result):
    """One earlier feature of a `FeatureCircuit`: the attribution (a first-order estimate of how much
    zero-ablating it changes the later feature's summed activation) and the change an actual ablation
    makes."""

    feature: int
    attribution: float
    change: float
    description: str = ""


@dataclass
class FeatureCircuit(Result):
    """`upstream_features`: the features at `up_hook` whose zero-ablation changes `feature` at `down_hook`
    most, ranked by attribution (largest magnitude first), each verified by an actual ablation; `base`
    is the later feature's activation summed over the prompts with nothing ablated. Iterating it, or
    indexing it, gives the `UpstreamFeature`s; `described` adds the features' descriptions."""

    down_hook: str
    feature: int
    up_hook: str
    base: float
    upstream: list[UpstreamFeature]
    description: str = ""

    def __iter__(self):
        return iter(self.upstream)

    def __len__(self) -> int:
        return len(self.upstream)

    def __getitem__(self, i: int) -> UpstreamFeature:
        return self.upstream[i]

    @property
    def features(self) -> list[int]:
        """The upstream features, by attribution."""
        return [u.feature for u in self.upstream]

    @property
    def strongest(self) -> UpstreamFeature | None:
        """The upstream feature whose ablation changes the later one most (None: none found)."""
        return max(self.upstream, key=lambda u: abs(u.change), default=None)

    @property
    def strongest_share(self) -> float:
        """How much ablating the strongest upstream feature moves the later feature, as a share of its
        summed activation (0: none found)."""
        u = self.strongest
        return 0.0 if u is None else abs(u.change) / max(abs(self.base), 1e-9)

    def described(self, description: str, upstream: dict) -> "FeatureCircuit":
        """The circuit with the later feature's `description` and each upstream feature's
        (`upstream`: {feature: description}, e.g. from helpers.evals.features.describe_features)."""
        ups = [replace(u, description=upstream.get(u.feature, u.description)) for u in self.upstream]
        return replace(self, description=description, upstream=ups)

    def graph(self) -> tuple[dict, list[dict]]:
        """The circuit as helpers.show.plots.circuit_graph draws it: (the later feature, the upstream ones)."""
        down, up = layer_of(self.down_hook), layer_of(self.up_hook)
        return ({"label": f"L{down} feature {self.feature}", "description": self.description},
                [{"label": f"L{up} feature {u.feature}", "description": u.description, "change": u.change}
                 for u in self.upstream])

    def rows(self) -> list[dict]:
        layer = layer_of(self.up_hook)
        return [{"layer": layer, "feature": u.feature, "attribution": f"{u.attribution:+.3f}",
                 "measured change": f"{u.change:+.3f}", "of": f"{self.base:.2f}", "description": u.description}
                for u in self.upstream]

    def verdicts(self) -> list[str]:
        head = f"layer {layer_of(self.down_hook)} feature {self.feature}" + (
            f" ({self.description})" if self.description else "")
        out = [f"{head}: summed activation {self.base:.2f} over the prompts; the measured change is that of "
               f"zero-ablating each feature at layer {layer_of(self.up_hook)}"]
        if not self.upstream:
            return out
        n = len(self.upstream)
        same_sign = sum(u.attribution * u.change > 0 for u in self.upstream)
        by_change = max(range(n), key=lambda i: abs(self.upstream[i].change))
        line = (f"attribution predicts the sign of the measured change for {same_sign} of {n}; the feature it ranks "
                f"first is " + ("also the one whose ablation changes it most" if by_change == 0
                                else f"#{by_change + 1} by the measured change"))
        if n > 2:
            rho = spearmanr([abs(u.attribution) for u in self.upstream], [abs(u.change) for u in self.upstream])[0]
            if np.isfinite(rho):
                line += f" (rank correlation of their magnitudes {rho:+.2f})"
        out.append(line)
        share = self.strongest_share
        out.append(f"the strongest upstream feature moves the later one by {share:.1%} of its summed activation"
                   + ("" if share > 0.01 else " (less than 1%: no upstream feature found that matters)"))
        return out


def upstream_features(model, tokens, down_hook: str, down_dict, feature: int, up_hook: str, up_dict,
                      top: int = 5, progress: bool = True) -> FeatureCircuit:
    """Features at `up_hook` whose zero-ablation changes `feature` (at `down_hook`) most: ranked by
    attribution, then each verified by an actual ablation. Returns a `FeatureCircuit`: each upstream
    feature's attribution and the measured change of the later feature's activation summed over the
    prompts (BOS left out), and that sum with nothing ablated (`base`). `progress` shows a bar: the
    attribution pass, the unablated pass, then one ablation per feature verified."""
    if layer_of(up_hook) >= layer_of(down_hook):
        raise ValueError(f"{up_hook!r} must come before {down_hook!r}")
    check_hook(model, up_dict, up_hook)
    check_hook(model, down_dict, down_hook)
    stop = layer_of(down_hook) + 1
    dev = _device(model)
    toks = tokens.to(dev)

    def down_activation(replace_fn=None, leaf=None):
        got = {}

        def cap(act, hook):
            got["y"] = act
            return act
        hooks = [(down_hook, cap)]
        if leaf is not None:
            hooks.insert(0, (up_hook, lambda act, hook: leaf))
        elif replace_fn is not None:
            hooks.insert(0, (up_hook, lambda act, hook: replace_fn(act)))
        model.run_with_hooks(toks, fwd_hooks=hooks, stop_at_layer=stop)
        y = got["y"][:, 1:].float()
        return down_dict.encode(y.reshape(-1, y.shape[-1]))[:, feature].sum()

    bar = tqdm(total=top + 2, desc=f"upstream of feature {feature}", unit="pass", disable=not progress, leave=False)
    x_up = hook_acts(model, tokens, up_hook)
    leaf = x_up.clone().requires_grad_(True)
    with torch.enable_grad():
        down_activation(leaf=leaf).backward()
    bar.update()
    grad = leaf.grad.float().cpu()
    c_up = _encode(up_dict, x_up)
    c_up[:, 0] = 0
    attr = (-c_up * (grad @ up_dict.decoder_rows.float().cpu().T)).sum((0, 1))
    with torch.no_grad():
        base = float(down_activation())
        bar.update()
        out = []
        for g in attr.abs().argsort(descending=True)[:top].tolist():
            after = float(down_activation(replace_fn=ablate(up_dict, [g])))
            out.append(UpstreamFeature(feature=g, attribution=float(attr[g]), change=after - base))
            bar.update()
    bar.close()
    return FeatureCircuit(down_hook=down_hook, feature=int(feature), up_hook=up_hook, base=base, upstream=out)


def changed_positions(ps) -> torch.Tensor:
    """[n, pos] bool: where a prompt and its counterfactual differ (IOI: the second name)."""
    return ps.tokens != ps.cf_tokens


@torch.no_grad()
def patch_positions_by_layer(model, ps, layers, hook_kind: str = "resid_post", progress: bool = True,
                             positions=("changed", "between", "last")) -> PatchByLayer:
    """For each layer: the share of the logit-difference gap closed by replacing the clean residual
    stream with the counterfactual one at each set of `positions` (see `position_mask`): by default
    (a) the positions where the prompts differ (IOI: the repeated name), (b) the positions between
    it and the last, (c) the last position only. One counterfactual pass for all layers, then per
    layer the patched runs of all position sets batched together, from the first patched position on. Each layer's `LayerPatch` also keeps the
    logit differences of every prompt ("clean", "cf", and one per position set, named as given or
    "mask0", "mask1", ... for a bool mask), so that the gap closed on any subset of prompts can be
    computed (`LayerPatch.interval`, `gap_closed`)."""
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} is outside the model's 0..{model.cfg.n_layers - 1}")
    dev = _device(model)
    hooks = {layer: hook_name(layer, hook_kind) for layer in layers}
    cf, cache = model.run_with_cache(ps.cf_tokens.to(dev), names_filter=list(hooks.values()), logits_to_keep=1)
    clean, clean_cache = model.run_with_cache(ps.tokens.to(dev), names_filter=list(hooks.values()), logits_to_keep=1)
    ld_clean, ld_cf = logit_diff(clean[:, -1].float(), ps).cpu(), logit_diff(cf[:, -1].float(), ps).cpu()
    masks = [position_mask(ps, p).to(dev) for p in positions]
    names = [p if isinstance(p, str) else f"mask{i}" for i, p in enumerate(positions)]

    out = []
    for layer in tqdm(list(layers), desc="patch by layer", disable=not progress):
        # every position set in the same passes: the clean activation with the counterfactual one at the
        # set's positions (the blocks before the hook are skipped; the positions before the first one
        # patched run once, unpatched)
        x, x_cf = clean_cache[hooks[layer]], cache[hooks[layer]]
        logits = _patched_last_logits(model, ps.tokens, hooks[layer],
                                      [torch.where(m[..., None], x_cf, x) for m in masks], clean=x)
        per_prompt, shares = {"clean": ld_clean, "cf": ld_cf}, {}
        for i, p in enumerate(names):
            ld = logit_diff(logits[i], ps).cpu()
            per_prompt[p] = ld
            shares[p] = gap_closed(ld_clean, ld_cf, ld)
        out.append(LayerPatch(layer=layer, gap_closed=shares, per_prompt=per_prompt))
    return PatchByLayer(layers=out, positions=names)


def _captured(d: torch.Tensor, d_hat: torch.Tensor) -> float:
    return float(1 - (d - d_hat).pow(2).sum() / d.pow(2).sum().clamp_min(1e-12))


@torch.no_grad()
def captured_share(dictionary, model, ps, hook: str, positions="all") -> float:
    """1 - ‖Δx - Δx̂‖² / ‖Δx‖² over `positions` (see `position_mask`), where Δx is the counterfactual
    minus the clean activation and Δx̂ the same for the dictionary's reconstruction. 1: patching all
    of the dictionary's features there reproduces the counterfactual activation; 0 (or below: the
    reconstruction's change can point elsewhere): patching its features reproduces none of it,
    because the difference sits in the reconstruction error, which patching keeps. `patch_curve`
    reports it too, from the activations it already has."""
    check_hook(model, dictionary, hook)
    x, x_cf = hook_acts(model, ps.tokens, hook), hook_acts(model, ps.cf_tokens, hook)
    mask = position_mask(ps, positions)
    delta = _encode(dictionary, x_cf) - _encode(dictionary, x)
    return _captured((x_cf.cpu() - x.cpu())[mask], (delta @ dictionary.decoder_rows.float().cpu())[mask])


# ------------------------------------------------------------------ patching features of a prompt pair

def _single_token(tokenizer, answer) -> int:
    if isinstance(answer, str):
        ids = tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {answer!r} is {len(ids)} tokens {ids} for this tokenizer: answers are single "
                             "tokens (mind the leading space, e.g. ' Mary')")
        return ids[0]
    return int(answer)


def _answer_ids(tokenizer, answer, n: int) -> torch.Tensor:
    """[n] token ids: one answer (a string or an id) for every prompt, or one per prompt."""
    if isinstance(answer, (str, int)) or (isinstance(answer, torch.Tensor) and answer.ndim == 0):
        return torch.full((n,), _single_token(tokenizer, answer), dtype=torch.long)
    ids = torch.tensor([_single_token(tokenizer, a) for a in answer], dtype=torch.long)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} answers for {n} prompts")
    return ids


def _prompt_tokens(model, prompts) -> tuple[torch.Tensor, list[str]]:
    """[n, pos] token ids (BOS first, as `model.to_tokens`) and the texts, from a string, a list of
    strings, or token ids ([pos] or [n, pos])."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor) or (len(prompts) and not isinstance(prompts[0], str)):
        toks = torch.as_tensor(prompts, dtype=torch.long).cpu()
        toks = toks[None] if toks.ndim == 1 else toks
        return toks, [model.tokenizer.decode(t) for t in toks]
    rows = [model.to_tokens(p)[0].cpu() for p in prompts]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"the prompts are of different token lengths {sorted(lengths)}: a batch of prompts, and a "
                         "prompt and its counterfactual, must have the same length")
    return torch.stack(rows), list(prompts)


def prompt_pairs(model, clean, corrupt=None, answer=None) -> PromptSet:
    """Clean prompts, their corrupted (counterfactual) versions and the answers, as a `PromptSet`.

    clean, corrupt: a string each, lists of strings (paired in order) or token ids [n, pos] (BOS
    first); or `clean` a list of (clean, corrupt) pairs and `corrupt` None. Every prompt must have the
    same token length as its corrupted version (and, in a list, as the others).
    answer: (right, wrong) for the clean prompts, each a single-token string (" Mary") or a token id,
    or a list of them with one per prompt. The logit difference is logit(right) - logit(wrong) on
    both runs, so it is typically positive on the clean run and negative on the corrupted one."""
    if corrupt is None:
        pairs = [clean] if isinstance(clean, tuple) else list(clean)
        clean, corrupt = [p[0] for p in pairs], [p[1] for p in pairs]
    if answer is None or len(answer) != 2:
        raise ValueError("answer must be (right, wrong): e.g. (' Mary', ' John'), or two lists of token ids")
    tokens, texts = _prompt_tokens(model, clean)
    cf_tokens, cf_texts = _prompt_tokens(model, corrupt)
    if tokens.shape != cf_tokens.shape:
        raise ValueError(f"clean prompts {tuple(tokens.shape)} and corrupted ones {tuple(cf_tokens.shape)} must have "
                         "the same number and token length: patching swaps activations position by position")
    n = len(tokens)
    return PromptSet(tokens, _answer_ids(model.tokenizer, answer[0], n), _answer_ids(model.tokenizer, answer[1], n),
                     cf_tokens, [0] * n, texts, cf_texts, ["pair"] * n, {"task": "prompt pairs"})


@dataclass
class Patched(Result):
    """What patching the corrupted run's codes of some features into the clean run did at one hook.

    Logit differences are logit(right) - logit(wrong) of the clean prompts' answers, averaged over the
    prompts; `gap_closed` is the share of the clean-to-corrupted gap that the patch closes (0: the
    clean answer, 1: the corrupted run's), with a bootstrap interval over the prompts when there are
    several; `kl` the KL divergence of the patched next-token distribution from the clean one."""

    hook: str
    dictionary: str
    features: list
    attribution: list           # each patched feature's attribution (first-order estimate of its effect on the logit difference)
    ranked_by: str              # "attribution" (top k, ranked on the prompts patched) or "given"
    positions: str
    n_prompts: int
    ld_clean: float
    ld_corrupt: float
    ld_patched: float
    gap_closed: Estimate
    kl: Estimate
    captured: float             # the share of the clean-to-corrupted change at these positions that the reconstruction carries
    per_prompt: dict = field(default_factory=dict)  # {"clean", "corrupt", "patched"}: each prompt's logit difference

    def rows(self) -> list[dict]:
        shown = ", ".join(map(str, self.features[:12])) + (" …" if len(self.features) > 12 else "")
        return [{"hook": self.hook, "dictionary": self.dictionary, "k": len(self.features), "features": shown,
                 "positions": self.positions, "prompts": self.n_prompts, "ld clean": self.ld_clean,
                 "ld corrupt": self.ld_corrupt, "ld patched": self.ld_patched,
                 "gap closed": format(self.gap_closed, ".3f"), "KL": format(self.kl, ".4f"), "captured": self.captured}]

    def verdicts(self) -> list[str]:
        gap = self.ld_clean - self.ld_corrupt
        if abs(gap) < 1e-6:
            return ["the clean and corrupted runs give the same logit difference: there is no gap to close"]
        out = []
        if gap < 0:
            out.append("the corrupted run prefers the right answer more than the clean run does: is `answer` the "
                       "clean prompt's (right, wrong)?")
        g = self.gap_closed
        line = (f"patching {len(self.features)} feature(s) of {self.dictionary} at {self.positions} positions "
                f"closes {g:.3f} of the gap (0: the clean answer, 1: the corrupted run's)")
        if g.has_interval:
            line += ("; clearly more than nothing" if g.above(0) else
                     "; not clearly different from nothing (the interval covers 0)" if not g.below(0) else
                     "; it moves the answer away from the corrupted run's")
        out.append(line)
        if self.captured < 0.5:
            out.append(f"the dictionary's reconstruction carries only {self.captured:.2f} of the change in the activation "
                       "at these positions; the rest sits in its reconstruction error, which patching keeps")
        if self.ranked_by == "attribution":
            out.append("the features were ranked on the prompts they were measured on: rank them on other prompts "
                       "and pass `features=` for a held-out measurement")
        return out


def _gap_estimate(ld_clean, ld_cf, ld, n_boot: int, seed: int) -> Estimate:
    value = gap_closed(ld_clean, ld_cf, ld)
    if len(ld) < 2:
        return Estimate(value)
    _, low, high = ratio_interval(ld_clean - ld, ld_clean - ld_cf, n_boot, seed)
    return Estimate(value, low, high)


@torch.no_grad()
def patch_features(model, clean, corrupt=None, hook: str = "", sae=None, answer=None, features=None, k: int = 10,
                   positions="changed", n_boot: int = 1000, seed: int = 0, tokenizer=None) -> Patched:
    """Patch the corrupted run's codes of some SAE features into the clean run at `hook`, and measure
    the logit difference of the answer.

    model: a TransformerLens-style model or a plain Hugging Face causal LM (`hooked`); clean, corrupt,
    answer: as `prompt_pairs` (e.g. "When Mary and John ..., John gave a drink to", the same with
    Mary and John swapped in the opening, answer (" Mary", " John")); sae: anything `as_dictionary`
    takes, with a linear decoder (`hook` defaults to the SAE's own). At `positions` (`position_mask`: by default where the two prompts
    differ; "all" for every position but BOS) each chosen feature's code moves from its clean value
    to its corrupted one, i.e. (c' - c) · decoder_rows[f] is added, and the dictionary's
    reconstruction error is kept. `features`: the features to patch (ids); None: the k with the most
    negative attribution (a first-order estimate, one backward pass) on these same prompts, as
    `patch_curve` ranks them. With several prompt pairs, `gap_closed` and `kl` get bootstrap intervals
    over them (`ratio_interval`)."""
    model = hooked(model, tokenizer)
    dictionary = as_dictionary(sae)
    hook = hook or dictionary.hook_name
    check_hook(model, dictionary, hook)
    ps = prompt_pairs(model, clean, corrupt, answer)
    ctx = patch_context(model, ps, hook)
    mask = position_mask(ps, positions)
    delta = code_change(dictionary, ctx.x, ctx.x_cf, mask)
    rows = dictionary.decoder_rows.float().cpu()
    attr = prompt_attribution(delta, ctx.grad, rows).sum(0)
    if features is None:
        chosen, ranked_by = attr.argsort()[:k], "attribution"
    else:
        chosen, ranked_by = torch.as_tensor(list(features), dtype=torch.long).flatten(), "given"
        if len(chosen) and not 0 <= int(chosen.min()) <= int(chosen.max()) < dictionary.n_features:
            raise ValueError(f"features must be ids in 0..{dictionary.n_features - 1}")
    logits = _patched_last_logits(model, ps.tokens, hook, [patched_activation(ctx.x, delta, rows, chosen)],
                                  clean=ctx.x)[0]
    ld = logit_diff(logits, ps)
    kl = _kl(ctx.clean, logits)
    kl_est = Estimate(float(kl.mean())) if len(ps) < 2 else Estimate(*ratio_interval(kl, torch.ones(len(kl)), n_boot, seed))
    return Patched(hook=hook, dictionary=dictionary.name, features=chosen.tolist(), attribution=attr[chosen].tolist(),
                   ranked_by=ranked_by, positions=positions if isinstance(positions, str) else "mask",
                   n_prompts=len(ps), ld_clean=float(ctx.ld_clean.mean()), ld_corrupt=float(ctx.ld_cf.mean()),
                   ld_patched=float(ld.mean()), gap_closed=_gap_estimate(ctx.ld_clean, ctx.ld_cf, ld, n_boot, seed),
                   kl=kl_est, captured=_captured((ctx.x_cf - ctx.x)[mask], (delta @ rows)[mask]),
                   per_prompt={"clean": ctx.ld_clean.tolist(), "corrupt": ctx.ld_cf.tolist(), "patched": ld.tolist()})
