"""Sampling parameters, completions, and the choice of the next token from logits.

``select_tokens(logits [B, V] fp32, params, generator) -> (tokens [B], logprobs [B])``:
greedy (``temperature == 0``) or sampling from ``softmax(logits / temperature)`` restricted to
the ``top_k`` most likely tokens, then to the smallest set whose probability reaches ``top_p``.
Log-probabilities are the model's own (``log_softmax`` of the unscaled, unfiltered logits).
Everything stays on the logits' device (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a batch of prompts (one set of parameters for the whole batch)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0.0 => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # 1.0 => off
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        stops = tuple(self.stop_token_ids)
        if any(not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be ints >= 0")
        object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed={self.seed!r} must be an int >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One prompt's result."""

    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens only (stop token included if hit)
    logprobs: list[float] | None  # one per generated token when asked
    finish_reason: str  # "stop" | "length"


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, V]`` bool, True for the tokens outside each row's ``k`` largest logits (ties at
    the k-th value are kept). ``k = 0`` or ``k >= V``: nothing is masked."""
    if k <= 0 or k >= logits.shape[-1]:
        return torch.zeros_like(logits, dtype=torch.bool)
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits < kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``[B, V]`` bool, True for the tokens outside the nucleus: the most likely tokens whose
    probabilities, summed in decreasing order, first reach ``p`` (the most likely token is
    always kept). ``p = 1``: nothing is masked."""
    if p >= 1.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
    drop_sorted = before >= p
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def select_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [B, V]`` -> ``(tokens [B] int64, logprobs [B] fp32)`` (see the module doc)."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        tokens = torch.argmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        scaled = scaled.masked_fill(top_k_mask(scaled, params.top_k), float("-inf"))
        scaled = scaled.masked_fill(top_p_mask(scaled, params.top_p), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
