"""Where things live on disk: the repository, its committed data/, the git-ignored cache ($SAE_CACHE),
the local scratch folder for working copies ($SAE_SCRATCH), and results kept in the cache so that an
interrupted notebook resumes (`stored`); `sync_drive` pushes what was saved towards Google Drive on Colab."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers.settings.locks import tmp_name

REPO_ROOT = Path(__file__).resolve().parents[2]
# The repository's data/ (a clone, or an editable install); in a non-editable `pip install .` the same
# files are installed inside the package as helpers/data (pyproject.toml maps them there).
DATA_DIR = REPO_ROOT / "data" if (REPO_ROOT / "data" / "brown.json.xz").exists() else Path(__file__).resolve().parents[1] / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def _env_dir(var: str) -> Path | None:
    """The folder named by environment variable `var`, or None when it is unset or empty. ``~`` is
    expanded and a relative path is resolved against the current directory the first time it is read;
    the absolute path is written back into os.environ, so that the notebook kernels a run starts (whose
    current directory is notebooks/) and every later call find the same folder."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    folder = Path(raw).expanduser()
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    folder = Path(os.path.abspath(folder))
    if str(folder) != raw:
        os.environ[var] = str(folder)
    return folder


def cache_root() -> Path:
    """$SAE_CACHE, else ``cache/`` in the repository (git-ignored). Created on demand. A relative
    $SAE_CACHE is taken relative to the directory the first call runs in (see `_env_dir`)."""
    root = _env_dir("SAE_CACHE") or REPO_ROOT / "cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def scratch_root() -> Path | None:
    """$SAE_SCRATCH: a fast local folder for working copies of files whose lasting copy is in the
    cache (training checkpoints), for a cache on a synced drive; None when unset. Created on demand.
    ``~`` and relative paths are read as for $SAE_CACHE."""
    root = _env_dir("SAE_SCRATCH")
    if root is None:
        return None
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
        rel = Path("elsewhere") / f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:10]}"
    return root / rel


DRIVE_MOUNTS = ("/content/drive",)  # where Colab mounts Google Drive


def cache_on_drive() -> bool:
    """Whether the cache is on Colab's Google Drive mount (a synced drive that keeps replaced and
    deleted files in its trash, counted in its quota)."""
    root = str((_env_dir("SAE_CACHE") or REPO_ROOT / "cache").resolve())
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


# ------------------------------------------------------------------------------------ stored results

STORED_FORMAT = "helpers.settings.paths.stored/1"
_MARKERS = ("__tuple__", "__items__", "__tensor__", "__ndarray__")
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, a bare pickle


def code_digest(*code) -> dict[str, str]:
    """{module name: SHA-256 of its source file (16 hex digits)} for each module in `code`: a module,
    its name ("helpers.causal.patching"), or a function or class, which stands for the module it is defined in."""

    out = {}
    for obj in code:
        module = importlib.import_module(obj) if isinstance(obj, str) else obj if inspect.ismodule(obj) \
            else inspect.getmodule(obj)
        source = getattr(module, "__file__", None)
        if module is None or not source:
            raise ValueError(f"code: {obj!r} is not a module with a source file (nor defined in one)")
        out[module.__name__] = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    return dict(sorted(out.items()))


