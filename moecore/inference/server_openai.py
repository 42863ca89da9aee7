"""OpenAI's ``POST /v1/completions`` body and answer (the legacy completions API).

Supported: ``model`` (must be the served name when given), ``prompt`` (string, list of strings,
token ids or lists of token ids), ``max_tokens`` (default 16), ``temperature``, ``top_p``,
``top_k`` (an extension, as in vLLM), ``n`` (samples per prompt), ``stop`` (up to 4 strings;
the text is cut before the first one), ``logprobs`` (0 only: the sampled tokens'
log-probabilities; top alternatives are not computed), ``echo``, ``seed``, ``stream`` (false
only), ``user`` (ignored). Penalties, ``best_of``, ``logit_bias`` and ``suffix`` are accepted at
their no-op values only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moecore.inference.server_fields import (
    RequestError,
    check_fields,
    check_lengths,
    get_bool,
    get_float,
    get_int,
    tokenize_prompts,
    without_stop_token,
)

ACCEPTED = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop",
            "logprobs", "echo", "seed", "stream", "user")
# Fields accepted only at the value that makes them do nothing (clients often send them).
NOOP_VALUES = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "logit_bias": {},
               "suffix": None, "stream_options": None}
REFUSED = {name: f"not supported; leave it out or send {json.dumps(value)}"
           for name, value in NOOP_VALUES.items()}
MAX_STOPS = 4


@dataclass
class CompletionRequest:
    texts: list[str]            # each prompt as text (detokenized when sent as ids)
    prompts: list[list[int]]    # each prompt's token ids
    n: int                      # samples per prompt: engine rows are prompts repeated n times
    echo: bool
    stops: list[str]
    params: dict[str, Any]      # SamplingParams keyword arguments

    @property
    def rows(self) -> list[list[int]]:
        return [p for p in self.prompts for _ in range(self.n)]


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _prompts(body: dict, tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt, tokenize_prompts(tokenizer, prompt, "prompt")
    ids = [prompt] if _is_ids(prompt) else prompt
    if not (isinstance(ids, list) and ids and all(_is_ids(p) for p in ids)):
        raise RequestError("'prompt' is required: a string, a list of strings, a list of "
                           "token ids or a list of lists of token ids", param="prompt")
    vocab = getattr(tokenizer, "vocab_size", None)
    for i, p in enumerate(ids):
        bad = [t for t in p if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise RequestError(f"prompt[{i}] holds token ids outside the vocabulary "
                               f"[0, {vocab}): {bad[:5]}", param="prompt")
    return [tokenizer.detokenize(p) for p in ids], [list(p) for p in ids]


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} "
                           "non-empty strings", param="stop")
    return stops


def _single_token_stops(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    # A stop string that is one token also stops the engine early; the cut itself is textual.
    ids = []
    for stop in stops:
        try:
            tokens = tokenizer.tokenize(stop)
        except (ValueError, KeyError):
            continue  # not encodable: the model cannot produce it as one token either
        if len(tokens) == 1:
            ids.append(tokens[0])
    return ids


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"model {model!r} is not served here; this server serves "
                           f"{model_name!r}", param="model", status=404, code="model_not_found")


def _check_unsupported(body: dict) -> None:
    if get_bool(body, "stream", False):
        raise RequestError("stream=true is not supported; leave 'stream' out or send false",
                           param="stream")
    logprobs = get_int(body, "logprobs", None, 0, 5)
    if logprobs is not None and logprobs > 0:
        raise RequestError("logprobs > 0 (top alternatives per token) is not supported; send "
                           "logprobs=0 for the sampled tokens' log-probabilities",
                           param="logprobs")
    if logprobs is not None and get_bool(body, "echo", False):
        raise RequestError("echo with logprobs asks for prompt log-probabilities, which the "
                           "engine does not compute; drop one of them", param="echo")


def parse(body: Any, tokenizer: Any, max_sequence_length: int, max_batch_size: int,
          model_name: str) -> CompletionRequest:
    """Check a ``/v1/completions`` body; raises :class:`RequestError` naming the field."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items()
                if not (k in NOOP_VALUES and (v is None or v == NOOP_VALUES[k]))}
    body = check_fields(body, ACCEPTED, REFUSED)
    _check_model(body, model_name)
    _check_unsupported(body)
    texts, prompts = _prompts(body, tokenizer)
    n = get_int(body, "n", 1, 1, max_batch_size)
    if len(prompts) * n > max_batch_size:
        raise RequestError(f"{len(prompts)} prompts x n={n} is more than the server's "
                           f"{max_batch_size} sequences per request", param="n")
    if body.get("max_tokens") == 0:
        raise RequestError("max_tokens=0 (scoring the prompt) is not supported",
                           param="max_tokens")
    new_tokens = get_int(body, "max_tokens", 16, 1)
    check_lengths(prompts, new_tokens, max_sequence_length, "prompt", "max_tokens")
    stops = _stops(body)
    single = _single_token_stops(tokenizer, stops)
    params = dict(
        max_new_tokens=new_tokens,
        temperature=get_float(body, "temperature", 1.0, 0.0, 2.0),
        top_k=get_int(body, "top_k", 0, 0, getattr(tokenizer, "vocab_size", None)),
        top_p=get_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop_token_ids=tuple(dict.fromkeys([tokenizer.eod, *single])),
        return_logprobs=body.get("logprobs") is not None,
        seed=get_int(body, "seed", None, 0, 2**63 - 1),
    )
    return CompletionRequest(texts, prompts, n, get_bool(body, "echo", False), stops, params)


def _cut_at_stop(tokenizer: Any, tokens: list[int], stops: Sequence[str]
                 ) -> tuple[str, int, bool]:
    """(text before the first stop string, tokens wholly before it, whether one was found)."""
    text = tokenizer.detokenize(tokens)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return text, len(tokens), False
    end = min(hits)
    kept = 0
    while kept < len(tokens) and len(tokenizer.detokenize(tokens[:kept + 1])) <= end:
        kept += 1
    return text[:end], kept, True


def _logprobs(tokenizer: Any, tokens: list[int], logprobs: Sequence[float], offset: int
              ) -> dict:
    strings = [tokenizer.detokenize([t]) for t in tokens]
    offsets = [offset + len(tokenizer.detokenize(tokens[:i])) for i in range(len(tokens))]
    return {"tokens": strings, "token_logprobs": [float(x) for x in logprobs[:len(tokens)]],
            "top_logprobs": None, "text_offset": offsets}


def _choice(req: CompletionRequest, index: int, c: Any, tokenizer: Any) -> dict:
    generated = without_stop_token(c.tokens, c.finish_reason, req.params["stop_token_ids"])
    text, kept, cut = _cut_at_stop(tokenizer, generated, req.stops)
    prefix = req.texts[index // req.n] if req.echo else ""
    logprobs = None
    if req.params["return_logprobs"]:
        logprobs = _logprobs(tokenizer, generated[:kept], c.logprobs, len(prefix))
    return {"text": prefix + text, "index": index, "logprobs": logprobs,
            "finish_reason": "stop" if cut else c.finish_reason}


def respond(req: CompletionRequest, completions: Sequence[Any], tokenizer: Any,
            model_name: str) -> dict:
    """The ``text_completion`` answer: one choice per engine row (prompt-major, then sample)."""
    prompt_tokens = sum(len(p) for p in req.prompts)
    completion_tokens = sum(len(c.tokens) for c in completions)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [_choice(req, i, c, tokenizer) for i, c in enumerate(completions)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
