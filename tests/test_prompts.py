"""Prompt datasets for notebook 05: IOI and pronoun sets are well formed, balanced and solved by the model."""
from collections import Counter

import pytest
import torch

from helpers.causal import prompts
from helpers.causal.prompts import (IOI_TEMPLATES, PRONOUN_TEMPLATES, PromptSet, evaluate, keep_solved, load_names,
                             logit_diff, make_ioi, make_pronoun, single_token_names, unambiguous_names)

N_IOI = 2 * 2 * len(IOI_TEMPLATES)       # two prompts per (template, order)
N_PRONOUN = 3 * 2 * len(PRONOUN_TEMPLATES)  # three prompts per (template, gender)


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="module")
def ioi(tokenizer):
    return make_ioi(tokenizer, n=N_IOI, seed=0)


@pytest.fixture(scope="module")
def pronoun(tokenizer):
    return make_pronoun(tokenizer, n=N_PRONOUN, seed=0)


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ names

def test_names_load_deduplicated():
    names = load_names()
    assert len(names["male"]) > 3000 and len(names["female"]) > 4000
    assert all(len(v) == len(set(v)) for v in names.values())
    assert "John" in names["male"] and "Mary" in names["female"]


def test_single_token_names_counts_what_it_skips(tokenizer):
    kept, skipped = single_token_names(tokenizer, ["Mary", "Jo-Ann", "John", "Bartholomew", "Emily"])
    assert kept == ["Mary", "John", "Emily"] and skipped == 2
    assert all(len(ids(tokenizer, " " + n)) == 1 for n in kept)


def test_names_that_are_mostly_words_are_skipped_and_counted():
    kept, skipped = unambiguous_names(["Mary", "May", "John", "Will", "Bank", "Emily"])
    assert kept == ["Mary", "John", "Emily"] and skipped == 3  # Emily is not in Brown at all: kept


# -------------------------------------------------------------------------------------------- IOI

def test_ioi_prompts_are_well_formed(ioi, tokenizer, model):
    n, pos = ioi.tokens.shape
    assert n == N_IOI and ioi.cf_tokens.shape == (n, pos) and ioi.meta["length"] == pos
    assert (ioi.tokens[:, 0] == tokenizer.bos_token_id).all()
    for i in (0, 7, n - 1):  # exactly the model's own tokenisation, BOS included
        assert torch.equal(model.to_tokens(ioi.texts[i])[0].cpu(), ioi.tokens[i])
        assert torch.equal(model.to_tokens(ioi.cf_texts[i])[0].cpu(), ioi.cf_tokens[i])
    assert len(set(ioi.texts)) == n
    for i in range(n):
        row, cf = ioi.tokens[i].tolist(), ioi.cf_tokens[i].tolist()
        io, s = int(ioi.correct[i]), int(ioi.wrong[i])
        # clean: the IO is named once, the subject twice; the counterfactual repeats the IO instead
        assert (row.count(io), row.count(s)) == (1, 2) and (cf.count(io), cf.count(s)) == (2, 1)
        assert sum(a != b for a, b in zip(row, cf)) == 1
        first = min(row.index(io), row.index(s))
        assert row[first] == (io if ioi.variant[i] == "ABBA" else s)
        assert ioi.texts[i].endswith(" to") and tokenizer.decode([io]).strip() in ioi.texts[i]


def test_ioi_is_balanced_over_templates_and_orders(ioi, tokenizer):
    assert Counter(ioi.template) == {t: 4 for t in range(len(IOI_TEMPLATES))}
    assert Counter(zip(ioi.template, ioi.variant)) == {(t, o): 2 for t in range(len(IOI_TEMPLATES))
                                                       for o in ("ABBA", "BABA")}
    uneven = make_ioi(tokenizer, n=31, seed=3)  # not a multiple of 26 cells: off by at most one
    orders, per_template = Counter(uneven.variant), Counter(uneven.template).values()
    assert abs(orders["ABBA"] - orders["BABA"]) == 1 and max(per_template) - min(per_template) == 1


