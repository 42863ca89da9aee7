"""Cross entropy over logits whose vocabulary is split across the tensor-parallel group.

Never materialises the full ``[..., V]`` logits: each rank works on its ``[..., V/tp]`` slice and
the group exchanges only per-token scalars (the max, the target logit, the sum of exponentials
and, with label smoothing, the sum of logits), as in Megatron-Core. The implementations and
their registry live in :mod:`moecore.kernels.cross_entropy`.
"""

from __future__ import annotations

import torch

from moecore.backends import AUTO
from moecore.kernels.cross_entropy import select_cross_entropy
from moecore.tensor_parallel.utils import TP_GROUP, group_size, resolve_group


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, group=TP_GROUP,
                                 backend: str = AUTO) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` of ``vocab_parallel_logits [..., V/tp]`` (rank r holds
    vocabulary columns ``[r V/tp, (r+1) V/tp)``) against ``target [...]`` (global token ids).

    Collectives run over ``group`` (default: the TP group; ``None`` = unsplit logits). The loss
    is computed in at least fp32 and returned in that precision; the gradient comes back in the
    logits' dtype. ``label_smoothing`` ``a`` puts ``1 - a`` on the target and ``a / (V - 1)`` on
    every other token (Megatron's definition, not ``torch.nn.functional.cross_entropy``'s).
    ``backend`` is the ``cross_entropy`` registry request (``auto``: on CUDA a fused Triton
    kernel computes it in one pass each way, :mod:`moecore.kernels.cross_entropy`; pass the
    logits in the model's dtype, not upcast).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on every dimension but the last")
    group = resolve_group(group)
    if label_smoothing > 0 and vocab_parallel_logits.shape[-1] * group_size(group) < 2:
        raise ValueError("label smoothing needs a vocabulary of at least 2 tokens")
    fn = select_cross_entropy(vocab_parallel_logits, backend).fn
    return fn(vocab_parallel_logits, target, label_smoothing, group)
