"""Sparse autoencoders: the paper's ReLU + L1 SAE (tied or untied) and TopK, stacked for sweeps.

The paper's SAE, for an activation x (d_in numbers) and a dictionary of d_sae directions::

    c  = ReLU(W_enc (x - b_dec) + b_enc)          codes, one per dictionary direction
    x̂  = W_dec c + b_dec                          reconstruction
    loss = ||x - x̂||² / d_in  +  α · Σ_i |c_i|    (rows of W_dec kept at unit norm)

``tied=True`` uses W_enc = W_decᵀ (the paper's residual-stream runs). ``architecture="topk"``
(Gao et al. 2024) keeps only the k largest pre-activations instead of paying an L1 penalty, with
the AuxK loss reviving dead latents.

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("standard", "topk")  # SAELens's names: "standard" is ReLU + L1


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

    def __post_init__(self):
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive (ratio R = d_sae/d_in > 0); got "
                             f"d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}: one of {ARCHITECTURES}")
        if not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise ValueError(f"the L1 coefficient α must be a finite number >= 0, not {self.l1_coefficient}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"topk needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")

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
        """SAEs with equal keys can share one stack."""
        return (self.d_in, self.d_sae, self.architecture, self.tied)

    @property
    def label(self) -> str:
        kind = f"α={self.l1_coefficient:g}" if self.architecture == "standard" else f"k={self.k}"
        return f"{'tied' if self.tied else 'untied'} {self.architecture} R={self.ratio:g} {kind}"


class SAEStack(nn.Module):
    """n SAEs with the same (d_in, d_sae, architecture, tied), as stacked parameters."""

    def __init__(self, configs: list[SAEConfig], seed: int = 0):
        super().__init__()
        if not configs or len({c.shape_key for c in configs}) != 1:
            raise ValueError("a stack needs one or more configs of the same shape and architecture")
        self.configs = list(configs)
        c0 = configs[0]
        n, d, m = len(configs), c0.d_in, c0.d_sae
        # Same seed -> same initial dictionary for every SAE of this shape, wherever it sits in a
        # sweep: a sweep trains exactly the SAEs that training each alone would.
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(m, d, generator=gen)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w.expand(n, m, d).clone())
        self.W_enc = None if c0.tied else nn.Parameter(w.T.expand(n, d, m).clone())
        self.b_enc = nn.Parameter(torch.zeros(n, m))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("l1", torch.tensor([c.l1_coefficient for c in configs]))
        self.register_buffer("k", torch.tensor([c.k for c in configs]))

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

    def __getitem__(self, i: int) -> "SAEStack":
        one = SAEStack([self.configs[i]])
        one.load_state_dict({k: v[i:i + 1].detach().clone() for k, v in self.state_dict().items()})
        return one.to(self.b_dec.device)

    def __len__(self) -> int:
        return self.n

    def encoder_weight(self) -> torch.Tensor:
        """[n, d_in, d_sae]."""
        return self.W_dec.transpose(1, 2) if self.tied else self.W_enc

    # ---- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have d_model={x.shape[-1]}, but this SAE has d_in={self.d_in} "
                             f"(trained on {self.configs[0].hook_name or 'another hook'}): use activations "
                             "of the hook and model it was trained for")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (shared) or [n, B, d_in] -> pre-activations [n, B, d_sae]."""
        self._check_input(x)
        xs = x * self.scale.view(-1, 1, 1) if x.dim() == 3 else x.unsqueeze(0) * self.scale.view(-1, 1, 1)
        w = self.encoder_weight()
        return torch.baddbmm(self.b_enc.unsqueeze(1), xs - self.b_dec.unsqueeze(1), w.to(xs.dtype))

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
        """Reconstruction [n, B, d_in] in the model's units."""
        out = torch.baddbmm(self.b_dec.unsqueeze(1), c, self.W_dec.to(c.dtype))
        return out / self.scale.view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_coefficient: float = 1 / 32):
        """Per-SAE training losses for a batch x [B, d_in]; returns a dict of [n] tensors.

        mse: ‖x̂ - x‖² / d_in in scaled units; l1: α·Σ|c|·‖W_dec row‖ (the rows are unit norm);
        aux (topk): AuxK loss on the residual, from the `dead` [n, d_sae] latents.
        """
        pre = self.pre_acts(x)
        c = self.activation(pre)
        xs = x.unsqueeze(0) * self.scale.view(-1, 1, 1)
        xhat = torch.baddbmm(self.b_dec.unsqueeze(1), c, self.W_dec.to(c.dtype))
        err = (xhat.float() - xs.float())
        mse = err.pow(2).sum(-1).mean(-1) / self.d_in
        out = {"mse": mse, "codes": c}
        if self.architecture == "standard":
            l1 = (c.float().abs() * self.W_dec.norm(dim=-1).unsqueeze(1)).sum(-1).mean(-1)
            out["l1"] = self.l1 * l1
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

    # ---- the unit-norm dictionary --------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out of W_dec's gradient the component that would change row norms."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            g -= (g * w).sum(-1, keepdim=True) * w / w.pow(2).sum(-1, keepdim=True)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

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
    w_enc = sae.encoder_weight()[0].detach().float() * s
    tensors = {
        "W_enc": w_enc.contiguous(),
        "W_dec": (sae.W_dec[0].detach().float() / s).contiguous(),
        "b_enc": sae.b_enc[0].detach().float().contiguous(),
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
        "workbook": {**asdict(cfg), "input_scale": s, **(extra or {})},
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


def load_saelens(path) -> SAEStack:
    """Load SAELens files (ours, or a SAELens standard/topk SAE) as a one-SAE stack."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / SAELENS_CFG).read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path / SAELENS_CFG}: SAELens architecture {arch!r} is not supported here "
                         f"(supported: {ARCHITECTURES})")
    tensors = load_file(str(path / SAELENS_WEIGHTS))
    ours = cfg.get("workbook") or {}
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0
    known = {f.name for f in fields(SAEConfig)}
    conf = SAEConfig(**{**{"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "architecture": arch, "k": int(k),
                           "hook_name": cfg.get("hook_name", ""), "model_name": cfg.get("model_name", "")},
                        **{k2: v for k2, v in ours.items() if k2 in known}, "tied": False})
    if tensors["W_enc"].shape != (conf.d_in, conf.d_sae) or tensors["W_dec"].shape != (conf.d_sae, conf.d_in):
        raise ValueError(f"{path}: weight shapes {tuple(tensors['W_enc'].shape)}/{tuple(tensors['W_dec'].shape)} "
                         f"do not match d_in={conf.d_in}, d_sae={conf.d_sae} in cfg.json")
    sae = SAEStack([conf])
    b_dec = tensors["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens without b_dec on the input: fold it into b_enc so that our formula matches.
        tensors["b_enc"] = tensors["b_enc"] + b_dec @ tensors["W_enc"]
    with torch.no_grad():
        sae.W_enc = nn.Parameter(tensors["W_enc"].unsqueeze(0).float())
        sae.W_dec.copy_(tensors["W_dec"].unsqueeze(0))
        sae.b_enc.copy_(tensors["b_enc"].unsqueeze(0))
        sae.b_dec.copy_(b_dec.unsqueeze(0))
    return sae