def _key_tree(key, where="key"):
    """`key` as plain JSON values: tuples become lists, other dicts' keys sorted item lists, paths
    strings, tensors and arrays a hash of their dtype, shape and bytes."""

    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, Path):
        return str(key)
    if isinstance(key, (list, tuple)):
        return [_key_tree(v, f"{where}[{i}]") for i, v in enumerate(key)]
    if isinstance(key, dict):
        if all(isinstance(k, str) for k in key):
            return {k: _key_tree(v, f"{where}[{k!r}]") for k, v in key.items()}
        return {"__items__": sorted(([_key_tree(k, where), _key_tree(v, f"{where}[{k!r}]")] for k, v in key.items()),
                                    key=repr)}
    if isinstance(key, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(key).detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": [str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest()]}
    raise TypeError(f"stored: {where} is a {type(key).__name__}; a key holds str, numbers, bools, None, "
                    "lists, tuples, dicts, paths and tensors")


def digest(key, code=()) -> str:
    """A short hash (12 hex digits) of `key` and the source of the modules in `code` (`code_digest`),
    for naming files whose contents depend on them."""

    text = json.dumps([_key_tree(key), code_digest(*code)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _encode(obj, tensors: dict, where: str):
    """`obj` as JSON values, its tensors and numpy arrays moved into `tensors` (name -> tensor)."""

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _MARKERS):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    if isinstance(obj, np.ndarray) and obj.dtype != object and obj.dtype.kind in "biuf":
        name = str(len(tensors))
        tensors[name] = torch.from_numpy(np.array(obj, copy=True, order="C"))
        return {"__ndarray__": name}
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    raise TypeError(f"stored: the result's {where} is a {type(obj).__name__}, which the cache cannot keep without "
                    "pickling: store plain values (str, numbers, bools, None, lists, tuples, dicts, tensors, "
                    "numeric numpy arrays), e.g. an object's to_dict(), and rebuild it after loading")


def _decode(tree, tensors: dict):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if len(tree) == 1:
            (marker, value), = tree.items()
            if marker == "__tuple__":
                return tuple(_decode(v, tensors) for v in value)
            if marker == "__items__":
                return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
            if marker == "__tensor__":
                return tensors[value]
            if marker == "__ndarray__":
                return tensors[value].numpy()
        return {k: _decode(v, tensors) for k, v in tree.items()}
    return tree


class _Refused(Exception):
    """A file at a stored() path that is not read (its reason is the message)."""


def _read_stored(path: Path, want_key: str, want_code: dict):
    """The result kept in the stored() file `path` if its key and code are `want_key` and `want_code`,
    else None (after saying which code changed); _Refused for a file that is not a stored result."""

    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file begins with its header's length (8 bytes, little-endian; its first byte may be the
    # pickle's \x80) and then the header's "{"
    is_safetensors = head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    if not is_safetensors and head.startswith(_PICKLE_STARTS):
        raise _Refused("it is a pickle (an older cache format, or a file from elsewhere); unpickling could run "
                       "code, so it is not loaded")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != STORED_FORMAT:
                raise _Refused(f"it is not a stored result (format {meta.get('format')!r}, not {STORED_FORMAT!r})")
            code = json.loads(meta["code"])
            if meta["key"] != want_key:
                return None
            if code != want_code:
                changed = sorted(m for m in set(code) | set(want_code) if code.get(m) != want_code.get(m))
                print(f"{path.name}: computing again, since the code of {', '.join(changed)} changed")
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            return (_decode(json.loads(meta["result"]), tensors),)
    except _Refused:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: the reader says what is wrong
        raise _Refused(f"it is not a complete stored result ({type(e).__name__}: {e})") from None


def stored(path, key, compute, code=()):
    """`compute()`'s result, kept on disk: saved to `path` the first time and loaded afterwards while
    its key and code are the same, so that a notebook interrupted half-way (a closed laptop, a Colab VM
    recycled) resumes where it stopped.

    `key` names every input the result depends on (settings, prompts, a fingerprint of a dictionary):
    str, numbers, bools, None, lists, tuples, dicts, paths and tensors (compared by their bytes).
    `code` is the modules (or their names, or functions or classes standing for their modules) whose code
    computes the result from those inputs: the hash of each one's source file is kept with the result,
    and an edit to any of them computes it again. Name the modules that do the computation, not the
    whole package (an edit anywhere would recompute everything) nor the ones that built the inputs
    (their outputs are named in `key`); a computation that trains or fits something inside it names
    that code too.

    The result is plain data: str, numbers, bools, None, lists, tuples, dicts (any of these as keys),
    tensors and numeric numpy arrays; an object is stored as its to_dict() and rebuilt by the caller.
    The file is safetensors (the tensors) with the rest as JSON in its header: reading it runs no code.
    A file at `path` that is not one (a pickle of an older version, a truncated write, something else)
    is never loaded: a warning names it and the result is computed again and replaces it. The file is
    written under a temporary name unique to the process, then renamed into place."""

    path = Path(path)
    want_key = json.dumps(_key_tree(key), sort_keys=True, separators=(",", ":"))
    want_code = code_digest(*code)
    if path.exists():
        try:
            found = _read_stored(path, want_key, want_code)
        except _Refused as e:
            warnings.warn(f"{path}: {e}; computing it again", stacklevel=2)
        else:
            if found is not None:
                return found[0]
    result = compute()
    tensors: dict = {}
    tree = json.dumps(_encode(result, tensors, "result"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        save_file(tensors, str(tmp), metadata={"format": STORED_FORMAT, "key": want_key,
                                               "code": json.dumps(want_code), "result": tree})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_drive()
    return result


_env_dir("SAE_CACHE")  # a relative path is read against the directory this process started in
_env_dir("SAE_SCRATCH")
