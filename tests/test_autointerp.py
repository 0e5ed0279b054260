"""Automated interpretability: prompts, scoring maths, resumable runs, a real HTTP server, the local model."""
import contextlib
import io
import json
import re
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.evals import autointerp
from helpers.evals.autointerp import (AutointerpError, Excerpt, LocalBackend, OpenAIBackend, correlation_score,
                                explain_prompt, load_results, parse_activation_list, score_feature,
                                score_features, simulate_and_score)

EXPLANATION = "apostrophes in contractions and possessives"


def apostrophe_excerpt(*tokens):
    """A synthetic feature that fires (5.0) on every token holding an apostrophe."""
    return Excerpt(list(tokens), [5.0 if "'" in t else 0.0 for t in tokens])


TRAIN = [apostrophe_excerpt("The", " cat", "'s", " toy"), apostrophe_excerpt("I", " don", "'t", " know")]
TEST_TOP = [apostrophe_excerpt("We", " can", "'t", " go"), apostrophe_excerpt("Mary", "'s", " hat", ".")]
TEST_RANDOM = [apostrophe_excerpt("Rain", " fell", " all", " night", "."), apostrophe_excerpt("A", " boat")]


# ------------------------------------------------------------------------------ a scripted server

def completion(content: str) -> dict:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def good_reply(body: dict) -> str:
    """What a competent model answers: the fixed explanation, or 10 for apostrophe tokens, else 0."""
    prompt = body["messages"][-1]["content"]
    match = re.search(r"^Tokens: (\[.*\])$", prompt, flags=re.M)
    if match is None:
        return EXPLANATION
    return json.dumps([10 if "'" in t else 0 for t in json.loads(match.group(1))])


@contextlib.contextmanager
def serve(behaviour):
    """A real HTTP server on 127.0.0.1 whose /v1/chat/completions calls behaviour(n, body).

    behaviour returns a reply text (sent as a chat completion), or (status, payload). Yields the
    base URL and the list of requests received (path, headers, body).
    """
    requests, release = [], threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = len(requests)
            requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            reply = behaviour(n, body, release) if self.path == "/v1/chat/completions" else (404, {"error": "no"})
            status, payload = (200, completion(reply)) if isinstance(reply, str) else reply
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # a client that timed out and left: nothing to report

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def fast(url, **kw):
    return OpenAIBackend(url, api_key="sk-test", model="test-model", timeout=kw.pop("timeout", 2.0),
                         backoff=kw.pop("backoff", 0.01), **kw)


# ------------------------------------------------------------------------------------ HTTP backend

def test_good_server_scores_the_apostrophe_feature_perfectly():
    with serve(lambda n, body, release: good_reply(body)) as (url, requests):
        result = score_feature(fast(url), TRAIN, TEST_TOP, TEST_RANDOM)
    assert result["explanation"] == EXPLANATION
    assert result["score"] == pytest.approx(1.0) and result["score_top"] == pytest.approx(1.0)
    assert result["score_random"] == 0.0  # random text never fires: true activations constant
    assert result["simulated"][0] == [0.0, 0.0, 10.0, 0.0]
    assert result["true"] == [e.acts for e in TEST_TOP + TEST_RANDOM]
    assert len(requests) == 1 + len(TEST_TOP) + len(TEST_RANDOM)  # one explain, one simulate per excerpt
    first = requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test"
    assert first["body"]["model"] == "test-model" and first["body"]["temperature"] == 0
    assert "'s (10)" in first["body"]["messages"][-1]["content"]  # the explainer saw the marked tokens


