"""Attribution (gradient × change of code), direct logit attribution, and the verdicts that notebook 05's
summaries read from the patching, editing and steering results."""
import pytest
import torch

from helpers.causal.patching import (EditComparison, EditCurve, EditPoint, PatchComparison, PatchCurve, PatchPoint,
                                     direct_logit_attribution, feature_attribution, final_norm, hook_acts,
                                     position_readout)
from helpers.causal.prompts import logit_diff, make_ioi
from helpers.causal.steering import SteeringComparison, SteeringDifference, SteeringRow
from helpers.results import Estimate

HOOK = "blocks.3.hook_resid_post"


def test_attribution_is_exact_for_a_linear_readout_and_a_linear_dictionary():
    g = torch.Generator().manual_seed(0)
    n, d, f = 5, 6, 9
    w = torch.randn(d, generator=g)
    enc, dec = torch.randn(d, f, generator=g), torch.randn(f, d, generator=g)
    x, x_cf = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    a = feature_attribution(lambda z: z @ w, x, x_cf, lambda z: z @ enc, dec)
    assert a.shape == (n, f)
    # feature f's code moves by δc_f = ((x_cf - x) @ enc)[:, f]; the readout moves by δc_f · (dec[f] · w)
    want = ((x_cf - x) @ enc) * (dec @ w)[None]
    assert torch.allclose(a, want, atol=1e-5)
    # the gradient is taken at x, not x_cf: a nonlinear readout tells them apart
    metric = lambda z: torch.tanh(z).sum(-1)
    at_x = feature_attribution(metric, x, x_cf, lambda z: z @ enc, dec)
    at_cf = feature_attribution(metric, x_cf, x_cf + (x_cf - x), lambda z: z @ enc, dec)
    assert not torch.allclose(at_x, at_cf)


def test_direct_logit_attribution_is_the_frozen_norm_readout():
    g = torch.Generator().manual_seed(1)
    n, d, f, v = 3, 8, 5, 12
    rows, w_u = torch.randn(f, d, generator=g), torch.randn(d, v, generator=g)
    gain, resid = 0.5 + torch.rand(d, generator=g), 2 * torch.randn(n, d, generator=g)
    ans, dis = torch.tensor([0, 3, 7]), torch.tensor([1, 4, 2])
    dla = direct_logit_attribution(rows, w_u, ans, dis, gain=gain, resid=resid)
    scale = resid.pow(2).mean(-1, keepdim=True).sqrt()

    def ld(x):  # the answer-minus-distractor logit through RMSNorm with its scale frozen at resid's
        logits = (x / scale * gain) @ w_u
        return logits[torch.arange(n), ans] - logits[torch.arange(n), dis]
    for j in range(f):
        moved = ld(resid + 0.7 * rows[j]) - ld(resid)
        assert torch.allclose(moved, 0.7 * dla[:, j], atol=1e-4)
    plain = direct_logit_attribution(rows, w_u, ans, dis)
    assert torch.allclose(plain, (rows @ (w_u[:, ans] - w_u[:, dis])).T)


def test_position_readout_is_the_model_and_attribution_its_first_order(model):
    ps = make_ioi(model.tokenizer, n=2, seed=0)
    pos = int((ps.tokens != ps.cf_tokens).float().argmax(1)[0])
    keep = (ps.tokens != ps.cf_tokens).float().argmax(1) == pos
    tokens, correct, wrong = ps.tokens[keep], ps.correct[keep], ps.wrong[keep]
    metric = position_readout(model, tokens, HOOK, correct, wrong, pos)
    x = hook_acts(model, tokens, HOOK)[:, pos].cpu()
    with torch.no_grad():
        clean = model(tokens)[:, -1].float().cpu()
    rows = torch.arange(len(tokens))
    assert torch.allclose(metric(x), clean[rows, correct] - clean[rows, wrong], atol=1e-3)
    # a small move along a few dimensions: attribution (identity dictionary) predicts the change to first order
    step = torch.zeros_like(x)
    step[:, :4] = 0.05 * x.abs().mean()
    eye = torch.eye(x.shape[1])
    a = feature_attribution(metric, x, x + step, lambda z: z, eye)
    with torch.no_grad():
        moved = metric(x + step) - metric(x)
    assert torch.allclose(a.sum(1), moved, rtol=0.1, atol=1e-3)
    gain, eps = final_norm(model)
    assert gain is None or gain.shape == (model.cfg.d_model,)
    assert eps >= 0


