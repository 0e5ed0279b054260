"""Benchmarks (commands, not tests): harvest and SAE-training throughput.

    python -m helpers.bench harvest [--profile P] [--tokens N] [--device cuda]
    python -m helpers.bench train [--d 512 576] [--ratios 2 4 8 16 32] [--batch 4096] [--sweep 16]

harvest: harvest throughput beside a bare forward pass to the same layer, on the same contexts
with the same batch size; the harvest also tokenises the corpus, caches the hooks, casts, copies
to the CPU and writes shards (to a temporary folder). The figure to watch is the ratio harvest
time / bare forward time (target: at most 1.25).

train: tokens/s of `train_sweep` (data loading from a store included) for one SAE and for a sweep
of SAEs of one size, beside the measured matmul rate of the device (bf16 on GPU, fp32 on CPU);
a dense SAE costs about 10·d·m FLOPs per token (forward, backward and update), and the table
gives the fraction of the matmul rate that reaches.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch

from .corpus import iter_contexts
from .harvest import _batched, harvest, stop_layer, validate_hooks
from .models import load_model, resolve_device
from .profiles import get_profile


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward_seconds(model, batches, hooks, device) -> float:
    stop = stop_layer(hooks)
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            model(tokens.to(device), stop_at_layer=stop)
    _sync(device)
    return time.perf_counter() - t


def run(profile_name=None, tokens=None, device=None, repeats=2) -> dict:
    P = get_profile(profile_name)
    device = resolve_device(device or P.device)
    n_tokens = tokens or min(P.harvest_tokens, 100_000 if device.type == "cpu" else 2_000_000)
    model = load_model(P.model, device=device)
    hooks = validate_hooks(model, P.hooks)
    per_ctx = P.ctx_len - 1
    n_ctx = math.ceil(n_tokens / per_ctx)
    contexts = list(iter_contexts(model.tokenizer, P.corpus, P.ctx_len, seed=P.seed, max_contexts=n_ctx))
    batches = [torch.as_tensor(np.stack([c.tokens for c in b])) for b in _batched(contexts, P.batch_contexts)]
    bare_forward_seconds(model, batches[:2], hooks, device)  # warm-up
    bare, harv = [], []
    for _ in range(repeats):  # interleaved, so that drifting machine load hits both alike
        bare.append(bare_forward_seconds(model, batches, hooks, device))
        with tempfile.TemporaryDirectory() as tmp:
            _sync(device)
            t = time.perf_counter()
            harvest(model, tmp, hooks, corpus=P.corpus, ctx_len=P.ctx_len, n_tokens=n_tokens,
                    batch_contexts=P.batch_contexts, shard_contexts=P.shard_contexts,
                    dtype=P.store_dtype, seed=P.seed, progress=False)
            _sync(device)
            harv.append(time.perf_counter() - t)
    done = n_ctx * per_ctx
    result = {
        "profile": P.name, "device": str(device), "hooks": hooks, "tokens": done,
        "batch": f"{P.batch_contexts}x{P.ctx_len}",
        "bare_tok_s": done / min(bare), "harvest_tok_s": done / min(harv),
        "ratio": min(harv) / min(bare),
    }
    return result


def matmul_rate(device, dtype, n: int, k: int, m: int, repeats: int = 10) -> float:
    """Measured FLOP/s of an [n, k] @ [k, m] matmul."""
    a = torch.randn(n, k, device=device, dtype=dtype)
    b = torch.randn(k, m, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n * k * m * repeats / (time.perf_counter() - t)


def train_throughput(d: int, ratio: float, n_saes: int, batch: int, steps: int, device,
                     architecture: str = "standard") -> float:
    """tokens/s of train_sweep for n_saes SAEs of one size on a synthetic store (each SAE sees
    every token, so a sweep's data rate is this number, its SAE-token rate n_saes times it)."""
    from .sae import SAEConfig
    from .store import META_DTYPE, StoreWriter
    from .train import TrainConfig, train_sweep

    hook = "blocks.0.hook_resid_post"
    n_tok = batch * (steps + 2)
    with tempfile.TemporaryDirectory() as tmp:
        w = StoreWriter(tmp, {"model": "bench", "corpus": "none", "split": "train", "ctx_len": 2, "seed": 0,
                              "hooks": [hook], "d_model": d, "dtype": "bfloat16" if device.type == "cuda" else "float16"})
        per_shard = max(batch, 65536)
        for s, i in enumerate(range(0, n_tok, per_shard)):
            x = torch.randn(min(per_shard, n_tok - i), d)
            w.write_shard(np.zeros(len(x), dtype=META_DTYPE), {hook: x}, s, 1)
        store = w.finish()
        kw = {"k": 32} if architecture == "topk" else {}
        configs = [SAEConfig.from_ratio(d, ratio, architecture=architecture,
                                        l1_coefficient=1e-3 * (1 + i) if architecture == "standard" else 0, **kw)
                   for i in range(n_saes)]
        tc = TrainConfig(total_tokens=batch * 2, batch_size=batch, device=str(device), log_every=10**9,
                         warmup_steps=1, resample_every=0)
        train_sweep(store, hook, configs, tc, progress=False)  # warm-up
        tc = TrainConfig(total_tokens=batch * steps, batch_size=batch, device=str(device), log_every=10**9,
                         warmup_steps=1, resample_every=0, dead_window=batch * steps)
        r = train_sweep(store, hook, configs, tc, progress=False)
        return r.tokens / r.seconds


def bench_train(a) -> None:
    device = resolve_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"SAE training on {name}, batch {a.batch}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
          f"{a.steps} steps each")
    print(f"{'d':>5} {'R':>4} {'m':>7} {'matmul TFLOP/s':>15} {'1 SAE tok/s':>12} {'frac':>6} "
          f"{f'{a.sweep}-SAE sweep tok/s':>20} {'SAE-tok/s':>10} {'frac':>6} {'TopK tok/s':>11}")
    for d in a.d:
        for ratio in a.ratios:
            m = int(round(d * ratio))
            rate = matmul_rate(device, dtype, a.batch, d, m)
            one = train_throughput(d, ratio, 1, a.batch, a.steps, device)
            many = train_throughput(d, ratio, a.sweep, a.batch, a.steps, device)
            topk = train_throughput(d, ratio, 1, a.batch, a.steps, device, architecture="topk")
            flops = 10 * d * m
            print(f"{d:>5} {ratio:>4g} {m:>7} {rate / 1e12:>15.2f} {one:>12,.0f} {one * flops / rate:>6.1%} "
                  f"{many:>20,.0f} {many * a.sweep:>10,.0f} {many * a.sweep * flops / rate:>6.1%} {topk:>11,.0f}",
                  flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("harvest", help="harvest vs bare forward")
    h.add_argument("--profile", default=None)
    h.add_argument("--tokens", type=int, default=None)
    h.add_argument("--device", default=None)
    h.add_argument("--repeats", type=int, default=2)
    t = sub.add_parser("train", help="SAE trainer throughput")
    t.add_argument("--d", type=int, nargs="+", default=[512, 576])
    t.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16, 32])
    t.add_argument("--batch", type=int, default=4096)
    t.add_argument("--sweep", type=int, default=16)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    if a.what == "train":
        bench_train(a)
        return
    r = run(a.profile, a.tokens, a.device, a.repeats)
    name = torch.cuda.get_device_name() if r["device"].startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nprofile {r['profile']} on {name}: {r['tokens']:,} tokens, batch {r['batch']}, hooks {r['hooks']}")
    print(f"  bare forward (stop_at_layer): {r['bare_tok_s']:>10,.0f} tok/s")
    print(f"  harvest (to disk):            {r['harvest_tok_s']:>10,.0f} tok/s")
    print(f"  harvest / bare time:          {r['ratio']:>10.2f}x   (target <= 1.25x)")


if __name__ == "__main__":
    main()
