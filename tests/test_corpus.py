"""The Brown Corpus and its alignment of model tokens to POS-tagged words."""
import importlib.util

import numpy as np
import pytest

from helpers.corpus import NO_TAG, coarse_tag, iter_contexts, load_brown, tokenize_document
from helpers.paths import DATA_DIR


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer


def test_corpus_shape():
    c = load_brown()
    assert len(c.docs) == 500 and len(c.genres) == 15
    assert sum(len(d.word_tags) for d in c.docs) > 1_100_000
    train, test = set(c.split("train")), set(c.split("test"))
    assert train.isdisjoint(test) and len(train | test) == 500 and 20 < len(test) < 80


def test_word_spans_match_text():
    d = load_brown().docs[0]
    words = [d.text[a:b] for a, b in zip(d.word_starts[:8], d.word_ends[:8])]
    assert words == ["The", "Fulton", "County", "Grand", "Jury", "said", "Friday", "an"]


def test_every_token_gets_its_words_tag(tokenizer):
    c = load_brown()
    for d in (c.docs[0], c.docs[250]):
        tok = tokenize_document(d, tokenizer)
        assert tokenizer.decode(tok.token_ids) == d.text
        tagged = tok.pos != NO_TAG
        assert tagged.mean() > 0.97
        # a tagged token's visible text lies inside the word whose tag it carries
        for i in np.flatnonzero(tagged)[:300]:
            a, b = tok.offsets[i]
            start = a + len(d.text[a:b]) - len(d.text[a:b].lstrip())
            w = np.searchsorted(d.word_starts, start, side="right") - 1
            assert d.word_starts[w] <= start < d.word_ends[w] and tok.pos[i] == d.word_tags[w]
    tok = tokenize_document(c.docs[0], tokenizer)
    tags = {tokenizer.decode([t]): c.tags[p] for t, p in zip(tok.token_ids[:30], tok.pos[:30])}
    assert tags[" County"] == "nn" and tags[" said"] == "vbd" and tags["The"] == "at"


def test_coarse_tags():
    assert [coarse_tag(t) for t in ["nns", "vbd", "jj", "ppss+md", "at", "in", ",", "cd", "uh"]] == \
        ["NOUN", "VERB", "ADJ", "PRON", "DET", "ADP", ".", "NUM", "X"]


def test_contexts_are_fixed_length_seeded_and_resumable(tokenizer):
    a = list(iter_contexts(tokenizer, ctx_len=32, max_contexts=30))
    assert all(len(c.tokens) == 32 and c.tokens[0] == tokenizer.bos_token_id for c in a)
    assert [c.index for c in a] == list(range(30))
    assert len({c.doc for c in a}) > 10, "a prefix of the stream should mix documents"
    b = list(iter_contexts(tokenizer, ctx_len=32, start_context=10, max_contexts=20))
    assert all(np.array_equal(x.tokens, y.tokens) and x.index == y.index for x, y in zip(a[10:], b))
    other = list(iter_contexts(tokenizer, ctx_len=32, seed=1, max_contexts=30))
    assert [c.doc for c in other] != [c.doc for c in a]
    doc = tokenize_document(load_brown().docs[a[0].doc], tokenizer)
    assert np.array_equal(a[0].tokens[1:], doc.token_ids[a[0].start:a[0].start + 31])
    assert np.array_equal(a[0].pos, doc.pos[a[0].start:a[0].start + 31])


def test_bad_corpus_arguments(tokenizer):
    with pytest.raises(ValueError, match="unknown corpus"):
        next(iter_contexts(tokenizer, corpus="wiki"))
    with pytest.raises(ValueError, match="ctx_len"):
        next(iter_contexts(tokenizer, ctx_len=1))
    with pytest.raises(ValueError, match="split"):
        load_brown().split("dev")


def test_detokeniser_of_the_build_script():
    spec = importlib.util.spec_from_file_location("build_data", DATA_DIR / "build_data.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    text, spans = build.detokenise(["He", "said", "``", "no", "''", ",", "(", "twice", ")", "."])
    assert text == 'He said "no", (twice).'
    assert [text[a:a + n] for a, n in spans] == ["He", "said", '"', "no", '"', ",", "(", "twice", ")", "."]
    assert build.normalise_tag("NN-TL-HL") == "nn" and build.normalise_tag("fw-in") == "in"
