"""Train a sweep of SAEs, at one or several hooks, in one pass over an activation store.

`train_sweep` groups the configs into stacks (one per hook, dictionary size, architecture and recipe;
the α's or k's of a group share a stack), reads each shuffled batch once, at every hook the configs
need, and trains every stack on it:

* Adam (fused where torch has it) with LR warm-up and a final linear decay;
* the anthropic2023 recipe and every architecture but the improved L1 SAEs (helpers.saes.architectures):
  unit-norm dictionary rows (the parallel gradient component removed, rows renormalised after every
  step), b_dec started at the data mean, dead latents resampled (anthropic2023 L1) or revived by AuxK
  (TopK, BatchTopK); after each step the architecture updates its own state (BatchTopK's threshold);
* the improved L1 recipe (helpers.saes.stack): both biases start at zero, α warmed up over the first
  `l1_warmup_fraction` of steps, gradients clipped per SAE at `grad_clip` on the scale of a loss summed
  over dimensions (the April 2024 update's convention; our loss is that divided by d_in, so the clip
  applied is grad_clip / d_in), no norm constraint and no resampling; its decoder norms are folded
  into the codes at the end. The history logs each SAE's largest pre-clip gradient norm since the
  previous log (``grad_norm``, in the clip's units; None for SAEs that are not clipped), so a reader
  sees whether clipping ever acts;
* massive activations (helpers.activations.massive): by default the rule is fitted on the store at each hook and
  every SAE removes the massive offset from flagged tokens; input scaling and b_dec's initial value
  come from the activations with the offset removed;
* the sparse kernels (helpers.saes.sparse) wherever a batch's codes are sparse (`path="auto"`);
* precision by hardware (`precision`, "auto" by default): bf16 autocast on a GPU that does bf16
  natively (compute capability 8.0 and up: A100, L4, H100), fp16 autocast with a gradient scaler on
  one that does not (Colab's T4: it reports bf16 "supported" by emulation, at or below fp32 speed),
  fp32 on CPU. The scaler's gradients are unscaled before any gradient treatment (decoder
  projection, clipping). "fp32", "bf16" and "fp16" force a choice (on CPU too: torch's CPU autocast
  and gradient scaler run the same code path, which is how the tests exercise it);
* one backward pass per stack, so that only one stack's graph is alive at a time (a sweep's peak
  memory is its largest stack's, not the sum of all of them).

Dead latents are tracked per SAE. A run folder keeps its checkpoint (every `checkpoint_every` steps
and at the end; with $SAE_SCRATCH, a working copy on local disk and two alternating copies in the run
folder, rewritten in place: `Checkpoints`); a run started again with the same settings resumes from
the newest checkpoint that loads (a truncated one is named in a warning and passed over) and ends
with the same SAEs as an uninterrupted run, skipping the batches already trained on without reading
them (`ActivationStore.iter_batches`' `start`); a run that had finished returns at once, reading nothing.
Bit for bit holds on the same setting only: a checkpoint records the CPU thread count, the device and
the resolved precision (`run_setting`), and a resume on another one warns naming the old and new values
(the improved recipe's per-SAE clip, for one, sums in an order that depends on the thread count). A
checkpoint that cannot be read is named in every message about it. The run folder is locked while it
trains (helpers.settings.locks): a second process training the same folder waits, or is refused naming the
holder; temporary files have names unique to their process.
A batch holding NaN or inf stops training with an error naming the step and the shard, and the last
good checkpoint is kept. An SAE whose loss stops being finite (a learning rate that diverges) is
stopped at that step with a warning naming it: its gradients and Adam state are zeroed from then on,
the others train on unchanged, and `SweepResult.diverged` lists it (helpers.runs.sweep neither saves nor
chooses it); if every SAE diverges, training stops with an error. `on_eval(step, tokens,
saes)` is called at the steps in `eval_at` with snapshots of every SAE (learning curves); what it
returns is kept in the history.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import warnings
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helpers.settings.locks import FolderLock, tmp_name
from helpers.activations.models import resolve_device
from helpers.saes.stack import SAEConfig, SAEStack


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
    resample_every: int = 0            # steps between resamplings of dead paper-L1 latents (0: never)
    resample_until: float = 0.7        # ... only during this first share of training
    resample_pool: int = 16_384        # inputs drawn (without replacement) for each resampling
    aux_coefficient: float = 1 / 32    # AuxK (TopK SAEs)
    l1_warmup_fraction: float = 0.05   # improved recipe: α rises linearly from 0 over this share of steps
    grad_clip: float = 1.0             # improved recipe: per-SAE gradient norm clip, on the scale of a loss
                                       # summed over dimensions (April 2024); ours is divided by d_in, so the
                                       # gradients are clipped at grad_clip / d_in (the same clip under Adam)
    massive: bool = True               # apply the massive-activation rule (helpers.activations.massive)
    path: str = "auto"                 # SAE.losses path: "auto", "sparse" or "dense"
    eval_at: tuple = ()                # steps at which on_eval is called (learning curves)
    log_every: int = 25
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    buffer_shards: int = 4
    precision: str = "auto"            # "auto" (by hardware: see the module docstring), "fp32", "bf16", "fp16"


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision training uses on `device`: "fp32", "bf16" or "fp16" (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    try:  # emulated bf16 (T4, V100) runs at or below fp32 speed: fp16 with a scaler instead
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # pragma: no cover - torch without the argument
        native = torch.cuda.get_device_capability(device) >= (8, 0)
    return "bf16" if native else "fp16"


def amp(device: torch.device, precision: str = "auto"):
    """(autocast context or None, GradScaler or None) for training at `precision` on `device`."""
    chosen = resolve_precision(device, precision)
    if chosen == "fp32":
        return None, None
    dtype = torch.bfloat16 if chosen == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if chosen == "fp16" else None
    return autocast, scaler


class TrainingError(RuntimeError):
    """Training stopped: bad data, or a checkpoint that belongs to other settings."""


@dataclass
class SweepResult:
    saes: list            # one-SAE stacks, in the order of the configs given
    configs: list
    history: list         # dicts: step, tokens, and per-SAE lists of mse / l0 / dead (and "eval")
    seconds: float
    tokens: int
    rules: dict = dataclasses.field(default_factory=dict)  # hook -> helpers.activations.massive.Massive
    diverged: dict = dataclasses.field(default_factory=dict)  # config index -> step its loss stopped being finite


def _lr_factor(step: int, total: int, tc: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    decay_start = int(total * (1 - tc.decay_fraction))
    decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1, total - decay_start))
    return warm * decay


def data_stats(store, hook: str, n: int = 20_000, rule=None) -> tuple[float, torch.Tensor]:
    """The factor that brings activations to mean norm √d_in (SAELens's 'expected_average_only_in')
    and the mean activation, from the first n finite rows of the store, after the massive rule's
    shift (if a rule is given)."""
    x = store.activations(hook, max_tokens=n)
    x = x[torch.isfinite(x).all(-1)]  # a bad row is reported when training reaches it
    if len(x) == 0:
        raise TrainingError(f"no finite activations among the first {n} rows of {hook} in {store.path}")
    if rule is not None:
        x = rule.shift(x)
    return math.sqrt(x.shape[1]) / float(x.norm(dim=-1).mean()), x.mean(0)


def resolve_hooks(configs: list[SAEConfig], hook: str | None) -> list[SAEConfig]:
    """Each config with its hook: its own hook_name, else `hook` (which must then be given)."""
    out = []
    for c in configs:
        if hook and c.hook_name and c.hook_name != hook:
            raise ValueError(f"config {c.label} is for {c.hook_name!r}, but training was asked for {hook!r}; "
                             "pass hook=None to train each config at its own hook")
        h = c.hook_name or hook
        if not h:
            raise ValueError(f"config {c.label} names no hook: set its hook_name or pass hook=...")
        out.append(c if c.hook_name == h else dataclasses.replace(c, hook_name=h))
    return out


def build_stacks(configs: list[SAEConfig], seed: int) -> tuple[list[SAEStack], list[tuple[int, int]]]:
    """Group configs by shape key into stacks; return the stacks and, per config, (stack, row)."""
    groups: dict = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.shape_key, []).append(i)
    stacks, where = [], [None] * len(configs)
    for s, idx in enumerate(groups.values()):
        stacks.append(SAEStack([configs[i] for i in idx], seed=seed))
        for row, i in enumerate(idx):
            where[i] = (s, row)
    return stacks, where


NOT_RESULT_TRAIN_FIELDS = ("log_every", "checkpoint_every", "device", "path")  # change no result


def _fingerprint(configs, tc: TrainConfig, store) -> dict:
    from helpers.saes.stack import config_dict

    return {"configs": [config_dict(c) for c in configs],
            "train": {k: v for k, v in dataclasses.asdict(tc).items()
                      if k not in NOT_RESULT_TRAIN_FIELDS},
            "store": str(store.path), "store_tokens": store.n_tokens}


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, every tensor on the CPU: the trainer moves each part to its device
    (parameters and optimizer state through load_state_dict), and the generators' states, kept as
    bytes, must stay CPU tensors (`Generator.set_state` refuses a CUDA one, which is what
    map_location="cuda" used to make of them). It is read with `weights_only=True`: tensors and plain
    containers only, so a checkpoint from a shared cache cannot run code. A file that does not load
    (truncated, empty, not a checkpoint, holding other objects) raises TrainingError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        int(state["step"])
    except Exception as e:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}): truncated, "
                            "incompletely synced, or not a checkpoint") from e
    return state


def restore_generators(gens: list[torch.Generator], states: list) -> None:
    """Set each CPU generator from a saved state (bytes; a tensor on any device from older checkpoints)."""
    for g, gs in zip(gens, states):
        if isinstance(gs, (bytes, bytearray)):
            gs = torch.frombuffer(bytearray(gs), dtype=torch.uint8)
        g.set_state(gs.to("cpu"))


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _copy_in_place(src: Path, dest: Path) -> None:
    """Write src's bytes into dest by truncating and rewriting dest itself: the same file, never a new
    one renamed over it (a synced drive keeps a replaced file in its trash, counted in its quota)."""
    with open(src, "rb") as f, open(dest, "wb") as g:
        shutil.copyfileobj(f, g, 16 << 20)
        g.flush()
        os.fsync(g.fileno())


CHECKPOINT = "checkpoint.pt"
COPIES = ("checkpoint-a.pt", "checkpoint-b.pt")


class Checkpoints:
    """Where a run keeps its checkpoints, and which one it resumes from.

    Without $SAE_SCRATCH: ``checkpoint.pt`` in the run folder, replaced atomically at every save.
    With it (a cache on a synced drive): the working checkpoint is ``checkpoint.pt`` in the run's
    scratch folder (helpers.settings.paths.scratch_dir, on the machine's own disk), replaced atomically, and
    every save also copies it into the run folder, alternately into ``checkpoint-a.pt`` and
    ``checkpoint-b.pt``, each rewritten in place: the cache only ever holds these two files, none is
    replaced or deleted, and the one not being written holds the previous complete checkpoint.

    `load` resumes from the newest checkpoint that loads, wherever it is (the scratch copy is gone
    with a recycled VM; a synced copy may have arrived truncated); one that does not load is named in
    a warning, and with none left training starts afresh."""

    def __init__(self, run_dir):
        from helpers.settings.paths import scratch_dir

        self.run_dir = Path(run_dir)
        scratch = scratch_dir(self.run_dir)
        self.work = (scratch or self.run_dir) / CHECKPOINT
        self.copies = [self.run_dir / name for name in COPIES] if scratch is not None else []
        self.next_copy = 0

    def __str__(self) -> str:
        return str(self.work) + (f" (copied to {self.run_dir})" if self.copies else "")

    def paths(self) -> list[Path]:
        """Every file a checkpoint of this run may be in, working copy first."""
        out = [self.work] + [self.run_dir / name for name in (CHECKPOINT, *COPIES)]
        return list(dict.fromkeys(out))

    def load(self, fingerprint: dict | None = None) -> tuple[Path, dict] | None:
        """(path, state) of the newest checkpoint that loads, or None. Raises TrainingError for a
        checkpoint made with settings other than `fingerprint`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        best, bad, copy_steps = None, [], {}
        for path in self.paths():
            if not path.exists():
                continue
            try:
                state = load_checkpoint(path)
                step = int(state["step"])
                saved = dict(state["fingerprint"])
            except Exception as e:  # truncated (a cut-short upload), empty, or not a checkpoint
                cause = e.__cause__ or e
                bad.append(f"{path} ({type(cause).__name__}: {str(cause)[:120]})")
                continue
            if fingerprint is not None and saved != fingerprint:
                diff = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
                raise TrainingError(f"checkpoint {path} was made with other settings ({', '.join(diff)} "
                                    "differ): use another run folder, or delete it to start afresh")
            if path in self.copies:
                copy_steps[self.copies.index(path)] = step
            if best is None or step > best[1]["step"]:
                best = (path, state)
        if self.copies:  # write next into the copy that does not hold the newest complete checkpoint
            newest = max(copy_steps, key=copy_steps.get) if copy_steps else 1
            self.next_copy = 1 - newest
        if bad:
            then = (f"resuming from {best[0]} (step {best[1]['step']})" if best is not None
                    else "training starts afresh")
            warnings.warn("unreadable checkpoint(s), truncated or incompletely synced: " + "; ".join(bad)
                          + f"; {then}", stacklevel=3)
        return best

    def save(self, state: dict) -> None:
        """Save the working checkpoint, then copy it into the cache (with $SAE_SCRATCH)."""
        from helpers.settings.paths import sync_drive

        _save_checkpoint(self.work, state)
        if self.copies:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _copy_in_place(self.work, self.copies[self.next_copy])
            self.next_copy = 1 - self.next_copy
        sync_drive()

    def discard(self) -> None:
        """Delete every checkpoint of the run; each file in the cache is first emptied in place, so that
        a synced drive's trash keeps an empty file, not a checkpoint's worth of quota."""
        for path in self.paths():
            if path.exists():
                if path.parent == self.run_dir:
                    open(path, "wb").close()
                path.unlink()


def discard_checkpoints(run_dir) -> None:
    """Delete a run folder's checkpoints (see `Checkpoints.discard`)."""
    Checkpoints(run_dir).discard()


def _adam(params, tc: TrainConfig, device: torch.device):
    kw = {"lr": tc.lr, "betas": (tc.beta1, tc.beta2)}
    try:  # one fused kernel for every parameter: much less memory traffic than the loop over tensors
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch or an unsupported device
        return torch.optim.Adam(params, **kw)


@torch.no_grad()
def clip_grad_norm_per_sae(stack: SAEStack, max_norm: float) -> torch.Tensor:
    """Scale each SAE's gradients (all its parameters together) to a norm of at most max_norm, so
    that the SAEs of a stack stay independent. Returns the norms before clipping [n]."""
    grads = [p.grad for p in stack.parameters() if p.grad is not None]
    sq = torch.zeros(stack.n, device=stack.b_dec.device)
    for g in grads:
        sq += g.float().pow(2).flatten(1).sum(1)
    norm = sq.sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norm


@torch.no_grad()
def resample_dead(stack: SAEStack, row: int, dead: torch.Tensor, x: torch.Tensor, opt, gen) -> int:
    """Anthropic-style resampling of the dead latents of SAE `row` of a stack, from a pool of inputs x.

    Inputs are drawn *without replacement*, with probability proportional to their squared
    reconstruction error (drawing with replacement sent dozens of latents to one rare token whose
    error dominated); each dead latent's decoder row becomes such an input's (centred, normalised)
    direction, its encoder row the same direction at 0.2 times the mean encoder norm of the live
    latents, its bias 0, and its Adam state is cleared. Returns the number resampled (at most the
    number of inputs with a positive error).
    """
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return 0
    one = stack[row]
    xs = one._scaled(x.float())[0]
    err = (one.decode(one.encode(x.float()))[0] * one.scale[0] - xs).pow(2).sum(-1)
    positive = int((err > 0).sum())
    if positive == 0:
        err, positive = torch.ones_like(err), len(err)
    idx = idx[:positive]
    pick = torch.multinomial((err / err.sum()).cpu(), len(idx), replacement=False, generator=gen).to(x.device)
    dirs = xs[pick] - stack.b_dec[row]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    stack.W_dec[row, idx] = dirs
    if not stack.tied:
        alive = ~dead
        enc_norm = stack.W_enc[row, alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0)
        stack.W_enc[row, idx] = dirs * 0.2 * enc_norm
    stack.b_enc[row, idx] = 0
    for p in [stack.W_dec, stack.W_enc, stack.b_enc]:
        if p is None or p not in opt.state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[p][key][row, idx] = 0
    return len(idx)


def train_step(stacks: list[SAEStack], xs: list[torch.Tensor], opt, sched, since_fired: list[torch.Tensor],
               tc: TrainConfig, l1_scale: float = 1.0, autocast=None, scaler=None,
               frozen: list[torch.Tensor] | None = None) -> list[dict]:
    """One optimisation step of every stack on its batch (xs[s] for stacks[s]): losses (through the
    sparse or dense path) and a backward pass per stack (one graph alive at a time), the gradient
    scaler's unscaling (fp16), the recipe's gradient treatment (unit-norm projection, or per-SAE
    clipping), Adam (skipped by the scaler if a gradient overflowed), the LR schedule, renormalisation
    and dead-latent counters. `l1_scale` is the improved recipe's α warm-up factor. Returns each
    stack's losses (with "grad_norm" [n], the pre-clip gradient norms in the clip's units, for the
    stacks that clip). With `frozen` (a bool [n] per stack), the gradients of the frozen SAEs and of every
    SAE whose loss is not finite this step are set to zero before any other gradient treatment, so that a
    diverged SAE changes no other (its NaN would otherwise stop the scaler's steps for all)."""
    outs = []
    opt.zero_grad(set_to_none=True)
    for s, st in enumerate(stacks):
        dead = since_fired[s] >= tc.dead_window
        with autocast or nullcontext():
            out = st.losses(xs[s], dead=dead if st.arch.uses_auxk else None,
                            aux_coefficient=tc.aux_coefficient, l1_scale=1.0 if st.unit_norm else l1_scale,
                            path=tc.path)
        loss = out["loss"].sum()
        (loss if scaler is None else scaler.scale(loss)).backward()
        out["loss"] = out["loss"].detach()
        outs.append(out)
    if frozen is not None:
        for st, out, fr in zip(stacks, outs, frozen):
            stop = fr | ~torch.isfinite(out["loss"])
            if bool(stop.any()):
                for p in st.parameters():
                    if p.grad is not None:
                        p.grad[stop] = 0
    if scaler is not None:
        scaler.unscale_(opt)  # true gradients before the projection and the clip
    for st, out in zip(stacks, outs):
        if st.unit_norm:
            st.remove_parallel_grads()
        elif tc.grad_clip:
            # the clip is stated for a loss summed over dimensions; ours is divided by d_in
            out["grad_norm"] = clip_grad_norm_per_sae(st, tc.grad_clip / st.d_in) * st.d_in
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    sched.step()
    for s, (st, out) in enumerate(zip(stacks, outs)):
        if st.unit_norm:
            st.normalize_decoder()
        st.arch.after_step(st, out)  # the architecture's own state (BatchTopK's running threshold)
        since_fired[s] = torch.where(out["fired"], torch.zeros_like(since_fired[s]), since_fired[s] + len(xs[s]))
    return outs


def make_optimizer(stacks: list[SAEStack], tc: TrainConfig, total_steps: int):
    """Adam over every stack's parameters and its LR schedule (warm-up, final linear decay)."""
    params = [p for st in stacks for p in st.parameters()]
    opt = _adam(params, tc, params[0].device)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, tc))


