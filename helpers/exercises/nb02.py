"""The exercises of notebook 02: references, random cases and known mistakes.

02.1 sae_forward: the paper's SAE, codes and reconstruction (helpers.saes.stack.SAEStack.encode / decode);
02.2 sae_loss: MSE / d + α · Σ_i c_i ‖W_dec,i‖ (SAEStack.losses, the dense path);
02.3 topk_codes: TopK's activation (helpers.saes.architectures.TopK.codes);
02.4 unit_norm_step: the decoder-gradient projection, a step, the renormalisation
     (SAEStack.remove_parallel_grads, normalize_decoder; the workbook steps with Adam, the exercise with SGD);
02.5 fvu: FVU over all and over ordinary tokens (helpers.evals.reconstruction.split_fvu);
02.6 ce_recovered: CE loss with the reconstruction spliced in, and the fraction recovered
     (helpers.evals.reconstruction.spliced_loss, against zero ablation);
02.7 l1_warmup: the L1 coefficient's linear warm-up (helpers.saes.train.train_sweep's l1_scale);
02.8 dead_latents: the tokens-since-fired counters and the dead mask (helpers.saes.train.train_step);
02.9 sae_train_step: one Anthropic-2023 step, loss, projection, Adam with its state given, renormalisation
     (by the formulas; tests/test_train_step.py checks them against SAEStack and torch.optim.Adam);
02.10 mmcs: mean max cosine similarity (helpers.evals.reconstruction.mmcs);
02.11 auxk_loss: Gao et al.'s auxiliary loss for dead latents (helpers.saes.architectures' AuxK term).

Weights follow the workbook's layout: W_enc and W_dec are both [d_sae, d_in], one row per latent
(pre-activations are x·W_encᵀ, reconstructions c·W_dec).
"""
from __future__ import annotations

import math
import weakref

import torch

from helpers.evals.reconstruction import mmcs, spliced_loss, split_fvu
from helpers.saes.architectures import TopK
from helpers.saes.stack import SAEConfig, SAEStack

from .core import Exercise, register
from .nb01 import with_massive_rows


def _stack(W_enc, b_enc, W_dec, b_dec, l1_coefficient=0.0) -> SAEStack:
    """A one-SAE SAEStack (Anthropic-2023 recipe, input scale 1, no massive rule) holding these weights."""
    m, d = W_dec.shape
    sae = SAEStack([SAEConfig(d_in=d, d_sae=m, l1_coefficient=float(l1_coefficient))])
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.float().unsqueeze(0))
        sae.W_dec.copy_(W_dec.float().unsqueeze(0))
        sae.b_enc.copy_(b_enc.float().unsqueeze(0))
        sae.b_dec.copy_(b_dec.float().unsqueeze(0))
    return sae


