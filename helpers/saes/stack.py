"""Sparse autoencoders: the stacked SAE model, its configs, its losses on both paths, SAELens files.

An L1 SAE, for an activation x (d_in numbers) and a dictionary of d_sae directions::
    c  = ReLU(W_enc (x - b_dec) + b_enc)          codes, one per dictionary direction
    x̂  = W_dec c + b_dec                          reconstruction
    loss = ||x - x̂||² / d_in  +  α · Σ_i |c_i|    (rows of W_dec kept at unit norm)

``tied=True`` uses W_enc = W_decᵀ (the seed paper's residual-stream runs were tied). Other
architectures (``SAEConfig.architecture``: TopK, BatchTopK, JumpReLU, Matryoshka BatchTopK) replace the
ReLU and the L1 penalty: each is one object of helpers.saes.architectures, which says what it computes;
this module delegates to it wherever they differ.

Two recipes train a ReLU + L1 SAE (``SAEConfig.recipe``):

* ``"anthropic2023"`` (called ``"paper"`` before, a name still accepted when reading configs and
  files): Anthropic's 2023 recipe ("Towards Monosemanticity"), as above: a decoder bias b_dec,
  subtracted from the encoder's input and initialised at the data mean; unit-norm dictionary rows (the
  gradient component that would change a row's norm is removed and rows are renormalised after every
  step); dead latents resampled (helpers.saes.train). **This is not the seed paper's own code**
  (Cunningham et al. 2023, github.com/HoagyC/sparse_coding), which has no decoder bias and
  normalises the dictionary inside the forward pass (x̂ = c · W/‖W‖, gradients flowing through the
  normalisation), with an encoder bias only, tied and untied; it is the closest standard recipe
  of the same model (ReLU + L1, unit-norm directions), and the workbook reproduces the paper's
  claims with it. The seed paper's exact method is not implemented here.
* ``"improved"``: Anthropic's April 2024 update: the encoder sees x itself, f = ReLU(W_enc x + b_enc),
  both biases initialised at zero (``centres_input`` is False; SAELens files still hold the
  b_dec-subtracted form, converted on saving and loading); no norm constraint: the penalty weighs
  each code by its decoder row's norm, α·Σ_i c_i‖W_dec,i‖; small-norm decoder rows at initialisation
  (norm 0.1) with W_enc = W_decᵀ (untied afterwards); α warmed up from 0 over the first 5% of steps;
  gradients clipped per SAE at norm 1 *on the scale of a loss summed over dimensions*, as the update
  does (our loss is divided by d_in, so helpers.saes.train clips at 1/d_in, which under Adam is the same
  clip); no resampling. At the end of training the norms are folded into the codes (W_dec rows to unit
  norm, encoder rows and bias scaled to match), which changes no reconstruction and makes the penalty
  a plain L1 again, so both recipes give SAEs of the same form.

Every SAE starts from its own random dictionary (`initial_dictionary`), seeded by the base seed and
the SAE's own config (`init_seed`): SAEs of one sweep start apart, and an SAE starts from the same
dictionary alone or in a sweep.

`losses` computes the training losses on a dense path (plain autograd, the reference) or a sparse
path (helpers.saes.sparse: the decoder and all backward passes touch only the active latents); "auto"
takes the sparse path for the architectures of fixed sparsity (TopK, BatchTopK) and, for the others
(L1, JumpReLU), whenever a batch's codes are sparse enough.

`SAEStack` holds n SAEs of one shape as stacked parameters [n, ...] so that a sweep over α (or k)
trains with batched matmuls on one stream of activations; `stack[i]` is a one-SAE stack.
Activations are multiplied by a fixed `scale` (set from data so that E‖x‖ = √d_in) before
encoding, so α means the same at every layer and model; `save_saelens` folds it into the weights.
Files follow SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``) so SAELens users can load
our SAEs and we can load theirs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from helpers.activations import hooks
from helpers.saes import architectures, sparse

# How a standard SAE is trained (module docstring): helpers.saes.architectures.Recipe, by name.
RECIPES = tuple(architectures.RECIPES)
RECIPE_ALIASES = {alias: r.name for r in architectures.RECIPES.values() for alias in r.aliases}  # older names
RECIPE_NAMES = {r.name: r.family_name for r in architectures.RECIPES.values()}  # families in tables and plots
IMPROVED_INIT_NORM = architectures.IMPROVED.init_norm  # decoder row norm at initialisation, improved recipe
SPARSE_MAX_DENSITY = 0.15             # "auto": L1 batches with more active codes than this share go dense
                                      # (measured on 2 CPU cores: the sparse path wins below about 20%)


# Fields added after the first SAEs were trained: left out of `config_dict` (and so of `init_seed`,
# training fingerprints and repr) while they hold their defaults, so older SAEs keep their seeds and keys.
# Every field declared after `massive` is one: a field added at the end of SAEConfig joins them.
FIRST_FIELDS = ("d_in", "d_sae", "architecture", "tied", "l1_coefficient", "k", "hook_name", "model_name", "recipe",
                "massive")


@dataclass(frozen=True, repr=False)
class SAEConfig:
    """One SAE. `l1_coefficient` is the paper's α (standard), `k` the number of active latents per
    token (topk; on average over a batch for batchtopk and matryoshka_batchtopk), `l0_coefficient`
    JumpReLU's λ, and `jumprelu_bandwidth` / `jumprelu_init_threshold` its kernel width and initial
    threshold in the paper's units, `matryoshka_widths` the nested prefixes' widths (helpers.saes.architectures)."""

    d_in: int
    d_sae: int
    architecture: str = "standard"
    tied: bool = False
    l1_coefficient: float = 0.0
    k: int = 0
    hook_name: str = ""
    model_name: str = ""
    recipe: str = "anthropic2023"
    massive: bool = True  # apply the hook's massive-activation rule when training (helpers.activations.massive)
    l0_coefficient: float = 0.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.04
    matryoshka_widths: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "recipe", normalise_recipe(self.recipe))
        object.__setattr__(self, "matryoshka_widths", tuple(int(w) for w in self.matryoshka_widths))
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive (ratio R = d_sae/d_in > 0); got "
                             f"d_in={self.d_in}, d_sae={self.d_sae}")
        arch = architectures.get(self.architecture)
        if not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise ValueError(f"the L1 coefficient α must be a finite number >= 0, not {self.l1_coefficient}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: one of {RECIPES}")
        arch.validate(self)

    @property
    def training_recipe(self) -> "architectures.Recipe":
        """The Recipe object of `recipe` (its choices: unit_norm, centres_input, ...)."""
        return architectures.recipe(self.recipe)

    def __repr__(self) -> str:
        return f"SAEConfig({', '.join(f'{k}={v!r}' for k, v in config_dict(self).items())})"

    @property
    def arch(self) -> "architectures.Architecture":
        return architectures.get(self.architecture)

    @classmethod
    def from_ratio(cls, d_in: int, ratio: float, **kw) -> "SAEConfig":
        if not ratio > 0:
            raise ValueError(f"the dictionary ratio R must be > 0, not {ratio}")
        return cls(d_in=d_in, d_sae=max(1, round(d_in * ratio)), **kw)

    @property
    def ratio(self) -> float:
        return self.d_sae / self.d_in

    @property
    def shape_key(self) -> tuple:
        """SAEs with equal keys can share one stack (and read the same hook)."""
        return (self.d_in, self.d_sae, self.architecture, self.tied, self.recipe, self.hook_name, self.massive,
                *self.arch.shape_fields(self))

    @property
    def family(self) -> str:
        """"Anthropic-2023 L1", "improved L1", "TopK", "BatchTopK", "JumpReLU", ...: the kinds of SAE the
        workbook compares (the architecture's family, with " (no massive treatment)" for a control
        trained without helpers.activations.massive's rule)."""
        base = self.arch.family(self)
        return base if self.massive else f"{base} (no massive treatment)"

    @property
    def label(self) -> str:
        tied = "tied " if self.tied else ""
        return (f"{tied}{self.arch.family(self)} R={self.ratio:g} {self.arch.setting_label(self)}"
                f"{'' if self.massive else ' (no massive treatment)'}")


LATER_FIELDS = tuple(f.name for f in fields(SAEConfig) if f.name not in FIRST_FIELDS)


def normalise_recipe(name: str) -> str:
    """A recipe's current name ("paper", its old name, is read as "anthropic2023")."""
    return RECIPE_ALIASES.get(name, name)


def config_dict(cfg: SAEConfig) -> dict:
    """The config's fields, less those of LATER_FIELDS that hold their defaults: what identifies an
    SAE's settings (its seed, training fingerprints), unchanged for SAEs from before those fields."""
    defaults = {f.name: f.default for f in fields(SAEConfig)}
    return {k: v for k, v in asdict(cfg).items() if not (k in LATER_FIELDS and v == defaults[k])}


def init_seed(cfg: SAEConfig, seed: int = 0) -> int:
    """The seed of one SAE's initial dictionary: the base seed and the SAE's own config (everything
    but `massive`, so that the control trained without the massive treatment starts where its twin
    does). SAEs of one sweep start from different dictionaries, and an SAE starts from the same one
    whether it trains alone or in a sweep."""
    key = json.dumps({k: v for k, v in config_dict(cfg).items() if k != "massive"}, sort_keys=True)
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def initial_dictionary(cfg: SAEConfig, seed: int = 0) -> torch.Tensor:
    """The decoder rows [d_sae, d_in] an SAE of this config starts from (SAEStack(..., seed)): random
    unit directions (norm IMPROVED_INIT_NORM for the improved recipe), from init_seed(cfg, seed)."""
    gen = torch.Generator().manual_seed(init_seed(cfg, seed))
    w = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
    w = w / w.norm(dim=-1, keepdim=True)
    norm = cfg.training_recipe.init_norm
    return w if norm == 1 else w * norm


class SAEStack(nn.Module):
    """n SAEs with the same shape key (size, architecture, tying, recipe, hook), as stacked parameters.

    Parameters: W_enc [n, d_sae, d_in] (None when tied: the encoder is W_dec), W_dec [n, d_sae, d_in],
    b_enc [n, d_sae], b_dec [n, d_in]; the encoder computes x·W_encᵀ, so both matrices keep one row
    per latent (what the sparse kernels gather and scatter).
    """

    def __init__(self, configs: list[SAEConfig], seed: int = 0):
        super().__init__()
        if not configs or len({c.shape_key for c in configs}) != 1:
            raise ValueError("a stack needs one or more configs of the same shape, architecture, recipe and hook")
        self.configs = list(configs)
        c0 = configs[0]
        n, d, m = len(configs), c0.d_in, c0.d_sae
        # Each SAE its own initial dictionary, seeded by the base seed and its own config: SAEs of a
        # sweep start apart, and a sweep trains exactly the SAEs that training each alone would.
        w = torch.stack([initial_dictionary(c, seed) for c in configs])
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = None if c0.tied else nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(n, m))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("l1", torch.tensor([c.l1_coefficient for c in configs]))
        self.register_buffer("k", torch.tensor([c.k for c in configs]))
        self.arch = c0.arch
        # the architecture's own parameters and buffers (thresholds)
        own = self.arch.own_state(self.configs, d, m)
        self.own_state_names = tuple(own)
        for key, t in own.items():
            if isinstance(t, nn.Parameter):
                setattr(self, key, t)
            else:
                self.register_buffer(key, t)
        # Massive activations (helpers.activations.massive): tokens whose norm exceeds the threshold have the
        # offset removed before encoding and added back after decoding. Inert by default.
        self.register_buffer("massive_threshold", torch.full((n,), math.inf))
        self.register_buffer("massive_offset", torch.zeros(n, d))

    def set_massive(self, rule) -> None:
        """Give every SAE of the stack the massive-activation rule of its hook (helpers.activations.massive)."""
        with torch.no_grad():
            self.massive_threshold.fill_(rule.threshold)
            self.massive_offset.copy_(rule.offset.to(self.massive_offset).expand_as(self.massive_offset))

    # ---- shape -----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.configs)

    @property
    def d_in(self) -> int:
        return self.configs[0].d_in

    @property
    def d_sae(self) -> int:
        return self.configs[0].d_sae

    @property
    def architecture(self) -> str:
        return self.configs[0].architecture

    @property
    def tied(self) -> bool:
        return self.configs[0].tied

    @property
    def recipe(self) -> str:
        return self.configs[0].recipe

    @property
    def training_recipe(self) -> "architectures.Recipe":
        """The Recipe object of the stack's recipe (its choices: unit_norm, centres_input, ...)."""
        return self.configs[0].training_recipe

    @property
    def unit_norm(self) -> bool:
        """Whether training keeps the dictionary rows at unit norm (all but the improved recipe)."""
        return self.training_recipe.unit_norm

    @property
    def centres_input(self) -> bool:
        """Whether the encoder sees x - b_dec (Anthropic 2023, TopK) or x itself (the improved recipe,
        as in Anthropic's April 2024 update: f = ReLU(W_enc x + b_enc)). Files hold SAELens's form
        (b_dec subtracted): save_saelens and load_saelens convert b_enc."""
        return self.training_recipe.centres_input

    def __getitem__(self, i: int) -> "SAEStack":
        one = SAEStack([self.configs[i]])
        one.load_state_dict({k: (v[i:i + 1].detach().clone() if torch.is_tensor(v) else v)
                             for k, v in self.state_dict().items()})
        return one.to(self.b_dec.device)

    def __len__(self) -> int:
        return self.n

    def encoder_weight(self) -> torch.Tensor:
        """[n, d_sae, d_in]: one row per latent (pre-activations are x·W_encᵀ)."""
        return self.W_dec if self.tied else self.W_enc

    # The recipe travels with the weights: loading a state dict of another recipe is refused.
    def get_extra_state(self):
        return {"recipe": self.recipe}

    def set_extra_state(self, state):
        theirs = normalise_recipe((state or {}).get("recipe", "anthropic2023"))
        if theirs != self.recipe:
            raise ValueError(f"these weights were trained with the {theirs!r} recipe but are being loaded into "
                             f"a {self.recipe!r}-recipe SAE: the recipes differ in their constraints "
                             "(the improved recipe's decoder rows are not unit norm until folded), so build "
                             f"the SAE with SAEConfig(..., recipe={theirs!r})")

    # ---- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have d_model={x.shape[-1]}, but this SAE has d_in={self.d_in} "
                             f"(trained on {self.configs[0].hook_name or 'another hook'}): use activations "
                             "of the hook and model it was trained for")

    def massive_flags(self, x: torch.Tensor) -> torch.Tensor:
        """[n, B] bool: the rows of x [B, d_in] or [n, B, d_in] that are massive for each SAE."""
        x = x if x.dim() == 3 else x.unsqueeze(0)
        return x.float().norm(dim=-1) > self.massive_threshold.view(-1, 1)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (shared) or [n, B, d_in] -> massive offset removed, scaled: [n, B, d_in]."""
        self._check_input(x)
        x = x if x.dim() == 3 else x.unsqueeze(0)
        if torch.isfinite(self.massive_threshold).any():
            x = x - self.massive_flags(x).unsqueeze(-1).to(x.dtype) * self.massive_offset.unsqueeze(1).to(x.dtype)
        return x * self.scale.view(-1, 1, 1)

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (shared) or [n, B, d_in] -> scaled, minus b_dec where the recipe centres the
        encoder's input (`centres_input`): [n, B, d_in]."""
        xs = self._scaled(x)
        return xs - self.b_dec.unsqueeze(1) if self.centres_input else xs

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (shared) or [n, B, d_in] -> pre-activations [n, B, d_sae]."""
        xc = self._centred(x)
        w = self.encoder_weight()
        return torch.baddbmm(self.b_enc.unsqueeze(1), xc, w.transpose(1, 2).to(xc.dtype))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Codes [n, B, d_sae] of pre-activations at inference (the architecture's activation)."""
        return self.arch.codes(pre, self.arch.state(self))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes [n, B, d_sae] of activations x (in the model's units)."""
        return self.activation(self.pre_acts(x))

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        """Reconstruction [n, B, d_in] in the model's units, of the activations with any massive offset
        removed (`forward` adds it back)."""
        out = torch.baddbmm(self.b_dec.unsqueeze(1), c, self.W_dec.to(c.dtype))
        return out / self.scale.view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction [n, B, d_in] of x [B, d_in] or [n, B, d_in], massive offset included."""
        out = self.decode(self.encode(x))
        if torch.isfinite(self.massive_threshold).any():
            out = out + self.massive_flags(x).unsqueeze(-1).to(out.dtype) * self.massive_offset.unsqueeze(1).to(out.dtype)
        return out

    # ---- training losses -------------------------------------------------------------------
    def losses(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_coefficient: float = 1 / 32,
               l1_scale: float = 1.0, path: str = "auto") -> dict:
        """Per-SAE training losses for a batch x [B, d_in]; returns a dict of [n] tensors.

        mse: ‖x̂ - x‖² / d_in in scaled units; the architecture's terms (helpers.saes.architectures,
        `loss_terms`): l1 (standard): l1_scale·α·Σ_i c_i‖W_dec,i‖ per token (the rows are unit norm in
        the anthropic2023 recipe); aux (topk, batchtopk): the AuxK loss on the residual, from the
        `dead` [n, d_sae] latents; l0_penalty (jumprelu): λ·L0 with its straight-through gradient;
        matryoshka: the nested prefixes' MSEs. loss: mse plus those terms. Also l0 [n] and fired
        [n, d_sae] (latents active in the batch), detached, any metric of the architecture
        (batchtopk: batch_threshold, the smallest code kept), and path, the path taken.

        path: "dense" (plain autograd, the reference), "sparse" (helpers.saes.sparse) or "auto" (sparse for
        the architectures of fixed sparsity; for the others, each SAE of the stack on its own: sparse
        when at most SPARSE_MAX_DENSITY of its codes in the batch are active, else dense, so that an
        SAE takes the same path in a sweep as alone). Both paths give the same losses and gradients up
        to float rounding. The result's "path" is "dense", "sparse" or "mixed".
        """
        if path not in ("auto", "dense", "sparse"):
            raise ValueError(f"path must be 'auto', 'dense' or 'sparse', not {path!r}")
        arch = self.arch
        if path == "sparse" and not arch.sparse_path:
            raise ValueError(f"the {arch.name} architecture has no sparse path (it gives no `selector` for its "
                             "codes): use path='dense' or 'auto'")
        dead = dead if arch.uses_auxk and dead is not None and dead.any() else None
        if path == "dense" or not arch.sparse_path:
            return self._dense_losses(x, dead, aux_coefficient, l1_scale)

        xs = self._scaled(x)
        xc = xs - self.b_dec.unsqueeze(1) if self.centres_input else xs
        n, B, d = xc.shape
        m = self.d_sae
        w_enc = self.encoder_weight()
        max_nnz = SPARSE_MAX_DENSITY * B * m if (path == "auto" and not arch.fixed_sparsity) else None  # per SAE
        sel = self._select_active(xc, w_enc, dead, max_nnz)
        if len(sel.dense_rows) == n:  # every SAE's codes are still dense in this batch: the dense path is faster
            return self._dense_losses(x, dead, aux_coefficient, l1_scale)
        p = arch.state(self)
        flat_enc, flat_dec, flat_b_enc = w_enc.reshape(n * m, d), self.W_dec.reshape(n * m, d), self.b_enc.reshape(n * m)
        xc_flat = xc.reshape(n * B, d)
        codes = sparse.encode_values(xc_flat, flat_enc, flat_b_enc, sel.vals, sel.pattern)
        codes = arch.sparse_codes(codes, sel, p, self)
        xhat = sparse.decode(codes, flat_dec, sel.pattern).view(n, B, d) + self.b_dec.unsqueeze(1)
        err = xhat.float() - xs.float()
        mse = err.pow(2).sum(-1).mean(-1) / self.d_in
        on = sel.vals > 0
        out = {"mse": mse, "path": "sparse",
               "l0": torch.bincount(sel.pattern.rows[on] // B, minlength=n).float() / B,
               "fired": (torch.bincount(sel.pattern.cols[on], minlength=n * m) > 0).view(n, m)}
        ctx = architectures.SparseContext(
            stack=self, p=p, n=n, B=B, m=m, codes=codes, pattern=sel.pattern, sel=sel, err=err, xs=xs, xc=xc_flat,
            flat_enc=flat_enc, flat_dec=flat_dec, flat_b_enc=flat_b_enc, b_dec=self.b_dec, dead=dead,
            aux_coefficient=aux_coefficient, l1_scale=l1_scale)
        out.update(arch.sparse_terms(ctx))
        out["loss"] = mse + sum((out[t] for t in arch.loss_terms), torch.zeros_like(mse))
        if sel.dense_rows:  # the SAEs whose codes are still dense take the dense path, each as if alone
            dense = self._dense_losses(x, None, aux_coefficient, l1_scale, rows=sel.dense_rows)
            idx = torch.tensor(sel.dense_rows, device=x.device)
            for key in ("mse", "loss", "l0", "fired", *arch.loss_terms):
                out[key] = out[key].index_put((idx,), dense[key])
            out["path"] = "mixed"
        return out

    _BLOCK_BYTES = 8 << 20  # pre-activations computed a block of rows at a time (CPU), this many bytes

    @torch.no_grad()
    def _select_active(self, xc: torch.Tensor, w_enc: torch.Tensor, dead: torch.Tensor | None, max_nnz):
        """The active (row, latent) pairs of a batch and their codes, from the dense pre-activations
        computed a block of rows at a time, so that the whole [n, B, d_sae] matrix is never held (on a
        CPU, big fresh allocations cost page faults and cache misses that a block re-used from the
        allocator does not). Which pairs are active is the architecture's `selector`; rows are
        flattened as s·B + b and latents as s·d_sae + j.

        Returns a helpers.saes.architectures.Selection, with the AuxK pairs (pattern, codes) of the `dead`
        latents as `aux` (else None) and, as `dense_rows`, the SAEs with more than max_nnz active
        codes in the batch (their pairs are left out: they take the dense path)."""

        n, B, _ = xc.shape
        m = self.d_sae
        rows = max(1, min(B, self._BLOCK_BYTES // (4 * m))) if sparse.use_cpu_kernels(xc) else B
        selector = self.arch.selector(self, B, max_nnz)
        k_aux = 0 if dead is None else min(self.d_in // 2, m, int(dead.sum(-1).max()))
        if k_aux:
            a_vals = torch.empty(n, B, k_aux, device=xc.device)
            a_idx = torch.empty(n, B, k_aux, dtype=torch.int64, device=xc.device)
        for s in range(n):
            wt = w_enc[s].T.to(xc.dtype)
            selector.start(s)
            for b0 in range(0, B, rows):
                b1 = min(B, b0 + rows)
                pre = torch.addmm(self.b_enc[s], xc[s, b0:b1], wt)
                if not selector.block(s, b0, pre):
                    break
                if k_aux:
                    dp = torch.where(dead[s], torch.relu(pre), torch.zeros_like(pre))
                    v, i = dp.topk(k_aux, dim=-1)
                    a_vals[s, b0:b1], a_idx[s, b0:b1] = v, i
            selector.end(s)
        sel = selector.result(n, xc.device)
        if k_aux:
            offsets = (torch.arange(n, device=xc.device) * m).view(n, 1, 1)
            sel.aux = (sparse.Pattern.from_topk((a_idx + offsets).reshape(n * B, k_aux), n * m), a_vals.reshape(-1))
        return sel

    def _dense_losses(self, x, dead, aux_coefficient, l1_scale, rows: list[int] | None = None) -> dict:
        """The losses by plain autograd, for every SAE of the stack or (`rows`) for some of them (the
        same computation each would do alone)."""
        idx = None if rows is None else torch.tensor(rows, device=x.device)

        def pick(t):  # index_select, not t[idx]: its backward is an index_add_, not an index_put_ with float atomics
            return t if idx is None else t.index_select(0, idx)

        xs = pick(self._scaled(x))
        w_enc, b_enc, b_dec = pick(self.encoder_weight()), pick(self.b_enc), pick(self.b_dec)
        p = self.arch.state(self, idx)
        xc = xs - b_dec.unsqueeze(1) if self.centres_input else xs
        pre = torch.baddbmm(b_enc.unsqueeze(1), xc, w_enc.transpose(1, 2).to(xs.dtype))
        c = self.arch.train_codes(pre, p)
        out, err = self._decode_losses(c, xs, b_dec, p["W_dec"])
        out["path"] = "dense"
        ctx = architectures.DenseContext(stack=self, p=p, n=len(xs), B=xs.shape[1], c=c, pre=pre, err=err, xs=xs,
                                         b_dec=b_dec, dead=dead, aux_coefficient=aux_coefficient, l1_scale=l1_scale)
        out.update(self.arch.dense_terms(ctx))
        out["loss"] = out["mse"] + sum((out[t] for t in self.arch.loss_terms), torch.zeros_like(out["mse"]))
        return out

    def _decode_losses(self, c, xs, b_dec, w_dec) -> tuple[dict, torch.Tensor]:
        """From codes c [n, B, m] of scaled inputs xs [n, B, d]: ({mse, l0, fired}, reconstruction error)."""
        xhat = torch.baddbmm(b_dec.unsqueeze(1), c, w_dec.to(c.dtype))
        err = xhat.float() - xs.float()
        active = (c > 0).detach()
        return {"mse": err.pow(2).sum(-1).mean(-1) / self.d_in, "l0": active.sum(-1).float().mean(-1),
                "fired": active.any(1)}, err

    @staticmethod
    def _l1_penalty(c, w_dec) -> torch.Tensor:
        """Σ_i |c_i| · ‖W_dec,i‖ per SAE, averaged over the batch (before α and its warm-up scale).

        c [n, B, m] are ReLU codes (never negative: |c| = c, with the same gradient, as ReLU passes
        none at 0). Each latent's codes are summed over the batch with an fp32 result, then weighted
        by the norms: no [n, B, m] temporary (under bf16/fp16 autocast on CUDA the reduction reads
        the codes in their dtype and accumulates in fp32; a CPU reduction would first copy
        low-precision codes to fp32, so there they are summed in their dtype, with an fp32
        accumulator, and each latent's total is rounded once)."""

        if c.dtype == torch.float32 or not sparse.use_cpu_kernels(c):
            per_latent = c.sum(1, dtype=torch.float32)
        else:
            per_latent = c.sum(1).float()
        return (per_latent * w_dec.norm(dim=-1).float()).sum(-1) / c.shape[1]

    # ---- the dictionary's norms ------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out of W_dec's gradient the component that would change row norms (in place, with
        no weight-sized temporary: these passes over the dictionary are memory-bound)."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            coef = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w)
            g.addcmul_(coef.unsqueeze(-1), w, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Rescale so that every decoder row has unit norm without changing any reconstruction:
        code i grows by ‖W_dec,i‖ (its encoder row and bias are multiplied by it), W_dec,i shrinks by
        it. For the improved recipe, whose rows are free during training, this turns its
        norm-weighted penalty into the plain L1 of the codes. Tied SAEs have one matrix for both
        roles and cannot be folded (they are trained with unit-norm rows)."""
        if self.tied:
            raise ValueError("a tied SAE cannot fold its decoder norms (its encoder is its decoder)")
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-8)              # [n, m]
        self.W_enc.mul_(norms.unsqueeze(-1))
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms.unsqueeze(-1))

    @torch.no_grad()
    def directions(self) -> torch.Tensor:
        """Unit dictionary directions [n, d_sae, d_in] in the model's activation space."""
        w = self.W_dec.float()
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)