def _validate(store, configs: list[SAEConfig], tc: TrainConfig) -> list[str]:
    """The hooks to read; raise if a config does not fit the store or the budget is empty."""
    hooks = list(dict.fromkeys(c.hook_name for c in configs))
    for h in hooks:
        store.check_hook(h)
    for c in configs:
        if c.d_in != store.d_model:
            raise ValueError(f"SAE config d_in={c.d_in} does not match the activations' d_model="
                             f"{store.d_model} at {c.hook_name} in {store.path}")
    if tc.batch_size <= 0 or tc.total_tokens < tc.batch_size:
        raise ValueError(f"need total_tokens >= batch_size > 0, got {tc.total_tokens} and {tc.batch_size}")
    return hooks


def prepare_stacks(store, configs: list[SAEConfig], hooks: list[str], tc: TrainConfig, rules: dict | None,
                   device: torch.device) -> tuple[list[SAEStack], list[tuple[int, int]], dict]:
    """The stacks to train, on `device`: massive rule (fitted unless given), input scale, and decoder bias
    at the data mean where the recipe centres its input. Returns (stacks, where, rules)."""
    from helpers.activations import massive

    stacks, where = build_stacks(configs, tc.seed)
    if tc.massive:
        rules = {h: (rules or {}).get(h) or massive.fit(store, h) for h in hooks}
    else:
        rules = {h: massive.Massive.none(h, store.d_model) for h in hooks}
    stats = {(h, m): data_stats(store, h, rule=rules[h] if m else None)
             for h, m in {(c.hook_name, c.massive) for c in configs}}
    for st in stacks:
        h = st.configs[0].hook_name
        scale, mean = stats[(h, st.configs[0].massive)]
        if st.configs[0].massive:
            st.set_massive(rules[h])
        st.scale.fill_(scale)
        if st.centres_input:  # start the decoder bias at the data mean (the improved recipe: at zero)
            with torch.no_grad():
                st.b_dec.copy_((mean * scale).expand_as(st.b_dec))
        st.to(device)
    return stacks, where, rules


