"""Text corpora, tokenised into fixed-length contexts whose every token keeps its labels.

The embedded corpus is the Brown Corpus (``data/brown.json.xz``, built by ``data/build_data.py``):
500 documents in 15 genres, every word POS-tagged. Tokenising a document with the model's
(fast) tokenizer maps each token to the word its first visible character falls in, so each token
carries its word's Brown tag, its document and its genre. `iter_contexts` cuts Brown documents
into contexts of ``ctx_len`` tokens (a BOS token, then ``ctx_len - 1`` text tokens of one
document; the tail of a document that does not fill a context is dropped, so that every context
is one POS-tagged passage), served in a fixed, seeded random order so that any prefix (a small
harvest) mixes documents and genres.

The paper's corpus, the Pile (``corpus="pile"``), is read from local files when the environment
variable ``SAE_PILE`` names them (`pile_files`; ``SAE_PILE_TEST`` for the test split), and is
otherwise streamed from the Hugging Face hub when online. It is packed as SAE training pipelines
pack text: its documents, in file order (the Pile's files are already shuffled; ``seed`` does not
change it), are tokenised and concatenated with the tokenizer's end-of-text token
(`separator_token_id`) after each one, and the stream is cut into contexts of a BOS token and
``ctx_len - 1`` stream tokens. No document is dropped for being short and no tail is cut: a
context may hold the end of one document and the start of the next ones. A context never begins
with a separator (its BOS already marks a boundary). Only the stream's final, partial context is
left out. In the test split each document contributes at most its first ``ctx_len - 1`` tokens,
so that held-out contexts (and the CE-loss contexts taken from them) span many documents instead
of a few long ones.

Every token keeps its own labels: its document's subset as genre, its position within its
document (`Context.tok_pos`, 0 at each document's first token) and no POS tag. A separator is
labelled as no document's text: tok_pos -1 and the genre `PILE_SEPARATOR` (the last entry of
`corpus_labels("pile")["genres"]`). Every Pile context records where the stream stands after it
(`Context.resume_next`: the row it ended in and how many of that row's tokens were served), and
``iter_contexts(..., resume=that)`` continues from there without reading or tokenising the
documents before that row: an interrupted harvest resumes in constant time and gets the same
contexts as an uninterrupted one.

What a reader looks at comes as typed results (tables with verdicts): `Corpus.summary()` (documents,
words, tags, genres), `token_labels(doc, tokenizer, tags)` (a document's first tokens with their
tags) and `label_coverage(tokens, corpus, genres)` (how a harvest's token labels cover the corpus,
and whether they are consistent).
"""
from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import lzma
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from helpers.activations.models import ModelUnavailable, hub_reachable
from helpers.results import Result
from helpers.settings.paths import DATA_DIR

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
class CorpusSummary(Result):
    """A corpus in numbers: documents, words, tags, the train/test split and documents per genre."""

    name: str = ""
    documents: int = 0
    words: int = 0
    tags: int = 0                    # distinct fine POS tags
    train_documents: int = 0
    test_documents: int = 0
    genres: dict = field(default_factory=dict)  # genre: documents

    def rows(self) -> list[dict]:
        return [{"genre": g, "documents": n} for g, n in self.genres.items()]

    def verdicts(self) -> list[str]:
        return [f"{self.documents} documents, {self.words:,} words, {self.tags} distinct POS tags; "
                f"train/test documents: {self.train_documents}/{self.test_documents}"]


@dataclass
class Corpus:
    name: str
    docs: list[Document]
    tags: list[str]    # fine POS tags (Brown's, normalised); token pos values index this list
    genres: list[str]

    def summary(self) -> CorpusSummary:
        """Documents, words, tags, split sizes and documents per genre."""
        genres, counts = np.unique([d.genre for d in self.docs], return_counts=True)
        return CorpusSummary(self.name, len(self.docs), int(sum(len(d.word_tags) for d in self.docs)),
                             len(self.tags), len(self.split("train")), len(self.split("test")),
                             dict(zip(genres.tolist(), counts.tolist())))

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
        raise ValueError("the Pile is streamed (from SAE_PILE's files, or the hub), not loaded: use "
                         "iter_contexts(corpus='pile', ...)")
    raise ValueError(f"unknown corpus {name!r}: 'brown' (embedded) or 'pile' (SAE_PILE's files, or the hub)")


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
    return _tagged(doc, enc["input_ids"], enc["offset_mapping"])