def _sae_weights(gen, d, m, unit=True):
    """Random SAE weights; decoder rows unit norm, or of norms between 0.5 and 2 (unit=False)."""
    W_dec = torch.randn(m, d, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    if not unit:
        W_dec = W_dec * (0.5 + 1.5 * torch.rand(m, 1, generator=gen))
    return dict(W_enc=torch.randn(m, d, generator=gen) / d ** 0.5, b_enc=0.1 * torch.randn(m, generator=gen),
                W_dec=W_dec, b_dec=torch.randn(d, generator=gen))


# ---- 02.1 · the forward pass ----------------------------------------------------------------------
@torch.no_grad()
def _sae_forward(x, W_enc, b_enc, W_dec, b_dec):
    sae = _stack(W_enc, b_enc, W_dec, b_dec)
    c = sae.encode(x.float())
    return c[0], sae.decode(c)[0]


def _forward_cases(gen):
    return [dict(x=torch.randn(6, 8, generator=gen) + 1.0, **_sae_weights(gen, 8, 16)),
            dict(x=torch.randn(5, 12, generator=gen), **_sae_weights(gen, 12, 24))]


def _no_centring(x, W_enc, b_enc, W_dec, b_dec):
    c = torch.relu(x @ W_enc.T + b_enc)
    return c, c @ W_dec + b_dec


def _no_relu(x, W_enc, b_enc, W_dec, b_dec):
    c = (x - b_dec) @ W_enc.T + b_enc
    return c, c @ W_dec + b_dec


def _no_bias_back(x, W_enc, b_enc, W_dec, b_dec):
    c = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    return c, c @ W_dec


register(Exercise(
    id="02.1", name="sae_forward", reference=_sae_forward, random_cases=_forward_cases,
    mistakes=(
        (_no_centring, "the encoder sees x - b_dec: you forgot to subtract the decoder bias before encoding"),
        (_no_relu, "the ReLU is left out: codes are ReLU(W_enc (x - b_dec) + b_enc), never negative"),
        (_no_bias_back, "the reconstruction adds the decoder bias back: x̂ = c W_dec + b_dec"),
    ),
))


# ---- 02.2 · the loss ------------------------------------------------------------------------------
def _sae_loss(x, W_enc, b_enc, W_dec, b_dec, l1_coefficient):
    out = _stack(W_enc, b_enc, W_dec, b_dec, l1_coefficient).losses(x.float(), path="dense")
    return out["mse"][0].detach(), out["l1"][0].detach(), out["loss"][0].detach()


def _loss_cases(gen):
    return [dict(x=torch.randn(6, 8, generator=gen) + 1.0, **_sae_weights(gen, 8, 16, unit=False), l1_coefficient=0.05),
            dict(x=torch.randn(10, 12, generator=gen), **_sae_weights(gen, 12, 24, unit=False), l1_coefficient=0.3)]


def _parts(x, W_enc, b_enc, W_dec, b_dec):
    c = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    return c, c @ W_dec + b_dec


def _loss_from(mse, l1):
    return mse, l1, mse + l1


def _mse_not_per_dim(x, W_enc, b_enc, W_dec, b_dec, l1_coefficient):
    c, xh = _parts(x, W_enc, b_enc, W_dec, b_dec)
    return _loss_from((x - xh).pow(2).sum(-1).mean(), l1_coefficient * (c * W_dec.norm(dim=-1)).sum(-1).mean())


def _plain_l1(x, W_enc, b_enc, W_dec, b_dec, l1_coefficient):
    c, xh = _parts(x, W_enc, b_enc, W_dec, b_dec)
    return _loss_from((x - xh).pow(2).mean(), l1_coefficient * c.sum(-1).mean())


def _l1_summed_over_batch(x, W_enc, b_enc, W_dec, b_dec, l1_coefficient):
    c, xh = _parts(x, W_enc, b_enc, W_dec, b_dec)
    return _loss_from((x - xh).pow(2).mean(), l1_coefficient * (c * W_dec.norm(dim=-1)).sum())


def _l1_of_pre(x, W_enc, b_enc, W_dec, b_dec, l1_coefficient):
    pre = (x - b_dec) @ W_enc.T + b_enc
    xh = torch.relu(pre) @ W_dec + b_dec
    return _loss_from((x - xh).pow(2).mean(), l1_coefficient * (pre.abs() * W_dec.norm(dim=-1)).sum(-1).mean())


register(Exercise(
    id="02.2", name="sae_loss", reference=_sae_loss, random_cases=_loss_cases,
    mistakes=(
        (_mse_not_per_dim, "the MSE term is ‖x - x̂‖² / d_in: you summed over dimensions without dividing by d_in"),
        (_plain_l1, "the L1 term weighs each code by its decoder row's norm, α Σ_i c_i ‖W_dec,i‖ (the rows "
                    "are not unit norm here), so the SAE cannot dodge the penalty by growing its rows"),
        (_l1_summed_over_batch, "the L1 term is averaged over the batch's tokens, like the MSE, not summed"),
        (_l1_of_pre, "the L1 term is of the codes (after the ReLU), not of the pre-activations"),
    ),
))


# ---- 02.3 · TopK --------------------------------------------------------------------------------
def _topk_codes(pre, k):
    return TopK().codes(pre.float().unsqueeze(0), {"k": torch.tensor([k])})[0]


def _topk_cases(gen):
    return [dict(pre=torch.randn(6, 16, generator=gen), k=3),
            dict(pre=torch.randn(7, 20, generator=gen) - 1.5, k=5),  # most rows: fewer than k positive
            dict(pre=torch.randn(4, 9, generator=gen), k=1)]


def _keep(pre, idx, dim):
    return torch.zeros_like(pre).scatter(dim, idx, pre.gather(dim, idx))


def _topk_no_relu(pre, k):
    return _keep(pre, pre.topk(k, dim=-1).indices, -1)


def _topk_batch_dim(pre, k):
    return torch.relu(_keep(pre, pre.topk(min(k, pre.shape[0]), dim=0).indices, 0))


def _topk_abs(pre, k):
    return torch.relu(_keep(pre, pre.abs().topk(k, dim=-1).indices, -1))


register(Exercise(
    id="02.3", name="topk_codes", reference=_topk_codes, random_cases=_topk_cases,
    mistakes=(
        (_topk_batch_dim, "top-k over the wrong dimension: each token (row) keeps its own k largest latents (dim=-1)"),
        (_topk_no_relu, "the ReLU is left out: when fewer than k pre-activations are positive, the negative "
                        "ones kept must become 0"),
        (_topk_abs, "you kept the k largest by magnitude; TopK keeps the k largest values (most positive)"),
    ),
))


# ---- 02.4 · a step that keeps the dictionary at unit norm ---------------------------------------
@torch.no_grad()
def _unit_norm_step(W_dec, grad, lr):
    m, d = W_dec.shape
    sae = SAEStack([SAEConfig(d_in=d, d_sae=m)])
    sae.W_dec.copy_(W_dec.float().unsqueeze(0))
    sae.W_dec.grad = grad.float().unsqueeze(0).clone()
    sae.remove_parallel_grads()
    g = sae.W_dec.grad[0].clone()
    sae.W_dec.sub_(lr * sae.W_dec.grad)  # SGD here; the workbook's trainer steps with Adam
    sae.normalize_decoder()
    return g, sae.W_dec[0].clone()


def _step_cases(gen):
    out = []
    for m, d, lr in ((12, 6, 0.1), (20, 8, 0.5)):
        W = torch.randn(m, d, generator=gen)
        out.append(dict(W_dec=W / W.norm(dim=-1, keepdim=True), grad=torch.randn(m, d, generator=gen), lr=lr))
    return out


def _unit(W, dim=-1):
    return W / W.norm(dim=dim, keepdim=True)


def _step_no_projection(W_dec, grad, lr):
    return grad, _unit(W_dec - lr * grad)


def _step_no_renorm(W_dec, grad, lr):
    g = grad - (grad * W_dec).sum(-1, keepdim=True) * W_dec
    return g, W_dec - lr * g


def _step_columns(W_dec, grad, lr):
    g = grad - (grad * W_dec).sum(-1, keepdim=True) * W_dec
    return g, _unit(W_dec - lr * g, dim=0)


def _step_whole_matrix(W_dec, grad, lr):
    g = grad - (grad * W_dec).sum() / (W_dec * W_dec).sum() * W_dec
    return g, _unit(W_dec - lr * g)


register(Exercise(
    id="02.4", name="unit_norm_step", reference=_unit_norm_step, random_cases=_step_cases,
    mistakes=(
        (_step_no_projection, "the gradient keeps its component along each row: remove (g_i · w_i) w_i from every row first"),
        (_step_whole_matrix, "you projected the gradient off the whole matrix at once; each row's gradient loses "
                             "its own component along that row"),
        (_step_no_renorm, "after the step the rows are renormalised to unit norm (the projection keeps them "
                          "unit norm only to first order)"),
        (_step_columns, "you normalised the columns (dim 0): each dictionary direction is a row of W_dec"),
    ),
))


# ---- 02.5 · FVU over all and ordinary tokens -----------------------------------------------------
def _fvu(x, x_hat, flags):
    out = split_fvu((x.double() - x_hat.double()).pow(2).sum(-1), x, flags)
    return out["fvu"], out["fvu_ordinary"]


def _fvu_cases(gen):
    out = []
    for n, d, k, noise in ((301, 16, 7, 0.3), (201, 10, 4, 0.6)):
        x = with_massive_rows(gen, n, d, k)
        norms = x.norm(dim=-1)
        out.append(dict(x=x, x_hat=x + noise * torch.randn(n, d, generator=gen), flags=norms > 4 * norms.median()))
    return out


def _fvu_of(err, x):
    return (err.sum() / (x - x.mean(0)).pow(2).sum()).item()


def _fvu_per_dim(x, x_hat, flags):
    def one(xs, xh):
        return ((xs - xh).pow(2).sum(0) / (xs - xs.mean(0)).pow(2).sum(0)).mean().item()
    return one(x, x_hat), one(x[~flags], x_hat[~flags])


def _fvu_per_dim_var(x, x_hat, flags):  # the same mistake, written with torch's (unbiased) var
    def one(xs, xh):
        return ((xs - xh).pow(2).mean(0) / xs.var(0)).mean().item()
    return one(x, x_hat), one(x[~flags], x_hat[~flags])


def _fvu_uncentred(x, x_hat, flags):
    err = (x - x_hat).pow(2)
    return (err.sum() / x.pow(2).sum()).item(), (err[~flags].sum() / x[~flags].pow(2).sum()).item()


def _fvu_global_mean(x, x_hat, flags):
    err = (x - x_hat).pow(2).sum(-1)
    dev = (x - x.mean(0)).pow(2).sum(-1)
    return _fvu_of(err, x), (err[~flags].sum() / dev[~flags].sum()).item()


def _fvu_total_denominator(x, x_hat, flags):
    err = (x - x_hat).pow(2).sum(-1)
    return _fvu_of(err, x), (err[~flags].sum() / (x - x.mean(0)).pow(2).sum()).item()


_PER_DIM = ("you averaged each dimension's FVU (dividing by per-dimension variance): the FVU divides the total "
            "squared error by the total variance, so high-variance dimensions weigh more")

register(Exercise(
    id="02.5", name="fvu", reference=_fvu, random_cases=_fvu_cases,
    mistakes=(
        (_fvu_per_dim, _PER_DIM),
        (_fvu_per_dim_var, _PER_DIM),
        (_fvu_uncentred, "the denominator is the variance, Σ‖x - mean(x)‖²: you forgot to subtract the mean"),
        (_fvu_global_mean, "the ordinary tokens' variance is around THEIR mean, not the mean of all tokens"),
        (_fvu_total_denominator, "the ordinary FVU divides the ordinary tokens' error by the ordinary tokens' "
                                 "variance, not by the variance of all tokens"),
    ),
))


# ---- 02.6 · CE-loss recovered --------------------------------------------------------------------
# Every function here runs the whole model two to four times. The results are kept for as long as the
# `reconstruct` function they were computed with lives (weakly keyed), so that the check's search for a
# likely cause, and the test suite's cases (built once per model), do not repeat forward passes.
_RUNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CASES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _memo(reconstruct, key, compute):
    try:
        runs = _RUNS.setdefault(reconstruct, {})
    except TypeError:  # not weakly referenceable: no memory
        return compute()
    if key not in runs:
        runs[key] = compute()
    return runs[key]


def _key(model, tokens, hook, *what):
    return (id(model), hook, tuple(tokens.shape), tuple(tokens.flatten().tolist()), *what)


@torch.no_grad()
def _ce_recovered(model, tokens, hook, reconstruct):
    def compute():
        out = spliced_loss(model, tokens, hook, lambda a: reconstruct(a).unsqueeze(0))
        return out["ce_clean"], out["ce_zero"], out["ce_sae"][0], out["ce_recovered"][0]
    return _memo(reconstruct, _key(model, tokens, hook, "reference"), compute)


def _ce_model_cases(model, gen):
    """Two short random contexts and a lossy "SAE" (the projection onto 96 random directions of d),
    built once per model: the same objects every time, so that forward passes are remembered."""
    if model not in _CASES:
        d = model.cfg.d_model
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, 96, generator=g))
        proj = (q @ q.T).to(next(model.parameters()).device)
        ids = torch.randint(100, model.cfg.d_vocab, (2, 10), generator=g)
        ids[:, 0] = model.tokenizer.bos_token_id

        def reconstruct(a):
            return a @ proj

        _CASES[model] = [dict(model=model, tokens=ids, hook="blocks.3.hook_resid_post", reconstruct=reconstruct)]
    return _CASES[model]


