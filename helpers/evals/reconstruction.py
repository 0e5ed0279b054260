"""How good is a dictionary? Reconstruction, sparsity, downstream loss, and dictionary overlap.

* `reconstruction_metrics`: L0, MSE, fraction of variance unexplained (FVU) over all tokens, over
  ordinary tokens and over massive ones (helpers.activations.massive), dead and dense latent fractions, on a set
  of activations.
* `spliced_loss`: CE loss and KL divergence when the reconstruction replaces the activations at
  their hook inside the model, against zero- and mean-ablation; "CE-loss recovered" is
  (CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 100% is as good as the real activations,
  0% as bad as ablating them.
* `mmcs`: the paper's mean max cosine similarity between two dictionaries.
* `pca_fvu`: the FVU of keeping the top-k principal components, the reference an SAE must beat.

FVU over a set S of tokens is Σ_S‖x - x̂‖² / Σ_S‖x - mean_S(x)‖²: over all tokens, over the ordinary
ones, over the massive ones (each against its own mean), by `split_fvu`.
"""
from __future__ import annotations

import numpy as np
import torch

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense


def split_fvu(sq_err: torch.Tensor, x: torch.Tensor, flags: torch.Tensor | None) -> dict:
    """FVU over all tokens, ordinary tokens and massive tokens (None where a set is empty), with the
    share of massive tokens; sq_err [N] is each token's squared error, flags [N] marks massive ones."""
    x64 = x.double()
    sq_err = sq_err.double().cpu()
    flags = torch.zeros(len(x), dtype=torch.bool) if flags is None else flags.cpu()

    def fvu(sel):
        if not sel.any():
            return None
        xs = x64[sel]
        return float(sq_err[sel].sum() / (xs - xs.mean(0)).pow(2).sum().clamp_min(1e-30))

    return {"fvu": fvu(torch.ones_like(flags)), "fvu_ordinary": fvu(~flags), "fvu_massive": fvu(flags),
            "massive_share": float(flags.double().mean())}


@torch.no_grad()
def reconstruction_metrics(sae, x: torch.Tensor, batch_size: int = 4096, flags: torch.Tensor | None = None) -> list[dict]:
    """Per SAE of the stack: l0, mse (per token, model units), fvu / fvu_ordinary / fvu_massive,
    massive_share, dead and dense fractions. Tokens are split into ordinary and massive by `flags`
    [N] if given (the hook's rule: helpers.activations.massive), else by the SAE's own rule."""
    device = sae.b_dec.device
    n = sae.n
    sq_err = torch.zeros(n, len(x), dtype=torch.float64)
    l0 = torch.zeros(n, dtype=torch.float64)
    fired = torch.zeros(n, sae.d_sae, dtype=torch.int64)
    flags_own = torch.zeros(len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).float()
        c = sae.encode(xb)
        xhat = sae.decode(c)
        flag = sae.massive_flags(xb)
        xhat = xhat + flag.unsqueeze(-1) * sae.massive_offset.unsqueeze(1)
        sq_err[:, i:i + batch_size] = (xhat - xb).pow(2).sum(-1).double().cpu()
        flags_own[i:i + batch_size] = flag[0].cpu()
        active = c > 0
        l0 += active.sum(-1).sum(-1).double().cpu()
        fired += active.sum(1).cpu()
    flags = flags_own if flags is None else torch.as_tensor(flags, dtype=torch.bool).cpu()
    out = []
    for j in range(n):
        density = fired[j].double() / len(x)
        out.append({
            "l0": float(l0[j] / len(x)), "mse": float(sq_err[j].sum() / len(x)), **split_fvu(sq_err[j], x, flags),
            "dead": float((fired[j] == 0).double().mean()), "dense": float((density > DENSE_THRESHOLD).double().mean()),
        })
    return out


def pca_fvu(train_x: torch.Tensor, eval_x: torch.Tensor, ks, rule=None, treat: bool = True) -> dict:
    """FVU on eval_x of projecting onto the top-k principal components of train_x, for each k:
    {"all": {k: fvu}, "ordinary": {k: fvu}}, ordinary tokens being those a massive-activation `rule`
    does not flag. With treat=True (and a rule), PCA sees the activations with the massive offset
    removed and the reconstruction adds it back, exactly as for an SAE; treat=False fits raw PCA."""
    from sklearn.decomposition import PCA

    ks = sorted({int(k) for k in ks})
    shift = (lambda t: t) if rule is None or not treat else rule.shift
    pca = PCA(n_components=min(max(ks), train_x.shape[1]), svd_solver="full").fit(shift(train_x).double().numpy())
    flags = None if rule is None else rule.flags(eval_x)
    e = shift(eval_x).double().numpy()
    centred = e - pca.mean_
    out = {"all": {}, "ordinary": {}}
    for k in ks:
        comp = pca.components_[:k]
        err = ((centred - centred @ comp.T @ comp) ** 2).sum(-1)
        f = split_fvu(torch.as_tensor(err), eval_x, flags)
        out["all"][k], out["ordinary"][k] = f["fvu"], f["fvu_ordinary"]
    return out


