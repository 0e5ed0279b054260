"""The sparse training path equals the dense one: codes, reconstruction, losses, every gradient."""
import dataclasses

import pytest
import torch

from helpers.saes import sparse
from helpers.saes.stack import SAEConfig, SAEStack

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
    (rd, gd, _), (rs, gs, _) = out["dense"], out["sparse"]
    assert rs["path"] == "sparse" and rd["path"] == "dense"
    assert set(TERMS) >= set(k for k in rd if k not in ("path", "fired"))  # every term is compared
    for k in TERMS:
        if k in rd:
            assert torch.allclose(rd[k], rs[k], rtol=1e-5, atol=1e-6), (k, rd[k], rs[k])
    assert torch.equal(rd["fired"], rs["fired"])
    assert set(gd) == set(gs)
    for name in gd:
        assert torch.allclose(gd[name], gs[name], rtol=1e-4, atol=1e-6), (name, (gd[name] - gs[name]).abs().max())


TERMS = ("mse", "l1", "aux", "l0_penalty", "matryoshka", "batch_threshold", "loss", "l0")
CASES = {
    "anthropic2023 L1 untied": [SAEConfig(D, M, l1_coefficient=a) for a in (1e-3, 5e-2)],
    "anthropic2023 L1 tied": [SAEConfig(D, M, tied=True, l1_coefficient=a) for a in (1e-3, 5e-2)],
    "improved L1": [SAEConfig(D, M, l1_coefficient=a, recipe="improved") for a in (1e-3, 5e-2)],
    "topk": [SAEConfig(D, M, architecture="topk", k=k) for k in (3, 7)],
    "batchtopk": [SAEConfig(D, M, architecture="batchtopk", k=k) for k in (3, 7)],
    "matryoshka_batchtopk": [SAEConfig(D, M, architecture="matryoshka_batchtopk", k=k, matryoshka_widths=(5, 10, 20, M))
                             for k in (3, 7)],
    # a wide kernel (0.05 in the paper's units: 0.17 here) so that a batch of 64 has pairs in every window
    "jumprelu": [SAEConfig(D, M, architecture="jumprelu", l0_coefficient=a, jumprelu_bandwidth=0.05) for a in (1e-3, 5e-2)],
}


def random_case(name):
    """(configs, x, dead latents) of a case on random data; stacks with AuxK get some dead latents."""
    configs = CASES[name]
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2)) * 2
    dead = None
    if configs[0].arch.uses_auxk:
        dead = torch.zeros(2, M, dtype=torch.bool)
        dead[0, :10] = True
        dead[1, 5:8] = True
    return configs, x, dead


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_equals_dense_random_data(name):
    configs, x, dead = random_case(name)
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
                               if configs[0].arch.uses_auxk else None))


def test_sparse_equals_dense_with_massive_tokens():
    from helpers.activations.massive import Massive

    x = torch.randn(64, D)
    x[::9] += 40 * torch.nn.functional.one_hot(torch.tensor(3), D)  # a few huge tokens along one axis
    rule = Massive("h", threshold=20.0, offset=40 * torch.nn.functional.one_hot(torch.tensor(3), D).float(), share=0.1)
    for configs in CASES.values():
        out = both_paths(configs, x, massive=rule)
        assert_same(out)


def test_auto_takes_the_dense_path_for_dense_l1_batches():
    sae = randomised(CASES["anthropic2023 L1 untied"], bias=2.0)   # positive biases: most codes active
    x = torch.randn(32, D)
    assert sae.losses(x)["path"] == "dense"
    sae = randomised(CASES["anthropic2023 L1 untied"], bias=-6.0)  # very negative biases: few codes active
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
    configs = CASES["anthropic2023 L1 untied"]
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


# ---- after training: weights far from their initialisation, dead and resampled latents ----------
def trained(configs, x, steps=30):
    """The configs trained with Adam for `steps` steps on batches of x (dense path), the way
    helpers.saes.train does (unit-norm rows for the paper recipe and TopK); after a third of the steps,
    latents 0-5 of every SAE are killed (a bias that no input overcomes), and after two thirds
    latents 3-5 are resampled (helpers.saes.train.resample_dead): 0-2 stay dead."""
    from helpers.saes.train import resample_dead

    sae = SAEStack(configs)
    with torch.no_grad():
        sae.scale.fill_(D ** 0.5 / float(x.norm(dim=-1).mean()))
        sae.b_dec.copy_((x.mean(0) * sae.scale[0]).expand_as(sae.b_dec))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    for step in range(steps):
        batch = x[torch.randint(len(x), (128,), generator=g)]
        opt.zero_grad(set_to_none=True)
        sae.losses(batch, path="dense")["loss"].sum().backward()
        if sae.unit_norm:
            sae.remove_parallel_grads()
        opt.step()
        with torch.no_grad():
            if sae.unit_norm:
                sae.normalize_decoder()
            if step == steps // 3:
                sae.b_enc[:, :6] = -100.0
            if step == 2 * steps // 3:
                dead = torch.zeros(M, dtype=torch.bool)
                dead[3:6] = True
                for row in range(sae.n):
                    assert resample_dead(sae, row, dead, x[:512], opt, torch.Generator().manual_seed(row)) == 3
    return sae


