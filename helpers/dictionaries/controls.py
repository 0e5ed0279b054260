"""Controls for the interpretability comparison: what a score says about SAEs, and what it says about
the measure.

On the embedded model, random directions made active on as many tokens as each SAE feature reach a
higher median held-out concept score (helpers.evals.heldout) than the SAE's features. These controls
separate a property of SAEs from a property of the score:

* **Positive control**, `token_mean_directions(x, token_ids)`: for each frequent token, the mean
  activation over its occurrences minus the overall mean, as a unit direction (`TokenMeanDictionary`).
  An oracle for token-identity features: a score that cannot rank it clearly above random
  directions cannot tell features from chance.
* **Frozen random encoder** (Korznikov et al. 2026, "Sanity Checks for Sparse Autoencoders: Do SAEs
  Beat Random Baselines?", their "Frozen Encoder SAE": encoder weights fixed at their random
  initialisation), `frozen_encoder_sae(x, "topk", k=...)`: the workbook's trainer with
  ``freeze_encoder=True`` (helpers.saes.train). Both W_enc and b_enc stay as initialised (the paper's
  summary names the encoder weights; b_enc starts at zero and is kept there, so which latents fire
  on a token is decided by random directions alone); W_dec and b_dec train. It saves and loads in
  SAELens layout like any SAE (its cfg.json's ``workbook`` block says ``frozen_encoder: true``).
* **Re-initialised model** (Heap et al. 2025, "Sparse Autoencoders Can Interpret Randomly
  Initialized Transformers"), `reinitialised(model, seed)`: a copy of the model with every weight
  drawn afresh, embeddings included (their randomised transformers have all parameters sampled
  anew); ``keep_embeddings=True`` keeps the trained token embeddings (and an untied unembedding).
  Weights come from the model's own Hugging Face initialiser (normal(0, initializer_range) for
  linear and embedding weights, ones for norms), not Heap et al.'s i.i.d. Gaussian; activations are
  harvested from it with helpers.activations.harvest.collect, and an SAE trained on them as on any.
* **Seed stability** (Paulo & Belrose 2025, "Sparse Autoencoders Trained on the Same Data Learn
  Different Features"), `shared_latents(a, b, threshold=0.9)`: the share of each dictionary's
  latents whose direction has a cosine similarity above the threshold with some latent of the
  other, and every latent's best cosine (`SharedLatents`, a typed result). Its means are
  helpers.evals.reconstruction.mmcs in both directions.

Every function takes plain tensors and models; nothing here reads the notebooks' profile or cache.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from helpers.activations.models import hooked
from helpers.dictionaries.dictionary import LinearDictionary, SAEDictionary, as_dictionary, device_of
from helpers.evals.heldout import MIN_COUNT
from helpers.results import Result
from helpers.saes.train import train_sae

# ---------------------------------------------------------------------------------------------------
# Positive control: token-mean directions
# ---------------------------------------------------------------------------------------------------


class TokenMeanDictionary(LinearDictionary):
    """Unit directions, one per token: codes s = (x − mean)·v. One-sided by default (a feature per
    token, code ReLU(s): how far the activation leans towards that token's mean); with `halves`, each
    direction also gives its negative half, as the random directions and the other linear baselines
    do (helpers.dictionaries.dictionary), so that the two differ only in their directions.

    `tokens` [k] are the token ids of the directions, `counts` [k] their occurrences in the data.
    `decode` gives mean + s·V, which rebuilds an activation only if the directions are orthonormal:
    this dictionary is for scoring features, not for reconstruction."""

    def __init__(self, directions: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor,
                 mean: torch.Tensor | None = None, halves: bool = False, name: str = "token means",
                 hook_name: str = "", model_name: str = "", massive=None):
        d = directions.float()
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        super().__init__(d.T.contiguous(), d, mean, name=name, hook_name=hook_name, model_name=model_name,
                         massive=massive)
        self.tokens, self.counts, self.halves = tokens.long(), counts.long(), halves
        if not halves:
            self._directions = self.decoder

    def encode(self, x):
        return super().encode(x) if self.halves else torch.relu(self.signed_codes(x))

    @property
    def decoder_rows(self):
        return super().decoder_rows if self.halves else self.decoder

    @torch.no_grad()
    def decode(self, codes):
        if self.halves:
            return super().decode(codes)
        return self.mean.to(codes.device) + codes @ self.decoder.to(codes.device)

    def feature_tokens(self) -> torch.Tensor:
        """[n_features]: the token id each feature stands for (a negative half, with `halves`, its token's)."""
        return torch.cat([self.tokens, self.tokens]) if self.halves else self.tokens


@torch.no_grad()
def token_mean_directions(x: torch.Tensor, token_ids, n_features: int | None = None, min_count: int = MIN_COUNT,
                          mean: torch.Tensor | None = None, exclude=(), halves: bool = False, hook_name: str = "",
                          model_name: str = "", massive=None, chunk: int = 65_536) -> TokenMeanDictionary:
    """The token-identity oracle: for each token seen at least `min_count` times among `token_ids` [N]
    (the token at each row of the activations x [N, d]), its mean activation minus `mean` (default: the
    mean of all rows), normalised, as a `TokenMeanDictionary` centred on `mean`.

    Tokens are taken most frequent first (ties: lower id first), at most `n_features` features (the
    dictionary's size: a token per feature, or per two features with `halves`); `exclude`: token ids
    left out (BOS, whose activations are massive). With a `massive` rule
    (helpers.activations.massive), the means are taken, and codes computed, with the massive offset
    removed, as for every other dictionary. Sums are accumulated in float64, `chunk` rows at a time."""
    x = torch.as_tensor(x)
    ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.as_tensor(np.array(token_ids, dtype=np.int64))
    ids = ids.long().reshape(-1)  # (a store's token field is a strided view: copied)
    if x.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"need activations [N, d] and token ids [N]; got {tuple(x.shape)} and {len(ids)} ids")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, not {min_count}")
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    keep = counts >= min_count
    if len(exclude):
        keep &= ~torch.isin(uniq, torch.as_tensor(list(exclude)).long())
    order = np.lexsort((uniq.numpy(), -counts.numpy()))     # most frequent first, then lower id
    order = torch.as_tensor(order)[keep[order]]
    if n_features is not None:
        order = order[:max(1, n_features // 2) if halves else n_features]
    if len(order) == 0:
        raise ValueError(f"no token occurs {min_count} times or more among the {len(ids)} rows: lower min_count "
                         "or give more activations")
    slot = torch.full((len(uniq),), -1, dtype=torch.long)
    slot[order] = torch.arange(len(order))
    row_slot = slot[inverse]
    sums = torch.zeros(len(order), x.shape[1], dtype=torch.float64)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk].float()
        xb = (xb if massive is None else massive.shift(xb)).double()
        total += xb.sum(0)
        s = row_slot[i:i + chunk]
        on = s >= 0
        sums.index_add_(0, s[on], xb[on])
    mean = (total / len(x)).float() if mean is None else torch.as_tensor(mean).float()
    dirs = (sums / counts[order].unsqueeze(1).double() - mean.double()).float()
    flat = dirs.norm(dim=-1) == 0
    if bool(flat.any()):
        warnings.warn(f"{int(flat.sum())} token(s) have a mean equal to the overall mean: their direction is zero "
                      "and their code always 0", stacklevel=2)
    return TokenMeanDictionary(dirs, uniq[order], counts[order], mean, halves=halves, hook_name=hook_name,
                               model_name=model_name, massive=massive)


# ---------------------------------------------------------------------------------------------------
# Korznikov et al. 2026: an SAE with a frozen random encoder
# ---------------------------------------------------------------------------------------------------


class FrozenEncoderSAE(SAEDictionary):
    """An SAE trained with its encoder frozen at its random initialisation (`frozen_encoder_sae`): an
    SAEDictionary whose saved files say so (``frozen_encoder: true`` in cfg.json's ``workbook`` block;
    `load_sae` reads them back as an ordinary SAE)."""

    def save(self, path, extra: dict | None = None):
        return super().save(path, extra={"frozen_encoder": True, **(extra or {})})


def frozen_encoder_sae(data, architecture: str = "topk", **kw) -> FrozenEncoderSAE:
    """An SAE of `architecture` trained on `data` with its encoder (W_enc, b_enc) frozen at its random
    initialisation and its decoder (W_dec, b_dec) trained: helpers.saes.train.train_sae(data,
    architecture, freeze_encoder=True, **kw) (its docstring has the arguments: k, d_sae, tokens, seed,
    ...). Named "frozen-encoder SAE (...)"."""
    sae = train_sae(data, architecture, freeze_encoder=True, **kw)
    return FrozenEncoderSAE(sae.sae, name=f"frozen-encoder SAE ({sae.sae.configs[0].label})")


# ---------------------------------------------------------------------------------------------------
# Heap et al. 2025: the same model with re-initialised weights
# ---------------------------------------------------------------------------------------------------


def _embedding_params(hf) -> list[str]:
    """Names of the token embedding parameters of a Hugging Face model (input and, untied, output)."""
    names = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(hf, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            names += [n for n, p in hf.named_parameters() if p is module.weight]
    return list(dict.fromkeys(names))


@torch.no_grad()
def reinitialised(model, seed: int = 0, keep_embeddings: bool = False):
    """A copy of `model` with its weights drawn afresh by the model's own initialiser (Heap et al.
    2025's control: does an SAE find "interpretable" features in a model that learned nothing?).

    model: a Hugging Face causal LM, or a TransformerBridge / any wrapper with `original_model` (the
      loaded model of helpers.activations.models.load_model); the same kind is returned (a bridge for a
      bridge, sharing the tokenizer), on the same device and dtype. The original is left untouched.
    seed: the weights are a function of the seed alone (the global random state is left as it was).
    keep_embeddings: keep the trained token embeddings (and unembedding, where untied); by default
      they are re-drawn too.

    The copy is built from the model's config by its Hugging Face class (its `_init_weights`: linear
    and embedding weights normal(0, initializer_range), norms at one, tied weights tied). A parameter
    left equal to the original's is named in a warning. The result's `workbook_name` (what stores
    record as the model) is the original's name with "re-initialised (seed s)".
    """
    bridge = model if hasattr(model, "original_model") else None
    hf = model.original_model if bridge is not None else model
    if not hasattr(hf, "config") or not hasattr(type(hf), "_from_config"):
        raise TypeError(f"expected a Hugging Face model or a bridge around one, got {type(model).__name__}")
    first = next(hf.parameters())
    config = copy.deepcopy(hf.config)
    devices = [first.device] if first.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        fresh = type(hf)._from_config(config, dtype=first.dtype)
    fresh = fresh.to(first.device).eval()
    old, new = dict(hf.named_parameters()), dict(fresh.named_parameters())
    kept = _embedding_params(hf) if keep_embeddings else []
    for name in kept:
        new[name].copy_(old[name])
    same = [n for n, p in old.items() if n not in kept and n in new and torch.equal(p, new[n])]
    if same:
        warnings.warn(f"re-initialising left {len(same)} parameter(s) as they were (already at their initial "
                      f"values, or not covered by {type(hf).__name__}._init_weights): {', '.join(same[:5])}",
                      stacklevel=2)
    base = getattr(model, "workbook_name", None) or getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    label = f"{base} re-initialised (seed {seed}{', trained embeddings' if keep_embeddings else ''})"
    if bridge is None:
        fresh.workbook_name = label
        return fresh
    out = hooked(fresh, tokenizer=bridge.tokenizer)
    out.workbook_name, out.workbook_revision = label, getattr(bridge, "workbook_revision", None)
    return out


# ---------------------------------------------------------------------------------------------------
# Paulo & Belrose 2025: latents shared between two dictionaries
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def max_cosines(dirs_a: torch.Tensor, dirs_b: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(best_a [m_a], best_b [m_b]): for each direction of dirs_a [m_a, d] its largest cosine
    similarity with any direction of dirs_b [m_b, d], and the same for each of dirs_b against dirs_a,
    from one pass over the similarity matrix, `chunk` rows at a time (on dirs_a's device; CPU results).
    best_a.mean() is helpers.evals.reconstruction.mmcs(dirs_a, dirs_b)."""
    if dirs_a.shape[-1] != dirs_b.shape[-1]:
        raise ValueError(f"directions of different widths: {dirs_a.shape[-1]} and {dirs_b.shape[-1]}")
    a = dirs_a.float()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = dirs_b.float().to(a.device)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    best_a = torch.empty(len(a), device=a.device)
    best_b = torch.full((len(b),), -1.0, device=a.device)
    for i in range(0, len(a), chunk):
        sim = a[i:i + chunk] @ b.T
        best_a[i:i + chunk] = sim.max(1).values
        best_b = torch.maximum(best_b, sim.max(0).values)
    return best_a.cpu(), best_b.cpu()


@dataclass
class SharedLatents(Result):
    """Latents two dictionaries share (`shared_latents`): `share_a`, the share of A's latents whose
    direction has a cosine similarity above `threshold` with some latent of B, and `share_b` the
    same for B in A; `mmcs_a` / `mmcs_b` the mean of those best cosines; `best_a` [n_a] / `best_b` [n_b]
    every latent's best cosine."""

    name_a: str
    name_b: str
    threshold: float
    n_a: int
    n_b: int
    share_a: float
    share_b: float
    mmcs_a: float
    mmcs_b: float
    best_a: list = field(default_factory=list, repr=False)
    best_b: list = field(default_factory=list, repr=False)

    def verdicts(self) -> list[str]:
        return [f"{self.share_a:.0%} of {self.name_a}'s {self.n_a} latents have a latent of {self.name_b} at cosine "
                f"> {self.threshold:g} (mean best cosine {self.mmcs_a:.2f}); {self.share_b:.0%} of {self.name_b}'s "
                f"{self.n_b} have one in {self.name_a} (mean {self.mmcs_b:.2f})."]


def shared_latents(a, b, threshold: float = 0.9, name_a: str | None = None, name_b: str | None = None,
                   chunk: int = 2048) -> SharedLatents:
    """How many latents two dictionaries share (Paulo & Belrose 2025: SAEs trained on the same data
    from different seeds): for each latent of `a`, its best cosine similarity with the latents of `b`
    (decoder directions), and the share above `threshold`; the same from `b`'s side. `a`, `b`: any
    SAE or dictionary (`as_dictionary`: a workbook SAE, a SAELens SAE, random directions, ...) or a
    tensor of directions [m, d]. Every latent counts, dead ones included."""
    dirs, names = [], []
    for obj, name in ((a, name_a), (b, name_b)):
        if isinstance(obj, torch.Tensor):
            dirs.append(obj)
            names.append(name or f"{obj.shape[0]} directions")
        else:
            d = as_dictionary(obj)
            dirs.append(d.directions.to(device_of(d)))
            names.append(name or d.name)
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    best_a, best_b = max_cosines(dirs[0], dirs[1], chunk)
    return SharedLatents(names[0], names[1], float(threshold), len(best_a), len(best_b),
                         float((best_a > threshold).float().mean()), float((best_b > threshold).float().mean()),
                         float(best_a.mean()), float(best_b.mean()), best_a.tolist(), best_b.tolist())