def test_api_key_comes_from_autointerp_key_for_autointerp_url_only(monkeypatch):
    monkeypatch.delenv("AUTOINTERP_KEY", raising=False)
    monkeypatch.delenv("AUTOINTERP_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")  # a key for another service: never sent
    with serve(lambda n, body, release: good_reply(body)) as (url, requests):
        OpenAIBackend(url).explain("x")
        monkeypatch.setenv("AUTOINTERP_KEY", "sk-env")
        monkeypatch.setenv("AUTOINTERP_URL", url + "/")
        OpenAIBackend(url).explain("x")  # the endpoint AUTOINTERP_KEY is for
        monkeypatch.setenv("AUTOINTERP_URL", "https://api.example.com/v1")
        OpenAIBackend(url).explain("x")  # another endpoint
        OpenAIBackend(url, api_key="sk-given").explain("x")
        OpenAIBackend(url, api_key="").explain("x")
    keys = [r["headers"].get("Authorization") for r in requests]
    assert keys == [None, "Bearer sk-env", None, "Bearer sk-given", None]


@pytest.mark.parametrize("bad", ["I think the activations are low.", "[1, 2]", '["a", "b", "c", "d"]', "[1, 2,"])
def test_malformed_output_is_retried_until_good(bad):
    def behaviour(n, body, release):
        return bad if n < 2 else good_reply(body)

    with serve(behaviour) as (url, requests):
        sim = fast(url, retries=3).simulate(EXPLANATION, TEST_TOP[0])
    assert sim == [0.0, 0.0, 10.0, 0.0]
    assert len(requests) == 3


def test_always_malformed_output_fails_after_the_retries():
    with serve(lambda n, body, release: "no numbers here") as (url, requests):
        with pytest.raises(AutointerpError, match=r"3 attempt") as err:
            fast(url, retries=2).simulate(EXPLANATION, TEST_TOP[0])
    assert len(requests) == 3
    assert url in str(err.value) and "malformed" in str(err.value) and "stronger model" in str(err.value)


def test_a_slow_server_times_out_with_advice_to_raise_the_timeout():
    def behaviour(n, body, release):
        release.wait(3.0)
        return good_reply(body)

    with serve(behaviour) as (url, requests):
        start = time.monotonic()
        with pytest.raises(AutointerpError, match=r"timeout") as err:
            fast(url, timeout=0.3, retries=1).explain("x")
        elapsed = time.monotonic() - start
    assert len(requests) == 2
    assert elapsed < 2.0  # two 0.3 s timeouts, not the server's 3 s
    assert "raise timeout" in str(err.value) and "2 attempt" in str(err.value)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_and_rate_limits_are_retried(status):
    def behaviour(n, body, release):
        return (status, {"error": {"message": "busy"}}) if n == 0 else good_reply(body)

    with serve(behaviour) as (url, requests):
        assert fast(url, retries=3).explain("x") == EXPLANATION
    assert len(requests) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_fails_at_once(status):
    with serve(lambda n, body, release: (status, {"error": {"message": "bad key"}})) as (url, requests):
        with pytest.raises(AutointerpError, match="API key") as err:
            fast(url, retries=3).explain("x")
    assert len(requests) == 1
    assert "AUTOINTERP_KEY" in str(err.value) and url in str(err.value)


def test_a_wrong_path_fails_at_once_naming_base_url():
    with serve(lambda n, body, release: good_reply(body)) as (url, requests):
        with pytest.raises(AutointerpError, match="HTTP 404.*base_url"):
            fast(url.removesuffix("/v1"), retries=3).explain("x")  # forgot the /v1
    assert len(requests) == 1


def test_an_unreachable_server_fails_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(AutointerpError, match="cannot connect") as err:
        fast(url, retries=2).explain("x")
    assert f"127.0.0.1:{port}" in str(err.value) and "3 attempt" in str(err.value)
    assert "check base_url" in str(err.value)


def test_backoff_doubles_between_attempts(monkeypatch):
    sleeps = []
    monkeypatch.setattr(autointerp.time, "sleep", sleeps.append)
    with serve(lambda n, body, release: "nonsense") as (url, requests):
        with pytest.raises(AutointerpError):
            fast(url, retries=3, backoff=0.5).simulate(EXPLANATION, TEST_TOP[0])
    assert sleeps == [0.5, 1.0, 2.0] and len(requests) == 4


