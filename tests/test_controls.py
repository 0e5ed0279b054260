"""helpers.dictionaries.controls: the token-mean oracle, the frozen-encoder SAE, the re-initialised model
and the latents two SAEs share, on small synthetic data and a tiny Llama."""
import numpy as np
import pytest
import torch
from conftest import sparse_data, tiny_llama_model

from helpers.activations.harvest import collect
from helpers.activations.models import hooked
from helpers.dictionaries.controls import (FrozenEncoderSAE, SharedLatents, TokenMeanDictionary, frozen_encoder_sae,
                                           max_cosines, reinitialised, shared_latents, token_mean_directions)
from helpers.dictionaries.dictionary import load_sae, random_directions
from helpers.evals.reconstruction import mmcs
from helpers.saes.stack import SAEConfig, SAEStack
from helpers.saes.train import budget_config, train_sae

FAST = dict(batch_size=256, lr=1e-2, device="cpu", progress=False)


def fvu(d, x):
    return float((d.decode(d.encode(x)) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ---- token-mean directions ---------------------------------------------------------------------------
def test_token_mean_directions_are_the_brute_force_per_token_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) + 3
    ids = torch.randint(0, 12, (600,), generator=g)
    ids[:5] = 99                                                    # a rare token: below min_count
    oracle = token_mean_directions(x, ids, min_count=10, exclude=[7])
    counts = torch.bincount(ids, minlength=100)
    frequent = [t for t in range(100) if counts[t] >= 10 and t != 7]
    expect_order = sorted(frequent, key=lambda t: (-int(counts[t]), t))
    assert oracle.tokens.tolist() == expect_order and oracle.counts.tolist() == [int(counts[t]) for t in expect_order]
    assert isinstance(oracle, TokenMeanDictionary) and oracle.n_features == len(expect_order)
    mean = x.mean(0)
    assert torch.allclose(oracle.mean, mean, atol=1e-5)
    for f, t in enumerate(expect_order):
        v = x[ids == t].mean(0) - mean
        assert torch.allclose(oracle.directions[f], v / v.norm(), atol=1e-5)
    codes = oracle.encode(x)                                        # one-sided: ReLU of the projection
    assert torch.allclose(codes, torch.relu((x - mean) @ oracle.directions.T), atol=1e-5)
    # each token's own direction fires on it more than on the other tokens, on average
    own = torch.stack([codes[ids == t, f].mean() for f, t in enumerate(expect_order)])
    other = torch.stack([codes[ids != t, f].mean() for f, t in enumerate(expect_order)])
    assert bool((own > other).all())


def test_token_mean_directions_size_halves_and_errors():
    g = torch.Generator().manual_seed(1)
    x, ids = torch.randn(400, 6, generator=g), torch.randint(0, 10, (400,), generator=g)
    top3 = token_mean_directions(x, ids, n_features=3, min_count=1)
    meta = np.zeros(400, dtype=[("token", "<i4"), ("pos", "u1")])  # a store's token records: a strided field
    meta["token"] = ids.numpy()
    assert torch.equal(token_mean_directions(x, meta["token"], n_features=3, min_count=1).directions, top3.directions)
    assert top3.n_features == 3 and top3.feature_tokens().tolist() == top3.tokens.tolist()
    both = token_mean_directions(x, ids, n_features=6, min_count=1, halves=True)  # 3 tokens, each ± half
    assert both.n_features == 6 and torch.equal(both.tokens, top3.tokens)
    assert torch.allclose(both.directions[3:], -both.directions[:3])
    assert torch.allclose(both.encode(x)[:, :3], top3.encode(x), atol=1e-6)
    assert both.feature_tokens().tolist() == top3.tokens.tolist() * 2
    given = token_mean_directions(x, ids, min_count=1, mean=torch.zeros(6))
    assert torch.allclose(given.directions[0], x[ids == given.tokens[0]].mean(0) / x[ids == given.tokens[0]].mean(0).norm(),
                          atol=1e-5)
    with pytest.raises(ValueError, match="no token occurs"):
        token_mean_directions(x, ids, min_count=1000)
    with pytest.raises(ValueError, match="token ids"):
        token_mean_directions(x, ids[:10])


# ---- the frozen-encoder SAE --------------------------------------------------------------------------
@pytest.mark.parametrize("arch,setting", [("topk", {"k": 3}), ("standard", {"l1_coefficient": 3e-3})])
def test_frozen_encoder_keeps_its_initialisation_and_trains_the_decoder(arch, setting, tmp_path):
    """The encoder (W_enc, b_enc) is bit for bit its initial value after training, TopK with AuxK and L1
    with resampling alike (resampling is off for a frozen encoder); the decoder moved; it reconstructs
    better than the mean (FVU < 1) and round-trips through SAELens files, marked as frozen."""
    x, _ = sparse_data(n=4096, d=16, m=32, per_token=3)
    kw = dict(d_sae=32, tokens=20_000, seed=3, **setting, **FAST)
    sae = frozen_encoder_sae(x, arch, **kw)
    assert isinstance(sae, FrozenEncoderSAE) and sae.name.startswith("frozen-encoder SAE")
    tc = budget_config(20_000, 256, 1e-2, seed=3, device="cpu")
    assert tc.resample_every > 0            # the L1 run would resample if its encoder were not frozen
    init = SAEStack(sae.sae.configs, seed=3)                    # the SAE as training starts it
    assert torch.equal(sae.sae.W_enc, init.W_enc) and torch.equal(sae.sae.b_enc, init.b_enc)
    assert not torch.allclose(sae.sae.W_dec, init.W_dec, atol=1e-3)
    trained = train_sae(x, arch, **kw)                         # the same run with the encoder trained
    assert not torch.equal(trained.sae.W_enc, init.W_enc)
    assert fvu(sae, x) < 0.9 and fvu(trained, x) < fvu(sae, x)
    back = load_sae(sae.save(tmp_path / "frozen"))
    assert torch.allclose(back.encode(x[:200]), sae.encode(x[:200]), atol=1e-5)
    assert torch.allclose(back.decode(back.encode(x[:200])), sae.decode(sae.encode(x[:200])), atol=1e-5)
    assert '"frozen_encoder": true' in (tmp_path / "frozen" / "cfg.json").read_text()


def test_frozen_encoder_refuses_a_tied_sae_and_resumes_only_as_frozen(tmp_path, array_store):
    from helpers.saes.train import TrainingError, train_sweep

    x, _ = sparse_data(n=1024, d=16, m=32)
    with pytest.raises(ValueError, match="tied"):
        train_sae(x, "standard", d_sae=32, tied=True, tokens=512, freeze_encoder=True, **FAST)
    store = array_store(x)
    tc = budget_config(2048, 256, 1e-2, device="cpu", checkpoint_every=4)
    cfg = [SAEConfig(16, 32, architecture="topk", k=3, hook_name="blocks.0.hook_resid_post", massive=False)]
    frozen = train_sweep(store, None, cfg, tc, run_dir=tmp_path / "run", progress=False, freeze_encoder=True)
    again = train_sweep(store, None, cfg, tc, run_dir=tmp_path / "run", progress=False, freeze_encoder=True)
    assert torch.equal(frozen.saes[0].W_dec, again.saes[0].W_dec)   # finished: read back, not retrained
    with pytest.raises(TrainingError, match="freeze_encoder"):
        train_sweep(store, None, cfg, tc, run_dir=tmp_path / "run", progress=False)


# ---- the re-initialised model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_llama_model(tmp_path_factory.mktemp("tinyllama"), perturb=0.05)  # as if trained: no initial weight


def test_reinitialised_redraws_every_weight_and_keeps_the_shapes(tiny_llama):
    model, tok = tiny_llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    fresh = reinitialised(model, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)            # the global random state is untouched
    after = dict(fresh.named_parameters())
    assert after.keys() == before.keys()
    for n, p in before.items():
        assert after[n].shape == p.shape and after[n].dtype == p.dtype
        assert not torch.equal(after[n], p), n
        assert torch.equal(dict(model.named_parameters())[n], p), n      # the original is left as it was
    again, other = reinitialised(model, seed=0), reinitialised(model, seed=1)
    assert all(torch.equal(again.state_dict()[n], t) for n, t in fresh.state_dict().items())
    assert not torch.equal(other.model.embed_tokens.weight, fresh.model.embed_tokens.weight)
    assert "re-initialised (seed 0" in fresh.workbook_name
    kept = reinitialised(model, seed=0, keep_embeddings=True)
    assert torch.equal(kept.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.equal(kept.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_reinitialised_model_runs_with_its_tokenizer_and_gives_other_activations(tiny_llama):
    model, tok = tiny_llama
    fresh = reinitialised(model, seed=0)
    ids = torch.tensor([tok("The cat sat on the mat and looked around.")["input_ids"]])
    hook = "blocks.1.hook_resid_post"
    a, b = collect(model, ids, hook, progress=False), collect(fresh, ids, hook, progress=False)
    assert a.shape == b.shape == (1, ids.shape[1], 64) and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-3)
    bridge = hooked(model, tok)
    fresh_bridge = reinitialised(bridge, seed=0)                          # a bridge in, a bridge out
    assert hasattr(fresh_bridge, "run_with_hooks") and fresh_bridge.tokenizer is bridge.tokenizer
    assert torch.allclose(collect(fresh_bridge, ids, hook, progress=False), b, atol=1e-5)
    assert "re-initialised" in fresh_bridge.workbook_name


# ---- latents shared between two SAEs -----------------------------------------------------------------
def test_shared_latents_of_an_sae_with_itself_a_random_dictionary_and_another_seed(tmp_path):
    """Two TopK SAEs trained on planted features from different seeds share most latents; an SAE shares all
    of its latents with itself and almost none with random directions."""
    x, feats = sparse_data(n=8192, d=32, m=32, per_token=3)
    kw = dict(d_sae=32, k=3, tokens=40_000, **FAST)
    a, b = train_sae(x, "topk", seed=0, **kw), train_sae(x, "topk", seed=1, **kw)
    same = shared_latents(a, a)
    assert same.share_a == same.share_b == 1.0 and same.mmcs_a == pytest.approx(1.0, abs=1e-5)
    rand = shared_latents(a, random_directions(32, 64, seed=0))
    assert rand.share_a < 0.1 and rand.share_b < 0.1 and rand.n_b == 64
    seeds = shared_latents(a, b, threshold=0.9, name_a="seed 0", name_b="seed 1")
    assert seeds.share_a > 0.6 and seeds.share_b > 0.6, seeds
    assert seeds.share_a > rand.share_a + 0.5
    assert seeds.mmcs_a == pytest.approx(mmcs(a.directions, b.directions), abs=1e-5)
    assert len(seeds.best_a) == 32 and seeds.share_a == pytest.approx(sum(c > 0.9 for c in seeds.best_a) / 32)
    assert "seed 0" in str(seeds) and "seed 1" in seeds.verdicts()[0]
    assert SharedLatents.load(seeds.save(tmp_path / "shared.json")) == seeds


def test_max_cosines_both_ways_in_chunks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    best_a, best_b = max_cosines(a, b, chunk=16)
    cos = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    assert torch.allclose(best_a, cos.max(1).values, atol=1e-6) and torch.allclose(best_b, cos.max(0).values, atol=1e-6)
    assert float(best_a.mean()) == pytest.approx(mmcs(a, b), abs=1e-6)
    assert shared_latents(a, b, threshold=0.5).n_a == 50
    with pytest.raises(ValueError, match="widths"):
        max_cosines(a, torch.randn(3, 5))
