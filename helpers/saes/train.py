"""Train SAEs: one training loop over a source of batches, for a sweep on an activation store and for
one SAE on plain tensors.

`train_on_batches(source, configs, tc)` is the loop. A source (`batch_source`) is an activation store's
shuffled batches at one or several hooks (`StoreBatches`: `train_sweep`), the rows of an in-memory tensor
in shuffled epochs (`TensorBatches`: `train_sae`, helpers.saes.groundtruth.train_on_tensor), or any
iterable of activation tensors cut into batches in the order given (`IteratorBatches`: `train_sae` on a
generator reading a model's hooks live). The loop groups the configs into stacks (one per hook,
dictionary size, architecture and recipe; the α's or k's of a group share a stack), reads each batch
once, at every hook the configs need, and trains every stack on it:

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
* massive activations (helpers.activations.massive), on a store: by default the rule is fitted on the store at
  each hook and every SAE removes the massive offset from flagged tokens; input scaling and b_dec's
  initial value come from the activations with the offset removed (tensors and iterables: no rule);
* the sparse kernels (helpers.saes.sparse) wherever a batch's codes are sparse (`path="auto"`);
* precision by hardware (`precision`, "auto" by default): bf16 autocast on a GPU that does bf16
  natively (compute capability 8.0 and up: A100, L4, H100), fp16 autocast with a gradient scaler on
  one that does not (Colab's T4: it reports bf16 "supported" by emulation, at or below fp32 speed),
  fp32 on CPU. The scaler's gradients are unscaled before any gradient treatment (decoder
  projection, clipping). "fp32", "bf16" and "fp16" force a choice (on CPU too: torch's CPU autocast
  and gradient scaler run the same code path, which is how the tests exercise it);
* one backward pass per stack, so that only one stack's graph is alive at a time (a sweep's peak
  memory is its largest stack's, not the sum of all of them); on a CPU with two threads or more, the
  stacks of a step train side by side, one thread each (`StackPool`): on two threads at most two graphs
  are alive at a time;
* `freeze_encoder=True` (`train_on_batches`, `train_sweep`, `train_sae`): the control of Korznikov et al.
  2026 ("Frozen Encoder SAE"), an SAE whose encoder keeps its random initialisation. W_enc and b_enc
  are not trained (`freeze_encoders`: no gradient, not in the optimizer, bit for bit as initialised);
  the decoder W_dec and b_dec train as usual, with the recipe's unit-norm step (which touches W_dec
  only). Dead latents are not resampled (resampling rewrites encoder rows); AuxK still trains the dead
  latents' decoder rows. The architecture's own parameters (JumpReLU's thresholds) still train: they
  set how many tokens a latent fires on, not which directions the encoder reads. The encoder still
  sees x − b_dec where the recipe centres its input, so codes follow the trained b_dec. A tied SAE
  (its encoder is its decoder) cannot be frozen; the improved recipe's final folding rescales each
  encoder row by a positive factor (the same directions). The SAE saves and loads like any other.

`train_sae(data, "topk", k=32)` trains one SAE on a tensor or an iterable and returns it as a
helpers.dictionaries.dictionary.SAEDictionary (encode, decode, save in SAELens layout).

Dead latents are tracked per SAE. On a store, a run folder keeps its checkpoint (every `checkpoint_every` steps
and at the end; with $SAE_SCRATCH, a working copy on local disk and two alternating copies in the run
folder, rewritten in place: `Checkpoints`); a run started again with the same settings resumes from
the newest checkpoint that loads (a truncated one is named in a warning and passed over) and ends
with the same SAEs as an uninterrupted run, skipping the batches already trained on without reading
them (`ActivationStore.iter_batches`' `start`); a run that had finished returns at once, reading nothing.
Bit for bit holds on the same setting: a checkpoint records the CPU thread count, the device and
the resolved precision (`run_setting`), and a resume on another one warns naming the old and new values
(a GPU and another precision round differently; on a CPU every sum of a step adds in an order that does
not depend on the thread count, and the tests check 1 thread against 2). A
checkpoint that cannot be read is named in every message about it. The run folder is locked while it
trains (helpers.settings.locks): a second process training the same folder waits, or is refused naming the
holder; temporary files have names unique to their process.
A batch holding NaN or inf stops training with an error naming the step and the shard (a tensor's row), and the last
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
from tqdm.auto import tqdm

from helpers.activations import massive
from helpers.activations.models import resolve_device
from helpers.dictionaries.dictionary import SAEDictionary
from helpers.saes import architectures
from helpers.saes.stack import SAEConfig, SAEStack, config_dict
from helpers.settings import memory
from helpers.settings.locks import FolderLock, tmp_name
from helpers.settings.paths import scratch_dir, sync_drive


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
    parallel_stacks: bool = True       # on a CPU, stacks train side by side on its cores (`StackPool`)


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


NOT_RESULT_TRAIN_FIELDS = ("log_every", "checkpoint_every", "device", "path", "parallel_stacks")  # change no result


def _fingerprint(configs, tc: TrainConfig, source) -> dict:
    return {"configs": [config_dict(c) for c in configs],
            "train": {k: v for k, v in dataclasses.asdict(tc).items()
                      if k not in NOT_RESULT_TRAIN_FIELDS},
            **source.fingerprint()}


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
                diff = [k for k in {**saved, **fingerprint} if saved.get(k) != fingerprint.get(k)]
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


_SUM_ROW = 1024  # elements per partial sum of `squared_sum`


def squared_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ t² in fp32, the same bits whatever the number of threads. A sum over one tensor splits its
    elements among the threads, so on 2 threads it adds them in another order than on 1, and rounds
    differently; here each row of 1,024 elements is summed by one thread in a fixed order, then the
    row sums (fewer than torch's 32,768-element grain for tensors under 33M elements) in one pass."""
    v = t.detach().float().reshape(-1)
    pad = (-len(v)) % _SUM_ROW
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return v.view(-1, _SUM_ROW).pow(2).sum(-1).sum()


