"""Comparing a tensor-parallel run with the single-process one, in gloo tests."""

from __future__ import annotations

import torch
import torch.distributed as dist


def full_tensor(p, t: torch.Tensor, ps) -> torch.Tensor:
    """The full (TP=1) tensor of parameter ``p``'s shard ``t`` (all-gather over ``ps``'s TP
    group), honouring ``partition_stride``; ``t`` itself for a replicated parameter."""
    if not getattr(p, "tensor_model_parallel", False):
        return t
    dim, stride, tp = p.partition_dim, getattr(p, "partition_stride", 1), ps.tp_size
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    chunks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([chunks[r][s] for s in range(stride) for r in range(tp)], dim)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
