"""The Brown Corpus and its alignment of model tokens to POS-tagged words; the Pile from local
files (SAE_PILE) and from a stand-in hub stream, and resuming both from a saved position."""
import importlib.util
import json

import numpy as np
import pytest

import helpers.corpus as corpus_mod
from helpers.corpus import (NO_TAG, PILE_SUBSETS, coarse_tag, iter_contexts, load_brown, pile_files,
                            tokenize_document)
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


# ---- the Pile from local files (SAE_PILE) and its resumable positions --------------------------
WORDS = "the river ran past seven old mills while children counted boats and herons".split()


def pile_rows(n, seed=0):
    """Documents of varied length (0 to ~5 contexts of 9 tokens), each naming its row number."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        text = f"Document {i}: " + " ".join(rng.choice(WORDS, int(rng.integers(0, 40))))
        rows.append({"text": text, "meta": {"pile_set_name": ["Github", "ArXiv", "Nowhere"][i % 3]}})
    return rows


def write_jsonl(path, rows, frames=1):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if path.name.endswith(".zst"):
        import zstandard

        cut = len(data) // 2  # two frames (one mid-line), as concatenated .zst files have
        parts = [data[:cut], data[cut:]] if frames == 2 else [data]
        data = b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)
    path.write_bytes(data)
    return path


class CountingTokenizer:
    """The tokenizer, recording the row number of every text it tokenises."""

    def __init__(self, tok):
        self.tok, self.rows = tok, []

    def __call__(self, text, **kw):
        self.rows.append(int(text.split(":")[0].split()[1]))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)


def expected_contexts(tokenizer, rows, n_text=8):
    out = []
    for r in rows:
        ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        out += [ids[s:s + n_text] for s in range(0, len(ids) - n_text + 1, n_text)]
    return out


@pytest.fixture
def pile_dir(tmp_path, monkeypatch):
    rows = pile_rows(30)
    write_jsonl(tmp_path / "00.jsonl", rows[:12])
    write_jsonl(tmp_path / "01.jsonl.zst", rows[12:20], frames=2)
    write_jsonl(tmp_path / "02.jsonl.zst", rows[20:])
    monkeypatch.setenv("SAE_PILE", f"{tmp_path / '00.jsonl'}, {tmp_path / '0[12].jsonl.zst'}")

    def no_hub(split):
        raise AssertionError("SAE_PILE is set: the hub must not be touched")

    monkeypatch.setattr(corpus_mod, "_pile_stream", no_hub)
    return tmp_path, rows


def test_sae_pile_reads_local_plain_and_zst_files(tokenizer, pile_dir):
    path, rows = pile_dir
    assert [f.name for f in pile_files()] == ["00.jsonl", "01.jsonl.zst", "02.jsonl.zst"]
    got = list(iter_contexts(tokenizer, corpus="pile", ctx_len=9))
    want = expected_contexts(tokenizer, rows)
    assert len(got) == len(want) > 30
    assert [c.index for c in got] == list(range(len(got)))
    for c, w in zip(got, want):
        assert c.tokens[0] == tokenizer.bos_token_id and list(c.tokens[1:]) == w and c.doc == -1
        assert (c.pos == NO_TAG).all()
    genres = {c.genre for c in got}
    assert genres <= {PILE_SUBSETS.index("Github"), PILE_SUBSETS.index("ArXiv"), len(PILE_SUBSETS)}
    assert len(genres) == 3
    json.dumps([c.resume_next for c in got])  # positions go into the manifest


def test_sae_pile_resumes_without_tokenising_earlier_rows(tokenizer, pile_dir):
    full = list(iter_contexts(tokenizer, corpus="pile", ctx_len=9))
    for c in full[::3] + full[-1:]:
        counting = CountingTokenizer(tokenizer)
        rest = list(iter_contexts(counting, corpus="pile", ctx_len=9, resume=c.resume_next,
                                  start_context=c.index + 1))
        assert [x.index for x in rest] == [x.index for x in full[c.index + 1:]]
        assert all(np.array_equal(x.tokens, y.tokens) and x.genre == y.genre and x.start == y.start
                   for x, y in zip(rest, full[c.index + 1:]))
        # each row once, starting with the row of c itself (whose later chunks may follow c)
        assert counting.rows == list(range(_row_of(tokenizer, full, c), 30))
    two = list(iter_contexts(tokenizer, corpus="pile", ctx_len=9, resume=full[4].resume_next,
                             start_context=5, max_contexts=2))
    assert [x.index for x in two] == [5, 6]


def _row_of(tokenizer, full, c):
    """Row number of context c: that of the first context of its row (start == 0)."""
    first = next(x for x in reversed(full[:c.index + 1]) if x.start == 0)
    return int(tokenizer.decode(first.tokens[1:]).split(":")[0].split()[-1])


def test_sae_pile_errors(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_PILE", str(tmp_path / "nothing-*.jsonl.zst"))
    with pytest.raises(FileNotFoundError, match="SAE_PILE=.*matches no file"):
        next(iter_contexts(tokenizer, corpus="pile", ctx_len=9))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"content": "x"}) + "\n")
    monkeypatch.setenv("SAE_PILE", str(bad))
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: no 'text'"):
        list(iter_contexts(tokenizer, corpus="pile", ctx_len=9))
    with pytest.raises(ValueError, match="SAE_PILE_TEST"):
        next(iter_contexts(tokenizer, corpus="pile", ctx_len=9, split="test"))
    (tmp_path / "a.txt").write_text("x")
    monkeypatch.setenv("SAE_PILE", str(tmp_path / "a.txt"))
    with pytest.raises(ValueError, match="neither .jsonl"):
        pile_files()
    monkeypatch.setenv("SAE_PILE", str(tmp_path))  # a folder: its Pile files
    assert pile_files() == [bad]


def test_hub_stream_resumes_from_its_state_dict(tokenizer, monkeypatch):
    """The hub branch, offline: a datasets IterableDataset from memory stands in for the stream."""
    from datasets import Dataset

    monkeypatch.delenv("SAE_PILE", raising=False)
    rows = pile_rows(25, seed=1)
    made = []

    def stream(split):
        made.append(split)
        return Dataset.from_list(rows).to_iterable_dataset(num_shards=3)

    monkeypatch.setattr(corpus_mod, "_pile_stream", stream)
    full = list(iter_contexts(tokenizer, corpus="pile", ctx_len=9))
    want = expected_contexts(tokenizer, rows)
    assert [list(c.tokens[1:]) for c in full] == want and made == ["train"]
    assert full[0].resume_next["source"] == "hub"
    for c in full:
        counting = CountingTokenizer(tokenizer)
        position = json.loads(json.dumps(c.resume_next))  # as read back from a manifest
        rest = list(iter_contexts(counting, corpus="pile", ctx_len=9, resume=position,
                                  start_context=c.index + 1))
        assert [list(x.tokens) for x in rest] == [list(x.tokens) for x in full[c.index + 1:]]
        assert [x.index for x in rest] == list(range(c.index + 1, len(full)))
        assert counting.rows[:1] == [_row_of(tokenizer, full, c)], "no row before c's is tokenised"
    with pytest.raises(ValueError, match="cannot resume"):
        next(iter_contexts(tokenizer, corpus="pile", ctx_len=9, resume=dict(full[0].resume_next, source="files")))


def test_a_non_editable_install_keeps_the_data(tmp_path):
    """`pip install .` (not -e) used to install helpers/ without data/: load_brown failed outside the clone."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(tmp_path / "site"), str(repo)], check=True, cwd=tmp_path,
                   env={**__import__("os").environ, "PIP_NO_CACHE_DIR": "1"})
    assert (tmp_path / "site" / "helpers" / "data" / "brown.json.xz").exists()
    out = subprocess.run([sys.executable, "-c", "import helpers, helpers.paths as p; "
                          "print(len(helpers.load_brown().docs), p.DATA_DIR)"], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    n, data_dir = out.stdout.split()
    assert n == "500" and Path(data_dir).is_relative_to(tmp_path / "site"), out.stdout
