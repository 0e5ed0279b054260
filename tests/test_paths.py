"""`stored`: results kept in the cache, so that an interrupted notebook resumes where it stopped; the
cache and scratch folders named by the environment."""
import importlib
import math
import os
import sys
import warnings

import numpy as np

import pytest
import torch

from helpers.settings.paths import stored


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
    assert not list(tmp_path.glob("*other.pt*")), "an interrupted computation leaves no file behind"


def test_stored_round_trips_plain_data(tmp_path):
    result = {
        "rows": [{"layer": 2, "mcc": 0.25, "nan": float("nan"), "inf": -math.inf, "ok": True, "none": None}],
        "pair": (1, "a", (2.5,)),
        1: "int key", ("residual", "top_k", 4): 0.75,
        "__tuple__": "a key that looks like a marker",
        "tensors": [torch.arange(6).reshape(2, 3), torch.tensor(1.5), torch.zeros(0, 4), torch.ones(3).bfloat16(),
                    torch.tensor([True, False]), torch.arange(10.0)[::2]],
        "array": np.arange(4, dtype=np.int64), "scalar": np.float64(0.5), "mask": np.array([True, False]),
    }
    path = tmp_path / "r.pt"
    stored(path, "k", lambda: result)
    back = stored(path, "k", lambda: pytest.fail("recomputed"))
    assert back["rows"][0]["mcc"] == 0.25 and math.isnan(back["rows"][0]["nan"]) and back["rows"][0]["inf"] == -math.inf
    assert back["rows"][0]["ok"] is True and back["rows"][0]["none"] is None
    assert back["pair"] == (1, "a", (2.5,)) and back[1] == "int key" and back[("residual", "top_k", 4)] == 0.75
    assert back["__tuple__"] == "a key that looks like a marker"
    for a, b in zip(back["tensors"], result["tensors"]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert isinstance(back["array"], np.ndarray) and back["array"].tolist() == [0, 1, 2, 3]
    assert back["mask"].dtype == bool and back["scalar"] == 0.5


def test_stored_refuses_what_it_cannot_keep_without_pickling(tmp_path):
    class Thing:
        pass
    with pytest.raises(TypeError, match=r"result\['x'\]\[0\] is a Thing.*to_dict"):
        stored(tmp_path / "t.pt", "k", lambda: {"x": [Thing()]})
    assert not list(tmp_path.iterdir())


RAN = []


class _Payload:
    """Unpickling this calls RAN.append: what a malicious cache file could do instead."""

    def __reduce__(self):
        return (RAN.append, ("unpickled",))


def test_a_pickled_cache_file_is_never_loaded(tmp_path):
    path = tmp_path / "curve.pt"
    torch.save({"key": "k", "result": _Payload()}, path)      # what the cache held before (torch.save)
    with pytest.warns(UserWarning, match=rf"{path}: it is a pickle.*computing it again"):
        assert stored(path, "k", lambda: {"fresh": 1}) == {"fresh": 1}
    assert RAN == [], "the pickle ran code"
    assert stored(path, "k", lambda: pytest.fail("recomputed")) == {"fresh": 1}  # replaced by a stored file


def test_a_stored_file_whose_header_length_begins_like_a_pickle_is_loaded(tmp_path):
    """A safetensors file begins with the length of its header: one length in 256 has \\x80, the pickle's
    first byte, as its first byte. Such a stored result is still read, not taken for a pickle."""
    path = tmp_path / "r.pt"
    for pad in range(512):  # a key of some length gives the header such a length
        stored(path, "k" * pad, lambda: {"t": torch.arange(3.0)})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no key length gave a header length starting with 0x80")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stored(path, "k" * pad, lambda: pytest.fail("recomputed"))["t"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_cache_file_is_named_and_recomputed(tmp_path, damage):
    path = tmp_path / "curve.pt"
    stored(path, "k", lambda: {"t": torch.arange(100.0)})
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-10], "empty": b"", "text": b"not a result"}[damage])
    with pytest.warns(UserWarning, match=rf"{path}: it is not a complete stored result"):
        assert stored(path, "k", lambda: {"t": 2})["t"] == 2
    assert stored(path, "k", lambda: pytest.fail("recomputed"))["t"] == 2


def _module(folder, name, body):
    (folder / f"{name}.py").write_text(body)
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    return importlib.import_module(name)


