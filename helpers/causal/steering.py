"""Steering: add a direction to the residual stream, read what the model writes, and measure the cost.

One job: steer the model along a direction at one hook (an SAE feature's decoder direction, or a
concept's difference of means) and measure what that does and what it costs, so that SAE steering
can be compared with the simple baseline it is measured against.

* **One steering run from plain objects** (`steer`): a plain Hugging Face model or a TransformerLens-style
  one, a prompt, a direction or an SAE feature, a scale: the greedy continuation with and without the
  direction and (given held-out text) its cost, as a `Steered` result; the steps below do the work.
* **The intervention.** ``scale × norm × u`` is added to the residual stream at `hook`, at every
  position but the first (BOS, whose residual stream is unlike any other: the workbook never edits
  it), where u is the unit direction and `norm` the median norm of the hook's *ordinary* tokens
  (helpers.activations.massive: the ~2% massive tokens would otherwise set the unit), so that a scale means the
  same at every layer: scale 1 adds a vector as long as a typical token's whole residual stream.
* **Generation** (`generate`): greedy or seeded sampling with a key-value cache (the prompt once, then
  one new token per forward pass; `helpers.activations.models.kv_cache_fix` makes the bridge's cache
  work with transformers 5), or one full forward pass per new token where a model keeps no cache
  (`kv_cache=False` forces that). Every row has its own random
  generator, so a (prompt, seed) pair draws the same random numbers whatever else is in the batch
  (the logits can still differ in the last bits between batch shapes), and steered and unsteered rows
  share their random numbers.
* **The cost** (`steering_cost`): KL divergence of the next-token distribution from the unsteered
  model, and the increase of the next-token loss (ΔCE), on held-out text, through
  `helpers.evals.reconstruction.spliced_loss` (the workbook's splicing machinery: the steered activation is the
  "reconstruction"; it also reports what mean-ablating the layer costs, a yardstick).
* **Greedy examples** (`greedy_examples`): the continuations of one prompt along each of a concept's
  directions (`SteeringIndex.vectors`: `SteeringDirection`s) at growing scale, with their costs
  (a `SteeringCost`), as one table (`GreedyExamples`).
* **What the direction writes**: its direct effect through the unembedding (`output_tokens`, by
  `helpers.evals.features.logit_effects`) and the measured change of the next-token distribution at a
  prompt's last position (`next_token_change`: before and after).
* **Finding directions** (`SteeringIndex`, built once by `build_index` from the harvested store):
  SAE features by the concept they fire on (the Matthews correlation of "active" with "concept
  present", ordinary tokens), by the token their decoder direction promotes (logit effects), or by
  the token of their strongest activation; concepts by name (the workbook's token / POS / genre /
  class concepts, `helpers.evals.features.Concepts`, and word groups such as she/her); and a concept's
  **difference of means**: the mean residual where the concept is present minus where it is absent,
  ordinary tokens of the store.
* **The measured comparison** (`compare_steering`, its sizes by profile `comparison_settings`, a
  `SteeringSettings`): for each concept (a word group), the SAE
  feature that fires on it, the SAE feature that most promotes it, and the difference of means, each
  at the scale that costs a chosen KL (calibrated on one half of the held-out text, measured on the
  other): the share of sampled continuations (prompts × seeds) that contain one of the concept's
  words, with a 95% interval over prompts, the measured KL and ΔCE, and how fluent the continuations
  are (their loss under the unsteered model). Equal cost, not equal scale: a direction that moves
  the model more per unit of scale is not better for it.
* **The playground** (`playground`): an ipywidgets UI over all of it.
"""
from __future__ import annotations

import ast
import html
import re
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.activations.harvest import model_device as _device
from helpers.activations.models import hooked, kv_cache_fix
from helpers.causal.patching import hook_acts
from helpers.dictionaries.dictionary import as_dictionary, encode_batched
from helpers.evals.features import Concepts, logit_effects
from helpers.evals.heldout import mcc_from_counts
from helpers.evals.reconstruction import contexts_from_store, spliced_loss
from helpers.results import Estimate, Result
from helpers.settings.profiles import PROFILES

# Neutral prompts for the comparison: none mentions a concept we steer towards.
PROMPTS = ("I think that", "The next morning", "When I was young,", "He looked at the", "The report says that",
           "In the evening we", "It was a", "My favourite thing is", "They decided to", "After the meeting,",
           "The best way to", "Last year, the")
# Word-group concepts for the comparison (and the playground): a continuation "shows" the concept when it
# contains one of its words (whole word, any case); the difference of means is taken over the stored tokens
# that read as one of them. In this order; `compare_steering` skips one with too few stored tokens.
WORD_CONCEPTS = {
    "she": ("she", "her", "hers", "herself"),
    "water": ("water", "waters"),
    "religion": ("god", "church", "christ", "lord"),
    "war": ("war", "wars", "army", "soldiers"),
}
METHODS = ("SAE: fires on", "SAE: promotes", "difference of means")


@dataclass(frozen=True)
class SteeringSettings:
    """The sizes of the steering comparison for one profile (`comparison_settings`)."""

    prompts: int                # neutral prompts, the first of `PROMPTS`
    samples: int                # seeded samples per prompt and setting
    n_new: int                  # tokens each continuation writes
    targets: tuple              # the KL costs at which the directions are compared
    grid: tuple                 # the scales whose KL is measured to find each target's scale
    max_concepts: int           # word-group concepts compared (the first with enough stored tokens)
    calib_contexts: int         # held-out contexts that calibrate the scales
    report_contexts: int        # other held-out contexts on which the costs are measured
    min_present: int            # stored tokens a concept needs to be compared
    index_tokens: int | None    # ordinary tokens the steering index reads (None: the whole store)

    def to_dict(self) -> dict:
        """The settings by name: plain values, e.g. for a cache key."""
        return asdict(self)


# Sizes of the comparison by profile (`comparison_settings`); any other profile gets "default".
SETTINGS = {
    "test": SteeringSettings(prompts=2, samples=2, n_new=12, targets=(0.5,), grid=(0.25, 0.5, 1.0, 2.0), max_concepts=2,
                             calib_contexts=2, report_contexts=2, min_present=8, index_tokens=None),
    "cpu": SteeringSettings(prompts=10, samples=4, n_new=20, targets=(0.25, 1.0), grid=(0.125, 0.25, 0.5, 1.0, 2.0),
                            max_concepts=3, calib_contexts=8, report_contexts=8, min_present=20, index_tokens=100_000),
    "default": SteeringSettings(prompts=12, samples=8, n_new=24, targets=(0.25, 1.0), grid=(0.125, 0.25, 0.5, 1.0, 2.0),
                                max_concepts=3, calib_contexts=16, report_contexts=16, min_present=20,
                                index_tokens=100_000),
}


def comparison_settings(profile, **overrides) -> SteeringSettings:
    """The comparison's sizes for a profile (`SETTINGS`; a profile shrunk to the `test` profile's harvest
    or below gets the test sizes), with any of them overridden by keyword (an unknown one is refused)."""

    small = profile.harvest_tokens <= PROFILES["test"].harvest_tokens
    out = SETTINGS["test"] if small else SETTINGS.get(profile.name, SETTINGS["default"])
    names = sorted(f.name for f in fields(SteeringSettings))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown steering setting(s) {unknown}: the settings are {names}")
    return replace(out, **overrides)


