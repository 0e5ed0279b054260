"""An on-disk activation store: fixed-size shards, a manifest, checksums, shuffled reading.

Layout of a store folder::
    manifest.json                     what was harvested, and every completed shard
    shard_00000.meta.bin              token labels of shard 0 (a numpy record array, META_DTYPE)
    shard_00000.blocks.6.hook_resid_post.bin   activations [n_tokens, d_model], float16/bfloat16
    shard_00004-g1.meta.bin           a shard written after shards were dropped (generation 1)

Every file is written to a temporary name unique to its process, flushed and renamed, and a shard
enters the manifest (itself replaced atomically) only once all its files are on disk: an interrupted
writer leaves the store exactly as of its last completed shard, and `StoreWriter` resumes from there.
One writer at a time: a `StoreWriter` holds the folder's lock (helpers.settings.locks) until it finishes or
is closed, and a second one, in another process, is refused (or waits) with a message naming it.
A folder synced to the cloud (Google Drive on Colab) uploads files in its own order, so after a
disconnect the manifest can list shards whose files never arrived, or arrived short: `StoreWriter`
drops such last shards with a warning and resumes before them; a bad shard followed by complete ones
is an error naming its file and saying to run `ActivationStore.repair`, which keeps every intact shard
before the first bad one. Dropping shards starts a new generation of file names (``-g1``, ``-g2``...),
so a resumed harvest never writes a name a dropped file had (a late upload cannot overwrite it). The
manifest records each file's size and CRC-32; sizes are checked on opening, checksums the first
time a file is read (or all at once with `verify()`), and a mismatch names the file and the repair.

Reading memory-maps shard files, except `iter_batches`, which serves shuffled batches (each
token exactly once per epoch) from one RAM buffer of at most `buffer_shards` shards, read straight
from the files; `iter_batches_peak_bytes` / `ActivationStore.buffer_bytes` estimate its peak.
`ActivationStore.summary()` says what a store holds and `trace(i, tokenizer)` where its row i came
from (typed results that show as tables).
"""
from __future__ import annotations

import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from helpers.activations.corpus import NO_TAG, LabelCoverage, label_coverage, load_brown, pile_subsets_read
from helpers.results import Result
from helpers.settings.locks import FolderLock, tmp_name
from helpers.settings.paths import sync_drive

FORMAT = "sae-workbook-activations/1"
META_DTYPE = np.dtype([
    ("token", "<i4"),    # token id
    ("doc", "<i4"),      # document index in the corpus (-1: streamed corpus)
    ("tok_pos", "<i4"),  # position of the token within its document's tokens
    ("ctx", "<i4"),      # context index (iteration order of helpers.activations.corpus.iter_contexts)
    ("pos", "u1"),       # fine POS tag index (helpers.activations.corpus.NO_TAG: none)
    ("genre", "u1"),     # genre index
])
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Header fields that must agree for a writer to resume into an existing store.
IDENTITY = ("model", "corpus", "split", "ctx_len", "seed", "hooks", "d_model", "dtype")


@dataclass
class StoreSummary(Result):
    """What a store holds: model, corpus, contexts, dtype, size, and its last harvest's speed."""

    model: str = ""
    corpus: str = ""
    split: str = ""
    ctx_len: int = 0
    dtype: str = ""
    hooks: list = field(default_factory=list)
    shards: int = 0
    tokens: int = 0                 # per hook
    shard_files_mb: dict = field(default_factory=dict)  # file of shard 0: MB
    last_run_tokens: int = 0
    last_run_seconds: float = 0.0
    complete: bool = False

    def rows(self) -> list[dict]:
        return [{"model": self.model, "corpus": f"{self.corpus} ({self.split})", "ctx_len": self.ctx_len,
                 "dtype": self.dtype, "hooks": len(self.hooks), "shards": self.shards,
                 "tokens per hook": self.tokens, "complete": self.complete}]

    def verdicts(self) -> list[str]:
        out = [f"hooks: {', '.join(self.hooks)}"]
        if self.shard_files_mb:
            out.append("files of shard 0: " + ", ".join(f"{k} {v:.1f} MB" for k, v in self.shard_files_mb.items()))
        if self.last_run_seconds:
            out.append(f"last harvest run: {self.last_run_tokens:,} tokens in {self.last_run_seconds:.1f} s "
                       f"({self.last_run_tokens / self.last_run_seconds:,.0f} tokens/s for {len(self.hooks)} hooks)")
        return out