@dataclasses.dataclass
class _Run:
    """Everything a sweep's training loop changes, and its checkpoint (saved and restored whole)."""
    stacks: list
    where: list
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    since_fired: list
    gens: list  # one generator per SAE (resampling), in config order
    fingerprint: dict
    ckpt: Checkpoints | None
    history: list = dataclasses.field(default_factory=list)
    step: int = 0
    seconds: float = 0.0
    setting: dict = dataclasses.field(default_factory=dict)  # threads, device, precision (see `run_setting`)
    diverged: dict = dataclasses.field(default_factory=dict)  # config index -> step its loss stopped being finite

    def frozen(self) -> list[torch.Tensor]:
        """Per stack, a bool [n]: the SAEs that diverged (trained no further)."""
        out = [torch.zeros(st.n, dtype=torch.bool, device=st.b_dec.device) for st in self.stacks]
        for i in self.diverged:
            s, row = self.where[i]
            out[s][row] = True
        return out

    def restore(self, device) -> None:
        """Continue from the checkpoint, if there is one (it must have been made with the same settings;
        one made on another thread count, device or precision is used with a warning naming both)."""
        if self.ckpt is None:
            return
        found = self.ckpt.load(self.fingerprint)
        if found is None:
            return
        path, state = found
        try:
            for st, sd in zip(self.stacks, state["stacks"]):
                st.load_state_dict(sd)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.since_fired = [t.to(device) for t in state["since_fired"]]
            restore_generators(self.gens, state["generators"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.history, self.step, self.seconds = state["history"], state["step"], state["seconds"]
            self.diverged = {int(k): int(v) for k, v in (state.get("diverged") or {}).items()}
        except Exception as e:
            raise TrainingError(f"checkpoint {path} loads but cannot be restored ({type(e).__name__}: "
                                f"{str(e)[:200]}): delete it to start afresh") from e
        old = state.get("setting")
        if old is not None and old != self.setting:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {self.setting.get(k)!r}" for k in self.setting
                             if old.get(k) != self.setting.get(k))
            warnings.warn(f"checkpoint {path} (step {self.step}) was made with another setting ({diff}): training "
                          "continues, but it will not end bit for bit as an uninterrupted run would have (that holds "
                          "only on the same thread count, device and precision)", stacklevel=3)

    def save(self) -> None:
        if self.ckpt is not None:
            self.ckpt.save({
                "fingerprint": self.fingerprint, "stacks": [st.state_dict() for st in self.stacks],
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "since_fired": self.since_fired, "generators": [bytes(g.get_state().numpy()) for g in self.gens],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": self.history, "step": self.step, "seconds": self.seconds,
                "setting": self.setting, "diverged": self.diverged})

    def snapshot(self) -> list[SAEStack]:
        """Every SAE as it would be if training stopped now (improved-recipe norms folded)."""
        out = []
        for s, row in self.where:
            one = self.stacks[s][row]
            if not one.unit_norm:
                one.fold_decoder_norms()
            out.append(one)
        return out

    def log(self, outs: list[dict], grad_max: list, tc: TrainConfig) -> dict:
        """The history record of this step: per-SAE MSE, L0, dead share and largest gradient norm."""
        n = len(self.where)
        rec = {"step": self.step, "tokens": self.step * tc.batch_size, "mse": [None] * n, "l0": [None] * n,
               "dead": [None] * n, "lr": self.sched.get_last_lr()[0],
               "sparse_steps": [o["path"] == "sparse" for o in outs], "grad_norm": list(grad_max),
               "grad_clip": tc.grad_clip}
        for i, (s, row) in enumerate(self.where):
            rec["mse"][i] = float(outs[s]["mse"][row].detach())
            rec["l0"][i] = float(outs[s]["l0"][row])
            rec["dead"][i] = float((self.since_fired[s][row] >= tc.dead_window).float().mean())
        self.history.append(rec)
        return rec


def _check_finite(x_all: torch.Tensor, index: torch.Tensor, store, hooks: list[str], step: int, ckpt) -> None:
    if not torch.isfinite(x_all).all():
        bad = int(index[(~torch.isfinite(x_all)).any(-1).any(0).cpu()][0])
        shard = int(np.searchsorted(np.cumsum([s["n_tokens"] for s in store.shards]), bad, side="right"))
        raise TrainingError(f"non-finite activations at step {step}: token {bad} in shard {shard} "
                            f"({store.shards[shard]['files'][hooks[0]]['name']}); training stopped, the last "
                            f"good checkpoint is kept{f' in {ckpt}' if ckpt else ''}")


def run_setting(device: torch.device, precision: str) -> dict:
    """What a checkpoint records of where it was made: CPU threads, device (with the GPU's name) and the
    resolved precision. Kill-and-resume is bit-identical only when the resume has the same setting (the
    improved recipe's per-SAE clip sums in a thread-count-dependent order, for one)."""
    name = str(device)
    if device.type == "cuda":
        try:
            name += f" ({torch.cuda.get_device_name(device)})"
        except Exception:  # pragma: no cover - a device that cannot say
            pass
    return {"threads": torch.get_num_threads(), "device": name, "precision": resolve_precision(device, precision)}


def _note_divergence(run: "_Run", outs: list[dict], configs, opt, step: int, tc: TrainConfig) -> None:
    """Mark every SAE whose loss is not finite at `step` as diverged (warning, naming it and the step) and
    clear its Adam state, so that it is trained no further; stop the run if none is left."""
    fresh = []
    for i, (s, row) in enumerate(run.where):
        if i not in run.diverged and not bool(torch.isfinite(outs[s]["loss"][row])):
            run.diverged[i] = step
            fresh.append(i)
            st = run.stacks[s]
            for p in st.parameters():
                for key in ("exp_avg", "exp_avg_sq"):
                    if p in opt.state and key in opt.state[p]:
                        opt.state[p][key][row] = 0
    for i in fresh:
        warnings.warn(f"SAE {i} ({configs[i].label}) diverged at step {step}: its loss is not finite (lr "
                      f"{tc.lr:g}). It is trained no further and will not be saved or chosen; the others go on. "
                      "A lower learning rate trains it", stacklevel=4)
    if fresh and len(run.diverged) == len(configs):
        raise TrainingError(f"every SAE diverged (the last at step {step}, lr {tc.lr:g}): training stopped; "
                            "lower the learning rate")


def train_sweep(store, hook: str | None, configs: list[SAEConfig], tc: TrainConfig = TrainConfig(),
                run_dir=None, progress: bool = True, on_eval=None, rules: dict | None = None,
                wait: float | None = None) -> SweepResult:
    """Train every config on the store's activations, reading the data once.

    hook: the hook for configs that name none (None: every config trains at its own hook_name).
    rules: {hook: helpers.activations.massive.Massive} to use instead of fitting the massive rule on the store.
    run_dir: where the checkpoint is kept (every tc.checkpoint_every steps); an interrupted sweep resumes.
    The run folder is locked while it trains (helpers.settings.locks): another process training the same folder
    waits for it (`wait` seconds; None: helpers.settings.locks.default_wait), then resumes from its checkpoint.
    An SAE whose loss stops being finite is stopped there (a warning names it and the step) and listed
    in the result's `diverged`; the others train on.
    """
    if not configs:
        raise ValueError("no SAE configs given")
    configs = resolve_hooks(configs, hook)
    hooks = _validate(store, configs, tc)
    device = resolve_device(tc.device)
    total_steps = tc.total_tokens // tc.batch_size
    lock = (FolderLock(run_dir, f"training {len(configs)} SAEs in {run_dir}", wait=wait)
            if run_dir is not None else nullcontext())
    with lock:
        stacks, where, rules = prepare_stacks(store, configs, hooks, tc, rules, device)
        opt, sched = make_optimizer(stacks, tc, total_steps)
        autocast, scaler = amp(device, tc.precision)
        # One generator per SAE, seeded by the seed and the SAE's own config, so that resampling draws
        # the same inputs whether the SAE trains alone or in a sweep.
        gens = [torch.Generator().manual_seed(tc.seed * 1_000_003 + zlib.crc32(repr(c).encode())) for c in configs]
        gen_of = {pos: gens[i] for i, pos in enumerate(where)}
        run = _Run(stacks, where, opt, sched, scaler,
                   [torch.zeros(st.n, st.d_sae, dtype=torch.int64, device=device) for st in stacks], gens,
                   _fingerprint(configs, tc, store), Checkpoints(run_dir) if run_dir is not None else None,
                   setting=run_setting(device, tc.precision))
        run.restore(device)
        if run.step < total_steps:
            _train_loop(run, store, configs, hooks, tc, total_steps, device, gen_of, autocast, scaler, progress,
                        on_eval)
        for i, sae in enumerate(snap := run.snapshot()):  # an SAE gone non-finite without a non-finite loss
            if i not in run.diverged and not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
                run.diverged[i] = run.step
                warnings.warn(f"SAE {i} ({configs[i].label}) ended with non-finite weights: it will not be saved "
                              "or chosen", stacklevel=2)
        return SweepResult(snap, list(configs), run.history, run.seconds, total_steps * tc.batch_size, rules,
                           dict(run.diverged))


def _train_loop(run, store, configs, hooks, tc, total_steps, device, gen_of, autocast, scaler, progress,
                on_eval) -> None:
    stacks, where, opt, sched = run.stacks, run.where, run.opt, run.sched
    grad_max = [None] * len(configs)  # largest pre-clip gradient norm since the last log, per SAE
    frozen = run.frozen()

    epochs = math.ceil(total_steps * tc.batch_size / store.n_tokens) + 1
    batches = store.iter_batches(hooks, tc.batch_size, seed=tc.seed, epochs=epochs, drop_last=True,
                                 buffer_shards=tc.buffer_shards, device=device, return_index=True,
                                 start=run.step)  # resume: the batches already trained on are skipped unread
    hook_index = {h: i for i, h in enumerate(hooks)}
    warm_l1 = max(1, int(tc.l1_warmup_fraction * total_steps))
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=run.step, desc=f"train {len(configs)} SAEs", unit="step",
               disable=not progress)
    t0 = time.perf_counter()
    try:
        while run.step < total_steps:
            x_all, index = next(batches)
            _check_finite(x_all, index, store, hooks, run.step, run.ckpt)
            outs = train_step(stacks, [x_all[hook_index[st.configs[0].hook_name]] for st in stacks], opt, sched,
                              run.since_fired, tc, l1_scale=min(1.0, (run.step + 1) / warm_l1), autocast=autocast,
                              scaler=scaler, frozen=frozen)
            run.step += 1
            step = run.step
            if not all(bool(torch.isfinite(o["loss"]).all()) for o in outs):
                _note_divergence(run, outs, configs, opt, step, tc)
                frozen = run.frozen()
            for i, (s, row) in enumerate(where):
                if "grad_norm" in outs[s]:
                    g = float(outs[s]["grad_norm"][row])
                    grad_max[i] = g if grad_max[i] is None else max(grad_max[i], g)
            if (tc.resample_every and step % tc.resample_every == 0
                    and step < tc.resample_until * total_steps):
                _resample(stacks, run.since_fired, store, tc, step, opt, gen_of, device, frozen)
            if step % tc.log_every == 0 or step == total_steps:
                rec = run.log(outs, grad_max, tc)
                grad_max = [None] * len(configs)
                bar.set_postfix_str(f"L0 {min(rec['l0']):.0f}-{max(rec['l0']):.0f} "
                                    f"mse {min(rec['mse']):.3f}-{max(rec['mse']):.3f} "
                                    f"dead {max(rec['dead']):.0%}")
            if on_eval is not None and step in tc.eval_at:
                run.seconds += time.perf_counter() - t0
                run.history.append({"step": step, "tokens": step * tc.batch_size,
                                    "eval": on_eval(step, step * tc.batch_size, run.snapshot())})
                t0 = time.perf_counter()
            bar.update(1)
            if run.ckpt is not None and step % tc.checkpoint_every == 0:
                run.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                run.save()
    finally:
        bar.close()
    run.seconds += time.perf_counter() - t0
    if run.ckpt is not None and run.step % tc.checkpoint_every:  # else saved at this step already
        run.save()


def _resample(stacks, since_fired, store, tc: TrainConfig, step: int, opt, gen_of, device, frozen=None) -> None:
    """Resample the dead latents of every paper-recipe L1 SAE from one pool of stored inputs per hook
    (the same pool, drawn from the step and seed, whether an SAE trains alone or in a sweep); diverged
    (`frozen`) SAEs are left alone."""
    pools = {}
    for s, st in enumerate(stacks):
        if not st.arch.resamples or not st.unit_norm:
            continue
        hook = st.configs[0].hook_name
        if hook not in pools:
            g = torch.Generator().manual_seed(tc.seed * 7919 + step)
            n = min(tc.resample_pool, store.n_tokens)
            pools[hook] = store.rows(hook, torch.randperm(store.n_tokens, generator=g)[:n]).to(device)
        for row in range(st.n):
            if frozen is not None and bool(frozen[s][row]):
                continue
            dead = since_fired[s][row] >= tc.dead_window
            if resample_dead(st, row, dead, pools[hook], opt, gen_of[(s, row)]):
                since_fired[s][row][dead] = 0
