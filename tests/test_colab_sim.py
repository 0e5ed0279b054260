"""The Colab path, simulated offline: the five notebooks, in order, as a Colab user runs them.

What is real: the notebooks' own cells, run in a fresh kernel each, from their Colab setup cell on
(`"google.colab" in sys.modules` is true there: tests/colab_sim.py's stub); the workbook cloned with git
from a repository of this working tree and imported from the clone; the cache on the "Drive" that the
setup cell mounts; the `colab` profile, shrunk through $SAE_OVERRIDES, which also sets its device to
"cpu" (the setup cell's documented way past its GPU check); the paper's model loaded *by name*
(`EleutherAI/pythia-70m-deduped` at its pinned revision) from the local hub cache with
HF_HUB_OFFLINE=1; the Pile read from local files in its own format ($SAE_PILE); features scored on the
embedded Brown Corpus harvested through that model; the local explainer built on the embedded SmolLM2
(with no feature to explain: generating explanations on 2 CPU cores takes minutes, and notebook 03 on
the `test` profile already runs explain → simulate → score end to end).

What stands in: the model is a tiny *random* GPT-NeoX (it has learnt nothing); the install step is a
command that leaves a marker (the real install.sh is what CI runs); the Drive is a local folder, which
already holds the embedded model's dequantised copy (as a previous session leaves it). Every cell runs,
the checks included: their integrity asserts hold on any model, and their claims about the model
(helpers.runs.claims) print a verdict on it instead of failing, as on a real non-default model.

The run also measures each kernel's peak host RAM and the cache's size, which must stay within the
resource plan's estimates (helpers.runs.plan) for the same profile.
"""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from colab_sim import build
from helpers.settings.profiles import PAPER_MODEL

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_harvest", "02_train", "03_interpret", "04_baselines", "05_ablation_editing"]
# The `colab` profile at test size: every stage runs, on a few thousand tokens.
OVERRIDES = {
    "ctx_len": 64, "harvest_tokens": 4_032, "eval_tokens": 504, "score_tokens": 1_008, "batch_contexts": 16,
    "shard_contexts": 16, "pick_ratio": 2, "train_tokens": 4_096, "train_batch": 256, "ce_contexts": 2,
    "grid": {"standard": [{"tied": [True, False], "ratio": [1, 2], "l1_coefficient": 3e-3},
                          {"ratio": 2, "l1_coefficient": 3e-3, "recipe": "improved"}], "topk": {"ratio": 2, "k": 8}},
    "curve_points": 2, "curve_contexts": 1, "autointerp_features": 0, "pca_tokens": 1_008, "ica_tokens": 504,
    "ica_max_iter": 5, "ioi_prompts": 8, "pronoun_prompts": 8, "patch_layer_step": 5,
    "lab_tokens": 8_192,  # the ground-truth lab: the colab profile's 200k samples per setting took ~90 s of this test
    "device": "cpu",  # this machine has no GPU: the setup cell refuses `colab` on a CPU unless asked so explicitly
}
# The kernel's own peak RSS: VmHWM (ru_maxrss, read after exec, still holds the peak of the process that
# started the kernel: here pytest's own, whatever the notebook did).
MEASURE = """import json as _j, os as _o, resource as _r, sys as _s, helpers as _h
if _o.path.exists("/proc/self/status"):
    _rss = 1024 * int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
else:
    _rss = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss * (1 if _s.platform == "darwin" else 1024)
print("MEASURED " + _j.dumps({"rss": _rss, "helpers": _h.__file__,
                              "colab": "google.colab" in _s.modules, "profile": P.name}))"""


def _origin(root: Path) -> Path:
    """A git repository holding this working tree as it is now (tracked and untracked, not ignored files):
    the "GitHub" that the setup cell clones."""
    origin = root / "origin"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (origin / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, origin / f)
    git = ["git", "-c", "user.name=sim", "-c", "user.email=sim@localhost", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run(git + cmd, cwd=origin, check=True)
    return origin


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def colab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("colab")
    env = build(root / "sim")
    env.update(WORKBOOK_REPO=str(_origin(root)), WORKBOOK_DIR=str(root / "content" / "sae-workbook"),
               WORKBOOK_INSTALL="touch installed-by-setup-cell", WORKBOOK_DRIVE=str(root / "drive"),
               SAE_OVERRIDES=json.dumps(OVERRIDES),
               SAE_SCRATCH=str(root / "content" / "sae-scratch"))  # the VM's disk, in the test's own folder
    # The embedded model's dequantised copy (notebook 03's local explainer), as a previous session left it
    # on the Drive: dequantising it again is tested in test_models.py.
    from helpers.activations.models import embedded_model_dir

    models = root / "drive" / "MyDrive" / "sae-workbook-cache" / "models"
    models.mkdir(parents=True)
    shutil.copytree(embedded_model_dir(), models / embedded_model_dir().name, copy_function=_link_or_copy)
    results = {"root": root, "notebooks": {}}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("SAE_PROFILE", "SAE_CACHE", "AUTOINTERP_URL"):
            mp.delenv(key, raising=False)  # as on a fresh Colab VM: the setup cell chooses
        for key, value in env.items():
            mp.setenv(key, value)
        for name in NOTEBOOKS:
            nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
            nb.cells.append(nbformat.v4.new_code_cell(MEASURE))
            t = time.perf_counter()
            NotebookClient(nb, timeout=600, startup_timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(root)}}).execute()
            out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
            measured = json.loads(out.split("MEASURED ", 1)[1])
            results["notebooks"][name] = {**measured, "seconds": time.perf_counter() - t, "nb": nb}
    results["env"] = env
    return results


