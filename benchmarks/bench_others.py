"""One training step of two external SAE libraries, for `python -m benchmarks.bench train`.

    step = saelens_step_fn(d, m, batch, device, dtype)        # SAELens standard (ReLU + L1) SAE
    step = sparsify_step_fn(d, m, k, batch, device, dtype)    # EleutherAI sparsify TopK SAE
    if isinstance(step, str): print(step)                      # library missing or unsupported
    else: step(); ...                                          # one full step per call

Each builder returns a zero-argument function doing ONE full training step on `batch` ([B, d],
already on `device`): forward, the library's own training loss, backward, optimizer step and the
per-step bookkeeping/normalisation of the library's trainer. The function returns the step's loss
as a detached tensor (no host sync; call `.item()` if you want it). If the library is not
importable, or its API is not the one this module drives, the builder returns a string saying why.

`dtype` follows benchmarks.bench: torch.bfloat16 means "fp32 parameters, bf16 autocast" (what both
libraries' trainers do on GPU); anything else means plain fp32. The parameters are always fp32.

Neither library is a dependency of the workbook: both are imported inside the functions, so this
module imports without them. They pin their own stacks (transformers, transformer-lens, ...), so
install them in a separate venv; docs/performance.md has the commands.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from importlib import metadata

import torch

_SAELENS_HINT = "pip install sae-lens"
_SPARSIFY_HINT = "pip install eai-sparsify"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Installed versions of the two libraries (None where not installed)."""
    return {"sae_lens": _version("sae-lens"), "sparsify": _version("eai-sparsify")}


def _autocast(device: torch.device, dtype):
    if dtype == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def saelens_step_fn(d: int, m: int, batch: torch.Tensor, device: torch.device, dtype,
                    *, l1_coefficient: float | None = None, lr: float | None = None):
    """SAELens (v6 API) standard SAE: `StandardTrainingSAE` driven by the library's own
    `SAETrainer.step`, so a step is exactly what `SAETrainer.fit` runs per batch, minus logging
    and checkpointing:

    - under `torch.autocast(bf16)` if the trainer's `autocast` is on (set when dtype is bf16):
      `training_forward_pass` = encode (x - b_dec) @ W_enc + b_enc -> ReLU, decode, loss =
      MSE (summed over d, mean over the batch) + l1_coefficient * mean_b ||f * ||W_dec rows|| ||_1
      (the L1 term is weighted by the decoder norms; v6 does NOT renormalise W_dec per step);
    - the trainer's dead-feature bookkeeping (firing counts per latent);
    - backward, `clip_grad_norm_(params, 1.0)`, Adam step (betas 0.9/0.999), zero_grad,
      lr-scheduler step (constant) and L1-coefficient-scheduler step (no warm-up).

    l1_coefficient and lr default to the library's own defaults (1.0 and 3e-4 in 6.x).
    """
    try:
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as e:
        if _version("sae-lens") is None:
            return f"sae-lens not installed: {_SAELENS_HINT}"
        return f"sae-lens {_version('sae-lens')} not usable here ({e}); this bench needs the 6.x API"

    device = torch.device(device)
    sae_kw = {} if l1_coefficient is None else {"l1_coefficient": l1_coefficient}
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=d, d_sae=m, dtype="float32", device=str(device), **sae_kw))
    tr_kw = {} if lr is None else {"lr": lr}
    cfg = SAETrainerConfig(
        total_training_samples=batch.shape[0] * 10**9, train_batch_size_samples=batch.shape[0],
        device=str(device), autocast=dtype == torch.bfloat16,
        logger=LoggingConfig(log_to_wandb=False), **tr_kw)
    cfg.lr_end = cfg.lr / 10  # the runner config sets this in its __post_init__; the trainer asserts it
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step():
        out = trainer.step(batch)
        trainer.n_training_steps += 1  # fit() advances it after each step
        return out.loss.detach()

    step.model = sae
    return step


