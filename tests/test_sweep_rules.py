"""Initialisation per SAE, MMCS against its references, the choice on a held-out slice, the improved
recipe's uncentred encoder in SAELens files, and the logged pre-clip gradient norms."""
import dataclasses

import pytest
import torch

from conftest import sparse_data
from helpers.evals.reconstruction import mmcs
from helpers.saes.stack import SAEConfig, SAEStack, initial_dictionary, load_saelens, save_saelens
from helpers.runs.sweep import choose, mmcs_table, random_mmcs
from helpers.saes.train import TrainConfig, train_sweep

D = 16
HOOK = "blocks.0.hook_resid_post"


def test_every_sae_starts_from_its_own_dictionary():
    a, b = SAEConfig(D, 48, l1_coefficient=1e-3), SAEConfig(D, 48, l1_coefficient=3e-3)
    stack = SAEStack([a, b], seed=0)
    assert not torch.allclose(stack.W_dec[0], stack.W_dec[1], atol=0.1)  # α differs -> another init
    for i, c in enumerate((a, b)):  # in a stack exactly as alone, and as initial_dictionary rebuilds it
        assert torch.equal(stack.W_dec[i], SAEStack([c], seed=0).W_dec[0])
        assert torch.equal(stack.W_dec[i], initial_dictionary(c, 0))
        assert torch.equal(stack.W_enc[i], stack.W_dec[i])
    assert not torch.equal(SAEStack([a], seed=1).W_dec, SAEStack([a], seed=0).W_dec)  # the base seed counts
    # the control without the massive treatment starts where its twin does
    assert torch.equal(initial_dictionary(dataclasses.replace(a, massive=False), 0), initial_dictionary(a, 0))
    # two sizes start from unrelated dictionaries: MMCS at chance, not 1 (it was 1 with one shared seed)
    small, large = SAEConfig(64, 64, l1_coefficient=1e-3), SAEConfig(64, 256, l1_coefficient=1e-3)
    init = mmcs(initial_dictionary(small, 0), initial_dictionary(large, 0))
    chance = random_mmcs(64, 64, 256)
    assert init < 0.6 and abs(init - chance) < 0.05, (init, chance)


def test_mmcs_table_reports_init_and_chance():
    configs = [SAEConfig(D, m, l1_coefficient=a) for m in (16, 64) for a in (1e-3, 3e-3)]
    configs.append(SAEConfig(D, 64, architecture="topk", k=3))
    stacks = [SAEStack([c], seed=0) for c in configs]
    table = mmcs_table(stacks, configs, seed=0)
    assert [(t.alpha, t.ratio_small, t.ratio_large) for t in table] == [(1e-3, 1, 4), (3e-3, 1, 4)]
    for t in table:  # untrained SAEs: trained MMCS is the init MMCS, and both sit at chance
        assert t.mmcs == t.mmcs_trained == pytest.approx(t.mmcs_init, abs=1e-6)
        assert abs(t.mmcs_init - t.mmcs_random) < 0.1 and t.mmcs_random < 0.9 and not t.learned
    with torch.no_grad():  # a larger dictionary that contains the smaller one: trained MMCS 1, init unchanged
        stacks[2].W_dec[0, :16] = stacks[0].W_dec[0]
    t = mmcs_table(stacks, configs, seed=0)[0]
    assert t.mmcs_trained == pytest.approx(1.0, abs=1e-6) and t.mmcs_init < 0.95 and t.learned


def _row(i, select_ce, report_ce, **kw):
    r = {"architecture": "standard", "ratio": 4, "massive": True, "recipe": "improved", "l0": 20, "dead": 0.0,
         "fvu": 0.1, "ce_recovered_mean": report_ce, "select_l0": 20, "select_dead": 0.0, "select_fvu": 0.1,
         "select_ce_recovered_mean": select_ce}
    r.update(kw)
    return r


