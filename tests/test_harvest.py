"""Harvesting with the embedded model: correctness, resume after a crash, and clear errors."""
import numpy as np
import pytest
import torch

import helpers.activations.store as st
from helpers.activations.harvest import forward_to, harvest, stop_layer, validate_hooks
from helpers.activations.store import ActivationStore, StoreError

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
SMALL = dict(ctx_len=17, n_tokens=16 * 20, batch_contexts=3, shard_contexts=4, progress=False)


def test_harvest_stores_the_models_activations(model, tmp_path):
    store = harvest(model, tmp_path, HOOKS, **SMALL)
    assert store.complete and store.n_tokens == 320 and len(store.shards) == 5
    tokens = store.tokens()
    assert len(tokens) == 320 and len(np.unique(tokens["ctx"])) == 20
    # recompute context 7 and compare with what the store holds for it
    rows = np.flatnonzero(tokens["ctx"] == 7)
    ids = torch.tensor([[model.tokenizer.bos_token_id, *tokens["token"][rows]]])
    with torch.inference_mode():
        fresh = forward_to(model, ids, HOOKS)
    for h in HOOKS:
        stored = store.activations(h)[rows]
        expect = fresh[h][0, 1:].half().float()
        assert torch.allclose(stored, expect, rtol=1e-2, atol=1e-2), h


