"""Megatron-LM's ``PUT /api`` body and answer (``tools/run_text_generation_server.py``).

Request: ``prompts`` (list of strings, required), ``tokens_to_generate`` (default 64),
``logprobs``, ``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p`` (0 = off, as in
Megatron), ``random_seed``, ``add_BOS`` (prepend the end-of-document token), ``no_log``.
Answer: ``text`` (prompt + generation), ``tokens`` and ``segments`` (prompt + generated ids and
their strings), and with ``logprobs`` the generated tokens' log-probabilities (moecore's engine
does not score prompt tokens, so unlike Megatron the list covers the generation only).
"""

from __future__ import annotations

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

ACCEPTED = ("prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p",
            "random_seed", "add_BOS", "no_log")
_EOD_ONLY = "not supported; generation stops at the tokenizer's end-of-document token"
REFUSED = {
    "max_len": "no longer used; use tokens_to_generate",
    "sentences": "no longer used; use prompts",
    "beam_width": "beam search is not supported by moecore's server",
    "length_penalty": "beam search is not supported by moecore's server",
    "top_p_decay": "not supported; give a fixed top_p",
    "top_p_bound": "not supported; give a fixed top_p",
    "stop_token": _EOD_ONLY,
    "stop_on_eol": _EOD_ONLY,
    "stop_on_double_eol": _EOD_ONLY,
    "prevent_newline_after_colon": "not supported",
    "top_n_logprobs": "not supported; logprobs gives the sampled tokens' log-probabilities",
}


@dataclass
class MegatronRequest:
    texts: list[str]            # the prompts as sent
    prompts: list[list[int]]    # their token ids ([eod] + ids with add_BOS)
    params: dict[str, Any]      # SamplingParams keyword arguments
    no_log: bool


def _prompt_texts(body: dict, max_batch_size: int) -> list[str]:
    if "prompts" not in body:
        raise RequestError("'prompts' is required: a list of strings", param="prompts")
    texts = body["prompts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError("'prompts' must be a list of strings", param="prompts")
    if not 1 <= len(texts) <= max_batch_size:
        raise RequestError(f"'prompts' must hold 1 to {max_batch_size} prompts, got "
                           f"{len(texts)}", param="prompts")
    return texts


def parse(body: Any, tokenizer: Any, max_sequence_length: int, max_batch_size: int
          ) -> MegatronRequest:
    """Check a ``PUT /api`` body; raises :class:`RequestError` naming the field at fault."""
    body = check_fields(body, ACCEPTED, REFUSED)
    texts = _prompt_texts(body, max_batch_size)
    if body.get("tokens_to_generate") == 0:
        raise RequestError("tokens_to_generate=0 (scoring the prompt) is not supported: the "
                           "engine gives log-probabilities of generated tokens only",
                           param="tokens_to_generate")
    new_tokens = get_int(body, "tokens_to_generate", 64, 1)
    vocab = getattr(tokenizer, "vocab_size", None)
    top_p = get_float(body, "top_p", 0.0, 0.0, 1.0)
    params = dict(
        max_new_tokens=new_tokens,
        temperature=get_float(body, "temperature", 1.0, 0.0, 100.0),
        top_k=get_int(body, "top_k", 0, 0, vocab),
        top_p=1.0 if top_p == 0.0 else top_p,
        stop_token_ids=(tokenizer.eod,),
        return_logprobs=get_bool(body, "logprobs", False),
        seed=get_int(body, "random_seed", None, 0, 2**63 - 1),
    )
    prompts = tokenize_prompts(tokenizer, texts, "prompts")
    if get_bool(body, "add_BOS", False):
        prompts = [[tokenizer.eod, *p] for p in prompts]
    elif any(not p for p in prompts):
        raise RequestError("empty prompts need add_BOS=true", param="prompts")
    check_lengths(prompts, new_tokens, max_sequence_length, "prompts", "tokens_to_generate")
    return MegatronRequest(texts, prompts, params, get_bool(body, "no_log", False))


def respond(req: MegatronRequest, completions: Sequence[Any], tokenizer: Any) -> dict:
    """The answer body for ``req`` from the engine's completions (one per prompt, in order)."""
    stop_ids = req.params["stop_token_ids"]
    out: dict[str, list] = {"text": [], "segments": [], "tokens": []}
    if req.params["return_logprobs"]:
        out["logprobs"] = []
    for text, prompt, c in zip(req.texts, req.prompts, completions):
        tokens = [*prompt, *c.tokens]
        generated = without_stop_token(c.tokens, c.finish_reason, stop_ids)
        out["text"].append(text + tokenizer.detokenize(generated))
        out["tokens"].append(tokens)
        out["segments"].append([tokenizer.detokenize([t]) for t in tokens])
        if req.params["return_logprobs"]:
            out["logprobs"].append(list(c.logprobs))
    return out