@torch.no_grad()
def _ce(model, tokens, hook, reconstruct, patch: str, skip_first: bool = True) -> float:
    """Mean next-token CE with the hook's activations left alone (patch "clean"), zeroed but at BOS
    ("zero"), reconstructed but at BOS ("spliced") or reconstructed everywhere ("spliced_bos")."""
    def compute():
        def fn(act, hook):
            new = act.clone()
            if patch == "zero":
                new[:, 1:] = 0
            elif patch == "spliced":
                new[:, 1:] = reconstruct(act[:, 1:].reshape(-1, act.shape[-1])).reshape(act[:, 1:].shape)
            else:
                new = reconstruct(act.reshape(-1, act.shape[-1])).reshape(act.shape).to(act.dtype)
            return new

        if patch == "clean":
            logits = model(tokens)
        else:
            with model.hooks(fwd_hooks=[(hook, fn)]):
                logits = model(tokens)
        logp = logits.float().log_softmax(-1)
        first = 1 if skip_first else 0
        return -logp[:, first:-1].gather(-1, tokens[:, first + 1:, None]).mean().item()
    return _memo(reconstruct, _key(model, tokens, hook, patch, skip_first), compute)


def _three(model, tokens, hook, reconstruct, spliced="spliced", skip_first=True):
    return tuple(_ce(model, tokens, hook, reconstruct, p, skip_first) for p in ("clean", "zero", spliced))