# Every code point that str.isspace() calls whitespace (all lie below U+3001).
_SPACE_CODES = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def first_visible(text: str, offsets: np.ndarray) -> np.ndarray:
    """For each character span [a, b) of `text` (offsets [n, 2]), the index of its first character that
    is not whitespace (str.isspace), or -1 if it has none."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    at = np.arange(len(codes) + 1, dtype=np.int64)
    at[:-1][np.isin(codes, _SPACE_CODES)] = len(codes) + 1  # whitespace: never a first visible character
    at[-1] = len(codes) + 1                                 # past the end: none
    next_visible = np.minimum.accumulate(at[::-1])[::-1]    # the first visible character at or after each index
    a, b = offsets[:, 0], offsets[:, 1]
    found = next_visible[np.minimum(a, len(codes))]
    return np.where(found < b, found, -1)


def _tagged(doc: Document, input_ids, offset_mapping) -> TokenizedDoc:
    ids = np.asarray(input_ids, dtype=np.int64)
    offsets = np.asarray(offset_mapping, dtype=np.int64).reshape(-1, 2)
    visible = first_visible(doc.text, offsets)
    word = np.searchsorted(doc.word_starts, visible, side="right") - 1
    inside = (visible >= 0) & (word >= 0)
    inside[inside] &= visible[inside] < doc.word_ends[word[inside]]
    pos = np.full(len(ids), NO_TAG, dtype=np.uint8)
    pos[inside] = doc.word_tags[word[inside]]
    return TokenizedDoc(ids, pos, offsets)


@dataclass
class TokenLabels(Result):
    """A document's tokens with the labels they carry: text, id, Brown tag and its coarse category."""

    tokens: list = field(default_factory=list)  # [(text, token id, tag or "-", coarse tag or "-")]

    def __post_init__(self):
        self.tokens = [tuple(t) for t in self.tokens]

    def rows(self) -> list[dict]:
        return [{"token": repr(t), "id": i, "tag": tag, "coarse": c} for t, i, tag, c in self.tokens]


def token_labels(doc: Document, tokenizer, tags: list[str] | None = None, n: int | None = None) -> TokenLabels:
    """The first `n` tokens of `doc` (all by default) as `tokenize_document` labels them; `tags` names
    the tag indices (default: the Brown Corpus's)."""
    tags = load_brown().tags if tags is None else tags
    tok = tokenize_document(doc, tokenizer)
    out = []
    for i in range(len(tok.token_ids) if n is None else min(n, len(tok.token_ids))):
        a, b = tok.offsets[i]
        tag = tags[tok.pos[i]] if tok.pos[i] != NO_TAG else "-"
        out.append((doc.text[a:b], int(tok.token_ids[i]), tag, coarse_tag(tag) if tag != "-" else "-"))
    return TokenLabels(out)


@dataclass
class Context:
    """One context: BOS + ctx_len-1 tokens, and the labels of each token after BOS."""
    index: int             # position of this context in the iteration order
    tokens: np.ndarray     # int64 [ctx_len], BOS first
    doc: np.ndarray        # int64 [ctx_len-1]: each token's document index in the corpus (-1: streamed)
    tok_pos: np.ndarray    # int64 [ctx_len-1]: each token's position in its document (-1: a separator)
    pos: np.ndarray        # uint8 [ctx_len-1]: each token's fine tag index, or NO_TAG
    genre: np.ndarray      # uint8 [ctx_len-1]: each token's genre, an index into the corpus's genres
    # Pile only: where the stream stands after this context; iter_contexts(resume=...) continues
    # from there with the next context (a JSON-able dict; see _pile_contexts). None for Brown.
    resume_next: dict | None = None


def _tokenizer_key(tokenizer) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{type(tokenizer).__name__}"


_TOKENIZED: dict = {}