def copy_of(sae):
    out = SAEStack(sae.configs)
    out.load_state_dict(sae.state_dict())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_equals_dense_after_training(name):
    """From trained weights (far from their initialisation, with dead and resampled latents), SGD
    steps on the sparse path and on the dense one give the same losses, gradients and SAEs."""
    from conftest import sparse_data

    configs = CASES[name]
    x, _ = sparse_data(n=2048, d=D, m=30)
    start = trained(configs, x * 3)
    assert not torch.allclose(start.W_dec, SAEStack(configs).W_dec, atol=0.05)  # far from the initialisation
    assert not torch.allclose(start.W_dec[0], start.W_dec[1], atol=0.05)  # two distinct SAEs in the stack
    saes = {path: copy_of(start) for path in ("dense", "sparse")}
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        batch = x[torch.randint(len(x), (128,), generator=g)] * 3
        dead = None
        if configs[0].arch.uses_auxk:
            dead = torch.zeros(2, M, dtype=torch.bool)
            dead[:, :8] = True  # 0-2 dead, 3-5 resampled, 6-7 alive: AuxK sees all three kinds
        res = {}
        for path, sae in saes.items():
            sae.zero_grad(set_to_none=True)
            res[path] = sae.losses(batch, dead=dead, l1_scale=0.5, path=path)
            res[path]["loss"].sum().backward()
        assert res["sparse"]["path"] == "sparse"
        for k in TERMS:
            if k in res["dense"]:
                assert torch.allclose(res["dense"][k], res["sparse"][k], rtol=1e-5, atol=1e-6), k
        fired = res["sparse"]["fired"]
        assert torch.equal(res["dense"]["fired"], fired)
        assert not fired[:, :3].any()  # the dead latents stay silent
        d, s = saes["dense"], saes["sparse"]
        with torch.no_grad():
            for (pn, pd), ps in zip(d.named_parameters(), s.parameters()):
                assert torch.allclose(pd.grad, ps.grad, rtol=1e-4, atol=1e-6), (pn, (pd.grad - ps.grad).abs().max())
                pd.sub_(0.05 * pd.grad)
                ps.sub_(0.05 * ps.grad)
            for sae in (d, s):
                if sae.unit_norm:
                    sae.normalize_decoder()
    assert fired[:, 3:6].any()  # resampled latents fire again
    xt = torch.randn(64, D, generator=torch.Generator().manual_seed(9)) * 3
    assert torch.allclose(saes["dense"].encode(xt), saes["sparse"].encode(xt), atol=1e-5)
    assert torch.allclose(saes["dense"](xt), saes["sparse"](xt), atol=1e-5)
    assert not torch.allclose(saes["dense"].W_dec, start.W_dec)  # the steps changed the SAEs


