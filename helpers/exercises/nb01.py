"""The exercises of notebook 01: references, random cases and known mistakes.

01.1 max_interference: the largest |cos| between the feature directions of a toy model of superposition;
01.2 harvest_batch: one batch of the harvest (a hook's activations, BOS dropped, one row per token);
01.3 massive_rule: the massive-activation rule (norm > 4 × the median norm) and its offset;
01.4 variance_share: how much of the variance the massive tokens carry.

The references are the workbook's own code (helpers.activations.harvest.forward_to, helpers.activations.massive.fit_tensor) wherever
it has a function of that shape; 01.4's share is measured inside helpers.activations.massive.fit, so its reference
is the same two lines here; 01.1's takes the cosines helpers.saes.toy.interference takes, over every column.
"""
from __future__ import annotations

import torch

from helpers.activations import massive
from helpers.activations.harvest import forward_to

from .core import Exercise, register


# ---- 01.2 · one batch of the harvest -------------------------------------------------------------
def _harvest_batch(model, tokens, hook):
    acts = forward_to(model, tokens, [hook])[hook]
    return acts[:, 1:].reshape(-1, acts.shape[-1])  # BOS dropped, context by context: the store's rows


def _harvest_model_cases(model, gen):
    bos = model.tokenizer.bos_token_id
    ids = torch.randint(100, model.cfg.d_vocab, (2, 9), generator=gen)
    ids[:, 0] = bos
    return [dict(model=model, tokens=ids, hook="blocks.2.hook_resid_post")]


register(Exercise(
    id="01.2", name="harvest_batch", reference=_harvest_batch, model_cases=_harvest_model_cases,
    mistakes=(
        (lambda model, tokens, hook: forward_to(model, tokens, [hook])[hook].reshape(-1, model.cfg.d_model),
         "the BOS position is kept: drop position 0 of every context (acts[:, 1:]) before flattening"),
        (lambda model, tokens, hook: forward_to(model, tokens, [hook])[hook][:, 1:].transpose(0, 1)
         .reshape(-1, model.cfg.d_model),
         "rows are ordered position by position across contexts; the store keeps each context's tokens "
         "together (acts[:, 1:].reshape(-1, d))"),
    ),
))


# ---- 01.3 · the massive-activation rule ----------------------------------------------------------
def _massive_rule(x, factor=massive.FACTOR):
    rule = massive.fit_tensor(x, factor, hook="x")
    return rule.flags(x), rule.offset


def with_massive_rows(gen, n, d, n_massive, size=25.0):
    """n (odd, so the median is one row's norm) Gaussian rows; n_massive of them get one large fixed
    vector added, as massive activations do."""
    x = torch.randn(n, d, generator=gen)
    if n_massive:
        direction = torch.randn(d, generator=gen)
        rows = torch.randperm(n, generator=gen)[:n_massive]
        x[rows] += size * direction / direction.norm()
    return x


def _massive_cases(gen):
    return [dict(x=with_massive_rows(gen, 301, 16, 7), factor=4.0),
            dict(x=with_massive_rows(gen, 101, 8, 0), factor=4.0),       # none: inert rule, zero offset
            dict(x=with_massive_rows(gen, 201, 12, 5, size=12.0), factor=2.5),
            dict(x=with_massive_rows(gen, 201, 12, 40), factor=4.0)]  # many: they pull the mean norm up


def _mean_rule(x, factor=massive.FACTOR):
    n = x.float().norm(dim=-1)
    f = n > factor * n.mean()
    return f, (x[f].mean(0) if f.any() else torch.zeros(x.shape[-1]))


def _squared_rule(x, factor=massive.FACTOR):
    sq = x.float().pow(2).sum(-1)
    f = sq > factor * sq.median()
    return f, (x[f].mean(0) if f.any() else torch.zeros(x.shape[-1]))


def _offset_all(x, factor=massive.FACTOR):
    flags, _ = _massive_rule(x, factor)
    return flags, (x.float().mean(0) if flags.any() else torch.zeros(x.shape[-1]))


