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
