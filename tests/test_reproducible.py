"""Training is bit-reproducible at a size where the sparse path's kernels run multi-threaded.

tests/test_train.py checks the same properties on tiny data (d=16, batches of 128), where every
kernel runs on one thread. Here batches hold enough active (token, latent) pairs (more than torch's
parallel grain of 32768) that the sparse path's gathers and scatters run on several threads: a
kernel that sums with float atomics or in a thread-dependent order would make two runs differ.
The tests run at 2 threads (and one at 1 thread). Bit-identity holds on the same thread count, device
and precision: a checkpoint records them, and a resume on another setting warns (tests/test_train.py).
On a CPU the thread count does not change a step's sums either: the last two tests train a sweep's
stacks side by side (one thread each), one after another on 2 threads, and on 1 thread, and compare.
"""
import threading
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


def test_the_improved_clip_sums_the_same_on_one_thread_as_on_two():
    """Each SAE's gradient norm (`clip_grad_norm_per_sae`) adds the same numbers in the same order on 1 and
    2 threads: a plain `.sum()` over a gradient of more than 32768 elements splits it between the threads
    and rounds differently (for about half of such gradients), which grew into different SAEs over a run."""
    from helpers.saes.train import clip_grad_norm_per_sae

    cfgs = [SAEConfig(D, 1024, l1_coefficient=a, recipe="improved") for a in (3e-3, 1e-2)]
    old = torch.get_num_threads()
    try:
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            grads, out = None, {}
            for n in (1, 2):
                torch.set_num_threads(n)
                st = SAEStack(cfgs, seed=0)
                if grads is None:
                    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in st.parameters()]
                for p, gr in zip(st.parameters(), grads):
                    p.grad = gr.clone()
                out[n] = (clip_grad_norm_per_sae(st, 1e-4), [p.grad.clone() for p in st.parameters()])
            assert torch.equal(out[1][0], out[2][0]), (seed, (out[1][0] - out[2][0]).tolist())
            assert all(torch.equal(a, b) for a, b in zip(out[1][1], out[2][1])), seed
    finally:
        torch.set_num_threads(old)


def test_stacks_trained_side_by_side_end_as_one_after_another_and_as_on_one_thread(store):
    """On 2 threads a sweep's stacks train side by side (`StackPool`, one thread each); every family (with
    dictionaries big enough for torch to split a sum between threads) ends bit for bit as when its stacks
    train one after another on 2 threads, and as on 1 thread."""
    from helpers.saes import train

    configs = [SAEConfig(D, 1024, l1_coefficient=3e-3), SAEConfig(D, 1024, l1_coefficient=3e-3, recipe="improved"),
               SAEConfig(D, 1024, architecture="topk", k=16), SAEConfig(D, 1024, architecture="jumprelu")]
    tc = TrainConfig(**{**TC.__dict__, "path": "auto", "total_tokens": B * 12})  # a resampling at step 8 included
    used = []
    real = train.StackPool.for_stacks

    def spy(*a, **kw):
        pool = real(*a, **kw)
        used.append(pool is not None)
        return pool

    old = torch.get_num_threads()
    out = {}
    try:
        for name, threads, parallel in [("side by side", 2, True), ("one after another", 2, False), ("1 thread", 1, True)]:
            torch.set_num_threads(threads)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(train.StackPool, "for_stacks", spy)
                out[name] = weights(train_sweep(store, HOOK, configs, TrainConfig(**{**tc.__dict__,
                                                "parallel_stacks": parallel}), progress=False))
            # the caller computes on its own thread count afterwards, and so does a thread started later
            later = []
            t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
            t.start()
            t.join()
            assert (torch.get_num_threads(), later) == (threads, [threads]), name
    finally:
        torch.set_num_threads(old)
    assert used == [True, False, False]  # the pool ran where it should, and only there
    assert_bitwise(out["side by side"], out["one after another"], configs)
    assert_bitwise(out["side by side"], out["1 thread"], configs)
