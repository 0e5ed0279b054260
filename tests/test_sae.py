"""SAE models against hand-written references; SAELens files."""
import json

import pytest
import torch

from helpers.sae import SAEConfig, SAEStack, load_saelens, save_saelens

D, M = 12, 30


def randomised(configs, seed=0):
    sae = SAEStack(configs, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.normalize_decoder()
        sae.scale.fill_(1.7)
    return sae


def reference_losses(x, W_enc, W_dec, b_enc, b_dec, scale, alpha):
    xs = x * scale
    c = torch.relu((xs - b_dec) @ W_enc + b_enc)
    xhat = c @ W_dec + b_dec
    mse = (xhat - xs).pow(2).sum(-1).mean() / x.shape[1]
    l1 = alpha * (c.abs() * W_dec.norm(dim=-1)).sum(-1).mean()
    return mse, l1, c


@pytest.mark.parametrize("tied", [False, True])
def test_forward_backward_match_reference(tied):
    alphas = [1e-3, 5e-2]
    sae = randomised([SAEConfig(D, M, tied=tied, l1_coefficient=a) for a in alphas])
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    out = sae.losses(x)
    (out["loss"].sum()).backward()
    for i, a in enumerate(alphas):
        W_dec = sae.W_dec[i].detach().clone().requires_grad_()
        W_enc_rows = None if tied else sae.W_enc[i].detach().clone().requires_grad_()  # [M, D]: a row per latent
        W_enc = W_dec.T if tied else W_enc_rows.T
        b_enc = sae.b_enc[i].detach().clone().requires_grad_()
        b_dec = sae.b_dec[i].detach().clone().requires_grad_()
        mse, l1, c = reference_losses(x, W_enc, W_dec, b_enc, b_dec, 1.7, a)
        assert torch.allclose(out["mse"][i], mse, rtol=1e-5) and torch.allclose(out["l1"][i], l1, rtol=1e-5)
        assert torch.allclose(sae.encode(x)[i], c, atol=1e-5)
        assert torch.allclose(sae(x)[i], (c @ W_dec + b_dec) / 1.7, atol=1e-5)
        (mse + l1).backward()
        assert torch.allclose(sae.W_dec.grad[i], W_dec.grad, atol=1e-5)
        assert torch.allclose(sae.b_enc.grad[i], b_enc.grad, atol=1e-5)
        assert torch.allclose(sae.b_dec.grad[i], b_dec.grad, atol=1e-5)
        if not tied:
            assert torch.allclose(sae.W_enc.grad[i], W_enc_rows.grad, atol=1e-5)
    assert (sae.W_enc is None) == tied


def test_topk_keeps_exactly_k_and_aux_loss():
    sae = randomised([SAEConfig(D, M, architecture="topk", k=k) for k in (3, 7)])
    x = torch.randn(50, D)
    c = sae.encode(x)
    pre = torch.relu(sae.pre_acts(x))
    for i, k in enumerate((3, 7)):
        assert ((c[i] > 0).sum(-1) <= k).all() and ((c[i] > 0).sum(-1) == k).float().mean() > 0.9
        top = pre[i].topk(k, dim=-1)
        assert torch.allclose(c[i].gather(-1, top.indices), top.values)
    assert torch.equal(sae.losses(x)["aux"], torch.zeros(2))
    dead = torch.zeros(2, M, dtype=torch.bool)
    dead[0, :10] = True
    aux = sae.losses(x, dead=dead)["aux"]
    assert aux[0] > 0 and aux[1] == 0


def test_unit_norm_projection():
    sae = randomised([SAEConfig(D, M)])
    sae.losses(torch.randn(20, D))["loss"].sum().backward()
    sae.remove_parallel_grads()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(1, M), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(1, M), atol=1e-6)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="α must be"):
        SAEConfig(D, M, l1_coefficient=-1e-3)
    with pytest.raises(ValueError, match="ratio R must be > 0"):
        SAEConfig.from_ratio(D, 0)
    with pytest.raises(ValueError, match="ratio R must be > 0"):
        SAEConfig.from_ratio(D, -2)
    with pytest.raises(ValueError, match="topk needs"):
        SAEConfig(D, M, architecture="topk", k=0)
    with pytest.raises(ValueError, match="unknown architecture"):
        SAEConfig(D, M, architecture="gated")