def tokenize_split(tokenizer, split: str = "train") -> dict[int, TokenizedDoc]:
    """Every Brown document of `split`, tokenised (kept in memory per tokenizer: a few seconds once)."""
    key = (_tokenizer_key(tokenizer), split)
    if key not in _TOKENIZED:
        corpus = load_brown()
        _TOKENIZED.clear()  # one tokenizer at a time is plenty
        docs = list(corpus.split(split))
        enc = tokenizer([corpus.docs[d].text for d in docs], return_offsets_mapping=True, add_special_tokens=False)
        _TOKENIZED[key] = {d: _tagged(corpus.docs[d], ids, offs)
                           for d, ids, offs in zip(docs, enc["input_ids"], enc["offset_mapping"])}
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
        yield Context(index, tokens, np.full(n_text, d, dtype=np.int64), start + np.arange(n_text),
                      tok.pos[start:start + n_text],
                      np.full(n_text, genre_of[corpus.docs[d].genre], dtype=np.uint8))


PILE_DATASET = "monology/pile-uncopyrighted"
PILE_SUBSETS = [
    "Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw",
    "StackExchange", "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)",
    "OpenSubtitles", "Wikipedia (en)", "DM Mathematics", "Ubuntu IRC", "BookCorpus2",
    "EuroParl", "HackerNews", "YoutubeSubtitles", "PhilPapers", "NIH ExPorter", "Enron Emails",
]
PILE_OTHER = "other"           # genre of a document whose subset is missing or not in PILE_SUBSETS
PILE_SEPARATOR = "separator"   # genre of the end-of-text token between packed documents
PILE_GENRES = PILE_SUBSETS + [PILE_OTHER, PILE_SEPARATOR]


PILE_ENV, PILE_TEST_ENV = "SAE_PILE", "SAE_PILE_TEST"
PILE_SUFFIXES = (".jsonl", ".jsonl.zst")


def pile_files(split: str = "train") -> list[Path] | None:
    """The local Pile files named by $SAE_PILE ($SAE_PILE_TEST for split "test"), or None if unset.

    The variable holds paths, globs or folders (a folder means its *.jsonl and *.jsonl.zst),
    comma-separated; files are read in that order, each glob's matches sorted. Each file holds
    one JSON object per line, as the Pile's own files do: ``text``, and ``meta.pile_set_name``
    (the genre; optional). A part that matches nothing is an error, as is SAE_PILE set without
    SAE_PILE_TEST when the test split is asked for (it would otherwise come from the hub, or
    silently repeat the training files).
    """
    var = PILE_TEST_ENV if split == "test" else PILE_ENV
    spec = os.environ.get(var, "").strip()
    if not spec:
        if split == "test" and os.environ.get(PILE_ENV, "").strip():
            raise ValueError(f"{PILE_ENV} is set but {PILE_TEST_ENV} is not: the test split of the "
                             f"Pile needs its own files (e.g. the Pile's val.jsonl.zst) in {PILE_TEST_ENV}")
        return None
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        part = os.path.expanduser(part)
        if any(c in part for c in "*?["):
            matches = sorted(glob.glob(part))
        else:
            matches = [part] if os.path.exists(part) else []
        found = []
        for m in map(Path, matches):
            found += sorted(f for f in m.iterdir() if f.name.endswith(PILE_SUFFIXES)) if m.is_dir() else [m]
        if not found:
            raise FileNotFoundError(f"{var}={spec!r}: {part!r} matches no file (expected "
                                    f"{' or '.join(PILE_SUFFIXES)} files in the Pile's format)")
        for f in found:
            if not f.name.endswith(PILE_SUFFIXES):
                raise ValueError(f"{var}: {f} is neither {' nor '.join(PILE_SUFFIXES)}")
            if f not in files:
                files.append(f)
    return files


def _open_lines(path: Path):
    """A binary file object over the lines of a .jsonl or (decompressed) .jsonl.zst file."""
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading {path} needs the zstandard package: pip install zstandard") from None
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


def _bad_row(row: dict) -> str | None:
    """Why a document cannot be used (None if it can): text that is not valid Unicode (a lone
    surrogate, which JSON's escapes allow and no tokenizer takes), or a `meta` that is not an object."""
    try:
        row["text"].encode("utf-8")
    except UnicodeEncodeError as e:
        return f"its text is not valid Unicode ({e.reason} at character {e.start})"
    if row.get("meta") is not None and not isinstance(row["meta"], dict):
        return f"its 'meta' is a {type(row['meta']).__name__}, not an object"
    return None


