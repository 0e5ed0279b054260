"""Massive activations: the rule, its treatment inside SAEs and baselines, and bad input."""
import math

import numpy as np
import pytest
import torch

from helpers.activations import massive
from helpers.dictionaries.dictionary import neuron_basis
from helpers.evals.reconstruction import reconstruction_metrics, split_fvu
from helpers.saes.stack import SAEConfig, SAEStack

HOOK = "blocks.0.hook_resid_post"
D = 16


def data(n=2048, share=0.05, size=60.0, seed=0):
    """Ordinary Gaussian tokens plus a share of huge ones: a fixed vector along dimension 3 plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    idx = torch.randperm(n, generator=g)[: int(share * n)]
    x[idx, 3] += size
    return x, idx


def test_rule_finds_the_massive_tokens(array_store):
    x, idx = data()
    store = array_store(x)
    rule = massive.fit(store, HOOK)
    flags = massive.flags(store, HOOK, rule)
    assert set(np.flatnonzero(flags)) == set(idx.tolist())
    assert rule.share == pytest.approx(len(idx) / len(x))
    assert rule.variance_share > 0.8 and rule.top_dims[0][0] == 3
    assert torch.allclose(rule.offset, x[idx].mean(0), atol=1e-2)  # the store holds float16
    assert "carry" in rule.note
    again = massive.fit(store, HOOK)  # cached in the store folder
    assert (store.path / "massive.json").exists() and again.threshold == rule.threshold
    assert again.cosine == pytest.approx(rule.cosine) and rule.cosine > 0.99 and again.top_dims == rule.top_dims
    shifted = rule.shift(x)
    assert shifted.norm(dim=-1).max() < 3 * x.norm(dim=-1).median()


def test_a_layer_with_no_massive_token_gets_an_inert_rule_and_a_note(array_store):
    x, _ = data(share=0.0)
    rule = massive.fit(array_store(x), HOOK)
    assert not rule.any and rule.share == 0 and "no massive activations" in rule.note
    assert torch.equal(rule.shift(x), x)
    m = split_fvu(torch.ones(len(x)), x, rule.flags(x))
    assert m["fvu_massive"] is None and m["fvu"] == pytest.approx(m["fvu_ordinary"])


def test_a_rule_that_flags_every_token_is_refused(array_store):
    x, _ = data()
    store = array_store(x)
    with pytest.raises(massive.MassiveError, match="every token .* would be flagged"):
        massive.fit(store, HOOK, factor=0.01)
    with pytest.raises(massive.MassiveError, match="must be positive"):
        massive.fit(store, HOOK, factor=0)


def test_sae_and_baselines_see_the_shifted_activations(array_store):
    x, idx = data()
    rule = massive.fit(array_store(x), HOOK)
    sae = SAEStack([SAEConfig(D, 32)])
    sae.set_massive(rule)
    plain = SAEStack([SAEConfig(D, 32)])
    # the codes of a massive token are those of its shifted activation
    assert torch.allclose(sae.encode(x[idx]), plain.encode(x[idx] - rule.offset), atol=1e-5)
    # and the reconstruction adds the offset back
    assert torch.allclose(sae(x[idx]), plain(x[idx] - rule.offset) + rule.offset, atol=1e-4)
    nb = neuron_basis(D, massive=rule)
    assert torch.allclose(nb.signed_codes(x[idx]), x[idx] - rule.offset, atol=1e-5)


def test_metrics_split_ordinary_and_massive_tokens(array_store):
    x, idx = data()
    rule = massive.fit(array_store(x), HOOK)
    sae = SAEStack([SAEConfig(D, 2 * D)])
    with torch.no_grad():
        eye = torch.eye(D)
        sae.W_dec.copy_(torch.cat([eye, -eye])[None])
        sae.W_enc.copy_(torch.cat([eye, -eye])[None])
    sae.set_massive(rule)
    m = reconstruction_metrics(sae, x)[0]
    assert m["fvu"] < 1e-8 and m["fvu_ordinary"] < 1e-8 and m["fvu_massive"] < 1e-8
    assert m["massive_share"] == pytest.approx(len(idx) / len(x))
    # a silent SAE explains nothing of the ordinary tokens, but the offset alone explains most of the
    # variance over all tokens: exactly why both numbers are reported
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
        sae.b_dec.copy_(x[~rule.flags(x)].mean(0))
    m = reconstruction_metrics(sae, x)[0]
    assert m["fvu_ordinary"] == pytest.approx(1.0, abs=0.01) and m["fvu"] < 0.3


def test_training_applies_the_rule_and_saves_it(array_store, tmp_path):
    from helpers.saes.stack import load_saelens, save_saelens
    from helpers.saes.train import TrainConfig, train_sweep

    x, idx = data()
    store = array_store(x)
    tc = TrainConfig(total_tokens=2048 * 2, batch_size=256, device="cpu", warmup_steps=2)
    res = train_sweep(store, HOOK, [SAEConfig(D, 32, l1_coefficient=1e-3)], tc, progress=False)
    sae = res.saes[0]
    assert math.isfinite(float(sae.massive_threshold[0])) and res.rules[HOOK].any
    save_saelens(sae, tmp_path / "s")
    again = load_saelens(tmp_path / "s")
    assert torch.allclose(again(x), sae(x), atol=1e-4)
    off = train_sweep(store, HOOK, [SAEConfig(D, 32, l1_coefficient=1e-3)],
                      TrainConfig(**{**tc.__dict__, "massive": False}), progress=False)
    assert not math.isfinite(float(off.saes[0].massive_threshold[0]))


def test_the_tensor_rule_is_the_store_rule(array_store):
    """fit_tensor on activations gives the store's rule on the same activations: exactly with one shard
    (the same single pass), to rounding with several."""
    x, idx = data()
    x = x.half().float()  # what the store holds
    one = massive.fit(array_store(x, shard_tokens=len(x), name="one"), HOOK)
    rule = massive.fit_tensor(x, hook=HOOK)
    assert massive.Massive.to_json(rule) == massive.Massive.to_json(one)
    assert set(torch.nonzero(rule.flags(x))[:, 0].tolist()) == set(idx.tolist())
    many = massive.fit(array_store(x, shard_tokens=300, name="many"), HOOK)
    assert many.threshold == rule.threshold and many.share == rule.share
    assert torch.allclose(many.offset, rule.offset) and many.variance_share == pytest.approx(rule.variance_share)
    assert massive.fit(x, HOOK).to_json() == rule.to_json()  # fit on a tensor is fit_tensor
    wide = massive.fit_tensor(x, factor=1e6)
    assert not wide.any and "no massive activations" in wide.note
    with pytest.raises(massive.MassiveError, match="every token"):
        massive.fit_tensor(x, factor=0.01)
    with pytest.raises(massive.MassiveError, match="must be positive"):
        massive.fit_tensor(x, factor=-1)


def test_the_rule_is_a_typed_result_and_names_its_tokens(array_store):
    """A rule round-trips through JSON and says its verdicts; massive_tokens on tensors names the
    massive tokens, as describe does on a store; report gathers both for every hook."""
    x, idx = data()
    rule = massive.fit_tensor(x, hook=HOOK)
    again = massive.Massive.from_dict(rule.to_dict())
    assert torch.equal(again.offset, rule.offset) and again.top_dims == rule.top_dims
    assert again.to_json() == rule.to_json()
    assert "dimension 3" in rule.verdicts()[1] and rule.note in str(rule)
    assert rule.to_frame()["tokens massive"].item() == pytest.approx(len(idx) / len(x))
    inert = massive.fit_tensor(data(share=0.0)[0], hook=HOOK)
    assert inert.verdicts() == [inert.note]
    ids = torch.arange(len(x)) % 7          # token ids; the massive rows get token 99 where idx is even
    ids[idx[::2]] = 99
    positions = torch.arange(len(x)) % 8
    found = massive.massive_tokens(rule.flags(x), ids, positions, hook=HOOK)
    assert found.n == len(idx) and found.tokens[0] == ("99", len(idx[::2]), 1.0)
    assert found.first_position_share == pytest.approx((positions[idx] == 0).float().mean().item())
    assert massive.MassiveTokens.from_dict(found.to_dict()).rows() == found.rows()
    store = array_store(x)  # its token ids are the row numbers; contexts of 8 tokens
    described = massive.describe(store, HOOK, massive.fit(store, HOOK))
    assert described.n == len(idx) and all(n == 1 and s == 1.0 for _, n, s in described.tokens)
    assert described.first_position_share == pytest.approx(found.first_position_share)
    report = massive.report(store)
    assert list(report.rules) == [HOOK] and report.tokens[HOOK] == described
    assert report.rules[HOOK].to_json() == massive.fit(store, HOOK).to_json()
    back = massive.MassiveReport.from_dict(report.to_dict())
    assert back.tokens[HOOK] == described and torch.equal(back.rules[HOOK].offset, report.rules[HOOK].offset)
    assert "most often massive" in str(report) and len(report.to_frame()) == 1
