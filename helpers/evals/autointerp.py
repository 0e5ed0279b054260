"""Automated interpretability: explain a feature, simulate it from the explanation, score the simulation.

This is the method the paper (Cunningham et al. 2023) took from Bills et al. 2023 ("Language models
can explain neurons in language models"). It measures how well a short natural-language explanation
*predicts* where a feature fires:

1. **explain**: an explainer model reads the feature's top-activating excerpts, each activating token
   marked with its activation normalised to 0-10, and writes a short explanation;
2. **simulate**: a simulator model sees only that explanation and, for held-out excerpts (some
   top-activating, some random), predicts every token's activation on a 0-10 scale;
3. **score**: the Pearson correlation between simulated and true activations over all tokens of the
   held-out excerpts at once (top and random excerpts concatenated: the "all at once" score of
   Bills et al.). 1 is a perfect prediction, 0 no better than a constant (a constant prediction
   scores exactly 0, never NaN), negative worse than one.

A high score says the feature means what the explanation says, on both the text where it fires
strongly and ordinary text; it measures the feature *and* the explainer and simulator together.

Two backends:

* `LocalBackend` (the default, offline): the embedded SmolLM2-135M-Instruct. It explains by greedy
  generation and simulates with the logprob method of Bills et al.: one forward pass per excerpt,
  reading at each token's slot the model's distribution over the digits and taking its expected
  value. A 135M model is a weak explainer and simulator, so its scores are low and noisy: it shows
  the whole pipeline working offline, not the paper's numbers.
* `OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp
  server, Ollama, ...). Paper-grade scores need a strong model here. Transient failures (unreachable
  server, timeouts, HTTP 429/5xx, malformed replies) are retried with exponential backoff; a rejected
  key fails at once. An API key goes only to the endpoint it was given for: over https, or plain http
  to this machine (localhost, 127.0.0.1, ::1), and never along a redirect to another host.

`score_features` scores many features, appending each result to a JSON-lines file as soon as it is
scored, so an interrupted or failed run keeps its work and resumes where it stopped.

**Detection** (EleutherAI delphi's detection scorer, on the endpoint): the LLM reads the explanation and
a shuffled batch of text windows and names the windows that contain the feature; the score is the
balanced accuracy (mean of the true-positive and true-negative rates; chance 0.5) over activating windows
sampled across the deciles of their largest activation and random non-activating windows. The windows
are the ones `helpers.evals.protocols.ProtocolSplit` samples for its LLM-free detection score
(`detection_inputs`), so the two scores read the same text. `detection_scores` scores many features
and reports each one's cost: requests, prompt and completion tokens as the endpoint reports them (its
``usage``), or estimated from characters where it does not (the result says which).
"""
from __future__ import annotations

import http.client
import inspect
import ipaddress
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.activations.models import kv_cache_fix, load_model
from helpers.evals.features import feature_excerpts
from helpers.evals.protocols import ProtocolSplit
from helpers.results import Result
from helpers.settings.paths import digest
from helpers.settings.profiles import EMBEDDED_MODEL

SCALE = 10  # simulated and normalised activations run from 0 to SCALE


class AutointerpError(RuntimeError):
    """An explainer or simulator failed (unreachable, too slow, rejected, or gave unusable output)."""


@dataclass
class Excerpt:
    """A run of decoded tokens with one feature's activation on each (activations are >= 0)."""

    tokens: list[str]
    acts: list[float]

    def __post_init__(self):
        self.tokens = [str(t) for t in self.tokens]
        self.acts = [float(a) for a in self.acts]
        if len(self.tokens) != len(self.acts):
            raise ValueError(f"an Excerpt needs one activation per token: got {len(self.tokens)} tokens "
                             f"and {len(self.acts)} activations")
        if not self.tokens:
            raise ValueError("an Excerpt needs at least one token")
        bad = [a for a in self.acts if not math.isfinite(a) or a < 0]
        if bad:
            raise ValueError(f"activations must be finite and >= 0 (an SAE feature's are), got {bad[:3]}; "
                             "clip negative values to 0 or pass a ReLU'd direction")

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_act(self) -> float:
        return max(self.acts)


class Backend(Protocol):
    """An explainer and simulator. `explain` completes a prompt; `simulate` predicts 0-10 per token.
    A backend that can also run the detection scorer has ``detect(explanation, texts) -> list[bool]``
    (`OpenAIBackend` has)."""

    name: str

    def explain(self, prompt: str) -> str: ...

    def simulate(self, explanation: str, excerpt: Excerpt) -> list[float]: ...


# ---------------------------------------------------------------------------------------- prompts

EXPLAIN_SYSTEM = ("You study one feature of a language model: a detector that fires on some tokens of a "
                  "text. Explain in a few words what it fires on.")
SIMULATE_SYSTEM = ("You predict how strongly one feature of a language model fires on each token of a text, "
                   f"from 0 (not at all) to {SCALE} (as strongly as it ever does), given an explanation of "
                   "what the feature fires on. Most tokens are 0.")
EXAMPLE_EXPLANATION = 'the word "and"'  # the simulator's worked example (LocalBackend)
EXAMPLE_TEXT = "Salt and pepper, bread and butter."


DETECT_SYSTEM = ("You are given an explanation of what one feature of a language model fires on, and numbered "
                 "text excerpts. Say which excerpts contain something the feature fires on.")
