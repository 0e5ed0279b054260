"""The exercises of notebook 05: references, random cases and known mistakes.

05.1 the share of the logit-difference gap closed, 05.2 activation patching by hand (one position of the
residual stream), 05.3 attribution (gradient × change of code, to rank features by their effect on a
metric), 05.4 direct logit attribution (a decoder direction through the final norm and the unembedding),
05.5 ablating features while keeping the dictionary's reconstruction error, 05.6 steering (adding a
direction to the residual stream). The references are the workbook's own (helpers.causal.patching.gap_closed,
patch_positions_by_layer, feature_attribution, direct_logit_attribution, ablate_activation;
helpers.causal.steering.add_hook).
"""
from __future__ import annotations

import torch

from helpers.activations.harvest import model_device
from helpers.causal.patching import (ablate_activation, direct_logit_attribution, feature_attribution, gap_closed,
                                     patch_positions_by_layer, prompt_pairs)
from helpers.causal.prompts import IOI_TEMPLATES, PRONOUN_TEMPLATES, make_ioi, make_pronoun
from helpers.causal.steering import add_hook

from .core import Exercise, register

MODEL_ATOL = 1e-3  # logits of two forward passes that compute the same thing in another order


# ------------------------------------------------------------------ 05.1 the share of the gap closed

def _gap_reference(ld_clean: torch.Tensor, ld_cf: torch.Tensor, ld: torch.Tensor) -> float:
    return gap_closed(ld_clean, ld_cf, ld)


def _gap_mean_of_ratios(ld_clean, ld_cf, ld):
    return float(((ld_clean - ld) / (ld_clean - ld_cf)).mean())


def _gap_from_cf(ld_clean, ld_cf, ld):
    return float((ld - ld_cf).mean() / (ld_clean - ld_cf).mean())


def _gap_over_clean(ld_clean, ld_cf, ld):
    return float((ld_clean - ld).mean() / ld_clean.mean())


def _gap_cases(gen):
    cases = []
    for n in (6, 20, 3):
        ld_clean = 3 + torch.randn(n, generator=gen)
        ld_cf = -2 + torch.randn(n, generator=gen)
        ld_cf[0] = ld_clean[0] - 0.05          # a prompt whose own gap is tiny
        ld = ld_clean + torch.rand(n, generator=gen) * (ld_cf - ld_clean)
        cases.append(dict(ld_clean=ld_clean, ld_cf=ld_cf, ld=ld))
    return cases


register(Exercise(
    id="05.1", name="share_of_gap_closed", reference=_gap_reference, random_cases=_gap_cases,
    mistakes=((_gap_mean_of_ratios, "you averaged each prompt's own share: divide the mean change by the mean gap "
                                    "(a ratio of means), which a prompt with a tiny gap cannot blow up"),
              (_gap_from_cf, "measured from the wrong end: 0 is the clean answer (ld = ld_clean), 1 the "
                             "counterfactual's (ld = ld_cf)"),
              (_gap_over_clean, "the gap is the clean minus the counterfactual logit difference, not the clean "
                                "logit difference alone")),
))


# ------------------------------------------------------------------ 05.2 activation patching by hand

def _patch_reference(model, tokens, cf_tokens, layer: int, position: int, correct, wrong):
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, position] = True
    ps = prompt_pairs(model, tokens, cf_tokens, answer=(correct, wrong))
    row = patch_positions_by_layer(model, ps, [layer], progress=False, positions=(mask,))[0]
    return row.ld("mask0")


