import re

import pytest

from helpers.settings.profiles import PROFILES, get_profile


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
                         ('{"layers": [1.5]}', "layers must be a list of int"),
                         ('{"grid": [1]}', "grid must be a non-empty dict"),
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
    from helpers.runs.plan import Machine, PlanError, check, plan

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

    from helpers.runs.plan import Machine, plan
    from helpers.runs.sweep import sweep_configs, train_config
    from helpers.saes.train import train_sweep

    p = get_profile("test", train_tokens=8 * 256, device="cuda")
    x = torch.randn(4096, 576)
    store = array_store(x, hook=p.sae_hook)
    torch.cuda.reset_peak_memory_stats()
    train_sweep(store, p.sae_hook, sweep_configs(p, 576), train_config(p), progress=False)
    used = torch.cuda.max_memory_allocated()
    estimate = plan(p, Machine.detect()).gpu["training"]
    assert used <= estimate, (used, estimate)


def test_plan_counts_the_checkpoint_copies_in_the_cache_and_on_scratch(monkeypatch):
    from helpers.runs.plan import Machine, PlanError, check, checkpoint_bytes, model_dims, plan
    from helpers.runs.sweep import sweep_configs

    colab = get_profile("colab")
    d = model_dims(colab.model)[0]
    sweep = checkpoint_bytes(sweep_configs(colab, d), d)
    assert 0.7e9 < sweep < 0.76e9  # the colab sweep: 60.6M parameters, each with two Adam moments
    t4 = Machine("t4", "Tesla T4", host_bytes=12.7e9, disk_free_bytes=78e9, gpu_bytes=15.8e9, scratch_free_bytes=70e9)
    local, drive = plan(colab, t4, scratch=False), plan(colab, t4, scratch=True)
    assert not local.scratch and "checkpoints" in local.disk
    copies = drive.disk["checkpoint copies (2 a run)"]
    layers = copies / 2 - sweep  # the layer SAEs' run: the chosen SAE and its TopK twin at 2 more layers
    assert 0 < layers < sweep
    assert drive.scratch == {"working checkpoints": sweep + layers, "one being saved": sweep}
    assert drive.disk_bytes - local.disk_bytes == copies - local.disk["checkpoints"] == layers
    assert "local scratch ($SAE_SCRATCH): 1.66 GB" in drive.table()
    # a cache on Colab's Drive without scratch: every replaced checkpoint stays in Drive's trash
    monkeypatch.setenv("SAE_CACHE", "/content/drive/MyDrive/sae-workbook-cache")
    monkeypatch.delenv("SAE_SCRATCH", raising=False)
    on_drive = plan(colab, t4)
    assert on_drive.disk["replaced checkpoints in Drive's trash"] == 10 * (sweep + layers)  # 11 saves a run
    free_drive = Machine("t4", "Tesla T4, cache on free Google Drive", 12.7e9, 15e9, 15.8e9)
    with pytest.raises(PlanError, match="set SAE_SCRATCH to a folder on the VM's disk"):
        check(on_drive, free_drive)
    monkeypatch.setenv("SAE_SCRATCH", "/somewhere")
    assert plan(colab, t4).scratch == drive.scratch  # the default follows the environment
    check(plan(colab, t4), free_drive)
    check(drive, t4)
    cramped = Machine("t4", "Tesla T4", 12.7e9, 78e9, 15.8e9, scratch_free_bytes=1e9)
    with pytest.raises(PlanError, match="SAE_SCRATCH"):
        check(drive, cramped)


def test_checkpoint_bytes_is_what_training_writes(array_store, tmp_path):
    """The plan's checkpoint size against a real checkpoint (tied and untied SAEs, TopK)."""
    import torch

    from helpers.runs.plan import checkpoint_bytes
    from helpers.saes.stack import SAEConfig
    from helpers.saes.train import TrainConfig, train_sweep

    d = 64
    configs = [SAEConfig(d, 512, l1_coefficient=1e-3), SAEConfig(d, 256, l1_coefficient=1e-3, tied=True),
               SAEConfig(d, 512, architecture="topk", k=8)]
    store = array_store(torch.randn(2048, d))
    tc = TrainConfig(total_tokens=256 * 4, batch_size=256, device="cpu", log_every=100, checkpoint_every=2)
    train_sweep(store, "blocks.0.hook_resid_post", configs, tc, run_dir=tmp_path / "run", progress=False)
    size = (tmp_path / "run" / "checkpoint.pt").stat().st_size
    assert checkpoint_bytes(configs, d) <= size < 1.05 * checkpoint_bytes(configs, d) + 50_000, size


