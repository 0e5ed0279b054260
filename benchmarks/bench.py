"""Benchmarks (commands, not tests): harvest and SAE-training throughput.

    python -m benchmarks.bench harvest [--profile P] [--tokens N] [--device cuda]
    python -m benchmarks.bench train [--d 576] [--ratios 2 4 8 16] [--batch 4096] [--k 32] [--l0 50] [--sweep 12]
    python -m benchmarks.bench generate [--profile cpu] [--device cuda]

harvest: harvest throughput beside a bare forward pass to the same layer, on the same contexts
with the same batch size; the harvest also tokenises the corpus, caches the hooks, casts, copies
to the CPU and writes shards (to a temporary folder). The figure to watch is the ratio harvest
time / bare forward time (target: at most 1.25).

train: tokens/s of one training step (helpers.saes.train.train_step, on batches in memory) of our SAEs on
the dense path and on the sparse one (helpers.saes.sparse), with BatchTopK, Matryoshka BatchTopK and
JumpReLU on the sparse path (helpers.saes.architectures), of SAELens's standard L1 SAE and of EleutherAI
sparsify's TopK SAE (benchmarks.bench_others; shown as n/a where not installed), at several R, beside
the device's measured matmul rate (bf16 on GPU, fp32 on CPU). A dense SAE costs about 12·d·m FLOP
per token (two matmuls forward, four backward); each cell gives tokens/s and that dense-equivalent
FLOP rate as a fraction of the matmul rate (a sparse path can exceed 100%). The L1 SAEs are set to
the regime after warm-up (about --l0 active latents per token). Then a sweep of --sweep SAEs in one
stack against one SAE of the same size.

generate: steered, sampled generation (helpers.causal.steering.generate_ids) with the key-value cache
and with one full forward pass per new token, at the shape of a profile's steering comparison for one
prompt (every concept, direction and KL target, and the unsteered rows, times the samples), the same
seeds: the seconds of each, their ratio, and the share of rows both write alike.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch

from helpers.activations.corpus import iter_contexts
from helpers.activations.harvest import batched, harvest, stop_layer, validate_hooks
from helpers.activations.models import load_model, resolve_device
from helpers.settings.profiles import get_profile


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
    batches = [torch.as_tensor(np.stack([c.tokens for c in b])) for b in batched(contexts, P.batch_contexts)]
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


def _calibrate_l0(stack, x: torch.Tensor, l0: float) -> None:
    """Set each latent's encoder bias so that it fires on a share l0 / d_sae of the rows of x: a
    stand-in for an L1 (or JumpReLU) SAE after warm-up, whose codes are sparse. A latent fires above
    its threshold (JumpReLU's, per latent) or above 0."""
    with torch.no_grad():
        pre = stack.pre_acts(x)                                   # [n, B, m]
        q = torch.quantile(pre.float(), 1 - l0 / stack.d_sae, dim=1)  # [n, m]
        theta = stack.arch.state(stack).get("threshold")             # per latent (JumpReLU), else 0
        theta = torch.zeros_like(q) if theta is None else theta.detach().reshape(stack.n, -1).to(q)
        stack.b_enc.sub_((q - theta).to(stack.b_enc.dtype))


def ours_step_fn(d: int, m: int, batch: torch.Tensor, device, *, architecture: str = "standard",
                 path: str = "auto", n_saes: int = 1, k: int = 32, l0: float | None = None,
                 precision: str = "auto"):
    """One training step of our trainer (helpers.saes.train.train_step: losses, backward, the recipe's
    gradient treatment, fused Adam, renormalisation) for n_saes SAEs of one size stacked, on an
    in-memory batch. Architectures of fixed sparsity (TopK, BatchTopK, ...) keep k latents per token;
    for the others (L1, JumpReLU), `l0` sets the encoder biases so that about l0 latents fire per
    token (the regime after warm-up). Returns (step function, the stack)."""
    from helpers.saes.architectures import get
    from helpers.saes.stack import SAEConfig
    from helpers.saes.train import TrainConfig, amp, build_stacks, make_optimizer, train_step

    arch = get(architecture)
    configs = [SAEConfig(d, m, architecture=architecture, **arch.default_setting(k if arch.fixed_sparsity else l0 or k, i))
               for i in range(n_saes)]
    stacks, _ = build_stacks(configs, seed=0)
    st = stacks[0].to(device)
    with torch.no_grad():
        st.scale.fill_(math.sqrt(d) / float(batch.float().norm(dim=-1).mean()))
    if l0 is not None and not arch.fixed_sparsity:
        _calibrate_l0(st, batch, l0)
    # a tiny LR keeps the codes in the calibrated regime while we time (the cost of a step does not depend on it)
    tc = TrainConfig(batch_size=len(batch), device=str(device), path=path, warmup_steps=1, dead_window=10**12, lr=1e-7)
    opt, sched = make_optimizer([st], tc, total_steps=10**9)
    since = [torch.zeros(st.n, st.d_sae, dtype=torch.int64, device=device)]
    autocast, scaler = amp(torch.device(device), precision)
    state = {}

    def step():
        state["outs"] = train_step([st], [batch], opt, sched, since, tc, autocast=autocast, scaler=scaler)

    step.state = state
    return step, st


def time_steps(step, device, steps: int, warmup: int = 2) -> float:
    """Seconds per call of step(), the best of a few timed blocks after warm-up."""
    for _ in range(warmup):
        step()
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(max(1, steps // 3)):
            step()
        _sync(device)
        best = min(best, (time.perf_counter() - t) / max(1, steps // 3))
    return best


def bench_train(a) -> None:
    from benchmarks import bench_others

    from helpers.saes.train import resolve_precision

    device = resolve_device(a.device)
    precision = resolve_precision(device, a.precision)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    d, B = a.d, a.batch
    print(f"SAE training step on {name}, d={d}, batch {B}, "
          f"{precision + ' autocast' + (' + grad scaler' if precision == 'fp16' else '') if precision != 'fp32' else 'fp32'}, "
          f"batches in memory; tokens/s (fraction of the dense-equivalent FLOP rate: 12·d·m FLOP per token "
          f"over the measured {precision} matmul rate)")
    print("external libraries:", bench_others.versions())
    cols = ["ours L1 dense", f"ours L1 sparse (L0~{a.l0:g})", "ours TopK dense", f"ours TopK sparse (k={a.k})",
            f"ours BatchTopK sparse (k={a.k})", f"ours Matryoshka sparse (k={a.k})", f"ours JumpReLU sparse (L0~{a.l0:g})",
            "SAELens L1", f"sparsify TopK (k={a.k})"]
    print(f"{'R':>4} {'m':>6} {'matmul TFLOP/s':>14} " + " ".join(f"{c:>24}" for c in cols), flush=True)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(B, d, generator=g).to(device)
    results = []
    for ratio in a.ratios:
        m = int(round(d * ratio))
        rate = matmul_rate(device, dtype, B, d, m)
        cells, row = [], {"R": ratio, "m": m, "matmul_flops": rate}
        runs = [("ours L1 dense", lambda: ours_step_fn(d, m, batch, device, path="dense", l0=a.l0, precision=precision)[0]),
                ("ours L1 sparse", lambda: ours_step_fn(d, m, batch, device, path="auto", l0=a.l0, precision=precision)[0]),
                ("ours TopK dense", lambda: ours_step_fn(d, m, batch, device, architecture="topk", path="dense", k=a.k, precision=precision)[0]),
                ("ours TopK sparse", lambda: ours_step_fn(d, m, batch, device, architecture="topk", path="sparse", k=a.k, precision=precision)[0]),
                ("ours BatchTopK sparse", lambda: ours_step_fn(d, m, batch, device, architecture="batchtopk", path="sparse", k=a.k, precision=precision)[0]),
                ("ours Matryoshka sparse", lambda: ours_step_fn(d, m, batch, device, architecture="matryoshka_batchtopk", path="sparse", k=a.k, precision=precision)[0]),
                ("ours JumpReLU sparse", lambda: ours_step_fn(d, m, batch, device, architecture="jumprelu", path="auto", l0=a.l0, precision=precision)[0]),
                ("SAELens L1", lambda: bench_others.saelens_step_fn(d, m, batch, device, dtype)),
                ("sparsify TopK", lambda: bench_others.sparsify_step_fn(d, m, a.k, batch, device, dtype))]
        for label, make in runs:
            try:
                step = make()
            except Exception as e:  # an external library's API changed: say so, keep going
                step = f"failed: {type(e).__name__}: {str(e)[:60]}"
            if isinstance(step, str):
                cells.append(f"{'n/a':>24}")
                row[label] = None
                row[label + " note"] = step
                continue
            tok_s = B / time_steps(step, device, a.steps)
            row[label] = tok_s
            if label.startswith("ours"):
                out = step.state["outs"][0]
                row[label + " note"] = f"path {out['path']}, L0 {float(out['l0'][0]):.0f} on the last step"
            cells.append(f"{tok_s:>14,.0f} ({tok_s * 12 * d * m / rate:>6.1%})")
        results.append(row)
        print(f"{ratio:>4g} {m:>6} {rate / 1e12:>14.2f} " + " ".join(cells), flush=True)
    for row in results:
        notes = {k: v for k, v in row.items() if k.endswith(" note")}
        for k, v in notes.items():
            print(f"  R={row['R']:g}: {k[:-5]}: {v}")
    # Ratios that the targets are stated in, from the same run.
    for row in results:
        def ratio_of(x, y):
            return f"{row[x] / row[y]:.2f}x" if row.get(x) and row.get(y) else "n/a"
        print(f"R={row['R']:g}: TopK sparse / dense {ratio_of('ours TopK sparse', 'ours TopK dense')}, "
              f"/ sparsify {ratio_of('ours TopK sparse', 'sparsify TopK')}; L1 sparse / dense "
              f"{ratio_of('ours L1 sparse', 'ours L1 dense')}, / SAELens {ratio_of('ours L1 sparse', 'SAELens L1')}")
    if a.sweep > 1:
        m = int(round(d * a.sweep_ratio))
        # Every SAE of a stack needs its own dense encoder forward (2·B·d·m FLOP): at the measured
        # matmul rate that alone bounds the stack's time from below, whatever the rest costs.
        t_mm = 2 * B * d * m / matmul_rate(device, dtype, B, d, m)
        for name, kw in (("TopK", {"architecture": "topk", "k": a.k}), ("L1", {"l0": a.l0})):
            one = time_steps(ours_step_fn(d, m, batch, device, n_saes=1, precision=precision, **kw)[0], device, a.steps)
            many = time_steps(ours_step_fn(d, m, batch, device, n_saes=a.sweep, precision=precision, **kw)[0], device, a.steps)
            print(f"sweep of {a.sweep} {name} SAEs at R={a.sweep_ratio:g} in one stack: {many * 1e3:.0f} ms a step "
                  f"({a.sweep * B / many:,.0f} SAE-tokens/s), one alone {one * 1e3:.1f} ms; "
                  f"{many / one:.2f}x the time of one ({a.sweep / (many / one):.2f}x the SAE-tokens/s); the encoder's "
                  f"dense forward alone is {t_mm / one:.0%} of one SAE's step, so {a.sweep} cannot take less than "
                  f"{a.sweep * t_mm / one:.1f}x one at this matmul rate", flush=True)


def bench_generate(a) -> None:
    from helpers.causal.steering import METHODS, PROMPTS, comparison_settings, generate_ids

    profile = get_profile(a.profile)
    st = comparison_settings(profile)
    device = resolve_device(a.device or profile.device)
    model = load_model(profile.model, device=device)
    hook = profile.sae_hook
    rows = (1 + st.max_concepts * len(METHODS) * len(st.targets)) * st.samples
    g = torch.Generator().manual_seed(0)
    vecs = 50 * torch.randn(rows, model.cfg.d_model, generator=g) / model.cfg.d_model ** 0.5
    vecs[0] = 0
    seeds = list(range(rows))
    generate_ids(model, PROMPTS[0], hook, vecs[:2], 2)  # warm-up
    seconds, ids = {True: [], False: []}, {}
    for _ in range(a.repeats):
        for cache in (False, True):
            _sync(device)
            t = time.perf_counter()
            ids[cache] = generate_ids(model, PROMPTS[0], hook, vecs, st.n_new, sample=True, seeds=seeds,
                                      kv_cache=cache)
            _sync(device)
            seconds[cache].append(time.perf_counter() - t)
    full, cached = min(seconds[False]), min(seconds[True])
    same = float((ids[True] == ids[False]).all(1).float().mean())
    print(f"profile {profile.name}: {rows} rows x {st.n_new} new tokens after {PROMPTS[0]!r}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  one full pass per token: {full:8.2f} s")
    print(f"  key-value cache:         {cached:8.2f} s   ({full / cached:.2f}x faster)")
    print(f"  rows written alike:      {same:8.0%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("harvest", help="harvest vs bare forward")
    h.add_argument("--profile", default=None)
    h.add_argument("--tokens", type=int, default=None)
    h.add_argument("--device", default=None)
    h.add_argument("--repeats", type=int, default=2)
    t = sub.add_parser("train", help="SAE trainer throughput")
    t.add_argument("--d", type=int, default=576)
    t.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16])
    t.add_argument("--batch", type=int, default=4096)
    t.add_argument("--k", type=int, default=32, help="TopK's k")
    t.add_argument("--l0", type=float, default=50, help="L0 of the L1 SAEs in the sparse regime")
    t.add_argument("--sweep", type=int, default=12, help="SAEs in the sweep measurement (0: skip)")
    t.add_argument("--sweep-ratio", type=float, default=8)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--device", default=None)
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on a GPU with native bf16, fp16 + grad scaler on other GPUs, fp32 on CPU")
    gen = sub.add_parser("generate", help="steered generation with and without the key-value cache")
    gen.add_argument("--profile", default="cpu")
    gen.add_argument("--device", default=None)
    gen.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    if a.what == "train":
        bench_train(a)
        return
    if a.what == "generate":
        bench_generate(a)
        return
    r = run(a.profile, a.tokens, a.device, a.repeats)
    name = torch.cuda.get_device_name() if r["device"].startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nprofile {r['profile']} on {name}: {r['tokens']:,} tokens, batch {r['batch']}, hooks {r['hooks']}")
    print(f"  bare forward (stop_at_layer): {r['bare_tok_s']:>10,.0f} tok/s")
    print(f"  harvest (to disk):            {r['harvest_tok_s']:>10,.0f} tok/s")
    print(f"  harvest / bare time:          {r['ratio']:>10.2f}x   (target <= 1.25x)")


if __name__ == "__main__":
    main()