def test_wrong_d_model_is_explained():
    sae = SAEStack([SAEConfig(D, M, hook_name="blocks.3.hook_resid_post")])
    with pytest.raises(ValueError, match="d_model=7, but this SAE has d_in=12.*blocks.3"):
        sae.encode(torch.randn(4, 7))


@pytest.mark.parametrize("cfg", [SAEConfig(D, M, l1_coefficient=1e-3), SAEConfig(D, M, tied=True),
                                 SAEConfig(D, M, architecture="topk", k=5)])
def test_save_load_identical_outputs(tmp_path, cfg):
    sae = randomised([cfg])
    save_saelens(sae, tmp_path / "sae")
    again = load_saelens(tmp_path / "sae")
    x = torch.randn(40, D) * 3
    assert torch.allclose(again(x), sae(x), atol=1e-5)
    assert torch.allclose(again.encode(x), sae.encode(x), atol=1e-5)
    on_disk = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert on_disk["architecture"] == cfg.architecture and on_disk["d_sae"] == M
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (D, M) and w["W_dec"].shape == (M, D)


def test_saelens_unknown_architecture(tmp_path):
    sae = randomised([SAEConfig(D, M)])
    save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["architecture"] = "jumprelu"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'jumprelu' is not supported"):
        load_saelens(tmp_path / "sae")


def test_saelens_file_without_b_dec_on_input(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    W_enc, W_dec = torch.randn(D, M, generator=g), torch.randn(M, D, generator=g)
    b_enc, b_dec = torch.randn(M, generator=g), torch.randn(D, generator=g)
    (tmp_path / "s").mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": D, "d_sae": M,
                                                          "apply_b_dec_to_input": False}))
    sae = load_saelens(tmp_path / "s")
    x = torch.randn(10, D, generator=g)
    c = torch.relu(x @ W_enc + b_enc)  # SAELens's formula when b_dec is not applied to the input
    assert torch.allclose(sae.encode(x)[0], c, atol=1e-4)
    assert torch.allclose(sae(x)[0], c @ W_dec + b_dec, atol=1e-4)


def test_recipe_is_checked_on_load(tmp_path):
    improved = randomised([SAEConfig(D, M, l1_coefficient=1e-3, recipe="improved")])
    save_saelens(improved, tmp_path / "imp")
    assert load_saelens(tmp_path / "imp", recipe="improved").recipe == "improved"
    with pytest.raises(ValueError, match="trained with the 'improved' recipe, not 'anthropic2023'"):
        load_saelens(tmp_path / "imp", recipe="paper")
    # a training checkpoint (state dict) of one recipe cannot be loaded into an SAE of the other
    paper = SAEStack([SAEConfig(D, M, l1_coefficient=1e-3)])
    with pytest.raises(ValueError, match="trained with the 'improved' recipe but are being loaded into a 'anthropic2023'"):
        paper.load_state_dict(improved.state_dict())
    with pytest.raises(ValueError, match="improved recipe is for untied"):
        SAEConfig(D, M, architecture="topk", k=3, recipe="improved")


def test_fold_decoder_norms_keeps_every_reconstruction():
    sae = randomised([SAEConfig(D, M, l1_coefficient=1e-3, recipe="improved")] * 2)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(2, M, 1) * 3 + 0.1)  # free row norms, as the improved recipe trains them
    x = torch.randn(30, D)
    before, codes = sae(x), sae.encode(x)
    penalty = (codes * sae.W_dec.norm(dim=-1).unsqueeze(1)).sum(-1)
    sae.fold_decoder_norms()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(2, M), atol=1e-5)
    assert torch.allclose(sae(x), before, atol=1e-4)
    assert torch.allclose(sae.encode(x).sum(-1), penalty, rtol=1e-4)  # the weighted L1 is now a plain L1


def test_improved_recipe_initialisation():
    sae = SAEStack([SAEConfig(D, M, l1_coefficient=1e-3, recipe="improved")])
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((1, M), 0.1), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.unit_norm  # W_enc = W_decᵀ (a row per latent)