@torch.no_grad()
def mmcs(dict_a: torch.Tensor, dict_b: torch.Tensor) -> float:
    """Mean over the directions of dict_a [m_a, d] of their max cosine similarity with dict_b."""
    a = dict_a.float() / dict_a.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = dict_b.float() / dict_b.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    best = torch.full((len(a),), -1.0)
    for i in range(0, len(b), 8192):
        best = torch.maximum(best, (a @ b[i:i + 8192].T).max(-1).values.cpu())
    return float(best.mean())


def contexts_from_store(store, n_contexts: int, bos_token_id: int, start: int = 0) -> torch.Tensor:
    """n_contexts contexts of a store from context `start` on (as many as it holds), rebuilt as token
    ids [n, ctx_len] (BOS first). Context j is the store's tokens j·(ctx_len-1) to (j+1)·(ctx_len-1)."""
    per = store.manifest["ctx_len"] - 1
    tokens = store.tokens()
    n = max(0, min(n_contexts, len(tokens) // per - start))
    ids = tokens["token"][start * per: (start + n) * per].reshape(n, per).astype(np.int64)
    return torch.cat([torch.full((n, 1), bos_token_id), torch.as_tensor(ids)], dim=1)


@torch.no_grad()
def spliced_loss(model, tokens: torch.Tensor, hook: str, reconstruct, mean_act: torch.Tensor | None = None,
                 batch_size: int = 8) -> dict:
    """CE loss and KL divergence from the clean run when the activations at `hook` (all positions
    but BOS) are replaced by each SAE's reconstruction, by zeros, or by `mean_act`.

    `reconstruct(x [N, d]) -> [n, N, d]` gives one reconstruction per SAE. CE is the next-token
    loss at the patched positions; KL is KL(clean || patched) of the next-token distribution.
    Returns clean/zero/mean CE and KL, per-SAE lists, and CE-loss recovered against the zero and
    the mean ablation.
    """
    device = next(model.parameters()).device
    ce = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
    kl = {"zero": 0.0, "mean": 0.0}
    sae_ce, sae_kl, n_ce, n_kl = None, None, 0, 0
    for i in range(0, len(tokens), batch_size):
        toks = tokens[i:i + batch_size].to(device)
        captured = {}

        def capture(act, hook):
            captured["x"] = act[:, 1:].clone()
            return act

        clean_logp = model.run_with_hooks(toks, fwd_hooks=[(hook, capture)]).float().log_softmax(-1)[:, 1:]

        def score(patch):
            def hook_fn(act, hook):
                new = act.clone()
                new[:, 1:] = patch.to(act.dtype)  # BOS keeps its activation
                return new
            logp = model.run_with_hooks(toks, fwd_hooks=[(hook, hook_fn)]).float().log_softmax(-1)[:, 1:]
            c = -logp[:, :-1].gather(-1, toks[:, 2:, None]).sum()
            k = (clean_logp.exp() * (clean_logp - logp)).sum()
            return float(c), float(k)

        ce["clean"] += float(-clean_logp[:, :-1].gather(-1, toks[:, 2:, None]).sum())
        x = captured["x"]
        mean = (mean_act if mean_act is not None else x.mean((0, 1))).to(x)
        for name, patch in [("zero", torch.zeros_like(x)), ("mean", mean.expand_as(x))]:
            c, k = score(patch)
            ce[name] += c
            kl[name] += k
        recon = reconstruct(x.reshape(-1, x.shape[-1]).float())
        if sae_ce is None:
            sae_ce, sae_kl = [0.0] * len(recon), [0.0] * len(recon)
        for j in range(len(recon)):
            c, k = score(recon[j].reshape(x.shape))
            sae_ce[j] += c
            sae_kl[j] += k
        n_ce += toks[:, 2:].numel()
        n_kl += toks[:, 1:].numel()
    ce = {k: v / n_ce for k, v in ce.items()}
    out = {"ce_clean": ce["clean"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
           "kl_zero": kl["zero"] / n_kl, "kl_mean": kl["mean"] / n_kl,
           "ce_sae": [v / n_ce for v in sae_ce], "kl_sae": [v / n_kl for v in sae_kl]}
    out["ce_recovered"] = [(ce["zero"] - c) / (ce["zero"] - ce["clean"]) for c in out["ce_sae"]]
    out["ce_recovered_mean"] = [(ce["mean"] - c) / (ce["mean"] - ce["clean"]) for c in out["ce_sae"]]
    return out