@pytest.mark.parametrize("url", ["http://example.com/v1", "http://10.0.0.5:8000/v1", "http://127.0.0.1.example.com/v1"])
def test_a_key_is_refused_over_plain_http_to_another_machine(url, monkeypatch):
    with pytest.raises(ValueError, match=re.escape(f"refusing to send an API key over plain http to {url}") +
                       ".*https://.*api_key=''"):
        OpenAIBackend(url, api_key="sk-test")
    monkeypatch.setenv("AUTOINTERP_URL", url)
    monkeypatch.setenv("AUTOINTERP_KEY", "sk-env")
    with pytest.raises(ValueError, match="plain http"):
        OpenAIBackend(url)
    assert OpenAIBackend(url, api_key="").api_key is None  # no key: a plain http server is fine
    for ok in ("https://example.com/v1", "http://localhost:8000/v1", "http://127.0.0.1:8000/v1",
               "http://[::1]:8000/v1"):
        assert OpenAIBackend(ok, api_key="sk-test").api_key == "sk-test"


@contextlib.contextmanager
def redirecting(to):
    """A server on 127.0.0.1 that records every request (method, path, headers) and answers it with
    a chat completion, or, for paths in `to` (path -> URL, or a function of the server's base URL), a
    302 redirect there. Yields (base URL, requests)."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a stalled client cannot hold the server

        def answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
            target = to.get(self.path)
            if target is not None:
                self.send_response(302)
                self.send_header("Location", target(base) if callable(target) else target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = json.dumps(completion(EXPLANATION)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield base, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_redirect_to_another_host_never_gets_the_key():
    with redirecting({}) as (other, elsewhere):
        with redirecting({"/v1/chat/completions": other + "/v1/chat/completions"}) as (base, here):
            with pytest.raises(AutointerpError, match=re.escape(f"{base}/v1/chat/completions redirected (HTTP 302) "
                                                                f"to {other}/v1/chat/completions, another address")):
                fast(base + "/v1", retries=3).explain("x")
            assert len(here) == 1 and here[0]["headers"]["Authorization"] == "Bearer sk-test"
            # without a key there is nothing to protect: the redirect is followed
            assert OpenAIBackend(base + "/v1", api_key="").explain("x") == EXPLANATION
    assert [r["headers"].get("Authorization") for r in elsewhere] == [None]  # only the keyless request arrived


def test_a_redirect_on_the_same_host_keeps_the_key():
    with redirecting({"/v1/chat/completions": lambda base: base + "/moved/chat/completions"}) as (base, requests):
        assert fast(base + "/v1").explain("x") == EXPLANATION
    assert [r["path"] for r in requests] == ["/v1/chat/completions", "/moved/chat/completions"]
    assert all(r["headers"]["Authorization"] == "Bearer sk-test" for r in requests)


def test_a_redirect_to_another_scheme_or_port_is_refused_with_a_key():
    handler = autointerp._SameOriginRedirects()
    for target in ("https://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8001/v1/chat/completions",
                   "http://localhost:8000/v1/chat/completions"):
        req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", data=b"{}", method="POST",
                                     headers={"Authorization": "Bearer sk-test"})
        with pytest.raises(AutointerpError, match="another address"):
            handler.redirect_request(req, io.BytesIO(), 302, "Found", {}, target)


def test_replies_in_code_fences_are_parsed_and_clipped():
    reply = "Sure! Here you go:\n```json\n[12, -3, 4.5, 0]\n```\nHope this helps."
    with serve(lambda n, body, release: reply) as (url, requests):
        assert fast(url).simulate(EXPLANATION, TEST_TOP[0]) == [10.0, 0.0, 4.5, 0.0]


def test_parse_activation_list_says_what_is_wrong():
    assert parse_activation_list("[0, 1] then [1, 2, 3]", 3) == [1.0, 2.0, 3.0]  # the list of the right length
    with pytest.raises(ValueError, match="2 numbers for 3 tokens"):
        parse_activation_list("[1, 2]", 3)
    with pytest.raises(ValueError, match="no JSON list"):
        parse_activation_list("none", 3)
    with pytest.raises(ValueError, match="non-numbers"):
        parse_activation_list("[1, true, 2]", 3)


def test_base_url_must_be_http_and_names_are_file_safe():
    with pytest.raises(ValueError, match="http://"):
        OpenAIBackend("api.openai.com/v1")
    assert OpenAIBackend("http://localhost:8000/v1", model="meta-llama/Llama-3:70b").name == \
        "openai-meta-llama_Llama-3_70b"


# ------------------------------------------------------------------------------------- scoring maths

class Scripted:
    """A backend that simulates with a given function of the excerpt, counting its calls."""

    name = "scripted"

    def __init__(self, simulate=lambda e: e.acts):
        self.fn, self.explains, self.simulates = simulate, 0, 0

    def explain(self, prompt):
        self.explains += 1
        return "scripted explanation"

    def simulate(self, explanation, excerpt):
        self.simulates += 1
        return self.fn(excerpt)


def test_perfect_constant_and_anticorrelated_simulations():
    held_out = TEST_TOP + TEST_RANDOM
    assert simulate_and_score(Scripted(), "x", held_out)["score"] == pytest.approx(1.0)
    assert simulate_and_score(Scripted(lambda e: [2 * a + 1 for a in e.acts]), "x", held_out)["score"] == \
        pytest.approx(1.0)  # correlation ignores scale and offset
    constant = simulate_and_score(Scripted(lambda e: [3.0] * len(e.acts)), "x", held_out)["score"]
    assert constant == 0.0
    anti = simulate_and_score(Scripted(lambda e: [10 - a for a in e.acts]), "x", held_out)["score"]
    assert anti == pytest.approx(-1.0)
    noisy = simulate_and_score(Scripted(lambda e: [a + (i % 2) * 3 for i, a in enumerate(e.acts)]), "x", held_out)
    assert 0 < noisy["score"] < 1


def test_correlation_is_over_all_tokens_at_once():
    # each excerpt alone is perfectly predicted up to an offset, but the offsets differ between
    # excerpts, so the all-at-once correlation is below 1
    held_out = [Excerpt(["a", "b"], [0, 1]), Excerpt(["c", "d"], [0, 1])]
    result = simulate_and_score(Scripted(lambda e: [a + (5.0 if e.tokens[0] == "c" else 0.0) for a in e.acts]),
                                "x", held_out)
    flat_sim = [0, 1, 5, 6]
    assert result["score"] == pytest.approx(correlation_score(flat_sim, [0, 1, 0, 1])) and result["score"] < 0.5
    assert correlation_score([1, 1, 1], [0, 0, 0]) == 0.0 and correlation_score([1], [2]) == 0.0


def test_a_simulation_of_the_wrong_length_is_an_error():
    with pytest.raises(AutointerpError, match="3 activations for an excerpt of 4 tokens"):
        simulate_and_score(Scripted(lambda e: [0.0, 1.0, 2.0]), "x", TEST_TOP)


def test_explain_prompt_normalises_and_keeps_the_strongest():
    weak = Excerpt(["x", "y"], [0.0, 0.4])
    strong = Excerpt(["The", " cat", "'s"], [0.0, 2.5, 5.0])
    mid = Excerpt(["I", " don", "'t"], [0.0, 0.2, 4.0])
    prompt = explain_prompt([weak, strong, mid], max_excerpts=2)
    assert "Excerpt 1: The cat's" in prompt and "Excerpt 2: I don't" in prompt
    assert "Fires on: cat (5), 's (10)" in prompt and "Fires on: 't (8)" in prompt
    assert "x" not in prompt.split("Excerpt 1")[1].split("Excerpt 2")[0].replace("Excerpt", "")
    assert "Excerpt 3" not in prompt and "don (" not in prompt  # 0.2/5 rounds to 0: not listed
    with pytest.raises(ValueError, match="all activations are 0"):
        explain_prompt([Excerpt(["a"], [0.0])])


def test_excerpt_checks_its_inputs():
    with pytest.raises(ValueError, match="2 tokens and 1 activations"):
        Excerpt(["a", "b"], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        Excerpt(["a"], [-1.0])


# --------------------------------------------------------------------------------- resumable runs

def features_with_a_bomb():
    bomb = apostrophe_excerpt("BOOM", "'s")
    return {1: (TRAIN, TEST_TOP, TEST_RANDOM), 2: (TRAIN, [bomb], TEST_RANDOM), 3: (TRAIN, TEST_TOP, TEST_RANDOM)}


class Flaky(Scripted):
    def __init__(self):
        super().__init__()
        self.fail = True

    def simulate(self, explanation, excerpt):
        if self.fail and excerpt.tokens[0] == "BOOM":
            raise AutointerpError("the simulator is down")
        return super().simulate(explanation, excerpt)


def test_a_failed_run_keeps_its_results_and_resumes(tmp_path):
    path = tmp_path / "scores" / "autointerp.jsonl"
    backend, features = Flaky(), features_with_a_bomb()
    with pytest.raises(AutointerpError, match="simulator is down") as err:
        score_features(backend, features, results_path=path, progress=False)
    assert any(str(path) in note for note in err.value.__notes__)
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["feature"] for r in saved] == [1] and saved[0]["score"] == pytest.approx(1.0)
    assert saved[0]["backend"] == "scripted" and saved[0]["explanation"] == "scripted explanation"

    backend.fail, backend.explains = False, 0
    results = score_features(backend, features, results_path=path, progress=True)
    assert backend.explains == 2  # features 2 and 3 only
    assert sorted(results) == [1, 2, 3] and all(r["score"] == pytest.approx(1.0) for r in results.values())
    assert [json.loads(line)["feature"] for line in path.read_text().splitlines()] == [1, 2, 3]

    backend.explains = backend.simulates = 0
    again = score_features(backend, features, results_path=path, progress=False)
    assert backend.explains == backend.simulates == 0 and again == results


def test_a_torn_last_line_is_dropped_and_rescored(tmp_path):
    path = tmp_path / "autointerp.jsonl"
    score_features(Scripted(), {1: features_with_a_bomb()[1]}, results_path=path, progress=False)
    with open(path, "a") as f:
        f.write('{"feature": 2, "backend": "scripted", "sco')  # killed mid-write
    assert sorted(load_results(path)) == [1]
    backend = Scripted()
    results = score_features(backend, features_with_a_bomb(), results_path=path, progress=False)
    assert backend.explains == 2 and sorted(results) == [1, 2, 3]
    assert [json.loads(line)["feature"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_results_from_another_backend_are_not_mixed(tmp_path):
    path = tmp_path / "autointerp.jsonl"
    score_features(Scripted(), {1: features_with_a_bomb()[1]}, results_path=path, progress=False)
    other = Scripted()
    other.name = "openai-gpt-4o-mini"
    with pytest.raises(ValueError, match="another results_path"):
        score_features(other, features_with_a_bomb(), results_path=path, progress=False)


def test_without_a_results_path_everything_is_scored():
    backend = Scripted()
    results = score_features(backend, features_with_a_bomb(), progress=False)
    assert sorted(results) == [1, 2, 3] and backend.explains == 3


# ------------------------------------------------------------------------------------- local model

@pytest.fixture(scope="module")
def local(model):
    return LocalBackend(model, max_new_tokens=8)


def test_local_simulation_reads_one_digit_slot_per_token(local):
    tokens = [local.tokenizer.decode([i]) for i in local.tokenizer.encode("We can't go,\nit's late.",
                                                                            add_special_tokens=False)]
    excerpt = apostrophe_excerpt(*tokens)
    assert local.max_digit == 9 and len(local.digit_ids) == 10  # SmolLM2 splits "10" into "1", "0"
    assert local.name == "local-smollm2-135m-instruct"
    text, slots = local._simulation_text(EXPLANATION, tokens)
    assert [text[s] for s in slots] == ["0"] * len(tokens) and text.count("\\n") >= 1  # newline escaped
    sim = local.simulate(EXPLANATION, excerpt)
    assert len(sim) == len(tokens) and all(isinstance(v, float) and 0.0 <= v <= 10.0 for v in sim)
    assert max(sim) - min(sim) > 0.1  # it reads the model, not a constant


def test_local_explanation_is_a_nonempty_line(local):
    explanation = local.explain(explain_prompt(TRAIN[:1]))
    assert isinstance(explanation, str) and explanation and "\n" not in explanation
    assert not re.fullmatch(r"The-*", explanation)  # the degenerate output of the bridge's KV cache


def test_local_explanation_with_the_cache_is_the_one_without(model):
    """Greedy generation with the key-value cache writes the words that full forward passes write (without
    `kv_cache_fix` the bridge's cache stays empty and cached steps attend to themselves alone)."""
    prompt = explain_prompt(TRAIN[:2])
    cached, full = LocalBackend(model, max_new_tokens=16), LocalBackend(model, max_new_tokens=16, use_cache=False)
    calls = []  # the two backends share the model: its generate sees the cached call, then the full one
    generate = cached.hf.generate
    cached.hf.generate = lambda *a, **kw: calls.append(kw["use_cache"]) or generate(*a, **kw)
    try:
        assert cached.explain(prompt) == full.explain(prompt)
    finally:
        del cached.hf.generate
    assert calls == [True, False]


def test_local_simulations_of_one_explanation_share_their_prompt_start(model):
    """With the cache, the simulations of one feature's excerpts run the prompt's shared start (instructions,
    example, explanation) once and give what full passes give; another explanation starts afresh."""
    cached, full = LocalBackend(model), LocalBackend(model, use_cache=False)
    excerpts = [apostrophe_excerpt(*[cached.tokenizer.decode([i]) for i in cached.tokenizer.encode(
        text, add_special_tokens=False)]) for text in ("We can't go,\nit's late.", "Don't stop.")]
    fed = []  # tokens the model is given, per call
    handle = cached.hf.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    try:
        runs = {}
        for name, backend in (("cached", cached), ("full", full)):
            fed.clear()
            runs[name] = [backend.simulate(e, x) for e in (EXPLANATION, "the letter s") for x in excerpts]
            runs[name + " tokens"] = list(fed)
    finally:
        handle.remove()
    for a, b in zip(runs["cached"], runs["full"]):
        assert a == pytest.approx(b, abs=1e-4)
    full_tokens, cached_tokens = runs["full tokens"], runs["cached tokens"]
    # the first prompt up to its first value slot, then the rest of each prompt alone
    assert len(full_tokens) == 4 and len(cached_tokens) == 5, (cached_tokens, full_tokens)
    assert cached_tokens[0] + cached_tokens[1] == full_tokens[0]
    assert sum(cached_tokens) < 0.5 * sum(full_tokens), (cached_tokens, full_tokens)


def test_local_backend_falls_back_to_the_embedded_chat_model(monkeypatch):
    """Notebook 03 without AUTOINTERP_URL built the local explainer from the profile's model; a base model
    such as Pythia has no chat template, so it raised. It now explains with the embedded SmolLM2."""
    from types import SimpleNamespace

    from helpers.evals import autointerp

    built, loaded = [], []
    monkeypatch.setattr(autointerp, "LocalBackend", lambda model: built.append(model) or model)
    monkeypatch.setattr(autointerp, "load_model", lambda name, device="auto": loaded.append(name) or name)
    base = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None))
    chat = SimpleNamespace(tokenizer=SimpleNamespace(chat_template="{{ messages }}"))
    assert autointerp.local_backend(base) == "smollm2-135m-instruct" and loaded == ["smollm2-135m-instruct"]
    assert autointerp.local_backend(chat) is chat and loaded == ["smollm2-135m-instruct"]


