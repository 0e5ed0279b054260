"""Memory that a process on a CPU frees, kept for its next tensors.

Training steps and a model's forward passes free and reallocate tensors of tens to hundreds of MB (a
stack's gradients, codes and pre-activations; a pass's logits, [tokens, vocabulary]). glibc's malloc hands
blocks that large back to the system when they are freed and maps them again, zero-filled page by page, when
they are next allocated: on a CPU that costs system time at every step and every pass. `keep_freed_memory()`
asks malloc to keep them instead (docs/performance.md measures both); the process then keeps up to its peak
memory until it exits. The first training step and the first model loaded on a CPU ask for it, once per
process; ``SAE_KEEP_FREED_MEMORY=0`` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEEP_MEMORY_VAR = "SAE_KEEP_FREED_MEMORY"
_kept: bool | None = None


def asked() -> bool:
    """Whether this process has already asked (whatever the answer)."""
    return _kept is not None


def keep_freed_memory() -> bool:
    """Ask the C library's malloc (glibc, on Linux) to keep the memory the process frees for its next
    tensors, instead of handing it back to the system. Once per process; ``SAE_KEEP_FREED_MEMORY=0`` leaves
    malloc as it is. Returns whether it is in effect."""
    global _kept
    if _kept is None:
        _kept = False
        if os.environ.get(KEEP_MEMORY_VAR, "1") != "0" and sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl and others have none
            except (OSError, AttributeError):
                mallopt = None
            if mallopt is not None:
                _kept = all(mallopt(param, value) == 1 for param, value in (
                    (_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 28)))
    return _kept
