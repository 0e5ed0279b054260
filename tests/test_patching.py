"""Patching, ablation and circuits in a dictionary basis, on the embedded model."""
import json

import pytest
import torch

from helpers.dictionaries.dictionary import neuron_basis, random_directions
from helpers.causal.patching import (ablate, candidate_pool, ce_loss, edit_context, edit_curve, gap_closed, patch_context,
                              patch_curve, patch_positions_by_layer, position_mask, ratio_interval,
                              run_with_activation, upstream_features)
from helpers.causal.prompts import logit_diff, make_ioi, make_pronoun

HOOK = "blocks.3.hook_resid_post"
LAYER = 3


@pytest.fixture(scope="module")
def ioi(model):
    return make_ioi(model.tokenizer, n=8, seed=0)


@pytest.fixture(scope="module")
def ctx(model, ioi):
    return patch_context(model, ioi, HOOK)


@pytest.fixture(scope="module")
def plain(model, ioi):
    """Plain patching of the whole residual stream at layers 0 and 3, every position set."""
    return {r.layer: r for r in patch_positions_by_layer(model, ioi, [0, LAYER], progress=False)}


@pytest.fixture(scope="module")
def neurons():
    return neuron_basis(576, hook_name=HOOK)


def test_patching_every_feature_of_a_complete_basis_is_the_plain_patch(model, ioi, ctx, plain, neurons):
    everything = 2 * model.cfg.d_model
    rank, measure = ioi.split()
    on_measure = {p: gap_closed(plain[LAYER].ld("clean")[measure], plain[LAYER].ld("cf")[measure],
                                plain[LAYER].ld(p)[measure]) for p in ("changed", "last")}
    for positions in ("changed", "last", "all"):
        r = patch_curve(model, ioi, HOOK, neurons, ks=(0, everything), context=ctx, positions=positions)
        none, full = r.points
        assert none.gap_closed.value == pytest.approx(0.0, abs=1e-4) and none.kl.value == pytest.approx(0.0, abs=1e-4)
        assert r.measure == measure.tolist() and r.n_measure == len(measure)
        if positions == "all":  # the whole residual is now the counterfactual's: the counterfactual run
            assert full.gap_closed.value == pytest.approx(1.0, abs=1e-3)
        else:  # at chosen positions: exactly the plain patch of those positions, on the same prompts
            assert full.gap_closed.value == pytest.approx(on_measure[positions], abs=2e-3)
    assert r.ld_clean > 0 > r.ld_cf
    # at layer 3 the name information is still at the repeated name, not at the last position: patching
    # the wrong position leaves the answer (nearly) where it was
    assert on_measure["changed"] > 0.5 and abs(on_measure["last"]) < 0.2


def test_patch_curve_ranks_on_one_half_and_measures_on_the_other(model, ioi, ctx, neurons):
    rank, measure = torch.arange(4), torch.arange(4, 8)
    a = patch_curve(model, ioi, HOOK, neurons, ks=(1, 16, 128), context=ctx, split=(rank, measure))
    b = patch_curve(model, ioi, HOOK, neurons, ks=(1, 16, 128), context=ctx, split=(rank, measure[:2]))
    c = patch_curve(model, ioi, HOOK, neurons, ks=(1, 16, 128), context=ctx, split=(measure, rank))
    # the ranking depends on the rank half only: measuring other prompts does not change it
    assert a.order == b.order and a.order != a.order_in_sample
    # "in-sample" ranks on the measured half itself: the other split's held-out ranking
    assert a.order_in_sample == c.order and c.order_in_sample == a.order
    assert a.attribution[a.order[0]] <= min(a.attribution) + 1e-6
    gaps = [p.gap_closed.value for p in a.points]
    assert gaps[-1] > 0.05 and gaps[-1] >= gaps[0] - 0.02
    for p in a.points + c.points:  # every point has an interval over the measured prompts around it
        for e in (p.gap_closed, p.gap_in_sample, p.kl):
            assert e.low - 1e-9 <= e.value <= e.high + 1e-9
    # the curve saves and loads as JSON, every point and interval kept
    assert type(a).from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(ValueError, match="overlap"):
        patch_curve(model, ioi, HOOK, neurons, ks=(1,), context=ctx, split=(rank, torch.arange(3, 8)))