class _BadRows:
    """Documents skipped while reading Pile files: each of the first few named in a warning (file,
    line, why), then a count every 1,000, so that a few bad rows in a reader's files cost those rows
    and nothing else (a resumed harvest skips them again at the same place)."""

    SHOWN = 10

    def __init__(self):
        self.n = 0

    def skip(self, path, line: int, why: str) -> None:
        self.n += 1
        if self.n <= self.SHOWN:
            more = " (further bad rows are counted every 1,000)" if self.n == self.SHOWN else ""
            warnings.warn(f"{path}, line {line}: skipped: {why}{more}", stacklevel=3)
        elif self.n % 1000 == 0:
            warnings.warn(f"{self.n:,} rows of the Pile files skipped so far, the last at {path}, line {line}",
                          stacklevel=3)


def _file_rows(files: list[Path], resume: dict | None) -> Iterator[tuple[dict, dict]]:
    """(position before the row, row) for every document of the local files, from `resume` on.

    A position is {"source": "files", "file": i, "name": file name, "line": n, "offset": byte
    offset of the line in a plain .jsonl (None in a .zst)}. Resuming seeks to the offset (plain)
    or skips n decompressed lines without decoding them (.zst).
    """
    first, line0, offset0 = 0, 0, 0
    if resume is not None:
        if resume.get("source") != "files":
            raise ValueError(f"cannot resume from {resume.get('source')!r} position {resume} with the "
                             f"local files of {PILE_ENV}: unset {PILE_ENV} (or set it) as when the "
                             "store was harvested, or use another store folder")
        first, line0, offset0 = resume["file"], resume["line"], resume.get("offset")
        if first >= len(files) or files[first].name != resume["name"]:
            now = files[first].name if first < len(files) else "nothing"
            raise ValueError(f"the files of {PILE_ENV} changed since the store was harvested: it stopped "
                             f"in file {first} {resume['name']!r}, which is now {now!r}")
    bad = _BadRows()
    for i in range(first, len(files)):
        path, plain = files[i], not files[i].name.endswith(".zst")
        line, offset = (line0, offset0) if i == first else (0, 0)
        with _open_lines(path) as f:
            if plain and offset:
                f.seek(offset)
            else:
                for _ in range(line):  # skip without decoding
                    if not f.readline():
                        break
                offset = 0
            while raw := f.readline():
                pos = {"source": "files", "file": i, "name": path.name, "line": line,
                       "offset": offset if plain else None}
                line += 1
                offset += len(raw)
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    bad.skip(path, line, f"not UTF-8 text ({e})")
                    continue
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line}: not a JSON object ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}, line {line}: no 'text' string; Pile files hold one JSON "
                                     'object per line: {"text": ..., "meta": {"pile_set_name": ...}}')
                why = _bad_row(row)
                if why:
                    bad.skip(path, line, why)
                    continue
                yield pos, row


def _pile_stream(split: str):
    """The Pile as a `datasets.IterableDataset` streamed from the hub (a seam tests replace)."""

    if not hub_reachable():
        raise ModelUnavailable(f"the Pile is streamed from the Hugging Face hub, which is not reachable "
                               f"from here; offline, use corpus='brown' (the embedded default), or "
                               f"point {PILE_ENV} at local .jsonl / .jsonl.zst files of the Pile")
    from datasets import load_dataset

    return load_dataset(PILE_DATASET, split="train" if split != "test" else "validation", streaming=True)


def _hub_rows(split: str, resume: dict | None) -> Iterator[tuple[dict, dict]]:
    """(position before the row, row) over the hub stream, from `resume` on.

    A position is {"source": "hub", "state": the stream's state_dict() after the previous row
    (None: the start)}; resuming loads it (datasets skips the rows before it without our
    tokenising them). The stream is not shuffled: the Pile's files already are, and a shuffle
    buffer's contents are lost on resuming, so a shuffled stream could not resume exactly.
    """
    stream = _pile_stream(split)
    state = None
    if resume is not None:
        if resume.get("source") != "hub":
            raise ValueError(f"cannot resume from {resume.get('source')!r} position {resume} with the "
                             f"hub stream: set {PILE_ENV} as when the store was harvested, or use "
                             "another store folder")
        state = resume["state"]
        if state is not None:
            stream.load_state_dict(state)
    bad = _BadRows()
    for n, row in enumerate(stream):
        why = _bad_row(row)
        if why:
            bad.skip(f"{PILE_DATASET} (the stream, counted from where this read began)", n + 1, why)
        else:
            yield {"source": "hub", "state": state}, row
        state = stream.state_dict()  # taken after the row: where the next one starts