def crash_in_shard(monkeypatch, shard: int, model, path, settings) -> None:
    """Run a harvest that crashes while writing shard `shard` (its meta written, its first hook file
    being written), as a killed process would leave it."""
    calls = {"n": 0}
    real = st._write_atomic

    def crash(path, data):
        calls["n"] += 1
        if calls["n"] == shard * 4 + 2:  # 4 files a shard: the manifest, meta and two hooks
            raise KeyboardInterrupt("simulated crash")
        return real(path, data)

    monkeypatch.setattr(st, "_write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        harvest(model, path, HOOKS, **settings)
    monkeypatch.setattr(st, "_write_atomic", real)


def test_resume_after_crash_mid_shard_equals_uninterrupted(model, tmp_path, monkeypatch):
    clean = harvest(model, tmp_path / "clean", HOOKS, **SMALL)
    crash_in_shard(monkeypatch, 3, model, tmp_path / "crashed", SMALL)
    partial = ActivationStore.open(tmp_path / "crashed")
    assert not partial.complete and len(partial.shards) == 3
    resumed = harvest(model, tmp_path / "crashed", HOOKS, **SMALL)
    assert np.array_equal(resumed.tokens(), clean.tokens())
    for h in HOOKS:
        assert torch.equal(resumed.activations(h), clean.activations(h))


def test_bigger_budget_extends_the_store(model, tmp_path):
    small = harvest(model, tmp_path, HOOKS, **{**SMALL, "n_tokens": 16 * 6})
    assert small.n_tokens == 96
    big = harvest(model, tmp_path, HOOKS, **SMALL)
    assert big.n_tokens == 320
    assert list(np.unique(big.tokens()["ctx"])) == list(range(20))


def test_hook_errors_name_what_is_valid(model, tmp_path):
    with pytest.raises(ValueError, match="layer 30 is out of range.*0 to 29"):
        harvest(model, tmp_path, ["blocks.30.hook_resid_post"], **SMALL)
    with pytest.raises(ValueError, match="unknown hook 'blocks.2.hook_resid'.*hook_resid_post"):
        validate_hooks(model, ["blocks.2.hook_resid"])
    with pytest.raises(ValueError, match="unknown hook 'resid'"):
        validate_hooks(model, "resid")
    assert not (tmp_path / "manifest.json").exists()


def test_store_of_other_hooks_cannot_be_resumed(model, tmp_path):
    harvest(model, tmp_path, HOOKS, **{**SMALL, "n_tokens": 32})
    with pytest.raises(st.StoreMismatch, match="hooks"):
        harvest(model, tmp_path, ["blocks.2.hook_resid_post"], **{**SMALL, "n_tokens": 32})


def test_empty_corpus_slice(model, tmp_path):
    with pytest.raises(StoreError, match="corpus slice is empty"):
        harvest(model, tmp_path, HOOKS, split="test", ctx_len=8000, n_tokens=10, progress=False)


def test_stop_layer():
    assert stop_layer(HOOKS) == 4
    assert stop_layer(["hook_embed"]) == 1
    assert stop_layer(["blocks.0.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_pile_harvest_resumes_from_its_saved_position(model, tmp_path, monkeypatch):
    """A harvest of local Pile files (SAE_PILE) interrupted mid-way resumes to the same store,
    tokenising only the documents from the saved position on."""
    import json

    from test_corpus import CountingTokenizer, pile_rows, write_jsonl

    import helpers.activations.corpus as corpus_mod

    rows = pile_rows(60, seed=2)
    write_jsonl(tmp_path / "a.jsonl", rows[:2])
    write_jsonl(tmp_path / "b.jsonl.zst", rows[2:])
    monkeypatch.setenv("SAE_PILE", str(tmp_path / "*.jsonl*"))
    monkeypatch.setattr(corpus_mod, "_pile_stream", None)  # the hub is never asked
    settings = {**SMALL, "corpus": "pile", "ctx_len": 9, "n_tokens": 8 * 32}
    clean = harvest(model, tmp_path / "clean", HOOKS, **settings)
    assert clean.n_tokens == 256 and len(clean.shards) == 8
    assert all("next_resume" in s for s in clean.shards)

    crash_in_shard(monkeypatch, 5, model, tmp_path / "crashed", settings)
    partial = ActivationStore.open(tmp_path / "crashed")
    assert len(partial.shards) == 5
    position = partial.shards[-1]["next_resume"]
    assert position == clean.shards[4]["next_resume"] and position["source"] == "files"
    assert position["name"] == "b.jsonl.zst" and position["line"] >= 2, "resume inside the .zst file"
    first_row = 2 + position["line"]

    import sys

    harvest_mod = sys.modules["helpers.activations.harvest"]  # (helpers.activations.harvest is also the function's name)
    counting = CountingTokenizer(model.tokenizer)
    monkeypatch.setattr(harvest_mod, "iter_contexts",
                        lambda tokenizer, **kw: corpus_mod.iter_contexts(counting, **kw))
    resumed = harvest(model, tmp_path / "crashed", HOOKS, **settings)
    assert counting.rows and min(counting.rows) == first_row
    assert np.array_equal(resumed.tokens(), clean.tokens())
    for h in HOOKS:
        assert torch.equal(resumed.activations(h), clean.activations(h))
    manifest = json.loads((tmp_path / "crashed" / "manifest.json").read_text())
    assert [s["next_resume"] for s in manifest["shards"]] == [s["next_resume"] for s in clean.shards]


def test_store_summary_trace_and_collect(model, tmp_path):
    """A store says what it holds and where each row came from (typed results that round-trip through
    JSON); `collect` on the traced context's token ids gives the stored rows; `model_summary` the model."""
    from helpers.activations.corpus import NO_TAG, load_brown
    from helpers.activations.harvest import collect, model_summary
    from helpers.activations.store import StoreSummary, TokenTrace

    store = harvest(model, tmp_path, HOOKS, **SMALL)
    s = store.summary()
    assert (s.tokens, s.shards, s.hooks, s.ctx_len, s.corpus, s.complete) == (320, 5, HOOKS, 17, "brown", True)
    assert set(s.shard_files_mb) == {"meta", *HOOKS} and s.last_run_tokens == 320
    assert StoreSummary.from_dict(s.to_dict()) == s and "tokens/s for 2 hooks" in str(s)
    tokens = store.tokens()
    i = 40
    t = store.trace(i, model.tokenizer)
    rec = tokens[i]
    assert t.source == f"document {load_brown().docs[rec['doc']].id} ({store.manifest['genres'][rec['genre']]})"
    assert t.token == model.tokenizer.decode([rec["token"]]) and t.position == rec["tok_pos"]
    assert t.tag == ("-" if rec["pos"] == NO_TAG else store.manifest["tags"][rec["pos"]])
    assert t.norm == pytest.approx(store.activations(HOOKS[-1])[i].norm().item())
    same_ctx = np.flatnonzero(tokens["ctx"][:i] == rec["ctx"])
    assert t.before == model.tokenizer.decode(tokens["token"][same_ctx[-12:]]) and len(same_ctx) == i % 16
    assert TokenTrace.from_dict(t.to_dict()) == t and f"[[{t.token}]]" in str(t)
    rows = np.flatnonzero(tokens["ctx"] == rec["ctx"])
    ids = torch.tensor([[model.tokenizer.bos_token_id, *tokens["token"][rows]]])
    acts = collect(model, ids, HOOKS[0], progress=False)
    assert acts.shape == (1, 17, model.cfg.d_model)
    assert torch.allclose(acts[0, 1:].half().float(), store.activations(HOOKS[0])[rows], rtol=1e-2, atol=1e-2)
    m = model_summary(model)
    assert (m.n_layers, m.d_model, m.d_vocab) == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab)
    assert m.parameters == sum(p.numel() for p in model.parameters()) and "layers" in m.verdicts()[0]
