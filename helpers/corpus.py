"""Text corpora, tokenised into fixed-length contexts whose every token keeps its labels.

The embedded corpus is the Brown Corpus (``data/brown.json.xz``, built by ``data/build_data.py``):
500 documents in 15 genres, every word POS-tagged. Tokenising a document with the model's
(fast) tokenizer maps each token to the word its first visible character falls in, so each token
carries its word's Brown tag, its document and its genre. `iter_contexts` cuts documents into
contexts of ``ctx_len`` tokens (a BOS token, then ``ctx_len - 1`` text tokens; the tail of a
document that does not fill a context is dropped), served in a fixed, seeded random order so
that any prefix (a small harvest) mixes documents and genres.

The paper's corpus, the Pile, is streamed from the Hugging Face hub when online (``corpus="pile"``);
its tokens carry the Pile subset as genre and no POS tag.
"""
from __future__ import annotations

import functools
import itertools
import json
import lzma
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .paths import DATA_DIR

NO_TAG = 255  # pos value of tokens that are not part of a word (whitespace) or carry no tag

# Coarse (universal) tags for Brown's fine tags, keyed by the first part of a compound tag.
COARSE_TAGS = ["NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X"]
_COARSE_PREFIXES = [
    ("nn", "NOUN"), ("np", "NOUN"), ("nr", "NOUN"),
    ("vb", "VERB"), ("be", "VERB"), ("do", "VERB"), ("hv", "VERB"), ("md", "VERB"),
    ("jj", "ADJ"), ("od", "ADJ"),
    ("rb", "ADV"), ("wrb", "ADV"), ("ql", "ADV"), ("wql", "ADV"), ("rn", "ADV"), ("*", "ADV"),
    ("pp", "PRON"), ("pn", "PRON"), ("wp", "PRON"), ("ex", "PRON"),
    ("at", "DET"), ("dt", "DET"), ("ap", "DET"), ("ab", "DET"), ("wdt", "DET"),
    ("in", "ADP"), ("cd", "NUM"), ("cc", "CONJ"), ("cs", "CONJ"), ("to", "PRT"), ("rp", "PRT"),
]
PUNCT_TAGS = {".", ",", ":", "(", ")", "--", "'", "''", "`", "``"}


def coarse_tag(tag: str) -> str:
    """Universal tag of a (normalised) Brown tag, e.g. 'nns' -> 'NOUN', 'ppss+md' -> 'PRON'."""
    head = tag.split("+")[0]
    if head in PUNCT_TAGS:
        return "."
    for prefix, coarse in sorted(_COARSE_PREFIXES, key=lambda p: -len(p[0])):
        if head.startswith(prefix):
            return coarse
    return "X"


@dataclass
class Document:
    id: str
    genre: str
    text: str
    word_starts: np.ndarray  # int64 [n_words], character offset of each word
    word_ends: np.ndarray    # int64 [n_words]
    word_tags: np.ndarray    # uint8 [n_words], index into Corpus.tags


@dataclass
class Corpus:
    name: str
    docs: list[Document]
    tags: list[str]    # fine POS tags (Brown's, normalised); token pos values index this list
    genres: list[str]

    def split(self, split: str, test_fraction: float = 0.1) -> list[int]:
        """Indices of the documents in `split` ("train", "test" or "all"); fixed by document id."""
        if split == "all":
            return list(range(len(self.docs)))
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
        is_test = [zlib.crc32(d.id.encode()) % 1000 < test_fraction * 1000 for d in self.docs]
        return [i for i, t in enumerate(is_test) if t == (split == "test")]

    @property
    def coarse_of_tag(self) -> np.ndarray:
        """Array mapping fine tag index -> index into COARSE_TAGS (NO_TAG stays NO_TAG via [-1])."""
        lut = np.full(256, NO_TAG, dtype=np.uint8)
        for i, t in enumerate(self.tags):
            lut[i] = COARSE_TAGS.index(coarse_tag(t))
        return lut


@functools.lru_cache(maxsize=1)
def load_brown() -> Corpus:
    """The embedded Brown Corpus from data/brown.json.xz."""
    path = DATA_DIR / "brown.json.xz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it is committed with the repository; "
                                "rebuild it with `python data/build_data.py`")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    docs = []
    for d in raw["docs"]:
        starts = np.cumsum(np.asarray(d["start_deltas"], dtype=np.int64))
        docs.append(Document(d["id"], d["genre"], d["text"], starts,
                             starts + np.asarray(d["lengths"], dtype=np.int64),
                             np.asarray(d["tags"], dtype=np.uint8)))
    return Corpus("brown", docs, raw["tags"], raw["genres"])


def load_corpus(name: str) -> Corpus:
    if name == "brown":
        return load_brown()
    if name == "pile":
        raise ValueError("the Pile is streamed, not loaded: use iter_contexts(corpus='pile', ...)")
    raise ValueError(f"unknown corpus {name!r}: 'brown' (embedded) or 'pile' (online)")


@dataclass
class TokenizedDoc:
    token_ids: np.ndarray  # int64 [n_tokens]
    pos: np.ndarray        # uint8 [n_tokens]: fine tag index of the token's word, or NO_TAG
    offsets: np.ndarray    # int64 [n_tokens, 2]: character span of each token in the text


