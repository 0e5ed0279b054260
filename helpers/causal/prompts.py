"""Prompt datasets for the causal experiments of notebook 05: IOI and gendered pronouns.

Each dataset is a `PromptSet`: clean prompts, one right and one wrong single-token answer per
prompt, and counterfactual prompts of the same length whose right answer is the other one (the
"corrupted" run of a patching experiment). Every prompt starts with the BOS token and every prompt
of a set has the same token length, so a set batches without padding.

* IOI (indirect-object identification, Wang et al. 2022, patched in Cunningham et al. 2023):
  "When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object,
  IO), not " John" (the subject, S). Prompts are balanced across the templates and the two name
  orders: ABBA (the IO is named first) and BABA (the subject is named first). The counterfactual
  repeats the other name, so the right answer becomes the original subject.
* Pronouns: "Today Mary was late for work again because" -> " she", not " he". The counterfactual
  puts a name of the other gender in the same template. Balanced across templates and genders.

Names come from ``data/first_names.json.gz`` (npm @stdlib first-name lists, built by
``data/build_data.py``). Nothing is skipped silently: names that are not one token for the
tokenizer, names that the Brown Corpus uses more often as an ordinary word than as a name ("May",
"Will", "Bank"), fillers that are not one token, and templates or prompts of another token length
are all counted in the set's ``meta``. `evaluate` and `keep_solved` score a set on a model in
batched forward passes.
"""
from __future__ import annotations

import functools
import gzip
import json
import math
import random
import string
from collections import Counter
from dataclasses import dataclass, field

import torch

from helpers.activations.corpus import load_brown
from helpers.results import Result
from helpers.settings.paths import DATA_DIR

NAMES_FILE = DATA_DIR / "first_names.json.gz"

# {A} and {B} are the two names of the opening clause, {S} the subject who then acts. A name
# placeholder must follow a space (names are tokenised as " Name"); the answer is the next token.
IOI_TEMPLATES: list[str] = [
    "When {A} and {B} went to the {place} today, {S} gave a {object} to",
    "After {A} and {B} had lunch at the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Once {A} and {B} had fun at the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} gave it to",
    "As {A} and {B} were leaving the {place} together, {S} gave a {object} to",
    "Later, {A} and {B} walked to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "While {A} and {B} were commuting to the {place}, {S} gave a {object} to",
    "The {place} {A} and {B} went to had a {object}. {S} gave it to",
    "When {A} and {B} arrived at the {place} early, {S} handed a {object} to",
    "While {A} and {B} were playing at the {place}, {S} threw a {object} to",
]

# Fillers for {place} and {object}; objects take "a", so none starts with a vowel sound.
IOI_FILLERS: dict[str, list[str]] = {
    "place": ["store", "park", "school", "office", "beach", "station", "hospital", "restaurant",
              "library", "market", "garden", "museum"],
    "object": ["drink", "book", "gift", "ball", "letter", "ring", "bone", "computer", "necklace",
               "snack", "cake", "flower"],
}

# The next token is naturally a subject pronoun referring to {name}; no other word gives the gender away.
PRONOUN_TEMPLATES: list[str] = [
    "Today {name} was late for work again because",
    "Yesterday {name} went to the doctor because",
    "Last night {name} called the front desk because",
    "In the morning {name} told the teacher that",
    "At the party {name} was very happy because",
    "Later {name} missed the bus again, so",
    "After dinner, {name} said to them that",
    "On Monday {name} stayed home from school because",
    "When {name} woke up early this morning,",
    "As soon as {name} got back home,",
]
PRONOUNS = {"male": " he", "female": " she"}

IOI_NAME_FIELDS = ("A", "B", "S")
IOI_ORDERS = ("ABBA", "BABA")  # ABBA: the IO is named first; BABA: the subject is named first
GENDERS = ("male", "female")


# ----------------------------------------------------------------------------------------- names

