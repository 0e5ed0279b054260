"""Benchmark: harvest throughput beside a bare forward pass to the same layer.

    python -m helpers.bench                    # profile from $SAE_PROFILE (default cpu / gpu)
    python -m helpers.bench --tokens 50000 --device cuda

Both run on the same contexts with the same batch size; the harvest also tokenises the corpus,
caches the hooks, casts, copies to the CPU and writes shards (to a temporary folder). The
figure to watch is the ratio harvest time / bare forward time (target: at most 1.25).
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    r = run(a.profile, a.tokens, a.device, a.repeats)
    name = torch.cuda.get_device_name() if r["device"].startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nprofile {r['profile']} on {name}: {r['tokens']:,} tokens, batch {r['batch']}, hooks {r['hooks']}")
    print(f"  bare forward (stop_at_layer): {r['bare_tok_s']:>10,.0f} tok/s")
    print(f"  harvest (to disk):            {r['harvest_tok_s']:>10,.0f} tok/s")
    print(f"  harvest / bare time:          {r['ratio']:>10.2f}x   (target <= 1.25x)")


if __name__ == "__main__":
    main()