def test_choose_reads_the_selection_slice_only():
    rows = [_row(0, 0.90, 0.99), _row(1, 0.95, 0.80)]
    assert choose(rows, 4, 50) == 1  # best on the selection slice, though worse on the reported one
    rows = [_row(0, 0.90, 0.90), _row(1, 0.95, 0.95, select_l0=80, l0=10)]
    assert choose(rows, 4, 50) == 0  # its L0 on the selection slice disqualifies SAE 1
    rows = [_row(0, 0.90, 0.90, select_dead=0.5), _row(1, 0.80, 0.80)]
    assert choose(rows, 4, 50) == 1
    old = [{k: v for k, v in _row(i, 0, ce).items() if not k.startswith("select_")} for i, ce in enumerate((0.9, 0.95))]
    assert choose(old, 4, 50) == 1  # rows of tables made without a split still work


def test_improved_encoder_ignores_b_dec_and_files_keep_saelens_form(tmp_path):
    cfg = SAEConfig(D, 32, l1_coefficient=1e-3, recipe="improved")
    sae = SAEStack([cfg], seed=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(1, 32, D, generator=g))
        sae.b_enc.copy_(torch.randn(1, 32, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(1, D, generator=g))
        sae.scale.fill_(1.3)
    x = torch.randn(50, D, generator=g)
    pre = (x * 1.3) @ sae.W_enc[0].T + sae.b_enc[0]       # f = ReLU(W_enc x + b_enc): no b_dec
    assert torch.allclose(sae.encode(x)[0], torch.relu(pre), atol=1e-5)
    save_saelens(sae, tmp_path / "imp")
    back = load_saelens(tmp_path / "imp")
    assert back.recipe == "improved"
    assert torch.allclose(back(x), sae(x), atol=1e-4) and torch.allclose(back.encode(x), sae.encode(x), atol=1e-4)
    # the file itself is SAELens's formula, relu((x - b_dec) W_enc + b_enc)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "imp" / "sae_weights.safetensors"))
    codes = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert torch.allclose(codes @ t["W_dec"] + t["b_dec"], sae(x)[0], atol=1e-4)
    # "paper", the old name of the anthropic2023 recipe, is still read
    assert SAEConfig(D, 32, recipe="paper").recipe == "anthropic2023"


@pytest.fixture
def store(array_store):
    x, _ = sparse_data(n=2048, d=D, m=30)
    return array_store(x * 3)


CONFIGS = [SAEConfig(D, 48, l1_coefficient=a) for a in (3e-3, 3e-2)] + \
          [SAEConfig(D, 48, l1_coefficient=a, recipe="improved") for a in (3e-3, 3e-2)] + \
          [SAEConfig(D, 48, architecture="topk", k=k) for k in (3, 6)]


def test_history_logs_pre_clip_gradient_norms(store):
    tc = TrainConfig(total_tokens=128 * 12, batch_size=128, lr=3e-3, warmup_steps=2, log_every=3,
                     device="cpu", grad_clip=1.0)
    res = train_sweep(store, HOOK, CONFIGS, tc, progress=False)
    logs = [h for h in res.history if "grad_norm" in h]
    assert len(logs) == 4
    for h in logs:
        assert h["grad_clip"] == 1.0
        for c, g in zip(CONFIGS, h["grad_norm"]):
            assert (g is None) == (c.recipe != "improved")
            assert g is None or g > 0
    # the improved SAEs' biases started at zero (the April 2024 initialisation), the others' b_dec at the mean
    fresh = train_sweep(store, HOOK, CONFIGS, dataclasses.replace(tc, total_tokens=128, lr=0.0), progress=False)
    assert fresh.saes[2].b_dec.abs().max() == 0 and fresh.saes[0].b_dec.abs().max() > 0.1


# ---- the sweep's cache key ----------------------------------------------------------------------
def test_sweep_key_is_a_fingerprint_of_what_its_results_depend_on():
    from helpers.runs.sweep import SECTIONS, _key, fingerprint, sweep_configs
    from helpers.saes.stack import config_dict
    from helpers.settings.profiles import get_profile

    p = get_profile("test")
    fp = fingerprint(p, p.sae_hook, d_in=D)
    # the data and sweep sections, whole: a field added to either is in it
    assert fp["settings"] == json_ready(p.settings(*SECTIONS)) and SECTIONS == ("data", "sweep")
    assert fp["configs"] == json_ready([config_dict(c) for c in sweep_configs(p, D)])
    assert fp["train"]["lr"] == p.lr and fp["version"] > 0
    base = _key(p, p.sae_hook)
    grid = {**p.grid, "batchtopk": {"ratio": 2, "k": 8}}
    for change in ({"lr": p.lr * 2}, {"grid": grid}, {"curve_contexts": 3}, {"store_dtype": "bfloat16"},
                   {"shard_contexts": 32}, {"harvest_tokens": 1000}, {"seed": 1}):
        assert _key(p.replace(**change), p.sae_hook) != base, change
    for change in ({"ioi_prompts": 3}, {"device": "cpu"}, {"autointerp_features": 5}, {"layers": (1, 2, 6)},
                   {"lab_tokens": 1000}, {"ica_tokens": 100}):
        assert _key(p.replace(**change), p.sae_hook) == base, change
    assert _key(p, "blocks.2.hook_resid_post") != base


def test_the_grid_expands_in_the_order_written_and_each_sae_once():
    from helpers.runs.sweep import grid
    from helpers.settings.profiles import get_profile

    p = get_profile("test", massive_control=False, grid={
        "standard": [{"tied": (True, False), "ratio": (1, 2), "l1_coefficient": 1e-3},
                     {"ratio": 2, "l1_coefficient": 1e-3, "tied": True}],  # listed again: trained once
        "topk": {"ratio": 2, "k": (8, 4)}})
    assert grid(p) == [("standard", {"tied": True, "ratio": 1, "l1_coefficient": 1e-3}),
                       ("standard", {"tied": True, "ratio": 2, "l1_coefficient": 1e-3}),
                       ("standard", {"tied": False, "ratio": 1, "l1_coefficient": 1e-3}),
                       ("standard", {"tied": False, "ratio": 2, "l1_coefficient": 1e-3}),
                       ("topk", {"ratio": 2, "k": 8}), ("topk", {"ratio": 2, "k": 4})]
    control = grid(get_profile("test"))[-1]
    assert control == ("standard", {"ratio": 2, "l1_coefficient": 5e-3, "recipe": "improved", "massive": False})


def json_ready(obj):
    import json

    return json.loads(json.dumps(obj))


def test_results_with_a_stale_fingerprint_are_not_reused(tmp_path, monkeypatch):
    import json

    from helpers.runs import sweep
    from helpers.settings.profiles import get_profile

    monkeypatch.setenv("SAE_CACHE", str(tmp_path))
    p = get_profile("test")
    folder = sweep.sweep_dir(p)
    folder.mkdir(parents=True)
    assert sweep.load_results(p) is None  # nothing yet
    good = {"fingerprint": sweep.fingerprint(p, p.sae_hook, d_in=D), "rows": [], "chosen": 0}
    (folder / "results.json").write_text(json.dumps(good))
    assert sweep.load_results(p).fingerprint == good["fingerprint"]
    # the same folder (same key), but results made by code whose grid differed: not reused
    stale = json_ready(good)
    stale["fingerprint"]["configs"][0]["l1_coefficient"] *= 2
    (folder / "results.json").write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match="made with other settings \\(configs differ\\)"):
        assert sweep.load_results(p) is None
    # results from before fingerprints were stored: not reused either
    (folder / "results.json").write_text(json.dumps({"rows": [], "chosen": 0}))
    with pytest.warns(UserWarning, match="extra, settings, train, version differ"):
        assert sweep.load_results(p) is None
    monkeypatch.setattr(sweep, "VERSION", sweep.VERSION + 1)  # a new VERSION: a new folder
    assert sweep.sweep_dir(p) != folder


