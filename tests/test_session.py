"""The notebooks' session: pieces made on first use, and results cached under what they depend on."""
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from helpers.dictionaries.dictionary import random_directions
from helpers.runs.session import Session, key_of


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    S = Session("test")
    model = torch.nn.Linear(2, 2)
    model.workbook_name, model.workbook_revision = "a-model", None
    S.__dict__["model"] = model                                   # made already: nothing is loaded
    S.__dict__["store"] = SimpleNamespace(path=Path("stores/abc123"))
    return S


def test_nothing_is_made_until_asked():
    S = Session("test", train_tokens=10_000)
    assert S.P.train_tokens == 10_000 and "nothing" in repr(S)
    assert not {"model", "store", "sweep", "sae"} & set(S.__dict__)


def test_cached_computes_once_per_inputs(session):
    calls = []

    def compute(v):
        calls.append(v)
        return {"value": torch.tensor([v])}

    d = random_directions(4, 8, seed=0)
    first = session.cached("curves/a", lambda: compute(1), inputs={"k": 3, "dict": d})
    again = session.cached("curves/a", lambda: compute(2), inputs={"k": 3, "dict": random_directions(4, 8, seed=0)})
    assert calls == [1] and torch.equal(first["value"], again["value"])
    session.cached("curves/a", lambda: compute(3), inputs={"k": 4, "dict": d})                  # another setting
    session.cached("curves/a", lambda: compute(4), inputs={"k": 4, "dict": random_directions(4, 8, seed=1)})
    assert calls == [1, 3, 4]
    assert (Path(session.P.cache_dir) / "results" / "curves" / "a.pt").exists()


def test_keys_name_what_a_result_depends_on():
    d = random_directions(4, 8, seed=0)
    assert torch.equal(key_of(d)["directions"], d.directions)
    assert key_of(SimpleNamespace(texts=("a", "b"))) == {"texts": ["a", "b"]}
    assert key_of({"x": [1, (2, 3)]}) == {"x": [1, [2, 3]]}


@pytest.mark.parametrize("name", ["../up", "/abs", "a b", ""])
def test_cached_refuses_names_that_are_not_plain_paths(session, name):
    with pytest.raises(ValueError, match="name"):
        session.cached(name, lambda: 1)


def test_cached_typed_results_come_back_as_their_types(session):
    from helpers.results import Estimate
    from helpers.evals.reconstruction import FVU

    made = {"fit": FVU(fvu=0.25, fvu_ordinary=0.2, fvu_massive=None, massive_share=0.0), "list": [Estimate(1.0, 0.5, 1.5)]}
    first = session.cached("typed", lambda: made)
    again = session.cached("typed", lambda: pytest.fail("computed twice"))
    assert isinstance(again["fit"], FVU) and again["fit"] == made["fit"] and first["fit"] == made["fit"]


def test_trained_saes_are_kept_in_saelens_layout_under_what_they_depend_on(session):
    from helpers.saes.train import train_sae

    x = torch.randn(512, 8)
    calls = []

    def train(seed):
        calls.append(seed)
        return train_sae(x, "topk", k=2, d_sae=16, tokens=1024, batch_size=128, seed=seed, progress=False)

    a = session.trained("controls/twin", lambda: train(0), inputs={"seed": 0})
    b = session.trained("controls/twin", lambda: train(1), inputs={"seed": 0})
    assert calls == [0] and torch.equal(a.encode(x), b.encode(x)) and a.name == "twin"
    folders = list((Path(session.P.cache_dir) / "results" / "controls").iterdir())
    assert len(folders) == 1 and (folders[0] / "cfg.json").exists() and (folders[0] / "sae_weights.safetensors").exists()
    session.trained("controls/twin", lambda: train(1), inputs={"seed": 1})
    assert calls == [0, 1] and len(list(folders[0].parent.iterdir())) == 2
    with pytest.raises(ValueError, match="name"):
        session.trained("../twin", lambda: train(0))
