"""Patching, ablation and circuits in a dictionary basis, on the embedded model."""
import pytest
import torch

from helpers.dictionary import neuron_basis, random_directions
from helpers.patching import ablate, ce_loss, edit_curve, patch_curve, upstream_features
from helpers.prompts import make_ioi, make_pronoun

HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def ioi(model):
    return make_ioi(model.tokenizer, n=8, seed=0)


def test_patching_a_complete_basis_gives_the_counterfactual_run(model, ioi):
    d = neuron_basis(model.cfg.d_model, hook_name=HOOK)
    r = patch_curve(model, ioi, HOOK, d, ks=(0, 2 * model.cfg.d_model))
    none, everything = r["points"]
    assert none["gap_closed"] == pytest.approx(0.0, abs=1e-4) and none["kl"] == pytest.approx(0.0, abs=1e-4)
    assert everything["gap_closed"] == pytest.approx(1.0, abs=1e-3)  # the whole residual is now the counterfactual's
    assert r["ld_clean"] > 0 > r["ld_cf"]


def test_patch_curve_ranks_by_attribution_and_moves_towards_the_counterfactual(model, ioi):
    d = neuron_basis(model.cfg.d_model, hook_name=HOOK)
    r = patch_curve(model, ioi, HOOK, d, ks=(1, 16, 128))
    gaps = [p["gap_closed"] for p in r["points"]]
    assert gaps[-1] > 0.05 and gaps[-1] >= gaps[0] - 0.02
    assert r["attribution"][r["order"][0]] <= r["attribution"].min() + 1e-6


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


def test_edit_curve_and_ce(model):
    ps = make_pronoun(model.tokenizer, n=8, seed=0)
    text = model.to_tokens(["The jury said it did find that many of the election laws are outmoded."])
    assert ce_loss(model, text, HOOK, lambda a: a) == pytest.approx(ce_loss(model, text), abs=1e-5)
    d = random_directions(model.cfg.d_model, 64, hook_name=HOOK)
    r = edit_curve(model, ps, text, HOOK, d, ks=(1, 8))
    assert len(r["points"]) == 2 and all(torch.isfinite(torch.tensor(p["ce_increase"])) for p in r["points"])


def test_bad_hooks(model, ioi):
    with pytest.raises(ValueError, match="layer 40 is beyond the model's 30 layers"):
        patch_curve(model, ioi, "blocks.40.hook_resid_post", neuron_basis(model.cfg.d_model), ks=(1,))
    with pytest.raises(ValueError, match="fitted on 'blocks.2.hook_resid_post', not 'blocks.3"):
        patch_curve(model, ioi, HOOK, neuron_basis(model.cfg.d_model, hook_name="blocks.2.hook_resid_post"), ks=(1,))
    with pytest.raises(ValueError, match="must come before"):
        upstream_features(model, ioi.tokens, "blocks.2.hook_resid_post", neuron_basis(576), 0, HOOK, neuron_basis(576))


def test_upstream_features_are_verified(model, ioi):
    up, down = neuron_basis(576, hook_name="blocks.1.hook_resid_post"), neuron_basis(576, hook_name=HOOK)
    res = upstream_features(model, ioi.tokens, HOOK, down, 7, "blocks.1.hook_resid_post", up, top=3)
    assert len(res) == 3 and all(abs(r["change"]) >= 0 for r in res)
    # the strongest attributed upstream feature measurably changes the downstream one
    assert abs(res[0]["change"]) > 1e-3


def test_plain_patching_by_layer(model, ioi):
    from helpers.patching import patch_positions_by_layer

    rows = patch_positions_by_layer(model, ioi, [0, model.cfg.n_layers - 1], progress=False)
    first, last = rows
    # layer 0: only the changed position differs, so patching it there is the whole counterfactual run
    assert first["changed"] == pytest.approx(1.0, abs=0.05) and abs(first["last"]) < 0.05
    # last layer: the last position's residual stream alone decides the logits
    assert last["last"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="outside the model"):
        patch_positions_by_layer(model, ioi, [model.cfg.n_layers], progress=False)


def test_captured_share(model, ioi):
    from helpers.patching import captured_share

    assert captured_share(neuron_basis(model.cfg.d_model, hook_name=HOOK), model, ioi, HOOK) == pytest.approx(1.0, abs=1e-4)
    few = random_directions(model.cfg.d_model, 16, hook_name=HOOK)  # 8 directions of 576: a small share
    share = captured_share(few, model, ioi, HOOK)
    assert -0.5 < share < 0.5
    assert patch_curve(model, ioi, HOOK, few, ks=(1,))["captured"] == pytest.approx(share, abs=1e-5)
    with pytest.raises(ValueError, match="fitted on"):
        captured_share(neuron_basis(model.cfg.d_model, hook_name="blocks.2.hook_resid_post"), model, ioi, HOOK)
