"""Integrity checks are asserted everywhere; a claim about the model or the data is asserted only on the
setting it was measured on (the embedded default on Brown) and reported with its verdict elsewhere."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.runs.claims import claim, measured_here
from helpers.settings.profiles import PAPER_MODEL, PROFILES, get_profile
from test_corpus import notebook_cell


def test_measured_here_is_the_embedded_default_on_brown():
    assert [n for n, p in PROFILES.items() if measured_here(p)] == ["test", "cpu", "gpu"]
    assert not measured_here(get_profile("test").replace(corpus="pile"))
    assert not measured_here(get_profile("cpu").replace(model=PAPER_MODEL))


def test_claim_asserts_where_measured_and_reports_elsewhere(capsys):
    default, other = get_profile("test"), get_profile("test").replace(model=PAPER_MODEL, corpus="pile")
    assert claim(default, True, "x holds") is True and capsys.readouterr().out == ""
    with pytest.raises(AssertionError, match=r"x holds: does not hold \(0.3\)"):
        claim(default, False, "x holds", 0.3)
    assert claim(other, False, "x holds", 0.3) is False
    assert capsys.readouterr().out == f"claim does not hold on {PAPER_MODEL} / pile: x holds (0.3)\n"
    assert claim(other, np.bool_(True), "x holds") is True
    assert capsys.readouterr().out == f"claim holds on {PAPER_MODEL} / pile: x holds\n"


def test_notebook_01_checks_report_a_model_claim_off_the_default(model, tmp_path, capsys):
    """Notebook 01's checks cell on a store whose model fails the IOI claim: on a non-default profile it
    prints the verdict and ends cleanly; on the default, where the claim was measured, it fails."""
    from helpers.activations import massive
    from helpers.activations.harvest import harvest

    P = get_profile("test").replace(layers=(0, 1), sae_layer=1, ctx_len=17, harvest_tokens=320)
    store = harvest(model, tmp_path / "store", P.hooks, ctx_len=17, n_tokens=320, batch_contexts=4,
                    shard_contexts=8, progress=False)
    ns = dict(torch=torch, np=np, store=store, tokens=store.tokens(), hook=store.hooks[-1], model=model,
              seen=torch.ones(store.n_tokens, dtype=torch.int64), rules={h: massive.fit(store, h) for h in store.hooks},
              ioi_margin=-0.5, tagged=0.97, resource_plan=SimpleNamespace(host_peak=1e9))
    cell = notebook_cell("01_harvest", "de07566d")
    exec(cell, dict(ns, P=P.replace(model=PAPER_MODEL, corpus="pile")))
    out = capsys.readouterr().out
    assert f"claim does not hold on {PAPER_MODEL} / pile: the model prefers Mary to John" in out
    assert "all checks passed" in out
    with pytest.raises(AssertionError, match="prefers Mary to John"):
        exec(cell, dict(ns, P=P))
    # an integrity check fails on any profile: an epoch of batches that did not serve every token once
    broken = dict(ns, seen=torch.zeros(store.n_tokens, dtype=torch.int64))
    with pytest.raises(AssertionError):
        exec(cell, dict(broken, P=P.replace(model=PAPER_MODEL, corpus="pile")))
