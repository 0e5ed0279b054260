"""An architecture defined here, and only here, trains, saves, loads and is scored like the built-in
ones: adding an architecture is one class (plus its tests)."""
import math

import pytest
import torch

from conftest import sparse_data
from helpers.evals.reconstruction import reconstruction_metrics
from helpers.saes import architectures
from helpers.saes.stack import SAEConfig, load_saelens, save_saelens
from helpers.saes.train import TrainConfig, train_sweep

HOOK = "blocks.0.hook_resid_post"
THRESHOLD = 0.5


@pytest.fixture
def toy():
    """A ReLU SAE whose codes are kept only above a fixed threshold, with an L1 penalty: one class,
    registered by being defined, taken out of the registry when the test is done."""

    class FixedThresholdReLU(architectures.Architecture):
        name, family_name, setting, symbol = "toy_fixed_threshold", "fixed-threshold ReLU", "l1_coefficient", "α"
        loss_terms = ("l1",)
        saelens_architecture = "jumprelu"  # a SAELens JumpReLU whose thresholds are all THRESHOLD

        def own_state(self, configs, d_in, d_sae):
            return {"threshold": torch.full((len(configs), d_sae), THRESHOLD)}

        def default_setting(self, target_l0, i=0):
            return {"l1_coefficient": 1e-3 * (1 + i)}

        def codes(self, pre, p):
            return torch.relu(pre) * (pre > p["threshold"].unsqueeze(1)).to(pre.dtype)

        def dense_terms(self, ctx):
            return {"l1": ctx.l1_scale * ctx.p["l1"] * ctx.c.sum(-1).mean(-1)}

        def saelens_tensors(self, stack):
            return {"threshold": stack.threshold[0].detach().float()}

        def load_state(self, stack, tensors):
            with torch.no_grad():
                stack.threshold.copy_(tensors["threshold"].unsqueeze(0))

    yield FixedThresholdReLU
    architectures.unregister(FixedThresholdReLU.name)


def test_a_new_architecture_trains_saves_loads_and_scores(toy, array_store, tmp_path):
    arch = architectures.get("toy_fixed_threshold")
    assert isinstance(arch, toy) and not arch.sparse_path  # its codes have no sparse selector: dense path
    x, _ = sparse_data(n=2048, d=16, m=32)
    store = array_store(x, hook=HOOK)
    configs = [SAEConfig(16, 32, architecture=arch.name, hook_name=HOOK, **arch.default_setting(3, i))
               for i in range(2)]
    assert configs[0].family == "fixed-threshold ReLU" and configs[0].label.endswith("α=0.001")
    tc = TrainConfig(total_tokens=4096, batch_size=128, lr=3e-3, warmup_steps=1, dead_window=10 ** 9, seed=0,
                     device="cpu")
    result = train_sweep(store, HOOK, configs, tc, progress=False)
    assert not result.diverged and [c.architecture for c in result.configs] == [arch.name] * 2
    sae = result.saes[0]
    assert sae.threshold.shape == (1, 32) and "threshold" in sae.state_dict()

    pre = sae.pre_acts(x[:256])
    codes = sae.encode(x[:256])
    gated = (pre > 0) & (pre <= THRESHOLD)  # ReLU would keep these, the toy does not
    assert gated.any() and (codes[gated] == 0).all() and (codes[pre > THRESHOLD] > 0).all()

    folder = save_saelens(sae.cpu(), tmp_path / "toy")
    loaded = load_saelens(folder)
    assert loaded.architecture == arch.name and isinstance(loaded.arch, toy)
    assert torch.allclose(loaded.encode(x[:256]), codes, atol=1e-5)

    row = reconstruction_metrics(loaded, x)[0]
    assert math.isfinite(row["fvu"]) and 0 <= row["fvu"] < 1
    assert 0 < row["l0"] < 32


def test_a_new_architecture_joins_a_sweep_by_its_settings(toy):
    from helpers.runs import sweep
    from helpers.settings.profiles import get_profile

    profile = get_profile("test")
    plain = sweep.sweep_configs(profile, 64)
    more = profile.replace(grid={**profile.grid, "toy_fixed_threshold": {"ratio": 4, "l1_coefficient": (1e-3, 2e-3)}})
    toys = [c for c in sweep.sweep_configs(more, 64) if c.architecture == "toy_fixed_threshold"]
    assert [c.l1_coefficient for c in toys] == [1e-3, 2e-3] and all(c.ratio == 4 for c in toys)
    assert [c for c in sweep.sweep_configs(more, 64) if c.architecture != "toy_fixed_threshold"] == plain
    assert sweep._key(more, more.sae_hook) != sweep._key(profile, profile.sae_hook)


def test_a_name_is_registered_once(toy):
    with pytest.raises(ValueError, match="taken"):
        class Other(architectures.Architecture):
            name = "toy_fixed_threshold"
    with pytest.raises(ValueError, match="unknown architecture"):
        architectures.get("no_such_architecture")
