"""Harvest: one language-model pass over a corpus, writing activations of chosen hooks to a store.

`harvest` runs the model on fixed-length contexts (helpers.activations.corpus), caches only the requested
hooks, stops the forward pass after the deepest requested layer, drops the BOS position, and
writes shards through `helpers.activations.store.StoreWriter`. An interrupted harvest resumes where it
stopped: contexts are produced in a fixed order, so the next one is known from the manifest; for
the Pile each shard also records where the stream stands after it (`next_resume`), so resuming
seeks there instead of re-reading and re-tokenising every earlier document.
`get_store(profile)` is what notebooks call: open the profile's store, harvesting what is missing.
`collect(model, tokens, hook)` gives the activations of plain token ids, and `model_summary(model)` what
a model is (layers, width, vocabulary, parameters, device).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.activations.corpus import corpus_labels, iter_contexts
from helpers.activations.hooks import BLOCK_HOOK
from helpers.activations.models import hooked, load_model
from helpers.activations.store import META_DTYPE, ActivationStore, CorruptShard, StoreError, StoreWriter
from helpers.results import Result

# Hooks that stop_at_layer cannot cut short (they come after the last block).
_FINAL_HOOKS = ("ln_final.", "unembed.", "hook_unembed")


def model_name(model) -> str:
    return getattr(model, "workbook_name", None) or model.cfg.model_name


@dataclass
class ModelSummary(Result):
    """What a model is: its name, layers, residual width, vocabulary, parameters and device."""

    name: str = ""
    n_layers: int = 0
    d_model: int = 0
    d_vocab: int = 0
    parameters: int = 0
    device: str = ""

    def verdicts(self) -> list[str]:
        return [f"{self.name}: {self.n_layers} layers, d_model={self.d_model}, vocabulary {self.d_vocab:,}, "
                f"{self.parameters / 1e6:.0f}M parameters, on {self.device}"]


def model_summary(model) -> ModelSummary:
    """`model` (TransformerLens-style, or a plain Hugging Face causal LM) in numbers."""
    model = hooked(model)
    cfg = model.cfg
    return ModelSummary(model_name(model), cfg.n_layers, cfg.d_model, cfg.d_vocab,
                        sum(p.numel() for p in model.parameters()), str(model_device(model)))


def valid_hooks(model) -> list[str]:
    """Every hook name the model accepts: raw hook points and TransformerLens-style aliases."""
    names = set(model.hook_dict)
    for layer, block in enumerate(model.blocks):
        names.update(f"blocks.{layer}.{alias}" for alias in getattr(block, "hook_aliases", {}))
    names.update(getattr(model, "hook_aliases", {}))
    return sorted(names)


def validate_hooks(model, hooks) -> list[str]:
    """Return `hooks` as a list if the model has them all; else raise naming what is valid."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise ValueError("no hooks given: pass e.g. ['blocks.6.hook_resid_post']")
    valid = set(valid_hooks(model))
    n_layers = model.cfg.n_layers
    for hook in hooks:
        m = BLOCK_HOOK.match(hook)
        if m and not 0 <= int(m.group(1)) < n_layers:
            raise ValueError(f"{hook!r}: layer {m.group(1)} is out of range; the model has "
                             f"{n_layers} layers, numbered 0 to {n_layers - 1}")
        if hook not in valid:
            kinds = sorted({BLOCK_HOOK.match(v).group(2) for v in valid
                            if v.startswith("blocks.0.")})
            raise ValueError(f"unknown hook {hook!r}. Block hooks are 'blocks.<layer>.<kind>' with "
                             f"layer 0..{n_layers - 1} and kind one of {kinds}; others: "
                             f"{sorted(v for v in valid if not v.startswith('blocks.'))}")
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"duplicate hooks in {hooks}")
    return hooks


