"""Sparse-code kernels: an SAE's decoder, and every backward pass, touch only the active latents.

A trained SAE's codes are sparse: TopK keeps k of its m latents per token, a trained L1 SAE a few
dozen. A dense trainer still multiplies the whole dictionary forward and backward, about 12·d·m FLOP
per token. Here only the encoder's forward pass stays dense (we need every pre-activation to know
which latents are active); everything else costs O(active · d) per token:

* `Pattern`: the active (token, latent) pairs of a batch, in row order (CSR) and, through a
  permutation, in column order (CSC). The rows of an n-SAE stack are flattened to n·B tokens and its
  latents to n·m, so a whole sweep is one pattern: no Python loop over SAEs.
* `encode_values(xc, W_enc, b_enc, vals, pattern)`: the active codes, as an autograd function whose
  backward gives the encoder's weight, bias and input gradients from the active pairs only.
* `decode(vals, W_dec, pattern)`: Σ_j c_j · W_dec[j] over the active latents of each token, and its
  backward (the codes' and the dictionary's gradients), from the active pairs only.
* `column_sums(vals, pattern)`: Σ of the active codes of each latent (the L1 penalty's per-latent
  totals), with a gather for its backward; `gather(per_column, pattern)`, its mirror: a per-latent
  value at every pair, whose backward is a column sum (JumpReLU's thresholds, helpers.saes.architectures).

Which pairs are active, their codes, and any gradient a code has besides the encoder's (a threshold's)
are the architecture's (helpers.saes.architectures): every architecture here is the identity on its active
pairs and zero elsewhere, so `encode_values` passes a code's gradient to its pre-activation exactly
where the code is positive (ReLU, TopK, BatchTopK, JumpReLU with its positive threshold).

The gathers and scatters are `torch.nn.functional.embedding_bag` with per-sample weights (fused: no
[active, d] temporary); the sampled dot product g[row] · W[col] of the decoder's backward is
`torch.sparse.sampled_addmm` on CPU and bounded chunks of gathers elsewhere (the "generic" branch;
`FORCE_GENERIC`, or SAE_SPARSE_FORCE_GENERIC=1 in the environment, makes a CPU take it too, so that
its results can be tested without a GPU). All of it is plain torch, so it runs on CPU and CUDA alike
(not yet measured on a GPU). The SAE (helpers.saes.stack) chooses this path or the dense one
per batch; a unit test checks that both give the same losses and gradients.

Determinism: every sum over active pairs here adds one output's pairs in a fixed order (a bag of
embedding_bag per output row or column, a dot product per pair, a serial `index_add_` into a vector
on CPU), so a run gives the same bits every time, whatever the threads' timing. Keep it so: never let
autograd scatter-add (`t[idx]` on a tensor that needs a gradient: its backward is
`index_put_(accumulate=True)`, which on a CPU with 2+ threads and 32768+ elements adds with float
atomics, in an order that depends on the threads' timing; that was what made training
irreproducible). Sum each column's pairs with `column_sums` instead, as the L1 penalty and the
encoder's bias gradient do (CUDA's `index_add_` adds with atomics, so the generic branch sums a bag
per column).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CHUNK = 1 << 15  # active pairs per chunk of the sampled dot product (bounds its temporary memory)

# Take the generic (non-CPU) branches on a CPU too: for tests of the code a GPU would run.
FORCE_GENERIC = os.environ.get("SAE_SPARSE_FORCE_GENERIC", "") not in ("", "0")


def use_cpu_kernels(t: torch.Tensor) -> bool:
    """Whether code on tensor t takes its CPU-specific branch (a CPU tensor, and FORCE_GENERIC unset)."""
    return t.device.type == "cpu" and not FORCE_GENERIC


@contextmanager
def force_generic(on: bool = True):
    """Within the block, CPU tensors take the generic branches (here and in helpers.saes.stack) or not."""
    global FORCE_GENERIC
    old, FORCE_GENERIC = FORCE_GENERIC, on
    try:
        yield
    finally:
        FORCE_GENERIC = old


@dataclass
class Pattern:
    """Active (row, col) pairs of a [n_rows, n_cols] code matrix, sorted by row."""

    rows: torch.Tensor         # [nnz] int64, non-decreasing
    cols: torch.Tensor         # [nnz] int64
    n_rows: int
    n_cols: int
    row_offsets: torch.Tensor  # [n_rows] start of each row's pairs
    by_col: torch.Tensor       # [nnz] permutation that sorts the pairs by column (stable)
    col_offsets: torch.Tensor  # [n_cols] start of each column's pairs in that order

    @property
    def nnz(self) -> int:
        return len(self.cols)

    @classmethod
    def from_pairs(cls, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> "Pattern":
        row_counts = torch.bincount(rows, minlength=n_rows)
        col_counts = torch.bincount(cols, minlength=n_cols)
        return cls(rows, cols, n_rows, n_cols, torch.cumsum(row_counts, 0) - row_counts,
                   torch.argsort(cols, stable=True), torch.cumsum(col_counts, 0) - col_counts)

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_cols: int) -> "Pattern":
        """indices [n_rows, k] (global column indices): k pairs per row."""
        n_rows, k = indices.shape
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
        return cls.from_pairs(rows, indices.reshape(-1), n_rows, n_cols)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Pattern":
        """The active entries of a [n_rows, n_cols] boolean mask."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls.from_pairs(rows, cols, *mask.shape)


