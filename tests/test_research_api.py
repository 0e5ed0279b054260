"""The "Use it in your own research" section of docs/research.md, run as it is written: in a fresh process that has
the installed package, a plain Hugging Face model and nothing else (no profile, no store, no cache).

The section names the paper's model, ``EleutherAI/pythia-70m-deduped``; offline, the test saves a small
random model of the same family (GPT-NeoX, 6 layers) in a folder and gives the snippets that folder's
path instead. The snippets run one after another, as a reader pastes them; a failure names the snippet."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Use it in your own research"
MODEL_NAME = "EleutherAI/pythia-70m-deduped"


def snippets(page: Path = ROOT / "docs" / "research.md") -> list[str]:
    text = page.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_teaches_every_method_with_plain_objects():
    code = "\n".join(snippets())
    for name in ("train_sae", "reconstruction", "ce_loss_recovered", "heldout_scores", "random_directions",
                 "top_contexts", "patch_features", "steer", "load_sae"):
        assert re.search(rf"\b{name}\(", code), f"the research section never calls {name}"
    for plumbing in ("get_profile", "get_store", "get_sweep", "stored(", "SAE_PROFILE", "ActivationStore"):
        assert plumbing not in code, f"the research section uses the notebooks' plumbing: {plumbing}"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from colab_sim import write_model

    folder = tmp_path_factory.mktemp("pythia-stand-in")
    write_model(folder)
    return folder


def test_the_snippets_run_in_a_fresh_process(model_folder, tmp_path):
    parts = []
    for i, code in enumerate(snippets(), 1):
        code = code.replace(MODEL_NAME, str(model_folder))
        parts.append(f"print({json.dumps(f'--- snippet {i}')}, flush=True)\n{code}")
    script = tmp_path / "research.py"
    script.write_text("\n".join(parts))
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "no-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_")}
    env.update(SAE_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    shown = run.stdout[-6000:] + run.stderr[-6000:]
    done = re.findall(r"--- snippet (\d+)", run.stdout)
    assert run.returncode == 0, f"snippet {done[-1] if done else 1} failed:\n{shown}"
    assert len(done) == len(snippets())
    assert not cache.exists(), f"the snippets wrote into the workbook's cache: {sorted(cache.rglob('*'))[:5]}"


def test_the_package_imports_each_name_on_first_use():
    """`helpers` exports every name of its `__all__`, each loaded when first asked for: a process that
    needs the cache's locks alone does not load torch (scripts, subprocesses and workers start at once)."""
    import helpers

    code = "import sys, helpers.settings.locks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False"], out.stdout + out.stderr
    assert all(hasattr(helpers, n) for n in helpers.__all__) and set(helpers.__all__) <= set(dir(helpers))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        helpers.not_a_name  # noqa: B018