def test_ioi_reports_what_it_skipped(ioi, tokenizer):
    names = load_names()
    everyone = list(dict.fromkeys(names["male"] + names["female"]))
    one, multi = single_token_names(tokenizer, everyone)
    _, words = unambiguous_names(one)
    assert ioi.meta["names_skipped_multi_token"] == multi > 5000
    assert ioi.meta["names_skipped_common_word"] == words > 50
    assert ioi.meta["names_usable"] == len(everyone) - multi - words > 500
    assert ioi.meta["dropped_for_length"] == 0 and ioi.meta["templates_dropped_for_length"] == []
    assert ioi.meta["fillers_skipped_multi_token"] == 0


def test_ioi_is_seeded(tokenizer, ioi):
    assert make_ioi(tokenizer, n=N_IOI, seed=0).texts == ioi.texts
    assert make_ioi(tokenizer, n=N_IOI, seed=1).texts != ioi.texts


def test_templates_of_another_length_are_dropped_and_reported(tokenizer):
    longer = "When {A} and {B} went to the big old {place}, {S} gave a {object} to"
    ps = make_ioi(tokenizer, n=12, templates=IOI_TEMPLATES[:3] + [longer])
    assert ps.meta["templates_dropped_for_length"] == [3]
    assert Counter(ps.template) == {0: 4, 1: 4, 2: 4}


def test_ioi_skips_multi_token_names_and_refuses_impossible_sizes(tokenizer):
    ps = make_ioi(tokenizer, n=8, names=["Mary", "John", "Anna", "Jo-Ann", "Bartholomew"])
    assert ps.meta["names_skipped_multi_token"] == 2 and ps.meta["names_usable"] == 3
    assert not any("Jo-Ann" in t or "Bartholomew" in t for t in ps.texts)
    # template 8 has no fillers: 3 names make 3 * 2 = 6 distinct prompts per order
    with pytest.raises(ValueError, match="cannot make 400 IOI prompts"):
        make_ioi(tokenizer, n=400, names=["Mary", "John", "Anna"])
    with pytest.raises(ValueError, match="at least 2 usable names"):
        make_ioi(tokenizer, n=4, names=["Mary", "Bartholomew", "May"])


@pytest.mark.parametrize("blank", ["", " ", "Mary Ann", " John", "Anna\t"])
def test_empty_or_spaced_names_are_refused(tokenizer, blank):
    """A prompt puts one space before each name: an empty name would leave two spaces side by side."""
    with pytest.raises(ValueError, match="names must be single words without spaces"):
        make_ioi(tokenizer, n=4, names=["Mary", "John", "Anna", blank])
    with pytest.raises(ValueError, match="names must be single words without spaces"):
        make_pronoun(tokenizer, n=4, names={"male": ["John", "Paul", blank], "female": ["Mary", "Anna"]})


@pytest.mark.parametrize("template, error", [
    ("{A} and {B} went to the {place}, {S} gave a {object} to", "must follow a space"),
    ("When {A} and {C} went out, {S} gave a drink to", "unknown placeholder"),
    ("When {A} and {B} went out, John gave a drink to", "lacks"),
    ("When {A} and {B} went out, {S} gave a drink to ", "ends with a space"),
])
def test_bad_templates_say_what_is_wrong(tokenizer, template, error):
    with pytest.raises(ValueError, match=error):
        make_ioi(tokenizer, n=2, templates=[template])


# --------------------------------------------------------------------------------------- pronouns

