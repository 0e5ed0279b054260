"""Causal experiments in a dictionary basis: patching, ablation-based editing, feature circuits.

All of them change the activation at one hook only along chosen dictionary directions and keep
everything else, including the dictionary's reconstruction error: changing feature f's code from
c to c' adds (c' - c) · decoder_rows[f] to the activation. So any Dictionary with a linear
decoder works: the SAE and the baselines alike.

* `patch_curve`: move the clean IOI prompts' codes of the top-k features to their values on the
  counterfactual prompts (names swapped), and record the logit difference and the KL divergence of
  the next-token distribution from the clean run, for each k. Features are ranked by attribution
  (a first-order estimate from one backward pass), then every point of the curve is measured by an
  actual patched forward pass.
* `edit_curve`: zero-ablate the top-k features that carry a behaviour (e.g. the gendered pronoun)
  and measure the edit (the behaviour's logit difference drop) against the collateral damage (CE
  loss increase on held-out text).
* `upstream_features`: for a feature at one layer, the features at an earlier layer whose ablation
  changes it most (attribution, then verified by ablation).
* `patch_positions_by_layer`: the plain (no dictionary) patch of the whole residual stream at chosen
  positions, layer by layer: where the information that decides the answer sits.
* `captured_share`: how much of the clean-to-counterfactual change in the activation a dictionary's
  reconstruction carries, which bounds what patching its features can do.

Everything is batched over prompts, and the points of a curve share forward passes: what does not
depend on the dictionary (the clean and counterfactual runs, their activations and the gradient that
attribution needs) is computed once per hook and prompt set (`patch_context`, `edit_context`) and
reused by every dictionary; all the patched runs of a curve go through the model together, and only
the last position's logits are computed where only they are read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .harvest import _model_device
from .prompts import logit_diff


def _layer(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        raise ValueError(f"{hook!r} is not a block hook")
    return int(m.group(1))


def check_hook(model, dictionary, hook: str) -> None:
    if _layer(hook) >= model.cfg.n_layers:
        raise ValueError(f"{hook!r}: layer {_layer(hook)} is beyond the model's {model.cfg.n_layers} layers")
    if dictionary.hook_name and dictionary.hook_name != hook:
        raise ValueError(f"{dictionary.name} was fitted on {dictionary.hook_name!r}, not {hook!r}: patch it at its "
                         "own hook, or fit one for this layer")


_device = _model_device


@torch.no_grad()
def hook_acts(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations [n, pos, d] at `hook` (the forward pass stops after its layer)."""
    _, cache = model.run_with_cache(tokens.to(_device(model)), names_filter=[hook], stop_at_layer=_layer(hook) + 1)
    return cache[hook].float()