CHARS_PER_TOKEN = 4  # the token estimate where an endpoint reports no usage


def detection_prompt(explanation: str, texts: list[str]) -> str:
    """The detection prompt: the explanation and the numbered excerpts; the reply is a JSON list of the
    numbers of those that contain the feature."""
    lines = [f"Explanation of the feature: {explanation}", "", "Excerpts:"]
    lines += [f"{i}. {_show(t).strip()}" for i, t in enumerate(texts, 1)]
    lines += ["", f"Reply with only a JSON list of the numbers (1 to {len(texts)}) of the excerpts in which the "
              "feature fires, e.g. [2, 5]; [] if none."]
    return "\n".join(lines)


def _json_lists(text: str, problems: list[str]):
    """The flat JSON lists in a model's reply (surrounding prose or code fences allowed), in order, as
    (the list's text, its values); a bracketed text that is not JSON is added to `problems`. Raises
    ValueError when the reply holds no bracketed list at all."""
    text = re.sub(r"```[a-zA-Z]*", "", text)
    candidates = re.findall(r"\[[^\[\]]*\]", text)
    if not candidates:
        raise ValueError(f"no JSON list in the reply {text[:200]!r}")
    for cand in candidates:
        try:
            yield cand, json.loads(cand)
        except json.JSONDecodeError:
            problems.append(f"{cand[:60]!r} is not valid JSON")


def parse_detection(text: str, n: int) -> list[bool]:
    """Which of `n` excerpts a detection reply names: a JSON list of their numbers (1 to n) in `text`
    (surrounding prose or code fences allowed). Raises ValueError saying what is wrong."""
    problems = []
    for cand, values in _json_lists(text, problems):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            problems.append(f"{cand[:60]!r} holds non-integers")
            continue
        if any(not 1 <= v <= n for v in values):
            problems.append(f"{cand[:60]!r} names excerpts outside 1 to {n}")
            continue
        chosen = set(values)
        return [i in chosen for i in range(1, n + 1)]
    raise ValueError("; ".join(problems))


def _safe_name(kind: str, model: str) -> str:
    """A backend's name, usable in a file name: 'local-smollm2-135m-instruct', 'openai-gpt-4o-mini'."""
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", str(model))


def _show(token: str) -> str:
    """A token as one printable line: newlines and tabs escaped."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _normalise(acts, top: float) -> list[int]:
    if top <= 0:
        return [0 for _ in acts]
    return [int(min(SCALE, round(SCALE * a / top))) for a in acts]


def explain_prompt(excerpts: list[Excerpt], max_excerpts: int = 10) -> str:
    """The explainer's prompt: the strongest `max_excerpts` excerpts, each with its activating tokens.

    Activations are normalised to 0-10 by the largest activation shown; a token is listed when its
    normalised activation rounds to at least 1.
    """
    if not excerpts:
        raise ValueError("explain_prompt needs at least one top-activating excerpt")
    shown = sorted(excerpts, key=lambda e: -e.max_act)[:max_excerpts]
    top = max(e.max_act for e in shown)
    if top <= 0:
        raise ValueError("none of the excerpts activates the feature (all activations are 0): pass the "
                         "feature's top-activating excerpts")
    lines = [f"Here are {len(shown)} text excerpts where the feature fires. After each, the tokens it fires "
             f"on, with its activation from 0 to {SCALE}.", ""]
    for i, e in enumerate(shown, 1):
        norm = _normalise(e.acts, top)
        marked = ", ".join(f"{_show(t).strip() or repr(t)} ({a})" for t, a in zip(e.tokens, norm) if a > 0)
        lines += [f"Excerpt {i}: {_show(e.text).strip()}", f"Fires on: {marked}", ""]
    lines.append("In a few words, what does the feature fire on? Reply with that phrase only.")
    return "\n".join(lines)


def simulate_prompt(explanation: str, tokens: list[str]) -> str:
    """The simulator's prompt for a chat model that answers in JSON (OpenAIBackend)."""
    return (f"Explanation of the feature: {explanation}\n\n"
            f"The text, as a JSON list of its {len(tokens)} tokens:\n"
            f"Tokens: {json.dumps(tokens, ensure_ascii=False)}\n\n"
            f"Reply with only a JSON list of {len(tokens)} numbers from 0 to {SCALE}: the feature's "
            "predicted activation on each token, in order.")


def _clean_explanation(text: str) -> str:
    """The first non-empty line, without a leading 'Explanation:' or quotes."""
    for line in text.strip().splitlines():
        line = line.strip()
        line = re.sub(r"^(explanation\s*:|answer\s*:|(the|this) feature fires on\s*:?)\s*", "", line, flags=re.I)
        line = line.strip("\"'` ").strip()
        if line:
            return line
    return ""


def parse_activation_list(text: str, n: int) -> list[float]:
    """A JSON list of `n` numbers in `text` (surrounding prose or code fences allowed), clipped to 0-10.

    Raises ValueError saying what is wrong when there is no such list.
    """
    problems = []
    for cand, values in _json_lists(text, problems):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            problems.append(f"{cand[:60]!r} holds non-numbers")
            continue
        if len(values) != n:
            problems.append(f"a list of {len(values)} numbers for {n} tokens")
            continue
        return [float(min(SCALE, max(0.0, v))) for v in values]
    raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------ local model