def held_out_text(eval_store, bos_token_id: int, skip: int, n_calib: int, n_report: int):
    """Two disjoint sets of held-out contexts after the first `skip` (used elsewhere): (calibration,
    report), at most n_calib and n_report of them, halving what is left when the store holds fewer."""

    left = max(0, len(eval_store.tokens()) // (eval_store.manifest["ctx_len"] - 1) - skip)
    if left < 2:
        raise ValueError(f"the held-out store has {left} contexts after the first {skip}: two are needed")
    n_calib = min(n_calib, left // 2)
    n_report = min(n_report, left - n_calib)
    return (contexts_from_store(eval_store, n_calib, bos_token_id, start=skip),
            contexts_from_store(eval_store, n_report, bos_token_id, start=skip + n_calib))


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    return v / v.norm().clamp_min(1e-12)


def steering_vector(direction: torch.Tensor, scale: float, norm: float) -> torch.Tensor:
    """scale × norm × the unit direction: what `add_hook` adds."""
    return float(scale) * float(norm) * unit(direction)


def add_hook(vectors: torch.Tensor, skip_first: bool = True):
    """A hook function that adds `vectors` ([d]: to every row; [n, d]: one per row of the batch) to the
    activation at every position but the first (BOS); with ``skip_first=False`` at every position (a
    cached decoding step, whose positions all come after BOS)."""
    start = 1 if skip_first else 0

    def fn(act, hook=None):
        v = vectors.to(act.device, act.dtype)
        out = act.clone()
        out[:, start:] = act[:, start:] + (v if v.dim() == 1 else v[:, None])
        return out
    return fn


def ordinary_norm(x: torch.Tensor, rule=None) -> float:
    """The median norm of the rows of x [N, d] that `rule` (helpers.activations.massive) does not flag."""
    norms = x.float().norm(dim=-1)
    if rule is not None:
        norms = norms[~rule.flags(x)]
    return float(norms.median())


def _tokens(model, prompt) -> torch.Tensor:
    """[p] token ids of a prompt (BOS first), from text or ids."""
    if isinstance(prompt, str):
        return model.to_tokens(prompt)[0].cpu()
    return torch.as_tensor(prompt).flatten().cpu()


def _cache_length(cache) -> int | None:
    """How many positions a key-value cache holds (None: not a cache this code can read)."""
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else None


def _next_logits(model, toks: torch.Tensor, hook: str, v: torch.Tensor | None, cache, n_seen: int):
    """[rows, vocab] logits at the last position, and the cache after this pass or None.

    With `cache` None: one pass over `toks` (the whole sequence, BOS first), asking the model for a cache;
    with a cache of `n_seen` positions: a pass over the new tokens `toks` only. The steering vectors `v`
    are added after BOS. A model that returns no readable cache, or one that did not grow by the tokens
    just run, gets None (its caller falls back to full passes)."""
    hooks = [] if v is None else [(hook, add_hook(v, skip_first=cache is None))]
    try:
        with warnings.catch_warnings():  # transformers 5 renames past_key_values; the bridge still passes it
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            logits, new = model.run_with_hooks(toks, fwd_hooks=hooks, return_type="logits_and_cache",
                                               past_key_values=cache, use_cache=True, logits_to_keep=1)
    except (TypeError, ValueError):
        if cache is not None:
            raise
        return model.run_with_hooks(toks, fwd_hooks=hooks, logits_to_keep=1)[:, -1], None
    if _cache_length(new) != n_seen + toks.shape[1]:
        if cache is not None:
            raise RuntimeError("the model's key-value cache did not grow by the tokens just run")
        return logits[:, -1], None
    return logits[:, -1], new


@torch.no_grad()
def generate_ids(model, prompt, hook: str, vectors: torch.Tensor | None = None, n_new: int = 24,
                 sample: bool = False, seeds=0, temperature: float = 0.8, max_rows: int = 48,
                 kv_cache: bool = True) -> torch.Tensor:
    """[rows, n_new] new token ids after one `prompt`, one row per steering vector (`vectors` [rows, d];
    None: one row of the model run without any hook; a zero row adds nothing). Greedy, or sampling at `temperature` with row i's
    own generator seeded by ``seeds[i]`` (an int: every row the same seed, so that the rows share their
    random numbers). With `kv_cache` the prompt runs once and each new token after it in one pass over
    that token (the model's key-value cache; where the model keeps none, full passes); without, one full
    forward pass per token. At most `max_rows` rows at a time."""
    kv_cache_fix()
    prompt = _tokens(model, prompt)
    dev = _device(model)
    plain = vectors is None  # the model itself, without any hook
    vecs = torch.zeros(1, model.cfg.d_model) if plain else torch.as_tensor(vectors).float().reshape(-1, model.cfg.d_model)
    rows = len(vecs)
    seeds = [int(seeds)] * rows if np.ndim(seeds) == 0 else [int(s) for s in seeds]
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    out = []
    for a in range(0, rows, max_rows):
        v = None if plain else vecs[a:a + max_rows].to(dev)
        n = 1 if plain else len(v)
        gens = [torch.Generator().manual_seed(s) for s in seeds[a:a + max_rows]]
        toks = prompt.to(dev).repeat(n, 1)
        cache, step, cached = None, toks, kv_cache
        for _ in range(n_new):
            if cached:
                logits, cache = _next_logits(model, step, hook, v, cache, toks.shape[1] - step.shape[1])
                cached = cache is not None  # a model that keeps no cache: full passes from here on
            else:
                hooks = [] if plain else [(hook, add_hook(v))]
                logits = model.run_with_hooks(toks, fwd_hooks=hooks, logits_to_keep=1)[:, -1]
            logits = logits.float().cpu()
            if sample:
                probs = torch.softmax(logits / temperature, -1)
                nxt = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, gens)])
            else:
                nxt = logits.argmax(-1)
            toks = torch.cat([toks, nxt[:, None].to(dev)], 1)
            step = toks[:, -1:] if cache is not None else toks
        out.append(toks[:, len(prompt):].cpu())
    return torch.cat(out)


def decode(tokenizer, ids) -> str:
    """A continuation's text, up to (not including) the first end-of-sequence token."""
    ids = [int(i) for i in ids]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids)


def generate(model, prompt, hook: str, vectors: torch.Tensor | None = None, n_new: int = 24, sample: bool = False,
             seeds=0, temperature: float = 0.8) -> list[str]:
    """The continuations of `generate_ids` as text (one per row)."""
    ids = generate_ids(model, prompt, hook, vectors, n_new, sample, seeds, temperature)
    return [decode(model.tokenizer, r) for r in ids]


@dataclass(frozen=True)
class SteeringCost:
    """What adding each of S vectors at a hook costs on held-out text (`steering_cost`, `text_cost`)."""

    kl: torch.Tensor            # [S] KL(unsteered ‖ steered) of the next-token distribution, per token
    dce: torch.Tensor           # [S] the increase of the next-token loss, nats/token
    ce_clean: float             # the unsteered model's next-token loss
    kl_mean_ablation: float     # what replacing the layer's activations by their mean costs: a yardstick
    n_tokens: int = 0           # the tokens the KL is averaged over