def _bag(index: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_{j in bag b} scale[j] · weight[index[j]] (bags given by offsets)."""
    return F.embedding_bag(index, weight, offsets, mode="sum", per_sample_weights=scale.to(weight.dtype))


def _column_sums(vals: torch.Tensor, p: "Pattern") -> torch.Tensor:
    """[n_cols] fp32: Σ of vals over each column's pairs, added in the pairs' order (the same bits on
    every run, and on both branches). On CPU, `index_add_` into a vector (one serial loop: faster
    than a bag); elsewhere a bag per column (`index_add_` would use float atomics on CUDA)."""
    vals = vals.float()
    if use_cpu_kernels(vals):
        return torch.zeros(p.n_cols, dtype=torch.float32, device=vals.device).index_add_(0, p.cols, vals)
    return F.embedding_bag(p.by_col, vals.unsqueeze(1), p.col_offsets, mode="sum").squeeze(1)


def _sampled_dot(a: torch.Tensor, b: torch.Tensor, p: "Pattern") -> torch.Tensor:
    """[nnz]: a[rows[j]] · b[cols[j]] for the pattern's pairs (a [n_rows, d], b [n_cols, d]).

    On CPU, torch's sampled dense-dense matmul over the pattern as a CSR matrix (one fused loop);
    elsewhere gathers in chunks of _CHUNK pairs."""
    a, b = a.float(), b.float()
    if use_cpu_kernels(a):
        crow = torch.cat([p.row_offsets, torch.tensor([p.nnz], device=a.device)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = torch.sparse_csr_tensor(crow, p.cols, torch.zeros(p.nnz, device=a.device),
                                          size=(p.n_rows, p.n_cols), check_invariants=False)
            return torch.sparse.sampled_addmm(csr, a, b.T, beta=0.0).values()
    out = torch.empty(p.nnz, dtype=torch.float32, device=a.device)
    for i in range(0, p.nnz, _CHUNK):
        r, c = p.rows[i:i + _CHUNK], p.cols[i:i + _CHUNK]
        out[i:i + _CHUNK] = (a.index_select(0, r) * b.index_select(0, c)).sum(-1)
    return out


class _EncodeValues(torch.autograd.Function):
    """vals[j] = the code at pair j (the architecture's activation of xc[row_j] · W[col_j] + b[col_j]),
    already computed by the caller (from the dense pre-activations); the backward runs over the
    active pairs only, passing the gradient to the pre-activation where vals[j] > 0."""

    @staticmethod
    def forward(ctx, xc, weight, bias, vals, pattern: Pattern):
        ctx.save_for_backward(xc, weight, vals)
        ctx.pattern = pattern
        return vals.clone()

    @staticmethod
    def backward(ctx, grad):
        xc, weight, vals = ctx.saved_tensors
        p = ctx.pattern
        g = torch.where(vals > 0, grad, torch.zeros_like(grad)).float()  # none where the code is 0 (module docstring)
        grad_xc = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_xc = _bag(p.cols, weight, p.row_offsets, g).to(xc.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _bag(p.rows[p.by_col], xc, p.col_offsets, g[p.by_col]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _column_sums(g, p)
        return grad_xc, grad_w, grad_b, None, None


class _Decode(torch.autograd.Function):
    """out[r] = Σ_{j in row r} vals[j] · W[col_j]."""

    @staticmethod
    def forward(ctx, vals, weight, pattern: Pattern):
        ctx.save_for_backward(vals, weight)
        ctx.pattern = pattern
        return _bag(pattern.cols, weight, pattern.row_offsets, vals)

    @staticmethod
    def backward(ctx, grad):
        vals, weight = ctx.saved_tensors
        p = ctx.pattern
        grad = grad.contiguous()
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_vals = _sampled_dot(grad, weight, p).to(vals.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _bag(p.rows[p.by_col], grad.to(weight.dtype), p.col_offsets, vals[p.by_col]).to(weight.dtype)
        return grad_vals, grad_w, None


class _ColumnSums(torch.autograd.Function):
    """out[c] = Σ_{j in column c} vals[j]."""

    @staticmethod
    def forward(ctx, vals, pattern: Pattern):
        ctx.pattern = pattern
        ctx.dtype = vals.dtype
        return _column_sums(vals, pattern)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(0, ctx.pattern.cols).to(ctx.dtype), None


class _Gather(torch.autograd.Function):
    """out[j] = v[col_j]; the backward sums each column's pairs (`_column_sums`: deterministic)."""

    @staticmethod
    def forward(ctx, v, pattern: Pattern):
        ctx.pattern = pattern
        ctx.dtype = v.dtype
        return v.index_select(0, pattern.cols)

    @staticmethod
    def backward(ctx, grad):
        return _column_sums(grad, ctx.pattern).to(ctx.dtype), None


def gather(per_column: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """[nnz]: per_column [n_cols] at each pair's column, differentiable with respect to per_column by
    a deterministic column sum (not the scatter-add of `per_column[cols]`)."""
    return _Gather.apply(per_column, pattern)


def encode_values(xc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, vals: torch.Tensor,
                  pattern: Pattern) -> torch.Tensor:
    """The active codes `vals` [nnz] (the architecture's codes at the pattern's pairs, computed by
    the caller), differentiable with respect to the encoder input xc [n_rows, d], weight
    [n_cols, d] and bias [n_cols] through a sparse backward."""
    return _EncodeValues.apply(xc, weight, bias, vals, pattern)


def decode(vals: torch.Tensor, weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """[n_rows, d]: each row's active codes times their dictionary rows (weight [n_cols, d])."""
    return _Decode.apply(vals, weight, pattern)


def column_sums(vals: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """[n_cols] fp32: the sum of the active values `vals` [nnz] of each column (latent), differentiable
    with respect to vals. Deterministic, unlike `zeros.index_add(0, cols, vals)` on CUDA or
    `(vals * w[cols])` whose backward scatter-adds into w with atomics on a multi-threaded CPU."""
    return _ColumnSums.apply(vals, pattern)