def stop_layer(hooks: list[str]) -> int | None:
    """The stop_at_layer that still computes every hook (None: the whole model)."""
    if any(h.startswith(_FINAL_HOOKS) for h in hooks):
        return None
    layers = [int(m.group(1)) for h in hooks if (m := BLOCK_HOOK.match(h))]
    return max(layers) + 1 if layers else 1


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def forward_to(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations of `hooks` for a batch of token ids, computing no deeper than needed."""
    _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop_layer(hooks))
    return {h: cache[h] for h in hooks}


@torch.no_grad()
def collect(model, tokens: torch.Tensor, hook: str, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """The activations of `hook` for token ids [n, T], as a float32 CPU tensor [n, T, d_model].

    `model` is a TransformerLens-style model or a plain Hugging Face causal LM (see `hooked`); each
    batch of `batch_size` contexts runs no deeper than the hook's layer.
    """

    model = hooked(model)
    hook = validate_hooks(model, [hook])[0]
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be integer ids [n_contexts, ctx_len], got {tuple(tokens.shape)} {tokens.dtype}")
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(tokens), batch_size), desc=f"collect {hook}", disable=not progress,
                  leave=False):
        out.append(forward_to(model, tokens[i:i + batch_size].to(device), [hook])[hook].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, tokens.shape[1], model.cfg.d_model)


def harvest(model, path, hooks, *, corpus: str = "brown", split: str = "train", ctx_len: int = 128,
            n_tokens: int = 100_000, batch_contexts: int = 16, shard_contexts: int = 256,
            dtype: str = "float16", seed: int = 0, progress: bool = True,
            wait: float | None = None) -> ActivationStore:
    """Harvest at least `n_tokens` activations of each hook into the store at `path`.

    Resumes an existing store written with the same settings (and extends it if `n_tokens`
    grew). Returns the opened store. Tokens per context are ctx_len - 1 (BOS is not stored).
    While another process writes the store this waits (`wait` seconds; None: helpers.settings.locks.default_wait,
    printing who holds it), then continues from what it wrote: a store it finished is opened.
    """
    hooks = validate_hooks(model, hooks)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, not {n_tokens}")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and ctx_len > n_ctx:
        raise ValueError(f"ctx_len {ctx_len} exceeds the model's context of {n_ctx} tokens")
    per_ctx = ctx_len - 1
    target = math.ceil(n_tokens / per_ctx)
    header = {"model": model_name(model), "corpus": corpus, "split": split, "ctx_len": ctx_len,
              "seed": seed, "hooks": hooks, "d_model": model.cfg.d_model, "dtype": dtype,
              "target_contexts": target, **corpus_labels(corpus)}
    writer = StoreWriter(path, header, wait=wait)
    try:
        return _harvest_into(writer, model, path, hooks, corpus, split, ctx_len, target, batch_contexts,
                             shard_contexts, dtype, seed, progress)
    finally:
        writer.close()


def _harvest_into(writer, model, path, hooks, corpus, split, ctx_len, target, batch_contexts, shard_contexts,
                  dtype, seed, progress) -> ActivationStore:
    per_ctx = ctx_len - 1
    start = writer.next_context
    if start >= target and writer.manifest.get("complete"):
        return ActivationStore.open(path)
    writer.reopen()
    writer.manifest["target_contexts"] = max(target, start)
    device = model_device(model)
    tokenizer = model.tokenizer
    contexts = iter_contexts(tokenizer, corpus=corpus, ctx_len=ctx_len, split=split, seed=seed,
                             start_context=start, max_contexts=max(target - start, 0),
                             resume=writer.next_resume)

    bar = tqdm(total=target * per_ctx, initial=start * per_ctx, unit="tok", unit_scale=True,
               desc=f"harvest {len(hooks)} hook(s)", disable=not progress, smoothing=0.1)
    pending_ctx, pending_acts = [], {h: [] for h in hooks}
    seen = 0
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()

    def write(ctxs, acts):
        meta = np.zeros(len(ctxs) * per_ctx, dtype=META_DTYPE)
        for i, c in enumerate(ctxs):
            sl = slice(i * per_ctx, (i + 1) * per_ctx)
            meta["token"][sl] = c.tokens[1:]
            meta["doc"][sl] = c.doc
            meta["tok_pos"][sl] = c.tok_pos
            meta["ctx"][sl] = c.index
            meta["pos"][sl] = c.pos
            meta["genre"][sl] = c.genre
        writer.write_shard(meta, acts, ctxs[0].index, len(ctxs), next_resume=ctxs[-1].resume_next)

    try:
        with torch.inference_mode():
            for batch in batched(contexts, batch_contexts):
                tokens = torch.as_tensor(np.stack([c.tokens for c in batch]), device=device)
                out = forward_to(model, tokens, hooks)
                for h in hooks:  # drop BOS, flatten, cast to the store dtype, to the CPU
                    pending_acts[h].append(out[h][:, 1:].reshape(-1, out[h].shape[-1]).to(store_dtype).cpu())
                pending_ctx.extend(batch)
                seen += len(batch)
                bar.update(len(batch) * per_ctx)
                while len(pending_ctx) >= shard_contexts:
                    n = shard_contexts * per_ctx
                    joined = {h: torch.cat(pending_acts[h]) for h in hooks}
                    write(pending_ctx[:shard_contexts], {h: joined[h][:n] for h in hooks})
                    pending_ctx = pending_ctx[shard_contexts:]
                    pending_acts = {h: [joined[h][n:]] for h in hooks}
            if pending_ctx:
                write(pending_ctx, {h: torch.cat(pending_acts[h]) for h in hooks})
    finally:
        bar.close()
    if writer.n_tokens == 0:
        raise StoreError(f"the corpus slice is empty: corpus={corpus!r} split={split!r} gave no "
                         f"context of {ctx_len} tokens; use a shorter ctx_len or another split")
    exhausted = writer.next_context < target
    if exhausted:
        print(f"note: the corpus ran out after {writer.next_context} contexts "
              f"({writer.n_tokens:,} tokens), short of the {target * per_ctx:,} asked for")
    elapsed = time.perf_counter() - t0
    return writer.finish(exhausted=exhausted, last_run_seconds=round(elapsed, 2),
                         last_run_tokens=seen * per_ctx)


def batched(iterable, n: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def store_path(profile, split: str = "train"):
    """Folder of the profile's store; its name encodes the settings that make a store different."""
    key = json.dumps([profile.model, profile.corpus, profile.ctx_len, profile.seed, profile.hooks,
                      profile.store_dtype])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", profile.model.split("/")[-1]).strip("-").lower()
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return profile.cache_dir / "activations" / f"{slug}-{profile.corpus}-{split}-{digest}"


def get_store(profile, model=None, split: str = "train", progress: bool = True) -> ActivationStore:
    """The profile's activation store, harvested (or resumed) first if it is missing or short.

    `model` is loaded from the profile when a harvest is needed and none is given. A store with a bad
    shard is repaired first (`ActivationStore.repair`: the shards before it are kept, a warning names
    those dropped) and harvested again from there. While another process harvests the same store this
    waits for it (helpers.settings.locks.default_wait) and then uses what it wrote.
    """
    path = store_path(profile, split)
    per_ctx = profile.ctx_len - 1
    try:
        store = ActivationStore.open(path, hooks=profile.hooks)
        if store.complete and (store.n_tokens >= profile.harvest_tokens or store.manifest.get("exhausted")):
            return store
    except CorruptShard:
        ActivationStore.repair(path, wait=None)  # keeps the intact shards before the bad one, with a warning
    except StoreError:
        pass
    if model is None:
        model = load_model(profile.model, device=profile.device)
    return harvest(model, path, profile.hooks, corpus=profile.corpus, split=split,
                   ctx_len=profile.ctx_len, n_tokens=max(profile.harvest_tokens, per_ctx),
                   batch_contexts=profile.batch_contexts, shard_contexts=profile.shard_contexts,
                   dtype=profile.store_dtype, seed=profile.seed, progress=progress)