def _ce_lost(model, tokens, hook, reconstruct):
    clean, zero, spliced = _three(model, tokens, hook, reconstruct)
    return clean, zero, spliced, (spliced - clean) / (zero - clean)


def _ce_bos_patched(model, tokens, hook, reconstruct):
    clean, zero, spliced = _three(model, tokens, hook, reconstruct, spliced="spliced_bos")
    return clean, zero, spliced, (zero - spliced) / (zero - clean)


def _ce_all_positions(model, tokens, hook, reconstruct):
    clean, zero, spliced = _three(model, tokens, hook, reconstruct, skip_first=False)
    return clean, zero, spliced, (zero - spliced) / (zero - clean)


register(Exercise(
    id="02.6", name="ce_recovered", reference=_ce_recovered, model_cases=_ce_model_cases, atol=1e-4,
    mistakes=(
        (_ce_lost, "that is the fraction LOST, (CE_spliced - CE_clean) / (CE_zero - CE_clean); recovered is "
                   "(CE_zero - CE_spliced) / (CE_zero - CE_clean)"),
        (_ce_bos_patched, "you replaced the BOS position too: BOS keeps its own activation (act[:, 1:] only)"),
        (_ce_all_positions, "the loss is averaged over every prediction but the one made at BOS (positions "
                            "1 … T-2 predicting tokens 2 … T-1), which no patch can change"),
    ),
))


