"""Where things live on disk: the repository, its committed data/, the git-ignored cache ($SAE_CACHE),
the local scratch folder for working copies ($SAE_SCRATCH), and results kept in the cache so that an
interrupted notebook resumes (`stored`); `sync_drive` pushes what was saved towards Google Drive on Colab."""
from __future__ import annotations

import os
import sys
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


def scratch_root() -> Path | None:
    """$SAE_SCRATCH: a fast local folder for working copies of files whose lasting copy is in the
    cache (training checkpoints), for a cache on a synced drive; None when unset. Created on demand."""
    root = os.environ.get("SAE_SCRATCH")
    if not root:
        return None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def scratch_dir(folder) -> Path | None:
    """The working folder under $SAE_SCRATCH for `folder` (a folder in the cache): the same path
    relative to the cache, or, for a folder outside it, one named by a hash of its absolute path.
    None when SAE_SCRATCH is unset."""
    root = scratch_root()
    if root is None:
        return None
    folder = Path(folder).resolve()
    try:
        rel = folder.relative_to(cache_root().resolve())
    except ValueError:
        import hashlib

        rel = Path("elsewhere") / f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:10]}"
    return root / rel


DRIVE_MOUNTS = ("/content/drive",)  # where Colab mounts Google Drive


def cache_on_drive() -> bool:
    """Whether the cache is on Colab's Google Drive mount (a synced drive that keeps replaced and
    deleted files in its trash, counted in its quota)."""
    root = str(Path(os.environ.get("SAE_CACHE") or REPO_ROOT / "cache").resolve())
    return any(root == m or root.startswith(m + "/") for m in DRIVE_MOUNTS)


def on_colab() -> bool:
    return "google.colab" in sys.modules


def sync_drive() -> None:
    """On Colab, ask the kernel to write every file's pending data out (`os.sync`), so that what a
    long step saved in the cache reaches Google Drive's own uploader; Drive then uploads in the
    background. `google.colab.drive` offers no flush short of `flush_and_unmount`, which would take
    the reader's Drive away mid-notebook. Elsewhere: nothing."""
    if on_colab():
        os.sync()


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
    sync_drive()
    return result