@torch.no_grad()
def clip_grad_norm_per_sae(stack: SAEStack, max_norm: float) -> torch.Tensor:
    """Scale each SAE's gradients (all its parameters together) to a norm of at most max_norm, so
    that the SAEs of a stack stay independent. Returns the norms before clipping [n].

    Each SAE's squared norm is its own sum over its own gradients (`squared_sum`), as it would be alone,
    and adds the same numbers in the same order whatever the number of threads: the same bits in a stack
    or alone, on one thread or several."""
    grads = [p.grad for p in stack.parameters() if p.grad is not None]
    zero = torch.zeros((), device=stack.b_dec.device)
    norm = torch.stack([sum((squared_sum(g[i]) for g in grads), zero) for i in range(stack.n)]).sqrt()
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
               frozen: list[torch.Tensor] | None = None, pool: "StackPool | None" = None) -> list[dict]:
    """One optimisation step of every stack on its batch (xs[s] for stacks[s]): losses (through the
    sparse or dense path) and a backward pass per stack (one graph alive at a time), the gradient
    scaler's unscaling (fp16), the recipe's gradient treatment (unit-norm projection, or per-SAE
    clipping), Adam (skipped by the scaler if a gradient overflowed), the LR schedule, renormalisation
    and dead-latent counters. `l1_scale` is the improved recipe's α warm-up factor. Returns each
    stack's losses (with "grad_norm" [n], the pre-clip gradient norms in the clip's units, for the
    stacks that clip). With `frozen` (a bool [n] per stack), the gradients of the frozen SAEs and of every
    SAE whose loss is not finite this step are set to zero before any other gradient treatment, so that a
    diverged SAE changes no other (its NaN would otherwise stop the scaler's steps for all). With `pool`
    (a `StackPool`; not with a gradient scaler), the stacks' own work runs on its threads, a stack a task:
    the same operations on each stack, in the same order, so the same bits."""
    if not memory.asked() and xs and xs[0].device.type == "cpu":
        memory.keep_freed_memory()
    opt.zero_grad(set_to_none=True)
    frozen = frozen if frozen is not None else [None] * len(stacks)
    if pool is not None and scaler is None:
        outs = pool.map(lambda s: _stack_grads(stacks[s], xs[s], since_fired[s], tc, l1_scale, autocast, None,
                                               frozen[s], treat=True), len(stacks), "gradients")
    else:
        outs = [_stack_grads(st, xs[s], since_fired[s], tc, l1_scale, autocast, scaler, frozen[s], treat=False)
                for s, st in enumerate(stacks)]
        if scaler is not None:
            scaler.unscale_(opt)  # true gradients before the projection and the clip
        for st, out in zip(stacks, outs):
            _treat_grads(st, out, tc)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    sched.step()

    def after(s):
        st, out = stacks[s], outs[s]
        if st.training_recipe.unit_norm:
            st.normalize_decoder()
        st.arch.after_step(st, out)  # the architecture's own state (BatchTopK's running threshold)
        since_fired[s] = torch.where(out["fired"], torch.zeros_like(since_fired[s]), since_fired[s] + len(xs[s]))

    if pool is not None and scaler is None:
        pool.map(after, len(stacks), "after")
    else:
        for s in range(len(stacks)):
            after(s)
    return outs


def _stack_grads(st: SAEStack, x: torch.Tensor, since: torch.Tensor, tc: TrainConfig, l1_scale: float, autocast,
                 scaler, frozen: torch.Tensor | None, treat: bool) -> dict:
    """One stack's losses and backward pass; the gradients of its `frozen` SAEs and of those whose loss is
    not finite zeroed; with `treat`, the recipe's gradient treatment too (`_treat_grads`)."""
    dead = since >= tc.dead_window
    with autocast or nullcontext():
        out = st.losses(x, dead=dead if st.arch.uses_auxk else None, aux_coefficient=tc.aux_coefficient,
                        l1_scale=l1_scale if st.training_recipe.l1_warmup else 1.0, path=tc.path)
    loss = out["loss"].sum()
    (loss if scaler is None else scaler.scale(loss)).backward()
    out["loss"] = out["loss"].detach()
    if frozen is not None:
        stop = frozen | ~torch.isfinite(out["loss"])
        if bool(stop.any()):
            for p in st.parameters():
                if p.grad is not None:
                    p.grad[stop] = 0
    if treat:
        _treat_grads(st, out, tc)
    return out


