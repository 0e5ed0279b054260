"""The sparse training path equals the dense one: codes, reconstruction, losses, every gradient."""
import pytest
import torch

from helpers import sparse
from helpers.sae import SAEConfig, SAEStack

D, M = 12, 40


def randomised(configs, seed=0, bias=-0.5):
    sae = SAEStack(configs, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.b_enc.add_(bias)
        if sae.unit_norm:
            sae.normalize_decoder()
        sae.scale.fill_(1.7)
    return sae


def both_paths(configs, x, dead=None, l1_scale=1.0, massive=None):
    out = {}
    for path in ("dense", "sparse"):
        sae = randomised(configs)
        if massive is not None:
            sae.set_massive(massive)
        res = sae.losses(x, dead=dead, l1_scale=l1_scale, path=path)
        res["loss"].sum().backward()
        out[path] = (res, {n: p.grad.clone() for n, p in sae.named_parameters()}, sae)
    return out


def assert_same(out):
    (rd, gd, sd), (rs, gs, ss) = out["dense"], out["sparse"]
    assert rs["path"] == "sparse" and rd["path"] == "dense"
    for k in ("mse", "l1", "aux", "loss", "l0"):
        if k in rd:
            assert torch.allclose(rd[k], rs[k], rtol=1e-5, atol=1e-6), (k, rd[k], rs[k])
    assert torch.equal(rd["fired"], rs["fired"])
    assert set(gd) == set(gs)
    for name in gd:
        assert torch.allclose(gd[name], gs[name], rtol=1e-4, atol=1e-6), (name, (gd[name] - gs[name]).abs().max())
    x = torch.randn(9, D)
    assert torch.allclose(sd.encode(x), ss.encode(x)) and torch.allclose(sd(x), ss(x))


CASES = {
    "paper L1 untied": [SAEConfig(D, M, l1_coefficient=a) for a in (1e-3, 5e-2)],
    "paper L1 tied": [SAEConfig(D, M, tied=True, l1_coefficient=a) for a in (1e-3, 5e-2)],
    "improved L1": [SAEConfig(D, M, l1_coefficient=a, recipe="improved") for a in (1e-3, 5e-2)],
    "topk": [SAEConfig(D, M, architecture="topk", k=k) for k in (3, 7)],
}


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_equals_dense_random_data(name):
    configs = CASES[name]
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2)) * 2
    dead = None
    if configs[0].architecture == "topk":
        dead = torch.zeros(2, M, dtype=torch.bool)
        dead[0, :10] = True
        dead[1, 5:8] = True
    out = both_paths(configs, x, dead=dead, l1_scale=0.3)
    assert_same(out)
    if dead is not None:
        assert (out["sparse"][0]["aux"] > 0).all()  # AuxK is really exercised


def test_sparse_equals_dense_on_a_stored_batch(array_store):
    from conftest import sparse_data

    x, _ = sparse_data(n=512, d=D, m=30)
    store = array_store(x * 5)
    batch = next(store.iter_batches("blocks.0.hook_resid_post", 128, seed=1))
    for configs in CASES.values():
        assert_same(both_paths(configs, batch, dead=torch.ones(2, M, dtype=torch.bool)
                               if configs[0].architecture == "topk" else None))


def test_sparse_equals_dense_with_massive_tokens():
    from helpers.massive import Massive

    x = torch.randn(64, D)
    x[::9] += 40 * torch.nn.functional.one_hot(torch.tensor(3), D)  # a few huge tokens along one axis
    rule = Massive("h", threshold=20.0, offset=40 * torch.nn.functional.one_hot(torch.tensor(3), D).float(), share=0.1)
    for configs in CASES.values():
        out = both_paths(configs, x, massive=rule)
        assert_same(out)


def test_auto_takes_the_dense_path_for_dense_l1_batches():
    sae = randomised(CASES["paper L1 untied"], bias=2.0)   # positive biases: most codes active
    x = torch.randn(32, D)
    assert sae.losses(x)["path"] == "dense"
    sae = randomised(CASES["paper L1 untied"], bias=-6.0)  # very negative biases: few codes active
    assert sae.losses(x)["path"] == "sparse"
    assert sae.losses(x, path="dense")["path"] == "dense"
    with pytest.raises(ValueError, match="path must be"):
        sae.losses(x, path="fast")


def test_pattern_and_kernels_against_dense_matrices():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 11, generator=g) < 0.3
    mask[2] = False  # an empty row
    p = sparse.Pattern.from_mask(mask)
    assert p.nnz == int(mask.sum()) and torch.equal(p.rows, mask.nonzero()[:, 0])
    W = torch.randn(11, 5, generator=g, requires_grad=True)
    vals = torch.rand(p.nnz, generator=g, requires_grad=True)
    dense = torch.zeros(7, 11).index_put((p.rows, p.cols), vals.detach())
    out = sparse.decode(vals, W, p)
    assert torch.allclose(out, dense @ W, atol=1e-6)
    go = torch.randn(7, 5, generator=g)
    gv, gw = torch.autograd.grad(out, (vals, W), go)
    assert torch.allclose(gw, dense.T @ go, atol=1e-5)
    assert torch.allclose(gv, (go @ W.T)[p.rows, p.cols], atol=1e-5)


def test_each_sae_of_a_stack_takes_its_own_path():
    """"auto" decides per SAE: in a stack with one dense and one sparse L1 SAE, each gets exactly the
    losses and gradients it gets alone (bit for bit), so a sweep trains the SAEs that solo runs would."""
    configs = CASES["paper L1 untied"]
    stack = randomised(configs)
    with torch.no_grad():
        stack.b_enc[0].fill_(2.0)    # SAE 0: most codes active -> dense path
        stack.b_enc[1].fill_(-6.0)   # SAE 1: few codes active -> sparse path
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(3))
    out = stack.losses(x)
    assert out["path"] == "mixed"
    out["loss"].sum().backward()
    for i in range(2):
        alone = stack[i]
        alone.zero_grad(set_to_none=True)
        res = alone.losses(x)
        assert res["path"] == ("dense" if i == 0 else "sparse")
        res["loss"].sum().backward()
        for key in ("mse", "l1", "loss", "l0"):
            assert torch.equal(out[key][i:i + 1], res[key]), key
        assert torch.equal(out["fired"][i:i + 1], res["fired"])
        for (name, p), q in zip(stack.named_parameters(), alone.parameters()):
            assert torch.equal(p.grad[i:i + 1], q.grad), name
