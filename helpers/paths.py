"""Where things live on disk: the repository, its committed data/, the git-ignored cache, and results
kept there so that an interrupted notebook resumes (`stored`)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository's data/ (a clone, or an editable install); in a non-editable `pip install .` the same
# files are installed inside the package as helpers/data (pyproject.toml maps them there).
DATA_DIR = REPO_ROOT / "data" if (REPO_ROOT / "data" / "brown.json.xz").exists() else Path(__file__).resolve().parent / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def cache_root() -> Path:
    """$SAE_CACHE, else ``cache/`` in the repository (git-ignored). Created on demand."""
    root = Path(os.environ.get("SAE_CACHE") or REPO_ROOT / "cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


def stored(path, key, compute):
    """`compute()`'s result, kept on disk: saved to `path` (atomically, with `key`) the first time and
    loaded afterwards while the key is the same, so that a notebook interrupted half-way (a closed laptop,
    a Colab VM recycled) resumes where it stopped. `key` is anything comparable that names every setting
    the result depends on; the result is anything `torch.save` can write."""
    import torch

    path = Path(path)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved.get("key") == key:
            return saved["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "result": result}, tmp)
    os.replace(tmp, path)
    return result