def _treat_grads(st: SAEStack, out: dict, tc: TrainConfig) -> None:
    """The recipe's gradient treatment: the unit-norm projection, or the per-SAE clip."""
    if st.training_recipe.unit_norm:
        st.remove_parallel_grads()
    elif st.training_recipe.grad_clip and tc.grad_clip:
        # the clip is stated for a loss summed over dimensions; ours is divided by d_in
        out["grad_norm"] = clip_grad_norm_per_sae(st, tc.grad_clip / st.d_in) * st.d_in


class StackPool:
    """Threads that train the stacks of a step side by side on a CPU, each computing on its share of
    the cores (`threads` // workers, at least one).

    One stack's step is a chain of mostly small operations, many of which a second thread speeds up
    little (docs/performance.md has the measurements); two stacks at a time, one thread each, keep both
    cores busier. Every operation of a stack's step adds the same numbers in the same order on one thread
    as on several (the improved recipe's clip through `squared_sum`), so a stack ends with the same bits
    whichever thread trains it and whatever the other threads do. Tasks go out longest first, by the time
    each stack took the step before. The calling thread keeps its own thread count."""

    def __init__(self, workers: int, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        # torch keeps the last count set in any thread for threads that start computing later: fix the
        # caller's own count before the workers set theirs, and set it again when the pool closes
        self._main = torch.get_num_threads()
        per = max(1, threads // workers)
        self.workers = workers
        self._ex = ThreadPoolExecutor(workers, thread_name_prefix="sae-stack",
                                      initializer=torch.set_num_threads, initargs=(per,))
        self._cost: dict[tuple, float] = {}

    @classmethod
    def for_stacks(cls, stacks: list[SAEStack], device: torch.device, enabled: bool = True) -> "StackPool | None":
        """A pool for training `stacks` on `device`, or None where it would not help: one stack, one
        thread, or a device other than the CPU (a GPU runs each operation on all its cores)."""
        threads = torch.get_num_threads()
        if not enabled or device.type != "cpu" or len(stacks) < 2 or threads < 2:
            return None
        return cls(min(threads, len(stacks)), threads)

    def map(self, fn, n: int, kind: str = "") -> list:
        """[fn(0), ..., fn(n - 1)], computed on the pool's threads, the tasks that took longest last time
        (under the same `kind`) first; the first exception is raised here."""
        order = sorted(range(n), key=lambda i: -self._cost.get((kind, i), 0.0))

        def timed(i):
            t = time.perf_counter()
            out = fn(i)
            self._cost[(kind, i)] = time.perf_counter() - t
            return out

        futures = {i: self._ex.submit(timed, i) for i in order}
        return [futures[i].result() for i in range(n)]

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._main)


def make_optimizer(stacks: list[SAEStack], tc: TrainConfig, total_steps: int):
    """Adam over every stack's trainable parameters (those that require a gradient: all but a frozen
    encoder's) and its LR schedule (warm-up, final linear decay)."""
    params = [p for st in stacks for p in st.parameters() if p.requires_grad]
    opt = _adam(params, tc, params[0].device)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, tc))


def freeze_encoders(stacks: list[SAEStack]) -> None:
    """Keep every stack's encoder (W_enc and b_enc) at its initial values: neither gets a gradient, so
    `make_optimizer` leaves them out and no step changes them (Korznikov et al. 2026's frozen-encoder
    control). A tied stack is refused: its encoder is its decoder."""
    for st in stacks:
        if st.tied:
            raise ValueError(f"{st.configs[0].label}: a tied SAE's encoder is its decoder, so it cannot be frozen "
                             "while the decoder trains; use tied=False")
        st.W_enc.requires_grad_(False)
        st.b_enc.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Batch sources: what the one training loop (`train_on_batches`) reads
# ---------------------------------------------------------------------------------------------------
#
# A source gives the loop its batches and everything else that depends on where they come from:
#   hooks, d_in              the hooks it serves and the activations' width
#   check_configs(configs)   raise if a config does not fit the data
#   massive_rules(tc, given) {hook: helpers.activations.massive.Massive} to apply ({} for none)
#   stats(hook, rule)        (input scale to mean norm √d_in, mean activation), after the rule's shift
#   batches(total_steps, start, device)  an iterator of (batch, index): batch [n_hooks, B, d_in]
#   pick(batch, hook)        one hook's [B, d_in] of a batch
#   check(batch, index, step, ckpt)  raise TrainingError naming the bad rows of a non-finite batch
#   pools(step, device)      hook -> the inputs dead latents are resampled from at `step`
#   fingerprint()            what identifies the data in a checkpoint (resumable sources only)