def test_plan_times_the_cpu_steps_on_any_gpu(monkeypatch):
    """Held-out scores with their resamples, PCA/ICA fits and logit effects run on the CPU whatever the
    GPU: on an arbitrarily fast one, notebooks 03 and 04 still take their CPU time, which grows with
    the scored tokens."""
    import helpers.runs.plan as plan_mod
    from helpers.runs.plan import Machine, plan

    monkeypatch.setitem(plan_mod.THROUGHPUT, "instant", 1e30)
    fast = Machine("instant", "a GPU of unlimited speed", 12.7e9, 78e9, 80e9)
    colab = get_profile("colab")
    p = plan(colab, fast).seconds
    assert p["03"] > 60 + 60 and p["04"] > 60 + 600, p  # beyond the fixed minute of each notebook
    more = plan(colab.replace(score_tokens=2 * colab.score_tokens), fast).seconds
    assert more["03"] - 60 > 1.8 * (p["03"] - 60), (p, more)  # 03's CPU work is the held-out scoring
    assert more["04"] > p["04"] + 0.5 * (p["03"] - 60)


OUT_OF_RANGE = [  # field, value, what the message says is allowed
    ("batch_contexts", 0, "an int ≥ 1"), ("shard_contexts", 0, "an int ≥ 1"), ("train_batch", 0, "an int ≥ 1"),
    ("harvest_tokens", -5, "an int ≥ 1"), ("ctx_len", 1, "an int ≥ 2"), ("lr", float("inf"), "a finite number > 0"),
    ("lr", float("nan"), "a finite number > 0"), ("lr", 0, "a finite number > 0"), ("seed", -1, "an int ≥ 0"),
    ("ioi_prompts", 1, "an int ≥ 2"), ("patch_layer_step", 0, "an int ≥ 1"), ("score_tokens", 0, "an int ≥ 1"),
]


@pytest.mark.parametrize("field,value,allowed", OUT_OF_RANGE)
def test_values_out_of_range_are_refused_before_any_work(monkeypatch, field, value, allowed):
    import json

    from helpers.settings.profiles import Profile

    shown = re.escape(f"{field}={value!r} is out of range: it must be {allowed}")
    with pytest.raises(ValueError, match="get_profile: " + shown):
        get_profile("test", **{field: value})
    with pytest.raises(ValueError, match=shown):
        PROFILES["test"].replace(**{field: value})
    with pytest.raises(ValueError, match=shown):
        Profile("mine", **{field: value})
    if value == value and abs(value) != float("inf"):  # JSON has no nan or inf
        monkeypatch.setenv("SAE_OVERRIDES", json.dumps({field: value}))
        with pytest.raises(ValueError, match=re.escape("$SAE_OVERRIDES: ") + shown):
            get_profile("cpu")


