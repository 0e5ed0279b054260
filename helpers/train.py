"""Train a sweep of SAEs in one pass over an activation store.

`train_sweep` groups the configs into stacks of equal shape (one stack per dictionary size and
architecture; the α's or k's of a size share it), reads each batch of activations once and
trains every stack on it: Adam with LR warm-up and a final linear decay, the unit-norm
projection of the dictionary after every step, dead-latent tracking, Anthropic-style resampling
of dead latents for L1 SAEs and the AuxK loss for TopK SAEs, bf16 autocast on GPU, fp32 on CPU.

A run folder keeps ``checkpoint.pt`` (written atomically every `checkpoint_every` steps and at
the end); a run started again with the same settings resumes from it and ends with the same SAEs
as an uninterrupted run. A batch holding NaN or inf stops training with an error naming the
step and the shard, and the last good checkpoint is kept.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import resolve_device
from .sae import SAEConfig, SAEStack


@dataclass(frozen=True)
class TrainConfig:
    total_tokens: int = 1_000_000
    batch_size: int = 4096
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100
    decay_fraction: float = 0.2        # LR decays linearly to 0 over this last share of steps
    dead_window: int = 200_000         # a latent silent for this many tokens is dead
    resample_every: int = 0            # steps between resamplings of dead L1 latents (0: never)
    resample_until: float = 0.7        # ... only during this first share of training
    aux_coefficient: float = 1 / 32    # AuxK (TopK SAEs)
    log_every: int = 25
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    buffer_shards: int = 4


class TrainingError(RuntimeError):
    """Training stopped: bad data, or a checkpoint that belongs to other settings."""


@dataclass
class SweepResult:
    saes: list            # one-SAE stacks, in the order of the configs given
    configs: list
    history: list         # dicts: step, tokens, and per-SAE lists of mse / l0 / dead
    seconds: float
    tokens: int

    def stack_of(self, i: int) -> SAEStack:
        return self.saes[i]


def _lr_factor(step: int, total: int, tc: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    decay_start = int(total * (1 - tc.decay_fraction))
    decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1, total - decay_start))
    return warm * decay


def data_stats(store, hook: str, n: int = 20_000) -> tuple[float, torch.Tensor]:
    """The factor that brings activations to mean norm √d_in (SAELens's 'expected_average_only_in')
    and the mean activation, from the first n finite rows of the store."""
    x = store.activations(hook, max_tokens=n)
    x = x[torch.isfinite(x).all(-1)]  # a bad row is reported when training reaches it
    if len(x) == 0:
        raise TrainingError(f"no finite activations among the first {n} rows of {hook} in {store.path}")
    return math.sqrt(x.shape[1]) / float(x.norm(dim=-1).mean()), x.mean(0)


def build_stacks(configs: list[SAEConfig], seed: int) -> tuple[list[SAEStack], list[tuple[int, int]]]:
    """Group configs by shape into stacks; return the stacks and, per config, (stack, row)."""
    groups: dict = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.shape_key, []).append(i)
    stacks, where = [], [None] * len(configs)
    for s, idx in enumerate(groups.values()):
        stacks.append(SAEStack([configs[i] for i in idx], seed=seed))
        for row, i in enumerate(idx):
            where[i] = (s, row)
    return stacks, where


def _fingerprint(configs, tc: TrainConfig, store, hook) -> dict:
    return {"configs": [dataclasses.asdict(c) for c in configs],
            "train": {k: v for k, v in dataclasses.asdict(tc).items()
                      if k not in ("log_every", "checkpoint_every", "device")},
            "store": str(store.path), "hook": hook, "store_tokens": store.n_tokens}


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def resample_dead(stack: SAEStack, row: int, dead: torch.Tensor, x: torch.Tensor, opt, gen) -> int:
    """Anthropic-style resampling of the dead latents of SAE `row` of a stack, using batch x.

    Inputs are drawn with probability proportional to their squared reconstruction error; each
    dead latent's decoder row becomes such an input's (centred, normalised) direction, its
    encoder column the same direction at 0.2 times the mean encoder norm of the live latents, its
    bias 0, and its Adam state is cleared. Returns the number resampled.
    """
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return 0
    one = stack[row]
    xs = x.float() * stack.scale[row]
    err = (one(x.float())[0] * stack.scale[row] - xs).pow(2).sum(-1)
    probs = err / err.sum() if float(err.sum()) > 0 else torch.full_like(err, 1 / len(err))
    pick = torch.multinomial(probs.cpu(), len(idx), replacement=True, generator=gen).to(x.device)
    dirs = xs[pick] - stack.b_dec[row]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    stack.W_dec[row, idx] = dirs
    if not stack.tied:
        alive = ~dead
        enc_norm = stack.W_enc[row][:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        stack.W_enc[row][:, idx] = dirs.T * 0.2 * enc_norm
    stack.b_enc[row, idx] = 0
    for p in [stack.W_dec, stack.W_enc, stack.b_enc]:
        if p is None or p not in opt.state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            buf = opt.state[p][key]
            if p is stack.W_dec:
                buf[row, idx] = 0
            elif p is stack.W_enc:
                buf[row][:, idx] = 0
            else:
                buf[row, idx] = 0
    return len(idx)


def train_sweep(store, hook: str, configs: list[SAEConfig], tc: TrainConfig = TrainConfig(),
                run_dir=None, progress: bool = True) -> SweepResult:
    """Train every config on `hook`'s activations in `store`, reading the data once."""
    if not configs:
        raise ValueError("no SAE configs given")
    store._check_hook(hook)
    for c in configs:
        if c.d_in != store.d_model:
            raise ValueError(f"SAE config d_in={c.d_in} does not match the activations' d_model="
                             f"{store.d_model} at {hook} in {store.path}")
    if tc.batch_size <= 0 or tc.total_tokens < tc.batch_size:
        raise ValueError(f"need total_tokens >= batch_size > 0, got {tc.total_tokens} and {tc.batch_size}")
    device = resolve_device(tc.device)
    total_steps = tc.total_tokens // tc.batch_size
    stacks, where = build_stacks(configs, tc.seed)
    scale, mean = data_stats(store, hook)
    mean = mean * scale
    for st in stacks:
        st.scale.fill_(scale)
        with torch.no_grad():
            st.b_dec.copy_(mean.expand_as(st.b_dec))  # start the decoder bias at the data mean
        st.to(device)
    params = [p for st in stacks for p in st.parameters()]
    opt = torch.optim.Adam(params, lr=tc.lr, betas=(tc.beta1, tc.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, tc))
    since_fired = [torch.zeros(st.n, st.d_sae, dtype=torch.int64, device=device) for st in stacks]
    # One generator per SAE, seeded by the seed and the SAE's own config, so that resampling draws
    # the same inputs whether the SAE trains alone or in a sweep.
    gens = [torch.Generator().manual_seed(tc.seed * 1_000_003 + zlib.crc32(repr(c).encode())) for c in configs]
    gen_of = {pos: gens[i] for i, pos in enumerate(where)}
    history, step, seconds = [], 0, 0.0

    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    fingerprint = _fingerprint(configs, tc, store, hook)
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=False)
            if state["fingerprint"] != fingerprint:
                diff = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
                raise TrainingError(f"checkpoint {ckpt} was made with other settings ({', '.join(diff)} "
                                    "differ): use another run folder, or delete it to start afresh")
            for st, sd in zip(stacks, state["stacks"]):
                st.load_state_dict(sd)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            since_fired = [t.to(device) for t in state["since_fired"]]
            for g, gs in zip(gens, state["generators"]):
                g.set_state(gs)
            history, step, seconds = state["history"], state["step"], state["seconds"]

    def checkpoint():
        if ckpt is not None:
            _save_checkpoint(ckpt, {
                "fingerprint": fingerprint, "stacks": [st.state_dict() for st in stacks],
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "since_fired": since_fired, "generators": [g.get_state() for g in gens],
                "history": history, "step": step, "seconds": seconds})

    epochs = math.ceil(total_steps * tc.batch_size / store.n_tokens) + 1
    batches = store.iter_batches(hook, tc.batch_size, seed=tc.seed, epochs=epochs, drop_last=True,
                                 buffer_shards=tc.buffer_shards, device=device, return_index=True)
    shard_starts = np.cumsum([s["n_tokens"] for s in store.shards])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=f"train {len(configs)} SAEs", unit="step",
               disable=not progress)
    for _ in range(step):  # resume: skip the batches already trained on (same order)
        next(batches)
    t0 = time.perf_counter()
    try:
        while step < total_steps:
            x, index = next(batches)
            if not torch.isfinite(x).all():
                bad = int(index[(~torch.isfinite(x)).any(-1).cpu()][0])
                shard = int(np.searchsorted(shard_starts, bad, side="right"))
                raise TrainingError(f"non-finite activations at step {step}: token {bad} in shard {shard} "
                                    f"({store.shards[shard]['files'][hook]['name']}); training stopped, the last "
                                    f"good checkpoint is kept{f' in {ckpt}' if ckpt else ''}")
            total, outs = 0.0, []
            for s, st in enumerate(stacks):
                dead = since_fired[s] >= tc.dead_window
                if autocast is not None:
                    with autocast:
                        out = st.losses(x, dead=dead if st.architecture == "topk" else None,
                                        aux_coefficient=tc.aux_coefficient)
                else:
                    out = st.losses(x, dead=dead if st.architecture == "topk" else None,
                                    aux_coefficient=tc.aux_coefficient)
                total = total + out["loss"].sum()
                outs.append(out)
            opt.zero_grad(set_to_none=True)
            total.backward()
            for st in stacks:
                st.remove_parallel_grads()
            opt.step()
            sched.step()
            for s, (st, out) in enumerate(zip(stacks, outs)):
                st.normalize_decoder()
                fired = (out["codes"] > 0).any(1)
                since_fired[s] = torch.where(fired, torch.zeros_like(since_fired[s]), since_fired[s] + len(x))
            step += 1
            if (tc.resample_every and step % tc.resample_every == 0
                    and step < tc.resample_until * total_steps):
                for s, st in enumerate(stacks):
                    if st.architecture != "standard":
                        continue
                    for row in range(st.n):
                        dead = since_fired[s][row] >= tc.dead_window
                        if resample_dead(st, row, dead, x, opt, gen_of[(s, row)]):
                            since_fired[s][row][dead] = 0
            if step % tc.log_every == 0 or step == total_steps:
                rec = {"step": step, "tokens": step * tc.batch_size, "mse": [None] * len(configs),
                       "l0": [None] * len(configs), "dead": [None] * len(configs),
                       "lr": sched.get_last_lr()[0]}
                for i, (s, row) in enumerate(where):
                    rec["mse"][i] = float(outs[s]["mse"][row].detach())
                    rec["l0"][i] = float((outs[s]["codes"][row] > 0).sum(-1).float().mean())
                    rec["dead"][i] = float((since_fired[s][row] >= tc.dead_window).float().mean())
                history.append(rec)
                bar.set_postfix_str(f"L0 {min(rec['l0']):.0f}-{max(rec['l0']):.0f} "
                                    f"mse {min(rec['mse']):.3f}-{max(rec['mse']):.3f} "
                                    f"dead {max(rec['dead']):.0%}")
            bar.update(1)
            if ckpt is not None and step % tc.checkpoint_every == 0:
                seconds_now = seconds + time.perf_counter() - t0
                seconds, t0 = seconds_now, time.perf_counter()
                checkpoint()
    finally:
        bar.close()
    seconds += time.perf_counter() - t0
    checkpoint()
    saes = [stacks[s][row] for s, row in where]
    return SweepResult(saes, list(configs), history, seconds, total_steps * tc.batch_size)