def _validate(store, configs: list[SAEConfig], tc: TrainConfig) -> list[str]:
    """The hooks to read; raise if a config does not fit the store or the budget is empty."""
    hooks = list(dict.fromkeys(c.hook_name for c in configs))
    for h in hooks:
        store.check_hook(h)
    for c in configs:
        if c.d_in != store.d_model:
            raise ValueError(f"SAE config d_in={c.d_in} does not match the activations' d_model="
                             f"{store.d_model} at {c.hook_name} in {store.path}")
    _check_budget(tc)
    return hooks


def _check_budget(tc: TrainConfig) -> None:
    if tc.batch_size <= 0 or tc.total_tokens < tc.batch_size:
        raise ValueError(f"need total_tokens >= batch_size > 0, got {tc.total_tokens} and {tc.batch_size}")


class StoreBatches:
    """An activation store's batches (helpers.activations.store), the same tokens at every hook, shuffled
    from tc.seed (`ActivationStore.iter_batches`); the massive rule fitted on the store (tc.massive),
    input statistics from its first rows (`data_stats`), resampling pools drawn from all of it (from
    the step and seed), and a resume that skips the batches already trained on, unread."""

    resumable = True

    def __init__(self, store, hooks: list[str], tc: TrainConfig):
        self.store, self.hooks, self.tc = store, list(hooks), tc
        self.d_in = store.d_model
        self._index = {h: i for i, h in enumerate(self.hooks)}

    def check_configs(self, configs: list[SAEConfig]) -> None:
        _validate(self.store, configs, self.tc)

    def massive_rules(self, tc: TrainConfig, given: dict | None) -> dict:
        if tc.massive:
            return {h: (given or {}).get(h) or massive.fit(self.store, h) for h in self.hooks}
        return {h: massive.Massive.none(h, self.d_in) for h in self.hooks}

    def stats(self, hook: str, rule=None) -> tuple[float, torch.Tensor]:
        return data_stats(self.store, hook, rule=rule)

    def batches(self, total_steps: int, start: int, device):
        tc = self.tc
        epochs = math.ceil(total_steps * tc.batch_size / self.store.n_tokens) + 1
        return self.store.iter_batches(self.hooks, tc.batch_size, seed=tc.seed, epochs=epochs, drop_last=True,
                                       buffer_shards=tc.buffer_shards, device=device, return_index=True,
                                       start=start)  # resume: the batches already trained on are skipped unread

    def pick(self, batch: torch.Tensor, hook: str) -> torch.Tensor:
        return batch[self._index[hook]]

    def check(self, batch, index, step: int, ckpt) -> None:
        _check_finite(batch, index, self.store, self.hooks, step, ckpt)

    def pools(self, step: int, device):
        """hook -> a pool of stored inputs (the same, drawn from the step and seed, whether an SAE trains
        alone or in a sweep); drawn when first asked for."""
        drawn = {}

        def pool(hook):
            if hook not in drawn:
                g = torch.Generator().manual_seed(self.tc.seed * 7919 + step)
                n = min(self.tc.resample_pool, self.store.n_tokens)
                drawn[hook] = self.store.rows(hook, torch.randperm(self.store.n_tokens, generator=g)[:n]).to(device)
            return drawn[hook]
        return pool

    def fingerprint(self) -> dict:
        return {"store": str(self.store.path), "store_tokens": self.store.n_tokens}


def _tensor_stats(x: torch.Tensor, what: str) -> tuple[float, torch.Tensor]:
    """(√d / mean row norm, mean row) of the finite rows of x [N, d]."""
    finite = torch.isfinite(x).all(-1)
    if not bool(finite.all()):
        x = x[finite]
        if len(x) == 0:
            raise TrainingError(f"no finite rows in {what}")
    return math.sqrt(x.shape[1]) / float(x.norm(dim=-1).mean()), x.mean(0)