# ---- the generic (non-CPU) branches, forced on a CPU -------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_generic_branch_equals_cpu_branch_and_dense(name, monkeypatch):
    """What a GPU would run (chunked gathers for the sampled dot product, pre-activations of the whole
    batch at once), forced on a CPU, gives the CPU branch's and the dense path's losses and gradients."""
    configs, x, dead = random_case(name)
    monkeypatch.setattr(SAEStack, "_BLOCK_BYTES", 4 * M * 16)  # CPU branch: pre-activations 16 rows at a time
    real, calls = torch.sparse.sampled_addmm, []
    monkeypatch.setattr(torch.sparse, "sampled_addmm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cpu = both_paths(configs, x, dead=dead, l1_scale=0.3)
    assert calls  # the CPU branch ran
    n_cpu = len(calls)
    with sparse.force_generic():
        assert not sparse.use_cpu_kernels(x)
        generic = both_paths(configs, x, dead=dead, l1_scale=0.3)
    assert len(calls) == n_cpu  # the generic branch ran
    assert sparse.use_cpu_kernels(x)  # and the setting is restored
    assert_same(generic)  # generic sparse == dense
    (rc, gc, _), (rg, gg, _) = cpu["sparse"], generic["sparse"]
    for k in TERMS:
        if k in rc:
            assert torch.allclose(rc[k], rg[k], rtol=1e-6, atol=1e-7), k
    for name_ in gc:
        assert torch.allclose(gc[name_], gg[name_], rtol=1e-5, atol=1e-7), name_


def test_generic_branch_from_the_environment():
    import os
    import subprocess
    import sys

    code = "import torch, helpers.saes.sparse as s; print(s.FORCE_GENERIC, s.use_cpu_kernels(torch.zeros(1)))"
    for value, expected in (("1", "True False"), ("0", "False True"), ("", "False True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "SAE_SPARSE_FORCE_GENERIC": value})
        assert out.stdout.split() == expected.split(), value


# ---- the dense path's L1 penalty: no fp32 copy of the codes -------------------------------------
class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor that an aten op returns, backward included."""

    def __enter__(self):
        self.out = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for t in (res if isinstance(res, (tuple, list)) else [res]):
            if isinstance(t, torch.Tensor):
                self.out.append((str(func), t.dtype, t.numel()))
        return res


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_l1_penalty_without_an_fp32_copy_of_the_codes(dtype):
    g = torch.Generator().manual_seed(0)
    n, B, m = 2, 256, 300
    c32 = torch.relu(torch.randn(n, B, m, generator=g))
    w = torch.randn(n, m, D, generator=g, requires_grad=True)
    c = c32.to(dtype).requires_grad_()
    ref_c = c.detach().float().requires_grad_()
    ref = (ref_c.abs() * w.norm(dim=-1).unsqueeze(1)).sum(-1).mean(-1)  # the formula, in fp32
    ref_gc, ref_gw = torch.autograd.grad(ref.sum(), (ref_c, w))
    with _Allocations() as rec:
        pen = SAEStack._l1_penalty(c, w)
        gc, gw = torch.autograd.grad(pen.sum(), (c, w))
    big = [(op, dt) for op, dt, numel in rec.out if numel >= c.numel() and dt != dtype]
    assert not big, f"[n, B, m] temporaries of another dtype than the codes': {big}"
    assert pen.dtype == torch.float32 and gc.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(pen, ref, rtol=tol)
    on = c > 0  # where a code is 0 its ReLU passes no gradient, whatever the penalty's is
    assert torch.allclose(gc.float()[on], ref_gc[on], rtol=tol, atol=1e-7)
    assert torch.allclose(gw, ref_gw, rtol=tol, atol=1e-6)
    with sparse.force_generic():  # the branch a GPU takes (where the reduction reads the codes in their dtype)
        assert torch.allclose(SAEStack._l1_penalty(c, w), ref, rtol=tol)


# ---- the trainer end to end: several Adam steps of a sweep on each path -------------------------
SWEEP = [SAEConfig(D, 48, l1_coefficient=a) for a in (3e-3, 3e-2)] + \
        [SAEConfig(D, 48, l1_coefficient=a, recipe="improved") for a in (3e-3, 3e-2)] + \
        [SAEConfig(D, 48, architecture="topk", k=k) for k in (3, 6)] + \
        [SAEConfig(D, 48, architecture="batchtopk", k=k) for k in (3, 6)] + \
        [SAEConfig(D, 48, architecture="matryoshka_batchtopk", k=k) for k in (3, 6)] + \
        [SAEConfig(D, 48, architecture="jumprelu", l0_coefficient=a, jumprelu_bandwidth=0.05) for a in (3e-3, 3e-2)]


def test_sparse_and_dense_paths_train_the_same_distinct_saes(array_store):
    """Several Adam steps of a sweep of distinct SAEs (two per family, different α or k, different
    initial dictionaries) on the sparse path and on the dense one end at the same SAEs and losses."""
    from conftest import sparse_data
    from helpers.saes.stack import initial_dictionary
    from helpers.saes.train import TrainConfig, train_sweep

    x, _ = sparse_data(n=2048, d=D, m=30)
    store = array_store(x * 3)
    tc = TrainConfig(total_tokens=128 * 8, batch_size=128, lr=3e-3, warmup_steps=2, log_every=1, device="cpu",
                     dead_window=256)
    out = {p: train_sweep(store, "blocks.0.hook_resid_post", SWEEP, dataclasses.replace(tc, path=p), progress=False)
           for p in ("sparse", "dense")}
    s, d = out["sparse"], out["dense"]
    assert all(all(h["sparse_steps"]) for h in s.history) and not any(any(h["sparse_steps"]) for h in d.history)
    for i, c in enumerate(SWEEP):
        ws, wd = s.saes[i].W_dec, d.saes[i].W_dec
        assert not torch.allclose(ws[0], initial_dictionary(c, tc.seed), atol=1e-3)  # the steps moved it
        assert torch.allclose(ws, wd, atol=2e-4), (c.label, (ws - wd).abs().max())
        assert torch.allclose(s.saes[i].b_enc, d.saes[i].b_enc, atol=2e-4), c.label
        assert [h["mse"][i] for h in s.history] == pytest.approx([h["mse"][i] for h in d.history], rel=1e-3)
    for a, b in zip(range(0, len(SWEEP), 2), range(1, len(SWEEP), 2)):  # the two SAEs of each family differ
        assert not torch.allclose(s.saes[a].W_dec, s.saes[b].W_dec, atol=0.05)