def test_a_patch_of_the_same_features_in_another_order_runs_once(model, ioi, ctx, neurons, monkeypatch):
    """Every candidate patched is one patch whichever ranking chose them: the held-out and in-sample curves
    share its pass, and their last points are the same."""
    from helpers.causal import patching

    pool = candidate_pool(1152, 16, seed=0, salt="neurons")
    rows = []
    run = patching._patched_last_logits
    monkeypatch.setattr(patching, "_patched_last_logits", lambda m, t, h, acts, **kw: rows.append(len(acts)) or run(m, t, h, acts, **kw))
    r = patch_curve(model, ioi, HOOK, neurons, ks=(2, 16), context=ctx, candidates=pool)
    assert rows == [3]  # (held-out, in-sample) x (2, 16), the two 16s one patch
    last = r.points[-1]
    assert last.gap_in_sample.value == last.gap_closed.value and r.order != r.order_in_sample


@torch.no_grad()
def test_patched_runs_compute_only_the_positions_from_the_first_patched_one(model, ioi, ctx, neurons):
    """The prompts' positions before the first patched one are the clean run's at every layer: they run
    once, and the patched runs only from there on (blocks after the hook), with the full passes' figures."""
    positions = {}
    last = model.blocks[-1].mlp.register_forward_hook(lambda m, a, out: positions.setdefault("last", []).append(out.shape[1]))
    try:
        curves = {p: patch_curve(model, ioi, HOOK, neurons, ks=(1, 16, 2 * model.cfg.d_model), context=ctx, positions=p)
                  for p in ("last", "changed")}
    finally:
        last.remove()
    T = ioi.tokens.shape[1]
    first = int(position_mask(ioi, "changed").float().argmax(1).min())
    # per curve: the unpatched prefix, then every patch in one pass over the positions after it
    assert positions["last"] == [T - 1, 1, first, T - first], positions
    _, measure = ioi.split()
    pm = ioi.subset(measure)
    for p, r in curves.items():  # every feature of a complete basis: the plain patch, by a full pass
        x, x_cf = ctx.x[measure], ctx.x_cf[measure]
        full = run_with_activation(model, pm.tokens, HOOK, torch.where(position_mask(pm, p)[..., None], x_cf, x),
                                   last_only=True)
        expect = gap_closed(ctx.ld_clean[measure], ctx.ld_cf[measure], logit_diff(full.float(), pm))
        assert r.points[-1].gap_closed.value == pytest.approx(expect, abs=1e-5)


def test_candidates_limit_the_choice(model, ioi, ctx, neurons):
    pool = candidate_pool(1152, 100, seed=0, salt="neurons")
    assert len(pool) == 100 and pool.tolist() == sorted(set(pool.tolist()))
    assert torch.equal(pool, candidate_pool(1152, 100, seed=0, salt="neurons"))
    assert not torch.equal(pool, candidate_pool(1152, 100, seed=0, salt="PCA"))
    assert torch.equal(candidate_pool(50, 100), torch.arange(50)) and torch.equal(candidate_pool(50, None), torch.arange(50))
    r = patch_curve(model, ioi, HOOK, neurons, ks=(4, 100), context=ctx, candidates=pool)
    assert set(r.order) <= set(pool.tolist()) and r.n_candidates == 100
    assert r.captured_candidates < r.captured == pytest.approx(1.0, abs=1e-4)  # 100 of 1152 halves


def test_ratio_interval():
    num, den = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])
    value, low, high = ratio_interval(num, den, n_boot=2000, seed=0)
    assert value == pytest.approx(1.5) and low < value < high
    assert ratio_interval(num, den, n_boot=2000, seed=0) == (value, low, high)  # seeded
    wide = high - low
    v4, lo4, hi4 = ratio_interval(num.repeat(4), den.repeat(4), n_boot=2000, seed=0)
    assert v4 == pytest.approx(1.5) and hi4 - lo4 < 0.7 * wide  # four times the prompts: about half the width
    assert ratio_interval(torch.ones(5), torch.full((5,), 2.0)) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="same non-empty shape"):
        ratio_interval(num, den[:3])


