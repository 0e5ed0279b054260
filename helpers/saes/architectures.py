"""The SAE architectures: one object each, behind a registry keyed by `SAEConfig.architecture`.

`helpers.saes.stack.SAEStack` holds the parameters every architecture shares (encoder, decoder, biases, the
input scale, the massive-activation rule) and asks the stack's architecture, `get(name)`, for
everything that differs:

* `validate(cfg)`: what a config of this architecture must satisfy (TopK: 0 < k <= d_sae);
* `own_state(configs, d_in, d_sae)`: its own per-SAE tensors, which the stack holds (an
  `nn.Parameter` is trained, any other tensor is a buffer: JumpReLU's log-thresholds, BatchTopK's
  inference threshold); `state(stack, idx)`: the per-SAE tensors its formulas read (those, W_dec,
  l1, k, and anything derived from them);
* `codes(pre, p)`: the codes of pre-activations [n, B, m] at inference, and `train_codes(pre, p)`,
  the codes training reconstructs from (different for BatchTopK: the batch's top k·B);
* `dense_terms(ctx)` / `sparse_terms(ctx)`: its loss terms besides the MSE (L1, AuxK, JumpReLU's L0,
  Matryoshka's nested MSEs), on the dense path (plain autograd, ctx a `DenseContext`) and on the
  sparse one (helpers.saes.sparse, ctx a `SparseContext`); `loss_terms` names those that are added
  to the loss, any other key is a metric;
* `selector(stack, B, max_nnz)`: the active set of the sparse path, a block of pre-activations at a
  time (SAEStack._select_active), and `sparse_codes(...)`: gradients the sparse kernels do not give
  (a threshold's); `sparse_path`: whether the sparse path applies at all (an architecture that
  changes `codes` without giving its `selector` trains on the dense path only);
* `after_step(stack, out)`: state updated after an optimiser step (BatchTopK's running threshold);
* `uses_auxk`: whether training passes the dead latents (the AuxK loss); `resamples`: whether
  Anthropic-style resampling applies (helpers.saes.train); `fixed_sparsity`: whether "auto" always takes
  the sparse path (a fixed k) or decides per batch from the codes' density (L1, JumpReLU);
* `saelens_fields(cfg)` / `saelens_tensors(stack)` and `load_state(stack, tensors)`: the SAELens file
  (architecture name, activation function and its kwargs, extra tensors such as `threshold`);
* `family(cfg)` and `setting` (the SAEConfig field a sweep varies, shown as `symbol` in labels):
  names for tables and plots; `default_setting(target_l0, i)`: a setting aimed at an L0 (the
  ground-truth lab, the benchmarks); a profile's ``grid`` names the architecture and the settings
  the sweep trains (helpers.settings.profiles); `l1` marks the ReLU + L1 SAEs the
  sweep's rule chooses among, and `matched_comparison` the architecture later notebooks compare at
  matched sparsity (TopK).

A `Recipe` says how an SAE is trained besides its architecture: whether the decoder rows are kept
at unit norm, whether the encoder sees x − b_dec, the decoder's initial row norm, α's warm-up, the
per-SAE gradient clip, resampling, folding the norms at the end. `RECIPES` holds them by name (the
name is what configs, profiles and SAELens files store), `recipe(name)` finds one (old names too).

Architectures (all with unit-norm decoder rows, the anthropic2023 recipe; only "standard" has the
improved recipe):

* ``standard``: ReLU + L1 (helpers.saes.stack's docstring has both recipes).
* ``topk`` (Gao et al. 2024): the k largest pre-activations of each token, AuxK for dead latents.
* ``batchtopk`` (Bussmann et al. 2024): in training the k·B largest pre-activations of the whole
  batch (per SAE), so tokens share a budget of k per token on average; AuxK as TopK. At inference a
  single threshold θ: codes = ReLU(pre)·[pre > θ] (a JumpReLU with one threshold), θ being a running
  average (rate `THRESHOLD_RATE`, 0.01 as in SAELens; started at the first batch's value) of the
  smallest code kept in each training batch, as SAELens and dictionary_learning estimate it. Saved as
  a SAELens "jumprelu" SAE whose `threshold` is θ for every latent.
* ``jumprelu`` (Rajamanoharan et al. 2024): codes = pre·H(pre − θ_i), a learnable threshold per latent
  stored as log θ_i. The loss is MSE + λ·E[Σ_i H(pre_i − θ_i)], the paper's L0 penalty ("step" in
  SAELens; not Anthropic's tanh penalty, which penalises code sizes and so is not an L0: we follow the
  paper, whose sparsity knob then means the same thing as TopK's k). H has no gradient, so both
  terms reach θ through the paper's straight-through estimators with a rectangle kernel
  K(u) = [|u| < 1/2] of bandwidth ε: ∂H(pre−θ)/∂θ = −K((pre−θ)/ε)/ε and ∂(pre·H)/∂θ = −(θ/ε)K(·);
  the encoder sees the gradient of pre·H only where the code is active (the paper's choice and
  SAELens's default, `jumprelu_ste_to_input=False`), so the penalty moves thresholds only. ε and the
  initial θ are given (`jumprelu_bandwidth`, `jumprelu_init_threshold`) in the paper's units, where
  E‖x‖² = 1; our inputs are scaled to E‖x‖ = √d_in, so both are multiplied by √d_in. ε = 0.001 is the
  paper's. θ starts at 0.04 (about one standard deviation of an initial pre-activation: a sixth of
  the latents fire), not at the paper's 0.001: a log-threshold moves by a factor of at most about
  e^lr per Adam step, so from 0.001 it could not reach the needed values in the cpu profile's ~1,200
  steps. Saved as a SAELens "jumprelu" SAE with `threshold` = θ.
* ``matryoshka_batchtopk`` (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose loss adds the
  reconstruction MSE of every nested prefix of the dictionary (latents [0, w) for each width w of
  `matryoshka_widths` but the last, which is the whole dictionary and already the MSE), so early
  latents must reconstruct on their own. Widths default to doubling groups: d_sae/16, /8, /4, /2, 1.
  Saved like BatchTopK.

Adding an architecture: subclass `Architecture` (or one of these) with a `name`, and implement the
methods above that differ: defining the class registers it in `ARCHITECTURES` (`get(name)`), and
the SAE stack, the trainer, the sweep and the SAELens files take it from there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from helpers.saes import sparse

THRESHOLD_RATE = 0.01  # BatchTopK: the running threshold's update rate (SAELens's topk_threshold_lr)


# ---- the sparse path's active set ---------------------------------------------------------------
@dataclass
class Selection:
    """A batch's active (row, latent) pairs, rows flattened as s·B + b and latents as s·m + j:
    `pattern` (helpers.saes.sparse.Pattern), `vals` [nnz] the codes there (no gradient), `pre` [nnz] the
    pre-activations there; `dense_rows`, the SAEs left to the dense path; `aux`, AuxK's pairs
    (pattern, codes) or None."""

    pattern: object
    vals: torch.Tensor
    pre: torch.Tensor
    dense_rows: list = field(default_factory=list)
    aux: tuple | None = None


@dataclass(kw_only=True)
class LossContext:
    """What an architecture's loss terms receive, for n SAEs of a batch of B rows: `stack`, `p` (its
    `state`), `err` x̂ − x [n, B, d] (scaled units), `xs` the scaled input [n, B, d], `b_dec` [n, d],
    `dead` [n, m] bool or None (AuxK), `aux_coefficient`, `l1_scale` (the L1 warm-up factor)."""

    stack: object
    p: dict
    n: int
    B: int
    err: torch.Tensor
    xs: torch.Tensor
    b_dec: torch.Tensor
    dead: torch.Tensor | None = None
    aux_coefficient: float = 1 / 32
    l1_scale: float = 1.0


@dataclass(kw_only=True)
class DenseContext(LossContext):
    """`dense_terms`' context (all of the stack's SAEs, or those that took the dense path): also `c` the
    train codes [n, B, m] and `pre` the pre-activations [n, B, m]."""

    c: torch.Tensor
    pre: torch.Tensor


@dataclass(kw_only=True)
class SparseContext(LossContext):
    """`sparse_terms`' context, m latents: also `codes` [nnz] the active codes (with gradients),
    `pattern` their helpers.saes.sparse.Pattern, `sel` the Selection, `xc` the flat centred input
    [n·B, d], `flat_enc` / `flat_dec` [n·m, d], `flat_b_enc` [n·m]."""

    m: int
    codes: torch.Tensor
    pattern: object
    sel: Selection
    xc: torch.Tensor
    flat_enc: torch.Tensor
    flat_dec: torch.Tensor
    flat_b_enc: torch.Tensor


# ---- the training recipes ------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How an SAE is trained besides its architecture (helpers.saes.stack's docstring has both):
    `name` (what configs, profiles and files store; `aliases`: names it had before), `family_name`
    (tables and plots), `unit_norm` (decoder rows kept at unit norm: gradients projected, rows
    renormalised after every step), `centres_input` (the encoder sees x − b_dec, b_dec started at
    the data mean), `init_norm` (the decoder rows' norm at initialisation), `tied_ok` (a tied decoder
    is allowed), `l1_warmup` (α rises from 0 over the first steps), `grad_clip` (gradients clipped per
    SAE), `resamples` (dead latents resampled, for architectures that resample), `folds_norms`
    (decoder norms folded into the codes when training ends)."""

    name: str
    family_name: str
    unit_norm: bool = True
    centres_input: bool = True
    init_norm: float = 1.0
    tied_ok: bool = True
    l1_warmup: bool = False
    grad_clip: bool = False
    resamples: bool = True
    folds_norms: bool = False
    aliases: tuple = ()

    def __str__(self) -> str:
        return self.name


