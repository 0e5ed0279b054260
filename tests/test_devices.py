"""Device discipline: a helper computes on the device of the model or dictionary it is given, moves
what it creates there, and hands back CPU tensors or numpy arrays.

Checked without a GPU: inside `fake_cuda()` (tests/fake_cuda.py) anything put on "cuda" refuses, as on a
real GPU, to meet a CPU tensor in one operation. Each test puts the dictionary or the model on "cuda",
as a notebook does on a GPU runtime, and runs the workbook's entry points. To run whole notebooks that
way: `PYTHONPATH=tests/fake_cuda_site pytest --nbval-lax notebooks`.
"""
import numpy as np
import pytest
import torch

from fake_cuda import CudaTensor, DeviceMixError, fake_cuda
from helpers.evals import absorption
from helpers.evals import probing
from helpers.dictionaries.dictionary import SAEDictionary, device_of, neuron_basis, random_directions
from helpers.evals.features import Concepts, concept_scores, feature_stats, top_tokens
from helpers.evals.heldout import HeldoutScorer, matched_counts
from helpers.saes.stack import SAEConfig, SAEStack
from helpers.activations.store import META_DTYPE

HOOK = "blocks.0.hook_resid_post"
D = 16


def test_the_fake_device_refuses_what_cuda_refuses():
    with fake_cuda():
        a = torch.ones(3, 4).to("cuda")
        assert isinstance(a, CudaTensor) and a.device.type == "cuda"
        assert isinstance(torch.zeros(4, device=a.device) + a, CudaTensor)
        with pytest.raises(DeviceMixError):
            a + torch.ones(4)
        with pytest.raises(DeviceMixError):
            torch.ones(5)[torch.tensor([0, 1]).cuda()]
        with pytest.raises(TypeError, match="numpy"):
            a.numpy()
        assert (a * torch.tensor(2.0)).sum().item() == 24        # 0-dim CPU tensors are scalars
        assert a[torch.tensor([0, 2])].shape == (2, 4)            # CPU indices into a CUDA tensor
        layer = torch.nn.Linear(4, 2).to("cuda")
        assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.device.type == "cuda"
        with pytest.raises(DeviceMixError):
            layer(torch.ones(1, 4))


@pytest.fixture
def toy(array_store):
    """A store of 2,000 random activations in contexts of 16 tokens over 40 token ids, an SAE and two
    baselines for it."""
    n = 2000
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(n, D)), dtype=torch.float32)
    store = array_store(x, hook=HOOK, shard_tokens=500)
    for s in store.shards:                                     # token ids and contexts the scorers can use
        f = store.path / s["files"]["meta"]["name"]
        meta = np.fromfile(f, dtype=META_DTYPE)
        i = meta["token"].copy()
        meta["token"], meta["ctx"], meta["tok_pos"] = 10 + i % 40, i // 16, i % 16
        f.write_bytes(meta.tobytes())
    import json

    from helpers.activations.store import ActivationStore, _crc32
    for s in store.shards:
        s["files"]["meta"]["crc32"] = _crc32((store.path / s["files"]["meta"]["name"]).read_bytes())
    (store.path / "manifest.json").write_text(json.dumps(store.manifest))
    store = ActivationStore.open(store.path)
    sae = SAEStack([SAEConfig(d_in=D, d_sae=64, hook_name=HOOK, model_name="toy")])
    mean = x.mean(0)
    return store, x, sae, {"random": random_directions(D, 64, mean, hook_name=HOOK, model_name="toy"),
                           "neurons": neuron_basis(D, mean, hook_name=HOOK, model_name="toy")}


def test_device_of_follows_what_it_is_given(toy):
    _, _, sae, base = toy
    assert device_of(SAEDictionary(sae)).type == "cpu" and device_of(base["random"]).type == "cpu"
    with fake_cuda():
        assert device_of(SAEDictionary(sae).to("cuda")).type == "cuda"
        assert device_of(base["random"].to("cuda")).type == "cuda"
        assert device_of(torch.nn.Linear(2, 2).to("cuda")).type == "cuda"


