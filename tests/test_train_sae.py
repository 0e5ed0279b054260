"""train_sae: one SAE from plain tensors (a tensor of activations, or an iterable of batches), on the
sweep's training loop; SAELens files; clear errors on wrong input."""
import math

import pytest
import torch

from helpers.dictionaries.dictionary import SAEDictionary, load_sae
from helpers.saes import groundtruth
from helpers.saes.groundtruth import SyntheticConfig, generate, mmcs_to_truth, untrained_reference
from helpers.saes.stack import SAEConfig
from helpers.saes.train import budget_config, train_sae

SMALL = SyntheticConfig(d=32, n_features=96, mean_l0=4)
FAST = dict(batch_size=256, lr=1e-2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def planted():
    return generate(SMALL, 40_000)


def weights(d: SAEDictionary) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in d.sae.parameters()])


def test_recovers_planted_features_from_a_tensor(planted):
    """TopK on a tensor with known sparse features: its decoder directions match the truth (MMCS) far
    better than the same SAE untrained; the codes have k active latents."""
    sae = train_sae(planted.x, "topk", d_sae=96, k=4, tokens=40_000, **FAST)
    assert isinstance(sae, SAEDictionary) and sae.sae.configs[0].k == 4
    trained = mmcs_to_truth(planted.directions, sae.directions)
    chance = mmcs_to_truth(planted.directions, untrained_reference(sae.sae.configs[0], planted.x).directions()[0])
    assert trained > 0.8 and trained > chance + 0.3, (trained, chance)
    codes = sae.encode(planted.x[:500])
    assert codes.shape == (500, 96)
    assert 3.5 < float((codes > 0).sum(-1).float().mean()) <= 4.0
    assert float((sae.decode(codes) - planted.x[:500]).pow(2).sum() / planted.x[:500].pow(2).sum()) < 0.5


def test_trains_on_an_iterator_of_batches(planted):
    """A generator of chunks of any size (here [2, 150, d], flattened) is cut into batches in the order
    given; it recovers the features too, even though it yields from inside torch.no_grad() (as a
    generator reading a model's hooks would), and grad mode is as it was afterwards."""
    def chunks():
        for i in range(0, 39_900, 300):
            with torch.no_grad():
                yield planted.x[i:i + 300].view(2, 150, SMALL.d)

    sae = train_sae(chunks(), "topk", d_sae=96, k=4, tokens=39_680, **FAST)  # the 155 batches it holds
    assert mmcs_to_truth(planted.directions, sae.directions) > 0.8
    assert torch.is_grad_enabled()


def test_rebatching_is_exact_and_a_list_is_read_again():
    """Chunks of ragged sizes give exactly the SAE that batch_size batches of the same rows in the same
    order give; a list is read again when it runs out (two passes here)."""
    x = generate(SMALL, 2048).x
    sizes, ragged, i = [100, 157, 3, 500, 288], [], 0
    while i < len(x):
        ragged.append(x[i:i + sizes[len(ragged) % len(sizes)]])
        i += len(ragged[-1])
    even = list(x.split(256))
    a = train_sae(ragged, "topk", d_sae=64, k=4, tokens=4096, **FAST)
    b = train_sae(even, "topk", d_sae=64, k=4, tokens=4096, **FAST)
    assert torch.equal(weights(a), weights(b))


def test_a_generator_that_runs_out_stops_training_with_a_warning():
    x = generate(SMALL, 1024).x
    with pytest.warns(UserWarning, match=r"ran out after 4 of 8 steps"):
        sae = train_sae(iter(x.split(256)), "topk", d_sae=64, k=4, tokens=2048, **FAST)
    assert all(bool(torch.isfinite(p).all()) for p in sae.sae.parameters())


def test_same_loop_as_the_lab_and_the_same_seed_gives_the_same_sae(planted):
    """train_sae on a tensor is the lab's train_on_tensor on the same config and schedule, bit for bit;
    another seed gives another SAE."""
    x = planted.x[:4096]
    sae = train_sae(x, "standard", d_sae=64, l1_coefficient=0.05, tokens=4096, seed=1, **FAST)
    cfg = SAEConfig(SMALL.d, 64, l1_coefficient=0.05)
    tc = budget_config(4096, batch_size=256, lr=1e-2, seed=1, device="cpu")
    (lab,) = groundtruth.train_on_tensor(x, [cfg], tc=tc, progress=False)
    assert torch.equal(weights(sae), torch.cat([p.detach().flatten() for p in lab.parameters()]))
    other = train_sae(x, "standard", d_sae=64, l1_coefficient=0.05, tokens=4096, seed=2, **FAST)
    assert not torch.equal(weights(sae), weights(other))


def test_settings_per_architecture():
    x = generate(SMALL, 1024).x
    for arch, field, want in (("standard", "l1_coefficient", 1e-3), ("jumprelu", "l0_coefficient", 1e-3),
                              ("batchtopk", "k", 5)):
        sae = train_sae(x, arch, k=5, tokens=512, expansion=2, **FAST)
        cfg = sae.sae.configs[0]
        assert cfg.architecture == arch and cfg.d_sae == 2 * SMALL.d and getattr(cfg, field) == want
    improved = train_sae(x, "standard", l1_coefficient=0.1, recipe="improved", tokens=512, hook_name="h.0",
                         model_name="m", **FAST)
    assert improved.sae.configs[0].recipe == "improved" and improved.hook_name == "h.0"
    assert torch.allclose(improved.sae.W_dec.norm(dim=-1), torch.ones(1, 8 * SMALL.d), atol=1e-4)  # folded


def test_saves_and_loads_in_saelens_layout(tmp_path, planted):
    sae = train_sae(planted.x[:4096], "topk", d_sae=64, k=4, tokens=4096, hook_name="blocks.0.hook_resid_post",
                    model_name="toy", **FAST)
    folder = sae.save(tmp_path / "sae")
    assert (tmp_path / "sae" / "cfg.json").exists()
    back = load_sae(folder)
    x = planted.x[-500:]
    with torch.no_grad():
        assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(back.encode(x) > 0, sae.encode(x) > 0)
    assert (back.hook_name, back.model_name, back.sae.configs[0].k) == ("blocks.0.hook_resid_post", "toy", 4)


@pytest.mark.parametrize("data, error, match", [
    (torch.randn(512), ValueError, r"\[N, d_in\].*shape \(512,\)"),
    (torch.randint(0, 5, (512, 8)), TypeError, "floating-point"),
    (torch.zeros(0, 8), ValueError, "empty"),
    ([], ValueError, "no activations"),
    ("activations.pt", TypeError, "tensor of activations"),
    ([torch.randn(300, 8), torch.randn(300, 9)], ValueError, "batch 2 .* d=9, the first had d=8"),
    ([torch.randn(300, 8), [1.0] * 8], TypeError, "batch 2 .* must be a torch.Tensor"),
    (torch.randn(100, 8), ValueError, r"len\(x\)=100 >= batch_size=256"),
])
def test_wrong_input_is_refused_clearly(data, error, match):
    with pytest.raises(error, match=match):
        train_sae(data, "topk", k=2, tokens=2048, **FAST)


def test_non_finite_rows_are_named():
    from helpers.saes.train import TrainingError

    x = torch.randn(512, 8)
    x[300, 2] = math.nan
    with pytest.raises(TrainingError, match=r"row 300 of"):
        train_sae(x, "topk", k=2, tokens=4096, **FAST)
