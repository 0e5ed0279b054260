"""SAE models against hand-written references; SAELens files."""
import dataclasses
import json
import re

import pytest
import torch

from helpers.saes import architectures
from helpers.saes.stack import SAEConfig, SAEStack, init_seed, load_saelens, save_saelens

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
    with pytest.raises(ValueError, match=r"unknown architecture 'gated': one of \['batchtopk', 'jumprelu', "
                                         r"'matryoshka_batchtopk', 'standard', 'topk'\]"):
        SAEConfig(D, M, architecture="gated")
    with pytest.raises(ValueError, match="unknown architecture 'TopK'"):
        architectures.get("TopK")
    for name in ("batchtopk", "matryoshka_batchtopk"):
        with pytest.raises(ValueError, match=f"{name} needs 0 < k"):
            SAEConfig(D, M, architecture=name, k=M + 1)
    with pytest.raises(ValueError, match="jumprelu needs a finite l0_coefficient >= 0"):
        SAEConfig(D, M, architecture="jumprelu", l0_coefficient=-1.0)
    with pytest.raises(ValueError, match="jumprelu needs a finite jumprelu_bandwidth > 0"):
        SAEConfig(D, M, architecture="jumprelu", jumprelu_bandwidth=0.0)
    with pytest.raises(ValueError, match="matryoshka_widths must increase"):
        SAEConfig(D, M, architecture="matryoshka_batchtopk", k=3, matryoshka_widths=(10, 5, M))
    with pytest.raises(ValueError, match="matryoshka_widths must increase"):
        SAEConfig(D, M, architecture="matryoshka_batchtopk", k=3, matryoshka_widths=(10, 20))
    for name in ("batchtopk", "jumprelu"):
        with pytest.raises(ValueError, match="improved recipe is for untied"):
            SAEConfig(D, M, architecture=name, k=3, recipe="improved")


def test_wrong_d_model_is_explained():
    sae = SAEStack([SAEConfig(D, M, hook_name="blocks.3.hook_resid_post")])
    with pytest.raises(ValueError, match="d_model=7, but this SAE has d_in=12.*blocks.3"):
        sae.encode(torch.randn(4, 7))


NEW = [SAEConfig(D, M, architecture="batchtopk", k=5), SAEConfig(D, M, architecture="jumprelu", l0_coefficient=1e-3),
       SAEConfig(D, M, architecture="matryoshka_batchtopk", k=5, matryoshka_widths=(6, 12, M))]


@pytest.mark.parametrize("cfg", [SAEConfig(D, M, l1_coefficient=1e-3), SAEConfig(D, M, tied=True),
                                 SAEConfig(D, M, architecture="topk", k=5), *NEW])
def test_save_load_identical_outputs(tmp_path, cfg):
    sae = randomised([cfg])
    if hasattr(sae, "threshold"):  # BatchTopK: a trained threshold, one that zeroes some ReLU codes
        sae.threshold.fill_(0.4)
    save_saelens(sae, tmp_path / "sae")
    again = load_saelens(tmp_path / "sae")
    x = torch.randn(40, D) * 3
    assert torch.allclose(again(x), sae(x), atol=1e-5)
    assert torch.allclose(again.encode(x), sae.encode(x), atol=1e-5)
    on_disk = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert on_disk["architecture"] == cfg.arch.saelens_architecture and on_disk["d_sae"] == M
    assert again.configs[0] == dataclasses.replace(cfg, tied=False)  # a tied SAE is saved as its two matrices
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (D, M) and w["W_dec"].shape == (M, D)
    if on_disk["architecture"] == "jumprelu":  # SAELens's formula from the file alone
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        assert w["threshold"].shape == (M,) and (w["threshold"] > 0).all()
        ref = torch.relu(pre) * (pre > w["threshold"])
        assert torch.allclose(sae.encode(x)[0], ref, atol=1e-5)
        assert 0 < (ref > 0).sum() < (pre > 0).sum()  # the threshold zeroes some positive codes