ANTHROPIC2023 = Recipe("anthropic2023", "Anthropic-2023 L1", aliases=("paper",))
IMPROVED = Recipe("improved", "improved L1", unit_norm=False, centres_input=False, init_norm=0.1, tied_ok=False,
                  l1_warmup=True, grad_clip=True, resamples=False, folds_norms=True)
RECIPES: dict[str, Recipe] = {r.name: r for r in (ANTHROPIC2023, IMPROVED)}


def recipe(name) -> Recipe:
    """The recipe called `name` (or one of its old names; a Recipe is returned as it is); a ValueError
    naming the known ones."""
    if isinstance(name, Recipe):
        return name
    for r in RECIPES.values():
        if name == r.name or name in r.aliases:
            return r
    raise ValueError(f"unknown recipe {name!r}: one of {tuple(RECIPES)}")


class _Elementwise:
    """Every pair whose pre-activation exceeds a per-SAE, per-latent lower bound `low` [n, m] (0 for
    ReLU); an SAE whose pairs exceed max_nnz in the batch is left to the dense path."""

    def __init__(self, stack, B, max_nnz, low, value):
        self.B, self.m, self.max_nnz, self.low, self.value = B, stack.d_sae, max_nnz, low, value
        self.parts, self.dense_rows = [], []

    def start(self, s):
        self.mine, self.total = [], 0

    def block(self, s, b0, pre) -> bool:
        flat = (pre > self.low[s]).view(-1).nonzero().squeeze(1)  # row-major, so sorted by row
        self.total += len(flat)
        if self.max_nnz is not None and self.total > self.max_nnz:
            self.dense_rows.append(s)
            return False
        self.mine.append((s * self.B + b0 + flat // self.m, s * self.m + flat % self.m, pre.view(-1)[flat].float()))
        return True

    def end(self, s):
        if s not in self.dense_rows:
            self.parts += self.mine

    def result(self, n, device) -> Selection | None:
        if not self.parts:
            return Selection(None, None, None, self.dense_rows)
        r, c, v = (torch.cat(t) for t in zip(*self.parts))
        return Selection(sparse.Pattern.from_pairs(r, c, n * self.B, n * self.m), self.value(v, c), v, self.dense_rows)


class _RowTopK:
    """The k_s largest pre-activations of every row (TopK), codes ReLU'd."""

    def __init__(self, stack, B, max_nnz):
        n, self.k, dev = stack.n, stack.k, stack.b_dec.device
        self.kmax = int(self.k.max())
        self.vals = torch.empty(n, B, self.kmax, device=dev)
        self.idx = torch.empty(n, B, self.kmax, dtype=torch.int64, device=dev)
        self.m = stack.d_sae

    def start(self, s):
        pass

    def block(self, s, b0, pre) -> bool:
        v, i = pre.topk(self.kmax, dim=-1, sorted=True)
        self.vals[s, b0:b0 + len(pre)], self.idx[s, b0:b0 + len(pre)] = v, i
        return True

    def end(self, s):
        pass

    def result(self, n, device) -> Selection:
        B = self.vals.shape[1]
        offsets = (torch.arange(n, device=device) * self.m).view(n, 1, 1)
        keep = torch.arange(self.kmax, device=device).view(1, 1, -1) < self.k.view(-1, 1, 1)
        pattern = sparse.Pattern.from_topk((self.idx + offsets).reshape(n * B, self.kmax), n * self.m)
        return Selection(pattern, (torch.relu(self.vals) * keep).reshape(-1), self.vals.reshape(-1))


class _BatchTopK:
    """The k_s·B largest pre-activations of SAE s over the whole batch: each block keeps its own top
    k_s·B as candidates (the batch's top k_s·B are among them), merged when the SAE is done."""

    def __init__(self, stack, B, max_nnz):
        self.B, self.m, self.k = B, stack.d_sae, stack.k
        self.parts = []

    def start(self, s):
        self.cv, self.ci, self.kb = [], [], int(self.k[s]) * self.B

    def block(self, s, b0, pre) -> bool:
        v, i = pre.reshape(-1).topk(min(self.kb, pre.numel()), sorted=False)
        self.cv.append(v.float())
        self.ci.append(i + b0 * self.m)
        return True

    def end(self, s):
        v, i = torch.cat(self.cv), torch.cat(self.ci)
        top = v.topk(self.kb, sorted=False).indices
        v, i = v[top], i[top]
        order = i.argsort()  # by flat index: by row, as the pattern needs
        v, i = v[order], i[order]
        self.parts.append((s * self.B + i // self.m, s * self.m + i % self.m, v))

    def result(self, n, device) -> Selection:
        r, c, v = (torch.cat(t) for t in zip(*self.parts))
        return Selection(sparse.Pattern.from_pairs(r, c, n * self.B, n * self.m), torch.relu(v), v)


# ---- autograd functions of the dense JumpReLU path ---------------------------------------------
def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre·H(pre − θ); gradients: H to pre, −(θ/ε)K((pre−θ)/ε) to θ (summed over the batch)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta, eps = ctx.saved_tensors
        g_pre = grad * (pre > theta).to(grad.dtype)
        k = _rectangle((pre.float() - theta) / eps) / eps
        g_theta = -(theta * k * grad.float()).sum(1, keepdim=True)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    """H(pre − θ); gradient −K((pre−θ)/ε)/ε to θ only (summed over the batch)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return (pre > theta).float()

    @staticmethod
    def backward(ctx, grad):
        pre, theta, eps = ctx.saved_tensors
        k = _rectangle((pre.float() - theta) / eps) / eps
        return None, -(k * grad).sum(1, keepdim=True), None


# ---- the architectures -------------------------------------------------------------------------
ARCHITECTURES: dict[str, "Architecture"] = {}  # by name, in the order they were defined


def register(arch: "Architecture") -> "Architecture":
    """Put `arch` in ARCHITECTURES under its name (Architecture subclasses that set a name are
    registered as they are defined). A name held by another class is refused; the same class defined
    again (a re-imported module) replaces its entry."""
    held = ARCHITECTURES.get(arch.name)
    if held is not None and (type(held).__module__, type(held).__qualname__) != (type(arch).__module__,
                                                                                  type(arch).__qualname__):
        raise ValueError(f"architecture name {arch.name!r} is taken by {type(held).__qualname__}: choose another")
    ARCHITECTURES[arch.name] = arch
    return arch


def unregister(name: str) -> None:
    """Take an architecture out of ARCHITECTURES (a test's toy architecture, when the test is done)."""
    ARCHITECTURES.pop(name, None)


class Architecture:
    """The base: a ReLU SAE with no penalty. Subclasses override what differs (module docstring);
    a subclass that sets `name` is registered in ARCHITECTURES as it is defined (one instance each)."""

    name = ""
    family_name = ""
    setting = ""                  # the SAEConfig field a sweep varies
    symbol = ""                   # ... as written in labels
    loss_terms: tuple = ()        # keys of dense_terms/sparse_terms added to the loss
    uses_auxk = False
    resamples = False
    fixed_sparsity = False
    sparse_path = True            # whether helpers.saes.sparse's path applies (else dense only)
    l1 = False
    matched_comparison = False
    saelens_architecture = "standard"
    recipes = ("anthropic2023",)  # the recipes (Recipe, RECIPES) this architecture trains with

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        own = vars(cls)
        # codes changed but no selector for them: the sparse path's ReLU pairs would be wrong
        if ("codes" in own or "train_codes" in own) and "selector" not in own and "sparse_path" not in own:
            cls.sparse_path = False
        if own.get("name"):
            register(cls())

    # ---- configs, names ----
    def validate(self, cfg) -> None:
        if cfg.recipe not in self.recipes:
            raise ValueError(f"the {cfg.recipe} recipe is for untied ReLU + L1 SAEs (architecture='standard', "
                             f"tied=False); {self.family_name} SAEs train with recipe='anthropic2023'")
        if cfg.tied and not recipe(cfg.recipe).tied_ok:
            raise ValueError(f"the {cfg.recipe} recipe is for untied ReLU + L1 SAEs (architecture='standard', "
                             "tied=False)")

    def family(self, cfg) -> str:
        return self.family_name

    def setting_label(self, cfg) -> str:
        return f"{self.symbol}={getattr(cfg, self.setting):g}"

    def shape_fields(self, cfg) -> tuple:
        """Config fields that SAEs of one stack must share besides their shape (helpers.saes.stack.shape_key)."""
        return ()

    def default_setting(self, target_l0: float, i: int = 0) -> dict:
        """A setting of `self.setting` aimed at about target_l0 active latents (the ground-truth lab,
        benchmarks.bench; the i-th of a few distinct SAEs)."""
        return {}

    # ---- state ----
    def own_state(self, configs: list, d_in: int, d_sae: int) -> dict:
        """This architecture's own tensors for a stack of these configs, [n, ...] each, by name: the
        stack holds each as an attribute, an `nn.Parameter` trained with the rest, any other tensor
        a buffer (saved in its state_dict)."""
        return {}

    def state(self, stack, idx: torch.Tensor | None = None) -> dict:
        """The per-SAE tensors the formulas read, for all SAEs of the stack or those in idx: W_dec,
        l1, k and the architecture's own (`own_state`)."""
        def pick(t):
            return t if idx is None else t.index_select(0, idx)
        return {"W_dec": pick(stack.W_dec), "l1": pick(stack.l1), "k": pick(stack.k),
                **{key: pick(getattr(stack, key)) for key in stack.own_state_names}}

    # ---- codes and losses ----
    def codes(self, pre: torch.Tensor, p: dict) -> torch.Tensor:
        """Codes [n, B, m] of pre-activations [n, B, m] at inference (differentiable where training
        uses them), `p` from `state`."""
        return torch.relu(pre)

    def train_codes(self, pre: torch.Tensor, p: dict) -> torch.Tensor:
        """The codes the training losses reconstruct from (dense path)."""
        return self.codes(pre, p)

    def dense_terms(self, ctx: DenseContext) -> dict:
        """Loss terms and metrics, [n] each, on the dense path."""
        return {}

    def selector(self, stack, B: int, max_nnz):
        """The sparse path's active set: an object with start(s), block(s, b0, pre) -> False when SAE s
        goes dense, end(s), result(n, device) -> Selection (see _Elementwise, _RowTopK, _BatchTopK)."""
        zero = torch.zeros(stack.n, stack.d_sae, device=stack.b_dec.device)
        return _Elementwise(stack, B, max_nnz, zero, lambda v, cols: v)

    def sparse_codes(self, codes, sel: Selection, p: dict, stack):
        """The active codes [nnz] from helpers.saes.sparse.encode_values, with any gradient the kernels do
        not carry (JumpReLU: its thresholds')."""
        return codes

    def sparse_terms(self, ctx: SparseContext) -> dict:
        """As dense_terms, on the sparse path."""
        return {}

    @torch.no_grad()
    def after_step(self, stack, out: dict) -> None:
        """Update state after an optimiser step, from the step's losses `out`."""

    # ---- SAELens files ----
    def saelens_fields(self, cfg) -> dict:
        return {"architecture": self.saelens_architecture, "activation_fn_str": "relu",
                "activation_fn_kwargs": {}, "k": None}

    def saelens_tensors(self, stack) -> dict:
        return {}

    def load_state(self, stack, tensors: dict) -> None:
        """Set this architecture's own state of a one-SAE stack from a SAELens file's tensors."""


class Standard(Architecture):
    name, family_name, setting, symbol = "standard", "L1", "l1_coefficient", "α"
    loss_terms = ("l1",)
    resamples = l1 = True
    saelens_architecture = "standard"
    recipes = tuple(RECIPES)

    def family(self, cfg) -> str:
        return recipe(cfg.recipe).family_name

    def default_setting(self, target_l0, i=0):
        return {"l1_coefficient": 1e-3 * (1 + i)}

    def dense_terms(self, ctx):
        return {"l1": ctx.l1_scale * ctx.p["l1"] * ctx.stack._l1_penalty(ctx.c, ctx.p["W_dec"])}

    def sparse_terms(self, ctx):
        # Σ_i ‖W_dec,i‖ · (Σ_tokens c_i): each latent's codes are summed first (in a fixed order),
        # so no gradient is scattered back into the norms (a gather norms[cols] would, with float
        # atomics on a multi-threaded CPU: run-to-run differences). Codes are ReLUs, so |c| = c.
        per_latent = sparse.column_sums(ctx.codes, ctx.pattern).view(ctx.n, ctx.m)
        per_sae = (per_latent * ctx.p["W_dec"].norm(dim=-1).float()).sum(-1)
        return {"l1": ctx.l1_scale * ctx.p["l1"] * per_sae / ctx.B}


class _AuxK(Architecture):
    """The AuxK loss (Gao et al. 2024): the dead latents' k_aux largest (ReLU'd) pre-activations
    reconstruct the error the live latents leave, k_aux = min(d_in/2, d_sae)."""

    uses_auxk = fixed_sparsity = True
    loss_terms = ("aux",)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if not 0 < cfg.k <= cfg.d_sae:
            raise ValueError(f"{self.name} needs 0 < k <= d_sae={cfg.d_sae}, got k={cfg.k}")

    def default_setting(self, target_l0, i=0):
        return {"k": max(1, int(round(target_l0)))}

    def dense_terms(self, ctx):
        stack, p, dead, pre = ctx.stack, ctx.p, ctx.dead, ctx.pre
        aux = torch.zeros(ctx.n, device=pre.device)
        if dead is not None and dead.any():
            k_aux = min(stack.d_in // 2, stack.d_sae)  # fixed, so SAEs in a stack stay independent
            dead_pre = torch.where(dead.unsqueeze(1), torch.relu(pre), torch.zeros_like(pre))
            vals, idx = dead_pre.topk(k_aux, dim=-1)
            c_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
            e_hat = torch.bmm(c_aux, p["W_dec"].to(c_aux.dtype)).float()
            resid = -ctx.err.detach()  # what the live latents failed to reconstruct
            aux = (e_hat - resid).pow(2).sum(-1).mean(-1) / stack.d_in
            aux = torch.where(dead.any(-1), aux, torch.zeros_like(aux))
        return {"aux": ctx.aux_coefficient * aux}

    def sparse_terms(self, ctx):
        stack, dead = ctx.stack, ctx.dead
        aux = torch.zeros(ctx.n, device=ctx.err.device)
        if ctx.sel.aux is not None:
            a_pattern, a_vals = ctx.sel.aux
            a_codes = sparse.encode_values(ctx.xc, ctx.flat_enc, ctx.flat_b_enc, a_vals, a_pattern)
            e_hat = sparse.decode(a_codes, ctx.flat_dec, a_pattern).view(ctx.n, ctx.B, -1).float()
            aux = (e_hat + ctx.err.detach()).pow(2).sum(-1).mean(-1) / stack.d_in  # e_hat should equal -err
            aux = torch.where(dead.any(-1), aux, torch.zeros_like(aux))
        return {"aux": ctx.aux_coefficient * aux}


class TopK(_AuxK):
    name, family_name, setting, symbol = "topk", "TopK", "k", "k"
    matched_comparison = True
    saelens_architecture = "topk"

    def codes(self, pre, p):
        acts = torch.relu(pre)
        kmax = int(p["k"].max())
        vals, idx = acts.topk(kmax, dim=-1, sorted=True)
        keep = torch.arange(kmax, device=pre.device).view(1, 1, -1) < p["k"].view(-1, 1, 1)
        return torch.zeros_like(acts).scatter(-1, idx, vals * keep)

    def selector(self, stack, B, max_nnz):
        return _RowTopK(stack, B, max_nnz)

    def saelens_fields(self, cfg):
        return {"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": cfg.k}, "k": cfg.k}


class BatchTopK(_AuxK):
    name, family_name, setting, symbol = "batchtopk", "BatchTopK", "k", "k"
    saelens_architecture = "jumprelu"

    def own_state(self, configs, d_in, d_sae):
        # -inf until the first training batch: an untrained SAE's codes are plain ReLUs
        return {"threshold": torch.full((len(configs),), -math.inf)}

    def codes(self, pre, p):
        return torch.relu(pre) * (pre > p["threshold"].view(-1, 1, 1).to(pre.dtype))

    def train_codes(self, pre, p):
        n, B, m = pre.shape
        acts = torch.relu(pre).reshape(n, B * m)
        kb = int(p["k"].max()) * B
        vals, idx = acts.topk(kb, dim=-1, sorted=True)
        keep = torch.arange(kb, device=pre.device).view(1, -1) < (p["k"] * B).view(-1, 1)
        return torch.zeros_like(acts).scatter(-1, idx, vals * keep).view(n, B, m)

    def dense_terms(self, ctx):
        c = ctx.c.detach().float()
        kept = torch.where(c > 0, c, torch.full_like(c, math.inf))
        return {**super().dense_terms(ctx),
                "batch_threshold": kept.amin((1, 2))}

    def selector(self, stack, B, max_nnz):
        return _BatchTopK(stack, B, max_nnz)

    def sparse_terms(self, ctx):
        on = ctx.sel.vals > 0
        low = torch.full((ctx.n,), math.inf, device=ctx.sel.vals.device).scatter_reduce(
            0, ctx.pattern.rows[on] // ctx.B, ctx.sel.vals[on], "amin")
        return {**super().sparse_terms(ctx), "batch_threshold": low}

    @torch.no_grad()
    def after_step(self, stack, out):
        """θ ← (1 − r)·θ + r·(smallest code kept in the batch), θ set outright by the first batch."""
        low = out["batch_threshold"].to(stack.threshold)
        ok = torch.isfinite(low)
        new = torch.where(torch.isfinite(stack.threshold),
                          (1 - THRESHOLD_RATE) * stack.threshold + THRESHOLD_RATE * low, low)
        stack.threshold.copy_(torch.where(ok, new, stack.threshold))

    def saelens_tensors(self, stack):
        t = float(stack.threshold[0])
        return {"threshold": torch.full((stack.d_sae,), t if math.isfinite(t) else 0.0)}

    def load_state(self, stack, tensors):
        with torch.no_grad():
            stack.threshold.fill_(float(tensors["threshold"].float().mean()))


class MatryoshkaBatchTopK(BatchTopK):
    name, family_name = "matryoshka_batchtopk", "Matryoshka BatchTopK"
    loss_terms = ("aux", "matryoshka")

    @staticmethod
    def widths(cfg) -> tuple:
        """The nested prefixes' widths, the last being d_sae (default: doubling groups from d_sae/16)."""
        if cfg.matryoshka_widths:
            return tuple(cfg.matryoshka_widths)
        return tuple(sorted({max(1, cfg.d_sae >> j) for j in range(4, -1, -1)}))

    def validate(self, cfg):
        super().validate(cfg)
        w = self.widths(cfg)
        if any(b <= a for a, b in zip(w, w[1:])) or w[0] <= 0 or w[-1] != cfg.d_sae:
            raise ValueError(f"matryoshka_widths must increase from > 0 to d_sae={cfg.d_sae}, got {w}")

    def shape_fields(self, cfg):
        return (self.widths(cfg),)

    def _inner(self, stack):
        return self.widths(stack.configs[0])[:-1]

    def dense_terms(self, ctx):
        out = super().dense_terms(ctx)
        stack, p, c = ctx.stack, ctx.p, ctx.c
        total = torch.zeros(ctx.n, device=c.device)
        for w in self._inner(stack):
            xhat = torch.baddbmm(ctx.b_dec.unsqueeze(1), c[..., :w], p["W_dec"][:, :w].to(c.dtype))
            total = total + (xhat.float() - ctx.xs.float()).pow(2).sum(-1).mean(-1) / stack.d_in
        return {**out, "matryoshka": total}

    def sparse_terms(self, ctx):
        stack = ctx.stack
        out = super().sparse_terms(ctx)
        total = torch.zeros(ctx.n, device=ctx.err.device)
        local = ctx.pattern.cols % ctx.m
        for w in self._inner(stack):
            part = sparse.decode(ctx.codes * (local < w).to(ctx.codes.dtype), ctx.flat_dec, ctx.pattern)
            xhat = part.view(ctx.n, ctx.B, -1) + ctx.b_dec.unsqueeze(1)
            total = total + (xhat.float() - ctx.xs.float()).pow(2).sum(-1).mean(-1) / stack.d_in
        return {**out, "matryoshka": total}


class JumpReLU(Architecture):
    name, family_name, setting, symbol = "jumprelu", "JumpReLU", "l0_coefficient", "λ"
    loss_terms = ("l0_penalty",)
    saelens_architecture = "jumprelu"

    def validate(self, cfg):
        super().validate(cfg)
        for f in ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            v = getattr(cfg, f)
            if not (math.isfinite(v) and (v >= 0 if f == "l0_coefficient" else v > 0)):
                raise ValueError(f"jumprelu needs a finite {f} {'>= 0' if f == 'l0_coefficient' else '> 0'}, not {v}")

    def default_setting(self, target_l0, i=0):
        return {"l0_coefficient": 1e-3 * (1 + i)}

    def own_state(self, configs, d_in, d_sae):
        root = math.sqrt(d_in)  # the paper's units (E‖x‖² = 1) to ours (E‖x‖ = √d_in)
        theta0 = torch.tensor([c.jumprelu_init_threshold * root for c in configs])
        return {"log_threshold": torch.nn.Parameter(theta0.log().view(-1, 1).repeat(1, d_sae)),
                "bandwidth": torch.tensor([c.jumprelu_bandwidth * root for c in configs]),
                "l0_coefficient": torch.tensor([c.l0_coefficient for c in configs])}

    def state(self, stack, idx=None):
        p = super().state(stack, idx)
        p["threshold"] = p["log_threshold"].exp()
        return p

    def codes(self, pre, p):
        return _JumpReLU.apply(pre, p["threshold"].unsqueeze(1), p["bandwidth"].view(-1, 1, 1))

    def dense_terms(self, ctx):
        p = ctx.p
        l0 = _Step.apply(ctx.pre, p["threshold"].unsqueeze(1), p["bandwidth"].view(-1, 1, 1)).sum(-1).mean(-1)
        return {"l0_penalty": p["l0_coefficient"] * l0}

    def selector(self, stack, B, max_nnz):
        # the active pairs and those within ε/2 below θ (inactive, but the estimator's window)
        p = self.state(stack)
        theta = p["threshold"].detach()
        low = theta - p["bandwidth"].view(-1, 1) / 2
        flat_theta = theta.reshape(-1)
        return _Elementwise(stack, B, max_nnz, low, lambda v, cols: v * (v > flat_theta[cols]).to(v.dtype))

    def _window(self, sel, p):
        """Per pair: (θ of its latent [nnz], ε of its SAE [nnz], K((pre − θ)/ε) [nnz]), no gradient."""
        n, m = p["threshold"].shape
        theta = p["threshold"].detach().reshape(-1)[sel.pattern.cols]
        eps = p["bandwidth"][sel.pattern.cols // m]
        return theta, eps, _rectangle((sel.pre - theta) / eps)

    def sparse_codes(self, codes, sel, p, stack):
        """The codes plus a zero whose gradient is the estimator's −(θ/ε)K((pre−θ)/ε) per pair, carried
        to each latent's θ by a column sum (helpers.saes.sparse.gather: deterministic)."""

        theta, eps, k = self._window(sel, p)
        t = sparse.gather(p["threshold"].reshape(-1), sel.pattern)
        return codes + (t - t.detach()) * (-(theta / eps) * k)

    def sparse_terms(self, ctx):
        p = ctx.p
        _, eps, k = self._window(ctx.sel, p)
        on = (ctx.sel.vals > 0).float()
        l0 = sparse.column_sums(on, ctx.pattern).view(ctx.n, ctx.m).sum(-1) / ctx.B
        # ∂/∂θ of the batch mean of Σ_i H(pre_i − θ_i): −Σ_tokens K((pre−θ)/ε)/ε / B per latent
        slope = -sparse.column_sums(k / eps, ctx.pattern).view(ctx.n, ctx.m) / ctx.B
        th = p["threshold"]
        return {"l0_penalty": p["l0_coefficient"] * (l0 + ((th - th.detach()) * slope).sum(-1))}

    def saelens_tensors(self, stack):
        return {"threshold": stack.log_threshold[0].detach().exp().float()}

    def load_state(self, stack, tensors):
        with torch.no_grad():
            stack.log_threshold.copy_(tensors["threshold"].float().clamp_min(1e-30).log().unsqueeze(0))


def get(name: str) -> Architecture:
    """The architecture called `name` (SAEConfig.architecture); a ValueError naming the known ones."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}: one of {sorted(ARCHITECTURES)}") from None
