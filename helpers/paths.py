"""Where things live on disk: the repository, its committed data/, and the git-ignored cache."""
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
