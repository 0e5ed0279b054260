"""Training is bit-reproducible at a size where the sparse path's kernels run multi-threaded.

tests/test_train.py checks the same properties on tiny data (d=16, batches of 128), where every
kernel runs on one thread. Here batches hold enough active (token, latent) pairs (more than torch's
parallel grain of 32768) that the sparse path's gathers and scatters run on several threads: a
kernel that sums with float atomics or in a thread-dependent order would make two runs differ.
The tests run at 2 threads (and one at 1 thread). Bit-identity holds on the same thread count, device
and precision: a checkpoint records them, and a resume on another setting warns (tests/test_train.py).
"""
import warnings

import pytest
import torch

from conftest import sparse_data
from helpers.saes.stack import SAEConfig, SAEStack
from helpers.saes.train import TrainConfig, train_sweep

HOOK = "blocks.0.hook_resid_post"
D, M, B = 64, 256, 512
STEPS = 24
TC = TrainConfig(total_tokens=B * STEPS, batch_size=B, lr=3e-3, warmup_steps=4, dead_window=4 * B,
                 resample_every=8, resample_until=0.7, resample_pool=2048, log_every=1, checkpoint_every=8,
                 device="cpu", buffer_shards=2, path="sparse")
FAMILIES = {
    "anthropic2023 L1": [SAEConfig(D, M, l1_coefficient=a) for a in (3e-3, 1e-2)],
    "improved L1": [SAEConfig(D, M, l1_coefficient=a, recipe="improved") for a in (3e-3, 1e-2)],
    "TopK": [SAEConfig(D, M, architecture="topk", k=k) for k in (16, 32)],
}


@pytest.fixture(params=[2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture
def store(array_store):
    x, _ = sparse_data(n=4096, d=D, m=4 * D, per_token=6)
    return array_store(x)


def weights(result):
    return [torch.cat([p.detach().flatten() for p in s.parameters()]) for s in result.saes]


def assert_bitwise(a, b, configs):
    diffs = {c.label: float((x - y).abs().max()) for c, x, y in zip(configs, a, b) if not torch.equal(x, y)}
    assert not diffs, f"weights differ (max abs difference per SAE): {diffs}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_seed_same_weights(store, threads, family):
    configs = FAMILIES[family]
    a = train_sweep(store, HOOK, configs, TC, progress=False)
    assert all(all(h["sparse_steps"]) for h in a.history if "sparse_steps" in h)  # the sparse path ran
    b = train_sweep(store, HOOK, configs, TC, progress=False)
    assert_bitwise(weights(a), weights(b), configs)


def test_same_seed_same_weights_auto_path_one_thread(store):
    """The "auto" path (sparse where codes are sparse enough) with every family in one sweep, at 1 thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        configs = [c for cs in FAMILIES.values() for c in cs]
        tc = TrainConfig(**{**TC.__dict__, "path": "auto"})
        a, b = (weights(train_sweep(store, HOOK, configs, tc, progress=False)) for _ in range(2))
    finally:
        torch.set_num_threads(old)
    assert_bitwise(a, b, configs)


def test_resume_equals_uninterrupted(store, threads, tmp_path, monkeypatch):
    """Killed after its checkpoint at step 8 (during step 13) and started again, a sweep of all three
    families ends bit for bit as an uninterrupted one."""
    configs = [c for cs in FAMILIES.values() for c in cs]
    clean = weights(train_sweep(store, HOOK, configs, TC, run_dir=tmp_path / "a", progress=False))
    real, calls = SAEStack.losses, {"n": 0}

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3 * 12 + 1:  # the first stack's losses at step 13 (3 stacks a step)
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(SAEStack, "losses", dying)
    with pytest.raises(KeyboardInterrupt):
        train_sweep(store, HOOK, configs, TC, run_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(SAEStack, "losses", real)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same threads, device and precision: no setting warning
        resumed = weights(train_sweep(store, HOOK, configs, TC, run_dir=tmp_path / "b", progress=False))
    assert_bitwise(clean, resumed, configs)
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["setting"]
    assert saved == {"threads": threads, "device": "cpu", "precision": "fp32"}