def test_autointerp_scores_is_typed_and_resumes_from_a_file_named_by_its_excerpts(tmp_path):
    from helpers.evals.autointerp import AutointerpScores, autointerp_scores

    backend = Scripted()
    features = {1: features_with_a_bomb()[1], 3: features_with_a_bomb()[3]}
    res = autointerp_scores(backend, features, name="SAE features", cache_dir=tmp_path, progress=False)
    assert isinstance(res, AutointerpScores) and [f.feature for f in res.features] == [1, 3]
    assert res.mean == pytest.approx(1.0) and "+1.000 over 2 features" in res.verdicts()[0]
    assert AutointerpScores.from_dict(res.to_dict()) == res
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1 and files[0].name.startswith("scripted-SAE_features-")
    backend.explains = 0
    assert autointerp_scores(backend, features, name="SAE features", cache_dir=tmp_path, progress=False) == res
    assert backend.explains == 0                                    # loaded, not scored again
    autointerp_scores(backend, {2: features_with_a_bomb()[2]}, name="SAE features", cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2                  # other excerpts: a file of their own
    assert autointerp_scores(backend, {}, name="none", progress=False).verdicts() == ["none: no feature scored."]


# ------------------------------------------------------------------------------------- detection

class Detector:
    """A fake LLM for the detection scorer: `answer(explanation, text)` says whether a text holds the
    feature; explains with a fixed phrase. Counts its calls."""

    name = "fake-detector"

    def __init__(self, answer):
        self.answer, self.batches = answer, []

    def explain(self, prompt):
        return "the word w7"

    def detect(self, explanation, texts):
        self.batches.append(list(texts))
        return [self.answer(explanation, t) for t in texts]


def token_split(seed=0, n_ctx=200, ctx_len=16, vocab=40):
    """A ProtocolSplit over random tokens (labels: one concept per token id, windows of 8 tokens) and codes
    whose feature 0 fires on token 7 only and feature 1 on token 3 only."""
    import numpy as np
    import torch

    from helpers.evals.protocols import ProtocolSplit

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=n_ctx * ctx_len)
    contexts = np.repeat(np.arange(n_ctx), ctx_len)
    labels = np.eye(vocab, dtype=bool)[ids]
    codes = torch.zeros(len(ids), 2)
    codes[:, 0] = torch.from_numpy((ids == 7) * rng.uniform(1, 5, len(ids))).float()
    codes[:, 1] = torch.from_numpy((ids == 3) * rng.uniform(1, 5, len(ids))).float()
    return ProtocolSplit(labels, contexts, window=8, n_boot=10), codes, ids