def test_jumprelu_file_from_elsewhere(tmp_path):
    """A SAELens JumpReLU SAE (no workbook block) loads as ours and gives SAELens's codes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    t = {"W_enc": torch.randn(D, M, generator=g), "W_dec": torch.randn(M, D, generator=g),
         "b_enc": torch.randn(M, generator=g), "b_dec": torch.randn(D, generator=g),
         "threshold": torch.rand(M, generator=g) * 2}
    (tmp_path / "s").mkdir()
    save_file(t, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D, "d_sae": M}))
    sae = load_saelens(tmp_path / "s")
    x = torch.randn(10, D, generator=g)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    assert sae.architecture == "jumprelu"
    assert torch.allclose(sae.encode(x)[0], torch.relu(pre) * (pre > t["threshold"]), atol=1e-4)


def test_saelens_unknown_architecture(tmp_path):
    sae = randomised([SAEConfig(D, M)])
    save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gated' does not fit the workbook's 'standard'"):
        load_saelens(tmp_path / "sae")
    del cfg["workbook"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'gated' is not supported here \(supported: \['jumprelu', 'standard', 'topk'\]\)"):
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


def test_old_configs_keep_their_seed_and_repr():
    """Fields added for the new architectures leave the seeds (and reprs, which seed resampling) of
    configs that do not use them as they were; setting one changes the seed."""
    import zlib

    old_fields = ("d_in", "d_sae", "architecture", "tied", "l1_coefficient", "k", "hook_name", "model_name", "recipe")
    for cfg in (SAEConfig(D, M, l1_coefficient=3e-3, hook_name="blocks.6.hook_resid_post"),
                SAEConfig(D, M, architecture="topk", k=5)):
        key = json.dumps({f: getattr(cfg, f) for f in old_fields}, sort_keys=True)
        assert init_seed(cfg, 7) == (7 * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)
        old_repr = "SAEConfig(" + ", ".join(f"{f}={getattr(cfg, f)!r}" for f in (*old_fields, "massive")) + ")"
        assert repr(cfg) == old_repr
    base = SAEConfig(D, M, architecture="jumprelu")
    assert init_seed(base) != init_seed(SAEConfig(D, M, architecture="jumprelu", l0_coefficient=1e-3))
    assert "l0_coefficient=0.001" in repr(SAEConfig(D, M, architecture="jumprelu", l0_coefficient=1e-3))


def test_labels_and_families():
    assert SAEConfig(D, M, architecture="batchtopk", k=5).label == "BatchTopK R=2.5 k=5"
    assert SAEConfig(D, M, architecture="jumprelu", l0_coefficient=2e-3).label == "JumpReLU R=2.5 λ=0.002"
    assert SAEConfig(D, M, architecture="matryoshka_batchtopk", k=4).family == "Matryoshka BatchTopK"
    assert SAEConfig(D, M, architecture="topk", k=4, massive=False).family == "TopK (no massive treatment)"
    assert SAEConfig(D, M, l1_coefficient=1e-3, recipe="improved").label == "improved L1 R=2.5 α=0.001"
    # default Matryoshka groups double: d_sae/16, /8, /4, /2, d_sae
    assert architectures.get("matryoshka_batchtopk").widths(SAEConfig(8, 64, architecture="matryoshka_batchtopk", k=2)) \
        == (4, 8, 16, 32, 64)


def test_jumprelu_codes_and_threshold_gradients():
    """codes = pre·H(pre − θ); the threshold gets the straight-through gradients of the paper, from
    the reconstruction and from the L0 penalty, on both paths (tests/test_sparse.py checks that the
    paths agree)."""
    cfg = SAEConfig(D, M, architecture="jumprelu", l0_coefficient=1e-2, jumprelu_bandwidth=0.05)
    sae = randomised([cfg])
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1))
    pre, theta = sae.pre_acts(x), sae.log_threshold.exp()
    c = sae.encode(x)
    assert torch.equal(c, pre * (pre > theta.unsqueeze(1)))
    assert 0 < (c > 0).sum() < (pre > 0).sum()
    eps = 0.05 * D ** 0.5
    window = ((pre - theta.unsqueeze(1)).abs() < eps / 2)
    assert window.any()
    for path in ("dense", "sparse"):
        sae.zero_grad(set_to_none=True)
        out = sae.losses(x, path=path)
        assert out["path"] == path
        assert torch.allclose(out["l0_penalty"], 1e-2 * (c > 0).sum(-1).float().mean(-1), rtol=1e-5)
        out["l0_penalty"].sum().backward()  # the penalty alone: −λ/(εB)·(pairs in the window) per latent
        g_pen = sae.log_threshold.grad.clone()
        assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0  # the penalty moves thresholds only
        expected = -1e-2 * window[0].sum(0) / (eps * len(x)) * theta[0]  # chain rule through θ = exp(log θ)
        assert torch.allclose(g_pen[0], expected, rtol=1e-4, atol=1e-7)
        assert (g_pen[0][window[0].any(0)] < 0).all()  # raising θ lowers the penalty
        sae.zero_grad(set_to_none=True)
        sae.losses(x, path=path)["mse"].sum().backward()
        assert sae.log_threshold.grad[0][window[0].any(0)].abs().sum() > 0  # the reconstruction's estimator


def test_batchtopk_batch_budget_and_inference_threshold():
    """In training the batch keeps exactly k·B codes (per SAE of the stack), unevenly over tokens; the
    running threshold, after a few steps, gives about k codes per token on held-out data."""
    from helpers.saes.train import TrainConfig, make_optimizer, train_step

    cfgs = [SAEConfig(D, M, architecture="batchtopk", k=k) for k in (3, 7)]
    sae = randomised(cfgs)
    with torch.no_grad():
        sae.b_enc.add_(2.0)  # more than k·B positive pre-activations
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, D, generator=g)
    for path in ("dense", "sparse"):
        out = sae.losses(x, path=path)
        assert torch.equal(out["l0"], torch.tensor([3.0, 7.0]))  # mean L0 = k exactly
    per_token = (sae.arch.train_codes(sae.pre_acts(x), sae.arch.state(sae)) > 0).sum(-1)
    assert (per_token.float().mean(-1) == torch.tensor([3.0, 7.0])).all() and per_token.min() < per_token.max()
    assert not torch.isfinite(sae.threshold).any()  # untrained: plain ReLU at inference
    tc = TrainConfig(batch_size=128, lr=1e-3, warmup_steps=1, dead_window=10 ** 9)
    opt, sched = make_optimizer([sae], tc, 200)
    since = [torch.zeros(2, M, dtype=torch.int64)]
    for step in range(60):
        outs = train_step([sae], [torch.randn(128, D, generator=g)], opt, sched, since, tc)
        if step == 0:
            assert torch.equal(sae.threshold, outs[0]["batch_threshold"])  # set outright by the first batch
    held = sae.encode(torch.randn(4096, D, generator=g))
    l0 = (held > 0).sum(-1).float().mean(-1)
    assert torch.allclose(l0, torch.tensor([3.0, 7.0]), rtol=0.2), l0


@pytest.mark.parametrize("cfg", [SAEConfig(D, M, l1_coefficient=1e-3), SAEConfig(D, M, architecture="topk", k=5), *NEW])
def test_saelens_itself_loads_our_files(tmp_path, cfg):
    """SAELens (where installed: it is not a dependency) loads each architecture's file and computes
    our codes (checked with SAELens 6.54.12: max |difference| 5e-7 on trained SAEs)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = randomised([cfg])
    if hasattr(sae, "threshold"):
        sae.threshold.fill_(0.4)
    save_saelens(sae, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(40, D) * 3
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), sae.encode(x)[0], atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)), sae(x)[0], atol=1e-4)