def _has_text(row: dict) -> bool:
    """Whether a row's document is packed: one whose text is empty or only whitespace is skipped."""
    return bool(row["text"].strip())


def _subset(row: dict) -> str:
    """The genre name of a row's document: its Pile subset, or PILE_OTHER."""
    subset = (row.get("meta") or {}).get("pile_set_name", "")
    return subset if subset in PILE_SUBSETS else PILE_OTHER


def pile_subsets_read(position: dict, split: str = "train") -> set[str] | None:
    """The genres (Pile subsets, or PILE_OTHER) of the documents a packed stream served up to
    `position` (the `resume_next` of its last context, e.g. a store's last shard's
    ``next_resume``), read again from $SAE_PILE's files without tokenising; None for the hub
    stream, or when $SAE_PILE is not set. Every document up to that position has tokens in
    those contexts (packing drops none), so these are exactly the subsets among their tokens."""
    if position is None or position.get("source") != "files":
        return None
    files = pile_files(split)
    if files is None:
        return None
    if position["file"] >= len(files) or files[position["file"]].name != position["name"]:
        raise ValueError(f"the files of {PILE_TEST_ENV if split == 'test' else PILE_ENV} are not those the "
                         f"stream was read from (it stopped in {position['name']!r})")
    seen = set()
    for where, row in _file_rows(files, None):
        if _has_text(row):
            seen.add(_subset(row))
        if (where["file"], where["line"]) == (position["file"], position["line"]):
            return seen
    raise ValueError(f"the files end before {position}: they are not those the stream was read from")


def separator_token_id(tokenizer) -> int:
    """The token placed after each packed document: the vocabulary's ``<|endoftext|>`` if it has
    one (Pythia's EOS and BOS; SmolLM2's pretraining separator, whose chat EOS is another token),
    else the tokenizer's EOS."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and tokenizer.convert_ids_to_tokens(eot) == "<|endoftext|>":
        return eot
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token to separate packed documents")
    return int(tokenizer.eos_token_id)


def _pile_contexts(tokenizer, ctx_len: int, split: str, seed: int, resume: dict | None = None,
                   index: int = 0) -> Iterator[Context]:
    """Contexts of the packed Pile in stream order (`seed` is unused), numbered from `index`.

    Each row's document becomes its tokens (the first ctx_len - 1 of them in the test split) and
    one separator; documents with no text but whitespace are skipped. Each context's
    `resume_next` is the position of the row its last token came from plus "token": how many of
    that row's tokens (its separator included) have been served. `resume` (one such dict) starts at that row, skipping those
    tokens; no earlier row is tokenised. The stream's final, partial context is not served.
    """
    if resume is not None and "token" not in resume:
        raise ValueError(f"cannot resume from {resume}: it is not a position in the packed Pile stream "
                         "(it has no 'token' count); harvest into another store folder")
    files = pile_files(split)
    rows = _file_rows(files, resume) if files is not None else _hub_rows(split, resume)
    bos, sep, n_text = tokenizer.bos_token_id, separator_token_id(tokenizer), ctx_len - 1
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; contexts start with one")
    sep_genre, cap = PILE_GENRES.index(PILE_SEPARATOR), n_text if split == "test" else None
    skip = resume["token"] if resume is not None else 0
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, tok_pos, genre) pieces
    filled = 0
    for where, row in rows:
        k, skip = skip, 0
        if not _has_text(row):
            continue
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:cap]
        n = len(ids)
        genre = PILE_GENRES.index(_subset(row))
        ids = np.asarray(ids + [sep], dtype=np.int64)
        tok_pos = np.r_[np.arange(n), -1]
        genres = np.r_[np.full(n, genre), sep_genre].astype(np.uint8)
        while k <= n:
            if filled == 0 and k == n:  # a context never begins with a separator
                break
            take = min(n_text - filled, n + 1 - k)
            parts.append((ids[k:k + take], tok_pos[k:k + take], genres[k:k + take]))
            k += take
            filled += take
            if filled == n_text:
                toks, tpos, gens = (np.concatenate(p) for p in zip(*parts))
                yield Context(index, np.r_[bos, toks], np.full(n_text, -1, dtype=np.int64), tpos,
                              np.full(n_text, NO_TAG, dtype=np.uint8), gens, {**where, "token": k})
                index += 1
                parts, filled = [], 0


def iter_contexts(tokenizer, corpus: str = "brown", ctx_len: int = 128, split: str = "train",
                  seed: int = 0, start_context: int = 0, max_contexts: int | None = None,
                  resume: dict | None = None) -> Iterator[Context]:
    """Contexts of `ctx_len` tokens in a fixed order; `start_context` skips ahead (for resuming).

    For the Pile, `resume` (the `resume_next` of context start_context - 1) continues from that
    context without reading or tokenising what comes before it; the contexts are then numbered
    from `start_context`. Without it, and always for Brown (whose tokens are cached in memory),
    the first `start_context` contexts are produced and dropped.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS + one token), not {ctx_len}")
    source = {"brown": _brown_contexts, "pile": _pile_contexts}.get(corpus)
    if source is None:
        raise ValueError(f"unknown corpus {corpus!r}: 'brown' (embedded) or 'pile' (SAE_PILE's files, or the hub)")
    if corpus == "pile" and resume is not None:
        return itertools.islice(_pile_contexts(tokenizer, ctx_len, split, seed, resume, start_context),
                                max_contexts)
    stop = None if max_contexts is None else start_context + max_contexts
    return itertools.islice(source(tokenizer, ctx_len, split, seed), start_context, stop)