def test_list_fields_are_checked_element_by_element():
    for changes, message in [({"layers": [-1, 6]}, "layers=[-1, 6] holds -1; each must be an int ≥ 0"),
                             ({"layers": [2, 6, 2]}, "layers=[2, 6, 2] repeats 2; each value may appear once"),
                             ({"layers": [2, float("inf")]}, "layers must be a list of int")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            get_profile("test", **changes)


def test_fields_checked_together_and_strings():
    with pytest.raises(ValueError, match="train_tokens 100 is less than one training batch"):
        get_profile("test", train_tokens=100)
    with pytest.raises(ValueError, match="device 'gpu'"):
        PROFILES["cpu"].replace(device="gpu")
    with pytest.raises(ValueError, match="hook 'resid post'"):
        get_profile("test", hook="resid post")
    with pytest.raises(ValueError, match="sae_layer 6 is not among"):
        PROFILES["test"].replace(layers=(1, 2))  # replace is checked as get_profile is


def test_values_in_range_pass_unchanged():
    p = get_profile("test", pick_max_l0=float("inf"), pick_ratio=0.5, lr=1, autointerp_features=0, seed=2**32 - 1)
    assert p.pick_max_l0 == float("inf") and p.pick_ratio == 0.5 and p.autointerp_features == 0
    assert p.replace(layers=[2, 6]).layers == (2, 6)
    assert PROFILES["cpu"].grid["standard"][0]["ratio"] == (1, 4) and repr(PROFILES["cpu"]) == repr(get_profile("cpu"))


def test_every_field_is_in_one_section_and_results_are_keyed_by_sections():
    import dataclasses

    from helpers.settings.profiles import SECTIONS, Profile, setting

    p = PROFILES["cpu"]
    everything = p.settings()
    assert set(everything) == set(SECTIONS) - {"run"}
    named = [name for section in everything.values() for name in section]
    assert sorted(named) == sorted(f.name for f in dataclasses.fields(Profile) if Profile.section_of(f.name) != "run")
    assert everything["data"]["harvest_tokens"] == 300_000 and "harvest_tokens" not in everything["sweep"]
    assert p.settings("run") == {"run": {"name": "cpu", "device": "auto"}}
    assert p.replace(ioi_prompts=2).settings("data", "sweep") == p.settings("data", "sweep")
    assert p.replace(lr=1.0).settings("data", "sweep") != p.settings("data", "sweep")
    with pytest.raises(ValueError, match="unknown section 'sweeps'"):
        p.settings("sweeps")
    with pytest.raises(ValueError, match="unknown section"):
        setting("nowhere", 1)


def test_the_grid_is_checked_and_written_as_architectures_and_settings():
    p = get_profile("test", grid={"standard": {"ratio": [2, 4], "l1_coefficient": 1e-3}, "topk": {"ratio": 2, "k": 8}})
    assert p.grid == {"standard": ({"ratio": (2, 4), "l1_coefficient": (1e-3,)},), "topk": ({"ratio": (2,), "k": (8,)},)}
    assert p == get_profile("test", grid={"standard": [{"ratio": (2, 4), "l1_coefficient": [1e-3]}],
                                          "topk": [{"ratio": [2], "k": [8]}]})  # one normal form
    for grid, message in [({}, "must be a non-empty dict"),
                          ({"standard": {"ratio": 2, "l1_coefficient": 1e-3}, "sparse_magic": {"ratio": 2}},
                           "'sparse_magic', which is not a registered architecture"),
                          ({"standard": {"l1_coefficient": 1e-3}}, "has no ratio"),
                          ({"standard": {"ratio": 2, "alpha": 1e-3}}, "'alpha' is not an SAE setting"),
                          ({"standard": {"ratio": [2, 2], "l1_coefficient": 1e-3}}, "must list each value once"),
                          ({"standard": {"ratio": 0, "l1_coefficient": 1e-3}}, "ratio [0] must be numbers > 0"),
                          ({"standard": {"ratio": 2, "l1_coefficient": float("nan")}}, "is not a finite number"),
                          ({"standard": "l1"}, "must be a dict or a non-empty list of dicts"),
                          ({"topk": {"ratio": 2, "k": 8}}, "pick_ratio 2 is not among the ratios")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            get_profile("test", grid=grid)


def test_a_grid_from_sae_overrides(monkeypatch):
    monkeypatch.setenv("SAE_OVERRIDES", '{"grid": {"standard": {"ratio": [1, 2], "l1_coefficient": 3e-3}, '
                                        '"jumprelu": {"ratio": 2, "l0_coefficient": [1e-3, 2e-3]}}}')
    p = get_profile("cpu", pick_ratio=2)
    assert p.grid["jumprelu"] == ({"ratio": (2,), "l0_coefficient": (1e-3, 2e-3)},)