def test_choose_never_picks_a_diverged_or_non_finite_sae():
    nan = float("nan")
    rows = [_row(0, nan, nan, select_fvu=nan, fvu=nan), _row(1, 0.90, 0.90)]
    assert choose(rows, 4, 50) == 1
    rows = [_row(0, 0.99, 0.99, diverged=7), _row(1, 0.90, 0.90)]
    assert choose(rows, 4, 50) == 1
    rows = [_row(0, nan, nan, select_fvu=nan, select_dead=0.9), _row(1, 0.5, 0.5, select_dead=0.9)]
    assert choose(rows, 4, 50) == 1  # the fallback (lowest FVU among all) skips it too
    with pytest.raises(ValueError, match="diverged or has non-finite figures"):
        choose([_row(0, nan, nan, select_fvu=nan)], 4, 50)
    from helpers.runs.sweep import best_of_recipe

    rows = [_row(0, 0.9, 0.9, recipe="anthropic2023", diverged=3), _row(1, 0.8, 0.8)]
    assert best_of_recipe(rows, "anthropic2023", 4, 50) is None and best_of_recipe(rows, "improved", 4, 50) == 1


def test_save_saes_skips_a_diverged_sae(tmp_path):
    from helpers.runs.sweep import save_saes
    from helpers.saes.train import SweepResult

    configs = [SAEConfig(D, 32, l1_coefficient=1e-3), SAEConfig(D, 32, l1_coefficient=1e-2)]
    saes = [SAEStack([c], seed=0) for c in configs]
    with torch.no_grad():
        saes[1].W_enc.fill_(float("nan"))
    row = {k: 0.0 for k in ("l0", "fvu", "fvu_ordinary", "dead", "ce_recovered", "ce_recovered_mean")}
    result = SweepResult(saes, configs, [], 0.0, 0, diverged={1: 3})
    save_saes(result, [{**row, "diverged": None}, {**row, "diverged": 3}], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae_00"]


def test_a_stale_sweep_is_moved_aside_not_deleted(tmp_path, monkeypatch):
    import json

    from helpers.runs import sweep
    from helpers.settings.profiles import get_profile

    monkeypatch.setenv("SAE_CACHE", str(tmp_path))
    p = get_profile("test")
    folder = sweep.sweep_dir(p)
    folder.mkdir(parents=True)
    stale = json_ready({"fingerprint": sweep.fingerprint(p, p.sae_hook, d_in=D), "rows": [], "chosen": 0})
    stale["fingerprint"]["configs"][0]["l1_coefficient"] *= 2
    (folder / "results.json").write_text(json.dumps(stale))
    (folder / "sae_00").mkdir()
    (folder / "sae_00" / "cfg.json").write_text("{}")

    class Stop(Exception):
        pass

    def stop(*a, **kw):
        raise Stop

    monkeypatch.setattr(sweep, "get_store", stop)  # stop once the folder is dealt with
    with pytest.warns(UserWarning, match=r"moved aside to .*\.stale-\d{8}-\d{6}") as got, pytest.raises(Stop):
        sweep.get_sweep(p, model=object(), progress=False)
    moved = [f for f in folder.parent.iterdir() if f.name.startswith(folder.name + ".stale-")]
    assert len(moved) == 1 and str(moved[0]) in " ".join(str(w.message) for w in got)
    assert json.loads((moved[0] / "results.json").read_text()) == stale  # the reader's results, intact
    assert (moved[0] / "sae_00" / "cfg.json").exists()


def test_a_diverged_sae_is_not_evaluated_and_its_row_says_so(monkeypatch):
    from helpers.runs import sweep
    from helpers.saes.train import SweepResult

    configs = [SAEConfig(D, 32, l1_coefficient=a) for a in (1e-3, 1e-2, 3e-2)]
    asked = []

    def fake_evaluate(saes, cfgs, *a, **kw):
        asked.extend(cfgs)
        return [{**dataclasses.asdict(c), "label": c.label, "l0": 5.0, "fvu": 0.1, "n_eval": 100} for c in cfgs]

    monkeypatch.setattr(sweep, "evaluate", fake_evaluate)
    result = SweepResult([None] * 3, configs, [], 0.0, 0, diverged={1: 9})
    rows = sweep.evaluate_result(result, None, HOOK, None, 1)
    assert asked == [configs[0], configs[2]]
    assert [r.diverged for r in rows] == [None, 9, None]
    assert rows[1].label == configs[1].label and rows[1].l1_coefficient == 1e-2
    assert all(v != v for k, v in rows[1].to_dict().items() if k in ("l0", "fvu", "n_eval"))  # NaN figures
    assert rows[0].extra == {"n_eval": 100} and rows[1].usable is False and rows[0].usable


# ---- the sweep as a typed result ----------------------------------------------------------------
def _results_json():
    """A results.json as get_sweep writes it: three rows (the second a TopK SAE), every key."""
    cfgs = [SAEConfig(D, 64, l1_coefficient=a, recipe="improved") for a in (1e-3, 3e-3)]
    cfgs.insert(1, SAEConfig(D, 64, architecture="topk", k=4))
    figures = {"l0": 5.0, "mse": 0.1, "fvu": 0.2, "fvu_ordinary": 0.3, "fvu_massive": None, "massive_share": 0.0,
               "dead": 0.01, "dense": 0.0, "ce_sae": 3.1, "kl": 0.2, "ce_recovered": 0.9, "ce_recovered_mean": 0.8,
               "ce_clean": 3.0, "ce_zero": 9.0, "ce_mean": 5.0, "kl_zero": 6.0, "kl_mean": 2.0}
    rows = [{**dataclasses.asdict(c), "ratio": c.ratio, "label": c.label, "family": c.family,
             **{**figures, "l0": l0, "ce_recovered_mean": ce}, **{f"select_{k}": figures[k] for k in
             ("l0", "fvu", "fvu_ordinary", "dead", "ce_recovered", "ce_recovered_mean")}, "diverged": None}
            for c, l0, ce in zip(cfgs, (9.0, 6.0, 3.0), (0.8, 0.9, 0.7))]
    import json
    return json.loads(json.dumps({
        "fingerprint": {"version": 5, "settings": {"sweep": {"pick_ratio": 4, "pick_max_l0": 50}}}, "rows": rows,
        "mmcs": [{"alpha": 1e-3, "tied": False, "ratio_small": 1, "ratio_large": 4, "mmcs": 0.5,
                  "mmcs_trained": 0.5, "mmcs_init": 0.2, "mmcs_random": 0.21}],
        "history": [{"step": 1, "mse": [1, 1, 1], "l0": [3, 3, 3], "sparse_steps": [1, 0]}],
        "curve": [{"tokens": 10, "rows": [{"fvu_ordinary": 0.5}] * 3}, {"tokens": 20, "rows": [{"fvu_ordinary": 0.4}] * 3}],
        "eval_split": {"select": (0, 2), "report": (2, 4)}, "chosen": 0, "best_paper": None,
        "massive": {"hook": HOOK, "threshold": float("inf"), "offset": [0.0] * D}, "seconds": 1.5, "tokens": 20,
        "diverged": {}}))


def test_sweep_loads_results_json_and_writes_the_same(tmp_path):
    import json

    from helpers.runs.sweep import Sweep, SweepRow, matched_topk

    saved = _results_json()
    (tmp_path / "results.json").write_text(json.dumps(saved))
    sw = Sweep.load(tmp_path)
    assert sw.dir == str(tmp_path) and isinstance(sw.chosen_row, SweepRow) and sw.chosen_row.l0 == 9.0
    assert sw.to_dict() == saved  # the file's keys and values, exactly
    assert sw.eval_split.report == [2, 4] and sw.mmcs[0].learned and sw.curve_of(1, "fvu_ordinary") == [0.5, 0.4]
    assert matched_topk(sw) == 1 and sw.pick_max_l0 == 50 and sw.sparse_share == 0.5
    assert sw.chosen_row.config().ratio == 4 and sw.chosen_row.config(hook_name="x").hook_name == "x"
    table = sw.to_frame()
    assert list(table["chosen"]) == ["<-", "", ""] and len(sw.to_frame(full=True).columns) > 30
    text = str(sw)
    assert "Chosen: " + sw.chosen_row.label in text and "highest CE-loss recovered" in text
    assert "Held-out contexts: chosen on 0-1, reported on 2-3." in text
    sw.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == saved
    # matched_topk still takes results.json's dict, with "dir"
    assert matched_topk({**saved, "dir": str(tmp_path)}) == 1


def test_sweep_row_has_every_config_field():
    from helpers.runs.sweep import SweepRow

    names = {f.name for f in dataclasses.fields(SweepRow)}
    assert {f.name for f in dataclasses.fields(SAEConfig)} <= names
    row = SweepRow.from_dict({"label": "x", "l0": 3.0, "something_new": 1})
    assert row.extra == {"something_new": 1} and row.to_dict()["something_new"] == 1 and row.selected("l0") == 3.0