def sparsify_step_fn(d: int, m: int, k: int, batch: torch.Tensor, device: torch.device, dtype,
                     *, auxk_alpha: float = 1 / 32, optimizer: str = "adam", lr: float | None = None):
    """EleutherAI sparsify TopK SAE (`SparseCoder`, alias `Sae`), stepped the way its `Trainer`
    steps an SAE for loss_fn="fvu", grad_acc_steps = micro_acc_steps = 1. The Trainer itself only
    runs hooked into a Hugging Face model, so its per-step body is reproduced here, calling the
    library's own methods for every piece of maths:

    - first step only: b_dec <- batch mean (the Trainer's init; encoder bias stays 0);
    - `set_decoder_norm_to_unit_norm()` before the forward (normalize_decoder is on by default);
    - dead_mask = tokens-since-fired > dead_feature_threshold (library default, 10M tokens);
    - `sae(x, y=x, dead_mask=..., total_variance=sum((x - mean x)^2))`: fused encoder
      (linear -> ReLU -> topk, sparse backward), sparse decoder (`decoder_impl`), FVU and, when
      latents are dead, the AuxK loss (top-d/2 dead latents predicting the residual);
      loss = fvu + auxk_alpha * auxk_loss (+ multi_topk_fvu / 8, 0 here);
    - backward, `remove_gradient_parallel_to_decoder_directions()`, optimizer step, zero_grad,
      lr-scheduler step, dead-latent bookkeeping (tokens since fired, did_fire).

    Choices, where the Trainer's behaviour depends on things outside the public API:
    - optimizer="adam" (default, for a like-for-like comparison) is torch.optim.Adam with the
      Trainer's Adam lr, 2e-4 / sqrt(m / 2**14), and its linear warm-up schedule
      (lr_warmup_steps from TrainConfig, 1000). The Trainer would take bitsandbytes' Adam8bit if
      installed; we always use torch's Adam. optimizer="signum" gives the Trainer's default
      optimizer instead (ScheduleFreeWrapper(SignSGD, momentum 0.95), lr 5e-3 / sqrt(m / 2**14)).
    - auxk_alpha: 1/32 (the AuxK paper's value; sparsify's TrainConfig default is 0.0 in 1.x, in
      which case the Trainer passes dead_mask=None). With a fresh SAE no latent has gone 10M
      tokens without firing, so the AuxK branch only costs the dead-mask count (a host sync)
      unless a benchmark runs that long.
    - The Trainer's per-step host syncs for logging (float(fvu)) are left out.
    - Precision: the library wraps `SparseCoder.forward` in bf16 autocast on CUDA whatever we
      ask (`@torch.autocast("cuda", enabled=torch.cuda.is_bf16_supported())`); dtype=bf16 adds
      the same autocast around the whole forward (also on CPU). `Trainer.fit` sets
      `torch.set_float32_matmul_precision("high")`; we set it for the duration of each step and
      restore it, so that our own benchmark is not affected.
    - Triton: on a non-CUDA device the library's eager decoder (`eager_decode`, an
      embedding_bag) is used: SPARSIFY_DISABLE_TRITON=1 is set before the first import, and if
      sparsify was already imported with the Triton decoder, the eager one is swapped in for the
      step. On CUDA the library's own choice (Triton if installed) is kept.
    """
    device = torch.device(device)
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its decoder choice on import
            import sparsify
            from sparsify import SparseCoderConfig, TrainConfig
            from sparsify.utils import eager_decode
            coder_cls = getattr(sparsify, "SparseCoder", None) or sparsify.Sae
            sc = sys.modules[coder_cls.__module__]  # its module global `decoder_impl` is used
    except (ImportError, AttributeError) as e:
        if _version("eai-sparsify") is None:
            return f"sparsify not installed: {_SPARSIFY_HINT}"
        return f"sparsify {_version('eai-sparsify')} not usable here ({e})"

    sae_cfg = SparseCoderConfig(num_latents=m, k=k)
    tcfg = TrainConfig(sae_cfg)  # the library's defaults (thresholds, warm-up)
    torch.manual_seed(0)  # the Trainer seeds before building each SAE
    sae = coder_cls(d, sae_cfg, device=device, dtype=torch.float32)

    if optimizer == "adam":
        from transformers import get_linear_schedule_with_warmup
        opt = torch.optim.Adam(sae.parameters(), lr=lr or 2e-4 / (m / 2**14) ** 0.5)
        sched = get_linear_schedule_with_warmup(opt, tcfg.lr_warmup_steps, 10**9)
    elif optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD
        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=lr or 5e-3 / (m / 2**14) ** 0.5),
                                  momentum=0.95)
        opt.train()
        sched = None
    else:
        raise ValueError(f"optimizer must be 'adam' or 'signum', not {optimizer!r}")

    tokens_since_fired = torch.zeros(m, device=device, dtype=torch.long)
    did_fire = torch.zeros(m, device=device, dtype=torch.bool)
    swap_decoder = device.type != "cuda" and sc.decoder_impl is not eager_decode
    state = {"step": 0}

    def step():
        prev_prec = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        prev_dec = sc.decoder_impl
        if swap_decoder:
            sc.decoder_impl = eager_decode
        try:
            x = batch
            if state["step"] == 0:
                sae.b_dec.data = x.mean(0).to(sae.dtype)
            if sae.cfg.normalize_decoder:
                sae.set_decoder_norm_to_unit_norm()
            dead_mask = tokens_since_fired > tcfg.dead_feature_threshold if auxk_alpha > 0 else None
            total_variance = (x - x.mean(0)).pow(2).sum()
            with _autocast(device, dtype):
                out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            if sae.cfg.normalize_decoder:
                sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                tokens_since_fired.add_(x.shape[0])
                tokens_since_fired[did_fire] = 0
                did_fire.zero_()
            state["step"] += 1
            return loss.detach()
        finally:
            sc.decoder_impl = prev_dec
            torch.set_float32_matmul_precision(prev_prec)

    step.model = sae
    return step