@dataclass
class TokenTrace(Result):
    """One stored row traced back to its text: where it came from, the tokens before it, its labels."""

    index: int = 0                  # row of the store
    source: str = ""                # its document, or "a streamed document (subset)"
    position: int = 0               # in its document (-1: a separator between streamed documents)
    before: str = ""                # the text of the tokens before it in its context
    token: str = ""
    tag: str = "-"
    genre: str = ""
    hook: str = ""
    norm: float = 0.0               # of its activation at `hook`

    def rows(self) -> list[dict]:
        return [{"row": self.index, "token": self.token, "tag": self.tag, "genre": self.genre,
                 "position": self.position, f"norm at {self.hook}": self.norm}]

    def verdicts(self) -> list[str]:
        return [f"{self.source}, token {self.position}: ...{self.before}[[{self.token}]]",
                f"tag {self.tag}; norm at {self.hook}: {self.norm:.1f}"]


class StoreError(RuntimeError):
    """A store cannot be used as asked."""


class StoreMismatch(StoreError):
    """The store was written for another model, hook or setting than the one asked for."""


class CorruptShard(StoreError):
    """A shard file is missing, truncated, or its contents changed since it was written."""


def _crc32(data) -> int:
    return zlib.crc32(memoryview(data).cast("B")) & 0xFFFFFFFF


def _write_atomic(path: Path, data: bytes) -> dict:
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": path.name, "bytes": len(data), "crc32": _crc32(data)}


def _shard_stem(index: int, generation: int = 0) -> str:
    """The file-name stem of shard `index` written in the store's `generation` (``shard_00004``, or
    ``shard_00004-g1`` once a repair has dropped shards): a shard written after a repair never takes the
    name of a dropped file, which a synced drive may still deliver late."""
    return f"shard_{index:05d}" + (f"-g{generation}" if generation else "")


def _hook_file(index: int, hook: str, generation: int = 0) -> str:
    return f"{_shard_stem(index, generation)}.{hook}.bin"


def repair_advice(path) -> str:
    """What to run to repair the store at `path` (the sentence every corrupt-shard error ends with)."""
    return (f"Repair it with `from helpers.activations.store import ActivationStore; ActivationStore.repair({str(path)!r})` "
            "(it keeps every intact shard before the first bad one and drops the rest), then harvest again "
            "(`helpers.activations.harvest.get_store(profile)`, which also repairs by itself, or `harvest(...)` with the "
            "same settings) to resume from there")


def _read_manifest(mpath: Path) -> dict:
    """A store's manifest.json, or a StoreError naming it when it is not whole JSON."""
    try:
        return json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{mpath} is not whole JSON ({e}): a write was cut short, or the file is still on its way "
                         "to Google Drive. Wait for Drive to finish and try again; if it stays so, delete the store "
                         f"folder {mpath.parent} and harvest again") from None