def run_with_activation(model, tokens, hook: str, new_act: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Logits with the activation at `hook` replaced by new_act (all positions); last_only: only the
    last position's logits, [n, vocab] (the unembedding of the other positions is skipped)."""
    def replace(act, hook):
        return new_act.to(act.dtype)
    if last_only:
        return model.run_with_hooks(tokens.to(_device(model)), fwd_hooks=[(hook, replace)], logits_to_keep=1)[:, -1]
    return model.run_with_hooks(tokens.to(_device(model)), fwd_hooks=[(hook, replace)])


@torch.no_grad()
def _last_logits_and_acts(model, tokens, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, vocab] last-position logits and [n, pos, d] activations at `hook`, from one forward pass."""
    logits, cache = model.run_with_cache(tokens.to(_device(model)), names_filter=[hook], logits_to_keep=1)
    return logits[:, -1].float(), cache[hook].float()


@torch.no_grad()
def _patched_last_logits(model, tokens, hook: str, acts: list[torch.Tensor], max_rows: int = 256) -> list[torch.Tensor]:
    """For each activation in `acts` ([n, pos, d] each), the last-position logits [n, vocab] of the
    prompts `tokens` with that activation at `hook`: the patched runs go through the model together,
    in batches of at most `max_rows` prompts."""
    n = tokens.shape[0]
    stacked = torch.cat(acts)
    toks = tokens.repeat(len(acts), 1)
    out = []
    step = max(n, max_rows // n * n)
    for i in range(0, len(stacked), step):
        out.append(run_with_activation(model, toks[i:i + step], hook, stacked[i:i + step].to(_device(model)),
                                       last_only=True).float().cpu())
    return list(torch.cat(out).split(n))


def _encode(dictionary, x):
    n, p, d = x.shape
    return dictionary.encode(x.reshape(-1, d)).reshape(n, p, -1).float().cpu()


def _grad(model, tokens, hook: str, x: torch.Tensor, metric) -> torch.Tensor:
    """∂metric(last-position logits)/∂(activation at hook), [n, pos, d], at activation x."""
    leaf = x.clone().to(_device(model)).requires_grad_(True)
    with torch.enable_grad():
        metric(run_with_activation(model, tokens, hook, leaf, last_only=True)).backward()
    return leaf.grad.float().cpu()


def attribution(model, tokens, hook: str, dictionary, delta_codes: torch.Tensor, metric,
                x: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """First-order estimate, per feature, of the change in metric(last-position logits [n, vocab])
    when the codes at `hook` change by delta_codes [n, pos, F]: Σ_{n,pos} δc_f · (∂metric/∂x ·
    decoder_rows[f]). `x`: the clean activations at `hook`; `grad`: ∂metric/∂x, if the caller has it
    (it does not depend on the dictionary)."""
    if grad is None:
        x = hook_acts(model, tokens, hook) if x is None else x
        grad = _grad(model, tokens, hook, x, metric)
    proj = grad @ dictionary.decoder_rows.float().cpu().T             # [n, pos, F]
    return (delta_codes * proj).sum((0, 1))


@torch.no_grad()
def _kl(clean_logits, logits) -> float:
    """Mean KL(clean || patched) of the next-token distributions, from [n, vocab] logits."""
    p = clean_logits.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@dataclass
class PatchContext:
    """What the patch curves of every dictionary at one hook share, for one prompt set."""

    hook: str
    x: torch.Tensor        # [n, pos, d] clean activations at hook (CPU)
    x_cf: torch.Tensor     # [n, pos, d] counterfactual activations
    clean: torch.Tensor    # [n, vocab] clean last-position logits
    ld_clean: float        # mean logit difference, clean run
    ld_cf: float           # ... counterfactual run
    grad: torch.Tensor     # [n, pos, d] ∂ Σ logit_diff / ∂x at the clean activations


def patch_context(model, ps, hook: str) -> PatchContext:
    """The clean and counterfactual runs, their activations at `hook`, and the attribution gradient:
    three passes (two forward, one forward-backward), shared by every dictionary's `patch_curve`."""
    clean, x = _last_logits_and_acts(model, ps.tokens, hook)
    cf, x_cf = _last_logits_and_acts(model, ps.cf_tokens, hook)
    grad = _grad(model, ps.tokens, hook, x, lambda lg: logit_diff(lg, ps).sum())
    return PatchContext(hook, x.cpu(), x_cf.cpu(), clean.cpu(), float(logit_diff(clean, ps).mean()),
                        float(logit_diff(cf, ps).mean()), grad)


@torch.no_grad()
def patch_curve(model, ps, hook: str, dictionary, ks=(1, 2, 4, 8, 16, 32), context: PatchContext | None = None) -> dict:
    """Patch the k features that most move the logit difference towards the counterfactual.
    The result's "captured" is the dictionary's `captured_share` for these prompts. Pass the hook's
    `patch_context` to share its runs between dictionaries."""
    check_hook(model, dictionary, hook)
    ctx = context if context is not None else patch_context(model, ps, hook)
    if ctx.hook != hook:
        raise ValueError(f"the context was made for {ctx.hook!r}, not {hook!r}")
    x, x_cf = ctx.x, ctx.x_cf
    c, c_cf = _encode(dictionary, x), _encode(dictionary, x_cf)
    delta = c_cf - c
    attr = attribution(model, ps.tokens, hook, dictionary, delta, None, grad=ctx.grad)
    order = attr.argsort()  # most negative first: pushes the answer towards the counterfactual's
    rows = dictionary.decoder_rows.float().cpu()
    captured = _captured(x_cf - x, delta @ rows)
    acts = [x + delta[..., order[:k]] @ rows[order[:k]] for k in ks]
    points = []
    for k, logits in zip(ks, _patched_last_logits(model, ps.tokens, hook, acts)):
        ld = float(logit_diff(logits, ps).mean())
        points.append({"k": int(k), "logit_diff": ld, "gap_closed": _gap_closed(ctx.ld_clean, ctx.ld_cf, ld),
                       "kl": _kl(ctx.clean, logits)})
    return {"dictionary": dictionary.name, "hook": hook, "ld_clean": ctx.ld_clean, "ld_cf": ctx.ld_cf,
            "captured": captured, "points": points, "order": order[: max(ks)].tolist(), "attribution": attr}


@torch.no_grad()
def ce_loss(model, tokens, hook: str | None = None, new_act_fn=None, batch_size: int = 8) -> float:
    """Mean next-token CE on `tokens` (BOS first), optionally with the activation at `hook` replaced
    by new_act_fn(activation)."""
    total, count = 0.0, 0
    dev = _device(model)
    for i in range(0, len(tokens), batch_size):
        t = tokens[i:i + batch_size].to(dev)
        if hook is None:
            logits = model(t)
        else:
            logits = model.run_with_hooks(t, fwd_hooks=[(hook, lambda act, hook: new_act_fn(act).to(act.dtype))])
        logp = logits.float().log_softmax(-1)[:, :-1]
        total += float(-logp.gather(-1, t[:, 1:, None]).sum())
        count += t[:, 1:].numel()
    return total / count


def ablate(dictionary, features) -> callable:
    """A function act -> act with the codes of `features` set to 0 (BOS position untouched)."""
    rows = dictionary.decoder_rows.float()
    sel = torch.as_tensor(features, dtype=torch.int64)

    def fn(act):
        n, p, d = act.shape
        x = act[:, 1:].float()
        c = dictionary.encode(x.reshape(-1, d).to(rows.device))[:, sel].float()
        out = act.clone()
        out[:, 1:] = (x.reshape(-1, d) - (c @ rows[sel]).to(x.device)).reshape(n, p - 1, d).to(act.dtype)
        return out
    return fn


@dataclass
class EditContext:
    """What the edit curves of every dictionary at one hook share, for one prompt set and text."""

    hook: str
    x: torch.Tensor        # [n, pos, d] the prompts' activations at hook
    grad: torch.Tensor     # [n, pos, d] ∂ Σ logit_diff / ∂x
    ld_clean: float
    ce_clean: float        # CE on the held-out text, unedited


def edit_context(model, ps, text_tokens: torch.Tensor, hook: str) -> EditContext:
    """The prompts' clean run, activations and attribution gradient, and the text's clean CE loss,
    shared by every dictionary's `edit_curve` at `hook`."""
    clean, x = _last_logits_and_acts(model, ps.tokens, hook)
    grad = _grad(model, ps.tokens, hook, x, lambda lg: logit_diff(lg, ps).sum())
    return EditContext(hook, x.cpu(), grad, float(logit_diff(clean, ps).mean()), ce_loss(model, text_tokens))


@torch.no_grad()
def edit_curve(model, ps, text_tokens: torch.Tensor, hook: str, dictionary, ks=(1, 4, 16),
               context: EditContext | None = None) -> dict:
    """Remove a behaviour by zero-ablating its top-k features; measure edit and collateral damage.
    Pass the hook's `edit_context` to share its runs between dictionaries."""
    check_hook(model, dictionary, hook)
    ctx = context if context is not None else edit_context(model, ps, text_tokens, hook)
    if ctx.hook != hook:
        raise ValueError(f"the context was made for {ctx.hook!r}, not {hook!r}")
    x = ctx.x
    c = _encode(dictionary, x)
    c[:, 0] = 0  # BOS is never ablated
    attr = attribution(model, ps.tokens, hook, dictionary, -c, None, grad=ctx.grad)
    order = attr.argsort()
    fns = [ablate(dictionary, order[:k]) for k in ks]
    points = []
    for k, fn, logits in zip(ks, fns, _patched_last_logits(model, ps.tokens, hook, [fn(x) for fn in fns])):
        ld = logit_diff(logits, ps)
        points.append({"k": int(k), "logit_diff": float(ld.mean()), "accuracy": float((ld > 0).float().mean()),
                       "edit": (ctx.ld_clean - float(ld.mean())) / ctx.ld_clean,
                       "ce_increase": ce_loss(model, text_tokens, hook, fn) - ctx.ce_clean})
    return {"dictionary": dictionary.name, "hook": hook, "ld_clean": ctx.ld_clean, "ce_clean": ctx.ce_clean,
            "points": points, "order": order[: max(ks)].tolist()}


def upstream_features(model, tokens, down_hook: str, down_dict, feature: int, up_hook: str, up_dict,
                      top: int = 5) -> list[dict]:
    """Features at `up_hook` whose zero-ablation changes `feature` (at `down_hook`) most: ranked by
    attribution, then each verified by an actual ablation. Returns [{feature, attribution,
    change}] where change is the measured change in the feature's summed activation."""
    if _layer(up_hook) >= _layer(down_hook):
        raise ValueError(f"{up_hook!r} must come before {down_hook!r}")
    check_hook(model, up_dict, up_hook)
    check_hook(model, down_dict, down_hook)
    stop = _layer(down_hook) + 1
    dev = _device(model)
    toks = tokens.to(dev)

    def down_activation(replace_fn=None, leaf=None):
        got = {}

        def cap(act, hook):
            got["y"] = act
            return act
        hooks = [(down_hook, cap)]
        if leaf is not None:
            hooks.insert(0, (up_hook, lambda act, hook: leaf))
        elif replace_fn is not None:
            hooks.insert(0, (up_hook, lambda act, hook: replace_fn(act)))
        model.run_with_hooks(toks, fwd_hooks=hooks, stop_at_layer=stop)
        y = got["y"][:, 1:].float()
        return down_dict.encode(y.reshape(-1, y.shape[-1]))[:, feature].sum()

    x_up = hook_acts(model, tokens, up_hook)
    leaf = x_up.clone().requires_grad_(True)
    with torch.enable_grad():
        down_activation(leaf=leaf).backward()
    grad = leaf.grad.float().cpu()
    c_up = _encode(up_dict, x_up)
    c_up[:, 0] = 0
    attr = (-c_up * (grad @ up_dict.decoder_rows.float().cpu().T)).sum((0, 1))
    with torch.no_grad():
        base = float(down_activation())
        out = []
        for g in attr.abs().argsort(descending=True)[:top].tolist():
            after = float(down_activation(replace_fn=ablate(up_dict, [g])))
            out.append({"feature": g, "attribution": float(attr[g]), "change": after - base, "base": base})
    return out


def changed_positions(ps) -> torch.Tensor:
    """[n, pos] bool: where a prompt and its counterfactual differ (IOI: the second name)."""
    return ps.tokens != ps.cf_tokens


def _gap_closed(ld_clean: float, ld_cf: float, ld: float) -> float:
    return (ld_clean - ld) / (ld_clean - ld_cf)


@torch.no_grad()
def patch_positions_by_layer(model, ps, layers, hook_kind: str = "resid_post", progress: bool = True) -> list[dict]:
    """For each layer: the share of the logit-difference gap closed by replacing the clean residual
    stream with the counterfactual one (a) at the positions where the prompts differ and (b) at the
    last position only. One counterfactual pass for all layers, then one batched patched pass per
    layer and position set."""
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} is outside the model's 0..{model.cfg.n_layers - 1}")
    dev = _device(model)
    hooks = {layer: f"blocks.{layer}.hook_{hook_kind}" for layer in layers}
    cf, cache = model.run_with_cache(ps.cf_tokens.to(dev), names_filter=list(hooks.values()), logits_to_keep=1)
    clean = model(ps.tokens.to(dev), logits_to_keep=1)
    ld_clean, ld_cf = float(logit_diff(clean.float(), ps).mean()), float(logit_diff(cf.float(), ps).mean())
    changed = changed_positions(ps).to(dev)
    last = torch.zeros_like(changed)
    last[:, -1] = True
    from tqdm.auto import tqdm

    out = []
    for layer in tqdm(list(layers), desc="patch by layer", disable=not progress):
        x_cf = cache[hooks[layer]]

        def patch(act, hook):  # both position sets in one batched pass: [clean prompts ×2]
            n = len(act) // 2
            return torch.cat([torch.where(changed[..., None], x_cf.to(act.dtype), act[:n]),
                              torch.where(last[..., None], x_cf.to(act.dtype), act[n:])])
        logits = model.run_with_hooks(ps.tokens.repeat(2, 1).to(dev), fwd_hooks=[(hooks[layer], patch)],
                                      logits_to_keep=1)[:, -1].float()
        n = len(ps)
        out.append({"layer": layer,
                    "changed": _gap_closed(ld_clean, ld_cf, float(logit_diff(logits[:n], ps).mean())),
                    "last": _gap_closed(ld_clean, ld_cf, float(logit_diff(logits[n:], ps).mean()))})
    return out


def _captured(d: torch.Tensor, d_hat: torch.Tensor) -> float:
    return float(1 - (d - d_hat).pow(2).sum() / d.pow(2).sum().clamp_min(1e-12))


@torch.no_grad()
def captured_share(dictionary, model, ps, hook: str) -> float:
    """1 - ‖Δx - Δx̂‖² / ‖Δx‖² over all positions (the ones `patch_curve` patches; they are equal at
    BOS), where Δx is the counterfactual minus the clean activation and Δx̂ the same for the
    dictionary's reconstruction. 1: patching all of the dictionary's features reproduces the
    counterfactual activation; 0 (or below: the reconstruction's change can point elsewhere):
    patching its features reproduces none of it, because the difference sits in the reconstruction
    error, which patching keeps. `patch_curve` reports it too, from the activations it already has."""
    check_hook(model, dictionary, hook)
    x, x_cf = hook_acts(model, ps.tokens, hook), hook_acts(model, ps.cf_tokens, hook)
    delta = _encode(dictionary, x_cf) - _encode(dictionary, x)
    return _captured(x_cf.cpu() - x.cpu(), delta @ dictionary.decoder_rows.float().cpu())
