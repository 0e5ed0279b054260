"""An offline stand-in for Colab running the paper's setting, for the test suite.

`build(root)` writes, under `root` only:

* ``hf_home/hub``: a Hugging Face hub cache in the real layout
  (``models--EleutherAI--pythia-70m-deduped/{blobs,refs,snapshots}``) holding, at the revision
  that `helpers.activations.models` pins, a tiny *random* ``GPTNeoXForCausalLM`` shaped like Pythia-70M where
  it matters (6 layers, parallel attention + MLP, partial rotary embeddings, 2048 positions) but
  with ``d_model`` 64 and 4 heads. Its ``config.json`` carries ``workbook_stand_in: true``
  (`helpers.activations.models.is_stand_in`). Pythia's tokenizer is not available offline, so the embedded
  SmolLM2 tokenizer (vocabulary 49,152) stands in, with Pythia's special tokens: BOS = EOS = UNK =
  ``<|endoftext|>`` (id 0) and no pad token. It loads *by name* through the normal hub path,
  ``load_model(PAPER_MODEL)``, with ``HF_HUB_OFFLINE=1``.
* ``pile/*.jsonl.zst`` (``.jsonl`` without ``zstandard``): about 2 MB of Brown Corpus documents
  in the Pile's format, one ``{"text": ..., "meta": {"pile_set_name": ...}}`` per line, with
  Pile subset names drawn from `helpers.activations.corpus.PILE_SUBSETS` (plus one name outside that list).
* ``colab/``: a stub ``google.colab`` package (``drive.mount(path)`` creates ``path/MyDrive``) and
  a ``sitecustomize.py`` that imports it at interpreter start, so that with ``PYTHONPATH`` set
  every Python process (a notebook kernel included) sees ``"google.colab" in sys.modules``.

It returns the environment variables a test sets for the processes it starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

PILE_BYTES = 2_000_000   # text written in the Pile format, in total
PILE_FILES = 2           # split across this many files
# The commit hash refs/<branch> points to when the pin is a branch or tag name (a made-up one).
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER_FILES = ("tokenizer.json",)
SPECIAL = "<|endoftext|>"


def _is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def stand_in_config(vocab_size: int = 49152):
    """A Pythia-70M-like GPT-NeoX config, shrunk to d_model 64 (marked as the stand-in)."""
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=256, hidden_act="gelu", max_position_embeddings=2048,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
        initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        attention_bias=True,
    )
    config.architectures = ["GPTNeoXForCausalLM"]
    setattr(config, "workbook_stand_in", True)
    return config


def _tokenizer_source() -> Path:
    """A folder holding the embedded SmolLM2 tokenizer.json (from the workbook's cache if built)."""
    from helpers.activations.models import embedded_model_dir

    return embedded_model_dir()


def write_model(snapshot: Path, seed: int = 0) -> None:
    """Save the random stand-in (weights, config, tokenizer) into `snapshot`."""
    import torch
    from transformers import GPTNeoXForCausalLM

    source = _tokenizer_source()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, snapshot / name)
    vocab = json.loads((snapshot / "tokenizer.json").read_text(encoding="utf-8"))
    special_id = next(t["id"] for t in vocab["added_tokens"] if t["content"] == SPECIAL)
    assert special_id == 0, f"{SPECIAL} is id {special_id} in the embedded tokenizer, expected 0"
    # Pythia's special tokens: BOS = EOS = UNK = <|endoftext|> (id 0), no pad token.
    (snapshot / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": SPECIAL, "eos_token": SPECIAL,
        "unk_token": SPECIAL, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 1000000000000000019884624838656}, indent=2))
    (snapshot / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": SPECIAL, "eos_token": SPECIAL, "unk_token": SPECIAL}, indent=2))

    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(stand_in_config()).eval()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards": noise in a test log
    try:
        model.save_pretrained(snapshot)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _write_hub_cache(hub: Path, repo_id: str, revision: str, seed: int = 0) -> Path:
    """Write `repo_id` at `revision` into hub cache `hub` in huggingface_hub's layout."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = revision if _is_commit(revision) else FAKE_COMMIT
    staging = repo / "staging"
    staging.mkdir(parents=True)
    write_model(staging, seed)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(staging.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # LFS blobs are named by sha256
        f.replace(blob)
        try:
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        except OSError:  # no symlinks here: huggingface_hub then copies too
            shutil.copyfile(blob, snapshot / f.name)
    staging.rmdir()
    (repo / "refs").mkdir()
    ref = "main" if _is_commit(revision) else revision
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def _pieces(text: str, size: int = 1500) -> list[str]:
    """`text` cut into pieces of about `size` characters, each ending at a sentence end."""
    out, start = [], 0
    while start < len(text):
        end = text.find(". ", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end].strip())
        start = end
    return [p for p in out if p]


def write_pile(folder: Path, total_bytes: int = PILE_BYTES, n_files: int = PILE_FILES,
               seed: int = 0) -> tuple[str, str]:
    """Brown Corpus documents in the Pile's jsonl(.zst) format: `n_files` training files and one
    held-out file (`val`, other documents, as the Pile's val.jsonl.zst); returns (training glob, val path)."""
    import random

    from helpers.activations.corpus import PILE_SUBSETS, load_brown

    try:
        import zstandard
    except ImportError:
        zstandard = None
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = list(load_brown().docs)
    rng.shuffle(docs)
    val_docs, docs = docs[:40], docs[40:]
    names = PILE_SUBSETS + ["Unlisted Subset"]  # one name outside PILE_SUBSETS ("other")
    # Pile documents are mostly far shorter than a Brown sample: one row per ~1,500 characters (cut at a
    # sentence end), so that a small harvest already spans many rows and subsets, as the real Pile's does.
    texts = [piece for doc in docs for piece in _pieces(doc.text)]
    lines, size = [], 0
    for i, text in enumerate(texts):
        if size >= total_bytes:
            break
        line = json.dumps({"text": text, "meta": {"pile_set_name": names[i % len(names)]}}) + "\n"
        lines.append(line)
        size += len(line.encode("utf-8"))
    suffix = ".jsonl.zst" if zstandard else ".jsonl"
    per_file = -(-len(lines) // n_files)
    for k in range(n_files):
        data = "".join(lines[k * per_file:(k + 1) * per_file]).encode("utf-8")
        path = folder / f"{k:02d}{suffix}"
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data) if zstandard else data)
    val = folder / "val" / f"val{suffix}"
    val.parent.mkdir()
    data = "".join(json.dumps({"text": d.text, "meta": {"pile_set_name": names[i % len(names)]}}) + "\n"
                   for i, d in enumerate(val_docs)).encode("utf-8")
    val.write_bytes(zstandard.ZstdCompressor(level=3).compress(data) if zstandard else data)
    return str(folder / f"*{suffix}"), str(val)


SITECUSTOMIZE = '''"""Test stub: behave as a Colab kernel, where google.colab is always imported."""
import importlib.util as _util
import os as _os
import sys as _sys

import google.colab  # noqa: F401  (the notebooks test "google.colab" in sys.modules)

# Run the sitecustomize that this file shadows, if there is one further down sys.path.
_here = _os.path.dirname(_os.path.abspath(__file__))
for _entry in _sys.path:
    _candidate = _os.path.join(_entry or ".", "sitecustomize.py")
    if _os.path.abspath(_entry or ".") != _here and _os.path.isfile(_candidate):
        _spec = _util.spec_from_file_location("_shadowed_sitecustomize", _candidate)
        _spec.loader.exec_module(_util.module_from_spec(_spec))
        break
'''

DRIVE = '''"""Test stub of google.colab.drive: mounting creates MyDrive under the mount point."""
import os


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    os.makedirs(os.path.join(mountpoint, "MyDrive"), exist_ok=True)


def flush_and_unmount(timeout_ms=24 * 3600 * 1000):
    pass
'''


def write_colab_stub(folder: Path) -> Path:
    """The stub ``google.colab`` package and the sitecustomize.py that imports it."""
    colab = folder / "google" / "colab"
    colab.mkdir(parents=True, exist_ok=True)
    # A pkgutil-style namespace: the installed google.* packages (protobuf, ...) stay importable.
    (folder / "google" / "__init__.py").write_text(
        "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    (colab / "__init__.py").write_text('"""Test stub of the google.colab package."""\nfrom . import drive\n')
    (colab / "drive.py").write_text(DRIVE)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def build(root: Path, seed: int = 0) -> dict[str, str]:
    """Write the stand-in hub cache, Pile files and Colab stub under `root`; return the env to set.

    The returned variables are HF_HOME, HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, SAE_PILE (a
    glob of the Pile-format training files), SAE_PILE_TEST (the held-out file) and PYTHONPATH (the stub folder, followed by any PYTHONPATH
    already set). `root` must be empty or absent.
    """
    from helpers.activations.models import hub_revision
    from helpers.settings.profiles import PAPER_MODEL

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    hf_home = root / "hf_home"
    _write_hub_cache(hf_home / "hub", PAPER_MODEL, hub_revision(PAPER_MODEL) or "main", seed)
    pile, pile_test = write_pile(root / "pile", seed=seed)
    stub = write_colab_stub(root / "colab")
    path = os.pathsep.join(p for p in (str(stub), os.environ.get("PYTHONPATH", "")) if p)
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "SAE_PILE": pile, "SAE_PILE_TEST": pile_test, "PYTHONPATH": path}


if __name__ == "__main__":  # python tests/colab_sim.py ROOT: build and print the env as shell exports
    import shlex
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for key, value in build(Path(sys.argv[1])).items():
        print(f"export {key}={shlex.quote(value)}")