def _run_patched(model, tokens, cf_tokens, layer, correct, wrong, where):
    """The clean run's logit differences with the counterfactual residual at `where` (a function
    [n, pos, d] -> bool mask) of blocks.{layer}.hook_resid_post; where None: no patch."""
    name = f"blocks.{layer}.hook_resid_post"
    dev = model_device(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(cf_tokens.to(dev), names_filter=[name])
        x_cf = cache[name]

        def patch(act, hook):
            return torch.where(where(act)[..., None], x_cf.to(act.dtype), act)
        hooks = [] if where is None else [(name, patch)]
        logits = model.run_with_hooks(tokens.to(dev), fwd_hooks=hooks)[:, -1].float().cpu()
    rows = torch.arange(len(tokens))
    return logits[rows, correct] - logits[rows, wrong]


def _patch_all(model, tokens, cf_tokens, layer, position, correct, wrong):
    return _run_patched(model, tokens, cf_tokens, layer, correct, wrong,
                        lambda act: torch.ones(act.shape[:2], dtype=torch.bool, device=act.device))


def _patch_last(model, tokens, cf_tokens, layer, position, correct, wrong):
    def last(act):
        m = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
        m[:, -1] = True
        return m
    return _run_patched(model, tokens, cf_tokens, layer, correct, wrong, last)


def _patch_none(model, tokens, cf_tokens, layer, position, correct, wrong):
    return _run_patched(model, tokens, cf_tokens, layer, correct, wrong, None)


def _ioi_pair(model):
    """Two IOI prompts of one template (ABBA and BABA), their counterfactuals and the repeated name's position."""

    ps = make_ioi(model.tokenizer, n=2, seed=0, templates=[IOI_TEMPLATES[0]])
    changed = (ps.tokens != ps.cf_tokens).nonzero()
    return ps, int(changed[0, 1])


def _patch_model_cases(model, gen):
    ps, pos = _ioi_pair(model)
    base = dict(model=model, tokens=ps.tokens, cf_tokens=ps.cf_tokens, correct=ps.correct, wrong=ps.wrong)
    return [dict(base, layer=model.cfg.n_layers // 4, position=pos)]  # one case: forward passes are slow on a CPU


register(Exercise(
    id="05.2", name="patch_residual", reference=_patch_reference, model_cases=_patch_model_cases, atol=MODEL_ATOL,
    mistakes=((_patch_all, "you overwrote the residual stream at every position: that is the counterfactual run "
                           "itself. Overwrite only [:, position]"),
              (_patch_last, "you patched the last position, not `position`"),
              (_patch_none, "nothing was patched: is the hook blocks.{layer}.hook_resid_post, and does your hook "
                            "function return the patched activation?")),
))


# ------------------------------------------------------------------ 05.3 attribution

def _attr_reference(metric, x, x_cf, encode, decoder_rows):
    return feature_attribution(metric, x, x_cf, encode, decoder_rows)


def _attr_parts(metric, x, x_cf, encode, decoder_rows, at=None):
    """The gradient of Σ metric at `at` (default x) projected on each decoder row [n, F], and the codes."""
    leaf = (x if at is None else at).detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(metric(leaf).sum(), leaf)
    with torch.no_grad():
        return grad @ decoder_rows.float().T, encode(x.float()).float(), encode(x_cf.float()).float()


def _attr_code(metric, x, x_cf, encode, decoder_rows):
    g, c, _ = _attr_parts(metric, x, x_cf, encode, decoder_rows)
    return c * g


def _attr_sign(metric, x, x_cf, encode, decoder_rows):
    g, c, c_cf = _attr_parts(metric, x, x_cf, encode, decoder_rows)
    return (c - c_cf) * g


def _attr_grad_at_cf(metric, x, x_cf, encode, decoder_rows):
    g, c, c_cf = _attr_parts(metric, x, x_cf, encode, decoder_rows, at=x_cf)
    return (c_cf - c) * g


def _attr_cases(gen):
    cases = []
    for n, d, h, f in ((4, 6, 8, 10), (2, 5, 7, 16), (6, 8, 5, 12)):
        w1, b1 = torch.randn(d, h, generator=gen) / d ** 0.5, 0.1 * torch.randn(h, generator=gen)
        w2 = torch.randn(h, generator=gen)
        metric = (lambda w1, b1, w2: lambda z: torch.tanh(z @ w1 + b1) @ w2)(w1, b1, w2)   # a tiny MLP readout [n, d] -> [n]
        we, be = torch.randn(d, f, generator=gen) / d ** 0.5, -0.1 * torch.rand(f, generator=gen)
        encode = (lambda we, be: lambda z: torch.relu(z @ we + be))(we, be)
        rows = torch.randn(f, d, generator=gen) / d ** 0.5
        x = torch.randn(n, d, generator=gen)
        cases.append(dict(metric=metric, x=x, x_cf=x + torch.randn(n, d, generator=gen), encode=encode,
                          decoder_rows=rows))
    return cases


register(Exercise(
    id="05.3", name="feature_attribution", reference=_attr_reference, random_cases=_attr_cases, atol=1e-4,
    mistakes=((_attr_code, "you multiplied the gradient by the clean code: that estimates removing the feature, "
                           "not moving it to its counterfactual value. Multiply by c(x_cf) - c(x)"),
              (_attr_sign, "the sign is flipped: the change of code is c(x_cf) - c(x), counterfactual minus clean"),
              (_attr_grad_at_cf, "take the gradient at the clean activations x, where the patch starts, not at x_cf")),
))


# ------------------------------------------------------------------ 05.4 direct logit attribution

def _dla_reference(decoder_rows, unembed, gain, resid, answer, distractor):
    return direct_logit_attribution(decoder_rows, unembed, answer, distractor, gain=gain, resid=resid)


def _dla_no_gain(decoder_rows, unembed, gain, resid, answer, distractor):
    return direct_logit_attribution(decoder_rows, unembed, answer, distractor, gain=None, resid=resid)


def _dla_no_scale(decoder_rows, unembed, gain, resid, answer, distractor):
    return direct_logit_attribution(decoder_rows, unembed, answer, distractor, gain=gain, resid=None)


def _dla_answer_only(decoder_rows, unembed, gain, resid, answer, distractor):
    rms = resid.float().pow(2).mean(-1, keepdim=True).sqrt()
    return ((decoder_rows.float() * gain.float()) @ unembed.float()[:, answer]).T / rms


def _dla_norm_scale(decoder_rows, unembed, gain, resid, answer, distractor):
    w = unembed.float()
    out = ((decoder_rows.float() * gain.float()) @ (w[:, answer] - w[:, distractor])).T
    return out / resid.float().norm(dim=-1, keepdim=True)


def _dla_cases(gen):
    cases = []
    for n, d, f, v in ((3, 6, 9, 11), (5, 8, 4, 20), (1, 4, 12, 7)):
        ans = torch.randint(0, v, (n,), generator=gen)
        cases.append(dict(decoder_rows=torch.randn(f, d, generator=gen), unembed=torch.randn(d, v, generator=gen),
                          gain=0.5 + torch.rand(d, generator=gen), resid=3 * torch.randn(n, d, generator=gen),
                          answer=ans, distractor=(ans + 1 + torch.randint(0, v - 1, (n,), generator=gen)) % v))
    return cases


register(Exercise(
    id="05.4", name="direct_logit_attribution", reference=_dla_reference, random_cases=_dla_cases, atol=1e-4,
    mistakes=((_dla_no_gain, "the final norm multiplies by its gain before the unembedding: scale the decoder "
                             "rows by `gain` first"),
              (_dla_no_scale, "the final norm divides by each prompt's root mean square of `resid`: divide by it"),
              (_dla_norm_scale, "RMSNorm divides by the root *mean* square, sqrt(mean(resid²)), not the norm "
                                "sqrt(sum(resid²))"),
              (_dla_answer_only, "project onto the answer-minus-distractor direction, unembed[:, answer] - "
                                 "unembed[:, distractor], not the answer's column alone")),
))


# ------------------------------------------------------------------ 05.5 ablation that keeps the error term

def _ablate_reference(x: torch.Tensor, encode, decoder_rows: torch.Tensor, features):
    with torch.no_grad():
        return ablate_activation(x, encode, decoder_rows, features)


def _contribution(x, encode, decoder_rows, features, start=1):
    n, p, d = x.shape
    sel = torch.as_tensor(features, dtype=torch.long)
    with torch.no_grad():
        codes = encode(x[:, start:].reshape(-1, d).float())[:, sel].float()
    return (codes @ decoder_rows.float()[sel]).reshape(n, p - start, d)


def _ablate_bos_too(x, encode, decoder_rows, features):
    return x - _contribution(x, encode, decoder_rows, features, start=0)


def _ablate_added(x, encode, decoder_rows, features):
    out = x.clone()
    out[:, 1:] += _contribution(x, encode, decoder_rows, features)
    return out


def _ablate_every_feature(x, encode, decoder_rows, features):
    return _ablate_reference(x, encode, decoder_rows, list(range(decoder_rows.shape[0])))


def _ablate_no_error(x, encode, decoder_rows, features):
    n, p, d = x.shape
    sel = torch.as_tensor(features, dtype=torch.long)
    with torch.no_grad():
        codes = encode(x[:, 1:].reshape(-1, d).float()).float()
    codes[:, sel] = 0
    out = x.clone()
    out[:, 1:] = (codes @ decoder_rows.float()).reshape(n, p - 1, d)
    return out


def _ablate_cases(gen):
    cases = []
    for n, p, d, f, k in ((2, 5, 8, 12, 3), (3, 4, 6, 20, 1), (1, 7, 10, 16, 5)):
        w = torch.randn(d, f, generator=gen) / d ** 0.5
        b = -0.2 * torch.rand(f, generator=gen)
        encode = (lambda w, b: lambda z: torch.relu(z @ w + b))(w, b)     # a small ReLU encoder [N, d] -> [N, f]
        rows = torch.randn(f, d, generator=gen)
        x = torch.randn(n, p, d, generator=gen)
        x[:, 0] *= 10                                                     # BOS: large, as in the model
        feats = torch.randperm(f, generator=gen)[:k].tolist()
        cases.append(dict(x=x, encode=encode, decoder_rows=rows, features=feats))
    return cases


register(Exercise(
    id="05.5", name="ablate_features", reference=_ablate_reference, random_cases=_ablate_cases, atol=1e-4,
    mistakes=((_ablate_bos_too, "position 0 (BOS) is left as it is: the workbook never edits it"),
              (_ablate_added, "ablating removes the features' contribution: subtract codes @ decoder_rows, do not add it"),
              (_ablate_every_feature, "you removed every feature's contribution: only those in `features`"),
              (_ablate_no_error, "you rebuilt the activation from the other features' codes, which drops the "
                                 "dictionary's reconstruction error (and its bias): keep x and subtract only the "
                                 "ablated features' contribution")),
))


# ------------------------------------------------------------------ 05.6 steering

def _steer_run(model, tokens, hook_name, direction, scale, positions="text", normalise=True):
    """The exercise's mistakes: steering with the direction unnormalised, at BOS too, or at the last position only."""
    unit = direction.float() / direction.float().norm() if normalise else direction.float()

    def add(act, hook):
        out = act.clone()
        v = (scale * unit).to(act.device, act.dtype)
        if positions == "text":
            out[:, 1:] += v
        elif positions == "all":
            out += v
        else:
            out[:, -1] += v
        return out
    with torch.no_grad():
        return model.run_with_hooks(tokens.to(model_device(model)), fwd_hooks=[(hook_name, add)])[:, -1].float().cpu()


def _steer_reference(model, tokens, hook_name: str, direction, scale: float):
    unit = direction.float() / direction.float().norm()
    with torch.no_grad():  # the workbook's own steering hook (section 6)
        return model.run_with_hooks(tokens.to(model_device(model)),
                                    fwd_hooks=[(hook_name, add_hook(scale * unit))])[:, -1].float().cpu()


def _steer_unnormalised(model, tokens, hook_name, direction, scale):
    return _steer_run(model, tokens, hook_name, direction, scale, normalise=False)


def _steer_bos_too(model, tokens, hook_name, direction, scale):
    return _steer_run(model, tokens, hook_name, direction, scale, positions="all")


def _steer_last_only(model, tokens, hook_name, direction, scale):
    return _steer_run(model, tokens, hook_name, direction, scale, positions="last")


def _steer_model_cases(model, gen):
    ps = make_pronoun(model.tokenizer, n=2, seed=0, templates=[PRONOUN_TEMPLATES[0]])
    return [dict(model=model, tokens=ps.tokens, hook_name=f"blocks.{model.cfg.n_layers // 2}.hook_resid_post",
                 direction=3 * torch.randn(model.cfg.d_model, generator=gen), scale=8.0)]


register(Exercise(
    id="05.6", name="steer", reference=_steer_reference, model_cases=_steer_model_cases, atol=MODEL_ATOL,
    mistakes=((_steer_unnormalised, "scale the *unit* direction: divide it by its norm first, so that `scale` is "
                                    "the length of what you add"),
              (_steer_bos_too, "leave position 0 (BOS) as it is, as the workbook's edits do: add at positions 1 and on"),
              (_steer_last_only, "add the direction at every position (but BOS), not at the last one only")),
))