@functools.lru_cache(maxsize=1)
def _names_file() -> dict:
    if not NAMES_FILE.exists():
        raise FileNotFoundError(f"{NAMES_FILE} is missing: it is committed with the repository; "
                                "rebuild it with `python data/build_data.py`")
    with gzip.open(NAMES_FILE, "rt", encoding="utf-8") as f:
        return json.load(f)


def load_names() -> dict[str, list[str]]:
    """{"male": [...], "female": [...]}: the English first-name lists, duplicates removed, in file order."""
    raw = _names_file()
    return {g: list(dict.fromkeys(raw[g])) for g in GENDERS}


def single_token_names(tokenizer, names) -> tuple[list[str], int]:
    """The names whose " Name" (with its leading space) is exactly one token; and how many were not."""
    names = list(names)
    ids = tokenizer([" " + n for n in names], add_special_tokens=False)["input_ids"] if names else []
    kept = [n for n, i in zip(names, ids) if len(i) == 1]
    return kept, len(names) - len(kept)


@functools.lru_cache(maxsize=1)
def _brown_usage() -> tuple[Counter, Counter]:
    """(times each capitalised word is tagged a proper noun, times each lowercase word occurs) in Brown."""

    corpus = load_brown()
    is_proper = [t.startswith("np") for t in corpus.tags]
    proper, lower = Counter(), Counter()
    for doc in corpus.docs:
        text = doc.text
        for a, b, t in zip(doc.word_starts.tolist(), doc.word_ends.tolist(), doc.word_tags.tolist()):
            w = text[a:b]
            if is_proper[t]:
                proper[w] += 1
            elif w.islower():
                lower[w] += 1
    return proper, lower


def unambiguous_names(names) -> tuple[list[str], int]:
    """The names that are not mostly ordinary English words; and how many were.

    A name counts as a word when the Brown Corpus uses it in lower case ("may", "will", "bank")
    more often than it tags it as a proper noun ("May", "Will"). Names Brown never uses are kept.
    Such names make IOI ambiguous ("When Will and May went ...") and blur a gender signal.
    """
    proper, lower = _brown_usage()
    names = list(names)
    kept = [n for n in names if lower[n.lower()] <= proper[n]]
    return kept, len(names) - len(kept)


def _usable_names(tokenizer, names) -> tuple[list[str], dict]:
    bad = [n for n in names if not isinstance(n, str) or not n or any(c.isspace() for c in n)]
    if bad:
        raise ValueError(f"names must be single words without spaces (a prompt puts one space before each): "
                         f"{bad[:5]!r}{' ...' if len(bad) > 5 else ''}")
    one, multi = single_token_names(tokenizer, names)
    kept, words = unambiguous_names(one)
    return kept, {"multi_token": multi, "common_word": words}


# ------------------------------------------------------------------------------------- the set

