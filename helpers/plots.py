"""The figures the notebooks show (matplotlib). Each function takes data, returns its Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .corpus import COARSE_TAGS, NO_TAG, coarse_tag


def norms_by_hook(store, max_tokens: int = 20_000):
    """Box plot of per-token L2 norms, one box per hook (e.g. per layer)."""
    norms = [store.activations(h, max_tokens).norm(dim=-1).numpy() for h in store.hooks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(norms), 3.6))
    ax.boxplot(norms, showfliers=False)
    ax.set_xticks(range(1, len(norms) + 1), [h.replace(".hook_", "\n") for h in store.hooks], fontsize=8)
    ax.set_ylabel("‖activation‖₂ per token")
    ax.set_title("Residual-stream norm by layer")
    fig.tight_layout()
    return fig


def value_histogram(x: torch.Tensor, title: str = "All activation values"):
    """Histogram of every entry of x (log counts), with the share of mass in the tails."""
    v = x.flatten().float().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(v, bins=200, log=True, color="tab:blue")
    lo, hi = np.percentile(v, [0.1, 99.9])
    ax.axvline(lo, color="grey", ls=":"), ax.axvline(hi, color="grey", ls=":")
    ax.set_xlabel("activation value (dotted: 0.1% and 99.9% quantiles)")
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def dimension_distributions(x: torch.Tensor, dims, title: str = "Single dimensions"):
    """Small multiples: the distribution of a few chosen dimensions of x [n_tokens, d_model]."""
    dims = list(dims)
    cols = min(4, len(dims))
    rows = int(np.ceil(len(dims) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.3 * rows), squeeze=False)
    for ax, d in zip(axes.flat, dims):
        ax.hist(x[:, d].float().numpy(), bins=80, color="tab:orange")
        ax.set_title(f"dim {d}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(dims):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def label_counts(tokens: np.ndarray, tags: list[str], genres: list[str]):
    """Bar charts of the harvested tokens' coarse POS tags and genres."""
    coarse = np.array([COARSE_TAGS.index(coarse_tag(t)) for t in tags] + [len(COARSE_TAGS)] * (256 - len(tags)))
    pos = np.where(tokens["pos"] == NO_TAG, len(COARSE_TAGS), coarse[tokens["pos"]])
    pos_counts = np.bincount(pos, minlength=len(COARSE_TAGS) + 1)
    genre_counts = np.bincount(tokens["genre"], minlength=len(genres))[:len(genres)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    a.bar(COARSE_TAGS + ["none"], pos_counts, color="tab:green")
    a.set_title("Tokens by part of speech (their word's tag)")
    a.tick_params(axis="x", labelrotation=45, labelsize=8)
    b.bar(genres, genre_counts, color="tab:purple")
    b.set_title("Tokens by genre")
    b.tick_params(axis="x", labelrotation=60, labelsize=8)
    fig.tight_layout()
    return fig