def local_backend(model, device: str = "auto") -> "LocalBackend":
    """A LocalBackend on `model` if it is an instruction-tuned chat model, else on the embedded
    SmolLM2-135M-Instruct: a base model such as the paper's Pythia has no chat template to explain with."""
    if getattr(model.tokenizer, "chat_template", None):
        return LocalBackend(model)
    return LocalBackend(load_model(EMBEDDED_MODEL, device=device))


class LocalBackend:
    """Explain and simulate with a local TransformerBridge (default: the embedded SmolLM2-135M). Explanations
    are generated greedily with the key-value cache, and simulations reuse the cache of their prompts'
    shared start (`use_cache=False`: one full forward pass per token, and per simulation)."""

    def __init__(self, model, max_new_tokens: int = 40, use_cache: bool = True):
        kv_cache_fix()
        self.bridge = model
        self.use_cache = use_cache
        self.hf = model.original_model
        self.tokenizer = model.tokenizer
        self.max_new_tokens = max_new_tokens
        self.name = _safe_name("local", getattr(model, "workbook_name", None) or self.hf.config._name_or_path)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{self.name}: the tokenizer has no chat template; LocalBackend needs an "
                             "instruction-tuned model such as the embedded smollm2-135m-instruct")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{self.name}: LocalBackend needs a fast tokenizer (character offsets)")
        self.digit_ids = self._digit_ids()
        self.max_digit = len(self.digit_ids) - 1  # 9, or 10 when "10" is one token
        self._prefix = None  # (token ids, their key-value cache): the last simulation prompt's shared start
        # transformers 5 names a forward's key-value cache `cache` (`past_key_values` before)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"

    def _digit_ids(self) -> list[int]:
        ids = []
        for d in range(SCALE + 1):
            enc = self.tokenizer.encode(str(d), add_special_tokens=False)
            if len(enc) != 1:
                if d < SCALE:
                    raise ValueError(f"{self.name}: the digit {d} is not a single token ({enc}); the "
                                     "logprob simulator reads one token per activation")
                break  # "10" spans two tokens: the simulator's scale is 0-9, rescaled to 0-10
            ids.append(enc[0])
        return ids

    @property
    def device(self):
        return next(self.hf.parameters()).device

    def explain(self, prompt: str) -> str:
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": prompt}],
            tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        # Greedy (with the key-value cache unless use_cache=False: the same words either way); generation
        # stops at the end of the first non-empty line: that line is the explanation.
        with torch.inference_mode():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                   do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=self.use_cache,
                                   pad_token_id=self.tokenizer.eos_token_id,
                                   stopping_criteria=[_FirstLineDone(self.tokenizer, ids.shape[1])])
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        explanation = _clean_explanation(reply)
        if not explanation:
            raise AutointerpError(f"{self.name} wrote no explanation (reply {reply!r}); raise max_new_tokens "
                                  "or use a stronger model through OpenAIBackend")
        return explanation

    def _turn(self, explanation: str, tokens: list[str], values: list[int]) -> tuple[list[dict], list[int]]:
        """One user/assistant exchange of the simulation prompt, and where each value sits in the answer.

        The user states the explanation and lists the tokens; the answer repeats each token, then a
        tab and its value.
        """
        user = (f"Feature explanation: {explanation}\n"
                f"For each token below, write the feature's activation from 0 to {self.max_digit}.\n\n"
                + "\n".join(_show(t) for t in tokens))
        body, slots = "", []
        for t, v in zip(tokens, values):
            body += _show(t) + "\t"
            slots.append(len(body))
            body += f"{v}\n"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": body}], slots

    def _simulation_text(self, explanation: str, tokens: list[str]) -> tuple[str, list[int]]:
        """The chat-templated simulation prompt and the character offset of every token's value slot.

        One worked example (a different feature, with its true values) shows the format, as in the
        few-shot prompts of Bills et al. The excerpt's slots hold a placeholder 0 that is never read:
        the prediction is the model's distribution *at* each slot, computed from the text before it.
        """
        system = SIMULATE_SYSTEM.replace(f"to {SCALE} ", f"to {self.max_digit} ")
        example_tokens = [self.tokenizer.decode([i]) for i in
                          self.tokenizer.encode(EXAMPLE_TEXT, add_special_tokens=False)]
        example, _ = self._turn(EXAMPLE_EXPLANATION, example_tokens,
                                [self.max_digit if t.strip() == "and" else 0 for t in example_tokens])
        target, slots = self._turn(explanation, tokens, [0] * len(tokens))
        text = self.tokenizer.apply_chat_template([{"role": "system", "content": system}, *example, *target],
                                                  tokenize=False)
        start = text.rindex(target[-1]["content"])
        return text, [start + s for s in slots]

    def simulate(self, explanation: str, excerpt: Excerpt) -> list[float]:
        """Expected activation at each token: the digit distribution at its slot, one forward pass."""

        text, slots = self._simulation_text(explanation, excerpt.tokens)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        where = {start: i for i, (start, end) in enumerate(enc["offset_mapping"]) if end == start + 1}
        index = [where.get(s) for s in slots]
        if any(i is None or enc["input_ids"][i] != self.digit_ids[0] for i in index):
            raise AutointerpError(f"{self.name}: the tokenizer merges a value slot of the simulation prompt "
                                  "with its neighbours, so the logprob simulator cannot read it; use a model "
                                  "whose tokenizer splits digits, or OpenAIBackend")
        ids = enc["input_ids"]
        with torch.inference_mode():
            logits, start = self._logits_from(ids, min(index) - 1)
        # the logits at position i - 1 predict the token at slot i (`logits` begin at position `start`)
        probs = logits[torch.tensor(index, device=logits.device) - 1 - start][:, self.digit_ids].float().softmax(-1)
        values = torch.arange(len(self.digit_ids), dtype=torch.float32, device=probs.device)
        expected = (probs * values).sum(-1) * (SCALE / self.max_digit)
        return [float(v) for v in expected.clamp(0, SCALE).cpu()]


    def _logits_from(self, ids: list[int], first: int) -> tuple[torch.Tensor, int]:
        """The logits of `ids` from some position `start` <= `first` on, and `start`. With the key-value cache,
        the tokens a prompt shares with the previous one (the instructions and the example; for the excerpts
        of one feature, the explanation too) are not run again: their cache is kept, cut back to what the
        next prompt shares."""
        run = lambda t, **kw: self.hf(input_ids=torch.tensor([t], device=self.device), **kw)  # noqa: E731
        if not self.use_cache or first < 1:
            return run(ids).logits[0], 0
        if self._prefix is not None:
            prefix, cache = self._prefix
            shared = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
            shared = min(shared, first)
            if shared:
                cache.crop(-(len(prefix) - shared))  # a causal cache cut to its first tokens is theirs alone
                self._prefix = (prefix[:shared], cache)
            else:
                self._prefix = None
        if self._prefix is None:
            self._prefix = (ids[:first], run(ids[:first], use_cache=True).past_key_values)
        prefix, cache = self._prefix
        try:
            return run(ids[len(prefix):], use_cache=True, **{self._cache_arg: cache}).logits[0], len(prefix)
        finally:
            cache.crop(-(cache.get_seq_length() - len(prefix)))  # the prefix alone again


