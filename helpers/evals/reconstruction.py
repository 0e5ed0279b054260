"""How good is a dictionary? Reconstruction, sparsity, downstream loss, and dictionary overlap.

Tensor-level entry points (plain tensors, any SAE that `as_dictionary` takes, a TransformerLens-style
or plain Hugging Face model), each returning a typed result (helpers.results) that saves, loads,
shows as a table and says its verdicts:

* `fvu(x, x_hat, flags=None) -> FVU`: fraction of variance unexplained over all tokens, over ordinary
  tokens and over massive ones (flags: helpers.activations.massive).
* `reconstruction(sae, x, flags=None) -> Reconstruction`: L0, MSE, the FVUs, dead and dense latent
  shares of one SAE on activations x [N, d].
* `ce_loss_recovered(model, tokens, hook, sae) -> CELossRecovered`: CE loss and KL divergence when the
  SAE's reconstruction replaces the activations at `hook`, against zero- and mean-ablation, with
  bootstrap intervals over the contexts. "CE-loss recovered" is
  (CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 is as good as the real activations, 0 as bad
  as ablating them.

Conveniences on top of them, for a workbook stack of several SAEs at once: `reconstruction_metrics`
(a dict per SAE, the numbers of `reconstruction`), `split_fvu` (the dict of `fvu`) and `spliced_loss`
(one reconstruction per SAE, the totals over all contexts of the same per-batch log-probabilities).
Also `mmcs`, the paper's mean max cosine similarity between two dictionaries, and `pca_fvu`, the FVU of
keeping the top-k principal components, the reference an SAE must beat.

FVU over a set S of tokens is Σ_S‖x - x̂‖² / Σ_S‖x - mean_S(x)‖²: over all tokens, over the ordinary
ones, over the massive ones (each against its own mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.activations.hooks import blocks_before
from helpers.activations.models import hooked, skipping_blocks
from helpers.dictionaries.dictionary import LinearDictionary, SAEDictionary, as_dictionary
from helpers.results import Estimate, Result, Table

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense


# ---- FVU -------------------------------------------------------------------------------------------
@dataclass
class FVU(Result):
    """Fraction of variance unexplained over all tokens, ordinary tokens and massive tokens (None where
    a set is empty), and the share of massive tokens."""
    fvu: float
    fvu_ordinary: float | None = None
    fvu_massive: float | None = None
    massive_share: float = 0.0

    def verdicts(self) -> list[str]:
        out = [f"The reconstruction leaves {self.fvu:.1%} of the variance unexplained over all tokens."]
        if self.massive_share > 0 and self.fvu_ordinary is not None:
            out.append(f"Over the ordinary tokens ({1 - self.massive_share:.1%} of them, massive ones left out) "
                       f"it leaves {self.fvu_ordinary:.1%}.")
        return out


def _fvu_of_errors(sq_err: torch.Tensor, x: torch.Tensor, flags: torch.Tensor | None) -> FVU:
    """FVU from each token's squared error sq_err [N] and the activations x [N, d]; flags [N] marks
    the massive tokens (none if None)."""
    x64 = x.double()
    sq_err = sq_err.double().cpu()
    flags = torch.zeros(len(x), dtype=torch.bool) if flags is None else torch.as_tensor(flags, dtype=torch.bool).cpu()

    def over(sel):
        if not sel.any():
            return None
        xs = x64[sel]
        return float(sq_err[sel].sum() / (xs - xs.mean(0)).pow(2).sum().clamp_min(1e-30))

    return FVU(over(torch.ones_like(flags)), over(~flags), over(flags), float(flags.double().mean()))


def fvu(x: torch.Tensor, x_hat: torch.Tensor, flags=None) -> FVU:
    """FVU of the reconstruction x_hat [N, d] of activations x [N, d], over all tokens and, where
    `flags` [N] (bool: the massive tokens) is given, over the ordinary and the massive ones."""
    x, x_hat = torch.as_tensor(x), torch.as_tensor(x_hat)
    if x.shape != x_hat.shape:
        raise ValueError(f"x is {tuple(x.shape)} but x_hat is {tuple(x_hat.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, x_hat.dtype), torch.float32)
    sq_err = (x_hat.to(dtype) - x.to(x_hat.device, dtype)).pow(2).sum(-1)
    return _fvu_of_errors(sq_err, x.cpu(), flags)


def split_fvu(sq_err: torch.Tensor, x: torch.Tensor, flags: torch.Tensor | None) -> dict:
    """`fvu` as a dict (fvu, fvu_ordinary, fvu_massive, massive_share), from each token's squared
    error sq_err [N]; flags [N] marks massive tokens."""
    r = _fvu_of_errors(sq_err, x, flags)
    return {"fvu": r.fvu, "fvu_ordinary": r.fvu_ordinary, "fvu_massive": r.fvu_massive, "massive_share": r.massive_share}


# ---- reconstruction --------------------------------------------------------------------------------
@dataclass
class Reconstruction(Result):
    """One SAE on a set of activations: mean L0, MSE per token (model units), FVU over all, ordinary and
    massive tokens, share of massive tokens, and the shares of dead (never active) and dense (active on
    more than DENSE_THRESHOLD of tokens) latents."""
    l0: float
    mse: float
    fvu: float
    fvu_ordinary: float | None
    fvu_massive: float | None
    massive_share: float
    dead: float
    dense: float
    n_tokens: int = 0

    def to_metrics(self) -> dict:
        """The dict of `reconstruction_metrics`."""
        return {"l0": self.l0, "mse": self.mse, "fvu": self.fvu, "fvu_ordinary": self.fvu_ordinary,
                "fvu_massive": self.fvu_massive, "massive_share": self.massive_share, "dead": self.dead,
                "dense": self.dense}

    def verdicts(self) -> list[str]:
        out = [f"On average {self.l0:.1f} latents fire per token; the reconstruction leaves {self.fvu:.1%} of the "
               f"variance unexplained"
               + (f" ({self.fvu_ordinary:.1%} over ordinary tokens)." if self.massive_share > 0
                  and self.fvu_ordinary is not None else ".")]
        if self.dead > 0:
            out.append(f"{self.dead:.1%} of the latents never fire on these {self.n_tokens:,} tokens (dead).")
        if self.dense > 0:
            out.append(f"{self.dense:.1%} of the latents fire on more than {DENSE_THRESHOLD:.0%} of tokens (dense).")
        return out


class _Tally:
    """Running sums of one SAE over batches: squared errors per token, L0, how often each latent fires."""

    def __init__(self, n_tokens: int, n_latents: int | None = None):
        self.sq_err = torch.zeros(n_tokens, dtype=torch.float64)
        self.l0 = torch.zeros((), dtype=torch.float64)
        self.fired = None if n_latents is None else torch.zeros(n_latents, dtype=torch.int64)

    def add(self, i: int, xb: torch.Tensor, codes: torch.Tensor, xhat: torch.Tensor) -> None:
        """Batch starting at token i: activations xb [B, d], codes [B, F], reconstruction xhat [B, d]."""
        self.sq_err[i:i + len(xb)] = (xhat - xb).pow(2).sum(-1).double().cpu()
        active = codes > 0
        self.l0 += active.sum(-1).sum(-1).double().cpu()
        if self.fired is None:
            self.fired = torch.zeros(codes.shape[-1], dtype=torch.int64)
        self.fired += active.sum(0).cpu()

    def result(self, x: torch.Tensor, flags: torch.Tensor) -> Reconstruction:
        n = len(x)
        if self.fired is None:
            raise ValueError("no activations to measure")
        density = self.fired.double() / n
        f = _fvu_of_errors(self.sq_err, x, flags)
        return Reconstruction(float(self.l0 / n), float(self.sq_err.sum() / n), f.fvu, f.fvu_ordinary, f.fvu_massive,
                              f.massive_share, float((self.fired == 0).double().mean()),
                              float((density > DENSE_THRESHOLD).double().mean()), n)


def _stack_pass(stack, xb: torch.Tensor):
    """A workbook stack's codes [n, B, F], reconstructions [n, B, d] (massive offset added back) and
    its own massive flags [n, B] on a batch xb [B, d] already on its device."""
    c = stack.encode(xb)
    flag = stack.massive_flags(xb)
    xhat = stack.decode(c) + flag.unsqueeze(-1) * stack.massive_offset.unsqueeze(1)
    return c, xhat, flag


def _massive_rule_of(d):
    """The massive-activation rule a dictionary applies (None where it applies none)."""
    return getattr(d, "massive", None) if isinstance(d, LinearDictionary) else None


def encode_decode(sae, xb: torch.Tensor):
    """Codes [B, F], reconstruction [B, d] (any massive offset added back) and the SAE's own massive
    flags [B] of activations xb [B, d], for anything `as_dictionary` takes."""
    d = as_dictionary(sae)
    xb = xb.to(d.device).float()
    if isinstance(d, SAEDictionary):
        c, xhat, flag = _stack_pass(d.sae, xb)
        return c[0], xhat[0], flag[0]
    c = d.encode(xb)
    xhat = d.decode(c).float()
    rule = _massive_rule_of(d)
    flag = torch.zeros(len(xb), dtype=torch.bool, device=xb.device)
    if rule is not None and rule.any:
        flag = rule.flags(xb)
        xhat = xhat + flag.unsqueeze(-1) * rule.offset.to(xhat)
    return c, xhat, flag


def reconstructor(sae):
    """A function x [N, d] -> x_hat [N, d] for anything `as_dictionary` takes, or `sae` itself when it
    is a plain callable (no encode/decode)."""
    if callable(sae) and not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        return sae
    return lambda x: encode_decode(sae, x)[1]


@torch.no_grad()
def reconstruction(sae, x: torch.Tensor, flags=None, batch_size: int = 4096) -> Reconstruction:
    """L0, MSE, FVU (all / ordinary / massive tokens), dead and dense shares of `sae` (anything
    `as_dictionary` takes) on activations x [N, d]. Tokens are split into ordinary and massive by
    `flags` [N] if given, else by the SAE's own rule (none for an SAE without one)."""
    x = torch.as_tensor(x)
    d = as_dictionary(sae)
    tally = _Tally(len(x))
    flags_own = torch.zeros(len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(d.device).float()
        c, xhat, flag = encode_decode(d, xb)
        tally.add(i, xb, c, xhat)
        flags_own[i:i + batch_size] = flag.cpu()
    flags = flags_own if flags is None else torch.as_tensor(flags, dtype=torch.bool).cpu()
    return tally.result(x, flags)


@torch.no_grad()
def reconstruction_metrics(sae, x: torch.Tensor, batch_size: int = 4096, flags: torch.Tensor | None = None) -> list[dict]:
    """`reconstruction` of every SAE of a workbook stack in one pass, as dicts (l0, mse, fvu /
    fvu_ordinary / fvu_massive, massive_share, dead, dense). Tokens are split into ordinary and massive
    by `flags` [N] if given (the hook's rule: helpers.activations.massive), else by the SAE's own rule."""
    tallies = [_Tally(len(x), sae.d_sae) for _ in range(sae.n)]
    flags_own = torch.zeros(len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(sae.b_dec.device).float()
        c, xhat, flag = _stack_pass(sae, xb)
        for j, t in enumerate(tallies):
            t.add(i, xb, c[j], xhat[j])
        flags_own[i:i + batch_size] = flag[0].cpu()
    flags = flags_own if flags is None else torch.as_tensor(flags, dtype=torch.bool).cpu()
    return [t.result(x, flags).to_metrics() for t in tallies]


@dataclass
class PCAFVU(Result):
    """Held-out FVU of keeping the top-k principal components, for each k: over all tokens (`all`) and
    over ordinary ones (`ordinary`), {k: FVU}; `treated`: whether PCA saw the activations with the
    massive offset removed (the reconstruction adding it back, as for an SAE)."""
    all: dict
    ordinary: dict
    treated: bool = True

    @property
    def ks(self) -> list[int]:
        return sorted(self.all)

    def rows(self) -> list[dict]:
        kind = "treated" if self.treated else "raw"
        return [{"k": k, f"FVU all tokens ({kind})": self.all[k], f"FVU ordinary ({kind})": self.ordinary[k]}
                for k in self.ks]

    def beside(self, other: "PCAFVU") -> Table:
        """This result and `other` (the same ks, e.g. the other treatment) in one table."""
        rows = [{**ra, **{k: v for k, v in rb.items() if k != "k"}} for ra, rb in zip(self.rows(), other.rows())]
        return Table(rows, "PCA with k components, held-out FVU", self.verdicts() + other.verdicts())

    def verdicts(self) -> list[str]:
        k = self.ks[0]
        return [f"{'Treated' if self.treated else 'Raw'} PCA: {k} component(s) leave {self.all[k]:.1%} of the "
                f"variance unexplained over all tokens, {self.ordinary[k]:.1%} over ordinary tokens."]


def pca_fvu(train_x: torch.Tensor, eval_x: torch.Tensor, ks, rule=None, treat: bool = True,
            progress: bool = True) -> PCAFVU:
    """FVU on eval_x of projecting onto the top-k principal components of train_x, for each k
    (a PCAFVU: `.all[k]`, `.ordinary[k]`), ordinary tokens being those a massive-activation `rule`
    does not flag. With treat=True (and a rule), PCA sees the activations with the massive offset
    removed and the reconstruction adds it back, exactly as for an SAE; treat=False fits raw PCA.
    `progress` shows a bar: the fit, then one step per k."""
    from sklearn.decomposition import PCA

    ks = sorted({int(k) for k in ks})
    treated = bool(treat and rule is not None)
    shift = (lambda t: t) if not treated else rule.shift
    with tqdm(total=len(ks) + 1, desc=f"PCA FVU ({'treated' if treated else 'raw'})", unit="step",
              disable=not progress, leave=False) as bar:
        pca = PCA(n_components=min(max(ks), train_x.shape[1]), svd_solver="full").fit(shift(train_x).double().numpy())
        bar.update()
        flags = None if rule is None else rule.flags(eval_x)
        e = shift(eval_x).double().numpy()
        centred = e - pca.mean_
        out = PCAFVU({}, {}, treated=treated)
        for k in ks:
            comp = pca.components_[:k]
            err = ((centred - centred @ comp.T @ comp) ** 2).sum(-1)
            f = _fvu_of_errors(torch.as_tensor(err), eval_x, flags)
            out.all[k], out.ordinary[k] = f.fvu, f.fvu_ordinary
            bar.update()
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


# ---- splicing: CE loss and KL with the activations replaced ---------------------------------------
SPLICE_TOKENS = 2048  # tokens per spliced forward pass: patches of a batch of contexts share one pass up to this
ABLATIONS = ("zero", "mean")  # the reference patches of splicing: what CE-loss recovered is measured against


def _check_ablations(ablations) -> tuple:
    ablations = tuple(ablations)
    if not set(ablations) <= set(ABLATIONS) or len(set(ablations)) != len(ablations):
        raise ValueError(f"ablations {ablations!r}: choose among {ABLATIONS}, each at most once")
    return ablations


@torch.no_grad()
def _spliced_logprobs(model, tokens: torch.Tensor, hook: str, reconstruct, mean_act: torch.Tensor | None = None,
                      batch_size: int = 8, max_tokens: int = SPLICE_TOKENS, ablations=ABLATIONS):
    """The per-batch core of splicing. For each batch of contexts, yields (start, toks, clean_logp,
    patch, logp): `patch` is "clean", one of `ablations` ("zero", "mean") or the index j of a
    reconstruction, `logp` the next-token log-probabilities [b, T-1, V] at positions 1.. when the
    activations at `hook` (all positions but BOS) are replaced by it. `reconstruct(x [N, d]) -> [n, N, d]`
    gives the reconstructions.
    The patched runs of a batch go through the model together, as many as fit in `max_tokens` tokens
    (at least one per pass): one pass of several copies of the contexts, each copy with its own patch,
    starting from the clean activation (BOS keeps it) and skipping the blocks before the hook."""
    device = next(model.parameters()).device
    for i in range(0, len(tokens), batch_size):
        toks = tokens[i:i + batch_size].to(device)
        captured = {}

        def capture(act, hook):
            captured["act"] = act.clone()
            return act

        clean_logp = model.run_with_hooks(toks, fwd_hooks=[(hook, capture)]).float().log_softmax(-1)[:, 1:]
        yield i, toks, clean_logp, "clean", clean_logp
        clean_act = captured["act"]
        x = clean_act[:, 1:]
        mean = (mean_act if mean_act is not None else x.mean((0, 1))).to(x)
        recon = reconstruct(x.reshape(-1, x.shape[-1]).float())
        patches = [(name, torch.zeros_like(x) if name == "zero" else mean.expand_as(x)) for name in ablations] + [
            (j, recon[j].reshape(x.shape)) for j in range(len(recon))]
        per_pass = max(1, max_tokens // toks.numel())
        for g in range(0, len(patches), per_pass):
            group = patches[g:g + per_pass]
            new_x = torch.cat([p for _, p in group])

            def hook_fn(act, hook):
                new = clean_act.repeat(len(group), 1, 1).to(act.dtype)  # BOS keeps its clean activation
                new[:, 1:] = new_x.to(act.dtype)
                return new

            with skipping_blocks(model, blocks_before(hook)):  # the whole activation is replaced
                logits = model.run_with_hooks(toks.repeat(len(group), 1), fwd_hooks=[(hook, hook_fn)])
            for (name, _), lg in zip(group, logits.split(len(toks))):
                yield i, toks, clean_logp, name, lg.float().log_softmax(-1)[:, 1:]
            del logits


def _ce(logp: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """[b, T-2] next-token CE at positions 1..T-2 (predicting tokens 2..T-1)."""
    return -logp[:, :-1].gather(-1, toks[:, 2:, None])[..., 0]


def _kl(clean_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """[b, T-1, V] terms of KL(clean || patched) at positions 1..T-1."""
    return clean_logp.exp() * (clean_logp - logp)


@torch.no_grad()
def spliced_loss(model, tokens: torch.Tensor, hook: str, reconstruct, mean_act: torch.Tensor | None = None,
                 batch_size: int = 8, max_tokens: int = SPLICE_TOKENS, ablations=ABLATIONS,
                 refs: dict | None = None) -> dict:
    """CE loss and KL divergence from the clean run when the activations at `hook` (all positions
    but BOS) are replaced by each SAE's reconstruction, by zeros, or by `mean_act`.

    `reconstruct(x [N, d]) -> [n, N, d]` gives one reconstruction per SAE. CE is the next-token
    loss at the patched positions; KL is KL(clean || patched) of the next-token distribution.
    Returns clean/zero/mean CE and KL, per-SAE lists, and CE-loss recovered against the zero and
    the mean ablation (totals over all contexts; `ce_loss_recovered` gives one SAE with intervals).
    The patched runs of each batch of `batch_size` contexts share forward passes of up to `max_tokens`
    tokens (lower it to hold fewer logits in memory at once).

    `ablations` names the reference patches to run (an ablation left out reads NaN, and so does what is
    recovered against it); `refs`, the result of an earlier call on the same tokens, hook and mean, gives
    theirs instead of running them again (e.g. for the same SAEs at later training steps).
    """
    ablations = _check_ablations(ablations)
    run = tuple(a for a in ablations if refs is None or f"ce_{a}" not in refs)
    ce = {"clean": 0.0, **{a: 0.0 for a in run}}
    kl = {a: 0.0 for a in run}
    sae_ce, sae_kl, n_ce, n_kl = [], [], 0, 0
    for _, toks, clean_logp, patch, logp in _spliced_logprobs(model, tokens, hook, reconstruct, mean_act, batch_size,
                                                              max_tokens, run):
        c = float(_ce(logp, toks).sum())
        if patch == "clean":
            ce["clean"] += c
            n_ce += toks[:, 2:].numel()
            n_kl += toks[:, 1:].numel()
            continue
        k = float(_kl(clean_logp, logp).sum())
        if isinstance(patch, str):
            ce[patch] += c
            kl[patch] += k
        else:
            if patch == len(sae_ce):
                sae_ce.append(0.0), sae_kl.append(0.0)
            sae_ce[patch] += c
            sae_kl[patch] += k
    out = {"ce_clean": ce["clean"] / n_ce}
    for a in ABLATIONS:
        if a in run:
            out[f"ce_{a}"], out[f"kl_{a}"] = ce[a] / n_ce, kl[a] / n_kl
        elif a in ablations:
            out[f"ce_{a}"], out[f"kl_{a}"] = refs[f"ce_{a}"], refs[f"kl_{a}"]
        else:
            out[f"ce_{a}"] = out[f"kl_{a}"] = float("nan")
    out.update(ce_sae=[v / n_ce for v in sae_ce], kl_sae=[v / n_kl for v in sae_kl])
    clean = out["ce_clean"]
    out["ce_recovered"] = [(out["ce_zero"] - c) / (out["ce_zero"] - clean) for c in out["ce_sae"]]
    out["ce_recovered_mean"] = [(out["ce_mean"] - c) / (out["ce_mean"] - clean) for c in out["ce_sae"]]
    return out


@dataclass
class CELossRecovered(Result):
    """CE loss (nats per token) of the clean run, of zero- and mean-ablating the activations at `hook`
    and of splicing in the SAE's reconstruction; KL(clean || patched) per token; and CE-loss recovered
    against zero and against mean ablation. Intervals: bootstrap over the contexts."""
    hook: str
    n_contexts: int
    n_tokens: int
    ce_clean: Estimate
    ce_zero: Estimate
    ce_mean: Estimate
    ce_sae: Estimate
    kl_zero: Estimate
    kl_mean: Estimate
    kl_sae: Estimate
    recovered_zero: Estimate
    recovered_mean: Estimate

    def rows(self) -> list[dict]:
        return [{"patch": name, "CE": format(getattr(self, f"ce_{key}"), ".4f"),
                 "KL": "" if key == "clean" else format(getattr(self, f"kl_{key}"), ".4f"),
                 "CE-loss recovered": format(self.recovered_zero, ".3f") + " (vs zero), "
                 + format(self.recovered_mean, ".3f") + " (vs mean)" if key == "sae" else ""}
                for name, key in (("clean", "clean"), ("zero ablation", "zero"), ("mean ablation", "mean"),
                                  ("SAE reconstruction", "sae"))]

    def verdicts(self) -> list[str]:
        out = [f"Splicing the SAE in at {self.hook} recovers {self.recovered_zero:.3f} of the CE loss that zero "
               f"ablation loses and {self.recovered_mean:.3f} of what mean ablation loses "
               f"({self.n_contexts} contexts, {self.n_tokens:,} scored tokens)."]
        gap = self.ce_sae.value - self.ce_clean.value
        out.append(f"It changes the CE loss by {gap:+.4f} nats per token from the clean run (KL {self.kl_sae:.4f}).")
        if self.recovered_mean.has_interval and self.recovered_mean.below(0):
            out.append("It does worse than replacing the activations by their mean.")
        return out


def _as_token_ids(tokens, tokenizer, model):
    """Token ids [n, T]: a tensor (or array) as it is; a list of strings tokenized (by `tokenizer`, else
    the model's), BOS first, cut to the shortest."""
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str):
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("token strings need a tokenizer")
        rows = []
        for text in tokens:
            ids = list(tok(text)["input_ids"])
            if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
                ids = [tok.bos_token_id] + ids
            rows.append(ids)
        length = min(map(len, rows))
        if length < 3:
            raise ValueError("every context needs at least 3 tokens (BOS and two to score)")
        return torch.tensor([r[:length] for r in rows], dtype=torch.long)
    return torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens, dtype=torch.long)


@torch.no_grad()
def ce_loss_recovered(model, tokens, hook: str, sae, mean_act: torch.Tensor | None = None, batch_size: int = 8,
                      tokenizer=None, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> CELossRecovered:
    """CE-loss recovered of splicing `sae`'s reconstruction in at `hook` (every position but BOS).

    model: a TransformerLens-style model or a plain Hugging Face causal LM (wrapped by
    helpers.activations.models.hooked). tokens: token ids [n, T] with BOS first, or a list of strings
    (tokenized by `tokenizer` or the model's, cut to the shortest). sae: anything `as_dictionary`
    takes, or a callable x [N, d] -> x_hat [N, d]. mean_act [d]: the mean-ablation vector (default:
    the mean activation of each batch). Values are totals over all scored tokens; intervals resample
    the n contexts (`n_boot` bootstrap samples)."""

    model = hooked(model, tokenizer)
    tokens = _as_token_ids(tokens, tokenizer, model)
    rec = reconstructor(sae)
    n = len(tokens)
    ce = {k: np.zeros(n) for k in ("clean", "zero", "mean", "sae")}
    kl = {k: np.zeros(n) for k in ("zero", "mean", "sae")}
    for i, toks, clean_logp, patch, logp in _spliced_logprobs(model, tokens, hook, lambda x: rec(x).unsqueeze(0),
                                                               mean_act, batch_size):
        key = "sae" if patch == 0 else patch
        rows = slice(i, i + len(toks))
        ce[key][rows] = _ce(logp, toks).double().sum(1).cpu().numpy()
        if key != "clean":
            kl[key][rows] = _kl(clean_logp, logp).double().sum((1, 2)).cpu().numpy()
    n_ce, n_kl = tokens.shape[1] - 2, tokens.shape[1] - 1

    def stats(idx):
        c = {k: v[idx].sum() / (len(idx) * n_ce) for k, v in ce.items()}
        k = {key: v[idx].sum() / (len(idx) * n_kl) for key, v in kl.items()}
        rz = (c["zero"] - c["sae"]) / (c["zero"] - c["clean"])
        rm = (c["mean"] - c["sae"]) / (c["mean"] - c["clean"])
        return {**{f"ce_{key}": v for key, v in c.items()}, **{f"kl_{key}": v for key, v in k.items()},
                "recovered_zero": rz, "recovered_mean": rm}

    with np.errstate(divide="ignore", invalid="ignore"):
        point = stats(np.arange(n))
        rng = np.random.default_rng(seed)
        boots = [stats(rng.integers(0, n, n)) for _ in range(n_boot if n > 1 else 0)]
    est = {k: Estimate.from_samples(v, [b[k] for b in boots], level) for k, v in point.items()}
    return CELossRecovered(hook=hook, n_contexts=n, n_tokens=n * n_ce, **est)
