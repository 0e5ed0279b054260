"""The toy model of superposition (helpers.saes.toy): dense inputs keep one feature per dimension,
sparse inputs pack more features than dimensions; interference and the result's round trip."""
import numpy as np
import torch

from helpers.saes.toy import (ToyModel, interference, superposition_sweep, toy_batch, toy_reconstruct,
                              train_toy)


def test_batch_sparsity():
    x = toy_batch(20_000, 6, 0.9, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 6) and x.min() >= 0 and x.max() <= 1
    assert abs((x > 0).float().mean().item() - 0.1) < 0.01


def test_interference_of_known_directions():
    W = np.array([[1.0, 0.0, np.sqrt(0.5), 0.01], [0.0, 1.0, np.sqrt(0.5), 0.0]])  # feature 3 not represented
    cos = interference(W)
    assert np.allclose(np.diag(cos), 0) and np.allclose(cos[:, 3], 0)
    assert np.isclose(cos[0, 2], np.sqrt(0.5)) and np.isclose(cos[0, 1], 0)


def test_sparsity_buys_superposition():
    torch.set_num_threads(1)
    sweep = superposition_sweep((0.0, 0.97))
    dense, sparse = sweep.models
    assert dense.n_represented <= dense.d          # dense: at most one feature per dimension
    assert sparse.n_represented > sparse.d         # sparse: more features than dimensions
    assert sparse.max_interference > 0.2           # ... at the cost of interference
    assert dense.losses[-1] < dense.losses[0]
    assert "buys room" in sweep.verdicts()[0]


def test_reconstruct_and_round_trip(tmp_path):
    toy = train_toy(4, 2, 0.8, steps=20, batch_size=64, seed=3)
    x = torch.rand(5, 4)
    out = toy_reconstruct(torch.as_tensor(toy.W).float(), torch.as_tensor(toy.b).float(), x)
    assert out.shape == x.shape and (out >= 0).all()
    back = ToyModel.load(toy.save(tmp_path / "toy.json"))
    assert np.allclose(back.W, toy.W) and back.n_represented == toy.n_represented and back.losses == toy.losses
