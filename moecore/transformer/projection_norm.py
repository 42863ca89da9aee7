"""RMSNorm over a whole attention projection whose heads are split across tensor parallelism.

OLMoE normalises ``q_proj``'s output (``nh * d`` wide) and ``k_proj``'s (``ng * d``) with one
RMS over all heads (``--qk-layernorm --qk-layernorm-hidden-dim``), not per head. Under TP each
rank holds ``n/tp`` heads, so the sum of squares is all-reduced over the TP group (forward
and backward: every rank's heads depend on every rank's sum). The weight is split over TP
with the heads (``partition_dim 0``), so its gradient is complete on each rank.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn

from moecore.tensor_parallel.layers import set_tensor_model_parallel_attributes


class ProjectionRMSNorm(nn.Module):
    """``forward(x [S, B, n_local, d]) -> y`` of the same shape and dtype:
    ``y = x / sqrt(mean over all n*d of x^2 + eps) * weight``, computed in fp32 (as Hugging
    Face's ``OlmoeRMSNorm``). ``weight`` is this rank's ``[n_local * d]`` slice of ``[n * d]``."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, params_dtype: torch.dtype,
                 tp_size: int, tp_group):
        super().__init__()
        self.global_size = num_heads * head_dim
        self.eps, self.tp_size, self.tp_group = eps, tp_size, tp_group
        self.weight = nn.Parameter(
            torch.ones(num_heads // tp_size * head_dim, dtype=params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x32 = x.float().flatten(-2)
        sumsq = x32.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            sumsq = dist_fn.all_reduce(sumsq, group=self.tp_group)
        y = x32 * torch.rsqrt(sumsq / self.global_size + self.eps)
        return (self.weight * y.to(x.dtype)).view(shape)

    def extra_repr(self) -> str:
        return f"{self.global_size} over TP {self.tp_size}, eps={self.eps}"