def test_pronoun_prompts_are_well_formed_and_balanced(pronoun, tokenizer):
    names = load_names()
    male, female = set(names["male"]) - set(names["female"]), set(names["female"]) - set(names["male"])
    he, she = ids(tokenizer, " he")[0], ids(tokenizer, " she")[0]
    assert pronoun.tokens.shape == pronoun.cf_tokens.shape == (N_PRONOUN, pronoun.meta["length"])
    cells = Counter(zip(pronoun.template, pronoun.variant))
    assert cells == {(t, g): 3 for t in range(len(PRONOUN_TEMPLATES)) for g in ("male", "female")}
    for i in range(N_PRONOUN):
        t, g = PRONOUN_TEMPLATES[pronoun.template[i]], pronoun.variant[i]
        name = _fill(t, pronoun.texts[i])
        cf_name = _fill(t, pronoun.cf_texts[i])
        own, other = (male, female) if g == "male" else (female, male)
        assert name in own and cf_name in other
        assert (int(pronoun.correct[i]), int(pronoun.wrong[i])) == ((he, she) if g == "male" else (she, he))
        assert sum(a != b for a, b in zip(pronoun.tokens[i].tolist(), pronoun.cf_tokens[i].tolist())) == 1
    assert pronoun.meta["names_skipped_both_genders"] == len(set(names["male"]) & set(names["female"])) > 100
    assert pronoun.meta["names_skipped_multi_token"] > 5000 and pronoun.meta["names_skipped_common_word"] > 50


def _fill(template, text):
    """The name a one-placeholder template was filled with to give `text`."""
    head, tail = template.split("{name}")
    assert text.startswith(head) and text.endswith(tail)
    return text[len(head):len(text) - len(tail)]


def test_pronoun_refuses_impossible_sizes(tokenizer):
    few = {"male": ["John", "Paul"], "female": ["Mary", "Anna"]}
    assert len(make_pronoun(tokenizer, n=40, names=few)) == 40
    with pytest.raises(ValueError, match="cannot make 100 pronoun prompts"):
        make_pronoun(tokenizer, n=100, names=few)
    with pytest.raises(ValueError, match="no usable female name"):
        make_pronoun(tokenizer, n=4, names={"male": ["John", "Paul"], "female": ["Paul", "Bartholomew"]})


def test_answers_must_be_single_tokens(tokenizer, monkeypatch, ioi):
    monkeypatch.setitem(prompts.PRONOUNS, "male", " he himself")
    with pytest.raises(ValueError, match="answers must be single tokens"):
        make_pronoun(tokenizer, n=4)
    n = len(ioi)
    with pytest.raises(ValueError, match="one single-token answer per prompt"):
        PromptSet(ioi.tokens, torch.stack([ioi.correct, ioi.correct], 1), ioi.wrong, ioi.cf_tokens,
                  ioi.template, ioi.texts)
    with pytest.raises(ValueError, match="same token"):
        PromptSet(ioi.tokens, ioi.correct, ioi.correct.clone(), ioi.cf_tokens, ioi.template, ioi.texts)
    with pytest.raises(ValueError, match="same length"):
        PromptSet(ioi.tokens, ioi.correct, ioi.wrong, ioi.cf_tokens[:, :-1], ioi.template, ioi.texts)
    with pytest.raises(ValueError, match="entries"):
        PromptSet(ioi.tokens, ioi.correct, ioi.wrong, ioi.cf_tokens, ioi.template[:n - 1], ioi.texts)


def test_swapped_is_the_counterfactual_as_a_set(ioi):
    sw = ioi.swapped()
    assert torch.equal(sw.tokens, ioi.cf_tokens) and torch.equal(sw.cf_tokens, ioi.tokens)
    assert torch.equal(sw.correct, ioi.wrong) and torch.equal(sw.wrong, ioi.correct)
    assert sw.texts == ioi.cf_texts
    back = sw.swapped()
    assert back.meta["swapped"] is False and back.texts == ioi.texts and torch.equal(back.tokens, ioi.tokens)


def test_split_is_a_seeded_balanced_partition(ioi, pronoun):
    for ps in (ioi, pronoun):
        rank, measure = ps.split(seed=0)
        n = len(ps)
        assert sorted(rank.tolist() + measure.tolist()) == list(range(n))  # disjoint and covering
        assert abs(len(rank) - len(measure)) <= 1
        assert rank.tolist() == sorted(rank.tolist()) and measure.dtype == torch.long
        cells = Counter(zip(ps.template, ps.variant))
        for half in (rank, measure):  # every (template, variant) cell is split evenly
            got = Counter((ps.template[i], ps.variant[i]) for i in half.tolist())
            assert all(abs(2 * got[c] - k) <= 1 for c, k in cells.items())
        again = ps.split(seed=0)
        assert torch.equal(again[0], rank) and torch.equal(again[1], measure)
        assert not torch.equal(ps.split(seed=1)[0], rank)
    odd = ioi.subset(list(range(13)))  # 13 cells of one prompt each: the spares alternate
    r, m = odd.split()
    assert {len(r), len(m)} == {6, 7}
    with pytest.raises(ValueError, match="cannot split 1 prompt"):
        ioi.subset([0]).split()