def _est(v, half=0.05):
    return Estimate(v, v - half, v + half)


def _curve(name, values):
    pts = [PatchPoint(k, 0.0, _est(v), _est(0.01), gap_in_sample=_est(v + 0.1)) for k, v in zip((1, 4, 16), values)]
    return PatchCurve(name, HOOK, "changed", 3.0, -1.0, 0.6, 0.5, 16, 5, 5, [], [], pts, [])


def test_patch_comparison_names_its_leader_and_whether_it_is_clear():
    comp = PatchComparison(HOOK, {"SAE": _curve("SAE", (0.3, 0.4, 0.9)), "random": _curve("random", (0.0, 0.35, 0.9)),
                                  "PCA": _curve("PCA", (0.1, 0.6, 0.9))},
                           contrast={"SAE": _curve("SAE", (0.0, 0.02, 0.05))})
    assert comp.leader(1) == ("SAE", 0.3) and comp.leader(4) == ("PCA", 0.6)
    text = "\n".join(comp.verdicts())
    assert "k=1): SAE closes the most held out, 0.30, clearly ahead" in text
    assert "at k=4 (the largest below all candidates): PCA closes the most held out, 0.60, clearly ahead" in text
    assert "k=1: SAE, k=4: overlap" in text
    assert "the most any method closes with all its candidates is 0.05" in text
    assert comp.flattery() == pytest.approx([0.1] * 6)


def _edit(name, edits, randoms):
    pts = [EditPoint(k, 1.0, 0.9, _est(e), edit_in_sample=_est(e + 0.2), edit_random=_est(r), ce_increase=_est(0.01))
           for k, e, r in zip((1, 4, 16), edits, randoms)]
    return EditCurve(name, HOOK, 2.0, 3.0, 16, 5, 5, [], [], pts, [])


def test_edit_comparison_calls_a_precise_edit_only_against_random_features():
    comp = EditComparison(HOOK, {"SAE": _edit("SAE", (0.05, 0.3, 0.5), (0.0, 0.0, 0.1)),
                                 "PCA": _edit("PCA", (0.4, 0.45, 0.5), (0.38, 0.4, 0.5)),
                                 "ICA": _edit("ICA", (0.02, 0.05, 0.6), (0.0, 0.0, 0.1))})
    assert comp.leader(1)[0] == "PCA"
    # SAE: disjoint from random at k=4 (not at k=1); PCA never; ICA only at k=16, beyond small_k
    assert comp.precise() == {"SAE": 4}
    assert "a precise edit (beats k random features of its dictionary with disjoint intervals at k ≤ 4): SAE (k=4)" \
        in comp.verdicts()


def test_steering_tally_follows_the_verdict_rules():
    def row(method, t, kl, nll):
        return SteeringRow("she", method, t, 1.0, True, None, "", 50, kl, 0.1, _est(0.3), 10, nll, "")
    diffs = [SteeringDifference("she", "SAE fires on", 0.25, Estimate(0.2, 0.1, 0.3)),
             SteeringDifference("she", "SAE fires on", 1.0, Estimate(-0.1, -0.3, 0.1)),
             SteeringDifference("water", "SAE fires on", 1.0, Estimate(-0.2, -0.3, -0.1)),
             SteeringDifference("water", "SAE promotes", 1.0, Estimate(0.5, 0.4, 0.6), equal_cost=False)]
    cmp = SteeringComparison([row("unsteered", 0.0, 0.0, 2.5), row("SAE fires on", 0.25, 0.27, 2.9),
                              row("difference of means", 1.0, 1.1, 3.6)], diffs, [],
                             {"prompts": list(range(6)), "samples": 2, "n_new": 8}, {"keys": []}, 3.0, 5.0, {})
    assert cmp.tally() == {"SAE ahead": 1, "difference of means ahead": 1, "no clear winner": 1, "no verdict": 1}
    text = "\n".join(cmp.verdicts())
    assert "mean-ablating the layer costs KL 5.00" in text
    assert "KL target 0.25: measured held out at KL 0.27-0.27; loss/token of the continuations 2.90-2.90 against 2.50" in text
    few = SteeringComparison(cmp.measured, diffs, [], {"prompts": [0, 1], "samples": 2, "n_new": 8}, {"keys": []}, 3.0,
                             5.0, {})
    assert few.tally()["no verdict"] == 4
