"""`stored`: results kept in the cache, so that an interrupted notebook resumes where it stopped."""
import pytest
import torch

from helpers.paths import stored


def test_stored_computes_once_per_key_and_survives_an_interruption(tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"points": [value], "attribution": torch.arange(3.0) * value}
        return run

    path = tmp_path / "patching" / "curve.pt"
    first = stored(path, ["settings", 1], compute(1))
    again = stored(path, ["settings", 1], compute(99))  # loaded, not recomputed
    assert calls == [1] and again["points"] == [1] and torch.equal(again["attribution"], first["attribution"])
    assert stored(path, ["settings", 2], compute(2))["points"] == [2] and calls == [1, 2]  # other settings

    def killed():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        stored(tmp_path / "other.pt", "k", killed)
    assert not list(tmp_path.glob("other.pt*")), "an interrupted computation leaves no file behind"


def test_scratch_mirrors_the_cache_and_is_off_by_default(tmp_path, monkeypatch):
    from helpers.paths import scratch_dir

    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAE_SCRATCH", raising=False)
    assert scratch_dir(tmp_path / "cache" / "sae" / "run") is None
    monkeypatch.setenv("SAE_SCRATCH", str(tmp_path / "scratch"))
    assert scratch_dir(tmp_path / "cache" / "sae" / "run") == tmp_path / "scratch" / "sae" / "run"
    elsewhere = scratch_dir(tmp_path / "other" / "run")
    assert elsewhere.parent.parent == tmp_path / "scratch" and elsewhere != scratch_dir(tmp_path / "x" / "run")


def test_sync_drive_syncs_on_colab_only(monkeypatch):
    import os
    import sys
    import types

    from helpers.paths import sync_drive

    calls = []
    monkeypatch.setattr(os, "sync", lambda: calls.append(1))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    sync_drive()
    assert calls == []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    sync_drive()
    assert calls == [1]