class ActivationStore:
    """Read access to a completed (or partly written) store folder."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._verified: set[str] = set()
        starts = np.cumsum([0] + [s["n_tokens"] for s in self.shards])
        self._shard_start = starts  # global index of each shard's first token

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path, model: str | None = None, hooks=None, verify: str = "size") -> "ActivationStore":
        """Open a store; check it was written for `model` and holds `hooks`, and check file sizes.

        verify: "size" (default, cheap), "full" (also every checksum now), or "none".
        """
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.exists():
            raise StoreError(f"no activation store at {path} (no manifest.json): harvest one with "
                             "helpers.activations.harvest.harvest(...) or helpers.activations.harvest.get_store(profile)")
        manifest = _read_manifest(mpath)
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}")
        store = cls(path, manifest)
        if model is not None and manifest["model"] != model:
            raise StoreMismatch(f"store {path} was harvested from model {manifest['model']!r}, "
                                f"not {model!r}")
        for hook in [hooks] if isinstance(hooks, str) else hooks or []:
            store.check_hook(hook)
        if verify != "none":
            store.verify(checksums=verify == "full")
        return store

    @classmethod
    def repair(cls, path, wait: float | None = 0.0) -> list[int]:
        """Keep every intact shard before the first bad one (a file missing, of the wrong size, or failing
        its checksum: every file is read) and drop that shard and all after it, with a warning naming
        them; the store is then incomplete, and harvesting again with the same settings resumes after
        the last kept shard (under new file names: see `_shard_stem`). Returns the dropped shards'
        indices ([] if every shard is intact). Holds the store's lock (`wait` as in helpers.settings.locks)."""
        path = Path(path)
        with FolderLock(path, f"repairing the store {path}", wait=wait):
            mpath = path / "manifest.json"
            if not mpath.exists():
                raise StoreError(f"no activation store at {path} (no manifest.json): nothing to repair")
            manifest = _read_manifest(mpath)
            reader = cls(path, manifest)
            for k, shard in enumerate(manifest["shards"]):
                try:
                    for entry in shard["files"].values():
                        reader._file(entry, checksum=True)
                except CorruptShard as e:
                    n = len(manifest["shards"])
                    _drop_shards(path, manifest, k, str(e).split(". Repair it")[0], stacklevel=3)
                    return list(range(k, n))
            return []

    def check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise StoreMismatch(f"store {self.path} holds hooks {self.hooks}, not {hook!r}")

    # ---- description ---------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def corpus(self) -> str:
        """The corpus the activations were harvested from ("brown", "pile")."""
        return self.manifest["corpus"]

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def n_tokens(self) -> int:
        return int(sum(s["n_tokens"] for s in self.shards))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.manifest['model']!r}, "
                f"hooks={self.hooks}, tokens={self.n_tokens:,}, shards={len(self.shards)}, "
                f"dtype={self.manifest['dtype']}, complete={self.complete})")

    def summary(self) -> StoreSummary:
        """What the store holds (a typed result: shows as a table)."""
        m = self.manifest
        files = {k: v["bytes"] / 1e6 for k, v in self.shards[0]["files"].items()} if self.shards else {}
        return StoreSummary(m["model"], m["corpus"], m["split"], m["ctx_len"], m["dtype"], list(self.hooks),
                            len(self.shards), self.n_tokens, files, int(m.get("last_run_tokens") or 0),
                            float(m.get("last_run_seconds") or 0.0), self.complete)

    def label_coverage(self) -> LabelCoverage:
        """How the stored token labels cover the corpus, and whether they are consistent with it
        (`helpers.activations.corpus.label_coverage`; on the Pile read from $SAE_PILE's files, the
        genres are checked against the subsets of the documents read)."""
        m = self.manifest
        read = (pile_subsets_read(self.shards[-1].get("next_resume"), m["split"])
                if m["corpus"] == "pile" and self.shards else None)
        return label_coverage(self.tokens(), m["corpus"], m["genres"], read)

    def trace(self, i: int, tokenizer, hook: str | None = None, before: int = 12) -> TokenTrace:
        """Row `i` traced back to its text: its document (by id on Brown), the `before` tokens that
        precede it in its context (from the store's own labels), its tag and genre, and its norm at
        `hook` (default: the last)."""
        tokens = self.tokens()
        rec = tokens[i]
        hook = self.hooks[-1] if hook is None else hook
        prev = np.flatnonzero(tokens["ctx"][:i] == rec["ctx"])[-before:] if before else np.zeros(0, dtype=np.int64)
        genre = self.manifest["genres"][rec["genre"]]
        if self.manifest["corpus"] == "brown":
            source = f"document {load_brown().docs[rec['doc']].id} ({genre})"
        elif rec["tok_pos"] >= 0:
            source = f"a streamed document ({genre})"
        else:
            source = "the separator after a streamed document"
        x = self.activations(hook, max_tokens=i + 1)[i]
        tag = self.manifest["tags"][rec["pos"]] if rec["pos"] != NO_TAG else "-"
        return TokenTrace(int(i), source, int(rec["tok_pos"]), tokenizer.decode(tokens["token"][prev]),
                          tokenizer.decode([rec["token"]]), tag, genre, hook, float(x.norm()))

    # ---- integrity -----------------------------------------------------------------------
    def _file(self, entry: dict, checksum: bool = True) -> Path:
        path = self.path / entry["name"]
        if not path.exists():
            raise CorruptShard(f"shard file {path} is missing (listed in {self.path / 'manifest.json'}). "
                               + repair_advice(self.path))
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptShard(f"shard file {path} has {size:,} bytes, the manifest says "
                               f"{entry['bytes']:,}: truncated or overwritten. " + repair_advice(self.path))
        if checksum and entry["name"] not in self._verified:
            with open(path, "rb") as f:
                self._check_crc(path, entry, _crc32(f.read()))
        return path

    def _check_crc(self, path: Path, entry: dict, crc: int) -> None:
        if crc != entry["crc32"]:
            raise CorruptShard(f"shard file {path} fails its checksum (crc32 {crc:08x}, manifest "
                               f"{entry['crc32']:08x}): its contents changed since it was written. "
                               + repair_advice(self.path))
        self._verified.add(entry["name"])

    def verify(self, checksums: bool = True) -> None:
        """Check every file's size (and checksum); raise CorruptShard naming the first bad one."""
        for shard in self.shards:
            for entry in shard["files"].values():
                self._file(entry, checksum=checksums)

    # ---- reading -------------------------------------------------------------------------
    def shard_activations(self, index: int, hook: str) -> torch.Tensor:
        """Activations of one shard as a read-only memory-mapped tensor [n_tokens, d_model]."""
        self.check_hook(hook)
        shard = self.shards[index]
        path = self._file(shard["files"][hook])
        raw = np.memmap(path, dtype=np.uint16, mode="r", shape=(shard["n_tokens"], self.d_model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-writable numpy array: we never write to it
            return torch.from_numpy(raw).view(self.dtype)

    def shard_tokens(self, index: int) -> np.ndarray:
        shard = self.shards[index]
        path = self._file(shard["files"]["meta"])
        return np.fromfile(path, dtype=META_DTYPE)

    def tokens(self) -> np.ndarray:
        """Labels of every stored token (META_DTYPE records), in store order."""
        if not self.shards:
            return np.zeros(0, dtype=META_DTYPE)
        return np.concatenate([self.shard_tokens(i) for i in range(len(self.shards))])

    def activations(self, hook: str, max_tokens: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The first `max_tokens` activations of `hook` in store order, in RAM, as `dtype`."""
        self.check_hook(hook)
        out, n = [], 0
        for i, shard in enumerate(self.shards):
            if max_tokens is not None and n >= max_tokens:
                break
            take = shard["n_tokens"] if max_tokens is None else min(shard["n_tokens"], max_tokens - n)
            out.append(self.shard_activations(i, hook)[:take].to(dtype))
            n += take
        return torch.cat(out) if out else torch.zeros(0, self.d_model, dtype=dtype)

    def rows(self, hook: str, index, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Activations of the given global token indices (any order), read from the shards."""
        index = torch.as_tensor(index, dtype=torch.int64).flatten()
        out = torch.empty(len(index), self.d_model, dtype=dtype)
        shard_of = np.searchsorted(self._shard_start, index.numpy(), side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = index[sel] - int(self._shard_start[s])
            out[torch.as_tensor(sel)] = self.shard_activations(int(s), hook)[local].to(dtype)
        return out

    def _raw_rows(self, hooks: list[str], index: torch.Tensor) -> torch.Tensor:
        """The stored 2-byte words of the given global token indices at each hook [n_hooks, len, d_model]."""
        out = torch.empty(len(hooks), len(index), self.d_model, dtype=torch.int16)
        shard_of = np.searchsorted(self._shard_start, index.numpy(), side="right") - 1
        for s in np.unique(shard_of):
            sel = torch.as_tensor(np.flatnonzero(shard_of == s))
            local = index[sel] - int(self._shard_start[s])
            for k, h in enumerate(hooks):
                out[k, sel] = self.shard_activations(int(s), h)[local].view(torch.int16)
        return out

    def _read_into(self, entry: dict, out: np.ndarray) -> None:
        """Read one shard file straight into `out` (a C-contiguous array of the file's size),
        checking its checksum on the bytes read the first time: no second copy, no mapping."""
        path = self._file(entry, checksum=False)
        view = memoryview(out).cast("B")
        got = 0
        with open(path, "rb", buffering=0) as f:
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != len(view):
            raise CorruptShard(f"shard file {path} ended after {got:,} bytes, expected {len(view):,}. "
                               + repair_advice(self.path))
        if entry["name"] not in self._verified:
            self._check_crc(path, entry, _crc32(view))

    def buffer_bytes(self, n_hooks: int | None = None, buffer_shards: int = 4, batch_size: int = 0,
                     dtype: torch.dtype = torch.float32) -> int:
        """Host-RAM peak of `iter_batches` on this store (see `iter_batches_peak_bytes`), for
        `n_hooks` hooks (default: all of them): its largest possible shuffle buffer is its
        `buffer_shards` largest shards plus a remainder of under `batch_size` tokens."""
        sizes = sorted((s["n_tokens"] for s in self.shards), reverse=True)
        return iter_batches_peak_bytes(len(self.hooks) if n_hooks is None else n_hooks, self.d_model,
                                       sum(sizes[:buffer_shards]), 1, batch_size,
                                       store_dtype=self.dtype, dtype=dtype)

    def iter_batches(self, hook, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     epochs: int = 1, buffer_shards: int = 4, device="cpu",
                     dtype: torch.dtype = torch.float32, drop_last: bool = False,
                     return_index: bool = False, start: int = 0) -> Iterator:
        """Batches [batch_size, d_model] of `hook`'s activations; every token once per epoch.

        `hook` may also be a list of hooks: each batch is then [n_hooks, batch_size, d_model], the
        same tokens at every hook (one shuffled read serves SAEs of several layers).
        Shuffling draws a random shard order, then mixes `buffer_shards` shards at a time (plus
        the remainder of the previous group) in RAM: memory stays bounded by the buffer.
        With return_index, yields (batch, index) where index is each row's global token
        index (a row of `tokens()`).

        Host RAM: one buffer [n_hooks, tokens of the group + remainder, d_model] in the store's
        dtype, filled shard by shard straight from the files; each batch is gathered from it
        through a random permutation (the buffer itself is never permuted or copied), and the
        remainder is carried into the next group's buffer. `iter_batches_peak_bytes` estimates
        the peak. The batches are those of the earlier three-copy code (cat, then permute),
        bit for bit: same generator draws, same order.

        `start` skips the first `start` batches (counted over all epochs) as if they had been served
        and dropped: the batches that follow are the same, and a group of shards whose batches are
        all skipped is not read (the rows it carries into the next group are read from their shards
        when that group is): a resumed training run finds its place without reading the store.
        """
        many = not isinstance(hook, str)
        hooks = list(hook) if many else [hook]
        for h in hooks:
            self.check_hook(h)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if not self.shards:
            raise StoreError(f"store {self.path} has no shards yet")
        device = torch.device(device)
        d = self.d_model
        skip = max(0, int(start))
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, epoch])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
            carry_x = torch.zeros(len(hooks), 0, d, dtype=self.dtype)  # None: not read (skipped), only carry_i
            carry_i = torch.zeros(0, dtype=torch.int64)
            for g in range(0, len(order), buffer_shards):
                group = [int(s) for s in order[g:g + buffer_shards]]
                n = len(carry_i) + sum(self.shards[s]["n_tokens"] for s in group)
                last = g + buffer_shards >= len(order)
                n_full = n if (last and not drop_last) else n // batch_size * batch_size
                n_batches = -(-n_full // batch_size)
                idx = torch.cat([carry_i] + [torch.arange(int(self._shard_start[s]), int(self._shard_start[s + 1]))
                                             for s in group])
                if skip and skip >= n_batches:  # every batch of this group is skipped: draw its order, read nothing
                    skip -= n_batches
                    perm = torch.randperm(n, generator=gen) if shuffle else None
                    carry_i = (idx[n_full:] if perm is None else idx[perm[n_full:]]).clone()
                    carry_x = None
                    continue
                raw = torch.empty(len(hooks), n, d, dtype=torch.int16)  # 2-byte words, as on disk
                c = len(carry_i)
                raw[:, :c] = self._raw_rows(hooks, carry_i) if carry_x is None else carry_x.view(torch.int16)
                del carry_x, carry_i
                for s in group:
                    shard = self.shards[s]
                    m = shard["n_tokens"]
                    for k, h in enumerate(hooks):
                        self._read_into(shard["files"][h], raw[k, c:c + m].numpy())
                    c += m
                x = raw.view(self.dtype)
                perm = torch.randperm(n, generator=gen) if shuffle else None
                first, skip = skip * batch_size, 0
                for i in range(first, n_full, batch_size):
                    j = min(i + batch_size, n_full)
                    if perm is None:
                        batch, index = x[:, i:j], idx[i:j]
                    else:
                        batch, index = x[:, perm[i:j]], idx[perm[i:j]]
                    batch = batch.to(device=device, dtype=dtype, non_blocking=True)
                    batch = batch if many else batch[0]
                    yield (batch, index) if return_index else batch
                if perm is None:
                    carry_x, carry_i = x[:, n_full:].clone(), idx[n_full:].clone()
                else:
                    carry_x, carry_i = x[:, perm[n_full:]], idx[perm[n_full:]]
                batch = index = None
                del raw, x, idx, perm  # free this buffer before the next one is allocated


def iter_batches_peak_bytes(n_hooks: int, d_model: int, shard_tokens: int, buffer_shards: int = 4,
                            batch_size: int = 0, *, store_dtype="float16",
                            dtype: torch.dtype = torch.float32) -> int:
    """Estimated host-RAM peak (bytes) of `ActivationStore.iter_batches`, for a resource planner.

    The buffer: n_hooks x (buffer_shards * shard_tokens + batch_size - 1) x d_model values in the
    store dtype (2 bytes), plus two int64 per buffered token (token index and permutation), plus
    three batches of n_hooks x batch_size x d_model (the one gathered in the store dtype, the one
    served as `dtype`, and the previous one the caller may still hold). Take `shard_tokens` as
    the largest shard (a harvest's shards hold shard_contexts * (ctx_len - 1) tokens). Excludes
    the interpreter and torch themselves, and the device copy when device is not the CPU.
    """
    item = torch.empty(0, dtype=STORE_DTYPES.get(store_dtype, store_dtype)).element_size()
    out_item = torch.empty(0, dtype=dtype).element_size()
    n = buffer_shards * shard_tokens + max(batch_size - 1, 0)
    return (n_hooks * n * d_model * item + 16 * n
            + n_hooks * batch_size * d_model * (item + 2 * out_item))


def _drop_shards(path: Path, manifest: dict, keep: int, reason: str, stacklevel: int = 3) -> None:
    """Drop shards keep.. from the manifest (saved at once, incomplete, in a new file-name generation),
    delete what is left of their files, and warn naming them and why."""
    shards = manifest["shards"]
    dropped = shards[keep:]
    names = [e["name"] for sh in dropped for e in sh["files"].values()]
    warnings.warn(
        f"store {path}: dropping its last {len(dropped)} shard(s) (from shard {dropped[0]['index']}: {reason}; "
        f"shards {dropped[0]['index']}-{dropped[-1]['index']}, files {names[0]} ... {names[-1]}); "
        f"{keep} intact shard(s) kept ({sum(s['n_tokens'] for s in shards[:keep]):,} tokens): the harvest "
        f"resumes after shard {keep - 1}", stacklevel=stacklevel + 1)
    del shards[keep:]
    manifest["generation"] = int(manifest.get("generation", 0)) + 1
    manifest["complete"] = False
    manifest["n_tokens"] = int(sum(s["n_tokens"] for s in shards))
    _write_atomic(path / "manifest.json", json.dumps(manifest, indent=1).encode())
    for name in names:
        try:
            (path / name).unlink()
        except FileNotFoundError:
            pass


class StoreWriter:
    """Appends shards to a store folder; resumes an existing one written with the same header.

    It holds the folder's lock (helpers.settings.locks) from its creation until `finish` or `close` (it is also a
    context manager): a second writer of the same folder, in another process, waits up to `wait` seconds
    (None: helpers.settings.locks.default_wait) and is then refused with an error naming the holder."""

    def __init__(self, path, header: dict, wait: float | None = 0.0):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = FolderLock(self.path, f"writing the activation store {self.path}", wait=wait).acquire()
        try:
            self._open(header)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock (the store stays as written so far)."""
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, header: dict) -> None:
        for tmp in self.path.glob("*.tmp"):  # leftovers of an interrupted write (the lock is ours)
            tmp.unlink()
        mpath = self.path / "manifest.json"
        if mpath.exists():
            manifest = _read_manifest(mpath)
            diffs = {k: (manifest.get(k), header.get(k)) for k in IDENTITY if manifest.get(k) != header.get(k)}
            if diffs:
                raise StoreMismatch(
                    f"store {self.path} was written with different settings, so it cannot be resumed: "
                    + "; ".join(f"{k}: store has {a!r}, asked {b!r}" for k, (a, b) in diffs.items())
                    + ". Use another folder, or delete this one.")
            self.manifest = manifest
            self._drop_incomplete_tail()
        else:
            manifest = {"format": FORMAT, **header, "complete": False, "shards": []}
        self.manifest = manifest
        self.dtype = STORE_DTYPES[self.manifest["dtype"]]

    def _drop_incomplete_tail(self) -> None:
        """Drop the last shards of the manifest whose files are missing or short (a write that never
        reached the disk, or a synced folder whose upload stopped before them), with a warning, so
        that the harvest resumes after the last complete shard. Any other bad file is an error
        naming it (a shard in the middle, a file longer than recorded)."""
        shards = self.manifest["shards"]
        reader = ActivationStore(self.path, self.manifest)

        def problem(shard):
            for entry in shard["files"].values():
                path = self.path / entry["name"]
                if not path.exists():
                    return f"{path.name} is missing"
                if path.stat().st_size < entry["bytes"]:
                    return f"{path.name} has {path.stat().st_size:,} of its {entry['bytes']:,} bytes"
            return None

        keep = len(shards)
        while keep and problem(shards[keep - 1]) is not None:
            keep -= 1
        for shard in shards[:keep]:
            for entry in shard["files"].values():
                reader._file(entry, checksum=False)  # raises CorruptShard naming a bad file
        if keep == len(shards):
            return
        _drop_shards(self.path, self.manifest, keep, f"{problem(shards[keep])}, incompletely written or synced",
                     stacklevel=5)

    @property
    def next_context(self) -> int:
        """Index of the first context not yet in the store (where a resumed harvest starts)."""
        if not self.manifest["shards"]:
            return 0
        last = self.manifest["shards"][-1]
        return last["first_context"] + last["n_contexts"]

    @property
    def next_resume(self) -> dict | None:
        """Where the corpus stream stands after the last stored context (helpers.activations.corpus
        `Context.resume_next`, recorded by write_shard), or None (Brown, or an older store)."""
        if not self.manifest["shards"]:
            return None
        return self.manifest["shards"][-1].get("next_resume")

    @property
    def n_tokens(self) -> int:
        return int(sum(s["n_tokens"] for s in self.manifest["shards"]))

    def _save_manifest(self) -> None:
        _write_atomic(self.path / "manifest.json", json.dumps(self.manifest, indent=1).encode())

    def write_shard(self, meta: np.ndarray, acts: dict[str, torch.Tensor], first_context: int,
                    n_contexts: int, next_resume: dict | None = None) -> None:
        """Write one shard (labels + one activation array per hook) and record it.

        `next_resume` (JSON-able) is recorded with the shard as where the corpus stream continues
        after its last context; a resumed harvest reads it back from `next_resume`."""
        if first_context != self.next_context:
            raise StoreError(f"shard starts at context {first_context}, the store expects {self.next_context}")
        if set(acts) != set(self.manifest["hooks"]):
            raise StoreMismatch(f"shard has hooks {sorted(acts)}, the store {self.manifest['hooks']}")
        index = len(self.manifest["shards"])
        for hook, x in acts.items():
            if x.shape != (len(meta), self.manifest["d_model"]):
                raise StoreError(f"{hook}: activations of shape {tuple(x.shape)}, expected "
                                 f"({len(meta)}, {self.manifest['d_model']})")
        gen = int(self.manifest.get("generation", 0))
        while any((self.path / n).exists() for n in [f"{_shard_stem(index, gen)}.meta.bin"]
                  + [_hook_file(index, h, gen) for h in acts]):
            gen += 1  # a file of that name exists (left by a dropped shard): never write over it
        if gen != self.manifest.get("generation", 0):
            self.manifest["generation"] = gen
        files = {"meta": _write_atomic(self.path / f"{_shard_stem(index, gen)}.meta.bin",
                                       np.ascontiguousarray(meta, dtype=META_DTYPE).tobytes())}
        for hook, x in acts.items():
            data = x.detach().to("cpu", self.dtype).contiguous().view(torch.uint16).numpy().tobytes()
            files[hook] = _write_atomic(self.path / _hook_file(index, hook, gen), data)
        entry = {"index": index, "first_context": first_context, "n_contexts": n_contexts,
                 "n_tokens": len(meta), "files": files}
        if next_resume is not None:
            entry["next_resume"] = next_resume
        self.manifest["shards"].append(entry)
        self.manifest["n_tokens"] = self.n_tokens
        self._save_manifest()

    def finish(self, **fields) -> ActivationStore:
        """Mark the store complete (recording `fields`, e.g. why it stopped) and open it."""

        self.manifest.update(fields, complete=True, n_tokens=self.n_tokens)
        self._save_manifest()
        self.close()
        sync_drive()
        return ActivationStore(self.path, self.manifest)

    def reopen(self) -> None:
        """Clear the complete flag so that more shards can be appended (a bigger budget)."""
        if self.manifest.get("complete"):
            self.manifest["complete"] = False
            self._save_manifest()