def tokenize_document(doc: Document, tokenizer) -> TokenizedDoc:
    """Tokenise one document and give each token its word's tag.

    A token belongs to the word that contains its first non-space character; tokens made only
    of whitespace, or falling between words, get NO_TAG.
    """
    enc = tokenizer(doc.text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    text = doc.text
    first_visible = np.array([
        next((c for c in range(a, b) if not text[c].isspace()), -1) for a, b in offsets
    ], dtype=np.int64)
    word = np.searchsorted(doc.word_starts, first_visible, side="right") - 1
    inside = (first_visible >= 0) & (word >= 0)
    inside[inside] &= first_visible[inside] < doc.word_ends[word[inside]]
    pos = np.full(len(ids), NO_TAG, dtype=np.uint8)
    pos[inside] = doc.word_tags[word[inside]]
    return TokenizedDoc(ids, pos, offsets)


@dataclass
class Context:
    """One context: BOS + ctx_len-1 text tokens, and the labels of the text tokens."""
    index: int             # position of this context in the iteration order
    tokens: np.ndarray     # int64 [ctx_len], BOS first
    doc: int               # document index in the corpus (-1 for streamed corpora)
    start: int             # position of the first text token within its document's tokens
    pos: np.ndarray        # uint8 [ctx_len-1]
    genre: int             # index into the corpus's genres


def _tokenizer_key(tokenizer) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{type(tokenizer).__name__}"


_TOKENIZED: dict = {}


def tokenize_split(tokenizer, split: str = "train") -> dict[int, TokenizedDoc]:
    """Every Brown document of `split`, tokenised (kept in memory per tokenizer: a few seconds once)."""
    key = (_tokenizer_key(tokenizer), split)
    if key not in _TOKENIZED:
        corpus = load_brown()
        _TOKENIZED.clear()  # one tokenizer at a time is plenty
        _TOKENIZED[key] = {d: tokenize_document(corpus.docs[d], tokenizer) for d in corpus.split(split)}
    return _TOKENIZED[key]


def _brown_contexts(tokenizer, ctx_len: int, split: str, seed: int) -> Iterator[Context]:
    """All full contexts of the split, in a seeded random order over (document, chunk) pairs,
    so that any prefix of the stream mixes documents and genres like the whole corpus does."""
    corpus = load_brown()
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; contexts start with one")
    n_text = ctx_len - 1
    docs = tokenize_split(tokenizer, split)
    chunks = [(d, start) for d, tok in docs.items()
              for start in range(0, len(tok.token_ids) - n_text + 1, n_text)]
    order = np.random.default_rng(seed).permutation(len(chunks))
    genre_of = {g: i for i, g in enumerate(corpus.genres)}
    for index, k in enumerate(order):
        d, start = chunks[k]
        tok = docs[d]
        tokens = np.concatenate([[bos], tok.token_ids[start:start + n_text]])
        yield Context(index, tokens, d, start, tok.pos[start:start + n_text], genre_of[corpus.docs[d].genre])


PILE_DATASET = "monology/pile-uncopyrighted"
PILE_SUBSETS = [
    "Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw",
    "StackExchange", "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)",
    "OpenSubtitles", "Wikipedia (en)", "DM Mathematics", "Ubuntu IRC", "BookCorpus2",
    "EuroParl", "HackerNews", "YoutubeSubtitles", "PhilPapers", "NIH ExPorter", "Enron Emails",
]


def _pile_contexts(tokenizer, ctx_len: int, split: str, seed: int) -> Iterator[Context]:
    from .models import ModelUnavailable, hub_reachable

    if not hub_reachable():
        raise ModelUnavailable("the Pile is streamed from the Hugging Face hub, which is not reachable "
                               "from here; offline, use corpus='brown' (the embedded default)")
    from datasets import load_dataset

    stream = load_dataset(PILE_DATASET, split="train" if split != "test" else "validation",
                          streaming=True).shuffle(seed=seed, buffer_size=10_000)
    bos, n_text, index = tokenizer.bos_token_id, ctx_len - 1, 0
    for row in stream:
        ids = np.asarray(tokenizer(row["text"], add_special_tokens=False)["input_ids"], dtype=np.int64)
        subset = (row.get("meta") or {}).get("pile_set_name", "")
        genre = PILE_SUBSETS.index(subset) if subset in PILE_SUBSETS else len(PILE_SUBSETS)
        for start in range(0, len(ids) - n_text + 1, n_text):
            yield Context(index, np.concatenate([[bos], ids[start:start + n_text]]), -1, start,
                          np.full(n_text, NO_TAG, dtype=np.uint8), genre)
            index += 1


def iter_contexts(tokenizer, corpus: str = "brown", ctx_len: int = 128, split: str = "train",
                  seed: int = 0, start_context: int = 0, max_contexts: int | None = None
                  ) -> Iterator[Context]:
    """Contexts of `ctx_len` tokens in a fixed order; `start_context` skips ahead (for resuming)."""
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS + one token), not {ctx_len}")
    source = {"brown": _brown_contexts, "pile": _pile_contexts}.get(corpus)
    if source is None:
        raise ValueError(f"unknown corpus {corpus!r}: 'brown' (embedded) or 'pile' (online)")
    stop = None if max_contexts is None else start_context + max_contexts
    return itertools.islice(source(tokenizer, ctx_len, split, seed), start_context, stop)


def corpus_labels(corpus: str) -> dict:
    """Tag and genre vocabularies that store token labels index into."""
    if corpus == "brown":
        c = load_brown()
        return {"tags": c.tags, "genres": c.genres}
    if corpus == "pile":
        return {"tags": [], "genres": PILE_SUBSETS + ["other"]}
    raise ValueError(f"unknown corpus {corpus!r}")