def corpus_labels(corpus: str) -> dict:
    """Tag and genre vocabularies that store token labels index into."""
    if corpus == "brown":
        c = load_brown()
        return {"tags": c.tags, "genres": c.genres}
    if corpus == "pile":
        return {"tags": [], "genres": list(PILE_GENRES)}
    raise ValueError(f"unknown corpus {corpus!r}")


@dataclass
class LabelCoverage(Result):
    """How a harvest's token labels cover its corpus: the share of tokens with a POS tag, the genres
    present, and any inconsistency between labels and corpus (`problems`; none when `consistent`)."""

    corpus: str = ""
    tokens: int = 0
    tagged: float = 0.0               # share of tokens with a POS tag
    genres: list = field(default_factory=list)  # genres present (separators left out)
    problems: list = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems

    def rows(self) -> list[dict]:
        return [{"corpus": self.corpus, "tokens": self.tokens, "POS-tagged": self.tagged,
                 "genres": len(self.genres), "consistent": self.consistent}]

    def verdicts(self) -> list[str]:
        return [f"{self.tagged:.1%} of tokens carry a POS tag; {len(self.genres)} genres: {', '.join(self.genres)}",
                *self.problems]


def label_coverage(tokens: np.ndarray, corpus: str, genres: list[str] | None = None,
                   subsets_read: set[str] | None = None) -> LabelCoverage:
    """Check token labels (records with ``pos``, ``genre`` and ``tok_pos`` fields, as a store keeps
    them) against their corpus: on Brown nearly every token carries a POS tag; the Pile has none, its
    separators are labelled as such, and, given `subsets_read` (`pile_subsets_read`), its genres are
    exactly the subsets of the documents read. `genres` names the genre indices (default: the corpus's)."""
    names = corpus_labels(corpus)["genres"] if genres is None else list(genres)
    tagged = float((tokens["pos"] != NO_TAG).mean()) if len(tokens) else 0.0
    problems = []
    if len(tokens) and int(tokens["genre"].max()) >= len(names):
        problems.append("a token's genre is outside the store's list of genres")
        return LabelCoverage(corpus, len(tokens), tagged, [], problems)
    found = sorted({names[g] for g in np.unique(tokens["genre"])} - {PILE_SEPARATOR})
    if corpus == "brown":
        if not tagged > 0.95:
            problems.append(f"only {tagged:.1%} of tokens carry a POS tag")
    else:
        if tagged != 0:
            problems.append(f"{corpus} has no POS tags, yet {tagged:.1%} of tokens carry one")
        separators = tokens["tok_pos"] < 0
        if PILE_SEPARATOR in names and not (tokens["genre"][separators] == names.index(PILE_SEPARATOR)).all():
            problems.append("a separator labelled as text")
        if subsets_read is not None and set(found) != set(subsets_read):
            problems.append(f"harvested subsets {found}, but the documents read are of {sorted(subsets_read)}")
    return LabelCoverage(corpus, len(tokens), tagged, found, problems)