def test_every_notebook_runs_as_on_colab(colab_run):
    root = colab_run["root"]
    clone = root / "content" / "sae-workbook"
    assert (clone / "installed-by-setup-cell").exists(), "the setup cell did not run the install step in the clone"
    for name, r in colab_run["notebooks"].items():
        assert r["colab"] and r["profile"] == "colab", (name, r)
        assert Path(r["helpers"]).is_relative_to(clone), f"{name} imported helpers from {r['helpers']}, not the clone"
    def printed(name):
        return "".join(o.get("text", "") for c in colab_run["notebooks"][name]["nb"].cells
                       for o in c.get("outputs", []) if o.get("output_type") == "stream")

    # A Pile context is traced back to its own text, not to an unrelated Brown document (doc = -1).
    assert "a streamed document (" in printed("01_harvest") and "document ca01" not in printed("01_harvest")
    assert "0.0% of tokens carry a POS tag" in printed("01_harvest")
    # The checks ran to their end on a model their claims were not measured on, reporting verdicts.
    for name in NOTEBOOKS:
        out = printed(name)
        assert "checks passed" in out, name
        assert f"claim holds on {PAPER_MODEL} / pile" in out or f"claim does not hold on {PAPER_MODEL} / pile" in out, name
    # Pythia cannot chat: notebook 03's local explainer is the embedded SmolLM2; features are scored on Brown.
    assert "backend: local-smollm2-135m-instruct" in printed("03_interpret")
    assert "tokens of brown" in printed("03_interpret")
    seconds = {n: round(r["seconds"]) for n, r in colab_run["notebooks"].items()}
    print("simulated Colab run, seconds per notebook:", seconds, "total", sum(seconds.values()))


def test_the_cache_is_on_drive_and_holds_every_artifact(colab_run):
    cache = colab_run["root"] / "drive" / "MyDrive" / "sae-workbook-cache" / "colab"
    stores = {json.loads(m.read_text())["corpus"] + "/" + json.loads(m.read_text())["split"]: json.loads(m.read_text())
              for m in (cache / "activations").glob("*/manifest.json")}
    assert set(stores) == {"pile/train", "pile/test", "brown/train"}, sorted(stores)
    for m in stores.values():
        assert m["model"] == "EleutherAI/pythia-70m-deduped" and m["complete"], m
    assert all(s.get("next_resume") is not None for s in stores["pile/train"]["shards"]), \
        "Pile shards must record where the stream stands, so that a harvest resumes without re-reading"
    results = list((cache / "sae").glob("sweep-*/results.json"))
    assert results, "notebook 02 saved no sweep"
    saes = list(results[0].parent.glob("*/cfg.json"))
    assert len(saes) >= 5 and all((p.parent / "sae_weights.safetensors").exists() for p in saes)


def test_measured_peaks_within_the_plan(colab_run):
    """The plan for the same profile, made as notebook 01 makes it (in a process with the run's
    environment, so that it reads the stand-in's dimensions), bounds the measured peaks."""
    import sys

    code = ("import json; from helpers.runs.plan import plan; from helpers.settings.profiles import get_profile; "
            "p = plan(get_profile('colab')); print(json.dumps({'host': p.host_peak, 'disk': p.disk_bytes, "
            "'parts': p.host}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **colab_run["env"]}, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    p = json.loads(out.strip().splitlines()[-1])
    cache = colab_run["root"] / "drive" / "MyDrive" / "sae-workbook-cache"
    disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    rss = {n: r["rss"] for n, r in colab_run["notebooks"].items()}
    print(f"plan: host peak {p['host'] / 1e9:.2f} GB, disk {p['disk'] / 1e9:.3f} GB; measured: peak RSS "
          + ", ".join(f"{n[:2]} {v / 1e9:.2f} GB" for n, v in rss.items()) + f", cache {disk / 1e9:.3f} GB")
    assert max(rss.values()) <= p["host"], (rss, p)
    assert disk <= p["disk"], (disk, p)
