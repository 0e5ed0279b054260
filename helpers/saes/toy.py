"""Elhage et al.'s toy model of superposition (2022,
https://transformer-circuits.pub/2022/toy_model/index.html): n sparse features squeezed through d < n
dimensions and read back.

A feature vector x [n] has each entry 0 with probability `sparsity`, else uniform in [0, 1]. The model
writes it into d dimensions with W [d, n] (column i: feature i's direction) and reads it back with the
transpose, x̂ = ReLU(WᵀW x + b), trained to minimise Σᵢ importanceᵢ (xᵢ − x̂ᵢ)². A feature is
*represented* when its direction has norm near 1 (above `REPRESENTED`); the off-diagonal entries of
WᵀW are the interference between features. With dense inputs the model keeps about d features, one per
dimension; with sparse inputs interference rarely costs anything and it packs more features than
dimensions (a pentagon of 5 in 2 dimensions, for example).

    toy = train_toy(n_features=6, d=2, sparsity=0.9)        # a ToyModel
    toy.n_represented, toy.max_interference, toy.W          # what fits, at what cost
    superposition_sweep([0.0, 0.7, 0.9, 0.97])               # the same at several sparsities
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from helpers.results import Result

REPRESENTED = 0.5  # a feature whose direction's norm exceeds this is represented


def toy_batch(n: int, n_features: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """[n, n_features] synthetic features: each entry 0 with probability `sparsity`, else uniform in [0, 1]."""
    x = torch.rand(n, n_features, generator=generator)
    return x * (torch.rand(n, n_features, generator=generator) >= sparsity)


def toy_reconstruct(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x̂ = ReLU(WᵀW x + b) for a batch x [N, n] (W [d, n], b [n])."""
    return torch.relu(x @ W.T @ W + b)


def interference(W) -> np.ndarray:
    """[n, n] cosines between the directions of the represented features (WᵀW normalised), 0 on the
    diagonal and wherever a feature is not represented."""
    W = torch.as_tensor(W, dtype=torch.float64)
    norms = W.norm(dim=0)
    keep = norms > REPRESENTED
    U = W / norms.clamp_min(1e-12)
    cos = (U.T @ U) * keep[:, None] * keep[None, :]
    cos.fill_diagonal_(0.0)
    return cos.numpy()


@dataclass
class ToyModel(Result):
    """One trained toy model: its directions `W` [d][n] and bias `b` [n], its settings and its loss
    per logged step (`losses`). `norms` [n] are the features' direction lengths (near 1:
    represented, near 0: dropped)."""

    n_features: int
    d: int
    sparsity: float
    W: list = field(default_factory=list, repr=False)
    b: list = field(default_factory=list, repr=False)
    importance: list = field(default_factory=list, repr=False)
    losses: list = field(default_factory=list, repr=False)
    steps: int = 0
    seed: int = 0

    def __post_init__(self):
        self.W = np.asarray(self.W, dtype=np.float64).reshape(self.d, self.n_features)
        self.b = np.asarray(self.b, dtype=np.float64).reshape(self.n_features)

    @property
    def norms(self) -> np.ndarray:
        return np.linalg.norm(self.W, axis=0)

    @property
    def represented(self) -> np.ndarray:
        """[n] bool: which features have a direction of their own (norm above `REPRESENTED`)."""
        return self.norms > REPRESENTED

    @property
    def n_represented(self) -> int:
        return int(self.represented.sum())

    @property
    def interference(self) -> np.ndarray:
        return interference(self.W)

    @property
    def max_interference(self) -> float:
        """The largest |cos| between two represented features' directions (0 if at most one)."""
        return float(np.abs(self.interference).max()) if self.n_features > 1 else 0.0

    @property
    def loss(self) -> float:
        return float(self.losses[-1]) if len(self.losses) else float("nan")

    def rows(self) -> list[dict]:
        return [{"sparsity": self.sparsity, "features": self.n_features, "dimensions": self.d,
                 "represented": self.n_represented, "max |cos|": round(self.max_interference, 3),
                 "loss": self.loss}]

    def verdicts(self) -> list[str]:
        more = "more features than dimensions: superposition" if self.n_represented > self.d else \
            "no more features than dimensions"
        return [f"At sparsity {self.sparsity:g}, {self.n_represented} of {self.n_features} features are represented "
                f"in {self.d} dimensions ({more}); the largest interference |cos| is {self.max_interference:.2f}."]


def train_toy(n_features: int = 6, d: int = 2, sparsity: float = 0.9, importance=None, steps: int = 600,
              batch_size: int = 1024, lr: float = 1e-2, seed: int = 0, log_every: int = 50) -> ToyModel:
    """Train the toy model (module docstring) with Adam on fresh batches: `importance` [n] weighs each
    feature's squared error (default: 0.9 ** i, so the features are ranked); seeded by `seed`. It runs
    on one CPU thread: the model is a few dozen numbers, and more threads only wait for one another."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_toy(n_features, d, sparsity, importance, steps, batch_size, lr, seed, log_every)
    finally:
        torch.set_num_threads(threads)


def _train_toy(n_features, d, sparsity, importance, steps, batch_size, lr, seed, log_every) -> ToyModel:
    g = torch.Generator().manual_seed(seed)
    imp = torch.as_tensor(0.9 ** np.arange(n_features) if importance is None else importance, dtype=torch.float32)
    W = torch.nn.Parameter(torch.randn(d, n_features, generator=g) * (2.0 / (d + n_features)) ** 0.5)
    b = torch.nn.Parameter(torch.zeros(n_features))
    opt = torch.optim.Adam([W, b], lr=lr)
    losses = []
    for step in range(steps):
        x = toy_batch(batch_size, n_features, sparsity, g)
        loss = (imp * (x - toy_reconstruct(W, b, x)) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            losses.append(loss.item())
    return ToyModel(n_features, d, float(sparsity), W.detach().double().numpy(), b.detach().double().numpy(),
                    imp.tolist(), losses, steps, seed)


@dataclass
class SuperpositionSweep(Result):
    """Toy models of the same size trained at several sparsities: how many features each represents."""

    models: list[ToyModel] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return [r for m in self.models for r in m.rows()]

    def at(self, sparsity: float) -> ToyModel:
        return min(self.models, key=lambda m: abs(m.sparsity - sparsity))

    def verdicts(self) -> list[str]:
        if not self.models:
            return []
        dense, sparse = self.models[0], self.models[-1]
        grows = sparse.n_represented > dense.n_represented
        return [f"From sparsity {dense.sparsity:g} to {sparse.sparsity:g} the represented features go from "
                f"{dense.n_represented} to {sparse.n_represented} in {dense.d} dimensions: sparsity "
                f"{'buys room for more features' if grows else 'buys no extra features here'}."]


def superposition_sweep(sparsities=(0.0, 0.7, 0.9, 0.97), n_features: int = 6, d: int = 2, **options) -> SuperpositionSweep:
    """`train_toy` at each sparsity (same size, seed and options), in order."""
    return SuperpositionSweep([train_toy(n_features, d, s, **options) for s in sparsities])