@torch.no_grad()
def steering_cost(model, text_tokens: torch.Tensor, hook: str, vectors: torch.Tensor, batch_size: int = 8,
                  max_vectors: int = 16, progress: bool | str = False) -> SteeringCost:
    """The cost of adding each of `vectors` [S, d] at `hook` (every position but BOS) on held-out text
    (`text_tokens` [n, ctx], BOS first), as a `SteeringCost`: `kl` [S], KL(unsteered ‖ steered) of the
    next-token distribution per token; `dce` [S], the next-token loss increase (nats/token); `ce_clean`;
    and, for scale, `kl_mean_ablation`: what replacing the layer's activations by their mean costs. Through
    helpers.evals.reconstruction.spliced_loss (same positions and averages as CE-loss recovered), `max_vectors` at a
    time; `progress` (True or a description) shows a bar over those groups."""

    vectors = torch.as_tensor(vectors).float().reshape(-1, model.cfg.d_model)
    kl, ce, res = [], [], None
    for a in tqdm(range(0, len(vectors), max_vectors), disable=not progress,
                  desc=progress if isinstance(progress, str) else "steering cost"):
        v = vectors[a:a + max_vectors]
        res = spliced_loss(model, text_tokens, hook, lambda x: x.float()[None] + v.to(x.device)[:, None],
                           batch_size=batch_size, ablations=("mean",), refs=res)  # the mean ablation once
        kl += res["kl_sae"]
        ce += res["ce_sae"]
    return SteeringCost(kl=torch.tensor(kl), dce=torch.tensor(ce) - res["ce_clean"], ce_clean=res["ce_clean"],
                        kl_mean_ablation=res["kl_mean"], n_tokens=int(text_tokens[:, 1:].numel()))


def _text_batches(model, text) -> list[torch.Tensor]:
    """Held-out text as token batches [n, ctx] (BOS first): token ids as they are ([ctx] or [n, ctx]);
    a string or a list of strings tokenised by `model.to_tokens`, one batch per token length."""
    if isinstance(text, str):
        text = [text]
    if isinstance(text, torch.Tensor) or (len(text) and not isinstance(text[0], str)):
        toks = torch.as_tensor(text, dtype=torch.long)
        return [toks[None] if toks.ndim == 1 else toks]
    by_len: dict[int, list] = {}
    for t in text:
        row = model.to_tokens(t)[0].cpu()
        by_len.setdefault(len(row), []).append(row)
    return [torch.stack(rows) for _, rows in sorted(by_len.items())]


def text_cost(model, text, hook: str, vectors: torch.Tensor) -> SteeringCost:
    """`steering_cost` of `vectors` [S, d] on held-out `text`: token ids [n, ctx] (then exactly
    `steering_cost`), or strings of any lengths (each length's batch costed apart, the per-token
    averages weighted by the tokens each batch scores; `n_tokens` counts them all)."""
    batches = [b for b in _text_batches(model, text) if b.shape[1] >= 3]
    if not batches:
        raise ValueError("the cost text needs at least one sequence of 3 tokens or more (BOS included)")
    costs = [steering_cost(model, b, hook, vectors) for b in batches]
    if len(costs) == 1:
        return costs[0]
    n_kl = torch.tensor([b[:, 1:].numel() for b in batches], dtype=torch.float64)
    n_ce = torch.tensor([b[:, 2:].numel() for b in batches], dtype=torch.float64)

    def mean(values, w):
        return sum(v * wi for v, wi in zip(values, w.tolist())) / float(w.sum())
    ce_clean = mean([c.ce_clean for c in costs], n_ce)
    ce = mean([c.dce.double() + c.ce_clean for c in costs], n_ce)
    return SteeringCost(kl=mean([c.kl.double() for c in costs], n_kl).float(), dce=(ce - ce_clean).float(),
                        ce_clean=ce_clean, kl_mean_ablation=mean([c.kl_mean_ablation for c in costs], n_kl),
                        n_tokens=int(n_kl.sum()))


@dataclass
class Steered(Result):
    """A greedy continuation of one prompt with and without a direction added at `hook` (scale × norm ×
    the unit direction, every position but BOS), and what the steering costs on held-out text: the
    KL divergence of the next-token distribution from the unsteered model and the increase of the
    next-token loss (ΔCE), in nats per token (NaN when no cost text was given)."""

    prompt: str
    hook: str
    scale: float
    norm: float                 # the unit of scale: the median norm of the activations at hook
    feature: int | None         # the SAE feature steered along (None: a direction of one's own)
    unsteered: str
    steered: str
    kl: float = float("nan")
    dce: float = float("nan")
    ce_clean: float = float("nan")
    kl_mean_ablation: float = float("nan")   # what replacing the layer's activations by their mean costs: a yardstick
    n_cost_tokens: int = 0

    def verdicts(self) -> list[str]:
        out = []
        if self.steered == self.unsteered:
            out.append("the steered continuation is the unsteered one: at this scale the direction does not change "
                       "the greedy text")
        else:
            a, b = self.unsteered, self.steered
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(f"steering changes the continuation from character {i} on")
        if self.n_cost_tokens:
            line = (f"it costs KL {self.kl:.4f} and ΔCE {self.dce:+.4f} nats/token on {self.n_cost_tokens} tokens of "
                    f"the cost text (mean-ablating the layer: KL {self.kl_mean_ablation:.4f})")
            if self.kl > self.kl_mean_ablation:
                line += ": more than mean-ablating the layer, so expect degraded text"
            out.append(line)
        return out


class _Direction:
    """A one-direction 'dictionary' for helpers.evals.features.logit_effects."""

    def __init__(self, v):
        self.directions = unit(v)[None]


def output_tokens(model, direction: torch.Tensor, k: int = 8) -> dict:
    """The direction's direct effect on the logits (through the final norm's gain and the unembedding,
    as `helpers.evals.features.logit_effects`): its k most promoted and suppressed tokens, as
    {"up": [(token, logit)], "down": [...]} per unit of direction."""

    e = logit_effects(_Direction(direction), model, k=k)
    tok = model.tokenizer
    return {"up": [(tok.decode([int(i)]), float(v)) for i, v in zip(e["up_ids"][0], e["up"][0])],
            "down": [(tok.decode([int(i)]), float(v)) for i, v in zip(e["down_ids"][0], e["down"][0])],
            "up_ids": e["up_ids"][0].tolist()}


@torch.no_grad()
def next_token_change(model, prompt, hook: str, vector: torch.Tensor, k: int = 5, watch=()) -> dict:
    """The next-token distribution at the prompt's last position before and after adding `vector`:
    the k tokens whose probability rose most and fell most, and any `watch` token ids, as
    [(token, p before, p after)]."""
    toks = _tokens(model, prompt).to(_device(model))[None]
    vecs = torch.stack([torch.zeros_like(vector.float()), vector.float()])
    logits = model.run_with_hooks(toks.repeat(2, 1), fwd_hooks=[(hook, add_hook(vecs))], logits_to_keep=1)[:, -1]
    p = logits.float().softmax(-1).cpu()
    diff = p[1] - p[0]
    tok = model.tokenizer

    def rows(ids):
        return [(tok.decode([int(i)]), float(p[0, i]), float(p[1, i])) for i in ids]
    return {"rose": rows(diff.topk(k).indices), "fell": rows((-diff).topk(k).indices), "watch": rows(list(watch))}


