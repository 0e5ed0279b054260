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
