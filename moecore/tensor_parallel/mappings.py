"""Autograd communication ops of tensor and sequence parallelism (Megatron-Core's names).

Every op takes ``group=``: by default the global tensor-parallel group
(``get_parallel_state().tp_group``); an explicit ``None`` (or any one-rank group) makes the op
the identity. "Last dim" ops split/gather the hidden dimension ``[..., H]``; sequence-parallel
ops split/gather the first dimension (``S`` of ``[S, B, H]``, or tokens of ``[T, H]``).

Backends: NCCL gets the native reduce-scatter and uneven all-gather. gloo (CPU tests) only gained
reduce-scatter in recent torch and never supports uneven all-gather, so there a reduce-scatter is
an all-reduce plus a local slice and an uneven gather pads every piece to the largest one. All ops
return fresh contiguous tensors and never write into their inputs or into incoming gradients
(autograd may hand the same gradient tensor to several branches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from moecore.collectives import all_reduce_inplace
from moecore.tensor_parallel.utils import (
    TP_GROUP,
    _all_gather_into,
    group_rank,
    group_size,
    resolve_group,
)

# ---- plain (non-autograd) collectives -----------------------------------------------------


def _uses_nccl(group, tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and "nccl" in str(dist.get_backend(group))


def _reduced_copy(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over ``group`` in a fresh tensor (``x`` itself when one rank): never writes
    into ``x``, which autograd may share between branches."""
    if group_size(group) == 1:
        return x
    return all_reduce_inplace(x.clone(memory_format=torch.contiguous_format), group)