@torch.no_grad()
def steer(model, prompt, hook: str = "", direction: torch.Tensor | None = None, sae=None, feature: int | None = None,
          scale: float = 0.5, n_new: int = 24, cost_text=None, norm: float | None = None, tokenizer=None) -> Steered:
    """Continue `prompt` greedily with and without a direction added at `hook`, and measure the cost.

    model: a TransformerLens-style model or a plain Hugging Face causal LM (`hooked`). The direction is
    `direction` [d], or the unit decoder direction of `feature` of `sae` (anything `as_dictionary`
    takes; `hook` then defaults to the SAE's). What is added, at every position but BOS, is
    ``scale × norm × unit direction`` (`steering_vector`), where `norm` defaults to the median norm of
    the activations at `hook` (BOS left out) on the cost text, or on the prompt when there is none:
    scale 1 adds a vector as long as a typical token's whole activation. `cost_text`: held-out text
    (strings, or token ids [n, ctx] with BOS first) on which the steering's KL from the unsteered
    model and its ΔCE are measured (`steering_cost`, through `text_cost`)."""
    model = hooked(model, tokenizer)
    if direction is None:
        if sae is None or feature is None:
            raise ValueError("steer along a `direction`, or along `feature` of `sae`")
        d = as_dictionary(sae)
        hook = hook or d.hook_name
        direction = d.directions[int(feature)].float().cpu()
    if not hook:
        raise ValueError("name the hook to steer at, e.g. 'blocks.3.hook_resid_post'")
    direction = torch.as_tensor(direction).float().flatten().cpu()
    if direction.shape[0] != model.cfg.d_model:
        raise ValueError(f"the direction has {direction.shape[0]} dimensions, the model's d_model is {model.cfg.d_model}")
    batches = _text_batches(model, cost_text) if cost_text is not None else [_tokens(model, prompt)[None]]
    if norm is None:
        norm = ordinary_norm(torch.cat([hook_acts(model, b, hook)[:, 1:].reshape(-1, model.cfg.d_model).cpu()
                                        for b in batches]))
    vecs = torch.stack([torch.zeros(model.cfg.d_model), steering_vector(direction, scale, norm)])
    unsteered, steered = generate(model, prompt, hook, vecs, n_new)
    text = prompt if isinstance(prompt, str) else model.tokenizer.decode(_tokens(model, prompt))
    out = Steered(prompt=text, hook=hook, scale=float(scale), norm=float(norm),
                  feature=None if feature is None or sae is None else int(feature), unsteered=unsteered, steered=steered)
    if cost_text is not None:
        cost = text_cost(model, cost_text, hook, vecs[1:])
        out.kl, out.dce = float(cost.kl[0]), float(cost.dce[0])
        out.ce_clean, out.kl_mean_ablation = float(cost.ce_clean), float(cost.kl_mean_ablation)
        out.n_cost_tokens = int(cost.n_tokens)
    return out


@dataclass(frozen=True)
class SteeringDirection:
    """A unit steering direction for a concept (`SteeringIndex.vectors`) and what chose it."""

    u: torch.Tensor             # [d] the unit direction
    feature: int | None         # the SAE feature whose decoder direction it is (None: a difference of means)
    why: str                    # why it was chosen, e.g. "MCC 0.88 with she"


@dataclass
class SteeringIndex:
    """What finding a steering direction needs, computed once from the harvested store (`build_index`):
    the ordinary tokens' activations at the hook and their labels, the typical norm, every feature's
    activity and strongest tokens, and its logit effects."""

    dictionary: object
    hook: str
    x: torch.Tensor               # [N, d] ordinary tokens' activations (the first stored tokens, massive ones left out)
    meta: np.ndarray              # [N] their labels (store.tokens())
    norm: float                   # median norm of those tokens: the unit of scale
    concepts: object              # helpers.evals.features.Concepts of the store
    vocab: list                   # each token id's text
    active: torch.Tensor          # [F] ordinary tokens where each feature is active (code > 0)
    top_rows: torch.Tensor        # [F, k] rows of x of each feature's strongest activations (-1: none)
    up_ids: torch.Tensor          # [F, k_up] tokens each feature's direction promotes most (logit effects)
    up: torch.Tensor              # [F, k_up] by how much
    word_concepts: dict = field(default_factory=lambda: dict(WORD_CONCEPTS))
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.x)

    # --- concepts -------------------------------------------------------------------------------
    def word_ids(self, words) -> list[int]:
        """Token ids that read as one of `words` (stripped, any case)."""
        words = {w.lower() for w in words}
        return [i for i, t in enumerate(self.vocab) if t.strip() and t.strip().lower() in words]

    def concept_words(self, name: str):
        """The words a continuation shows concept `name` by: a word group's words, a token concept's
        token (stripped); None for other concepts (parts of speech, genres, classes)."""
        if name in self.word_concepts:
            return tuple(self.word_concepts[name])
        m = re.fullmatch(r"token (.+)", name)
        if m:
            try:
                text = ast.literal_eval(m[1])  # the name holds repr() of the token's text
            except Exception:
                return None
            return (text.strip(),) if isinstance(text, str) and text.strip() else None
        return None

    def mask(self, name: str) -> np.ndarray:
        """[N] bool: the ordinary tokens where concept `name` is present (a word group of
        `word_concepts`, or a name of `concepts`: "token ' she'", "POS pronoun", "genre religion", ...)."""
        if name in self.word_concepts:
            return np.isin(self.meta["token"], self.word_ids(self.word_concepts[name]))
        c = self.concepts
        if name not in c.names:
            raise KeyError(f"unknown concept {name!r}: search for one with index.search(text)")
        i = c.names.index(name)
        if i < c.n_token_concepts:
            return c.token_column(self.meta) == i
        return c.label_multi_hot(self.meta)[:, i - c.n_token_concepts].numpy() > 0

    def search(self, text: str, limit: int = 40) -> list[str]:
        """Concept names matching `text`: word groups containing it, then the token concepts whose token
        reads as it, then every other concept name containing it."""
        q = text.strip().lower()
        if not q:
            return list(self.word_concepts)[:limit]
        groups = [n for n, ws in self.word_concepts.items() if q == n.lower() or q in {w.lower() for w in ws}]
        exact, partial = [], []
        for n in self.concepts.names:
            words = self.concept_words(n) if n.startswith("token ") else None
            if words and words[0].lower() == q:
                exact.append(n)
            elif q in n.lower():
                partial.append(n)
        return (groups + exact + partial)[:limit]

    def _words_key(self, name: str):
        """What a cached result for `name` depends on besides the index: a word group's words (a group can
        be redefined under the same name, as `compare_steering`'s `concepts` do)."""
        return tuple(self.word_concepts[name]) if name in self.word_concepts else None

    def n_present(self, name: str) -> int:
        return int(self.mask(name).sum())

    def diff_of_means(self, name: str) -> torch.Tensor:
        """The mean activation where `name` is present minus where it is absent (ordinary tokens)."""
        key = ("dim", name, self._words_key(name))
        if key not in self._cache:
            m = torch.as_tensor(self.mask(name))
            if not m.any() or m.all():
                raise ValueError(f"concept {name!r} is present on {int(m.sum())} of {len(m)} indexed tokens: "
                                 "no difference of means")
            if "sum" not in self._cache:
                self._cache["sum"] = self.x.sum(0, dtype=torch.float64)
            present = self.x[m].sum(0, dtype=torch.float64)
            n = int(m.sum())
            self._cache[key] = (present / n - (self._cache["sum"] - present) / (self.n - n)).float()
        return self._cache[key]

    # --- features -------------------------------------------------------------------------------
    @torch.no_grad()
    def feature_mcc(self, name: str) -> torch.Tensor:
        """[F]: each feature's Matthews correlation of "active" with "`name` present" (ordinary tokens)."""
        key = ("mcc", name, self._words_key(name))
        if key not in self._cache:
            m = torch.as_tensor(self.mask(name))
            tp = (encode_batched(self.dictionary, self.x[m]) > 0).sum(0).double()
            self._cache[key] = torch.as_tensor(mcc_from_counts(tp.numpy(), self.active.double().numpy(),
                                                               float(m.sum()), self.n)).float()
        return self._cache[key]

    def fires_on(self, name: str, k: int = 5, min_active: int = 5) -> list[tuple[int, float]]:
        """The k features that best fire on concept `name`: [(feature, MCC)], highest first."""
        mcc = torch.where(self.active >= min_active, self.feature_mcc(name), torch.full_like(self.active.float(), -2.0))
        top = mcc.topk(min(k, len(mcc)))
        return [(int(f), float(v)) for f, v in zip(top.indices, top.values) if v > -2]

    def promotes(self, words, k: int = 5) -> list[tuple[int, int, float]]:
        """Features whose direction promotes one of `words` among its most promoted tokens (logit
        effects): [(feature, rank of the best such token, its logit effect)], best rank first, then
        largest effect."""
        ids = torch.as_tensor(self.word_ids(words))
        if len(ids) == 0:
            return []
        hit = (self.up_ids[..., None] == ids).any(-1)              # [F, k_up]
        found = hit.any(1).nonzero().flatten()
        out = []
        for f in found.tolist():
            r = int(hit[f].float().argmax())
            out.append((f, r, float(self.up[f, r])))
        return sorted(out, key=lambda t: (t[1], -t[2]))[:k]

    def top_token_is(self, text: str) -> list[int]:
        """Features whose strongest (ordinary-token) activation is on a token that reads `text` (stripped)."""
        first = self.top_rows[:, 0]
        ok = first >= 0
        ids = self.meta["token"][first.clamp_min(0).numpy()]
        return [f for f in ok.nonzero().flatten().tolist() if self.vocab[int(ids[f])].strip() == text.strip()]

    def describe(self, f: int, n_tokens: int = 3) -> str:
        """The tokens feature f's strongest ordinary activations fall on, e.g. "' she' ×7, ' her' ×2"."""

        rows = [int(r) for r in self.top_rows[f] if r >= 0]
        common = Counter(self.vocab[int(self.meta["token"][r])] for r in rows).most_common(n_tokens)
        return ", ".join(f"{t!r} ×{c}" for t, c in common) if common else "(never active)"

    def direction(self, f: int) -> torch.Tensor:
        return self.dictionary.directions[int(f)].float().cpu()

    def vectors(self, name: str, words=None) -> dict[str, SteeringDirection]:
        """The unit steering directions for concept `name`, by method (`METHODS`), each a
        `SteeringDirection` (the direction, its SAE feature or None, what chose it). "SAE: promotes"
        needs words (a word group or token concept) and a feature that promotes one of them."""
        words = words if words is not None else self.concept_words(name)
        out = {}
        fires = self.fires_on(name, k=1)
        if fires:
            f, v = fires[0]
            out["SAE: fires on"] = SteeringDirection(self.direction(f), f, f"MCC {v:.2f} with {name}")
        prom = self.promotes(words, k=1) if words else []
        if prom:
            f, r, v = prom[0]
            out["SAE: promotes"] = SteeringDirection(self.direction(f), f,
                                                     f"its #{r + 1} promoted token is one of {'/'.join(words)}")
        out["difference of means"] = SteeringDirection(
            unit(self.diff_of_means(name)), None,
            f"{self.n_present(name)} tokens with, {self.n - self.n_present(name)} without")
        return out