register(Exercise(
    id="01.3", name="massive_rule", reference=_massive_rule, random_cases=_massive_cases,
    mistakes=(
        (_mean_rule, "the threshold is factor × the MEDIAN norm, not the mean (massive tokens pull the mean up)"),
        (_squared_rule, "you compared squared norms: factor × the median applies to the norm itself"),
        (_offset_all, "the offset is the mean of the massive rows only, not of every row"),
    ),
))


# ---- 01.4 · the massive tokens' share of the variance --------------------------------------------
def _variance_share(x, flags):
    """The share of tokens flagged and the share of the total variance (around the mean of all tokens)
    that they carry, as helpers.activations.massive.fit measures them (`share`, `variance_share`)."""
    x = x.double()
    dev = (x - x.mean(0)).pow(2).sum(-1)
    return flags.double().mean().item(), (dev[flags].sum() / dev.sum()).item()


def _share_cases(gen):
    out = []
    for n, d, k in ((301, 16, 7), (201, 10, 3)):
        x = with_massive_rows(gen, n, d, k)
        norms = x.norm(dim=-1)
        out.append(dict(x=x, flags=norms > 4 * norms.median()))
    return out


def _own_mean(x, flags):
    x = x.double()
    total = (x - x.mean(0)).pow(2).sum()
    return flags.double().mean().item(), ((x[flags] - x[flags].mean(0)).pow(2).sum() / total).item()


def _uncentred(x, flags):
    sq = x.double().pow(2).sum(-1)
    return flags.double().mean().item(), (sq[flags].sum() / sq.sum()).item()


def _ratio_of_variances(x, flags):
    x = x.double()
    return flags.double().mean().item(), (x[flags].var(0).sum() / x.var(0).sum()).item()


register(Exercise(
    id="01.4", name="variance_share", reference=_variance_share, random_cases=_share_cases,
    mistakes=(
        (_own_mean, "you measured the massive tokens around their own mean; the share is of the total "
                    "variance, so every token's deviation is from the mean of ALL tokens"),
        (_uncentred, "you forgot to subtract the mean: that is a share of the squared norms, not of the variance"),
        (_ratio_of_variances, "you divided two variances (averages over tokens): a share must sum the squared "
                              "deviations, so that it counts how many massive tokens there are"),
    ),
))


# ---- 01.1 · interference between feature directions ---------------------------------------------
def _max_interference(W):
    """The largest |cos| between two distinct columns of W [d, n]."""
    U = W.double() / W.double().norm(dim=0, keepdim=True)
    cos = (U.T @ U).abs()
    cos.fill_diagonal_(0.0)
    return cos.max().item()


def _interference_cases(gen):
    cases = [dict(W=torch.randn(d, n, generator=gen) * torch.rand(n, generator=gen).add(0.5))
             for d, n in ((2, 6), (3, 5), (8, 20))]
    pentagon = torch.stack([torch.cos(torch.arange(5) * 2 * torch.pi / 5), torch.sin(torch.arange(5) * 2 * torch.pi / 5)])
    cases.append(dict(W=0.9 * pentagon))                        # five features in two dimensions, 72° apart
    cases.append(dict(W=torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]])))  # an antipodal pair: |cos| 1
    return cases


def _diagonal_kept(W):
    U = W.double() / W.double().norm(dim=0, keepdim=True)
    return (U.T @ U).abs().max().item()


def _unnormalised(W):
    cos = (W.double().T @ W.double()).abs()
    cos.fill_diagonal_(0.0)
    return cos.max().item()


def _signed(W):
    U = W.double() / W.double().norm(dim=0, keepdim=True)
    cos = U.T @ U
    cos.fill_diagonal_(-2.0)
    return cos.max().item()


register(Exercise(
    id="01.1", name="max_interference", reference=_max_interference, random_cases=_interference_cases,
    mistakes=(
        (_diagonal_kept, "every direction has cosine 1 with itself: leave the diagonal of WᵀW out"),
        (_unnormalised, "WᵀW holds dot products: divide each column by its norm first, so they are cosines"),
        (_signed, "an antipodal pair (cos -1) interferes as much as a parallel one: take |cos|"),
    ),
))
