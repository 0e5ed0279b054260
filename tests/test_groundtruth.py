"""The ground-truth lab (helpers.saes.groundtruth): the generator's promises, the scores on known answers,
and a TopK SAE that recovers planted features."""
import math

import numpy as np
import pytest
import torch

from helpers.saes.groundtruth import (SETTINGS, SyntheticConfig, absorption, generate, lab_train_config, match,
                                 mmcs_to_truth, precision_recall, score_saes, setting_config, train_on_tensor,
                                 true_directions, untrained_reference)
from helpers.saes.stack import SAEConfig

SMALL = SyntheticConfig(d=32, n_features=96, mean_l0=4.0, seed=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one torch thread (two made them many times slower on a shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_generator_shapes_and_truth(setting):
    cfg = setting_config(setting, SMALL)
    data = generate(cfg, 5000)
    assert data.x.shape == (5000, cfg.d) and data.x.dtype == torch.float32
    assert data.codes.shape == (5000, cfg.n_features) and data.codes.is_sparse
    assert torch.allclose(data.directions.norm(dim=-1), torch.ones(cfg.n_features), atol=1e-5)
    codes = data.dense_codes()
    assert (codes >= 0).all()
    assert torch.allclose(codes @ data.directions, data.x, atol=1e-4)  # x is exactly the truth's sum
    # the measured L0 is the expected one (5000 samples: Poisson-ish standard error < 0.05)
    assert abs(data.true_l0 - cfg.expected_l0()) < 0.15
    # the training and evaluation streams differ; the same stream repeats
    assert not torch.equal(generate(cfg, 5000, stream=1).x, data.x)
    assert torch.equal(generate(cfg, 5000).x, data.x)


def test_hierarchy_never_fires_a_child_without_its_parent():
    cfg = setting_config("hierarchy", SMALL)
    cfg = SyntheticConfig(**{**cfg.__dict__, "n_parents": 8, "n_children": 3, "child_prob": 0.9})
    for exclusive in (True, False):
        c = SyntheticConfig(**{**cfg.__dict__, "exclusive_children": exclusive})
        on = generate(c, 20_000).dense_codes() > 0
        parent = c.parent_of()
        kids = (parent >= 0).nonzero().flatten()
        assert len(kids) == 24
        child_on, parent_on = on[:, kids], on[:, parent[kids]]
        assert child_on.any(0).all()                       # every child does fire...
        assert not (child_on & ~parent_on).any()           # ...but never without its parent
        per_parent = on[:, kids].view(-1, 8, 3).sum(-1)
        if exclusive:
            assert per_parent.max() == 1                   # mutually exclusive children
        else:
            assert per_parent.max() > 1
        # given the parent, a child fires at the configured rate
        rate = float(child_on.any(1).float().sum() / on[:, :8].any(1).float().sum())
        assert rate > 0.5


def test_correlated_features_co_fire_more_with_the_same_frequencies():
    base = SyntheticConfig(d=32, n_features=96, mean_l0=4.0, seed=2)
    corr = setting_config("correlated", base)
    on_b = generate(base, 30_000).dense_codes() > 0
    on_c = generate(corr, 30_000).dense_codes() > 0
    assert abs(on_b.float().mean() - on_c.float().mean()) < 0.003   # marginals kept (p ≈ 0.042)

    def same_group_cofiring(on):
        g = on[:, :corr.group_size].float()
        return float((g.T @ g).fill_diagonal_(0).sum() / (g.sum() + 1))
    assert same_group_cofiring(on_c) > 5 * same_group_cofiring(on_b)


def test_zipf_frequencies_decrease():
    cfg = setting_config("zipf", SMALL)
    p = cfg.frequencies()
    assert (p[1:] <= p[:-1]).all() and p[0] > 20 * p[-1]
    assert abs(float(p.sum()) - cfg.mean_l0) < 1e-6
    observed = (generate(cfg, 20_000).dense_codes() > 0).float().mean(0)
    # the empirical frequencies follow: top decile fires far more than the bottom one
    assert observed[:10].mean() > 10 * observed[-10:].mean()
    assert abs(float(observed[0]) - float(p[0])) < 0.02


def test_mmcs_of_truth_is_one_and_of_random_directions_low():
    truth = true_directions(SyntheticConfig(d=64, n_features=256))
    assert mmcs_to_truth(truth, truth) == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(5)
    rand = torch.randn(256, 64, generator=g)
    assert mmcs_to_truth(truth, rand) < 0.5            # measured ≈ 0.4 in 64 dimensions
    # a permuted, rescaled copy is still the same dictionary
    assert mmcs_to_truth(truth, 3 * truth[torch.randperm(256, generator=g)]) == pytest.approx(1.0, abs=1e-5)


def test_matched_mcc_of_true_codes_is_one_and_matching_undoes_a_permutation():
    data = generate(SMALL, 4000)
    codes = data.dense_codes()
    perm = torch.randperm(SMALL.n_features, generator=torch.Generator().manual_seed(3))
    latents = 2.5 * codes[:, perm]                      # latent j = feature perm[j], rescaled
    m, corr = match(latents, codes)
    assert corr.mean() == pytest.approx(1.0, abs=1e-9)
    assert (perm[torch.as_tensor(m)] == torch.arange(SMALL.n_features)).all()
    prec, rec = precision_recall(latents > 0, codes > 0, m)
    assert np.allclose(prec, 1) and np.allclose(rec, 1)
    # independent noise as latents: matched correlation near 0
    _, corr = match(torch.rand(4000, SMALL.n_features, generator=torch.Generator().manual_seed(4)), codes)
    assert corr.mean() < 0.1


def test_absorption_on_a_planted_example():
    """Parent 0 with children 1 and 2. Over 10 samples the parent fires in 8: with child 1 in 3,
    child 2 in 1, alone in 4. The 'learned' latents copy the truth, except that the parent's latent
    is silent whenever child 1 fires (absorbed), in one of the alone samples (a plain miss, which is
    not absorption) and in another where child 2's latent fires without child 2 (a false alarm of
    the child's latent, not absorption either). Absorption = 3 / 8 over the parent's firings, 3 / 4
    over those with a child."""
    true = torch.zeros(10, 3, dtype=torch.bool)
    true[:8, 0] = True
    true[0:3, 1] = True
    true[3, 2] = True
    lat = true.clone()
    lat[0:3, 0] = False          # absorbed into child 1's latent
    lat[7, 0] = False            # missed, no child: not absorption
    lat[4, 0] = False
    lat[4, 2] = True             # parent missed, child 2's latent fires but child 2 does not: not absorption
    matched = np.array([0, 1, 2])
    out = absorption(lat, true, matched, {0: [1, 2]})
    assert out["absorption"] == pytest.approx(3 / 8)
    assert out["absorption_child"] == pytest.approx(3 / 4)
    # chance-corrected: silent in 3 of the 4 firings with a detected child, in 2 of the 4 without one
    assert out["absorption_excess"] == pytest.approx(3 / 4 - 2 / 4)
    # the same with the latents in another order (matching, not position, decides)
    out = absorption(lat[:, [2, 0, 1]], true, np.array([1, 2, 0]), {0: [1, 2]})
    assert out["absorption"] == pytest.approx(3 / 8)
    # a faithful SAE: none
    faithful = absorption(true, true, matched, {0: [1, 2]})
    assert faithful["absorption"] == faithful["absorption_child"] == faithful["absorption_excess"] == 0


def test_topk_recovers_features_on_the_easy_setting():
    """A TopK SAE on the baseline setting (small: d=32, 96 features, L0 4) for 60k tokens recovers the
    dictionary; an untrained one of the same config does not. Measured: trained MMCS 0.93, matched
    MCC 0.68, FVU 0.25; untrained MMCS 0.44, MCC 0.24, FVU 0.69 (thresholds with margin)."""
    train, ev = generate(SMALL, 60_000), generate(SMALL, 4000, stream=1)
    cfg = SAEConfig(SMALL.d, SMALL.n_features, architecture="topk", k=4)
    (sae,) = train_on_tensor(train.x, [cfg], tc=lab_train_config(60_000, batch_size=256), progress=False)
    trained, = score_saes([sae], ev)
    chance, = score_saes([untrained_reference(cfg, train.x)], ev)
    assert trained["mmcs"] > 0.8 and trained["mcc"] > 0.5
    assert trained["mmcs"] > chance["mmcs"] + 0.3 and trained["mcc"] > chance["mcc"] + 0.25
    assert trained["fvu"] < 0.4 and chance["fvu"] > 0.6
    assert 3.5 < trained["l0"] <= 4.0    # TopK: at most k (a pre-activation can be <= 0)


def test_training_any_list_of_configs_groups_stacks_and_keeps_order():
    data = generate(SMALL, 4096)
    configs = [SAEConfig(SMALL.d, 64, l1_coefficient=0.05, recipe="improved"),
               SAEConfig(SMALL.d, 64, architecture="topk", k=3),
               SAEConfig(SMALL.d, 64, l1_coefficient=0.03, recipe="improved"),
               SAEConfig(SMALL.d, 64, l1_coefficient=0.05)]
    saes = train_on_tensor(data.x, configs, tc=lab_train_config(2048, batch_size=256), progress=False)
    assert [s.configs[0] for s in saes] == configs
    for s in saes:  # every decoder unit norm at the end (the improved recipe's norms folded)
        assert torch.allclose(s.W_dec.norm(dim=-1), torch.ones(1, 64), atol=1e-4)
        assert s.scale[0] == pytest.approx(math.sqrt(SMALL.d) / float(data.x.norm(dim=-1).mean()), rel=1e-5)
    rows = score_saes(saes, generate(SMALL, 1000, stream=1))
    assert [r["family"] for r in rows] == ["improved L1", "TopK", "improved L1", "Anthropic-2023 L1"]
    assert all(0 <= r["mmcs"] <= 1 and -1 <= r["mcc"] <= 1 for r in rows)


def test_run_lab_rows():
    """The runner end to end on a tiny budget: one row per config and setting plus the reference,
    one config per family marked nearest the true L0, absorption columns only for the hierarchy."""
    from helpers.saes.groundtruth import run_lab, table

    configs = lambda d, l0, m: [SAEConfig(d, m, architecture="topk", k=max(1, round(l0))),  # noqa: E731
                                SAEConfig(d, m, l1_coefficient=0.03, recipe="improved"),
                                SAEConfig(d, m, l1_coefficient=0.06, recipe="improved")]
    lab = run_lab(("baseline", "hierarchy"), configs, base=SMALL, train_tokens=4096, eval_samples=1000,
                  progress=False)
    rows = lab.rows_
    assert len(lab) == 2 * 4 and lab.settings == ["baseline", "hierarchy"]
    assert [r.setting for r in rows] == ["baseline"] * 4 + ["hierarchy"] * 4
    for setting in ("baseline", "hierarchy"):
        mine = [r for r in rows if r.setting == setting]
        assert [r.nearest_l0 for r in mine].count(True) == 2          # TopK, and one of the two α's
        assert mine[-1].family == "untrained (reference)" and mine[-1].nearest_l0 is None
        assert all(("absorption_excess" in r.to_dict()) == (setting == "hierarchy") for r in mine)
        assert lab.row(setting, "untrained") is mine[-1] and lab.row(setting, "TopK").architecture == "topk"
    assert abs(rows[-1].absorption_excess) < 0.15                     # chance: no excess
    text = table(lab)  # a header and 3 rows per setting
    assert text.count("\n") == 2 * 3 and "absorption_excess" in text
    shown = lab.to_frame()  # the same rows and columns as the text table
    assert len(shown) == 2 * 3 and "absorption_excess" in shown.columns and "true_l0" not in shown.columns
    assert any(v.startswith("baseline: ") for v in lab.verdicts())
    back = type(lab).from_dict(lab.to_dict())
    assert back.rows_[0].mcc == rows[0].mcc and back.rows_[-1].absorption_excess == rows[-1].absorption_excess


def test_default_configs_cover_every_architecture():
    """A new architecture in the registry is trained by the lab too (or this fails until it is)."""
    from helpers.saes.architectures import ARCHITECTURES

    from helpers.saes.groundtruth import default_configs

    configs = default_configs(d=16, true_l0=3.2, d_sae=64)
    assert {c.architecture for c in configs} == set(ARCHITECTURES)
    assert {c.k for c in configs if c.architecture in ("topk", "batchtopk", "matryoshka_batchtopk")} == {3}


def test_default_configs_keep_the_lab_grids_and_order():
    """The registry-derived defaults are the lab's measured grids, in the lab's order."""
    from helpers.saes.groundtruth import (ANTHROPIC_ALPHAS, IMPROVED_ALPHAS, JUMPRELU_COEFFICIENTS,
                                          default_configs)

    common = dict(d_in=16, d_sae=64)
    assert default_configs(d=16, true_l0=3.2, d_sae=64) == (
        [SAEConfig(**common, architecture=a, k=3) for a in ("topk", "batchtopk", "matryoshka_batchtopk")]
        + [SAEConfig(**common, architecture="jumprelu", l0_coefficient=c) for c in JUMPRELU_COEFFICIENTS]
        + [SAEConfig(**common, l1_coefficient=a, recipe="improved") for a in IMPROVED_ALPHAS]
        + [SAEConfig(**common, l1_coefficient=a) for a in ANTHROPIC_ALPHAS])


@pytest.fixture
def halved():
    """An architecture registered by being defined, taken out of the registry when the test is done."""
    from helpers.saes import architectures

    class Halved(architectures.JumpReLU):
        name, family_name = "halved_jumprelu", "Halved JumpReLU"

        def default_setting(self, target_l0, i=0):
            return {"l0_coefficient": 0.02 * (1 + i)}

    yield Halved
    architectures.unregister(Halved.name)


def test_a_newly_registered_architecture_joins_the_lab(halved):
    """An architecture added to the registry is in the lab's defaults at its own default settings (after
    the known ones), and trains there, without any change to groundtruth."""
    from helpers.saes.groundtruth import default_configs

    configs = default_configs(d=SMALL.d, true_l0=4.0, d_sae=64)
    mine = [c for c in configs if c.architecture == "halved_jumprelu"]
    assert [c.l0_coefficient for c in mine] == [0.02, 0.04] and configs[-2:] == mine
    saes = train_on_tensor(generate(SMALL, 2048).x, mine, tc=lab_train_config(1024, batch_size=256), progress=False)
    assert [s.configs[0].family for s in saes] == ["Halved JumpReLU"] * 2


def test_positive_control_separates_a_trained_sae_from_random_directions():
    """The held-out concept score, with the planted features as concepts: a TopK SAE trained on the lab's
    data scores far above random directions at its sparsity; a dictionary of the planted directions
    themselves is the ceiling; the result round-trips through JSON."""
    from helpers.saes.groundtruth import PositiveControl, positive_control

    train, ev = generate(SMALL, 60_000), generate(SMALL, 4096, stream=1)
    cfg = SAEConfig(d_in=SMALL.d, d_sae=SMALL.n_features, architecture="topk", k=4)
    (sae,) = train_on_tensor(train.x, [cfg], tc=lab_train_config(60_000, batch_size=256), progress=False)
    out = positive_control(sae, ev, others={"untrained SAE": untrained_reference(cfg, train.x)}, setting="small",
                           n_boot=50)
    assert [r.method for r in out] == ["trained SAE", "untrained SAE", "random directions"]
    trained, untrained, rand = (out.row(m) for m in ("trained SAE", "untrained SAE", "random directions"))
    assert trained.mcc.value > rand.mcc.value + 0.2 and trained.mcc.value > untrained.mcc.value + 0.2
    assert out.difference.low > 0.2 and out.separates is True and "separates them clearly" in out.verdicts()[0]
    assert rand.median_active == pytest.approx(trained.median_active, rel=0.2)  # matched sparsity
    assert PositiveControl.from_dict(out.to_dict()).difference == out.difference
    # a wider margin than the gap: the verdict says so
    strict = PositiveControl(out.setting, out.rows_, out.difference, out.samples, margin=out.difference.high + 0.1)
    assert strict.separates is False and "does not separate" in strict.verdicts()[0]