# ---- saving over a folder --------------------------------------------------------------------

def test_save_refuses_a_folder_with_other_files_and_keeps_them(tmp_path):
    sae = randomised([SAEConfig(D, M)])
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "other_sae").mkdir()
    with pytest.raises(FileExistsError, match=r"mine holds files that are not an SAE's \(notes.txt, other_sae\)"):
        save_saelens(sae, folder)
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "other_sae").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="a_file is a file"):
        save_saelens(sae, tmp_path / "a_file")


def test_save_replaces_an_sae_and_writes_only_its_own_files(tmp_path):
    first, second = randomised([SAEConfig(D, M)], seed=1), randomised([SAEConfig(D, M)], seed=2)
    (tmp_path / "empty").mkdir()
    save_saelens(first, tmp_path / "empty")  # an empty folder is fine
    save_saelens(first, tmp_path / "sae")
    # a temporary folder left by another save (of the old fixed name) is neither used nor touched
    (tmp_path / "sae.tmp").mkdir()
    (tmp_path / "sae.tmp" / "junk").write_text("x")
    save_saelens(second, tmp_path / "sae")
    x = torch.randn(20, D)
    assert torch.allclose(load_saelens(tmp_path / "sae")(x), second(x), atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "sae", "sae.tmp"]
    assert (tmp_path / "sae.tmp" / "junk").exists()