def test_scoring_computes_on_the_dictionary_device(toy, model):
    """Notebook 03: feature statistics, concept scores and the held-out score of an SAE on the GPU."""
    store, _, sae, base = toy
    on_cpu = HeldoutScorer(store, model.tokenizer, n_boot=5, max_density=0.05, min_count=5, min_active=5)
    ref = on_cpu.score(SAEDictionary(sae), progress=False)
    with fake_cuda():
        d = SAEDictionary(sae).to("cuda")
        stats = feature_stats(d, store, progress=False)
        assert not isinstance(stats.density, CudaTensor), "statistics come back on the CPU"
        concepts = Concepts.from_store(store, model.tokenizer)
        concept_scores(d, store, stats, concepts, max_density=0.05, progress=False)
        v, i, n = top_tokens(d, store, HOOK, store.n_tokens, np.ones(store.n_tokens, bool), 8, progress=False)
        assert not isinstance(v, CudaTensor)
        scorer = HeldoutScorer(store, model.tokenizer, n_boot=5, max_density=0.05, min_count=5, min_active=5)
        r = scorer.score(d, progress=False)
        rnd = base["random"].to("cuda")
        scorer.score(rnd, counts=matched_counts(torch.as_tensor(r.counts), rnd.n_features), progress=False)
    np.testing.assert_allclose(r.mcc, ref.mcc, atol=1e-6)


def test_absorption_and_probing_on_the_dictionary_device(toy, model):
    """Notebook 04: first-letter absorption and sparse probing of an SAE and a baseline on the GPU."""
    store, x, sae, base = toy
    rng = np.random.default_rng(1)
    letters = np.array(list("ab"))[rng.integers(0, 2, len(x))]
    x = x.clone()
    x[:, 0] += torch.as_tensor(np.where(letters == "a", 3.0, -3.0), dtype=torch.float32)
    groups = np.arange(len(x)) // 16
    data = absorption.split_letters(x, letters, groups, seed=0)
    probes = absorption.fit_probes(data, progress=False)
    task = probing.balanced_task("a", letters == "a", np.ones(len(x), bool), groups, seed=0)
    ref = absorption.evaluate(SAEDictionary(sae), data, probes, progress=False)
    with fake_cuda():
        d = SAEDictionary(sae).to("cuda")
        got = absorption.evaluate(d, data, probes, progress=False)
        dicts = {"SAE": d, "neurons": base["neurons"].to("cuda")}
        rows = absorption.evaluate(dicts["neurons"], data, probes, progress=False)
        probing.probe_tasks(dicts, x, [task], ks=(1, 2), n_boot=5, progress=False)
    key = lambda rows: [(r["letter"], r["num_full_absorption"], r["mean_absorption_fraction"]) for r in rows]  # noqa: E731
    assert rows and key(got) == key(ref)


@pytest.fixture(scope="module")
def gpu_model():
    """The embedded model loaded onto the fake GPU, as a notebook does on a GPU runtime; its own copy, so
    that the session's CPU model stays as it is."""
    from helpers import load_model

    with fake_cuda():
        model = load_model(device="cuda")
    assert device_of(model).type == "cuda"
    return model


def test_patching_on_the_model_device(gpu_model):
    """Notebook 05: plain patching, patch and edit curves and a feature circuit, the model on the GPU and
    the dictionaries on it too, or left on the CPU."""
    from helpers.causal.patching import (edit_context, edit_curve, patch_context, patch_curve, patch_positions_by_layer,
                                  upstream_features)
    from helpers.causal.prompts import keep_solved, make_ioi, make_pronoun

    model, hook, up = gpu_model, "blocks.3.hook_resid_post", "blocks.1.hook_resid_post"
    with fake_cuda():
        ioi = make_ioi(model.tokenizer, n=8, seed=0)
        ioi, _ = keep_solved(model, ioi)
        patch_positions_by_layer(model, ioi, [0, 3], progress=False)
        ctx = patch_context(model, ioi, hook)
        for dev in ("cpu", "cuda"):
            d = random_directions(model.cfg.d_model, 64, hook_name=hook).to(dev)
            patch_curve(model, ioi, hook, d, ks=(1, 4), context=ctx)
        pron = make_pronoun(model.tokenizer, n=8, seed=0)
        text = model.to_tokens(["The old man walked slowly down the road", "She opened the letter"])[:, :8]
        edit_curve(model, pron, text, hook, d, ks=(1, 4), context=edit_context(model, pron, text, hook))
        upstream_features(model, ioi.tokens[:2], hook, d, 0, up,
                          random_directions(model.cfg.d_model, 32, hook_name=up).to("cuda"))


