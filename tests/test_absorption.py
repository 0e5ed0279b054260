"""First-letter absorption (helpers.evals.absorption) on a planted dictionary with known absorption."""
import json

import numpy as np
import pytest
import torch

from helpers.evals import absorption
from helpers.dictionaries.dictionary import Dictionary

LET = "abcd"
N_MARK = 40                  # token identities, shared by all letters (uncorrelated with the letter)
D = len(LET) + N_MARK + 2    # letter dims, marker dims, two noise dims
ABSORBED = tuple(range(6))  # 6 of the 40 "a" tokens are absorbed, each by its own latent (2.5% of "a" each)


def toy(n_ctx=300, per=20, seed=0):
    rng = np.random.default_rng(seed)
    n = n_ctx * per
    letter = rng.integers(0, len(LET), n)
    marker = rng.integers(0, N_MARK, n)
    x = 0.2 * rng.normal(size=(n, D))
    x[np.arange(n), letter] += 3.0
    x[np.arange(n), len(LET) + marker] += 2.0
    return (torch.tensor(x, dtype=torch.float32), np.array(list(LET))[letter], marker,
            np.repeat(np.arange(n_ctx), per))


class Planted(Dictionary):
    """Latents: one per letter (direction e_letter), one per marker (e_marker), and an absorbing latent
    per absorbed token, direction (e_a + e_marker)/√2. With `absorb`, on an absorbed token the 'a'
    latent is silent and the token's absorbing latent carries the letter instead."""

    name = "planted"

    def __init__(self, absorb=True):
        self.absorb = absorb
        eye = torch.eye(D)
        rows = [eye[i] for i in range(len(LET) + N_MARK)]
        rows += [(eye[0] + eye[len(LET) + m]) / 2 ** 0.5 for m in ABSORBED]
        self.rows = torch.stack(rows)

    @property
    def directions(self):
        return self.rows

    @property
    def decoder_rows(self):
        return self.rows

    def decode(self, codes):
        return codes @ self.rows

    def encode(self, x):
        base = torch.relu(x[:, : len(LET) + N_MARK])
        extra = torch.zeros(len(x), len(ABSORBED))
        if self.absorb:
            marker = x[:, len(LET): len(LET) + N_MARK].argmax(1)
            is_a = x[:, 0] > 1.5
            for j, m in enumerate(ABSORBED):
                hit = is_a & (marker == m)
                extra[hit, j] = 2 ** 0.5 * base[hit, 0]
                base[hit, 0] = 0
        return torch.cat([base, extra], 1)


@pytest.fixture(scope="module")
def setup():
    x, letters, marker, groups = toy()
    data = absorption.split_letters(x, letters, groups, seed=0)
    probes = absorption.fit_probes(data, progress=False)
    return data, probes


def test_split_by_context_and_probes(setup):
    data, probes = setup
    assert not set(data.groups_train) & set(data.groups_test)
    assert probes.letters == list(LET)
    assert (probes.f1 > 0.95).all()
    # the probe for 'a' points along e_a
    w = probes.weights[0] / probes.weights[0].norm()
    assert w[0] > 0.8 and w.abs().argmax() == 0  # (it also leans away from the other letters)


def test_planted_absorption_rate_is_found(setup):
    data, probes = setup
    rows = {r["letter"]: r for r in absorption.evaluate(Planted(), data, probes, progress=False)}
    a = rows["a"]
    assert a["main_latents"] == [0] and a["num_split_features"] == 1
    assert a["full_absorption_rate"] == pytest.approx(len(ABSORBED) / N_MARK, abs=0.05)
    assert a["mean_absorption_fraction"] == pytest.approx(len(ABSORBED) / N_MARK, abs=0.05)
    assert a["main_recall"] == pytest.approx(1 - len(ABSORBED) / N_MARK, abs=0.05)
    assert a["main_recall"] + a["full_absorption_rate"] == pytest.approx(1, abs=0.02)
    assert set(a["top_absorbing_latents"]) <= set(range(len(LET) + N_MARK, len(LET) + N_MARK + len(ABSORBED)))
    for c in "bcd":
        assert rows[c]["full_absorption_rate"] == 0 and rows[c]["mean_absorption_fraction"] < 0.02
        assert rows[c]["main_recall"] > 0.98
    s = absorption.summary(list(rows.values()))["planted"]
    assert s["letters"] == 4
    assert s["mean_full_absorption_score"] == pytest.approx(len(ABSORBED) / N_MARK / 4, abs=0.02)
    # the interval over letters: one letter of four absorbs, so resampled means run from 0 to its rate
    full = [r["full_absorption_rate"] for r in rows.values()]
    assert s["mean_full_absorption_score_low"] == pytest.approx(0, abs=1e-9)
    assert s["mean_full_absorption_score_low"] < s["mean_full_absorption_score"] < s["mean_full_absorption_score_high"]
    assert s["mean_full_absorption_score_high"] <= max(full) + 1e-9


