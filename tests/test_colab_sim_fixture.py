"""The offline Colab simulation (tests/colab_sim.py): stand-in hub model, Pile files, google.colab stub.

Every check that needs the simulated environment runs in a fresh interpreter, because
huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is first imported.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PAPER_MODEL
from helpers.activations import models
from helpers.activations.corpus import PILE_SUBSETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import colab_sim  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("colab_sim")
    return root, colab_sim.build(root)


def test_build_returns_the_environment(sim):
    root, env = sim
    assert set(env) == {"HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SAE_PILE", "SAE_PILE_TEST", "PYTHONPATH"}
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    for key in ("HF_HOME", "SAE_PILE", "SAE_PILE_TEST"):
        assert Path(env[key]).is_relative_to(root)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(root / "colab")
    repo = Path(env["HF_HOME"]) / "hub" / "models--EleutherAI--pythia-70m-deduped"
    revision = models.hub_revision(PAPER_MODEL)
    assert (repo / "refs" / "main").read_text() == revision
    assert (repo / "snapshots" / revision / "model.safetensors").exists()
    config = json.loads((repo / "snapshots" / revision / "config.json").read_text())
    assert config["workbook_stand_in"] is True and config["num_hidden_layers"] == 6
    assert config["max_position_embeddings"] >= 256


LOAD = """
import json, sys, torch
from helpers import PAPER_MODEL
from helpers.activations.models import load_model, is_stand_in
m = load_model(PAPER_MODEL, device="cpu")
names = [f"blocks.{i}.hook_resid_post" for i in range(6)]
tok = m.tokenizer
x = torch.tensor([[tok.bos_token_id] + tok("The cat sat on the mat.", add_special_tokens=False).input_ids])
with torch.inference_mode():
    out, cache = m.run_with_cache(x, names_filter=lambda n: n in names[:3], stop_at_layer=3)
    logits = m(x)
print(json.dumps({
    "name": m.workbook_name, "revision": m.workbook_revision, "stand_in": is_stand_in(m),
    "n_layers": m.cfg.n_layers, "n_ctx": m.cfg.n_ctx, "d_model": m.cfg.d_model,
    "hooks": [n for n in names if n in m.hook_dict], "cached": sorted(cache.keys()),
    "cache_shape": list(cache[names[2]].shape), "out_shape": list(out.shape),
    "logits_shape": list(logits.shape), "bos": tok.bos_token_id, "colab": "google.colab" in sys.modules,
}))
"""


def test_paper_model_loads_by_name_offline(sim):
    _, env = sim
    done = run_python(LOAD, env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["name"] == PAPER_MODEL and got["revision"] == models.hub_revision(PAPER_MODEL)
    assert got["stand_in"] and got["colab"]
    assert got["n_layers"] == 6 and got["n_ctx"] >= 256 and got["bos"] == 0
    assert got["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(6)]
    n = got["cache_shape"][1]
    assert got["cached"] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert got["cache_shape"] == [1, n, got["d_model"]] and got["out_shape"] == [1, n, got["d_model"]]
    assert got["logits_shape"] == [1, n, 49152]


def test_embedded_model_is_not_a_stand_in(model):
    assert not models.is_stand_in(model)


def test_only_the_pinned_revision_is_found(tmp_path):
    """A cache holding the model under another revision does not count: offline, loading fails."""
    other = "f" * 40
    colab_sim._write_hub_cache(tmp_path / "hub", PAPER_MODEL, other)
    code = ("from helpers import PAPER_MODEL, ModelUnavailable, load_model\n"
            "try:\n    load_model(PAPER_MODEL, device='cpu')\nexcept ModelUnavailable as e:\n"
            "    print('unavailable', e)\n")
    done = run_python(code, {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("unavailable") and models.hub_revision(PAPER_MODEL) in done.stdout


def test_a_branch_pin_is_resolved_through_refs(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    snapshot = colab_sim._write_hub_cache(tmp_path, PAPER_MODEL, "step143000")
    assert snapshot.name == colab_sim.FAKE_COMMIT
    found = try_to_load_from_cache(PAPER_MODEL, "config.json", cache_dir=tmp_path, revision="step143000")
    assert found == str(snapshot / "config.json")
    assert try_to_load_from_cache(PAPER_MODEL, "config.json", cache_dir=tmp_path) is None  # not main


def test_colab_stub_is_imported_at_startup(sim):
    _, env = sim
    code = ("import sys; print('google.colab' in sys.modules)\n"
            "import google.protobuf  # the installed google.* namespace stays importable\n"
            "from google.colab import drive; drive.mount(sys.argv[1] if len(sys.argv) > 1 else 'x')\n")
    done = subprocess.run([sys.executable, "-c", code, str(Path(env["HF_HOME"]).parent / "content" / "drive")],
                          env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert (Path(env["HF_HOME"]).parent / "content" / "drive" / "MyDrive").is_dir()
    plain = subprocess.run([sys.executable, "-c", "import sys; print('google.colab' in sys.modules)"],
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                           capture_output=True, text=True)
    assert plain.stdout.strip() == "False"


def test_pile_files_are_in_the_piles_format(sim):
    import glob

    _, env = sim
    files = sorted(glob.glob(env["SAE_PILE"]))
    assert len(files) == colab_sim.PILE_FILES
    rows = []
    for f in files:
        data = Path(f).read_bytes()
        if f.endswith(".zst"):
            import zstandard

            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        rows += [json.loads(line) for line in data.decode("utf-8").splitlines()]
    size = sum(len(r["text"].encode("utf-8")) for r in rows)
    assert 1e6 < size < 3e6
    subsets = {r["meta"]["pile_set_name"] for r in rows}
    assert len(subsets & set(PILE_SUBSETS)) >= 10 and subsets - set(PILE_SUBSETS)
