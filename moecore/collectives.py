"""Group helpers and the one autograd-free all-reduce that moecore's modules share.

``group=None`` means "this rank alone": every collective over it is the identity (unlike
``torch.distributed``, where ``None`` is the world group). Callers pass the group they reduce
over explicitly, e.g. ``ps.tp_group`` or ``ps.group("data_parallel_with_cp")``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Ranks in ``group``; 1 for ``None`` (one rank: every collective is the identity)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This rank's index in ``group``; 0 for ``None``."""
    if group is None:
        return 0
    return dist.get_rank(group)


def all_reduce_inplace(tensor: torch.Tensor, group, *, average: bool = False,
                       op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``tensor`` (any shape, contiguous) in place over ``group`` and return it.

    Outside autograd (the result carries no gradient path to the other ranks). A ``None`` or
    one-rank group leaves ``tensor`` untouched. ``average`` divides the sum by the group size
    afterwards: gloo has no ``ReduceOp.AVG``.
    """
    n = group_size(group)
    if n == 1:
        return tensor
    if not tensor.is_contiguous():
        raise ValueError("all_reduce_inplace reduces in place and needs a contiguous tensor; "
                         "pass tensor.contiguous() and read the result from it")
    if average and op != dist.ReduceOp.SUM:
        raise ValueError(f"all_reduce_inplace(average=True) sums then divides; got op={op}")
    dist.all_reduce(tensor, op=op, group=group)
    if average:
        tensor /= n
    return tensor