# ---------------------------------------------------------------------------------------- scoring

def test_logit_diff_reads_the_last_position(ioi):
    n = len(ioi)
    logits = torch.zeros(n, 3, 50_000)
    logits[torch.arange(n), -1, ioi.correct] = 2.0
    logits[torch.arange(n), -1, ioi.wrong] = -1.0
    logits[:, 0] = 9.0  # earlier positions are ignored
    assert torch.equal(logit_diff(logits, ioi), torch.full((n,), 3.0))
    assert torch.equal(logit_diff(logits[:, -1], ioi), torch.full((n,), 3.0))
    with pytest.raises(ValueError, match="do not match"):
        logit_diff(logits[:5], ioi)


class Scores(dict):
    """evaluate() of a set and of its counterfactual, computed the first time a test asks for that set (a
    test worker computes only the sets of the tests it runs)."""

    def __init__(self, model, sets):
        super().__init__()
        self.model, self.sets = model, sets

    def __missing__(self, name):
        ps = self.sets[name]()
        self[name] = (evaluate(self.model, ps), evaluate(self.model, ps.swapped()))
        return self[name]


@pytest.fixture(scope="module")
def scores(model, request):
    return Scores(model, {name: lambda name=name: request.getfixturevalue(name) for name in ("ioi", "pronoun")})


# Measured on these very sets (seed 0, embedded SmolLM2-135M-Instruct, CPU float32): IOI (n=52) accuracy
# 0.90, mean logit diff 3.64, counterfactual -4.26 (accuracy 0.90); pronouns (n=60) accuracy 0.83, mean
# logit diff 1.51, counterfactual -1.21 (accuracy 0.77). Chance is 0.5 and 0; the thresholds leave margin.
@pytest.mark.parametrize("task, min_acc, min_ld", [("ioi", 0.75, 2.0), ("pronoun", 0.7, 0.8)])
def test_model_solves_the_task_and_counterfactuals_flip_it(scores, task, min_acc, min_ld):
    clean, cf = scores[task]
    assert clean["accuracy"] > min_acc and clean["mean_logit_diff"] > min_ld
    # the counterfactual run scored on the clean answers (correct - wrong): the sign flips
    assert (-cf["logit_diff"]).mean() < -min_ld / 2 and cf["accuracy"] > min_acc - 0.1
    assert clean["logit_diff"].shape == (clean["n"],)
    assert clean["accuracy"] == pytest.approx((clean["logit_diff"] > 0).float().mean().item())


class CountingModel:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def parameters(self):
        return self.model.parameters()

    def __call__(self, tokens):
        self.rows.append(tokens.shape[0])
        return self.model(tokens)


def test_keep_solved_keeps_exactly_the_solved_prompts_in_batches(model, ioi, scores):
    small = ioi.subset(list(range(20)))
    counting = CountingModel(model)
    kept, report = keep_solved(counting, small, batch_size=8)
    assert counting.rows == [8, 8, 4]  # batched: no per-prompt forward passes
    solved = scores["ioi"][0]["logit_diff"][:20] > 0
    assert report.kept == int(solved.sum()) and report.dropped == 20 - report.kept and report.n == 20
    assert kept.texts == [t for t, ok in zip(small.texts, solved) if ok]
    assert kept.meta["keep_solved"] == report.to_dict() and sum(report.kept_per_template.values()) == report.kept
    assert type(report).from_dict(report.to_dict()) == report and f"kept {report.kept}" in str(report)
    assert torch.equal(kept.tokens, small.tokens[solved]) and torch.equal(kept.correct, small.correct[solved])