# ---- SAELens files ---------------------------------------------------------------------------
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_FILES = (SAELENS_CFG, SAELENS_WEIGHTS)  # everything save_saelens writes in an SAE's folder


def save_saelens(sae: SAEStack, path, extra: dict | None = None) -> Path:
    """Save a one-SAE stack as SAELens files in the folder `path` (the input scale folded into the weights).

    `path` must be new, empty, or an SAE's folder (only SAELENS_FILES): anything else in it (notes,
    another SAE's files) is refused with FileExistsError, never deleted. The files are written to a
    sibling folder of a name unique to this call and then moved to `path`, replacing an SAE already
    there: an interrupted save never leaves part of an SAE at `path`.
    """

    if sae.n != 1:
        raise ValueError(f"save one SAE at a time (stack[i]); this stack has {sae.n}")
    cfg = sae.configs[0]
    s = float(sae.scale[0])
    w_enc = sae.encoder_weight()[0].detach().float().T * s
    b_enc = sae.b_enc[0].detach().float()
    if not sae.centres_input:  # SAELens subtracts b_dec from the input: W_enc(x - b_dec) + (b_enc + W_enc b_dec)
        b_enc = b_enc + sae.encoder_weight()[0].detach().float() @ sae.b_dec[0].detach().float()
    tensors = {
        "W_enc": w_enc.contiguous(),
        "W_dec": (sae.W_dec[0].detach().float() / s).contiguous(),
        "b_enc": b_enc.contiguous(),
        "b_dec": (sae.b_dec[0].detach().float() / s).contiguous(),
        # the architecture's own tensors (`threshold`), in units of pre-activations, which folding the
        # scale into the weights leaves unchanged
        **{k: v.contiguous() for k, v in sae.arch.saelens_tensors(sae).items()},
    }
    saelens_cfg = {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "dtype": "float32", "device": "cpu", "model_name": cfg.model_name, "hook_name": cfg.hook_name,
        "hook_layer": hooks.layer_of(cfg.hook_name) if hooks.is_block_hook(cfg.hook_name) else 0,
        "hook_head_index": None, **sae.arch.saelens_fields(cfg),
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "normalize_activations": "none",
        "context_size": None, "dataset_path": "", "prepend_bos": True, "sae_lens_training_version": None,
        "workbook": {**asdict(cfg), "input_scale": s,
                     "massive_rule": ({"threshold": float(sae.massive_threshold[0]),
                                  "offset": [float(v) for v in sae.massive_offset[0]]}
                                 if math.isfinite(float(sae.massive_threshold[0])) else None),
                     "decoder_unit_norm": bool(torch.allclose(sae.W_dec[0].norm(dim=-1), torch.ones(()), atol=1e-3)),
                     **(extra or {})},
    }
    path = Path(path)
    _check_sae_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "new")
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CFG).write_text(json.dumps(saelens_cfg, indent=1))
        _check_sae_folder(path)  # nothing else was put there while the files were written
        if path.exists():
            old = _sibling(path, "old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_sae_folder(path: Path) -> None:
    """Refuse a `path` that is a file, or a folder holding anything but an SAE's own files."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder: save_saelens writes an SAE's folder "
                              "there; choose another path")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in SAELENS_FILES)
        if others:
            raise FileExistsError(
                f"{path} holds files that are not an SAE's ({', '.join(others)}); save_saelens replaces the "
                f"folder it saves to, so it only writes to a new or empty folder or over an SAE (only "
                f"{', '.join(SAELENS_FILES)}): choose another folder, or move those files out")


def _sibling(path: Path, what: str) -> Path:
    """A name next to `path` that no other save uses (this process's id and a random part)."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


class SAELensFileError(ValueError):
    """SAELens files that cannot be loaded as they are: a missing or malformed field or tensor, a
    tensor of the wrong shape, non-finite weights, or a setting the workbook does not apply. The
    message names the file."""


# Config fields that change what a SAELens SAE computes and that the workbook does not apply.
# `normalize_activations`: the inputs are rescaled per token or by a factor kept outside the files;
# `hook_head_index`: the SAE reads one attention head's slice of the hook; `reshape_activations`:
# the SAE reads [heads, d_head] activations flattened.
_NO_NORMALIZATION = (None, "none", False)
_SCALING_TENSORS = ("finetuning_scaling_factor", "scaling_factor")


def _saelens_field(cfg: dict, name: str, *old_names: str, default=None):
    """A config field, top-level or (SAELens 6 files) in the `metadata` block, or under an older name."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for key in (name, *old_names):
        if key in cfg:
            return cfg[key]
        if key in meta:
            return meta[key]
    return default


def _read_saelens_cfg(cfg_path: Path) -> dict:
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAELensFileError(f"{cfg_path} is not a JSON config ({err})") from None
    if not isinstance(cfg, dict):
        raise SAELensFileError(f"{cfg_path} holds {type(cfg).__name__}, not a JSON object of config fields")
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise SAELensFileError(f"{cfg_path} has no {key!r} field: a SAELens config states d_in (the "
                                   "activation size) and d_sae (the number of latents)")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SAELensFileError(f"{cfg_path}: {key} must be a positive integer, not {value!r}")
    norm = cfg.get("normalize_activations")
    if norm not in _NO_NORMALIZATION:
        what = "expected_average_only_in" if norm is True else norm
        raise SAELensFileError(
            f"{cfg_path}: normalize_activations={what!r} is not supported: this SAE expects its inputs "
            "rescaled before encoding, which the workbook does not do. Fold the scaling into the weights "
            "first (SAELens: sae.fold_activation_norm_scaling_factor(factor) for a constant factor, then "
            "save with normalize_activations='none'), or use an SAE trained without it")
    head = _saelens_field(cfg, "hook_head_index", "hook_point_head_index")
    if head is not None:
        raise SAELensFileError(f"{cfg_path}: hook_head_index={head!r} is not supported: this SAE reads one "
                               "attention head's slice of its hook, and the workbook feeds SAEs the whole "
                               "activation")
    reshape = cfg.get("reshape_activations")
    if reshape not in (None, "none"):
        raise SAELensFileError(f"{cfg_path}: reshape_activations={reshape!r} is not supported: the workbook "
                               "feeds SAEs activations as its hooks give them, not reshaped")
    fn = _saelens_field(cfg, "activation_fn", "activation_fn_str")
    if fn not in (None, "relu", "topk"):
        raise SAELensFileError(f"{cfg_path}: activation function {fn!r} is not supported (supported: "
                               "'relu', 'topk')")
    if not isinstance(cfg.get("finetuning_scaling_factor", False), bool):
        raise SAELensFileError(f"{cfg_path}: finetuning_scaling_factor must be true or false, not "
                               f"{cfg['finetuning_scaling_factor']!r}")
    return cfg


def _read_saelens_tensors(weights_path: Path, d_in: int, d_sae: int, arch: "architectures.Architecture",
                          cfg: dict, own_tensors: dict) -> dict:
    """The file's tensors as float32, each checked for its shape (the architecture's own tensors:
    `own_tensors`, {name: shape}) and finite values; a finetuning scaling factor (SAELens multiplies
    the codes by it before decoding) folded into W_dec."""

    if not weights_path.exists():
        raise SAELensFileError(f"{weights_path} is missing: an SAE's folder holds {SAELENS_CFG} and "
                               f"{SAELENS_WEIGHTS}")
    try:
        tensors = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    except (SafetensorError, OSError) as err:
        raise SAELensFileError(f"{weights_path} is not a readable safetensors file ({err})") from None
    scaled = bool(cfg.get("finetuning_scaling_factor", False))
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              **own_tensors}
    if scaled:
        name = next((k for k in _SCALING_TENSORS if k in tensors), None)
        if name is None:
            raise SAELensFileError(f"{weights_path} has no finetuning_scaling_factor tensor, but "
                                   f"{SAELENS_CFG} sets finetuning_scaling_factor: true")
        shapes[name] = (d_sae,)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise SAELensFileError(f"{weights_path} has no {', '.join(missing)} tensor(s); a SAELens "
                               f"{arch.saelens_architecture!r} SAE needs {', '.join(shapes)}")
    unused = sorted(set(tensors) - set(shapes))
    unit_scale = [k for k in unused if k == "scaling_factor" and torch.equal(tensors[k], torch.ones_like(tensors[k]))]
    unused = [k for k in unused if k not in unit_scale]  # an all-ones scaling factor changes nothing
    if unused:
        raise SAELensFileError(f"{weights_path} holds tensors the workbook does not apply: {', '.join(unused)} "
                               f"(a SAELens {arch.saelens_architecture!r} SAE has {', '.join(shapes)})")
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != shape:
            raise SAELensFileError(f"{weights_path}: {k} has shape {list(tensors[k].shape)}, but d_in={d_in} "
                                   f"and d_sae={d_sae} in {SAELENS_CFG} make it {list(shape)}")
        bad = int((~torch.isfinite(tensors[k])).sum())
        if bad:
            raise SAELensFileError(f"{weights_path}: {k} holds {bad} non-finite value(s) (NaN or inf): "
                                   "the SAE is broken (a diverged or corrupted training run)")
    if scaled:
        factor = tensors.pop(name)
        tensors["W_dec"] = tensors["W_dec"] * factor.unsqueeze(-1)  # (c·s) W_dec = c (s·W_dec)
    return tensors


def load_saelens(path, recipe: str | None = None) -> SAEStack:
    """Load SAELens files (ours, or a SAELens standard, topk or jumprelu SAE) as a one-SAE stack.

    The architecture is the one our files record (``workbook.architecture``: a BatchTopK SAE is a
    SAELens "jumprelu" file); files from elsewhere are read as the architecture of their SAELens name.
    Every tensor's shape is checked against d_in and d_sae, weights must be finite, and a setting
    the workbook does not apply (normalize_activations, hook_head_index, reshape_activations, another
    activation function) is refused: SAELensFileError, naming the file. A finetuning scaling factor is
    folded into W_dec; ``apply_b_dec_to_input: false`` into b_enc.

    recipe: if given, the recipe the caller expects ("anthropic2023", its old name "paper", or
    "improved"); files of another recipe are refused with an error that says which (files from
    elsewhere count as "anthropic2023")."""
    path = Path(path)
    cfg_path, weights_path = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    if not cfg_path.exists():
        raise FileNotFoundError(f"no SAE at {path}: expected {SAELENS_CFG} and {SAELENS_WEIGHTS} (SAELens layout)")
    cfg = _read_saelens_cfg(cfg_path)
    ours = cfg.get("workbook") or {}
    if not isinstance(ours, dict):
        raise SAELensFileError(f"{cfg_path}: the 'workbook' field must be an object, not {ours!r}")
    theirs = normalise_recipe(ours.get("recipe", "anthropic2023"))
    recipe = None if recipe is None else normalise_recipe(recipe)
    if recipe is not None and recipe != theirs:
        raise SAELensFileError(f"{path} holds an SAE trained with the {theirs!r} recipe, not {recipe!r}: "
                               f"load it with recipe={theirs!r} (or None), or choose an SAE of the {recipe!r} recipe")
    theirs_arch = cfg.get("architecture", "standard")
    readable = sorted({a.saelens_architecture for a in architectures.ARCHITECTURES.values()})
    arch = ours.get("architecture") or theirs_arch
    if arch not in architectures.ARCHITECTURES or architectures.get(arch).saelens_architecture != theirs_arch:
        if ours.get("architecture"):
            raise SAELensFileError(f"{cfg_path}: SAELens architecture {theirs_arch!r} does not fit the "
                                   f"workbook's {arch!r} (saved as {architectures.get(arch).saelens_architecture!r})")
        raise SAELensFileError(f"{cfg_path}: SAELens architecture {theirs_arch!r} is not supported here "
                               f"(supported: {readable})")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    for key in ("d_in", "d_sae"):
        if key in ours and ours[key] != cfg[key]:
            raise SAELensFileError(f"{cfg_path}: {key}={cfg[key]} but the workbook block says {ours[key]}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0
    known = {f.name for f in fields(SAEConfig)}
    try:
        conf = SAEConfig(**{**{"d_in": d_in, "d_sae": d_sae, "architecture": arch, "k": int(k),
                               "hook_name": _saelens_field(cfg, "hook_name", "hook_point", default="") or "",
                               "model_name": _saelens_field(cfg, "model_name", default="") or ""},
                            **{k2: v for k2, v in ours.items() if k2 in known}, "tied": False, "recipe": theirs})
    except (TypeError, ValueError) as err:
        raise SAELensFileError(f"{cfg_path}: {err}") from None
    sae = SAEStack([conf])
    own = {k: tuple(v.shape) for k, v in conf.arch.saelens_tensors(sae).items()}
    tensors = _read_saelens_tensors(weights_path, d_in, d_sae, conf.arch, cfg, own)
    massive = ours.get("massive_rule")
    if massive is not None:
        try:
            offset = torch.tensor(massive["offset"], dtype=torch.float32)
            threshold = float(massive["threshold"])
        except (KeyError, TypeError, ValueError):
            raise SAELensFileError(f"{cfg_path}: workbook.massive_rule needs a threshold and an offset of "
                                   f"{d_in} numbers, not {massive!r}") from None
        if offset.shape != (d_in,) or not torch.isfinite(offset).all() or math.isnan(threshold):
            raise SAELensFileError(f"{cfg_path}: workbook.massive_rule's offset must be {d_in} finite numbers "
                                   f"(d_in) and its threshold a number")
    b_dec = tensors["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens without b_dec on the input: fold it into b_enc so that our formula matches.
        tensors["b_enc"] = tensors["b_enc"] + b_dec @ tensors["W_enc"]
    if not conf.training_recipe.centres_input:  # the encoder does not subtract b_dec: take it out of b_enc
        tensors["b_enc"] = tensors["b_enc"] - b_dec @ tensors["W_enc"]
    with torch.no_grad():
        sae.W_enc = nn.Parameter(tensors["W_enc"].T.unsqueeze(0).contiguous())
        sae.W_dec.copy_(tensors["W_dec"].unsqueeze(0))
        sae.b_enc.copy_(tensors["b_enc"].unsqueeze(0))
        sae.b_dec.copy_(b_dec.unsqueeze(0))
        if massive is not None:
            sae.massive_threshold.fill_(threshold)
            sae.massive_offset.copy_(offset.unsqueeze(0))
    sae.arch.load_state(sae, tensors)
    if "threshold" in own:  # the architecture must hold the file's threshold, latent by latent
        held = sae.arch.saelens_tensors(sae)["threshold"]
        # a threshold <= 0 gates nothing that the ReLU keeps: the same codes as a threshold of 0
        if not torch.allclose(held, tensors["threshold"].clamp_min(0), rtol=1e-5, atol=1e-6):
            raise SAELensFileError(f"{weights_path}: the file's threshold cannot be held by the workbook's "
                                   f"{arch!r} SAE (its threshold is one for all latents, or fixed)")
    return sae