def _split_sizes(n: int, world: int, sizes: Sequence[int] | None, what: str) -> list[int]:
    """Per-rank row counts along dim 0: ``sizes`` if given (checked), else ``n / world`` each."""
    if sizes is None:
        if n % world:
            raise ValueError(f"{what}: first dimension {n} is not divisible by the group size "
                             f"{world}; pad it to a multiple of {world} or pass split sizes")
        return [n // world] * world
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or sum(sizes) != n or min(sizes) < 0:
        raise ValueError(f"{what}: split sizes {sizes} must be {world} non-negative numbers "
                         f"summing to the first dimension {n}")
    return sizes


def _split_first(x: torch.Tensor, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    n = _split_sizes(x.shape[0], world, None, "scatter along dim 0")[0]
    rank = group_rank(group)
    return x[rank * n:(rank + 1) * n].contiguous()


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[-1] % world:
        raise ValueError(f"scatter along the last dim: size {x.shape[-1]} is not divisible by the "
                         f"group size {world}; make it a multiple of {world}")
    return x.chunk(world, dim=-1)[group_rank(group)].contiguous()


def _gather_first(x: torch.Tensor, group, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``[n_r, ...]`` on rank r -> ``[sum n, ...]`` on every rank (``sizes`` = all ``n_r``)."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    if sizes is None:
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x, group)
        return out
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or sizes[group_rank(group)] != x.shape[0]:
        raise ValueError(f"gather along dim 0: output split sizes {sizes} must list {world} sizes "
                         f"with this rank's entry equal to its first dimension {x.shape[0]}")
    if _uses_nccl(group, x):
        parts = [x.new_empty((s, *x.shape[1:])) for s in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)
    # gloo needs equal sizes: pad every piece to the largest, then trim.
    m = max(sizes)
    if m == 0:
        return x.new_empty((0, *x.shape[1:]))
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    buf = x.new_empty((world * m, *x.shape[1:]))
    _all_gather_into(buf, padded, group)
    return torch.cat([buf[r * m:r * m + s] for r, s in enumerate(sizes)], dim=0)


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    # gloo wants the output as [world * n, ...], not [world, n, ...].
    buf = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_into(buf, x, group)
    return torch.cat(buf.chunk(world, dim=0), dim=-1)


def _reduce_scatter_first(x: torch.Tensor, group,
                          sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``[sum n, ...]`` on every rank -> sum over ranks of rows ``[offset_r, offset_r + n_r)``."""
    world = group_size(group)
    if world == 1:
        return x
    sizes = _split_sizes(x.shape[0], world, sizes, "reduce-scatter along dim 0")
    rank = group_rank(group)
    x = x.contiguous()
    if _uses_nccl(group, x):
        out = x.new_empty((sizes[rank], *x.shape[1:]))
        if len(set(sizes)) == 1:
            dist.reduce_scatter_tensor(out, x, group=group)
        else:
            dist.reduce_scatter(out, list(x.split(sizes, dim=0)), group=group)
        return out
    start = sum(sizes[:rank])
    return _reduced_copy(x, group)[start:start + sizes[rank]].contiguous()


def _all_to_all(x: torch.Tensor, group, output_split_sizes, input_split_sizes) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        n_out = x.shape[0] if output_split_sizes is None else sum(output_split_sizes)
        if n_out != x.shape[0]:
            raise ValueError(f"all_to_all on one rank: output splits {output_split_sizes} must "
                             f"sum to the input rows {x.shape[0]}")
        return x
    in_sizes = _split_sizes(x.shape[0], world, input_split_sizes, "all_to_all input")
    if output_split_sizes is None:
        n_out = x.shape[0]
        out_sizes = None
    else:
        out_sizes = [int(s) for s in output_split_sizes]
        n_out = sum(out_sizes)
    x = x.contiguous()
    out = x.new_empty((n_out, *x.shape[1:]))
    dist.all_to_all_single(out, x, out_sizes, None if input_split_sizes is None else in_sizes,
                           group=group)
    return out


# ---- autograd functions --------------------------------------------------------------------


class _CopyToModelParallelRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _reduced_copy(grad, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-reduce. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _reduced_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of dim 0. Backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather dim 0 (uneven with ``sizes``). Backward: reduce-scatter the gradient
    when the consumer is tensor-parallel (each rank holds a partial gradient), else slice it."""

    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad, sizes):
        ctx.group, ctx.reduce, ctx.sizes = group, tensor_parallel_output_grad, sizes
        return _gather_first(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce:
            return _reduce_scatter_first(grad, ctx.group, ctx.sizes), None, None, None
        world = group_size(ctx.group)
        sizes = _split_sizes(grad.shape[0], world, ctx.sizes, "gather backward")
        rank = group_rank(ctx.group)
        start = sum(sizes[:rank])
        return grad[start:start + sizes[rank]].contiguous(), None, None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: reduce-scatter dim 0 (uneven with ``sizes``). Backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _reduce_scatter_first(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group, ctx.sizes), None, None


class _AllToAll(torch.autograd.Function):
    """Forward: variable-split all-to-all of dim 0. Backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, output_split_sizes, input_split_sizes):
        ctx.group = group
        ctx.output_split_sizes, ctx.input_split_sizes = output_split_sizes, input_split_sizes
        return _all_to_all(x, group, output_split_sizes, input_split_sizes)

    @staticmethod
    def backward(ctx, grad):
        out = _all_to_all(grad, ctx.group, ctx.input_split_sizes, ctx.output_split_sizes)
        return out, None, None, None


# ---- public ops ----------------------------------------------------------------------------


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over ``group`` backward. ``[..., H]``."""
    return _CopyToModelParallelRegion.apply(x, resolve_group(group))


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """Sum of ``x`` over ``group`` forward, identity backward. ``[..., H]``."""
    return _ReduceFromModelParallelRegion.apply(x, resolve_group(group))


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """``[..., H]`` -> this rank's ``[..., H/tp]``; backward all-gathers the last dim."""
    return _ScatterToModelParallelRegion.apply(x, resolve_group(group))


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """``[..., H/tp]`` -> ``[..., H]`` (rank order); backward keeps this rank's slice."""
    return _GatherFromModelParallelRegion.apply(x, resolve_group(group))


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """``[S, ...]`` -> this rank's ``[S/tp, ...]``; backward all-gathers dim 0."""
    return _ScatterToSequenceParallelRegion.apply(x, resolve_group(group))


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True,
                                         group=TP_GROUP,
                                         output_split_sizes: Sequence[int] | None = None
                                         ) -> torch.Tensor:
    """``[S/tp, ...]`` -> ``[S, ...]`` over ``group``; with ``output_split_sizes`` rank r holds
    ``output_split_sizes[r]`` rows. Backward reduce-scatters the gradient when
    ``tensor_parallel_output_grad`` (the consumer is tensor-parallel), else takes this rank's rows.
    """
    return _GatherFromSequenceParallelRegion.apply(
        x, resolve_group(group), tensor_parallel_output_grad, output_split_sizes)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=TP_GROUP,
                                               input_split_sizes: Sequence[int] | None = None
                                               ) -> torch.Tensor:
    """``[S, ...]`` partial sums -> this rank's ``[S/tp, ...]`` of the sum over ``group`` (rank r
    gets ``input_split_sizes[r]`` rows when given). Backward all-gathers dim 0."""
    return _ReduceScatterToSequenceParallelRegion.apply(x, resolve_group(group),
                                                        input_split_sizes)


def all_to_all(x: torch.Tensor, output_split_sizes: Sequence[int] | None,
               input_split_sizes: Sequence[int] | None, group) -> torch.Tensor:
    """Exchange rows of ``x [N_in, ...]`` over ``group``: ``input_split_sizes[j]`` rows go to rank
    j, ``output_split_sizes[j]`` rows arrive from rank j (``None``: equal splits). Returns
    ``[sum(output_split_sizes), ...]``; backward runs the reverse exchange."""
    return _AllToAll.apply(x, resolve_group(group), output_split_sizes, input_split_sizes)


__all__ = [
    "all_to_all",
    "copy_to_tensor_model_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
]
