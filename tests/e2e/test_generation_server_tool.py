"""``tools/run_text_generation_server.py`` end to end: a checkpoint saved by ``pretrain_gpt.py``,
the real engine behind the real server process, a real HTTP client. Greedy completions from
both APIs equal ``tools/generate.py``'s on the same checkpoint; a bad request gets a 4xx and
the server keeps answering."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flask")
ROOT = Path(__file__).resolve().parents[2]
TOKENS = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "40", "--device", "cpu"]
PROMPT = "1 2 3 4"  # the NullTokenizer reads space-separated ids


def _run(cmd, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    _run([sys.executable, "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "32",
          "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings",
          "32", "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
          "--moe-ffn-hidden-size", "32", "--moe-grouped-gemm", "--swiglu",
          "--normalization", "RMSNorm", "--position-embedding-type", "rope",
          "--disable-bias-linear", "--mock-data", "--micro-batch-size", "2",
          "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "3",
          "--eval-iters", "0", "--make-vocab-size-divisible-by", "1", "--save", str(ckpt),
          *TOKENS])
    return ckpt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, method, body):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(checkpoint):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "tools/run_text_generation_server.py", "--port", str(port),
         "--load", str(checkpoint), "--use-checkpoint-args", *TOKENS],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("server exited: " + proc.stdout.read()[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start listening within 120 s")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _greedy_from_tool(checkpoint, n: int) -> str:
    """The completion ``tools/generate.py`` prints after the prompt (greedy)."""
    out = _run([sys.executable, "tools/generate.py", "--load", str(checkpoint),
                "--use-checkpoint-args", *TOKENS, "--prompt", PROMPT,
                "--max-new-tokens", str(n), "--temperature", "0"])
    line = out.strip().splitlines()[-1]
    assert line.startswith(PROMPT), out[-1000:]
    return line[len(PROMPT):]


def test_both_apis_match_the_generate_tool_and_survive_a_bad_request(server, checkpoint):
    n = 6
    completion = _greedy_from_tool(checkpoint, n)
    assert len(re.findall(r"\d+", completion)) >= n - 1  # ids, maybe glued to the prompt's
    status, body = _call(f"{server}/api", "PUT",
                         {"prompts": [PROMPT], "tokens_to_generate": n, "top_k": 1})
    assert status == 200, body
    assert body["text"] == [PROMPT + completion]  # Megatron: prompt and completion
    status, body = _call(f"{server}/v1/completions", "POST",
                         {"prompt": PROMPT, "max_tokens": n, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == completion
    status, body = _call(f"{server}/api", "PUT", "{not json")
    assert 400 <= status < 500 and body
    status, body = _call(f"{server}/v1/completions", "POST",
                         {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert status == 200 and completion.startswith(body["choices"][0]["text"])