# ---- 02.7 · the L1 warm-up -----------------------------------------------------------------------
def _l1_warmup(step, warmup_steps, alpha):
    # helpers.saes.train.train_sweep: l1_scale = min(1, (step + 1) / warm_l1), step counted from 0
    return float(alpha) * min(1.0, (step + 1) / max(1, warmup_steps))


def _warmup_cases(gen):
    alpha = float(0.01 + torch.rand((), generator=gen))
    return [dict(step=s, warmup_steps=w, alpha=alpha) for s, w in ((0, 10), (4, 10), (9, 10), (50, 10), (0, 1), (7, 200))]


def _warmup_from_zero(step, warmup_steps, alpha):
    return alpha * min(1.0, step / warmup_steps)


def _warmup_unclamped(step, warmup_steps, alpha):
    return alpha * (step + 1) / warmup_steps


def _warmup_inverted(step, warmup_steps, alpha):
    return alpha * max(0.0, 1 - step / warmup_steps)


register(Exercise(
    id="02.7", name="l1_warmup", reference=_l1_warmup, random_cases=_warmup_cases,
    mistakes=(
        (_warmup_from_zero, "step counts from 0, and step 0 already trains: the factor is (step + 1) / warmup_steps, "
                            "so the first step has a small penalty, not none"),
        (_warmup_unclamped, "after the warm-up α stays at its full value: the factor is capped at 1 (min(1, ...))"),
        (_warmup_inverted, "the coefficient rises from 0 to α during the warm-up, it does not fall"),
    ),
))


# ---- 02.8 · counting dead latents ----------------------------------------------------------------
def _dead_latents(since_fired, codes, window):
    # helpers.saes.train.train_step: counters in tokens, reset where a latent fired in the batch
    fired = (codes > 0).any(0)
    since = torch.where(fired, torch.zeros_like(since_fired), since_fired + codes.shape[0])
    return since, since >= window


