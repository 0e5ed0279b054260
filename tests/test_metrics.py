"""Metrics: FVU / L0 / dead on known cases, MMCS, PCA, and CE-loss recovered in the real model."""
import pytest
import torch

from helpers.metrics import mmcs, pca_fvu, reconstruction_metrics, spliced_loss
from helpers.sae import SAEConfig, SAEStack


def identity_sae(d):
    sae = SAEStack([SAEConfig(d, 2 * d)])
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_dec.copy_(torch.cat([eye, -eye])[None])
        sae.W_enc.copy_(torch.cat([eye, -eye])[None])
    return sae


def test_reconstruction_metrics_known_cases():
    x = torch.randn(500, 6)
    perfect = reconstruction_metrics(identity_sae(6), x)[0]
    assert perfect["fvu"] < 1e-10 and perfect["mse"] < 1e-10
    assert 5.5 < perfect["l0"] < 6.5  # each coordinate fires one of its two (±) latents
    assert perfect["dead"] == 0 and perfect["dense"] == 1.0
    silent = SAEStack([SAEConfig(6, 12)])
    with torch.no_grad():
        silent.b_enc.fill_(-1e4)
    m = reconstruction_metrics(silent, x)[0]
    assert m["l0"] == 0 and m["dead"] == 1.0 and abs(m["fvu"] - 1 - (x.mean(0).pow(2).sum() * 500 / (x - x.mean(0)).pow(2).sum())) < 1e-4


def test_mmcs():
    a = torch.randn(20, 8)
    assert mmcs(a, a) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(a, a[torch.randperm(20)] * 3) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(torch.eye(8)[:4], torch.eye(8)[4:]) == pytest.approx(0.0, abs=1e-6)


def test_pca_fvu():
    x = torch.randn(2000, 10) * torch.arange(1, 11)
    f = pca_fvu(x[:1500], x[1500:], [1, 5, 10])["all"]
    assert f[1] > f[5] > f[10] and f[10] < 1e-8
    assert 0.6 < f[1] < 0.95


def test_ce_recovered_identity_is_100_and_zero_is_0(model):
    tokens = model.to_tokens(["The cat sat on the mat because it was warm and soft.",
                              "When Mary and John went to the store, John gave a drink to Mary."])[:, :12]
    hook = "blocks.3.hook_resid_post"
    out = spliced_loss(model, tokens, hook, lambda x: torch.stack([x, torch.zeros_like(x), x + 0.0]))
    assert out["ce_recovered"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["ce_recovered"][1] == pytest.approx(0.0, abs=1e-4)
    assert out["kl_sae"][0] == pytest.approx(0.0, abs=1e-4)
    assert out["ce_zero"] > out["ce_clean"] and out["kl_zero"] > 0
    assert out["ce_recovered_mean"][0] == pytest.approx(1.0, abs=1e-4)
