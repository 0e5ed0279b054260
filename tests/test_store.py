"""The activation store on synthetic data: round trip, integrity, mismatch and shuffling."""
import json

import numpy as np
import pytest
import torch

from helpers.store import (META_DTYPE, ActivationStore, CorruptShard, StoreError, StoreMismatch,
                           StoreWriter)

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
D = 8


def header(**changes):
    h = {"model": "toy", "corpus": "brown", "split": "train", "ctx_len": 5, "seed": 0,
         "hooks": HOOKS, "d_model": D, "dtype": "float16", "tags": ["nn"], "genres": ["news"]}
    h.update(changes)
    return h


def make_store(path, n_shards=5, per_shard=40, dtype="float16", seed=0):
    """A store of n_shards shards whose activation rows encode their global index."""
    gen = torch.Generator().manual_seed(seed)
    w = StoreWriter(path, header(dtype=dtype))
    rows = {h: [] for h in HOOKS}
    for s in range(n_shards):
        meta = np.zeros(per_shard, dtype=META_DTYPE)
        meta["token"] = np.arange(s * per_shard, (s + 1) * per_shard)
        meta["ctx"] = s
        acts = {h: torch.randn(per_shard, D, generator=gen) for h in HOOKS}
        for h in HOOKS:
            acts[h][:, 0] = torch.arange(s * per_shard, (s + 1) * per_shard) / 8  # exact in fp16/bf16
            rows[h].append(acts[h])
        w.write_shard(meta, acts, first_context=s, n_contexts=1)
    return w.finish(), {h: torch.cat(r) for h, r in rows.items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    store, rows = make_store(tmp_path, dtype=dtype)
    again = ActivationStore.open(tmp_path, model="toy", hooks=HOOKS, verify="full")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for h in HOOKS:
        assert torch.equal(again.activations(h, dtype=torch_dtype), rows[h].to(torch_dtype))
    assert again.n_tokens == 200 and again.complete
    assert np.array_equal(again.tokens()["token"], np.arange(200))
    assert again.activations(HOOKS[0], max_tokens=55).shape == (55, D)


def test_every_token_once_per_epoch_and_shuffled(tmp_path):
    store, rows = make_store(tmp_path)
    for epoch_seed in (0, 1):
        seen = []
        for batch, idx in store.iter_batches(HOOKS[1], 32, seed=epoch_seed, buffer_shards=2,
                                             return_index=True):
            assert batch.dtype == torch.float32 and len(batch) <= 32
            # each row is the activation of the token its index names
            assert torch.equal(batch[:, 0], idx.float() / 8)
            seen.append(idx)
        seen = torch.cat(seen)
        assert sorted(seen.tolist()) == list(range(200))
        assert seen.tolist() != list(range(200)), "shuffled order should differ from storage order"
    batches = list(store.iter_batches(HOOKS[0], 32, shuffle=False))
    assert torch.equal(torch.cat(batches), rows[HOOKS[0]].half().float())
    assert sum(len(b) for b in store.iter_batches(HOOKS[0], 32, drop_last=True)) == 192
    assert sum(len(b) for b in store.iter_batches(HOOKS[0], 32, epochs=3)) == 600


def test_epochs_are_shuffled_differently(tmp_path):
    store, _ = make_store(tmp_path)
    a = [i for _, i in store.iter_batches(HOOKS[0], 50, epochs=2, return_index=True)]
    assert not torch.equal(torch.cat(a[:4]), torch.cat(a[4:]))


def test_truncated_shard_is_named_on_open(tmp_path):
    make_store(tmp_path)
    victim = tmp_path / f"shard_00002.{HOOKS[0]}.bin"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CorruptShard, match="shard_00002.blocks.1.hook_resid_post.bin"):
        ActivationStore.open(tmp_path)


def test_corrupted_shard_is_named_on_read(tmp_path):
    make_store(tmp_path)
    victim = tmp_path / f"shard_00003.{HOOKS[1]}.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path)  # same size: passes the cheap check
    store.activations(HOOKS[0])  # other hook still fine
    with pytest.raises(CorruptShard, match="shard_00003.blocks.3.hook_resid_post.bin.*checksum"):
        list(store.iter_batches(HOOKS[1], 16))
    with pytest.raises(CorruptShard, match="shard_00003"):
        ActivationStore.open(tmp_path, verify="full")


def test_missing_shard_file(tmp_path):
    make_store(tmp_path)
    (tmp_path / "shard_00001.meta.bin").unlink()
    with pytest.raises(CorruptShard, match="shard_00001.meta.bin is missing"):
        ActivationStore.open(tmp_path)


def test_open_for_other_model_or_hook(tmp_path):
    make_store(tmp_path)
    with pytest.raises(StoreMismatch, match="'toy', not 'gpt2'"):
        ActivationStore.open(tmp_path, model="gpt2")
    with pytest.raises(StoreMismatch, match="blocks.2.hook_resid_post"):
        ActivationStore.open(tmp_path, hooks=["blocks.2.hook_resid_post"])
    store = ActivationStore.open(tmp_path)
    with pytest.raises(StoreMismatch):
        next(store.iter_batches("blocks.9.hook_mlp_out", 4))


def test_writer_refuses_to_resume_other_settings(tmp_path):
    make_store(tmp_path)
    with pytest.raises(StoreMismatch, match="ctx_len: store has 5, asked 9"):
        StoreWriter(tmp_path, header(ctx_len=9))
    w = StoreWriter(tmp_path, header())
    assert w.next_context == 5 and w.n_tokens == 200


def test_no_store_and_bad_arguments(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open(tmp_path / "nothing")
    store, _ = make_store(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        next(store.iter_batches(HOOKS[0], 0))


def test_interrupted_write_leaves_last_complete_shard(tmp_path, monkeypatch):
    import helpers.store as st

    make_store(tmp_path, n_shards=2)
    w = StoreWriter(tmp_path, header())
    calls = {"n": 0}
    real = st._write_atomic

    def dying(path, data):
        calls["n"] += 1
        if calls["n"] == 2:  # after the meta file, while writing the first hook
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(st, "_write_atomic", dying)
    meta = np.zeros(40, dtype=META_DTYPE)
    with pytest.raises(KeyboardInterrupt):
        w.write_shard(meta, {h: torch.zeros(40, D) for h in HOOKS}, first_context=2, n_contexts=1)
    monkeypatch.setattr(st, "_write_atomic", real)
    store = ActivationStore.open(tmp_path, verify="full")
    assert len(store.shards) == 2 and store.n_tokens == 80
    assert json.loads((tmp_path / "manifest.json").read_text())["n_tokens"] == 80
