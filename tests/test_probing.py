"""Sparse probing (helpers.evals.probing) on synthetic data: planted latents, leak-free splits, intervals, JSON."""
import json

import numpy as np
import pytest
import torch

from helpers.evals import probing
from helpers.dictionaries.dictionary import Dictionary, random_directions
from helpers.activations.store import META_DTYPE

D = 12


class Planted(Dictionary):
    """Latent 0 = ReLU of dimension 0 (which carries the class), the rest: ReLU of random projections
    of the noise dimensions."""

    name = "planted"

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n - 1, D - 1, generator=g)
        self._dirs = torch.zeros(n, D)
        self._dirs[0, 0] = 1
        self._dirs[1:, 1:] = w / w.norm(dim=-1, keepdim=True)

    @property
    def directions(self):
        return self._dirs

    def encode(self, x):
        return torch.relu(x @ self._dirs.T)


def synthetic(n_groups=80, per_group=50, seed=0):
    """Rows in groups (contexts); half the rows of each group are positives, marked by +2 on dimension 0."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    groups = np.repeat(np.arange(n_groups), per_group)
    y = rng.random(n) < 0.5
    x = torch.as_tensor(rng.normal(size=(n, D)), dtype=torch.float32)
    x[:, 0] = torch.as_tensor(np.where(y, 2.0, 0.0) + 0.3 * rng.normal(size=n), dtype=torch.float32)
    return x, y, groups


def test_split_never_leaks_a_group_and_is_balanced():
    x, y, groups = synthetic()
    eligible = np.ones(len(y), bool)
    eligible[::7] = False
    t = probing.balanced_task("t", y, eligible, groups, max_per_class=400)
    assert not set(t.groups_train) & set(t.groups_test)
    assert set(np.unique(groups[t.train])) == set(t.groups_train)
    assert eligible[t.train].all() and eligible[t.test].all()
    assert t.y_train.sum() == (~t.y_train).sum() <= 400
    assert t.y_test.sum() == (~t.y_test).sum() > 0
    assert (t.y_train == y[t.train]).all() and (t.y_test == y[t.test]).all()


def test_too_few_examples_is_a_clear_error():
    x, y, groups = synthetic(n_groups=4, per_group=5)
    with pytest.raises(probing.ProbingError, match="fewer than min_per_class"):
        probing.balanced_task("rare", y, np.ones(len(y), bool), groups, min_per_class=50)


def test_planted_latent_gives_top1_near_one_and_beats_random():
    x, y, groups = synthetic()
    task = probing.balanced_task("t", y, np.ones(len(y), bool), groups)
    dicts = {"planted": Planted(), "random": random_directions(D, 32, seed=1)}
    rows = probing.probe_tasks(dicts, x, [task], ks=(1, 2, 5), n_boot=100, progress=False)
    get = {(r["method"], r["probe"], r["k"]): r for r in rows}
    top1 = get[("planted", "top_k", 1)]
    assert top1["latents"] == [0]
    assert top1["accuracy"] > 0.98 and top1["f1"] > 0.98
    # random directions hardly see dimension 0 in one latent
    assert get[("random", "top_k", 1)]["accuracy"] < top1["accuracy"] - 0.1
    assert get[(probing.RESIDUAL, "full", None)]["accuracy"] > 0.98
    assert get[(probing.RESIDUAL, "diff_means", None)]["accuracy"] > 0.98
    assert get[(probing.RESIDUAL, "top_k", 1)]["latents"] == [0]
    for r in rows:  # the interval holds the estimate
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
        assert r["f1_low"] <= r["f1"] <= r["f1_high"]
        assert r["test_groups"] == len(np.unique(task.groups_test))


def test_bootstrap_interval_is_wider_with_fewer_groups():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.5
    pred = np.where(rng.random(2000) < 0.8, y, ~y)
    many = probing.group_bootstrap(pred == y, pred, y, np.arange(2000) // 10, n_boot=300)
    few = probing.group_bootstrap(pred == y, pred, y, np.arange(2000) // 400, n_boot=300)
    assert many["accuracy"] == pytest.approx(0.8, abs=0.03)
    assert many["accuracy_low"] < many["accuracy"] < many["accuracy_high"]
    assert few["accuracy_high"] - few["accuracy_low"] > many["accuracy_high"] - many["accuracy_low"]


def test_brown_tasks_group_by_context_and_document():
    from helpers.activations.corpus import NO_TAG, load_brown

    c = load_brown()
    rng = np.random.default_rng(0)
    n_ctx, per = 120, 40
    meta = np.zeros(n_ctx * per, dtype=META_DTYPE)
    meta["ctx"] = np.repeat(np.arange(n_ctx), per)
    meta["doc"] = meta["ctx"] // 3                       # three contexts per document
    meta["tok_pos"] = np.tile(np.arange(per), n_ctx)
    meta["genre"] = np.where(meta["doc"] % 3 == 0, c.genres.index("news"),
                             np.where(meta["doc"] % 3 == 1, c.genres.index("fiction"), c.genres.index("humor")))
    tags = [c.tags.index(t) for t in ("nn", "vb", "jj", "rb", "in", "at", "pps")]
    meta["pos"] = rng.choice(tags, len(meta))
    meta["pos"][meta["tok_pos"] == 0] = NO_TAG
    tasks = probing.brown_tasks(meta, genres=("news", "fiction"), min_per_class=5)
    names = [t.name for t in tasks]
    assert names == list(probing.POS_CLASSES) + ["genre:news", "genre:fiction"]
    for t in tasks:
        assert not set(meta["ctx"][t.train]) & set(meta["ctx"][t.test])
        if t.kind == "genre":
            assert not set(meta["doc"][t.train]) & set(meta["doc"][t.test])
            assert (meta["tok_pos"][np.r_[t.train, t.test]] > 0).all()
        else:
            assert (meta["pos"][np.r_[t.train, t.test]] != NO_TAG).all()
    noun = tasks[0]
    assert (c.coarse_of_tag[meta["pos"][noun.train[noun.y_train]]] == 0).all()  # NOUN is COARSE_TAGS[0]
    with pytest.raises(probing.ProbingError, match="unknown genre"):
        probing.brown_tasks(meta, genres=("poetry",))


def test_saebench_json_shape(tmp_path):
    x, y, groups = synthetic(n_groups=40)
    task = probing.balanced_task("t", y, np.ones(len(y), bool), groups)
    rows = probing.probe_tasks({"planted": Planted()}, x, [task], ks=(1, 2), n_boot=20, progress=False)
    out = probing.saebench_json(rows, tmp_path, model_name="toy", hook="h")
    res = out["planted"]
    assert res["eval_type_id"] == "sparse_probing"
    m = res["eval_result_metrics"]
    assert m["sae"]["sae_top_1_test_accuracy"] == pytest.approx(rows[-2]["accuracy"])
    assert m["sae"]["sae_top_5_test_accuracy"] is None and m["llm"]["llm_test_accuracy"] > 0.9
    assert res["eval_result_details"][0]["dataset_name"] == "t"
    saved = json.loads((tmp_path / "planted_sparse_probing.json").read_text())
    assert saved["eval_result_metrics"] == m


def test_sparse_probing_result_summarises_round_trips_and_exports(tmp_path):
    x, y, groups = synthetic(n_groups=40)
    tasks = [probing.balanced_task("t", y, np.ones(len(y), bool), groups),
             probing.balanced_task("u", ~y, np.ones(len(y), bool), groups, seed=1)]
    dicts = {"planted": Planted(), "random": random_directions(D, 32, torch.zeros(D), seed=0)}
    rows = probing.probe_tasks(dicts, x, tasks, ks=(1, 2), n_boot=20, progress=False)
    res = probing.SparseProbing.from_rows(rows, layer=3, hook="h")
    assert res.as_rows() == rows
    summ = probing.summary(rows)
    assert res.mean("planted", "top_k", 1) == pytest.approx(summ[("planted", "top_k", 1)])
    assert res.residual_full == pytest.approx(summ[(probing.RESIDUAL, "full", None)]) and res.residual_full > 0.9
    assert res.tasks == ["t", "u"] and res.ks == [1, 2] and res.methods == [probing.RESIDUAL, "planted", "random"]
    table = res.to_frame()
    assert list(table.columns) == ["method", "top-1", "top-2"] and len(table) == 3
    # the planted latent carries the class: it is the best top-1 probe, and the verdicts say so
    assert any(v.startswith("Top-1 probe: planted is best") for v in res.verdicts())
    assert res.by_task(1, ("planted", "random")).rows()[0]["task"] == "t"
    again = probing.SparseProbing.load(res.save(tmp_path / "probing.json"))
    assert again.as_rows() == res.as_rows() and again.layer == 3 and again.scores[0].accuracy == res.scores[0].accuracy
    out = res.saebench_json(tmp_path)
    assert out["planted"]["eval_config"]["hook"] == "h"
    assert out["planted"]["eval_result_metrics"] == probing.saebench_json(rows, hook="h")["planted"]["eval_result_metrics"]
