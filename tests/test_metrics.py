"""Metrics: FVU / L0 / dead on known cases, MMCS, PCA, and CE-loss recovered in the real model."""
import pytest
import torch

from helpers.evals.reconstruction import mmcs, pca_fvu, reconstruction_metrics, spliced_loss
from helpers.saes.stack import SAEConfig, SAEStack


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
    # A random (imperfect) SAE: FVU, MSE and L0 against a computation by hand.
    rnd = SAEStack([SAEConfig(6, 12)], seed=3)
    with torch.no_grad():
        rnd.b_enc.fill_(0.1)
        rnd.b_dec.copy_(torch.randn(1, 6))
        xhat = rnd(x)[0]
        c = rnd.encode(x)[0]
    m = reconstruction_metrics(rnd, x, batch_size=64)[0]
    err = (xhat - x).pow(2).sum(-1)
    assert m["mse"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert m["fvu"] == pytest.approx(float(err.sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert m["l0"] == pytest.approx(float((c > 0).sum(-1).float().mean()), rel=1e-6)
    assert 0.05 < m["fvu"] < 50 and m["fvu"] != pytest.approx(1.0, abs=0.05)
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
    f = pca_fvu(x[:1500], x[1500:], [1, 5, 10]).all
    assert f[1] > f[5] > f[10] and f[10] < 1e-8
    assert 0.6 < f[1] < 0.95


def _ce_by_hand(model, tokens, hook, patch=None):
    """Next-token CE (nats/token) over the positions spliced_loss scores, computed independently:
    the logits at positions 1..T-2 predict tokens 2..T-1 (position 0 is BOS, whose activation is kept)."""
    def fn(act, hook):
        new = act.clone()
        if patch is not None:
            new[:, 1:] = patch(act[:, 1:])
        return new
    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)]).float()
    logp = logits.log_softmax(-1)
    return float(-logp[:, 1:-1].gather(-1, tokens[:, 2:, None]).mean())


def test_spliced_loss_against_an_independent_computation(model):
    """Each CE of spliced_loss (clean, zero- and mean-ablated, an SAE-like reconstruction) equals the
    same CE computed here by hand: misaligned logits/targets, a wrong ablation reference, or a
    reconstruction not spliced at the right positions would all show."""
    tokens = model.to_tokens(["The cat sat on the mat because it was warm and soft.",
                              "When Mary and John went to the store, John gave a drink to Mary."])[:, :12]
    hook = "blocks.3.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    d = model.cfg.d_model
    mean = torch.randn(d, generator=g)                    # a mean-ablation reference that is not the batch mean
    w = torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)

    def recon(x):                                          # two "SAEs": a distortion, and 0.5 x
        return torch.stack([x @ w, 0.5 * x])

    out = spliced_loss(model, tokens, hook, recon, mean_act=mean)
    with torch.no_grad():
        clean = _ce_by_hand(model, tokens, hook)
        zero = _ce_by_hand(model, tokens, hook, lambda a: torch.zeros_like(a))
        meaned = _ce_by_hand(model, tokens, hook, lambda a: mean.to(a).expand_as(a))
        sae0 = _ce_by_hand(model, tokens, hook, lambda a: a @ w.to(a))
        sae1 = _ce_by_hand(model, tokens, hook, lambda a: 0.5 * a)
    assert out["ce_clean"] == pytest.approx(clean, rel=1e-4)
    assert out["ce_zero"] == pytest.approx(zero, rel=1e-4)
    assert out["ce_mean"] == pytest.approx(meaned, rel=1e-4)
    assert out["ce_sae"] == pytest.approx([sae0, sae1], rel=1e-4)
    assert len({round(v, 3) for v in (clean, zero, meaned, sae0, sae1)}) == 5  # the cases really differ
    assert out["ce_recovered"][1] == pytest.approx((zero - sae1) / (zero - clean), rel=1e-4)
    assert out["ce_recovered_mean"][1] == pytest.approx((meaned - sae1) / (meaned - clean), rel=1e-4)
    # Without mean_act the reference is the mean activation of the spliced positions of the batch.
    captured = {}

    def capture(act, hook):
        captured["x"] = act[:, 1:].clone()
        return act

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook, capture)])
    batch_mean = captured["x"].float().mean((0, 1))
    default = spliced_loss(model, tokens, hook, recon)
    with torch.no_grad():
        assert default["ce_mean"] == pytest.approx(
            _ce_by_hand(model, tokens, hook, lambda a: batch_mean.to(a).expand_as(a)), rel=1e-4)