def _check_rows(x, name: str) -> torch.Tensor:
    """x as a float32 tensor [N, d] (leading dimensions flattened); a clear error for anything else."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of activations [N, d_in], not {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point activations, not {x.dtype}")
    if x.dim() < 2 or x.shape[-1] == 0:
        raise ValueError(f"{name} must be activations [N, d_in] (or [..., d_in]), got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).float()


class TensorBatches:
    """The rows of an in-memory tensor x [N, d], in shuffled epochs (a permutation from a generator seeded
    by tc.seed, a new one when an epoch's rows run out; an epoch's last partial batch is left out). The
    same tokens serve every hook a config names; no massive rule; input statistics from every finite
    row. Dead latents are resampled from tc.resample_pool rows drawn from the same generator at each
    resampling step."""

    resumable = False

    def __init__(self, x: torch.Tensor, tc: TrainConfig, name: str = "the data"):
        self.x, self.tc, self.name = _check_rows(x, name), tc, name
        if len(self.x) == 0:
            raise ValueError(f"{name} is empty: no rows to train on")
        self.d_in = self.x.shape[1]
        self.hooks = [""]
        self.g = torch.Generator().manual_seed(tc.seed)
        self._dev = self._stats = None

    def check_configs(self, configs: list[SAEConfig]) -> None:
        for c in configs:
            if c.d_in != self.d_in:
                raise ValueError(f"config {c.label} has d_in={c.d_in}, the data d={self.d_in}")
        tc = self.tc
        if tc.batch_size <= 0 or tc.total_tokens < tc.batch_size or tc.batch_size > len(self.x):
            raise ValueError(f"need len(x)={len(self.x)} >= batch_size={tc.batch_size} and "
                             f"total_tokens={tc.total_tokens} >= batch_size")

    def massive_rules(self, tc, given) -> dict:
        return {}

    def stats(self, hook: str, rule=None) -> tuple[float, torch.Tensor]:
        if self._stats is None:
            self._stats = _tensor_stats(self.x, self.name)
        return self._stats

    def _on(self, device) -> torch.Tensor:
        if self._dev is None:
            self._dev = self.x.to(device)
        return self._dev

    def batches(self, total_steps: int, start: int, device):
        if start:
            raise ValueError("a tensor's batches cannot resume mid-run")
        x_dev, B, n = self._on(device), self.tc.batch_size, len(self.x)
        order, pos = torch.randperm(n, generator=self.g), 0
        while True:
            if pos + B > n:
                order, pos = torch.randperm(n, generator=self.g), 0
            idx = order[pos:pos + B]
            pos += B
            yield x_dev[idx.to(device)].unsqueeze(0), idx

    def pick(self, batch: torch.Tensor, hook: str) -> torch.Tensor:
        return batch[0]

    def check(self, batch, index, step: int, ckpt) -> None:
        if not torch.isfinite(batch).all():
            bad = int(index[(~torch.isfinite(batch[0])).any(-1).cpu()][0])
            raise TrainingError(f"non-finite activations at step {step}: row {bad} of {self.name}")

    def pools(self, step: int, device):
        pool = self._on(device)[torch.randperm(len(self.x), generator=self.g)[:self.tc.resample_pool].to(device)]
        return lambda hook: pool


class IteratorBatches:
    """Batches read from an iterable of activation tensors [b, d] (or [..., d]; any b, e.g. a generator
    reading a model's hooks live), in the order given, cut into batches of tc.batch_size rows. An
    iterable that can be iterated again (a list, a DataLoader) is read again when it runs out; a one-pass
    iterator (a generator) that runs out ends training early, with a warning. Input statistics come
    from its first `stats_rows` rows (of its first pass, then trained on first); dead latents are resampled from
    the last tc.resample_pool rows read. No massive rule."""

    resumable = False

    def __init__(self, data, tc: TrainConfig, stats_rows: int = 20_000, name: str = "the batches"):
        self.data, self.tc, self.name = data, tc, name
        self.again = iter(data) is not data
        self._it = iter(data)
        self._read, self.d_in = 0, None
        self.head, n = [], 0
        while n < stats_rows:
            chunk = self._next(again=False)
            if chunk is None:
                break
            self.head.append(chunk)
            n += len(chunk)
        if n == 0:
            raise ValueError(f"{name} hold no activations: nothing to train on")
        self.hooks = [""]
        self.recent: list[torch.Tensor] = []  # the last rows read (resampling pools), with tc.resample_every
        self._stats = _tensor_stats(torch.cat(self.head)[:stats_rows], name)

    def _next(self, again: bool = True) -> torch.Tensor | None:
        """The next chunk [b, d] (float, detached), reading the iterable again (with `again`) if it can be;
        None when it is used up. Torch's grad mode is kept as it was: a generator that yields from inside
        `with torch.no_grad():` would otherwise leave gradients off for the training step."""
        for attempt in range(2):
            while True:
                grad = torch.is_grad_enabled()
                try:
                    chunk = next(self._it)
                except StopIteration:
                    break
                finally:
                    torch.set_grad_enabled(grad)
                self._read += 1
                x = _check_rows(chunk, f"batch {self._read} of {self.name}").detach()
                self.d_in = self.d_in or x.shape[1]
                if x.shape[1] != self.d_in:
                    raise ValueError(f"batch {self._read} of {self.name} has d={x.shape[1]}, the first had "
                                     f"d={self.d_in}")
                if len(x):
                    return x
            if not (again and self.again) or self._read == 0:
                return None
            self._it, self._read = iter(self.data), 0
        return None

    def check_configs(self, configs: list[SAEConfig]) -> None:
        for c in configs:
            if c.d_in != self.d_in:
                raise ValueError(f"config {c.label} has d_in={c.d_in}, the data d={self.d_in}")
        _check_budget(self.tc)

    def massive_rules(self, tc, given) -> dict:
        return {}

    def stats(self, hook: str, rule=None) -> tuple[float, torch.Tensor]:
        return self._stats

    def batches(self, total_steps: int, start: int, device):
        if start:
            raise ValueError("an iterator's batches cannot resume mid-run")
        B, pending, n = self.tc.batch_size, [], 0
        head, self.head = self.head, []
        while True:
            chunk = head.pop(0) if head else self._next()
            if chunk is None:
                return
            pending.append(chunk)
            n += len(chunk)
            while n >= B:
                rows = torch.cat(pending) if len(pending) > 1 else pending[0]
                batch, rest = rows[:B], rows[B:]
                pending, n = ([rest] if len(rest) else []), len(rest)
                if self.tc.resample_every:
                    self.recent.append(batch)
                    while sum(map(len, self.recent)) - len(self.recent[0]) >= self.tc.resample_pool:
                        self.recent.pop(0)
                yield batch.to(device).unsqueeze(0), None

    def pick(self, batch: torch.Tensor, hook: str) -> torch.Tensor:
        return batch[0]

    def check(self, batch, index, step: int, ckpt) -> None:
        if not torch.isfinite(batch).all():
            raise TrainingError(f"non-finite activations at step {step} of {self.name} (a batch of {batch.shape[1]} "
                                "rows)")

    def pools(self, step: int, device):
        pool = torch.cat(self.recent)[-self.tc.resample_pool:].to(device)
        return lambda hook: pool


def batch_source(data, tc: TrainConfig):
    """The source `train_on_batches` reads: a tensor's (or a numpy array's) rows (`TensorBatches`) or an
    iterable's batches (`IteratorBatches`); a source is returned as it is."""
    if hasattr(data, "batches") and hasattr(data, "pools"):
        return data
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        return TensorBatches(data, tc)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a tensor of activations [N, d_in] or an iterable of such tensors, not "
                        f"{type(data).__name__}")
    return IteratorBatches(data, tc)