@torch.no_grad()
def build_index(model, store, dictionary, hook: str | None = None, rule=None, max_tokens: int = 100_000,
                k: int = 10, k_up: int = 20, batch_size: int = 4096, progress: bool = True) -> SteeringIndex:
    """A `SteeringIndex` over the first `max_tokens` stored tokens at `hook` (default the dictionary's),
    leaving out the tokens `rule` (helpers.activations.massive) flags: one pass encoding them with the dictionary,
    the store's concepts, and every feature's logit effects."""

    hook = dictionary.check_store(store, hook)
    x = store.activations(hook, max_tokens)
    meta = store.tokens()[:len(x)]
    if rule is not None:
        ok = ~rule.flags(x)
        x, meta = x[ok], meta[ok.numpy()]
    norm = ordinary_norm(x)  # the massive tokens are already left out
    F = dictionary.n_features
    active = torch.zeros(F, dtype=torch.int64)
    top_v = torch.full((F, k), -1.0)
    top_i = torch.full((F, k), -1, dtype=torch.int64)
    for a in tqdm(range(0, len(x), batch_size), desc=f"steering index ({F} features)", disable=not progress):
        c = encode_batched(dictionary, x[a:a + batch_size], batch_size)
        active += (c > 0).sum(0)
        v, i = torch.cat([top_v, c.T], 1), torch.cat([top_i, torch.arange(a, a + len(c)).expand(F, -1)], 1)
        top_v, pos = v.topk(k, dim=1)
        top_i = i.gather(1, pos)
    top_i = torch.where(top_v > 0, top_i, torch.full_like(top_i, -1))
    effects = logit_effects(dictionary, model, k=k_up)
    tok = model.tokenizer
    vocab = tok.batch_decode([[i] for i in range(len(tok))])
    return SteeringIndex(dictionary, hook, x, meta, norm, Concepts.from_store(store, tok), vocab, active, top_i,
                         effects["up_ids"], effects["up"])


# --- the measured comparison ------------------------------------------------------------------------