def test_steering_on_the_model_device(gpu_model, array_store):
    """Notebook 05: generation, costs and the steering comparison, the model on the GPU."""
    from helpers.causal import steering

    model, hook = gpu_model, "blocks.3.hook_resid_post"
    g = torch.Generator().manual_seed(2)
    store = array_store(torch.randn(512, model.cfg.d_model, generator=g) * 3, hook=hook)
    with fake_cuda():
        index = steering.build_index(model, store, neuron_basis(model.cfg.d_model, hook_name=hook).to("cuda"),
                                     progress=False)
        word = next(t.strip() for t in index.vocab[300:] if t.strip().isalpha())
        text = model.to_tokens(["The old man walked slowly down the road", "She opened the letter and read it"])[:, :8]
        steering.generate(model, "I think", hook, index.dictionary.directions[7] * 5, n_new=3)
        steering.next_token_change(model, "I think", hook, index.dictionary.directions[7] * 5)
        steering.compare_steering(model, index, text, text, concepts={"toy": (word,)}, prompts=("I think",),
                                  samples=1, n_new=2, targets=(0.1,), grid=(1.0,), min_present=1, progress=False,
                                  n_boot=20)


def test_claim_one_protocols_and_controls_on_the_dictionary_device(toy, model):
    """Notebook 03's claim-1 section with its dictionaries on the GPU: the protocols and the held-out score
    of codes, the token-mean oracle, and the SAEs that share latents; results equal the CPU's."""
    from helpers.dictionaries.controls import shared_latents, token_mean_directions
    from helpers.dictionaries.dictionary import encode_batched
    from helpers.evals.protocols import dictionary_protocol_scores

    store, x, sae, base = toy
    scorer = HeldoutScorer(store, model.tokenizer, n_boot=5, max_density=0.05, min_count=5, min_active=5)
    ids = store.tokens()["token"]
    oracle = token_mean_directions(x, ids, min_count=5, hook_name=HOOK)
    dicts = {"SAE": SAEDictionary(sae), "random": base["random"], "token means": oracle}
    kw = dict(labels=scorer.labels, contexts=scorer.ctx, n_boot=5, window=8, pairs=[])
    ref = dictionary_protocol_scores(dicts, x, **kw)
    ref_held = scorer.score_codes(encode_batched(oracle, x), "token means")
    with fake_cuda():
        on_gpu = {name: d.to("cuda") for name, d in dicts.items()}
        got = dictionary_protocol_scores(on_gpu, x, **kw)
        held = scorer.score_codes(encode_batched(on_gpu["token means"], x), "token means")
        share = shared_latents(on_gpu["SAE"], on_gpu["SAE"])
    assert got.rows() == ref.rows() and share.share_a == 1.0
    np.testing.assert_allclose(held.mcc, ref_held.mcc, atol=1e-6)


def test_streamed_pca_takes_batches_on_any_device():
    """PCA streamed from batches on the GPU (a reader's own activations) accumulates on the CPU in float64,
    as it does from CPU batches, and gives the same components."""
    from helpers.dictionaries.baselines import streamed_pca

    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0)) @ torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    comps, mean = streamed_pca(x[i:i + 500] for i in range(0, len(x), 500))
    with fake_cuda():
        on_gpu = [x[i:i + 500].to("cuda") for i in range(0, len(x), 500)]
        comps_gpu, mean_gpu = streamed_pca(on_gpu)
    assert np.array_equal(comps, comps_gpu) and np.array_equal(mean, mean_gpu)
