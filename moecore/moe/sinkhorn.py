"""Sinkhorn normalisation for S-BASE routing (Clark et al. 2022), as Megatron-Core.

``sinkhorn(logits)`` rescales ``exp(logits)`` by a per-token vector ``d0`` and a per-expert vector
``d1`` until every expert column carries the same mass; routing by top-k on the result spreads
tokens evenly even when some experts' logits are uniformly higher.
"""

from __future__ import annotations

import torch


def sinkhorn(logits: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Doubly-normalised ``[T, E]`` matrix ``d0[:, None] * exp(logits) * d1[None, :]``.

    Rows sum to ``1/T`` and columns to ``1/E`` at convergence. Iterates until the mean change of
    ``d1`` is below ``tol`` (Megatron's criterion) or ``max_iters`` passes. No gradient: the
    result only picks experts.
    """
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn expects [tokens, experts] logits, got {tuple(logits.shape)}")
    with torch.no_grad():
        x = logits.float()
        # A per-token shift is absorbed by d0; subtracting each row's max keeps exp() finite
        # and every row's mass >= 1, so no row underflows to zero.
        cost = torch.exp(x - x.max(dim=1, keepdim=True).values)
        t, e = cost.shape
        d0 = torch.ones(t, dtype=cost.dtype, device=cost.device)
        d1 = torch.ones(e, dtype=cost.dtype, device=cost.device)
        eps = 1e-8
        for _ in range(max_iters):
            d0 = (1.0 / t) / (cost @ d1 + eps)
            d1_new = (1.0 / e) / (d0 @ cost + eps)
            err = (d1_new - d1).abs().mean()
            d1 = d1_new
            if err.item() <= tol:
                break
        return d1 * cost * d0.unsqueeze(1)