def shows(text: str, words) -> bool:
    """Whether `text` contains one of `words` as a whole word, in any case."""
    return bool(re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", text, re.I))


def _scale_for(grid, kls, target: float) -> tuple[float, bool]:
    """The scale whose KL is `target`, by linear interpolation of sqrt(KL) (about linear in the scale
    for small scales) through (0, 0) and the measured (scale, KL) points; (largest scale, False) if no
    measured point reaches the target."""
    s = np.r_[0.0, np.asarray(grid, float)]
    r = np.sqrt(np.maximum(np.r_[0.0, np.asarray(kls, float)], 0))
    t = np.sqrt(target)
    for i in range(1, len(s)):
        if r[i] >= t:
            return float(s[i - 1] + (t - r[i - 1]) * (s[i] - s[i - 1]) / max(r[i] - r[i - 1], 1e-12)), True
    return float(s[-1]), False


def _boot_share(hits: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean of hits [prompts, samples] over resampled prompts."""
    g = np.random.default_rng(seed)
    per = hits.mean(1)
    b = per[g.integers(0, len(per), (n_boot, len(per)))].mean(1)
    return float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))


@torch.no_grad()
def continuation_nll(model, prompt, ids: torch.Tensor, max_rows: int = 16) -> torch.Tensor:
    """[rows]: the unsteered model's mean next-token loss on each continuation (ids [rows, n_new]) after
    `prompt`, over its tokens up to and including the first end-of-sequence token (the text `decode`
    shows, and its end): how fluent the text is to the model itself (the unsteered model's own samples
    score about their entropy)."""
    p = _tokens(model, prompt)
    eos = model.tokenizer.eos_token_id
    out = []
    for a in range(0, len(ids), max_rows):
        chunk = ids[a:a + max_rows]
        toks = torch.cat([p.repeat(len(chunk), 1), chunk], 1).to(_device(model))
        logp = model(toks).float().log_softmax(-1)[:, len(p) - 1:-1]
        nll = -logp.gather(-1, toks[:, len(p):, None])[..., 0].cpu()
        keep = torch.ones_like(nll, dtype=torch.bool)
        if eos is not None:
            is_eos = (chunk == eos).int()
            keep = (is_eos.cumsum(1) - is_eos) == 0  # before the first EOS, and the EOS itself
        out.append((nll * keep).sum(1) / keep.sum(1))
    return torch.cat(out)


def compare_steering(model, index: SteeringIndex, calib_tokens: torch.Tensor, report_tokens: torch.Tensor,
                     concepts: dict | None = None, prompts=PROMPTS, samples: int = 4, n_new: int = 20,
                     targets=(0.25, 1.0), grid=(0.125, 0.25, 0.5, 1.0, 2.0), temperature: float = 0.8,
                     min_present: int = 20, max_concepts: int = 3, seed: int = 0, n_boot: int = 1000,
                     progress: bool = True) -> SteeringComparison:
    """SAE features against the difference of means, at equal cost, for a few word-group concepts.

    For each concept of `concepts` (default `WORD_CONCEPTS`; the first `max_concepts` of them present on
    at least `min_present` indexed tokens) and each method of `METHODS` (`SteeringIndex.vectors`):
    the KL cost of the unit direction at each scale of `grid` is measured on `calib_tokens`, and for
    each KL target the scale that costs it is read off (`_scale_for`); the cost at that scale is then
    measured on `report_tokens` (other held-out text). At that scale, `samples` seeded samples
    (temperature `temperature`, `n_new` tokens) after each of `prompts`, and as many unsteered ones
    with the same seeds: the share of continuations showing the concept (containing one of its
    words), with a 95% interval over prompts, and their mean loss under the unsteered model.
    Returns a `SteeringComparison`: its rows (one per concept × method × target, and an "unsteered"
    row per concept), the calibration (the KL grid), the differences (each SAE method minus the
    difference of means at each target, paired over the same prompts and seeds, with an interval),
    the continuations, the concepts skipped and the settings."""

    concepts = dict(WORD_CONCEPTS if concepts is None else concepts)
    index.word_concepts.update(concepts)
    chosen, skipped = [], []
    for name, words in concepts.items():
        n = index.n_present(name)
        (chosen if n >= min_present and len(chosen) < max_concepts else skipped).append((name, n))
    hook, norm = index.hook, index.norm
    settings = dict(prompts=list(prompts), samples=samples, n_new=n_new, targets=list(targets), grid=list(grid),
                    temperature=temperature, min_present=min_present, seed=seed, norm=norm, hook=hook,
                    n_calib=len(calib_tokens), n_report=len(report_tokens))
    # 1. the unit directions, and their KL at each scale of the grid (calibration text)
    units, n_present = {}, dict(chosen)
    for name, n in chosen:
        for method, v in index.vectors(name, concepts[name]).items():
            units[(name, method)] = v
    keys = list(units)
    grid_vecs = torch.stack([steering_vector(units[k].u, s, norm) for k in keys for s in grid]) if keys else None
    calib = steering_cost(model, calib_tokens, hook, grid_vecs, progress=progress and "KL at the grid's scales"
                          ).kl.reshape(len(keys), len(grid)) if keys else None
    # 2. the scale of each target, and its cost measured on the report text
    settings_rows = []
    for i, k in enumerate(keys):
        for t in targets:
            s, reached = _scale_for(grid, calib[i].tolist(), t)
            settings_rows.append({"concept": k[0], "method": k[1], "target_kl": t, "scale": s, "reached": reached,
                                  "feature": units[k].feature, "why": units[k].why, "n_present": n_present[k[0]]})
    vecs = torch.stack([steering_vector(units[(r["concept"], r["method"])].u, r["scale"], norm)
                        for r in settings_rows]) if settings_rows else torch.zeros(0, model.cfg.d_model)
    if len(vecs):
        cost = steering_cost(model, report_tokens, hook, vecs, progress=progress and "KL at the chosen scales")
        for r, kl, dce in zip(settings_rows, cost.kl.tolist(), cost.dce.tolist()):
            r.update(kl=kl, dce=dce)
        ce_clean, kl_mean = cost.ce_clean, cost.kl_mean_ablation
    else:
        ce_clean = kl_mean = float("nan")
    # 3. the continuations: every prompt, the unsteered rows and every setting's, the same seeds
    all_vecs = torch.cat([torch.zeros(1, model.cfg.d_model), vecs])            # row 0: unsteered
    seeds = [seed * 1_000_003 + j for j in range(samples)]
    texts = [[None] * len(prompts) for _ in range(len(all_vecs))]
    nll = np.zeros((len(all_vecs), len(prompts), samples))
    for p, prompt in enumerate(tqdm(prompts, desc="steered continuations", disable=not progress)):
        v = all_vecs.repeat_interleave(samples, 0)
        ids = generate_ids(model, prompt, hook, v, n_new, sample=True, seeds=seeds * len(all_vecs),
                           temperature=temperature)
        nll[:, p] = continuation_nll(model, prompt, ids).reshape(len(all_vecs), samples).numpy()
        dec = [decode(model.tokenizer, r) for r in ids]
        for j in range(len(all_vecs)):
            texts[j][p] = dec[j * samples:(j + 1) * samples]
    # 4. the shares, with intervals over prompts, and the paired differences
    rows, hits, reached = [], {}, {}
    for name, n in chosen:
        words = concepts[name]
        for j, r in enumerate([None] + settings_rows):
            if r is not None and r["concept"] != name:
                continue
            h = np.array([[shows(t, words) for t in texts[j][p]] for p in range(len(prompts))], float)
            lo, hi = _boot_share(h, n_boot, seed)
            row = dict(r) if r is not None else {"concept": name, "method": "unsteered", "target_kl": 0.0, "scale": 0.0,
                                                 "reached": True, "feature": None, "why": "", "n_present": n,
                                                 "kl": 0.0, "dce": 0.0}
            row.update(share=Estimate(float(h.mean()), lo, hi), n=int(h.size),
                       nll=float(nll[j].mean()), example=texts[j][0][0])
            hits[(name, row["method"], row["target_kl"])] = h
            reached[(name, row["method"], row["target_kl"])] = bool(row["reached"])
            rows.append(SteeringRow(**row))
    diffs = []
    g = np.random.default_rng(seed)
    # equal cost only where both directions reached the target KL (else one ran at the grid's largest scale)
    for (name, method, t), h in hits.items():
        base = hits.get((name, "difference of means", t))
        if method.startswith("SAE") and base is not None:
            d = (h - base).mean(1)
            b = d[g.integers(0, len(d), (n_boot, len(d)))].mean(1)
            diffs.append(SteeringDifference(
                concept=name, method=method, target_kl=t,
                difference=Estimate(float(d.mean()), float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))),
                equal_cost=reached[(name, method, t)] and reached[(name, "difference of means", t)]))
    return SteeringComparison(
        measured=rows, differences=diffs, skipped=[list(x) for x in skipped], settings=settings,
        calibration={"keys": [list(k) for k in keys], "grid": list(grid),
                     "kl": calib.tolist() if calib is not None else None, "features": [units[k].feature for k in keys]},
        ce_clean=float(ce_clean), kl_mean_ablation=float(kl_mean),
        texts={f"{r['concept']} | {r['method']} | {r['target_kl']}": texts[j] for j, r in
               enumerate([{"concept": "-", "method": "unsteered", "target_kl": 0.0}] + settings_rows)})


@dataclass
class SteeringRow(Result):
    """One setting of `compare_steering`: a concept, a method's direction at the scale calibrated to a
    KL target (the "unsteered" row: none), its cost measured on other held-out text, and the share of
    continuations showing the concept (95% interval over prompts) with their loss under the unsteered
    model (`nll`, nats/token)."""

    concept: str
    method: str
    target_kl: float
    scale: float
    reached: bool          # False: the target KL was not reached at the grid's largest scale (used instead)
    feature: int | None
    why: str
    n_present: int
    kl: float
    dce: float
    share: Estimate
    n: int
    nll: float
    example: str


@dataclass
class SteeringDifference(Result):
    """An SAE method's share minus the difference of means' at one KL target, paired over the same
    prompts and seeds (95% interval); `equal_cost`: both directions reached the target KL."""

    concept: str
    method: str
    target_kl: float
    difference: Estimate
    equal_cost: bool = True


@dataclass
class SteeringComparison(Result):
    """`compare_steering`: SAE features against the difference of means at equal KL cost."""

    measured: list[SteeringRow]   # one per concept × method × target, and an "unsteered" row per concept
    differences: list[SteeringDifference]
    skipped: list            # [concept, stored tokens present]: too few to compare
    settings: dict
    calibration: dict        # keys ([concept, method]), grid, kl [key, scale], features
    ce_clean: float
    kl_mean_ablation: float
    texts: dict              # "concept | method | target": the continuations, per prompt

    def calibrated(self) -> set[tuple[str, str]]:
        """The (concept, method) pairs that had a direction to calibrate."""
        return {tuple(k) for k in self.calibration["keys"]}

    def rows(self) -> list[dict]:
        return [{"concept": r.concept, "method": r.method, "target KL": r.target_kl, "scale": r.scale, "KL": r.kl,
                 "ΔCE": r.dce, "shows the concept [95%]": format(r.share, ".2f"), "loss/token": r.nll,
                 "feature": "" if r.feature is None else f"#{r.feature}",
                 "note": "" if r.reached else "target not reached: largest scale"} for r in self.measured]

    def verdicts(self) -> list[str]:
        """One line per concept, SAE method and KL target: the SAE method's share minus the difference of
        means' share, with its paired interval over prompts, and who is ahead (only where the interval
        excludes zero, only with at least MIN_PROMPTS prompts, and only where both directions reached
        the target KL: otherwise they are not at equal cost)."""
        n_prompts = len(self.settings["prompts"])
        out = [f"{n_prompts} prompts × {self.settings['samples']} samples of {self.settings['n_new']} tokens per "
               f"setting; skipped (too few stored tokens): {self.skipped}"]
        for d in self.differences:
            e = d.difference
            if n_prompts < MIN_PROMPTS:
                who = f"too few prompts ({n_prompts}) to call"
            elif not d.equal_cost:
                who = "no verdict: not at equal cost (a direction did not reach the target KL at the grid's largest scale)"
            elif e.low > 0:
                who = f"{d.method} ahead"
            elif e.high < 0:
                who = "difference of means ahead"
            else:
                who = "no clear winner (interval covers 0)"
            out.append(f"{d.concept}, KL {d.target_kl:g}: {d.method} minus difference of means "
                       f"{e.value:+.2f} [{e.low:+.2f}, {e.high:+.2f}]: {who}")
        return out + self.summary()

    def tally(self) -> dict[str, int]:
        """How the SAE-minus-difference-of-means comparisons came out: {"SAE ahead", "difference of means
        ahead", "no clear winner", "no verdict"}: counts, by the rules of `verdicts`."""
        n_prompts = len(self.settings["prompts"])
        out = {"SAE ahead": 0, "difference of means ahead": 0, "no clear winner": 0, "no verdict": 0}
        for d in self.differences:
            if n_prompts < MIN_PROMPTS or not d.equal_cost:
                out["no verdict"] += 1
            elif d.difference.low > 0:
                out["SAE ahead"] += 1
            elif d.difference.high < 0:
                out["difference of means ahead"] += 1
            else:
                out["no clear winner"] += 1
        return out

    def summary(self) -> list[str]:
        """What the costs and the tally say: the held-out KL the calibrated scales cost per target, the
        continuations' loss under the unsteered model (steered against unsteered), and the tally."""
        out = [f"yardstick: mean-ablating the layer costs KL {self.kl_mean_ablation:.2f} on the same text"]
        steered = [r for r in self.measured if r.method != "unsteered"]
        plain = [r.nll for r in self.measured if r.method == "unsteered"]
        for t in sorted({r.target_kl for r in steered}):
            rs = [r for r in steered if r.target_kl == t]
            out.append(f"KL target {t:g}: measured held out at KL {min(r.kl for r in rs):.2f}-{max(r.kl for r in rs):.2f}; "
                       f"loss/token of the continuations {min(r.nll for r in rs):.2f}-{max(r.nll for r in rs):.2f}"
                       + (f" against {float(np.mean(plain)):.2f} unsteered" if plain else ""))
        t = self.tally()
        out.append(f"at equal cost, over {len(self.differences)} comparisons: " + ", ".join(f"{k} {v}" for k, v in t.items()))
        return out

    def table(self) -> str:
        """The comparison as a text table."""
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
            return self.to_frame().to_string(index=False)


MIN_PROMPTS = 5  # fewer prompts than this: no verdict (a bootstrap over 2-4 prompts is no interval)


def verdicts(result: SteeringComparison) -> list[str]:
    """`result.verdicts()` (see `SteeringComparison.verdicts`)."""
    return result.verdicts()


def table(result: SteeringComparison) -> str:
    """`result.table()`: the comparison as a text table."""
    return result.table()


@dataclass
class GreedyExample(Result):
    """One continuation of `greedy_examples`: a direction at one scale, what the model wrote greedily, and
    what the steering costs on held-out text (KL from the unsteered model and ΔCE, nats/token)."""

    method: str
    feature: int | None         # the SAE feature steered along (None: the difference of means)
    scale: float
    kl: float
    dce: float
    text: str


@dataclass
class GreedyExamples(Result):
    """Greedy continuations of one prompt along each of a concept's steering directions at growing scale,
    each with its cost (`greedy_examples`); its verdicts say what chose each direction and which tokens it
    promotes directly, and what mean-ablating the layer costs on the same text (a yardstick)."""

    concept: str
    prompt: str
    kl_mean_ablation: float
    examples: list[GreedyExample]
    directions: list[str] = field(default_factory=list)    # per direction: what chose it, what it promotes

    def of(self, method: str) -> list[GreedyExample]:
        """The continuations along `method`'s direction, by growing scale."""
        return [e for e in self.examples if e.method == method]

    def rows(self) -> list[dict]:
        return [{"method": e.method, "scale": f"{e.scale:.2f}", "KL": f"{e.kl:.3f}", "ΔCE": f"{e.dce:+.3f}",
                 "continuation": repr(e.text)} for e in self.examples]

    def verdicts(self) -> list[str]:
        return [f"{self.concept!r}, greedy, after {self.prompt!r} (mean-ablating the layer costs KL "
                f"{self.kl_mean_ablation:.2f})", *self.directions]


def greedy_examples(model, index: SteeringIndex, concept: str, prompt: str, vectors: dict, scales, texts,
                    cost: SteeringCost, k: int = 6) -> GreedyExamples:
    """The continuations `texts` of `prompt`, one per direction of `vectors` ({method:
    `SteeringDirection`}, as `SteeringIndex.vectors` gives them) and scale of `scales`, in the order
    ``for method in vectors for scale in scales`` (as `generate` wrote them from the stacked steering
    vectors), with `cost` (`steering_cost` of the same vectors), as a `GreedyExamples` table. Each
    direction is described by what chose it, the tokens its SAE feature fires most on
    (`SteeringIndex.describe`) and the `k` tokens it promotes directly (`output_tokens`)."""

    pairs = [(method, s) for method in vectors for s in scales]
    if len(texts) != len(pairs) or len(cost.kl) != len(pairs):
        raise ValueError(f"{len(vectors)} directions × {len(scales)} scales: {len(pairs)} continuations and costs "
                         f"expected, got {len(texts)} and {len(cost.kl)}")
    examples = [GreedyExample(method=method, feature=vectors[method].feature, scale=float(s), kl=float(cost.kl[i]),
                              dce=float(cost.dce[i]), text=texts[i]) for i, (method, s) in enumerate(pairs)]
    directions = []
    for method, v in vectors.items():
        what = "" if v.feature is None else f"feature {v.feature} (fires most on {index.describe(v.feature)}); "
        promoted = ", ".join(repr(t) for t, _ in output_tokens(model, v.u)["up"][:k])
        directions.append(f"{method}: {what}{v.why}; direct effect, promotes: {promoted}")
    return GreedyExamples(concept=concept, prompt=prompt, kl_mean_ablation=float(cost.kl_mean_ablation),
                          examples=examples, directions=directions)


# --- the playground -------------------------------------------------------------------------------

def _highlight(text: str, words) -> str:
    """HTML of text with `words` marked (readable in light and dark themes)."""
    esc = html.escape(text)
    if not words:
        return esc
    pat = re.compile(r"\b(" + "|".join(map(re.escape, (html.escape(w) for w in words))) + r")\b", re.I)
    return pat.sub(lambda m: f"<mark class='steer-hit' style='background:#ffd54f;color:black'>{m[1]}</mark>", esc)


def playground(model, index: SteeringIndex, text_tokens: torch.Tensor, prompt: str = "I think that",
               concept: str = "she", scale: float = 0.5, max_scale: float = 2.0, n_new: int = 24,
               temperature: float = 0.8):
    """An ipywidgets steering playground: find a concept or a feature by text, pick a scale (in units
    of the typical ordinary-token norm at the hook), type a prompt, Run: the continuation unsteered, with
    the SAE feature's direction added, and with the concept's difference of means added (greedy, or
    sampling with a seed), side by side; below each, its cost on `text_tokens` (KL from the unsteered
    model, ΔCE) and what it does to the next-token distribution. Returns the widget: a cell ending in the
    call shows it."""

    import ipywidgets as w

    search = w.Text(value=concept, placeholder="token or concept, e.g. she, water, POS pronoun",
                    description="find", continuous_update=False)
    concept_dd = w.Dropdown(description="concept", layout=w.Layout(width="420px"))
    feature_dd = w.Dropdown(description="SAE feature", layout=w.Layout(width="640px"))
    scale_sl = w.FloatSlider(value=scale, min=-max_scale, max=max_scale, step=0.05, description="scale",
                             readout_format=".2f", continuous_update=False, layout=w.Layout(width="420px"))
    prompt_tx = w.Text(value=prompt, description="prompt", layout=w.Layout(width="420px"))
    mode = w.ToggleButtons(options=["greedy", "sampling"], value="greedy", description="decoding",
                           style={"description_width": "initial", "button_width": "80px"})
    seed = w.IntText(value=0, description="seed", layout=w.Layout(width="160px"))
    run = w.Button(description="Run", button_style="primary", icon="play")
    status = w.HTML()
    cols = {name: w.HTML(layout=w.Layout(width="33%", padding="0 8px 0 0")) for name in ("unsteered", "sae", "dim")}
    for name, col in cols.items():
        col.add_class(f"steer-{name}")
    status.add_class("steer-status")
    unit_note = w.HTML(f"<small>scale × {index.norm:.1f} (the median norm of ordinary tokens at "
                       f"{html.escape(index.hook)}) is added at every position but BOS</small>")
    state = {"runs": 0}

    def on_search(*_):
        matches = index.search(search.value)
        concept_dd.options = matches
        concept_dd.value = matches[0] if matches else None
        on_concept()
        if not matches:
            status.value = f"no concept matches {html.escape(repr(search.value))}"

    def on_concept(*_):
        name = concept_dd.value
        if name is None:
            feature_dd.options = []
            return
        words = index.concept_words(name)
        opts = [(f"#{f} fires on it (MCC {v:.2f}): {index.describe(f)}", f) for f, v in index.fires_on(name, k=5)]
        if words:
            opts += [(f"#{f} promotes {index.vocab[int(index.up_ids[f, r])]!r} (#{r + 1}, {v:+.2f}): {index.describe(f)}", f)
                     for f, r, v in index.promotes(words, k=5) if f not in [o[1] for o in opts]]
        opts += [(f"#{f} fires most on {search.value.strip()!r}: {index.describe(f)}", f)
                 for f in index.top_token_is(search.value)[:5] if f not in [o[1] for o in opts]]
        feature_dd.options = opts
        if opts:
            feature_dd.value = opts[0][1]
        status.value = (f"{html.escape(name)}: present on {index.n_present(name):,} of {index.n:,} indexed ordinary tokens"
                        " · press Run")

    def column(title, text, words, cost=None, change=None, direct=None):
        parts = [f"<div><b>{html.escape(title)}</b></div>",
                 f"<div class='steer-text' style='white-space:pre-wrap;font-family:monospace;font-size:12px;"
                 f"line-height:1.4;margin-bottom:4px'>"
                 f"<span style='opacity:0.6'>{html.escape(prompt_tx.value)}</span>{_highlight(text, words)}</div>"]
        if cost is not None:
            parts.append(f"<div class='steer-cost'>KL {cost[0]:.3f} · ΔCE {cost[1]:+.3f} nats/token</div>")
        if direct is not None:
            parts.append("<div><small>direct effect, promotes: " + html.escape(", ".join(repr(t) for t, _ in direct["up"][:6]))
                         + "</small></div>")
        if change is not None:
            parts.append("<div class='steer-tokens'><small>next token, its top output tokens: " + html.escape(", ".join(
                f"{t!r} {100 * a:.1f}%→{100 * b:.1f}%" for t, a, b in change["watch"][:4])) + "<br>rose most: "
                + html.escape(", ".join(f"{t!r} {100 * a:.1f}%→{100 * b:.1f}%" for t, a, b in change["rose"][:4]))
                + "</small></div>")
        return "<div style='line-height:1.35'>" + "".join(parts) + "</div>"

    def on_run(*_):
        name, f = concept_dd.value, feature_dd.value
        if name is None or f is None:
            status.value = "choose a concept and a feature first"
            return
        t0 = time.perf_counter()
        state["runs"] += 1
        status.value = f"run {state['runs']}: running…"
        try:
            words = index.concept_words(name)
            u_sae, u_dim = index.direction(f), unit(index.diff_of_means(name))
            v_sae = steering_vector(u_sae, scale_sl.value, index.norm)
            v_dim = steering_vector(u_dim, scale_sl.value, index.norm)
            vecs = torch.stack([torch.zeros_like(v_sae), v_sae, v_dim])
            texts = generate(model, prompt_tx.value, index.hook, vecs, n_new, sample=mode.value == "sampling",
                             seeds=seed.value, temperature=temperature)
            cost = steering_cost(model, text_tokens, index.hook, vecs[1:])
            cols["unsteered"].value = column("unsteered", texts[0], words)
            for key, title, v, u, i in (("sae", f"+ SAE feature #{f}", v_sae, u_sae, 0),
                                        ("dim", "+ difference of means", v_dim, u_dim, 1)):
                direct = output_tokens(model, u)
                change = next_token_change(model, prompt_tx.value, index.hook, v, watch=direct["up_ids"][:4])
                cols[key].value = column(title, texts[i + 1], words, (float(cost.kl[i]), float(cost.dce[i])),
                                         change, direct)
            status.value = (f"run {state['runs']}: scale {scale_sl.value:.2f} · {mode.value}"
                            f"{'' if mode.value == 'greedy' else f', seed {seed.value}'} · concept {html.escape(name)} · "
                            f"feature #{f} · cost on {len(text_tokens)} held-out contexts (mean-ablating the layer: "
                            f"KL {cost.kl_mean_ablation:.2f}) · {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # shown in the widget: a callback's traceback would go to the log only
            status.value = f"run {state['runs']}: error: {html.escape(type(e).__name__ + ': ' + str(e))}"

    search.observe(on_search, names="value")
    concept_dd.observe(on_concept, names="value")
    run.on_click(on_run)
    on_search()
    for col in cols.values():
        col.value = "<i>press Run</i>"
    ui = w.VBox([w.HBox([search, concept_dd]), feature_dd, w.HBox([scale_sl, unit_note]),
                 w.HBox([prompt_tx, mode, seed, run]), status, w.HBox(list(cols.values()))])
    ui.add_class("sae-steering")
    return ui
