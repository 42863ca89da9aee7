"""Expert capacity and token dropping (GShard / Switch-Transformer style), as Megatron-Core.

With ``moe_expert_capacity_factor`` set, each expert accepts at most
``capacity = ceil(T * topk / E * capacity_factor)`` of the ``T`` local tokens; the router drops
the rest with :func:`apply_token_drop`. Dropping is per rank: every rank caps its own tokens.

Padding to capacity (``moe_pad_expert_input_to_capacity``) is the dispatcher's job: the router
returns only the routed, not-dropped entries and exposes the capacity as ``router.last_capacity``;
the dispatcher pads each expert's input to exactly that many rows. ``apply_token_drop`` also
offers Megatron's in-map padding (``pad_to_capacity=True``) for callers that want it.
"""

from __future__ import annotations

import math

import torch

from moecore.config import DROP_POLICIES


def get_capacity(num_tokens: int, num_experts: int, capacity_factor: float,
                 min_capacity: int | None = None) -> int:
    """Rows each expert accepts: ``ceil(num_tokens / num_experts * capacity_factor)``.

    ``num_tokens`` already counts every top-k assignment (``T * topk``), as in Megatron-Core.
    ``min_capacity`` raises the result to at least that many rows.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0; leave "
                         "moe_expert_capacity_factor unset for dropless routing")
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    capacity = math.ceil((num_tokens / num_experts) * capacity_factor)
    if min_capacity is not None and capacity < min_capacity:
        capacity = min_capacity
    return capacity


def _keep_mask(probs: torch.Tensor, routing_map: torch.Tensor, capacity: int,
               drop_policy: str) -> torch.Tensor:
    """``[T, E]`` bool: the routed entries each expert keeps (at most ``capacity`` per column)."""
    if drop_policy == "position":
        # Earliest tokens win: a routed entry's 1-based arrival order in its expert column.
        order = torch.cumsum(routing_map.to(torch.int64), dim=0)
        return routing_map & (order <= capacity)
    # Highest probs win; a stable sort lets the earlier token win an exact tie, so the kept set
    # is deterministic (torch.topk leaves ties unspecified).
    score = probs.detach().masked_fill(~routing_map, float("-inf"))
    k = min(capacity, score.shape[0])
    idx = torch.sort(score, dim=0, descending=True, stable=True).indices[:k]
    top = torch.zeros_like(routing_map).scatter(0, idx, True)
    return routing_map & top


def _pad_mask(keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """``keep`` plus the earliest unselected tokens, so each column has ``min(capacity, T)``."""
    free = ~keep
    need = (capacity - keep.sum(dim=0, keepdim=True)).clamp_min(0)
    order = torch.cumsum(free.to(torch.int64), dim=0)
    return keep | (free & (order <= need))


def apply_token_drop(probs: torch.Tensor, routing_map: torch.Tensor, capacity: int,
                     drop_policy: str = "probs", pad_to_capacity: bool = False):
    """Cap every expert at ``capacity`` tokens; dropped entries are zeroed in both outputs.

    Args:
        probs: ``[T, E]`` routing weights (0 where not routed); gradients flow through the kept
            entries.
        routing_map: ``[T, E]`` bool, the selected experts of each token.
        capacity: rows per expert, e.g. from :func:`get_capacity`.
        drop_policy: ``"probs"`` keeps each expert's ``capacity`` highest-probability tokens
            (earlier token on an exact tie); ``"position"`` keeps its earliest tokens.
        pad_to_capacity: Megatron's in-map padding: additionally mark the earliest unrouted
            tokens (with prob 0) so every expert column holds exactly ``min(capacity, T)``
            entries. The router does not use this; dispatchers pad using ``last_capacity``.

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r} is not supported; choose one of "
                         f"{list(DROP_POLICIES)}")
    if probs.shape != routing_map.shape or probs.dim() != 2:
        raise ValueError(f"probs {tuple(probs.shape)} and routing_map "
                         f"{tuple(routing_map.shape)} must both be [tokens, experts]")
    if capacity < 0:
        raise ValueError(f"capacity={capacity} must be >= 0")
    routing_map = routing_map.bool()
    keep = _keep_mask(probs, routing_map, capacity, drop_policy)
    final_map = _pad_mask(keep, capacity) if pad_to_capacity else keep
    # Padding entries are unrouted, so their probs are already 0; only `keep` carries weight.
    return probs * keep.to(probs.dtype), final_map