def test_no_absorption_gives_zero(setup):
    data, probes = setup
    rows = absorption.evaluate(Planted(absorb=False), data, probes, progress=False)
    for r in rows:
        assert r["full_absorption_rate"] == 0 and r["mean_absorption_fraction"] < 0.02
        assert r["main_recall"] > 0.98


def test_word_letters_needs_whole_space_prefixed_words():
    vocab = {0: " house", 1: "s", 2: " Apple", 3: ",", 4: "dog", 5: " x2", 6: " be", 7: " a"}
    tokens = np.array([0, 1, 2, 3, 4, 6, 7, 3, 5, 3, 0])
    ctx = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    got = absorption.word_letters(tokens, ctx, vocab.__getitem__)
    # " house" followed by "s" is not a whole word; " Apple" is ("a"); "dog" has no space; " be" is ("b");
    # " a" has one letter; " x2" is not alphabetic; the last " house" ends its context, so where its
    # word ends is unseen
    assert got.tolist() == ["", "", "a", "", "", "b", "", "", "", "", ""]
    assert absorption.word_letters(tokens, ctx, vocab.__getitem__, min_letters=1)[6] == "a"


def test_saebench_json(setup, tmp_path):
    data, probes = setup
    rows = absorption.evaluate(Planted(), data, probes, progress=False)
    out = absorption.saebench_json(rows, tmp_path, model_name="toy")["planted"]
    assert out["eval_type_id"] == "absorption_first_letter"
    mean = out["eval_result_metrics"]["mean"]
    assert set(mean) == {"mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                         "std_dev_absorption_fraction_score", "std_dev_full_absorption_score",
                         "std_dev_num_split_features"}
    assert [d["first_letter"] for d in out["eval_result_details"]] == list(LET)
    assert json.loads((tmp_path / "planted_absorption.json").read_text())["eval_result_metrics"]["mean"] == mean


def test_absorption_result_summarises_round_trips_and_exports(setup, tmp_path):
    data, probes = setup
    rows = [{**r, "method": name} for name, d in (("planted", Planted()), ("clean", Planted(absorb=False)))
            for r in absorption.evaluate(d, data, probes, progress=False)]
    res = absorption.Absorption.from_rows(rows, layer=2, hook="h")
    assert res.as_rows() == rows
    s = absorption.summary(rows)
    planted = res.method("planted")
    assert planted.letters == 4 and res.letters == {"planted": 4, "clean": 4}
    assert planted.full_absorption.value == pytest.approx(s["planted"]["mean_full_absorption_score"])
    assert planted.full_absorption.high == pytest.approx(s["planted"]["mean_full_absorption_score_high"])
    assert planted.absorption_fraction.value == pytest.approx(s["planted"]["mean_absorption_fraction_score"])
    assert res.method("clean").full_absorption.value == 0
    assert res.to_frame()["method"].tolist() == ["planted", "clean"]
    assert any("highest for planted" in v and "lowest for clean" in v for v in res.verdicts())
    again = absorption.Absorption.load(res.save(tmp_path / "absorption.json"))
    assert again.as_rows() == res.as_rows() and again.method("planted") == planted and again.layer == 2
    out = res.saebench_json(tmp_path / "bench", model_name="toy")
    assert out["planted"]["eval_config"]["hook"] == "h"
    assert out["planted"]["eval_result_metrics"] == absorption.saebench_json(rows)["planted"]["eval_result_metrics"]
    assert (tmp_path / "bench" / "clean_absorption.json").exists()