def prepare_stacks(store, configs: list[SAEConfig], hooks: list[str], tc: TrainConfig, rules: dict | None,
                   device: torch.device) -> tuple[list[SAEStack], list[tuple[int, int]], dict]:
    """The stacks to train on a store's activations (see `prepare`). Returns (stacks, where, rules)."""
    return prepare(StoreBatches(store, hooks, tc), configs, tc, rules, device)


def prepare(source, configs: list[SAEConfig], tc: TrainConfig, rules: dict | None,
            device: torch.device) -> tuple[list[SAEStack], list[tuple[int, int]], dict]:
    """The stacks to train, on `device`: configs grouped into stacks, the source's massive rule (fitted
    unless given), input scale, and decoder bias at the data mean where the recipe centres its input.
    Returns (stacks, where, rules)."""
    stacks, where = build_stacks(configs, tc.seed)
    rules = source.massive_rules(tc, rules)
    stats = {(h, m): source.stats(h, rules.get(h) if m else None)
             for h, m in {(c.hook_name, c.massive) for c in configs}}
    for st in stacks:
        h = st.configs[0].hook_name
        scale, mean = stats[(h, st.configs[0].massive)]
        if st.configs[0].massive and h in rules:
            st.set_massive(rules[h])
        with torch.no_grad():
            st.scale.fill_(scale)
            if st.centres_input:  # start the decoder bias at the data mean (the improved recipe: at zero)
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
    freeze_encoder: bool = False  # encoders kept at their initialisation: no resampling

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
            if one.training_recipe.folds_norms:
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
    resolved precision. Kill-and-resume is bit-identical when the resume has the same setting (a GPU and
    another precision round differently)."""
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
                wait: float | None = None, freeze_encoder: bool = False) -> SweepResult:
    """Train every config on the store's activations, reading the data once (`train_on_batches` on the
    store's batches, `StoreBatches`).

    hook: the hook for configs that name none (None: every config trains at its own hook_name).
    rules: {hook: helpers.activations.massive.Massive} to use instead of fitting the massive rule on the store.
    run_dir: where the checkpoint is kept (every tc.checkpoint_every steps); an interrupted sweep resumes.
    The run folder is locked while it trains (helpers.settings.locks): another process training the same folder
    waits for it (`wait` seconds; None: helpers.settings.locks.default_wait), then resumes from its checkpoint.
    An SAE whose loss stops being finite is stopped there (a warning names it and the step) and listed
    in the result's `diverged`; the others train on. freeze_encoder: as in `train_on_batches`.
    """
    if not configs:
        raise ValueError("no SAE configs given")
    configs = resolve_hooks(configs, hook)
    hooks = _validate(store, configs, tc)
    return train_on_batches(StoreBatches(store, hooks, tc), configs, tc, run_dir=run_dir, progress=progress,
                            on_eval=on_eval, rules=rules, wait=wait, freeze_encoder=freeze_encoder)


def train_on_batches(source, configs: list[SAEConfig], tc: TrainConfig, *, run_dir=None, progress: bool = True,
                     on_eval=None, rules: dict | None = None, wait: float | None = None,
                     desc: str = "train", freeze_encoder: bool = False) -> SweepResult:
    """The training loop: every config trained on the batches of `source` (`StoreBatches`,
    `TensorBatches`, `IteratorBatches`; see `batch_source`) for tc.total_tokens tokens (the module
    docstring has what a step does). Configs of one shape key share a stack; every SAE's initial
    weights and resampling generator come from tc.seed and its own config, so that it ends the same
    whether it trains alone or among others. run_dir (a resumable source only) keeps a checkpoint and
    resumes from it; `rules`, `wait`: as in `train_sweep`. A one-pass source that runs out before the
    budget ends training there, with a warning. freeze_encoder: every SAE's encoder (W_enc, b_enc) keeps
    its random initialisation and only the decoder trains, with no resampling (`freeze_encoders`; the
    module docstring has the rest); a checkpoint records it."""
    if not configs:
        raise ValueError("no SAE configs given")
    _check_budget(tc)
    source.check_configs(configs)
    if run_dir is not None and not getattr(source, "resumable", False):
        raise ValueError(f"{type(source).__name__} cannot resume from a checkpoint: train without run_dir")
    device = resolve_device(tc.device)
    total_steps = tc.total_tokens // tc.batch_size
    lock = (FolderLock(run_dir, f"training {len(configs)} SAEs in {run_dir}", wait=wait)
            if run_dir is not None else nullcontext())
    with lock:
        stacks, where, rules = prepare(source, configs, tc, rules, device)
        if freeze_encoder:
            freeze_encoders(stacks)
        opt, sched = make_optimizer(stacks, tc, total_steps)
        autocast, scaler = amp(device, tc.precision)
        # One generator per SAE, seeded by the seed and the SAE's own config, so that resampling draws
        # the same inputs whether the SAE trains alone or in a sweep.
        gens = [torch.Generator().manual_seed(tc.seed * 1_000_003 + zlib.crc32(repr(c).encode())) for c in configs]
        gen_of = {pos: gens[i] for i, pos in enumerate(where)}
        fingerprint = _fingerprint(configs, tc, source) if run_dir is not None else {}
        if freeze_encoder and run_dir is not None:  # only when set: other runs keep their fingerprints
            fingerprint["freeze_encoder"] = True
        run = _Run(stacks, where, opt, sched, scaler,
                   [torch.zeros(st.n, st.d_sae, dtype=torch.int64, device=device) for st in stacks], gens,
                   fingerprint, Checkpoints(run_dir) if run_dir is not None else None,
                   setting=run_setting(device, tc.precision), freeze_encoder=freeze_encoder)
        run.restore(device)
        if run.step < total_steps:
            _train_loop(run, source, configs, tc, total_steps, device, gen_of, autocast, scaler, progress,
                        on_eval, desc)
        for i, sae in enumerate(snap := run.snapshot()):  # an SAE gone non-finite without a non-finite loss
            if i not in run.diverged and not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
                run.diverged[i] = run.step
                warnings.warn(f"SAE {i} ({configs[i].label}) ended with non-finite weights: it will not be saved "
                              "or chosen", stacklevel=2)
        return SweepResult(snap, list(configs), run.history, run.seconds, run.step * tc.batch_size, rules,
                           dict(run.diverged))


def _train_loop(run, source, configs, tc, total_steps, device, gen_of, autocast, scaler, progress, on_eval,
                desc) -> None:
    stacks, where, opt, sched = run.stacks, run.where, run.opt, run.sched
    grad_max = [None] * len(configs)  # largest pre-clip gradient norm since the last log, per SAE
    frozen = run.frozen()

    batches = source.batches(total_steps, run.step, device)
    warm_l1 = max(1, int(tc.l1_warmup_fraction * total_steps))

    bar = tqdm(total=total_steps, initial=run.step, desc=f"{desc} {len(configs)} SAEs", unit="step",
               disable=not progress)
    # stacks side by side on a CPU's cores (autocast's state is per thread, and a scaler unscales all at once)
    pool = StackPool.for_stacks(stacks, device, enabled=autocast is None and scaler is None and tc.parallel_stacks)
    t0 = time.perf_counter()
    try:
        while run.step < total_steps:
            try:
                x_all, index = next(batches)
            except StopIteration:
                warnings.warn(f"the batches ran out after {run.step} of {total_steps} steps "
                              f"({run.step * tc.batch_size:,} of {tc.total_tokens:,} tokens): training stops there, "
                              "before the learning rate has decayed", stacklevel=3)
                break
            source.check(x_all, index, run.step, run.ckpt)
            outs = train_step(stacks, [source.pick(x_all, st.configs[0].hook_name) for st in stacks], opt, sched,
                              run.since_fired, tc, l1_scale=min(1.0, (run.step + 1) / warm_l1), autocast=autocast,
                              scaler=scaler, frozen=frozen, pool=pool)
            run.step += 1
            step = run.step
            if not all(bool(torch.isfinite(o["loss"]).all()) for o in outs):
                _note_divergence(run, outs, configs, opt, step, tc)
                frozen = run.frozen()
            for i, (s, row) in enumerate(where):
                if "grad_norm" in outs[s]:
                    g = float(outs[s]["grad_norm"][row])
                    grad_max[i] = g if grad_max[i] is None else max(grad_max[i], g)
            if (tc.resample_every and not run.freeze_encoder and step % tc.resample_every == 0
                    and step < tc.resample_until * total_steps):
                _resample(stacks, run.since_fired, source.pools(step, device), tc, opt, gen_of, frozen)
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
        if pool is not None:
            pool.close()
    run.seconds += time.perf_counter() - t0
    if run.ckpt is not None and run.step % tc.checkpoint_every:  # else saved at this step already
        run.save()


def _resample(stacks, since_fired, pool, tc: TrainConfig, opt, gen_of, frozen=None) -> None:
    """Resample the dead latents of every paper-recipe L1 SAE from the inputs `pool(hook)` gives (one
    pool per hook); diverged (`frozen`) SAEs are left alone."""
    for s, st in enumerate(stacks):
        if not (st.arch.resamples and st.training_recipe.resamples):
            continue
        hook = st.configs[0].hook_name
        for row in range(st.n):
            if frozen is not None and bool(frozen[s][row]):
                continue
            dead = since_fired[s][row] >= tc.dead_window
            if resample_dead(st, row, dead, pool(hook), opt, gen_of[(s, row)]):
                since_fired[s][row][dead] = 0


# ---------------------------------------------------------------------------------------------------
# One SAE from plain tensors
# ---------------------------------------------------------------------------------------------------


def budget_config(tokens: int, batch_size: int = 4096, lr: float = 1e-3, **kw) -> TrainConfig:
    """A TrainConfig with the schedule helpers.runs.sweep derives from a token budget: LR warm-up over
    the first 5% of steps, a latent dead after a quarter of the tokens (at most 1M) without firing,
    resampling five times in the first 70% of training, about 100 log records; no massive rule.
    `kw` sets any other TrainConfig field."""
    steps = max(1, tokens // batch_size)
    base = dict(total_tokens=tokens, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                dead_window=max(batch_size, min(tokens // 4, 1_000_000)), resample_every=max(1, steps // 5),
                resample_until=0.7, massive=False, log_every=max(1, steps // 100))
    return TrainConfig(**{**base, **kw})


_SETTING_ARGS = ("k", "l1_coefficient", "l0_coefficient")


def train_sae(data, architecture: str = "topk", *, d_sae: int | None = None, expansion: int = 8, k: int = 32,
              l1_coefficient: float | None = None, l0_coefficient: float | None = None, tokens: int | None = None,
              batch_size: int = 4096, lr: float = 1e-3, seed: int = 0, device: str | None = None,
              progress: bool = True, hook_name: str = "", model_name: str = "", freeze_encoder: bool = False,
              **config) -> SAEDictionary:
    """Train one SAE on plain activations and return it as a Dictionary (`.encode(x)` [N, d_sae],
    `.decode`, `.sae` the one-SAE stack, `.save(folder)` in SAELens layout).

    data: a float tensor [N, d_in] (shuffled batches are drawn from it, in epochs), or an iterable of
      float tensors [b, d_in] (or [..., d_in]) used in the order given, cut into batches of batch_size
      (a list is read again when it runs out; a generator that runs out ends training early).
    architecture: a name in helpers.saes.architectures.ARCHITECTURES ("topk", "batchtopk",
      "matryoshka_batchtopk", "jumprelu", "standard"); its sparsity setting is `k` (the k-sparse
      architectures), `l1_coefficient` (standard) or `l0_coefficient` (jumprelu), the architecture's
      `default_setting(k)` where not given.
    d_sae: the dictionary size (default: expansion × d_in).
    tokens: the training budget (default: 1M); the schedule follows from it (`budget_config`).
    device: None for the GPU where there is one. hook_name, model_name: recorded in the SAE's files.
    freeze_encoder: keep the encoder (W_enc, b_enc) at its random initialisation and train only the
      decoder, with no resampling (Korznikov et al. 2026's control; the module docstring has the rest).
    config: any other SAEConfig field (recipe="improved", tied, matryoshka_widths, ...).

    The training loop is the sweep's (`train_on_batches`): Adam with warm-up and decay, inputs
    scaled to mean norm √d_in from the data, b_dec at the data mean, AuxK or resampling for dead
    latents as the architecture asks; no massive-activation rule.
    """

    arch = architectures.get(architecture)
    given = {"k": k if arch.setting == "k" else None, "l1_coefficient": l1_coefficient,
             "l0_coefficient": l0_coefficient}
    setting = {key: v for key, v in given.items() if v is not None}
    if arch.setting and arch.setting not in setting and arch.setting not in config:
        setting.update({key: v for key, v in arch.default_setting(k).items() if key == arch.setting})
    tc = budget_config(tokens or TrainConfig.total_tokens, batch_size, lr, seed=seed, device=device or "auto")
    source = batch_source(data, tc)
    cfg = SAEConfig(d_in=source.d_in, d_sae=d_sae or expansion * source.d_in, architecture=architecture,
                    hook_name=hook_name, model_name=model_name, **{**setting, **config})
    result = train_on_batches(source, [cfg], tc, progress=progress, desc="train_sae:", freeze_encoder=freeze_encoder)
    if result.diverged:
        raise TrainingError(f"the SAE diverged at step {result.diverged[0]} (lr {lr:g}): lower the learning rate")
    return SAEDictionary(result.saes[0])
