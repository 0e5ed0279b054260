import pytest

from helpers.profiles import PROFILES, get_profile


def test_env_var_picks_profile(monkeypatch):
    monkeypatch.setenv("SAE_PROFILE", "cpu")
    assert get_profile().name == "cpu"
    monkeypatch.setenv("SAE_PROFILE", "test")
    assert get_profile().name == "test"


def test_overrides_and_hooks():
    p = get_profile("test", layers=[1, 4], sae_layer=4, harvest_tokens=100)
    assert p.layers == (1, 4) and p.harvest_tokens == 100
    assert p.hooks == ["blocks.1.hook_resid_post", "blocks.4.hook_resid_post"]
    assert PROFILES["test"].layers != (1, 4), "overrides must not change the preset"


def test_bad_names_are_explained():
    with pytest.raises(ValueError, match="choose one of"):
        get_profile("laptop")
    with pytest.raises(ValueError, match="unknown profile field"):
        get_profile("test", n_layers=3)


def test_paper_profile_is_the_papers_setting():
    p = PROFILES["paper"]
    assert p.model == "EleutherAI/pythia-70m-deduped" and p.corpus == "pile" and p.ctx_len == 256


def test_inconsistent_overrides_are_refused():
    with pytest.raises(ValueError, match="sae_layer 6 is not among the harvested layers"):
        get_profile("test", layers=[1, 4])
    with pytest.raises(ValueError, match="pick_ratio 3 is not among"):
        get_profile("test", pick_ratio=3)


def test_sae_overrides_apply_to_any_profile_and_are_checked(monkeypatch):
    monkeypatch.setenv("SAE_OVERRIDES", '{"harvest_tokens": 5000, "layers": [1, 2], "sae_layer": 2, "lr": 1}')
    for name in ("colab", "cpu"):
        p = get_profile(name)
        assert p.name == name and p.harvest_tokens == 5000 and p.layers == (1, 2) and p.lr == 1.0
    assert get_profile("cpu", harvest_tokens=7).harvest_tokens == 7  # a notebook's own override wins
    for bad, message in [('{"harvest": 1}', "unknown profile field 'harvest'"),
                         ('{"harvest_tokens": "many"}', "harvest_tokens must be int"),
                         ('{"harvest_tokens": 1.5}', "harvest_tokens must be int"),
                         ('{"sae_tied": [1]}', "sae_tied must be a list of bool"),
                         ('{"layers": 3}', "layers must be a non-empty list"),
                         ('{"massive": "yes"}', "massive must be bool"),
                         ('{"name": "cpu"}', "cannot set 'name'"),
                         ("[1, 2]", "must be a JSON object"),
                         ("{harvest_tokens: 1}", "not valid JSON")]:
        monkeypatch.setenv("SAE_OVERRIDES", bad)
        with pytest.raises(ValueError, match=message):
            get_profile("test")
    monkeypatch.setenv("SAE_OVERRIDES", '{"score_tokens": null}')
    assert get_profile("cpu").score_tokens is None


def test_colab_profile_fits_a_free_t4_and_paper_does_not_fit_drive():
    from helpers.plan import Machine, PlanError, check, plan

    t4 = Machine("t4", "Tesla T4", host_bytes=12.7e9, disk_free_bytes=78e9, gpu_bytes=15.8e9)
    drive = Machine("t4", "Tesla T4, cache on free Google Drive", 12.7e9, 15e9, 15.8e9)
    p = plan(get_profile("colab"), t4)
    check(p, t4)
    check(p, drive)
    assert p.disk_bytes < 10e9 and p.host_peak < 6e9 and p.gpu_peak < 8e9, p.table()
    assert sum(p.seconds.values()) < 3600, p.seconds
    with pytest.raises(PlanError, match="harvest_tokens"):
        check(plan(get_profile("paper"), drive), drive)
    small = Machine("t4", "a small VM", host_bytes=2e9, disk_free_bytes=78e9, gpu_bytes=15.8e9)
    with pytest.raises(PlanError, match="lower pca_tokens"):
        check(plan(get_profile("colab"), small), small)
    tiny_gpu = Machine("t4", "a small GPU", host_bytes=12.7e9, disk_free_bytes=78e9, gpu_bytes=2e9)
    with pytest.raises(PlanError, match="train_batch"):
        check(plan(get_profile("colab"), tiny_gpu), tiny_gpu)


def test_pile_profiles_score_on_brown():
    colab = get_profile("colab")
    assert colab.scoring.corpus == "brown" and colab.scoring.model == colab.model
    assert colab.scoring.harvest_tokens == colab.score_tokens and colab.scoring.layers == colab.layers
    cpu = get_profile("cpu")
    assert cpu.scoring is cpu


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU: the plan's GPU memory "
                    "estimate is checked against torch.cuda.max_memory_allocated there")
def test_plan_bounds_the_gpu_memory_of_training(array_store):
    """On a GPU: the plan's training estimate bounds what a sweep of the profile's shape really allocates."""
    import torch

    from helpers.plan import Machine, plan
    from helpers.sweep import sweep_configs, train_config
    from helpers.train import train_sweep

    p = get_profile("test", train_tokens=8 * 256, device="cuda")
    x = torch.randn(4096, 576)
    store = array_store(x, hook=p.sae_hook)
    torch.cuda.reset_peak_memory_stats()
    train_sweep(store, p.sae_hook, sweep_configs(p, 576), train_config(p), progress=False)
    used = torch.cuda.max_memory_allocated()
    estimate = plan(p, Machine.detect()).gpu["training"]
    assert used <= estimate, (used, estimate)