def test_position_masks(ioi):
    changed, between, last, everything = (position_mask(ioi, p) for p in ("changed", "between", "last", "all"))
    assert (changed.sum(1) == 1).all() and (last.sum(1) == 1).all() and last[:, -1].all()
    assert not (changed & between).any() and not (between & last).any() and not everything[:, 0].any()
    first = changed.float().argmax(1)
    assert (between.sum(1) == ioi.tokens.shape[1] - 2 - first).all()
    with pytest.raises(ValueError, match="positions must be one of"):
        position_mask(ioi, "names")


def test_ablate_removes_exactly_the_feature(model):
    d = neuron_basis(8)
    act = torch.randn(2, 5, 8)
    out = ablate(d, [3, 8 + 5])(act)  # dimension 3's positive half, dimension 5's negative half
    assert torch.equal(out[:, 0], act[:, 0])  # BOS untouched
    x, y = act[:, 1:], out[:, 1:]
    assert torch.allclose(y[..., 3], torch.where(x[..., 3] > 0, torch.zeros_like(x[..., 3]), x[..., 3]))
    assert torch.allclose(y[..., 5], torch.where(x[..., 5] < 0, torch.zeros_like(x[..., 5]), x[..., 5]))
    others = [i for i in range(8) if i not in (3, 5)]
    assert torch.equal(y[..., others], x[..., others])


def test_edit_curve_beats_random_features_held_out_and_counts_its_damage(model, neurons):
    ps = make_pronoun(model.tokenizer, n=16, seed=0)
    text = model.to_tokens(["The jury said it did find that many of the election laws are outmoded."])
    assert ce_loss(model, text, HOOK, lambda a: a) == pytest.approx(ce_loss(model, text), abs=1e-5)
    ectx = edit_context(model, ps, text, HOOK)
    r = edit_curve(model, ps, text, HOOK, neurons, ks=(0, 16), context=ectx, random_ce=True)
    zero, sixteen = r.points
    assert all(e.value == pytest.approx(0, abs=1e-5) for e in (zero.edit, zero.edit_random, zero.ce_increase))
    # the features attribution picked on the other half remove much more of the behaviour than as many
    # features drawn at random
    assert sixteen.edit.value > 0.2 and sixteen.edit.value > sixteen.edit_random.value + 0.1
    for p in r.points:
        for e in (p.edit, p.edit_in_sample, p.edit_random, p.ce_increase, p.ce_random):
            assert e.low - 1e-6 <= e.value <= e.high + 1e-6
    assert type(r).from_dict(json.loads(json.dumps(r.to_dict()))) == r
    # the collateral damage is that of ablating the very features of the edit
    direct = ce_loss(model, text, HOOK, ablate(neurons, r.order[:16])) - ce_loss(model, text)
    assert sixteen.ce_increase.value == pytest.approx(direct, abs=1e-4)
    assert set(r.rank).isdisjoint(r.measure)


def test_bad_hooks(model, ioi):
    with pytest.raises(ValueError, match="layer 40 is beyond the model's 30 layers"):
        patch_curve(model, ioi, "blocks.40.hook_resid_post", neuron_basis(model.cfg.d_model), ks=(1,))
    with pytest.raises(ValueError, match="fitted on 'blocks.2.hook_resid_post', not 'blocks.3"):
        patch_curve(model, ioi, HOOK, neuron_basis(model.cfg.d_model, hook_name="blocks.2.hook_resid_post"), ks=(1,))
    with pytest.raises(ValueError, match="must come before"):
        upstream_features(model, ioi.tokens, "blocks.2.hook_resid_post", neuron_basis(576), 0, HOOK, neuron_basis(576))


