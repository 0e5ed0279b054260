"""Sparse autoencoders: ReLU + L1 SAEs (tied or untied) and TopK, stacked for sweeps.

An L1 SAE, for an activation x (d_in numbers) and a dictionary of d_sae directions::

    c  = ReLU(W_enc (x - b_dec) + b_enc)          codes, one per dictionary direction
    x̂  = W_dec c + b_dec                          reconstruction
    loss = ||x - x̂||² / d_in  +  α · Σ_i |c_i|    (rows of W_dec kept at unit norm)

``tied=True`` uses W_enc = W_decᵀ (the seed paper's residual-stream runs were tied). ``architecture="topk"``
(Gao et al. 2024) keeps only the k largest pre-activations instead of paying an L1 penalty, with
the AuxK loss reviving dead latents.

Two recipes train a ReLU + L1 SAE (``SAEConfig.recipe``):

* ``"anthropic2023"`` (called ``"paper"`` before, a name still accepted when reading configs and
  files): Anthropic's 2023 recipe ("Towards Monosemanticity"), as above: a decoder bias b_dec,
  subtracted from the encoder's input and initialised at the data mean; unit-norm dictionary rows (the
  gradient component that would change a row's norm is removed and rows are renormalised after every
  step); dead latents resampled (helpers.train). **This is not the seed paper's own code**
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
  does (our loss is divided by d_in, so helpers.train clips at 1/d_in, which under Adam is the same
  clip); no resampling. At the end of training the norms are folded into the codes (W_dec rows to unit
  norm, encoder rows and bias scaled to match), which changes no reconstruction and makes the penalty
  a plain L1 again, so both recipes give SAEs of the same form.

Every SAE starts from its own random dictionary (`initial_dictionary`), seeded by the base seed and
the SAE's own config (`init_seed`): SAEs of one sweep start apart, and an SAE starts from the same
dictionary alone or in a sweep.

`losses` computes the training losses on a dense path (plain autograd, the reference) or a sparse
path (helpers.sparse: the decoder and all backward passes touch only the active latents); "auto"
takes the sparse path for TopK and, for L1, whenever a batch's codes are sparse enough.

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
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("standard", "topk")  # SAELens's names: "standard" is ReLU + L1
RECIPES = ("anthropic2023", "improved")  # how a standard SAE is trained (module docstring)
RECIPE_ALIASES = {"paper": "anthropic2023"}  # the name "anthropic2023" had before (old files, old code)
RECIPE_NAMES = {"anthropic2023": "Anthropic-2023 L1", "improved": "improved L1"}  # families in tables and plots
IMPROVED_INIT_NORM = 0.1              # decoder row norm at initialisation, improved recipe
SPARSE_MAX_DENSITY = 0.15             # "auto": L1 batches with more active codes than this share go dense
                                      # (measured on 2 CPU cores: the sparse path wins below about 20%)


@dataclass(frozen=True)
class SAEConfig:
    """One SAE. `l1_coefficient` is the paper's α (standard), `k` the TopK size (topk)."""

    d_in: int
    d_sae: int
    architecture: str = "standard"
    tied: bool = False
    l1_coefficient: float = 0.0
    k: int = 0
    hook_name: str = ""
    model_name: str = ""
    recipe: str = "anthropic2023"
    massive: bool = True  # apply the hook's massive-activation rule when training (helpers.massive)

    def __post_init__(self):
        object.__setattr__(self, "recipe", normalise_recipe(self.recipe))
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive (ratio R = d_sae/d_in > 0); got "
                             f"d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}: one of {ARCHITECTURES}")
        if not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise ValueError(f"the L1 coefficient α must be a finite number >= 0, not {self.l1_coefficient}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"topk needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: one of {RECIPES}")
        if self.recipe == "improved" and (self.architecture != "standard" or self.tied):
            raise ValueError("the improved recipe is for untied ReLU + L1 SAEs (architecture='standard', "
                             "tied=False); TopK SAEs train with their own recipe (recipe='anthropic2023')")

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
        return (self.d_in, self.d_sae, self.architecture, self.tied, self.recipe, self.hook_name, self.massive)

    @property
    def family(self) -> str:
        """"Anthropic-2023 L1", "improved L1" or "TopK": the three kinds of SAE the workbook compares
        (with " (no massive treatment)" for a control trained without helpers.massive's rule)."""
        base = "TopK" if self.architecture == "topk" else RECIPE_NAMES[self.recipe]
        return base if self.massive else f"{base} (no massive treatment)"

    @property
    def label(self) -> str:
        kind = f"α={self.l1_coefficient:g}" if self.architecture == "standard" else f"k={self.k}"
        tied = "tied " if self.tied else ""
        base = "TopK" if self.architecture == "topk" else RECIPE_NAMES[self.recipe]
        return f"{tied}{base} R={self.ratio:g} {kind}{'' if self.massive else ' (no massive treatment)'}"


def normalise_recipe(name: str) -> str:
    """A recipe's current name ("paper", its old name, is read as "anthropic2023")."""
    return RECIPE_ALIASES.get(name, name)


def init_seed(cfg: SAEConfig, seed: int = 0) -> int:
    """The seed of one SAE's initial dictionary: the base seed and the SAE's own config (everything
    but `massive`, so that the control trained without the massive treatment starts where its twin
    does). SAEs of one sweep start from different dictionaries, and an SAE starts from the same one
    whether it trains alone or in a sweep."""
    key = json.dumps({k: v for k, v in asdict(cfg).items() if k != "massive"}, sort_keys=True)
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def initial_dictionary(cfg: SAEConfig, seed: int = 0) -> torch.Tensor:
    """The decoder rows [d_sae, d_in] an SAE of this config starts from (SAEStack(..., seed)): random
    unit directions (norm IMPROVED_INIT_NORM for the improved recipe), from init_seed(cfg, seed)."""
    gen = torch.Generator().manual_seed(init_seed(cfg, seed))
    w = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
    w = w / w.norm(dim=-1, keepdim=True)
    return w * IMPROVED_INIT_NORM if cfg.recipe == "improved" else w


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
        # Massive activations (helpers.massive): tokens whose norm exceeds the threshold have the
        # offset removed before encoding and added back after decoding. Inert by default.
        self.register_buffer("massive_threshold", torch.full((n,), math.inf))
        self.register_buffer("massive_offset", torch.zeros(n, d))

    def set_massive(self, rule) -> None:
        """Give every SAE of the stack the massive-activation rule of its hook (helpers.massive)."""
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
    def unit_norm(self) -> bool:
        """Whether training keeps the dictionary rows at unit norm (all but the improved recipe)."""
        return self.recipe != "improved"

    @property
    def centres_input(self) -> bool:
        """Whether the encoder sees x - b_dec (Anthropic 2023, TopK) or x itself (the improved recipe,
        as in Anthropic's April 2024 update: f = ReLU(W_enc x + b_enc)). Files hold SAELens's form
        (b_dec subtracted): save_saelens and load_saelens convert b_enc."""
        return self.recipe != "improved"

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
        acts = torch.relu(pre)
        if self.architecture == "topk":
            kmax = int(self.k.max())
            vals, idx = acts.topk(kmax, dim=-1, sorted=True)
            keep = torch.arange(kmax, device=pre.device).view(1, 1, -1) < self.k.view(-1, 1, 1)
            acts = torch.zeros_like(acts).scatter(-1, idx, vals * keep)
        return acts

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

        mse: ‖x̂ - x‖² / d_in in scaled units; l1 (standard): l1_scale·α·Σ_i c_i‖W_dec,i‖ per token
        (the rows are unit norm in the anthropic2023 recipe); aux (topk): the AuxK loss on the residual, from
        the `dead` [n, d_sae] latents. Also l0 [n] and fired [n, d_sae] (latents active in the batch),
        detached, and path, the path taken.

        path: "dense" (plain autograd, the reference), "sparse" (helpers.sparse) or "auto" (sparse for
        TopK; for L1, each SAE of the stack on its own: sparse when at most SPARSE_MAX_DENSITY of its
        codes in the batch are active, else dense, so that an SAE takes the same path in a sweep as
        alone). Both paths give the same losses and gradients up to float rounding. The result's
        "path" is "dense", "sparse" or "mixed".
        """
        if path not in ("auto", "dense", "sparse"):
            raise ValueError(f"path must be 'auto', 'dense' or 'sparse', not {path!r}")
        if path == "dense":
            return self._dense_losses(x, dead, aux_coefficient, l1_scale)
        from . import sparse

        xs = self._scaled(x)
        xc = xs - self.b_dec.unsqueeze(1) if self.centres_input else xs
        n, B, d = xc.shape
        m = self.d_sae
        w_enc = self.encoder_weight()
        topk = self.architecture == "topk"
        dead = dead if topk and dead is not None and dead.any() else None
        max_nnz = SPARSE_MAX_DENSITY * B * m if (path == "auto" and not topk) else None  # per SAE
        pattern, vals, aux_sel, dense_rows = self._select_active(xc, w_enc, dead, max_nnz)
        if len(dense_rows) == n:  # every SAE's codes are still dense in this batch: the dense path is faster
            return self._dense_losses(x, dead, aux_coefficient, l1_scale)
        flat_enc, flat_dec = w_enc.reshape(n * m, d), self.W_dec.reshape(n * m, d)
        codes = sparse.encode_values(xc.reshape(n * B, d), flat_enc, self.b_enc.reshape(n * m), vals, pattern)
        xhat = sparse.decode(codes, flat_dec, pattern).view(n, B, d) + self.b_dec.unsqueeze(1)
        err = xhat.float() - xs.float()
        mse = err.pow(2).sum(-1).mean(-1) / self.d_in
        sae_of = pattern.rows // B
        on = vals > 0
        out = {"mse": mse, "path": "sparse",
               "l0": torch.bincount(sae_of[on], minlength=n).float() / B,
               "fired": (torch.bincount(pattern.cols[on], minlength=n * m) > 0).view(n, m)}
        if self.architecture == "standard":
            # Σ_i ‖W_dec,i‖ · (Σ_tokens c_i): each latent's codes are summed first (in a fixed order),
            # so no gradient is scattered back into the norms (a gather norms[cols] would, with float
            # atomics on a multi-threaded CPU: run-to-run differences). Codes are ReLUs, so |c| = c.
            per_latent = sparse.column_sums(codes, pattern).view(n, m)
            per_sae = (per_latent * self.W_dec.norm(dim=-1).float()).sum(-1)
            out["l1"] = l1_scale * self.l1 * per_sae / B
            out["loss"] = mse + out["l1"]
            if dense_rows:  # the SAEs whose codes are still dense take the dense path, each as if alone
                dense = self._dense_losses(x, None, aux_coefficient, l1_scale, rows=dense_rows)
                sel = torch.tensor(dense_rows, device=x.device)
                for key in ("mse", "l1", "loss", "l0"):
                    out[key] = out[key].index_put((sel,), dense[key])
                out["fired"] = out["fired"].index_put((sel,), dense["fired"])
                out["path"] = "mixed"
            return out
        aux = torch.zeros_like(mse)
        if aux_sel is not None:
            a_pattern, a_vals = aux_sel
            a_codes = sparse.encode_values(xc.reshape(n * B, d), flat_enc, self.b_enc.reshape(n * m), a_vals, a_pattern)
            e_hat = sparse.decode(a_codes, flat_dec, a_pattern).view(n, B, d).float()
            aux = (e_hat + err.detach()).pow(2).sum(-1).mean(-1) / self.d_in  # e_hat should equal -err
            aux = torch.where(dead.any(-1), aux, torch.zeros_like(aux))
        out["aux"] = aux_coefficient * aux
        out["loss"] = mse + out["aux"]
        return out

    _BLOCK_BYTES = 8 << 20  # pre-activations computed a block of rows at a time (CPU), this many bytes

    @torch.no_grad()
    def _select_active(self, xc: torch.Tensor, w_enc: torch.Tensor, dead: torch.Tensor | None, max_nnz):
        """The active (row, latent) pairs of a batch and their codes, from the dense pre-activations
        computed a block of rows at a time, so that the whole [n, B, d_sae] matrix is never held (on a
        CPU, big fresh allocations cost page faults and cache misses that a block re-used from the
        allocator does not). Rows are flattened as s·B + b and latents as s·d_sae + j.

        Returns (pattern, codes [nnz], aux, dense_rows): aux is the AuxK pairs (pattern, codes) of the
        `dead` latents for TopK (else None); dense_rows lists the L1 SAEs with more than max_nnz active
        codes in the batch (their pairs are left out: they take the dense path)."""
        from . import sparse

        n, B, _ = xc.shape
        m = self.d_sae
        rows = max(1, min(B, self._BLOCK_BYTES // (4 * m))) if sparse.use_cpu_kernels(xc) else B
        topk = self.architecture == "topk"
        parts, dense_rows = [], []
        if topk:
            kmax = int(self.k.max())
            vals = torch.empty(n, B, kmax, device=xc.device)
            idx = torch.empty(n, B, kmax, dtype=torch.int64, device=xc.device)
            k_aux = 0 if dead is None else min(self.d_in // 2, m, int(dead.sum(-1).max()))
            if k_aux:
                a_vals = torch.empty(n, B, k_aux, device=xc.device)
                a_idx = torch.empty(n, B, k_aux, dtype=torch.int64, device=xc.device)
        for s in range(n):
            wt = w_enc[s].T.to(xc.dtype)
            mine, total = [], 0
            for b0 in range(0, B, rows):
                b1 = min(B, b0 + rows)
                pre = torch.addmm(self.b_enc[s], xc[s, b0:b1], wt)
                if topk:
                    v, i = pre.topk(kmax, dim=-1, sorted=True)
                    vals[s, b0:b1], idx[s, b0:b1] = v, i
                    if k_aux:
                        dp = torch.where(dead[s], torch.relu(pre), torch.zeros_like(pre))
                        v, i = dp.topk(k_aux, dim=-1)
                        a_vals[s, b0:b1], a_idx[s, b0:b1] = v, i
                    continue
                flat = (pre > 0).view(-1).nonzero().squeeze(1)  # row-major, so sorted by row
                total += len(flat)
                if max_nnz is not None and total > max_nnz:
                    dense_rows.append(s)
                    break
                mine.append((s * B + b0 + flat // m, s * m + flat % m, pre.view(-1)[flat].float()))
            else:
                parts += mine
        offsets = (torch.arange(n, device=xc.device) * m).view(n, 1, 1)
        if not topk:
            if not parts:
                return None, None, None, dense_rows
            r, c, v = (torch.cat(t) for t in zip(*parts))
            return sparse.Pattern.from_pairs(r, c, n * B, n * m), v, None, dense_rows
        keep = torch.arange(kmax, device=xc.device).view(1, 1, -1) < self.k.view(-1, 1, 1)
        main = (sparse.Pattern.from_topk((idx + offsets).reshape(n * B, kmax), n * m),
                (torch.relu(vals) * keep).reshape(-1))
        aux = None
        if k_aux:
            aux = (sparse.Pattern.from_topk((a_idx + offsets).reshape(n * B, k_aux), n * m), a_vals.reshape(-1))
        return (*main, aux, [])

    def _dense_losses(self, x, dead, aux_coefficient, l1_scale, rows: list[int] | None = None) -> dict:
        """The losses by plain autograd, for every SAE of the stack or (`rows`, L1 only) for some."""
        if rows is not None:
            return self._rows_dense_l1(x, rows, l1_scale)
        pre = self.pre_acts(x)
        c = self.activation(pre)
        out, err = self._decode_losses(c, self._scaled(x), self.b_dec, self.W_dec)
        out["path"] = "dense"
        mse = out["mse"]
        if self.architecture == "standard":
            out["l1"] = l1_scale * self.l1 * self._l1_penalty(c, self.W_dec)
            out["loss"] = mse + out["l1"]
        else:
            aux = torch.zeros_like(mse)
            if dead is not None and dead.any():
                k_aux = min(self.d_in // 2, self.d_sae)  # fixed, so SAEs in a stack stay independent
                dead_pre = torch.where(dead.unsqueeze(1), torch.relu(pre), torch.zeros_like(pre))
                vals, idx = dead_pre.topk(k_aux, dim=-1)
                c_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
                e_hat = torch.bmm(c_aux, self.W_dec.to(c_aux.dtype)).float()
                resid = -err.detach()  # what the live latents failed to reconstruct
                aux = (e_hat - resid).pow(2).sum(-1).mean(-1) / self.d_in
                aux = torch.where(dead.any(-1), aux, torch.zeros_like(aux))
            out["aux"] = aux_coefficient * aux
            out["loss"] = mse + out["aux"]
        return out

    def _rows_dense_l1(self, x, rows: list[int], l1_scale) -> dict:
        """Dense-path L1 losses of some SAEs of the stack (the same computation each would do alone)."""
        idx = torch.tensor(rows, device=x.device)
        # index_select, not t[idx]: its backward is an index_add_, not an index_put_ with float atomics
        xs = self._scaled(x).index_select(0, idx)
        w_enc, w_dec = self.encoder_weight().index_select(0, idx), self.W_dec.index_select(0, idx)
        b_enc, b_dec = self.b_enc.index_select(0, idx), self.b_dec.index_select(0, idx)
        xc = xs - b_dec.unsqueeze(1) if self.centres_input else xs
        c = torch.relu(torch.baddbmm(b_enc.unsqueeze(1), xc, w_enc.transpose(1, 2).to(xs.dtype)))
        out, _ = self._decode_losses(c, xs, b_dec, w_dec)
        out["l1"] = l1_scale * self.l1[idx] * self._l1_penalty(c, w_dec)
        out["loss"] = out["mse"] + out["l1"]
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
        from . import sparse

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


def save_saelens(sae: SAEStack, path, extra: dict | None = None) -> Path:
    """Save a one-SAE stack as SAELens files (the input scale folded into the weights)."""
    from safetensors.torch import save_file

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
    }
    saelens_cfg = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "dtype": "float32", "device": "cpu", "model_name": cfg.model_name, "hook_name": cfg.hook_name,
        "hook_layer": int(cfg.hook_name.split(".")[1]) if cfg.hook_name.startswith("blocks.") else 0,
        "hook_head_index": None, "activation_fn_str": "topk" if cfg.architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.architecture == "topk" else {},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "normalize_activations": "none",
        "context_size": None, "dataset_path": "", "prepend_bos": True, "sae_lens_training_version": None,
        "k": cfg.k if cfg.architecture == "topk" else None,
        "workbook": {**asdict(cfg), "input_scale": s,
                     "massive_rule": ({"threshold": float(sae.massive_threshold[0]),
                                  "offset": [float(v) for v in sae.massive_offset[0]]}
                                 if math.isfinite(float(sae.massive_threshold[0])) else None),
                     "decoder_unit_norm": bool(torch.allclose(sae.W_dec[0].norm(dim=-1), torch.ones(()), atol=1e-3)),
                     **(extra or {})},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / SAELENS_WEIGHTS))
    (tmp / SAELENS_CFG).write_text(json.dumps(saelens_cfg, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_saelens(path, recipe: str | None = None) -> SAEStack:
    """Load SAELens files (ours, or a SAELens standard/topk SAE) as a one-SAE stack.

    recipe: if given, the recipe the caller expects ("anthropic2023", its old name "paper", or
    "improved"); files of another recipe are refused with an error that says which (files from
    elsewhere count as "anthropic2023")."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / SAELENS_CFG).exists():
        raise FileNotFoundError(f"no SAE at {path}: expected {SAELENS_CFG} and {SAELENS_WEIGHTS} (SAELens layout)")
    cfg = json.loads((path / SAELENS_CFG).read_text())
    theirs = normalise_recipe((cfg.get("workbook") or {}).get("recipe", "anthropic2023"))
    recipe = None if recipe is None else normalise_recipe(recipe)
    if recipe is not None and recipe != theirs:
        raise ValueError(f"{path} holds an SAE trained with the {theirs!r} recipe, not {recipe!r}: "
                         f"load it with recipe={theirs!r} (or None), or choose an SAE of the {recipe!r} recipe")
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path / SAELENS_CFG}: SAELens architecture {arch!r} is not supported here "
                         f"(supported: {ARCHITECTURES})")
    tensors = load_file(str(path / SAELENS_WEIGHTS))
    ours = cfg.get("workbook") or {}
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0
    known = {f.name for f in fields(SAEConfig)}
    massive = ours.get("massive_rule")
    conf = SAEConfig(**{**{"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "architecture": arch, "k": int(k),
                           "hook_name": cfg.get("hook_name", ""), "model_name": cfg.get("model_name", "")},
                        **{k2: v for k2, v in ours.items() if k2 in known}, "tied": False, "recipe": theirs})
    if tensors["W_enc"].shape != (conf.d_in, conf.d_sae) or tensors["W_dec"].shape != (conf.d_sae, conf.d_in):
        raise ValueError(f"{path}: weight shapes {tuple(tensors['W_enc'].shape)}/{tuple(tensors['W_dec'].shape)} "
                         f"do not match d_in={conf.d_in}, d_sae={conf.d_sae} in cfg.json")
    sae = SAEStack([conf])
    b_dec = tensors["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens without b_dec on the input: fold it into b_enc so that our formula matches.
        tensors["b_enc"] = tensors["b_enc"] + b_dec @ tensors["W_enc"]
    if theirs == "improved":  # our improved encoder does not subtract b_dec: take it out of b_enc
        tensors["b_enc"] = tensors["b_enc"] - b_dec @ tensors["W_enc"]
    with torch.no_grad():
        sae.W_enc = nn.Parameter(tensors["W_enc"].T.unsqueeze(0).float().contiguous())
        sae.W_dec.copy_(tensors["W_dec"].unsqueeze(0))
        sae.b_enc.copy_(tensors["b_enc"].unsqueeze(0))
        sae.b_dec.copy_(b_dec.unsqueeze(0))
        if massive:
            sae.massive_threshold.fill_(massive["threshold"])
            sae.massive_offset.copy_(torch.tensor(massive["offset"]).unsqueeze(0))
    return sae