def _dead_cases(gen):
    out = []
    for b, m, window in ((16, 12, 40), (32, 20, 64)):
        codes = torch.relu(torch.randn(b, m, generator=gen) - 2.0)  # many latents silent in the batch
        since = torch.randint(0, 3, (m,), generator=gen) * b  # 0, b or 2b tokens: some exactly reach the window
        since[: m // 3] = window - b                            # silent ones among these reach the window exactly
        out.append(dict(since_fired=since, codes=codes, window=window))
    return out


def _dead_batches(since_fired, codes, window):
    fired = (codes > 0).any(0)
    since = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
    return since, since >= window


def _dead_no_reset(since_fired, codes, window):
    since = since_fired + codes.shape[0] * (~(codes > 0).any(0)).long()
    return since, since >= window


def _dead_strict(since_fired, codes, window):
    since, _ = _dead_latents(since_fired, codes, window)
    return since, since > window


register(Exercise(
    id="02.8", name="dead_latents", reference=_dead_latents, random_cases=_dead_cases,
    mistakes=(
        (_dead_batches, "the counters are in tokens, not batches: a silent latent's counter grows by the batch's "
                        "number of tokens"),
        (_dead_no_reset, "a latent that fires in the batch starts counting again from 0: its counter is reset, "
                         "not left where it was"),
        (_dead_strict, "a latent is dead once its counter reaches the window (>=), not only when it passes it"),
    ),
))


# ---- 02.9 · one training step ---------------------------------------------------------------------
BETAS = (0.9, 0.999)  # helpers.saes.train.TrainConfig's beta1, beta2 (torch's Adam defaults)
ADAM_EPS = 1e-8       # torch.optim.Adam's default eps, which the workbook keeps
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _train_step(params, adam, x, lr, l1_coefficient):
    """One step of the Anthropic-2023 recipe, by the formulas (float64 where the inputs are): loss, gradient,
    unit-norm projection, Adam with the given state, renormalisation. tests/test_train_step.py checks it
    against the workbook's machinery (SAEStack.losses, remove_parallel_grads, torch.optim.Adam,
    normalize_decoder)."""
    p = {k: params[k].detach().clone().requires_grad_(True) for k in PARAMS}
    codes = torch.relu((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"])
    x_hat = codes @ p["W_dec"] + p["b_dec"]
    mse = (x - x_hat).pow(2).sum(-1).mean() / x.shape[-1]
    loss = mse + l1_coefficient * (codes * p["W_dec"].norm(dim=-1)).sum(-1).mean()
    grads = dict(zip(PARAMS, torch.autograd.grad(loss, [p[k] for k in PARAMS])))
    W = params["W_dec"]
    grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * W).sum(-1, keepdim=True) * W
    t = adam["step"] + 1
    (b1, b2), new, m, v = BETAS, {}, {}, {}
    for k in PARAMS:
        m[k] = b1 * adam["m"][k] + (1 - b1) * grads[k]
        v[k] = b2 * adam["v"][k] + (1 - b2) * grads[k].pow(2)
        new[k] = params[k] - lr / (1 - b1 ** t) * m[k] / (v[k].sqrt() / math.sqrt(1 - b2 ** t) + ADAM_EPS)
    new["W_dec"] = new["W_dec"] / new["W_dec"].norm(dim=-1, keepdim=True)
    return new, {"step": t, "m": m, "v": v}, float(loss.detach())


def adam_state(params: dict, step: int = 0, gen: torch.Generator | None = None) -> dict:
    """An Adam state for `params` ({name: tensor}): zeros at step 0 (a fresh optimiser), else moments of a
    plausible size (drawn from `gen`) as after `step` steps."""
    if step == 0 or gen is None:
        return {"step": 0, "m": {k: torch.zeros_like(v) for k, v in params.items()},
                "v": {k: torch.zeros_like(v) for k, v in params.items()}}
    return {"step": step,
            "m": {k: 1e-2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()},
            "v": {k: 1e-4 * (0.2 + torch.rand(v.shape, generator=gen, dtype=v.dtype)) for k, v in params.items()}}


def _step_params(gen, d, m):
    w = _sae_weights(gen, d, m)
    return {k: w[k].double() for k in PARAMS}


def _train_step_cases(gen):
    out = []
    for d, m, b, step in ((8, 16, 12, 0), (6, 20, 10, 7)):
        params = _step_params(gen, d, m)
        out.append(dict(params=params, adam=adam_state(params, step, gen), x=torch.randn(b, d, generator=gen,
                        dtype=torch.float64) + 0.5, lr=1e-2, l1_coefficient=0.05))
    return out


def _step_without(**skip):
    """The reference with one part left out or changed (a known mistake)."""
    def wrong(params, adam, x, lr, l1_coefficient):
        p = {k: params[k].detach().clone().requires_grad_(True) for k in PARAMS}
        codes = torch.relu((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"])
        x_hat = codes @ p["W_dec"] + p["b_dec"]
        loss = (x - x_hat).pow(2).sum(-1).mean() / x.shape[-1] + l1_coefficient * (codes * p["W_dec"].norm(dim=-1)).sum(-1).mean()
        grads = dict(zip(PARAMS, torch.autograd.grad(loss, [p[k] for k in PARAMS])))
        W = params["W_dec"]
        if not skip.get("projection"):
            grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * W).sum(-1, keepdim=True) * W
        t = adam["step"] + 1
        (b1, b2), new, m, v = BETAS, {}, {}, {}
        for k in PARAMS:
            m[k] = b1 * adam["m"][k] + (1 - b1) * grads[k]
            v[k] = b2 * adam["v"][k] + (1 - b2) * grads[k].pow(2)
            c1, c2 = (1.0, 1.0) if skip.get("bias_correction") else (1 - b1 ** t, 1 - b2 ** t)
            new[k] = params[k] - lr / c1 * m[k] / (v[k].sqrt() / math.sqrt(c2) + ADAM_EPS)
        if not skip.get("renorm"):
            new["W_dec"] = new["W_dec"] / new["W_dec"].norm(dim=-1, keepdim=True)
        return new, {"step": t, "m": m, "v": v}, float(loss.detach())
    return wrong


register(Exercise(
    id="02.9", name="sae_train_step", reference=_train_step, random_cases=_train_step_cases,
    mistakes=(
        (_step_without(bias_correction=True), "Adam divides its moments by (1 - β₁ᵗ) and (1 - β₂ᵗ), t the step "
                                              "number after this step (adam['step'] + 1): the bias correction is missing"),
        (_step_without(projection=True), "the decoder's gradient keeps its component along each row: project it "
                                         "off (g_i - (g_i · w_i) w_i, as in exercise 02.4) before Adam sees it"),
        (_step_without(renorm=True), "after Adam's step the decoder rows are renormalised to unit norm"),
    ),
))


# ---- 02.10 · MMCS ---------------------------------------------------------------------------------
def _mmcs(dict_a, dict_b):
    return mmcs(dict_a, dict_b)


def _mmcs_cases(gen):
    out = []
    for ma, mb, d in ((10, 30, 8), (25, 12, 16)):
        a = torch.randn(ma, d, generator=gen) * (0.5 + 2 * torch.rand(ma, 1, generator=gen))
        b = torch.randn(mb, d, generator=gen) * (0.5 + 2 * torch.rand(mb, 1, generator=gen))
        n = min(ma, mb) // 2
        b[:n] = -a[:n] + 0.2 * torch.randn(n, d, generator=gen)  # opposite directions: cosine near -1, not +1
        out.append(dict(dict_a=a, dict_b=b))
    return out


def _unit_rows(w):
    return w / w.norm(dim=-1, keepdim=True)


def _mmcs_dot(dict_a, dict_b):
    return float((dict_a @ dict_b.T).max(-1).values.mean())


def _mmcs_other_way(dict_a, dict_b):
    return float((_unit_rows(dict_a) @ _unit_rows(dict_b).T).max(0).values.mean())


def _mmcs_abs(dict_a, dict_b):
    return float((_unit_rows(dict_a) @ _unit_rows(dict_b).T).abs().max(-1).values.mean())


register(Exercise(
    id="02.10", name="mmcs", reference=_mmcs, random_cases=_mmcs_cases,
    mistakes=(
        (_mmcs_dot, "MMCS compares directions: divide each row by its norm first (cosines, not dot products)"),
        (_mmcs_other_way, "the mean runs over dict_a's directions, each taking its best match in dict_b "
                          "(max over dict_b, dim=-1), not the other way round"),
        (_mmcs_abs, "the cosine keeps its sign: an opposite direction (cosine -1) is no match for a latent "
                    "whose code is never negative, so no abs()"),
    ),
))


# ---- 02.11 · the AuxK loss -----------------------------------------------------------------------
def _auxk_loss(x, W_enc, b_enc, W_dec, b_dec, k, dead):
    m, d = W_dec.shape
    sae = SAEStack([SAEConfig(d_in=d, d_sae=m, architecture="topk", k=int(k))])
    with torch.no_grad():
        for name, w in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            getattr(sae, name).copy_(w.float().unsqueeze(0))
        out = sae.losses(x.float(), dead=dead.unsqueeze(0), aux_coefficient=1.0, path="dense")
    return out["aux"][0]


def _auxk_cases(gen):
    out = []
    for b, d, m, k, n_dead in ((12, 8, 24, 3, 9), (10, 12, 20, 4, 14), (8, 6, 16, 2, 0)):
        dead = torch.zeros(m, dtype=torch.bool)
        dead[torch.randperm(m, generator=gen)[:n_dead]] = True
        out.append(dict(x=torch.randn(b, d, generator=gen) + 0.5, **_sae_weights(gen, d, m), k=k, dead=dead))
    return out


def _aux_parts(x, W_enc, b_enc, W_dec, b_dec, k):
    pre = (x - b_dec) @ W_enc.T + b_enc
    vals, idx = pre.topk(k, dim=-1)
    x_hat = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals)) @ W_dec + b_dec
    return pre, x - x_hat


def _aux_from(pre, resid, W_dec, dead, k_aux, bias=None, relu=True):
    if not dead.any():
        return torch.zeros(())
    dead_pre = torch.where(dead, torch.relu(pre) if relu else pre, torch.zeros_like(pre) if relu else
                           torch.full_like(pre, -torch.inf))
    vals, idx = dead_pre.topk(k_aux, dim=-1)
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    e_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ W_dec
    if bias is not None:
        e_hat = e_hat + bias
    return (e_hat - resid).pow(2).sum(-1).mean() / pre.new_tensor(resid.shape[-1])


def _auxk_with_bias(x, W_enc, b_enc, W_dec, b_dec, k, dead):
    pre, resid = _aux_parts(x, W_enc, b_enc, W_dec, b_dec, k)
    return _aux_from(pre, resid, W_dec, dead, min(x.shape[-1] // 2, W_dec.shape[0]), bias=b_dec)


def _auxk_k(x, W_enc, b_enc, W_dec, b_dec, k, dead):
    pre, resid = _aux_parts(x, W_enc, b_enc, W_dec, b_dec, k)
    return _aux_from(pre, resid, W_dec, dead, k)


def _auxk_all_latents(x, W_enc, b_enc, W_dec, b_dec, k, dead):
    pre, resid = _aux_parts(x, W_enc, b_enc, W_dec, b_dec, k)
    return _aux_from(pre, resid, W_dec, torch.ones_like(dead) & dead.any(), min(x.shape[-1] // 2, W_dec.shape[0]))


def _auxk_target_x(x, W_enc, b_enc, W_dec, b_dec, k, dead):
    pre, _ = _aux_parts(x, W_enc, b_enc, W_dec, b_dec, k)
    return _aux_from(pre, x, W_dec, dead, min(x.shape[-1] // 2, W_dec.shape[0]))


register(Exercise(
    id="02.11", name="auxk_loss", reference=_auxk_loss, random_cases=_auxk_cases,
    mistakes=(
        (_auxk_all_latents, "only the dead latents take part: mask the live latents' pre-activations out before "
                            "taking the top k_aux"),
        (_auxk_k, "AuxK keeps k_aux = min(d_in // 2, d_sae) dead latents per token, not the SAE's own k"),
        (_auxk_with_bias, "the dead latents reconstruct the residual error, a difference of activations: "
                          "ê = c_aux W_dec, with no decoder bias added"),
        (_auxk_target_x, "the target is the error the live latents leave, x - x̂, not x itself"),
    ),
))