class Words:
    """A tokenizer whose token i decodes to " w<i>"."""

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def test_detection_inputs_are_the_protocols_windows():
    import numpy as np

    from helpers.evals.autointerp import detection_inputs

    split, codes, ids = token_split()
    inputs = detection_inputs(split, codes, ids, Words(), [0, 1])
    windows = split.excerpts(codes)
    for f, word in ((0, " w7"), (1, " w3")):
        explain, activating, non_activating = inputs[f]
        act = windows["activating"][f]
        assert len(activating) == int((act >= 0).sum()) > 10 and len(non_activating) == 50
        assert activating[0] == "".join(f" w{ids[t]}" for t in split.window_tokens(act[0]) if t >= 0)
        assert all(word in t.split(" ") or word.strip() in t.split() for t in activating)
        assert not any(word.strip() in t.split() for t in non_activating)
        assert explain and all(e.max_act > 0 for e in explain)
        assert all(a > 0 for e in explain for tok, a in zip(e.tokens, e.acts) if tok == word)
    assert np.array_equal(split.excerpts(codes)["activating"], windows["activating"])  # seeded: the same sample


def test_a_perfect_detector_scores_one_and_a_coin_a_half():
    import random

    from helpers.evals.autointerp import DetectionScores, detection_inputs, detection_scores

    split, codes, ids = token_split()
    inputs = detection_inputs(split, codes, ids, Words(), [0, 1])
    perfect = Detector(lambda explanation, text: explanation.split()[-1] in text.split())
    res = detection_scores(perfect, {0: inputs[0]}, name="SAE", progress=False)
    assert isinstance(res, DetectionScores) and res.features[0].balanced_accuracy == 1.0
    assert res.features[0].tpr == 1.0 and res.features[0].tnr == 1.0
    n = res.features[0].n_activating + res.features[0].n_non_activating
    assert [len(b) for b in perfect.batches] == [10] * (n // 10) + ([n % 10] if n % 10 else [])
    assert {t for b in perfect.batches for t in b} == set(inputs[0][1]) | set(inputs[0][2])
    first = perfect.batches[0]
    assert not all(t in inputs[0][1] for t in first)  # shuffled: activating and not mixed in a batch
    # the explanation for feature 1 names w3; an explanation naming w7 would score it at chance or below
    res = detection_scores(perfect, {1: inputs[1]}, explanations={1: "the word w3"}, progress=False)
    assert res.mean == 1.0
    assert DetectionScores.from_dict(res.to_dict()) == res and "mean detection balanced accuracy 1.000" in \
        res.verdicts()[0]
    rng = random.Random(0)
    coin = Detector(lambda explanation, text: rng.random() < 0.5)
    many = {f: (inputs[0][0], inputs[0][1] * 10, inputs[0][2] * 10) for f in range(10)}
    res = detection_scores(coin, many, progress=False)
    assert abs(res.mean - 0.5) < 0.05 and res.scores.std() > 0
    assert res.verdicts()[1].endswith("(not counted).")  # a fake without usage counts no cost


def test_detection_on_the_endpoint_counts_its_cost():
    from helpers.evals.autointerp import detection_scores

    def reply(n, body, release, usage=True):
        prompt = body["messages"][-1]["content"]
        if "Excerpts:" not in prompt:
            content = "the word w7"
        else:
            lines = re.findall(r"^(\d+)\. (.*)$", prompt, flags=re.M)
            content = json.dumps([int(i) for i, text in lines if "w7" in text.split()])
        payload = completion(content)
        if usage:
            payload["usage"] = {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}
        return 200, payload

    activating = [" w1 w7 w2", " w7", " w5 w7"]
    non_activating = [" w1 w2", " w3", " w4 w5", " w6"]
    with serve(reply) as (url, requests):
        res = detection_scores(fast(url), {0: (TRAIN, activating, non_activating)}, batch_size=3, progress=False)
    f = res.features[0]
    assert f.balanced_accuracy == 1.0 and f.explanation == "the word w7"
    assert len(requests) == 1 + 3 and f.requests == 4                     # one explain, 7 windows in batches of 3
    assert (f.prompt_tokens, f.completion_tokens, f.tokens) == (400, 28, "endpoint")
    assert "as the endpoint reported them" in res.verdicts()[1] and "4.0 requests" in res.verdicts()[1]
    with serve(lambda *a: reply(*a, usage=False)) as (url, requests):
        backend = fast(url)
        res = detection_scores(backend, {0: (TRAIN, activating, non_activating)}, batch_size=3, progress=False)
    f = res.features[0]
    chars = sum(len(m["content"]) for r in requests for m in r["body"]["messages"])
    assert f.tokens == "estimate" and f.prompt_tokens >= chars // 4 and f.completion_tokens > 0
    assert "estimated at 4 characters a token" in res.verdicts()[1]


def test_parse_detection_says_what_is_wrong():
    from helpers.evals.autointerp import detection_prompt, parse_detection

    assert parse_detection("Sure:\n```json\n[1, 3]\n```", 3) == [True, False, True]
    assert parse_detection("[]", 2) == [False, False]
    with pytest.raises(ValueError, match="outside 1 to 2"):
        parse_detection("[0, 3]", 2)
    with pytest.raises(ValueError, match="no JSON list"):
        parse_detection("none of them", 2)
    prompt = detection_prompt("apostrophes", ["It's\nhere", "no"])
    assert "1. It's\\nhere" in prompt and "2. no" in prompt and "(1 to 2)" in prompt