def test_an_edit_to_the_code_that_computes_a_result_recomputes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    calc = _module(tmp_path, "calc_for_stored", "def f():\n    return 1\n")
    other = _module(tmp_path, "other_for_stored", "X = 1\n")
    path = tmp_path / "cache" / "r.pt"
    assert stored(path, "k", calc.f, code=(calc,)) == 1
    (tmp_path / "other_for_stored.py").write_text("X = 2\n")  # a module the result does not name
    assert stored(path, "k", lambda: pytest.fail("recomputed"), code=(calc,)) == 1
    calc = _module(tmp_path, "calc_for_stored", "def f():\n    return 2  # changed\n")
    assert stored(path, "k", calc.f, code=(calc.f,)) == 2  # a function stands for its module
    assert "code of calc_for_stored changed" in capsys.readouterr().out
    assert stored(path, "k", lambda: pytest.fail("recomputed"), code=("calc_for_stored",)) == 2  # or its name
    with pytest.raises(ValueError, match="not a module with a source file"):
        stored(path, "k", lambda: 0, code=(sys,))
    del other


def test_digest_depends_on_the_key_and_the_code(tmp_path, monkeypatch):
    from helpers.settings import paths
    from helpers.settings import profiles
    from helpers.settings.paths import digest

    assert digest(["a", 1]) == digest(("a", 1)) != digest(["a", 2])
    assert digest("a", code=(paths,)) != digest("a", code=(profiles,)) != digest("a")
    assert digest(torch.arange(3)) != digest(torch.arange(3.0))


def test_cache_paths_expand_home_and_resolve_relative_paths_once(tmp_path, monkeypatch):
    from helpers.settings.paths import cache_root, scratch_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAE_CACHE", "~/sae-cache")
    assert cache_root() == tmp_path / "home" / "sae-cache" and cache_root().is_dir()
    assert not (tmp_path / "~").exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAE_CACHE", "rel/cache")
    monkeypatch.setenv("SAE_SCRATCH", "rel/scratch")
    assert cache_root() == tmp_path / "rel" / "cache" and scratch_root() == tmp_path / "rel" / "scratch"
    assert os.environ["SAE_CACHE"] == str(tmp_path / "rel" / "cache")  # what child kernels inherit
    monkeypatch.chdir(tmp_path / "rel")  # a kernel running in another folder finds the same cache
    assert cache_root() == tmp_path / "rel" / "cache"


def test_scratch_mirrors_the_cache_and_is_off_by_default(tmp_path, monkeypatch):
    from helpers.settings.paths import scratch_dir

    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAE_SCRATCH", raising=False)
    assert scratch_dir(tmp_path / "cache" / "sae" / "run") is None
    monkeypatch.setenv("SAE_SCRATCH", str(tmp_path / "scratch"))
    assert scratch_dir(tmp_path / "cache" / "sae" / "run") == tmp_path / "scratch" / "sae" / "run"
    elsewhere = scratch_dir(tmp_path / "other" / "run")
    assert elsewhere.parent.parent == tmp_path / "scratch" and elsewhere != scratch_dir(tmp_path / "x" / "run")


def test_sync_drive_syncs_on_colab_only(monkeypatch):
    import types

    from helpers.settings.paths import sync_drive

    calls = []
    monkeypatch.setattr(os, "sync", lambda: calls.append(1))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    sync_drive()
    assert calls == []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    sync_drive()
    assert calls == [1]


def test_held_out_scores_round_trip_through_the_cache(tmp_path):
    from helpers.evals.heldout import Scored

    rng = np.random.default_rng(0)
    sc = Scored("SAE", rng.integers(0, 9, 5), np.array([True, True, False, True, True]), *rng.random((4, 5)),
                ["token 'a'", "NOUN", "token 'b'", "VERB", "NOUN"], *rng.random((2, 5)),
                boot={"mcc": rng.random(20), "null_mcc": rng.random(20)})
    back = stored(tmp_path / "layer.pt", "k", lambda: {"scored": sc.to_dict()})
    back = stored(tmp_path / "layer.pt", "k", lambda: pytest.fail("recomputed"))
    again = Scored.from_dict(back["scored"])
    assert again.summary() == pytest.approx(sc.summary(), nan_ok=True)
    for name in ("counts", "scored", "mcc", "corr", "null_mcc", "null_corr", "in_sample_mcc", "null_in_sample_mcc"):
        assert isinstance(getattr(again, name), np.ndarray) and np.array_equal(getattr(again, name), getattr(sc, name))
    assert again.concept == sc.concept and again.name == "SAE" and np.array_equal(again.boot["mcc"], sc.boot["mcc"])