def _as_long_2d(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D torch.long tensor [n, pos], not "
                         f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    return x


@dataclass
class PromptSet:
    """Clean prompts, their single-token answers, and counterfactual prompts whose answers are swapped.

    tokens, cf_tokens: [n, pos] token ids, BOS first, one length for the whole set.
    correct, wrong:    [n] one token id each: the right and the wrong next token of each clean
                       prompt. On cf_tokens the roles swap (see `swapped`).
    template:          index of each prompt's template in the template list it was built from.
    variant:           "ABBA"/"BABA" (IOI: which name comes first) or "male"/"female" (pronouns).
    texts, cf_texts:   the prompts as text (without BOS).
    meta:              how the set was built: task, seed, names and fillers skipped, drops for length.
    """

    tokens: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor
    cf_tokens: torch.Tensor
    template: list[int]
    texts: list[str]
    cf_texts: list[str] = field(default_factory=list)
    variant: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        _as_long_2d(self.tokens, "tokens")
        _as_long_2d(self.cf_tokens, "cf_tokens")
        n = self.tokens.shape[0]
        if self.cf_tokens.shape != self.tokens.shape:
            raise ValueError(f"cf_tokens {tuple(self.cf_tokens.shape)} must have the shape of tokens "
                             f"{tuple(self.tokens.shape)}: a counterfactual has the same length as its "
                             "prompt")
        for what, ids in (("correct", self.correct), ("wrong", self.wrong)):
            if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.shape != (n,):
                raise ValueError(
                    f"{what} must be a torch.long tensor of shape ({n},): one single-token answer per "
                    f"prompt, not {getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
            if (ids < 0).any():
                raise ValueError(f"{what} holds negative token ids")
        if (self.correct == self.wrong).any():
            bad = int((self.correct == self.wrong).nonzero()[0])
            raise ValueError(f"prompt {bad}: correct and wrong answers are the same token "
                             f"({int(self.correct[bad])})")
        if not self.cf_texts:
            self.cf_texts = [""] * n
        if not self.variant:
            self.variant = [""] * n
        for what in ("template", "texts", "cf_texts", "variant"):
            if len(getattr(self, what)) != n:
                raise ValueError(f"{what} has {len(getattr(self, what))} entries for {n} prompts")
        if n and not ((self.tokens[:, 0] == self.tokens[0, 0]).all()
                      and (self.cf_tokens[:, 0] == self.tokens[0, 0]).all()):
            raise ValueError("every prompt and counterfactual must start with the same (BOS) token")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, index) -> PromptSet:
        """The prompts at `index` (a list of ints or a boolean mask), with the same meta."""
        index = torch.as_tensor(index)
        index = index.nonzero().flatten() if index.dtype == torch.bool else index.long().flatten()
        idx = index.tolist()
        return PromptSet(self.tokens[index], self.correct[index], self.wrong[index], self.cf_tokens[index],
                         [self.template[i] for i in idx], [self.texts[i] for i in idx],
                         [self.cf_texts[i] for i in idx], [self.variant[i] for i in idx], dict(self.meta))

    def split(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, seeded split of the prompts into two halves: (rank, measure), sorted index tensors.

        Rank features on one half and measure them on the other, so that the measurement is not of
        the prompts the features were selected on. The split is stratified: within each (template,
        variant) cell the prompts are shuffled (seeded) and dealt alternately, and a cell of odd size
        hands its spare prompt to the other half than the previous odd cell did, so the halves differ
        in size by at most one, as do their counts in every cell."""
        if len(self) < 2:
            raise ValueError(f"cannot split {len(self)} prompt(s) into a ranking and a measuring half")
        rng = random.Random(seed)
        cells: dict = {}
        for i, key in enumerate(zip(self.template, self.variant)):
            cells.setdefault(key, []).append(i)
        halves, spare = ([], []), 0
        for key in sorted(cells):
            idx = cells[key]
            rng.shuffle(idx)
            for j, i in enumerate(idx):
                halves[(j + spare) % 2].append(i)
            spare = (spare + len(idx)) % 2
        return tuple(torch.tensor(sorted(h), dtype=torch.long) for h in halves)

    def swapped(self) -> PromptSet:
        """The counterfactual prompts as a set of their own: cf_tokens with correct and wrong exchanged."""
        return PromptSet(self.cf_tokens, self.wrong, self.correct, self.tokens, list(self.template),
                         list(self.cf_texts), list(self.texts), list(self.variant),
                         {**self.meta, "swapped": not self.meta.get("swapped", False)})


# ------------------------------------------------------------------------------------- building

def _token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer {text!r} is {len(ids)} tokens {ids} for this tokenizer; "
                         "answers must be single tokens")
    return ids[0]


def _bos_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token (bos_token_id is None); prompts start with BOS")
    return bos


def _fields(template: str, allowed: set[str], required: set[str], names: set[str]) -> list[str]:
    """The placeholders of `template`, checked: only `allowed`, all `required`, names after a space."""
    found, text = [], ""
    for literal, name, spec, conv in string.Formatter().parse(template):
        text += literal
        if name is None:
            continue
        if name not in allowed or spec or conv:
            raise ValueError(f"template {template!r}: unknown placeholder {{{name}}}; "
                             f"use only {sorted('{' + a + '}' for a in allowed)}")
        if name in names and not text.endswith(" "):
            raise ValueError(f"template {template!r}: {{{name}}} must follow a space, since names are "
                             "tokenised with their leading space (' Mary')")
        found.append(name)
        text += "X"
    missing = required - set(found)
    if missing:
        raise ValueError(f"template {template!r} lacks {sorted('{' + m + '}' for m in missing)}")
    if template.endswith(" "):
        raise ValueError(f"template {template!r} ends with a space; the answer token carries its own")
    return found


def _fillers(tokenizer, slots: set[str]) -> tuple[dict[str, list[str]], int]:
    kept, skipped = {}, 0
    for slot in sorted(slots):
        kept[slot], k = single_token_names(tokenizer, IOI_FILLERS[slot])  # same rule: " word" is one token
        skipped += k
        if not kept[slot]:
            raise ValueError(f"no {{{slot}}} filler is a single token for this tokenizer: "
                             f"{IOI_FILLERS[slot]}")
    return kept, skipped


def _modal_length(lengths: dict[int, int]) -> tuple[int, list[int], list[int]]:
    """The most common template length (ties: the shorter), the templates not of that length, and
    the templates of that length (the usable ones)."""
    count = Counter(lengths.values())
    best = min(count, key=lambda L: (-count[L], L))
    return (best, sorted(t for t, L in lengths.items() if L != best),
            sorted(t for t, L in lengths.items() if L == best))


def _cells(n: int, templates: list[int], variants: tuple[str, str]) -> list[tuple[int, str]]:
    """Prompt i's (template, variant): templates cycle and each template alternates its variants,
    so templates, variants, and variants within a template each differ in count by at most one."""
    T = len(templates)
    return [(templates[i % T], variants[(i // T + i % T) % 2]) for i in range(n)]


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, not {n!r}")


def make_ioi(tokenizer, n: int = 64, seed: int = 0, templates: list[str] | None = None,
             names: list[str] | None = None) -> PromptSet:
    """`n` IOI prompts, balanced over the templates and the ABBA/BABA name orders.

    names: candidate names (default: both lists of `load_names`); those that are not one token or
    are mostly ordinary words are skipped and counted in meta. Each (template, order) gets distinct
    prompts (name pair and fillers); asking for more than can be made raises ValueError.
    """
    _check_n(n)
    templates = list(IOI_TEMPLATES if templates is None else templates)
    if not templates:
        raise ValueError("templates is empty")
    bos = _bos_id(tokenizer)
    slots = [_fields(t, set(IOI_NAME_FIELDS) | set(IOI_FILLERS), set(IOI_NAME_FIELDS), set(IOI_NAME_FIELDS))
             for t in templates]
    if names is None:
        lists = load_names()
        names = list(dict.fromkeys(lists["male"] + lists["female"]))
    pool, skipped = _usable_names(tokenizer, list(dict.fromkeys(names)))
    if len(pool) < 2:
        raise ValueError(f"IOI needs at least 2 usable names, got {len(pool)} "
                         f"(skipped: {skipped['multi_token']} not one token, "
                         f"{skipped['common_word']} common words)")
    fillers, fillers_skipped = _fillers(tokenizer, {s for f in slots for s in f if s in IOI_FILLERS})

    def render(t: int, io: str, s: str, order: str, fill: dict, subject: str | None = None) -> str:
        a, b = (io, s) if order == "ABBA" else (s, io)
        return templates[t].format(A=a, B=b, S=subject or s, **fill)

    probe = {slot: vals[0] for slot, vals in fillers.items()}
    lengths = {t: len(tokenizer.encode(render(t, pool[0], pool[1], "ABBA", probe), add_special_tokens=False))
               for t in range(len(templates))}
    length, off_length, usable = _modal_length(lengths)

    rng = random.Random(seed)
    cells = _cells(n, usable, IOI_ORDERS)
    quota = Counter(cells)
    rows: dict[tuple[int, str], list] = {}
    dropped_length = dropped_tok = 0
    # prompt codes are mixed-radix numbers: IO name, subject (another name), then each filler
    t_slots = {t: [s for s in dict.fromkeys(slots[t]) if s in IOI_FILLERS] for t in usable}
    radices = {t: [len(pool), len(pool) - 1] + [len(fillers[s]) for s in t_slots[t]] for t in usable}
    sizes = {t: math.prod(radices[t]) for t in usable}
    for (t, order), k in sorted(quota.items()):
        size = sizes[t]
        if k > size:
            raise ValueError(
                f"cannot make {n} IOI prompts: template {t} ({order}) needs {k} distinct prompts but only "
                f"{size} exist with {len(pool)} usable names; n <= {2 * len(usable) * min(sizes.values())} "
                "always works, or pass more names or templates")
        made = []
        for code in rng.sample(range(size), min(size, 2 * k + 16)):
            digits = []
            for r in radices[t]:
                code, d = divmod(code, r)
                digits.append(d)
            io = pool[digits[0]]
            s = _other(pool, digits[0], digits[1])
            fill = {slot: fillers[slot][d] for slot, d in zip(t_slots[t], digits[2:])}
            text, cf_text = render(t, io, s, order, fill), render(t, io, s, order, fill, subject=io)
            ids = tokenizer([text, cf_text], add_special_tokens=False)["input_ids"]
            io_id, s_id = _token_id(tokenizer, " " + io), _token_id(tokenizer, " " + s)
            if len(ids[0]) != length or len(ids[1]) != length:
                dropped_length += 1
            elif not ({io_id, s_id} <= set(ids[0]) and {io_id, s_id} <= set(ids[1])):
                dropped_tok += 1  # a name merged with its neighbours: not the token we answer with
            else:
                made.append((text, cf_text, ids[0], ids[1], io_id, s_id))
            if len(made) == k:
                break
        if len(made) < k:
            raise ValueError(f"template {t} ({order}) gave only {len(made)} of {k} prompts of {length} "
                             "tokens: its names or fillers do not tokenise as single words here")
        rows[(t, order)] = made
    out = [rows[c].pop() for c in cells]
    meta = {
        "task": "ioi", "n": n, "seed": seed, "length": length + 1, "names_usable": len(pool),
        "names_skipped_multi_token": skipped["multi_token"],
        "names_skipped_common_word": skipped["common_word"],
        "fillers_skipped_multi_token": fillers_skipped,
        "templates_dropped_for_length": off_length, "dropped_for_length": dropped_length,
        "dropped_for_tokenisation": dropped_tok, "templates": templates,
    }
    return PromptSet(
        tokens=torch.tensor([[bos] + r[2] for r in out], dtype=torch.long),
        correct=torch.tensor([r[4] for r in out], dtype=torch.long),
        wrong=torch.tensor([r[5] for r in out], dtype=torch.long),
        cf_tokens=torch.tensor([[bos] + r[3] for r in out], dtype=torch.long),
        template=[t for t, _ in cells], texts=[r[0] for r in out], cf_texts=[r[1] for r in out],
        variant=[o for _, o in cells], meta=meta)


def _other(pool: list[str], i: int, j: int) -> str:
    """The j-th name of `pool` other than pool[i]."""
    return pool[j + (j >= i)]


def make_pronoun(tokenizer, n: int = 64, seed: int = 0, templates: list[str] | None = None,
                 names: dict[str, list[str]] | None = None) -> PromptSet:
    """`n` gendered-pronoun prompts, balanced over the templates and the two genders.

    The right answer is the subject pronoun of the name's gender (" he" / " she"), the wrong one the
    other; the counterfactual puts a name of the other gender in the same template. Only names in
    exactly one of the two lists are used (names in both are counted in meta), single tokens that
    are not mostly ordinary words. A name appears at most once per (template, gender).
    """
    _check_n(n)
    templates = list(PRONOUN_TEMPLATES if templates is None else templates)
    if not templates:
        raise ValueError("templates is empty")
    bos = _bos_id(tokenizer)
    for t in templates:
        _fields(t, {"name"}, {"name"}, {"name"})
    lists = load_names() if names is None else {g: list(dict.fromkeys(names[g])) for g in GENDERS}
    both = set(lists["male"]) & set(lists["female"])
    pools, skipped = {}, Counter()
    for g in GENDERS:
        pools[g], s = _usable_names(tokenizer, [x for x in lists[g] if x not in both])
        skipped.update(s)
        if not pools[g]:
            raise ValueError(f"no usable {g} name: every candidate is in both lists, not one token, "
                             "or a common word")
    answer = {g: _token_id(tokenizer, PRONOUNS[g]) for g in GENDERS}
    other = {"male": "female", "female": "male"}

    lengths = {t: len(tokenizer.encode(templates[t].format(name=pools["male"][0]), add_special_tokens=False))
               for t in range(len(templates))}
    length, off_length, usable = _modal_length(lengths)
    rng = random.Random(seed)
    cells = _cells(n, usable, GENDERS)
    quota = Counter(cells)
    rows: dict[tuple[int, str], list] = {}
    dropped_length = 0
    for (t, g), k in sorted(quota.items()):
        if k > len(pools[g]):
            raise ValueError(
                f"cannot make {n} pronoun prompts: template {t} needs {k} distinct {g} names but only "
                f"{len(pools[g])} are usable; n <= {2 * len(usable) * min(map(len, pools.values()))} "
                "always works, or pass more names")
        made = []
        for name in rng.sample(pools[g], len(pools[g])):
            cf_name = rng.choice(pools[other[g]])
            text, cf_text = templates[t].format(name=name), templates[t].format(name=cf_name)
            ids = tokenizer([text, cf_text], add_special_tokens=False)["input_ids"]
            if len(ids[0]) != length or len(ids[1]) != length:
                dropped_length += 1
                continue
            made.append((text, cf_text, ids[0], ids[1]))
            if len(made) == k:
                break
        if len(made) < k:
            raise ValueError(f"template {t} ({g}) gave only {len(made)} of {k} prompts of {length} tokens")
        rows[(t, g)] = made
    out = [rows[c].pop() for c in cells]
    meta = {
        "task": "pronoun", "n": n, "seed": seed, "length": length + 1,
        "names_usable": {g: len(pools[g]) for g in GENDERS}, "names_skipped_both_genders": len(both),
        "names_skipped_multi_token": skipped["multi_token"],
        "names_skipped_common_word": skipped["common_word"],
        "templates_dropped_for_length": off_length, "dropped_for_length": dropped_length,
        "templates": templates,
    }
    return PromptSet(
        tokens=torch.tensor([[bos] + r[2] for r in out], dtype=torch.long),
        correct=torch.tensor([answer[g] for _, g in cells], dtype=torch.long),
        wrong=torch.tensor([answer[other[g]] for _, g in cells], dtype=torch.long),
        cf_tokens=torch.tensor([[bos] + r[3] for r in out], dtype=torch.long),
        template=[t for t, _ in cells], texts=[r[0] for r in out], cf_texts=[r[1] for r in out],
        variant=[g for _, g in cells], meta=meta)


# -------------------------------------------------------------------------------------- scoring

def logit_diff(logits: torch.Tensor, ps: PromptSet) -> torch.Tensor:
    """[n]: logit of the correct answer minus logit of the wrong one, at the last position.

    logits: [n, pos, vocab] (a model's output) or [n, vocab] (already the last position).
    """
    if logits.ndim == 3:
        logits = logits[:, -1]
    if logits.ndim != 2 or logits.shape[0] != len(ps):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(ps)} prompts; "
                         "pass [n, pos, vocab] or [n, vocab]")
    rows = torch.arange(len(ps), device=logits.device)
    return logits[rows, ps.correct.to(logits.device)] - logits[rows, ps.wrong.to(logits.device)]


def last_logits(model, tokens: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """[n, vocab] float32 logits (on the CPU) at the last position of each row, in batched forward passes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch_size):
            out.append(model(tokens[i:i + batch_size].to(device))[:, -1].float().cpu())
    return torch.cat(out)


def evaluate(model, ps: PromptSet, batch_size: int = 32) -> dict:
    """How well `model` solves `ps`: accuracy (logit diff > 0), mean logit diff, per-prompt logit diff.

    Also per template and per variant accuracy. Score the counterfactual run with ``ps.swapped()``.
    """
    ld = logit_diff(last_logits(model, ps.tokens, batch_size), ps)
    ok = ld > 0

    def by(keys):
        groups: dict = {}
        for k, v in zip(keys, ok.tolist()):
            groups.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    return {"n": len(ps), "accuracy": ok.float().mean().item(), "mean_logit_diff": ld.mean().item(),
            "logit_diff": ld, "accuracy_per_template": by(ps.template),
            "accuracy_per_variant": by(ps.variant)}


@dataclass
class Solved(Result):
    """`keep_solved`: how well the model solves a prompt set, how many prompts it kept (those it gets
    right) per template and variant, and how the set was built (`built`: the names and templates it
    skipped)."""

    task: str
    n: int
    accuracy: float
    kept: int
    dropped: int
    kept_per_template: dict
    kept_per_variant: dict
    built: dict = field(default_factory=dict)

    def __post_init__(self):  # template indices come back from JSON as strings
        self.kept_per_template = {int(k): v for k, v in self.kept_per_template.items()}

    def rows(self) -> list[dict]:
        return [{"task": self.task, "prompts": self.n, "accuracy": self.accuracy, "kept": self.kept,
                 "dropped": self.dropped, **{f"kept {v}": k for v, k in self.kept_per_variant.items()}}]

    def verdicts(self) -> list[str]:
        out = [f"{self.task}: the model solves {self.accuracy:.1%} of {self.n} prompts (chance: 50%); kept "
               f"{self.kept}, dropped {self.dropped}"]
        b = self.built
        if "names_usable" in b:
            out.append(f"names usable: {b['names_usable']}; skipped: {b.get('names_skipped_multi_token')} not one token, "
                       f"{b.get('names_skipped_common_word')} mostly ordinary words; templates dropped for length: "
                       f"{b.get('templates_dropped_for_length')}")
        return out


BUILT = ("names_usable", "names_skipped_multi_token", "names_skipped_common_word", "names_skipped_both_genders",
         "templates_dropped_for_length", "dropped_for_length")


def keep_solved(model, ps: PromptSet, batch_size: int = 32) -> tuple[PromptSet, Solved]:
    """The prompts `model` gets right (logit diff > 0), and a `Solved` report (also kept in the kept
    set's meta["keep_solved"], as a dict)."""
    result = evaluate(model, ps, batch_size)
    ok = result["logit_diff"] > 0
    kept = ps.subset(ok)
    report = Solved(task=str(ps.meta.get("task", "")), n=len(ps), accuracy=result["accuracy"], kept=int(ok.sum()),
                    dropped=int((~ok).sum()), kept_per_template=dict(sorted(Counter(kept.template).items())),
                    kept_per_variant=dict(sorted(Counter(kept.variant).items())),
                    built={k: ps.meta[k] for k in BUILT if k in ps.meta})
    kept.meta["keep_solved"] = report.to_dict()
    return kept, report