class _FirstLineDone:
    """Generation stopping criterion: the reply already holds a complete non-empty line."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tokenizer.decode(input_ids[0, self.prompt_len:], skip_special_tokens=True)
        done = re.search(r"\S[^\n]*\n", text) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# ------------------------------------------------------------------------------------ HTTP backend

def _is_this_machine(host: str | None) -> bool:
    """Whether a URL's host is this machine: localhost or a loopback address (127.0.0.1, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple:
    """(scheme, host, port) of a URL: a key given for one origin is sent to that origin only."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects (it copies every header, Authorization included, to the new address),
    except that a request carrying a key is not redirected to another scheme, host or port."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url) and req.has_header("Authorization"):
            fp.close()
            raise AutointerpError(
                f"{req.full_url} redirected (HTTP {code}) to {newurl}, another address: the API key is only "
                "sent to the endpoint it was given for, so the request was not followed. If you trust the "
                "new address, set AUTOINTERP_URL (base_url) to it, with its key")
        return new


class OpenAIBackend:
    """Explain and simulate with a chat model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    `base_url` includes the API version, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
    `api_key` is sent as a bearer token; by default it is $AUTOINTERP_KEY when `base_url` is
    $AUTOINTERP_URL, and otherwise no key is sent (local servers need none). No other variable is
    read: a key set for another service ($OPENAI_API_KEY) never goes to this endpoint. A key is
    refused over plain http unless the server is on this machine (localhost, 127.0.0.1, ::1), and is
    never sent along a redirect to another scheme, host or port.
    A call is tried ``1 + retries`` times, sleeping ``backoff * 2**attempt`` seconds between tries.
    """

    def __init__(self, base_url: str, api_key: str | None = None, model: str = "gpt-4o-mini",
                 timeout: float = 30.0, retries: int = 3, backoff: float = 1.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, not {base_url!r} "
                             "(e.g. https://api.openai.com/v1)")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0 and backoff >= 0; got timeout={timeout}, "
                             f"retries={retries}, backoff={backoff}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        if api_key is None and os.environ.get("AUTOINTERP_URL", "").rstrip("/") == self.base_url:
            api_key = os.environ.get("AUTOINTERP_KEY")
        self.api_key = api_key or None
        host = urllib.parse.urlsplit(self.base_url).hostname
        if self.api_key and self.base_url.startswith("http://") and not _is_this_machine(host):
            raise ValueError(
                f"refusing to send an API key over plain http to {self.base_url}: anyone on the way to {host} "
                "could read it. Use the endpoint's https:// address, or a server on this machine "
                "(http://localhost, 127.0.0.1 or [::1]); if this server needs no key, pass api_key='' "
                "(or leave AUTOINTERP_KEY unset)")
        self._opener = urllib.request.build_opener(_SameOriginRedirects)
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.name = _safe_name("openai", model)
        self.usage = Usage()

    def _post(self, messages: list[dict]) -> str:
        """One request; the reply's message content. Raises _Retryable or AutointerpError."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            if err.code in (401, 403):
                raise AutointerpError(
                    f"{self.url} rejected the API key (HTTP {err.code}: {detail}); check api_key "
                    f"(or $AUTOINTERP_KEY) and that it may use model {self.model!r}") from None
            if err.code == 429 or err.code >= 500:
                raise _Retryable(f"HTTP {err.code} ({detail})") from None
            raise AutointerpError(
                f"{self.url} answered HTTP {err.code} ({detail}); check base_url (it should end in the API "
                f"version, e.g. /v1) and the model name {self.model!r}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no reply within the timeout of {self.timeout:g} s", timeout=True) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no connection within the timeout of {self.timeout:g} s", timeout=True) from None
            raise _Retryable(f"cannot connect ({err.reason})", unreachable=True) from None
        except (OSError, http.client.HTTPException) as err:  # reset, dropped or garbled mid-reply
            raise _Retryable(f"the connection failed ({err})", unreachable=True) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"a reply that is not a chat completion: {raw[:200]!r}", malformed=True) from None
        if not isinstance(content, str):
            raise _Retryable(f"a chat completion without text content: {raw[:200]!r}", malformed=True)
        self.usage.add(messages, content, json.loads(raw).get("usage"))
        return content

    def _call(self, messages: list[dict], parse, what: str):
        """POST and parse, retrying transient failures; AutointerpError once the retries are spent."""
        attempts = self.retries + 1
        last = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                content = self._post(messages)
            except _Retryable as err:
                last = err
                continue
            try:
                return parse(content)
            except ValueError as err:
                last = _Retryable(f"malformed output for {what}: {err}", malformed=True)
        if last.timeout:
            advice = f"raise timeout (now {self.timeout:g} s) or check that the server is not overloaded"
        elif last.unreachable:
            advice = "check base_url and that the server is running and reachable from here"
        elif last.malformed:
            advice = (f"use a stronger model than {self.model!r}, or one that follows instructions; "
                      "raise retries if the failures are rare")
        else:
            advice = "the server is failing or rate-limiting: wait, lower the request rate, or raise retries/backoff"
        raise AutointerpError(f"{self.url}: {what} failed after {attempts} attempt(s); last error: {last}. "
                              f"To fix: {advice}.")

    def explain(self, prompt: str) -> str:
        def parse(content: str) -> str:
            explanation = _clean_explanation(content)
            if not explanation:
                raise ValueError(f"an empty explanation ({content[:200]!r})")
            return explanation

        return self._call([{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": prompt}],
                          parse, "explain")

    def detect(self, explanation: str, texts: list[str]) -> list[bool]:
        """Which of `texts` the model says contain the feature `explanation` describes (one request)."""
        n = len(texts)
        return self._call([{"role": "system", "content": DETECT_SYSTEM},
                           {"role": "user", "content": detection_prompt(explanation, texts)}],
                          lambda content: parse_detection(content, n), f"detect ({n} excerpts)")

    def simulate(self, explanation: str, excerpt: Excerpt) -> list[float]:
        n = len(excerpt.tokens)
        return self._call([{"role": "system", "content": SIMULATE_SYSTEM},
                           {"role": "user", "content": simulate_prompt(explanation, excerpt.tokens)}],
                          lambda content: parse_activation_list(content, n), f"simulate ({n} tokens)")


@dataclass
class Usage:
    """What a backend's requests cost: completed requests, prompt and completion tokens, and how many of
    the requests' token counts were estimated from characters (`CHARS_PER_TOKEN`) because the endpoint
    reported no ``usage``."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0

    def add(self, messages: list[dict], content: str, usage) -> None:
        self.requests += 1
        try:
            prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (TypeError, KeyError, ValueError):
            chars = sum(len(str(m.get("content", ""))) for m in messages)
            prompt, completion = -(-chars // CHARS_PER_TOKEN), -(-len(content) // CHARS_PER_TOKEN)
            self.estimated += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def since(self, before: "Usage") -> "Usage":
        return Usage(self.requests - before.requests, self.prompt_tokens - before.prompt_tokens,
                     self.completion_tokens - before.completion_tokens, self.estimated - before.estimated)

    def copy(self) -> "Usage":
        return Usage(self.requests, self.prompt_tokens, self.completion_tokens, self.estimated)

    @property
    def source(self) -> str:
        """"endpoint" (every count reported by the endpoint), "estimate" (none), "mixed", or "none"."""
        if not self.requests:
            return "none"
        return "endpoint" if not self.estimated else "estimate" if self.estimated == self.requests else "mixed"


class _Retryable(Exception):
    def __init__(self, message: str, timeout: bool = False, unreachable: bool = False, malformed: bool = False):
        super().__init__(message)
        self.timeout, self.unreachable, self.malformed = timeout, unreachable, malformed


# ---------------------------------------------------------------------------------------- scoring

def correlation_score(simulated, true) -> float:
    """Pearson correlation of two flat sequences; 0.0 (not NaN) when either is constant."""
    s = np.asarray(simulated, dtype=np.float64).ravel()
    t = np.asarray(true, dtype=np.float64).ravel()
    if s.shape != t.shape:
        raise ValueError(f"{s.size} simulated activations for {t.size} true ones")
    if s.size < 2:
        return 0.0
    ds, dt = s - s.mean(), t - t.mean()
    # a constant sequence (up to rounding in its mean) carries no signal: score 0, not 0/0
    if any(np.sqrt(np.mean(d * d)) <= 1e-9 * max(float(np.abs(x).max()), 1e-300) for d, x in ((ds, s), (dt, t))):
        return 0.0
    return float(np.clip((ds @ dt) / math.sqrt(float(ds @ ds) * float(dt @ dt)), -1.0, 1.0))


def explain_feature(backend: Backend, top_excerpts: list[Excerpt], max_excerpts: int = 10) -> str:
    """The backend's explanation of a feature, from its top-activating excerpts."""
    return backend.explain(explain_prompt(top_excerpts, max_excerpts))


def simulate_and_score(backend: Backend, explanation: str, held_out: list[Excerpt]) -> dict:
    """Simulate every held-out excerpt from the explanation; score all their tokens at once.

    Returns {"score", "simulated", "true"}: the correlation and, per excerpt, the predicted and real
    activations.
    """
    if not held_out:
        raise ValueError("simulate_and_score needs at least one held-out excerpt")
    simulated, true = [], []
    for excerpt in held_out:
        sim = [float(v) for v in backend.simulate(explanation, excerpt)]
        if len(sim) != len(excerpt.tokens):
            raise AutointerpError(f"{backend.name} simulated {len(sim)} activations for an excerpt of "
                                  f"{len(excerpt.tokens)} tokens")
        simulated.append(sim)
        true.append(list(excerpt.acts))
    score = correlation_score([v for s in simulated for v in s], [v for t in true for v in t])
    return {"score": score, "simulated": simulated, "true": true}


def score_feature(backend: Backend, train_top: list[Excerpt], test_top: list[Excerpt],
                  test_random: list[Excerpt]) -> dict:
    """Explain from `train_top`; score on `test_top` + `test_random` together ("all at once").

    Returns {"explanation", "score", "score_top", "score_random", "simulated", "true", "n_top",
    "n_random"}: `score` is the paper's number; the top-only and random-only correlations say where
    the explanation succeeds or fails (0 on random text that never activates the feature).
    """
    if not test_top and not test_random:
        raise ValueError("score_feature needs held-out excerpts: test_top and/or test_random")
    explanation = explain_feature(backend, train_top)
    result = simulate_and_score(backend, explanation, list(test_top) + list(test_random))
    k = len(test_top)
    flat = lambda rows: [v for r in rows for v in r]  # noqa: E731
    return {
        "explanation": explanation,
        "score": result["score"],
        "score_top": correlation_score(flat(result["simulated"][:k]), flat(result["true"][:k])),
        "score_random": correlation_score(flat(result["simulated"][k:]), flat(result["true"][k:])),
        "simulated": result["simulated"], "true": result["true"],
        "n_top": k, "n_random": len(test_random),
    }


def load_results(results_path) -> dict[int, dict]:
    """The features already scored in a JSON-lines results file (feature id -> result).

    A torn last line (a run killed while writing it) is dropped and cut from the file, so that the
    next append starts on a fresh line.
    """
    path = Path(results_path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    results, good_end, pos = {}, 0, 0
    for line in data.splitlines(keepends=True):
        end = pos + len(line)
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated")
            if line.strip():
                record = json.loads(line)
                results[int(record["feature"])] = record
        except (ValueError, KeyError, TypeError):
            if end == len(data):  # the last line: an interrupted write
                break
            line_no = data[:pos].count(b"\n") + 1
            raise ValueError(f"{path} line {line_no} is not a result record; "
                             "delete the file or pass another results_path") from None
        good_end, pos = end, end
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return results


def score_features(backend: Backend, features: dict, results_path=None, progress: bool = True) -> dict[int, dict]:
    """Score many features: {feature id: (train_top, test_top, test_random)} -> {feature id: result}.

    With `results_path`, each result is appended to that JSON-lines file as soon as it is scored and
    features already in it are skipped, so an interrupted run resumes. A feature whose scoring fails
    with AutointerpError stops the run; everything scored before it is already saved.
    """
    done: dict[int, dict] = {}
    path = Path(results_path) if results_path is not None else None
    if path is not None:
        done = load_results(path)
        others = {r.get("backend") for r in done.values()} - {backend.name}
        if others:
            raise ValueError(f"{path} holds scores from {sorted(map(str, others))}, not {backend.name}: "
                             "scores from different models do not mix; pass another results_path")
        path.parent.mkdir(parents=True, exist_ok=True)
    results = {int(f): done[int(f)] for f in features if int(f) in done}
    todo = [f for f in features if int(f) not in done]

    bar = tqdm(total=len(features), initial=len(results), desc=f"autointerp ({backend.name})",
               unit="feature", disable=not progress)
    try:
        for f in todo:
            train_top, test_top, test_random = features[f]
            try:
                result = score_feature(backend, train_top, test_top, test_random)
            except AutointerpError as err:
                if path is not None:
                    err.add_note(f"feature {f} failed; the {len(results)} feature(s) scored so far are saved "
                                 f"in {path}: call score_features again to resume")
                raise
            record = {"feature": int(f), "backend": backend.name, **result}
            if path is not None:
                with open(path, "a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            results[int(f)] = record
            bar.update(1)
            bar.set_postfix(score=f"{record['score']:.2f}")
    finally:
        bar.close()
    return {int(f): results[int(f)] for f in features}


@dataclass
class FeatureExplanation(Result):
    """One feature's explain-simulate-score result: its explanation and the correlation of simulated
    with true activations on the held-out excerpts (all of them, the top ones, the random ones)."""

    feature: int
    explanation: str
    score: float
    score_top: float = float("nan")
    score_random: float = float("nan")


@dataclass
class AutointerpScores(Result):
    """Explain-simulate-score results of some features of one dictionary (`autointerp_scores`)."""

    name: str
    backend: str
    features: list[FeatureExplanation] = field(default_factory=list)

    @classmethod
    def from_records(cls, name: str, backend: str, records: dict) -> "AutointerpScores":
        """From `score_features`' {feature: record}."""
        return cls(name, backend, [FeatureExplanation(int(f), r["explanation"], float(r["score"]),
                                                      float(r.get("score_top", float("nan"))),
                                                      float(r.get("score_random", float("nan"))))
                                   for f, r in records.items()])

    @property
    def scores(self) -> np.ndarray:
        return np.array([f.score for f in self.features], dtype=float)

    @property
    def mean(self) -> float:
        """The mean score over the features (NaN when none was scored)."""
        return float(self.scores.mean()) if self.features else float("nan")

    def rows(self) -> list[dict]:
        return [{"dictionary": self.name, "feature": f.feature, "score": f.score,
                 "explanation": f.explanation[:90]} for f in self.features]

    def verdicts(self) -> list[str]:
        if not self.features:
            return [f"{self.name}: no feature scored."]
        return [f"{self.name}: mean explain-simulate score {self.mean:+.3f} over {len(self.features)} features "
                f"({self.backend})."]


def autointerp_inputs(dictionary, store, stats, features, tokenizer, meta=None, n_top: int = 8,
                      n_random: int = 4, seed: int = 0) -> dict:
    """{feature: (train_top, test_top, test_random)} Excerpts of `features` for `score_features`: each
    feature's top-activating contexts split into an explanation half and a held-out half, plus random
    held-out contexts (helpers.evals.features.feature_excerpts)."""
    out = {}
    for f in features:
        parts = feature_excerpts(dictionary, store, stats, f, tokenizer, meta=meta, n_top=n_top, n_random=n_random,
                                 seed=seed)
        out[f] = tuple([Excerpt(t, a) for t, a in part] for part in parts)
    return out


def autointerp_scores(backend: Backend, inputs: dict, name: str = "features", cache_dir=None,
                      progress: bool = True) -> AutointerpScores:
    """`score_features` of `inputs` ({feature: (train_top, test_top, test_random)}) as a typed result.
    With `cache_dir`, results go to a JSON-lines file there named by the backend, `name` and the
    excerpts themselves, so that a rerun on the same excerpts resumes (or loads) and other excerpts
    start a file of their own."""
    path = None
    if cache_dir is not None:
        key = {str(f): [[[e.tokens, e.acts] for e in part] for part in parts] for f, parts in inputs.items()}
        slug = re.sub(r"[^\w.-]+", "_", f"{backend.name}-{name}")
        path = Path(cache_dir) / f"{slug}-{digest(key)}.jsonl"
    records = score_features(backend, inputs, results_path=path, progress=progress)
    return AutointerpScores.from_records(name, backend.name, records)


# ------------------------------------------------------------------------------------ detection

def detection_inputs(split: ProtocolSplit, codes, token_ids, tokenizer, features, counts=None) -> dict:
    """{feature: (explain, activating, non_activating)} for `detection_scores`, from the windows that
    `split` (a `helpers.evals.protocols.ProtocolSplit`) samples for its LLM-free scores: `explain` the
    Excerpts the explainer sees (the explaining half's top-activating and random windows, activations
    clipped at 0), `activating` the texts of the scoring half's windows sampled across the deciles of
    their largest activation, `non_activating` those of random windows with no active token.
    `codes` [N, F] and `token_ids` [N] are the split's tokens (all N given, or only its kept ones);
    `features` the feature indices to take; `counts` as in `ProtocolSplit.score`."""
    ex = split.excerpts(codes, counts)
    X = torch.as_tensor(codes)
    ids = np.asarray(token_ids.detach().cpu() if hasattr(token_ids, "detach") else token_ids).ravel()
    if split.keep is not None and len(ids) == split.n_given:
        kept = np.flatnonzero(split.keep)
        ids, X = ids[kept], X[torch.as_tensor(kept)] if X.shape[0] == split.n_given else X
    elif split.keep is not None and X.shape[0] == split.n_given:
        X = X[torch.as_tensor(np.flatnonzero(split.keep))]
    if len(ids) != split.n:
        raise ValueError(f"token_ids has {len(ids)} entries; the split has {split.n} tokens")
    decoded: dict[int, str] = {}

    def tokens(rows: np.ndarray) -> list[str]:
        out = []
        for i in rows[rows >= 0]:
            t = int(ids[i])
            if t not in decoded:
                decoded[t] = tokenizer.decode([t])
            out.append(decoded[t])
        return out

    out = {}
    for f in features:
        f = int(f)
        explain = []
        for w in ex["explain"][f]:
            rows = split.window_tokens(w)
            rows = rows[rows >= 0]
            if w < 0 or not len(rows):
                continue
            acts = X[torch.as_tensor(rows), f].float().clamp(min=0).tolist()
            explain.append(Excerpt(tokens(rows), acts))
        texts = lambda ws: ["".join(tokens(split.window_tokens(w))) for w in ws if w >= 0]  # noqa: E731
        out[f] = ([e for e in explain if e.max_act > 0], texts(ex["activating"][f]), texts(ex["non_activating"][f]))
    return out


def detection_score(backend, explanation: str, activating: list[str], non_activating: list[str],
                    batch_size: int = 10, seed: int = 0) -> dict:
    """delphi's detection score of `explanation`: the windows (texts) shuffled together and shown
    `batch_size` at a time to ``backend.detect``; the balanced accuracy of its answers (the mean of the
    true-positive rate on `activating` and the true-negative rate on `non_activating`; chance 0.5).
    Returns {"balanced_accuracy", "tpr", "tnr", "n_activating", "n_non_activating", "said"} (`said`: per
    window, in the order given, activating first, whether the backend named it)."""
    if not activating or not non_activating:
        raise ValueError(f"detection needs activating and non-activating windows; got {len(activating)} and "
                         f"{len(non_activating)}")
    if not hasattr(backend, "detect"):
        raise TypeError(f"{getattr(backend, 'name', backend)!r} has no detect(explanation, texts); use "
                        "OpenAIBackend (an LLM endpoint)")
    texts = list(activating) + list(non_activating)
    order = np.random.default_rng(seed).permutation(len(texts))
    said = np.zeros(len(texts), dtype=bool)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        answer = list(backend.detect(explanation, [texts[i] for i in idx]))
        if len(answer) != len(idx):
            raise AutointerpError(f"{getattr(backend, 'name', backend)} answered for {len(answer)} excerpts "
                                  f"of {len(idx)}")
        said[idx] = np.asarray(answer, dtype=bool)
    k = len(activating)
    tpr, tnr = float(said[:k].mean()), float(1 - said[k:].mean())
    return {"balanced_accuracy": (tpr + tnr) / 2, "tpr": tpr, "tnr": tnr, "n_activating": k,
            "n_non_activating": len(texts) - k, "said": said.tolist()}


@dataclass
class FeatureDetection(Result):
    """One feature's detection result on an LLM endpoint: the explanation, the balanced accuracy (and its
    two rates), the windows shown, and what scoring it cost (requests; prompt and completion tokens, as
    the endpoint reported them or estimated from characters: `tokens`)."""

    feature: int
    explanation: str
    balanced_accuracy: float
    tpr: float
    tnr: float
    n_activating: int
    n_non_activating: int
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: str = "none"


@dataclass
class DetectionScores(Result):
    """Detection scores of some features of one dictionary on an LLM endpoint (`detection_scores`)."""

    name: str
    backend: str
    features: list[FeatureDetection] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return np.array([f.balanced_accuracy for f in self.features], dtype=float)

    @property
    def mean(self) -> float:
        return float(self.scores.mean()) if self.features else float("nan")

    def cost(self) -> dict:
        """Mean requests, prompt and completion tokens per feature, and where the token counts came from."""
        n = max(len(self.features), 1)
        sources = {f.tokens for f in self.features} - {"none"}
        return {"requests": sum(f.requests for f in self.features) / n,
                "prompt_tokens": sum(f.prompt_tokens for f in self.features) / n,
                "completion_tokens": sum(f.completion_tokens for f in self.features) / n,
                "tokens": sources.pop() if len(sources) == 1 else "mixed" if sources else "none"}

    def rows(self) -> list[dict]:
        return [{"dictionary": self.name, "feature": f.feature, "balanced accuracy": f.balanced_accuracy,
                 "TPR": f.tpr, "TNR": f.tnr, "requests": f.requests, "prompt tokens": f.prompt_tokens,
                 "completion tokens": f.completion_tokens, "explanation": f.explanation[:90]}
                for f in self.features]

    def verdicts(self) -> list[str]:
        if not self.features:
            return [f"{self.name}: no feature scored."]
        c = self.cost()
        how = {"endpoint": "as the endpoint reported them", "estimate":
               f"estimated at {CHARS_PER_TOKEN} characters a token (the endpoint reported no usage)",
               "mixed": "partly estimated from characters", "none": "not counted"}[c["tokens"]]
        return [f"{self.name}: mean detection balanced accuracy {self.mean:.3f} over {len(self.features)} features "
                f"({self.backend}; chance 0.5).",
                f"Cost per feature: {c['requests']:.1f} requests, {c['prompt_tokens']:.0f} prompt and "
                f"{c['completion_tokens']:.0f} completion tokens ({how})."]


def detection_scores(backend, features: dict, name: str = "features", explanations: dict | None = None,
                     batch_size: int = 10, seed: int = 0, progress: bool = True) -> DetectionScores:
    """Detection scores of `features` ({feature: (explain, activating, non_activating)}, e.g. from
    `detection_inputs`): each feature explained from its `explain` excerpts (or taken from
    `explanations`, e.g. an `AutointerpScores`' {feature: explanation}), then `detection_score`d. The cost
    of each feature is read from ``backend.usage`` (a `Usage`; OpenAIBackend keeps one) when it has one."""
    explanations = explanations or {}
    out = DetectionScores(name, getattr(backend, "name", type(backend).__name__))
    for f, (explain, activating, non_activating) in tqdm(features.items(), desc=f"detection ({out.backend})",
                                                        unit="feature", disable=not progress):
        usage = getattr(backend, "usage", None)
        before = usage.copy() if isinstance(usage, Usage) else None
        explanation = explanations.get(f) or explain_feature(backend, explain)
        r = detection_score(backend, explanation, activating, non_activating, batch_size, seed=seed + int(f))
        spent = usage.since(before) if before is not None else Usage()
        out.features.append(FeatureDetection(int(f), explanation, r["balanced_accuracy"], r["tpr"], r["tnr"],
                                             r["n_activating"], r["n_non_activating"], spent.requests,
                                             spent.prompt_tokens, spent.completion_tokens, spent.source))
    return out