def test_an_interrupted_save_keeps_the_old_sae_whole(tmp_path, monkeypatch):
    from helpers.saes import stack

    old, new = randomised([SAEConfig(D, M)], seed=1), randomised([SAEConfig(D, M)], seed=2)
    save_saelens(old, tmp_path / "sae")

    def half_written(tensors, filename, *a, **kw):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(stack, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_saelens(new, tmp_path / "sae")
    x = torch.randn(20, D)
    assert torch.allclose(load_saelens(tmp_path / "sae")(x), old(x), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # the partial files are gone


# ---- SAELens files from elsewhere --------------------------------------------------------------

def saelens_folder(folder, cfg=None, **tensors):
    """A SAELens folder: a standard D -> M SAE's random tensors (replaced or, with None, left out by
    `tensors`) and a cfg.json of `cfg` (d_in and d_sae by default)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    t = {"W_enc": torch.randn(D, M, generator=g), "W_dec": torch.randn(M, D, generator=g),
         "b_enc": torch.randn(M, generator=g), "b_dec": torch.randn(D, generator=g)}
    t.update(tensors)
    folder.mkdir()
    save_file({k: v for k, v in t.items() if v is not None}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": D, "d_sae": M, **(cfg or {})}))
    return t


@pytest.mark.parametrize("name, arch", [("b_enc", "standard"), ("b_dec", "standard"), ("threshold", "jumprelu")])
def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path, name, arch):
    from helpers.saes.stack import SAELensFileError

    extra = {"threshold": torch.full((M,), 0.5)} if arch == "jumprelu" else {}
    saelens_folder(tmp_path / "s", {"architecture": arch}, **{**extra, name: torch.ones(1)})
    with pytest.raises(SAELensFileError, match=rf"s/sae_weights.safetensors: {name} has shape \[1\], but d_in=12 "
                                               rf"and d_sae=30 in cfg.json make it \[(12|30)\]"):
        load_saelens(tmp_path / "s")


@pytest.mark.parametrize("field, value, says", [
    ("normalize_activations", "expected_average_only_in", "normalize_activations='expected_average_only_in'"),
    ("normalize_activations", "constant_norm_rescale", "normalize_activations='constant_norm_rescale'"),
    ("normalize_activations", "layer_norm", "normalize_activations='layer_norm'"),
    ("normalize_activations", True, "normalize_activations='expected_average_only_in'"),  # the older bool form
    ("hook_head_index", 3, "hook_head_index=3"),
    ("metadata", {"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 2}, "hook_head_index=2"),  # SAELens 6
    ("reshape_activations", "hook_z", "reshape_activations='hook_z'"),
    ("activation_fn_str", "tanh-relu", "activation function 'tanh-relu'"),
])
def test_settings_the_workbook_does_not_apply_are_refused(tmp_path, field, value, says):
    from helpers.saes.stack import SAELensFileError

    saelens_folder(tmp_path / "s", {field: value})
    with pytest.raises(SAELensFileError, match=r"s/cfg.json: " + re.escape(says) + " is not supported"):
        load_saelens(tmp_path / "s")


@pytest.mark.parametrize("cfg", [{"normalize_activations": "none"}, {"normalize_activations": None},
                                 {"normalize_activations": False, "hook_head_index": None}])
def test_settings_that_change_nothing_load(tmp_path, cfg):
    t = saelens_folder(tmp_path / "s", cfg)
    x = torch.randn(10, D)
    assert torch.allclose(load_saelens(tmp_path / "s").encode(x)[0],
                          torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]), atol=1e-4)


def test_a_finetuning_scaling_factor_is_applied(tmp_path):
    """SAELens decodes (codes · s) W_dec + b_dec; codes are unscaled."""
    s = torch.rand(M, generator=torch.Generator().manual_seed(8)) + 0.5
    t = saelens_folder(tmp_path / "s", {"finetuning_scaling_factor": True}, finetuning_scaling_factor=s)
    sae = load_saelens(tmp_path / "s")
    x = torch.randn(10, D)
    c = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert torch.allclose(sae.encode(x)[0], c, atol=1e-4)
    assert torch.allclose(sae(x)[0], (c * s) @ t["W_dec"] + t["b_dec"], atol=1e-4)
    assert not torch.allclose(sae(x)[0], c @ t["W_dec"] + t["b_dec"], atol=1e-2)  # the factor matters here


def test_non_finite_weights_and_missing_fields_are_named(tmp_path):
    from helpers.saes.stack import SAELensFileError

    w = torch.randn(M, D)
    w[3, 4] = float("nan")
    saelens_folder(tmp_path / "nan", W_dec=w)
    with pytest.raises(SAELensFileError, match=r"nan/sae_weights.safetensors: W_dec holds 1 non-finite value"):
        load_saelens(tmp_path / "nan")
    saelens_folder(tmp_path / "inf", b_enc=torch.full((M,), float("inf")))
    with pytest.raises(SAELensFileError, match=r"inf/sae_weights.safetensors: b_enc holds 30 non-finite"):
        load_saelens(tmp_path / "inf")
    saelens_folder(tmp_path / "no_b_dec", b_dec=None)
    with pytest.raises(SAELensFileError, match=r"no_b_dec/sae_weights.safetensors has no b_dec tensor"):
        load_saelens(tmp_path / "no_b_dec")
    saelens_folder(tmp_path / "no_d_sae")
    cfg = json.loads((tmp_path / "no_d_sae" / "cfg.json").read_text())
    del cfg["d_sae"]
    (tmp_path / "no_d_sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELensFileError, match=r"no_d_sae/cfg.json has no 'd_sae' field"):
        load_saelens(tmp_path / "no_d_sae")
    saelens_folder(tmp_path / "extra", finetuning_scaling_factor=torch.ones(M) * 2)  # the flag is not set
    with pytest.raises(SAELensFileError, match=r"extra/sae_weights.safetensors holds tensors the workbook does not "
                                               r"apply: finetuning_scaling_factor"):
        load_saelens(tmp_path / "extra")
    assert issubclass(SAELensFileError, ValueError)


def test_saelens_6_metadata_block_is_read(tmp_path):
    saelens_folder(tmp_path / "s", {"metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "pythia-70m",
                                                 "hook_head_index": None, "sae_lens_version": "6.5.0"}})
    conf = load_saelens(tmp_path / "s").configs[0]
    assert (conf.hook_name, conf.model_name) == ("blocks.2.hook_resid_post", "pythia-70m")


def test_recipes_are_objects_named_as_files_store_them():
    from helpers.saes.stack import LATER_FIELDS, RECIPE_ALIASES, RECIPE_NAMES, RECIPES

    old = SAEConfig(D, M, l1_coefficient=1e-3, recipe="paper")
    assert old.recipe == "anthropic2023" and old.training_recipe is architectures.ANTHROPIC2023
    improved = SAEConfig(D, M, l1_coefficient=1e-3, recipe="improved").training_recipe
    assert (improved.unit_norm, improved.centres_input, improved.init_norm) == (False, False, 0.1)
    assert RECIPES == ("anthropic2023", "improved") and RECIPE_ALIASES == {"paper": "anthropic2023"}
    assert RECIPE_NAMES == {"anthropic2023": "Anthropic-2023 L1", "improved": "improved L1"}
    assert LATER_FIELDS == ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold", "matryoshka_widths")
    with pytest.raises(ValueError, match="unknown recipe"):
        architectures.recipe("nope")
    assert list(architectures.ARCHITECTURES) == ["standard", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"]