def test_upstream_features_are_verified(model, ioi):
    up_hook = "blocks.1.hook_resid_post"
    up, down = neuron_basis(576, hook_name=up_hook), neuron_basis(576, hook_name=HOOK)
    res = upstream_features(model, ioi.tokens, HOOK, down, 7, up_hook, up, top=3)
    assert len(res) == 3 and res.features == [u.feature for u in res] and (res.feature, res.up_hook) == (7, up_hook)
    # ranked by the magnitude of the attribution
    assert [abs(u.attribution) for u in res] == sorted((abs(u.attribution) for u in res), reverse=True)
    # each change is a real ablation: recompute the first one by hand
    g = res[0].feature
    with torch.no_grad():
        got = {}

        def cap(act, hook):
            got["y"] = act
        model.run_with_hooks(ioi.tokens, fwd_hooks=[(up_hook, lambda act, hook: ablate(up, [g])(act)), (HOOK, cap)],
                             stop_at_layer=LAYER + 1)
        after = float(down.encode(got["y"][:, 1:].reshape(-1, 576).float())[:, 7].sum())
    assert res[0].change == pytest.approx(after - res.base, abs=1e-3)
    # the strongest attributed upstream feature measurably changes the downstream one, in the direction
    # attribution predicted
    assert abs(res[0].change) > 1e-3 and res[0].change * res[0].attribution > 0
    assert res.strongest is max(res, key=lambda u: abs(u.change))
    assert res.strongest_share == pytest.approx(abs(res.strongest.change) / abs(res.base))
    # descriptions, the table, the graph and the verdicts; it saves and loads
    described = res.described("fires on ' she'", {g: "fires on ' her'"})
    assert described[0].description == "fires on ' her'" and described[1].description == "" and res[0].description == ""
    rows = described.to_frame()
    assert list(rows.columns) == ["layer", "feature", "attribution", "measured change", "of", "description"]
    assert rows["feature"].tolist() == res.features and rows["description"][0] == "fires on ' her'"
    down_node, up_nodes = described.graph()
    assert down_node == {"label": f"L{LAYER} feature 7", "description": "fires on ' she'"}
    assert [u["change"] for u in up_nodes] == [u.change for u in res] and up_nodes[0]["label"] == f"L1 feature {g}"
    verdicts = described.verdicts()
    assert verdicts[0].startswith(f"layer {LAYER} feature 7 (fires on ' she')")
    same_sign = sum(u.change * u.attribution > 0 for u in res)
    assert f"sign of the measured change for {same_sign} of 3" in verdicts[1]
    assert f"{res.strongest_share:.1%}" in verdicts[2]
    back = type(res).from_dict(json.loads(json.dumps(described.to_dict())))
    assert back == described and isinstance(back[0], type(res[0]))


def test_plain_patching_by_layer(model, plain, ioi):
    first, third = plain[0], plain[LAYER]
    # layer 0: only the changed position differs, so patching it there is the whole counterfactual run,
    # and the later positions carry (nearly) none of it yet
    assert first.gap_closed["changed"] == pytest.approx(1.0, abs=0.05) and abs(first.gap_closed["last"]) < 0.05
    assert abs(first.gap_closed["between"]) < 0.2
    assert first.closed("changed") == first.gap_closed["changed"] and first.closed("last") == first.gap_closed["last"]
    for row in (first, third):  # the rows' gaps are those of their per-prompt logit differences
        for p in ("changed", "between", "last"):
            assert row.gap_closed[p] == pytest.approx(gap_closed(row.ld("clean"), row.ld("cf"), row.ld(p)), abs=1e-6)
            assert row.interval(p).value == pytest.approx(row.gap_closed[p], abs=1e-6)
        assert row.ld("clean").shape == (len(ioi),) and (row.ld("clean") > 0).float().mean() > 0.5
        back = type(row).from_dict(json.loads(json.dumps(row.to_dict())))  # saves and loads, tensors as tensors
        assert back.gap_closed == row.gap_closed and torch.equal(back.ld("changed"), row.ld("changed"))
    with pytest.raises(ValueError, match="outside the model"):
        patch_positions_by_layer(model, ioi, [model.cfg.n_layers], progress=False)


def test_captured_share(model, ioi, ctx):
    from helpers.causal.patching import captured_share

    assert captured_share(neuron_basis(model.cfg.d_model, hook_name=HOOK), model, ioi, HOOK) == pytest.approx(1.0, abs=1e-4)
    few = random_directions(model.cfg.d_model, 16, hook_name=HOOK)  # 8 directions of 576: a small share
    share = captured_share(few, model, ioi, HOOK, positions="changed")
    assert -0.5 < share < 0.5
    assert patch_curve(model, ioi, HOOK, few, ks=(1,), context=ctx).captured == pytest.approx(share, abs=1e-5)
    with pytest.raises(ValueError, match="fitted on"):
        captured_share(neuron_basis(model.cfg.d_model, hook_name="blocks.2.hook_resid_post"), model, ioi, HOOK)
