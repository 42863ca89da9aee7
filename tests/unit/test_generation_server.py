"""The text generation server's HTTP layer (moecore/inference/server.py) against a fake engine.

A real server on an ephemeral port in a thread, a real HTTP client (urllib). The fake engine
"generates" by a fixed rule (each token is the previous one + 1 in a character vocabulary) and
fails if ``generate`` is ever entered by two threads at once.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from moecore.inference import server as server_module
from moecore.inference.server import QUEUE_KEY, create_app, make_http_server

ALPHABET = "abcdefghijklmnopqrstuvwxyz. "  # ids 0..27; EOD is 28


class CharTokenizer:
    vocab_size = len(ALPHABET) + 1
    eod = len(ALPHABET)

    def tokenize(self, text: str) -> list[int]:
        bad = [c for c in text if c not in ALPHABET]
        if bad:
            raise ValueError(f"character {bad[0]!r} is not in the vocab")
        return [ALPHABET.index(c) for c in text]

    def detokenize(self, ids) -> str:
        return "".join(ALPHABET[i] for i in ids if i != self.eod)


@dataclass(frozen=True)
class Params:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = False
    seed: int | None = None

    def __post_init__(self):
        if self.top_k > 0 and self.top_p < 1.0:
            raise ValueError("top_k and top_p cannot both be set")


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float] | None
    finish_reason: str


class FakeEngine:
    max_sequence_length = 24

    def __init__(self):
        self.tokenizer = CharTokenizer()
        self.calls: list[tuple[int, Params]] = []
        self.gate: threading.Event | None = None
        self._busy = threading.Lock()

    def generate(self, prompts, params):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("generate re-entered")
        try:
            self.calls.append((len(prompts), params))
            if self.gate is not None:
                assert self.gate.wait(10)
            time.sleep(0.01)
            return [self._one(p, params) for p in prompts]
        finally:
            self._busy.release()

    def _one(self, prompt, params):
        if prompt[:4] == self.tokenizer.tokenize("boom"):
            raise RuntimeError("engine exploded")
        tokens, t = [], prompt[-1]
        for _ in range(params.max_new_tokens):
            t = (t + 1) % self.tokenizer.vocab_size
            tokens.append(t)
            if t in params.stop_token_ids:
                break
        finish = "stop" if tokens[-1] in params.stop_token_ids else "length"
        logprobs = [-0.5 * (i + 1) for i in range(len(tokens))] if params.return_logprobs else None
        return Completion(list(prompt), tokens, logprobs, finish)


@contextmanager
def running(engine, **kw):
    app = create_app(engine, "tiny", sampling_params=Params, **kw)
    http = make_http_server(app, "127.0.0.1", 0)
    # a short poll interval: shutdown() waits for it
    thread = threading.Thread(target=http.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.port}", app
    finally:
        http.shutdown()
        http.server_close()
        app.extensions[QUEUE_KEY].close()


@pytest.fixture
def served():
    engine = FakeEngine()
    with running(engine, max_batch_size=8) as (url, app):
        yield url, engine, app


def call(url, method, path, body=None, raw=None):
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_answers_in_megatron_shape(served):
    url, engine, _ = served
    status, out = call(url, "PUT", "/api", {"prompts": ["abc", "xy"], "tokens_to_generate": 3,
                                            "logprobs": True, "top_p": 0.0, "random_seed": 7})
    assert status == 200, out
    assert out["text"] == ["abcdef", "xyz. "]
    assert out["tokens"] == [[0, 1, 2, 3, 4, 5], [23, 24, 25, 26, 27]]
    assert out["segments"][0] == list("abcdef")
    assert out["logprobs"] == [[-0.5, -1.0, -1.5], [-0.5, -1.0, -1.5]]
    assert engine.calls == [(2, Params(max_new_tokens=3, stop_token_ids=(28,),
                                       return_logprobs=True, top_p=1.0, seed=7))]
    status, out = call(url, "PUT", "/api", {"prompts": ["y", ""], "tokens_to_generate": 4,
                                            "add_BOS": True})
    assert status == 200, out
    # "y" -> z . ' ' EOD: stops at EOD, which stays in tokens but has no text
    assert out["text"] == ["yz. ", "abcd"] and out["tokens"][0] == [28, 24, 25, 26, 27, 28]
    assert "logprobs" not in out


def test_completions_answer_in_openai_shape(served):
    url, engine, _ = served
    status, out = call(url, "POST", "/v1/completions", {
        "model": "tiny", "prompt": ["abc", "wx"], "max_tokens": 5, "n": 2, "stop": ["f", ". "],
        "logprobs": 0, "temperature": 0.0, "seed": 3, "presence_penalty": 0, "user": "u1"})
    assert status == 200, out
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert out["model"] == "tiny" and isinstance(out["created"], int)
    texts = [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]]
    assert texts == [(0, "de", "stop"), (1, "de", "stop"), (2, "yz", "stop"), (3, "yz", "stop")]
    assert out["choices"][0]["logprobs"] == {"tokens": ["d", "e"], "token_logprobs": [-0.5, -1.0],
                                             "top_logprobs": None, "text_offset": [0, 1]}
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    # 'f' is one token, so the engine stops at it too; ". " is two, cut from the text only
    assert engine.calls[0][0] == 4
    assert engine.calls[0][1].stop_token_ids == (28, 5) and engine.calls[0][1].seed == 3
    status, out = call(url, "POST", "/completions", {"prompt": [[0, 1], [23]], "max_tokens": 2,
                                                     "echo": True})
    assert status == 200, out
    assert [c["text"] for c in out["choices"]] == ["abcd", "xyz"]
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    assert out["choices"][0]["logprobs"] is None
    status, out = call(url, "GET", "/v1/models")
    assert status == 200 and out["data"][0]["id"] == "tiny"


TOO_LONG = "abcdefghijklmnopqrstuvwxyz" * 2
BAD_REQUESTS = [
    # (method, path, body or raw bytes, status, words the message must hold)
    ("PUT", "/api", b'{"prompts": ["ab"', 400, "not valid JSON"),
    ("POST", "/v1/completions", b"prompt=abc", 400, "not valid JSON"),
    ("PUT", "/api", ["ab"], 400, "must be a JSON object"),
    ("PUT", "/api", b'{"prompts": ["' + b"a" * 17 * 2**20 + b'"]}', 413, "Too Large"),
    ("PUT", "/api", {"prompts": ["ab"], "max_tokens": 3}, 400, "unknown field 'max_tokens'"),
    ("POST", "/v1/completions", {"prompt": "ab", "tokens": 3}, 400, "unknown field 'tokens'"),
    ("PUT", "/api", {"prompts": ["ab"], "beam_width": 2}, 400, "'beam_width': beam search"),
    ("PUT", "/api", {"prompts": [TOO_LONG], "tokens_to_generate": 2}, 400,
     "prompts[0] has 52 tokens"),
    ("PUT", "/api", {"prompts": ["abc"], "tokens_to_generate": 22}, 400,
     "max sequence length 24"),
    ("POST", "/v1/completions", {"prompt": "abc", "max_tokens": 30}, 400, "lower max_tokens"),
    ("GET", "/api", None, 405, "Method Not Allowed"),
    ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ("POST", "/nowhere", {}, 404, "Not Found"),
    ("PUT", "/api", {}, 400, "'prompts' is required"),
    ("PUT", "/api", {"prompts": "abc"}, 400, "list of strings"),
    ("PUT", "/api", {"prompts": ["a"] * 9}, 400, "1 to 8 prompts"),
    ("PUT", "/api", {"prompts": [""]}, 400, "add_BOS"),
    ("PUT", "/api", {"prompts": ["AB"]}, 400, "prompts[0] cannot be tokenized"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 0}, 400, "tokens_to_generate=0"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 2.5}, 400, "must be an integer"),
    ("PUT", "/api", {"prompts": ["a"], "temperature": -1}, 400, "'temperature' must be in"),
    ("PUT", "/api", {"prompts": ["a"], "top_k": True}, 400, "'top_k' must be an integer"),
    ("PUT", "/api", {"prompts": ["a"], "logprobs": "yes"}, 400, "'logprobs' must be true"),
    ("PUT", "/api", {"prompts": ["a"], "top_k": 2, "top_p": 0.5, "tokens_to_generate": 1}, 400,
     "cannot both be set"),
    ("POST", "/v1/completions", {"prompt": "a", "stream": True}, 400, "stream=true"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 9}, 400, "'n' must be between 1 and 8"),
    ("POST", "/v1/completions", {"prompt": ["a"] * 3, "n": 3}, 400, "3 prompts x n=3"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs > 0"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 0, "echo": True}, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "serves 'tiny'"),
    ("POST", "/v1/completions", {"prompt": [[0, 99]]}, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "'prompt' is required"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": ["a"] * 5}, 400, "'stop' must be"),
    ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "'top_p' must be in (0"),
    ("POST", "/v1/completions", {"prompt": "a", "frequency_penalty": 1}, 400,
     "'frequency_penalty': not supported"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS,
                         ids=[f"{i}-{b[4][:20]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_4xx_naming_the_problem(served, method, path, body, status, words):
    url, engine, _ = served
    raw = body if isinstance(body, bytes) else None
    got, out = call(url, method, path, None if raw else body, raw)
    assert got == status, out
    assert words in out["error"]["message"], out
    assert engine.calls == []
    assert call(url, "PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 1})[0] == 200


def test_engine_failure_is_a_500_and_the_server_stays_up(served):
    url, _, _ = served
    status, out = call(url, "PUT", "/api", {"prompts": ["boom"], "tokens_to_generate": 1})
    assert status == 500 and "engine exploded" in out["error"]["message"]
    assert out["error"]["type"] == "server_error"
    status, out = call(url, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})
    assert status == 200 and out["choices"][0]["text"] == "cd"


def _request(url, i):
    prompt = ALPHABET[i % 20]
    if i % 2:
        status, out = call(url, "PUT", "/api", {"prompts": [prompt], "tokens_to_generate": 3})
        return status, out["text"][0] if status == 200 else out
    status, out = call(url, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 3,
                                                        "echo": True})
    return status, out["choices"][0]["text"] if status == 200 else out


def test_concurrent_requests_never_reenter_the_engine(served):
    url, engine, _ = served
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _request(url, i), range(24)))
    assert answers == [(200, ALPHABET[i % 20:i % 20 + 4]) for i in range(24)]
    assert sum(n for n, _ in engine.calls) == 24


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_waiting_requests_with_equal_params_share_one_engine_call():
    engine = FakeEngine()
    engine.gate = threading.Event()
    with running(engine, max_batch_size=8) as (url, app), ThreadPoolExecutor(11) as pool:
        first = pool.submit(_request, url, 1)
        _wait_for(lambda: engine.calls)  # the engine holds the first request at the gate
        queue = app.extensions[QUEUE_KEY]
        same = [pool.submit(_request, url, i) for i in (3, 5, 7, 9, 11, 13, 15)]
        _wait_for(lambda: queue.pending() == 7)  # fixes the order in the queue
        seeded = pool.submit(call, url, "PUT", "/api", {"prompts": ["ab"], "random_seed": 1,
                                                       "tokens_to_generate": 3})
        _wait_for(lambda: queue.pending() == 8)
        more = [pool.submit(_request, url, i) for i in (17, 19)]
        _wait_for(lambda: queue.pending() == 10)
        engine.gate.set()
        assert first.result() == (200, "bcde")
        assert [f.result()[1] for f in same + more] == [
            ALPHABET[i:i + 4] for i in (3, 5, 7, 9, 11, 13, 15, 17, 19)]
        assert seeded.result()[1]["text"] == ["abcde"]
    # the first alone, then 8 of the 9 equal ones (max_batch_size), the seeded one alone
    # (a seed must not depend on what else is waiting), then the last equal one
    assert [n for n, _ in engine.calls] == [1, 8, 1, 1]
    assert engine.calls[2][1].seed == 1


def test_without_flask_the_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flask", None)
    spec = importlib.util.spec_from_file_location("server_without_flask", server_module.__file__)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[serve\]"'):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
