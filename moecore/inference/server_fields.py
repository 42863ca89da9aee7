"""Request-body checks shared by the server's two APIs (standard library only).

Every check raises :class:`RequestError`, which the server turns into a 4xx JSON answer naming
the field; nothing here touches the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

_MISSING = object()


class RequestError(Exception):
    """A client mistake: ``status`` (4xx), a one-line ``message``, the ``param`` at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def check_fields(body: Any, accepted: Sequence[str], refused: dict[str, str]) -> dict:
    """``body`` as a dict whose keys are all in ``accepted``.

    ``refused`` maps known-but-unsupported field names to the reason given for them; any other
    unknown field is named with the list of accepted ones.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(body)}")
    for key in body:
        if key in refused:
            raise RequestError(f"field '{key}': {refused[key]}", param=key)
        if key not in accepted:
            raise RequestError(f"unknown field '{key}'; accepted fields: "
                               f"{', '.join(sorted(accepted))}", param=key)
    return body


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _value(body: dict, name: str) -> Any:
    # JSON null counts as "not given", as OpenAI's clients send it for unset options.
    value = body.get(name)
    return _MISSING if value is None else value


def get_int(body: dict, name: str, default: int | None, lo: int, hi: int | None = None
            ) -> int | None:
    """Integer field in ``[lo, hi]`` (``hi`` None: no upper bound); booleans are refused."""
    value = _value(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {_json_type(value)}", param=name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise RequestError(f"'{name}' must be {bound}, got {value}", param=name)
    return value


def get_float(body: dict, name: str, default: float, lo: float, hi: float,
              lo_open: bool = False) -> float:
    """Finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    value = _value(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {_json_type(value)}", param=name)
    low_ok = value > lo if lo_open else value >= lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise RequestError(f"'{name}' must be in {interval}, got {value}", param=name)
    return float(value)


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = _value(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {_json_type(value)}",
                           param=name)
    return value


def tokenize_prompts(tokenizer: Any, texts: Sequence[str], param: str) -> list[list[int]]:
    """Token ids of each prompt text; a character the tokenizer cannot encode is a 400."""
    prompts = []
    for i, text in enumerate(texts):
        try:
            prompts.append(list(tokenizer.tokenize(text)))
        except (ValueError, KeyError) as err:
            raise RequestError(f"{param}[{i}] cannot be tokenized: {err}", param=param) from None
    return prompts


def check_lengths(prompts: Sequence[Sequence[int]], new_tokens: int, max_sequence_length: int,
                  param: str, new_tokens_param: str) -> None:
    """Each prompt is non-empty and leaves room for ``new_tokens`` in the model's context."""
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(f"{param}[{i}] is empty; give at least one token", param=param)
        if len(prompt) + new_tokens > max_sequence_length:
            raise RequestError(
                f"{param}[{i}] has {len(prompt)} tokens; with {new_tokens_param}={new_tokens} "
                f"that is {len(prompt) + new_tokens} > the model's max sequence length "
                f"{max_sequence_length}: shorten the prompt or lower {new_tokens_param}",
                param=param)


def without_stop_token(tokens: Sequence[int], finish_reason: str,
                       stop_token_ids: Sequence[int]) -> list[int]:
    """The generated ``tokens`` less the stop token that ended them (it has no text)."""
    if finish_reason == "stop" and tokens and tokens[-1] in stop_token_ids:
        return list(tokens[:-1])
    return list(tokens)
