"""Hook names: `blocks.{layer}.hook_{kind}` built and parsed in one place.

TransformerLens names a block's hook points `blocks.<layer>.<kind>` (`blocks.6.hook_resid_post`); the
workbook's profiles name a kind (`resid_post`) and layers. Every module builds a name with `name` and reads
a layer back with `layer_of`.
"""
from __future__ import annotations

import re

BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def name(layer: int, kind: str = "resid_post") -> str:
    """The hook at a layer: name(6, "resid_post") == "blocks.6.hook_resid_post"."""
    return f"blocks.{int(layer)}.hook_{kind.removeprefix('hook_')}"


def layer_of(hook: str) -> int:
    """The layer of a block hook ("blocks.6.hook_resid_post" -> 6); ValueError for other hooks."""
    m = BLOCK_HOOK.match(hook)
    if not m:
        raise ValueError(f"{hook!r} is not a block hook (blocks.<layer>.<kind>)")
    return int(m.group(1))


def is_block_hook(hook: str) -> bool:
    return BLOCK_HOOK.match(hook) is not None


def blocks_before(hook: str) -> int:
    """How many blocks come before `hook` in the residual stream: a forward pass that replaces the whole
    activation at `hook` does not need their outputs. `blocks.L.hook_resid_pre` (or `hook_in`) follows L
    blocks, `blocks.L.hook_resid_post` (or `hook_out`) L + 1. Any other hook (inside a block, or not a
    block hook) gives 0: what comes after it also reads the block's input."""
    m = BLOCK_HOOK.match(hook)
    if not m:
        return 0
    layer, kind = int(m.group(1)), m.group(2)
    return {"hook_resid_pre": layer, "hook_in": layer, "hook_resid_post": layer + 1, "hook_out": layer + 1}.get(kind, 0)
