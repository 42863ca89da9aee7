"""Small helpers for tensor parallelism: divisibility, splitting, vocab ranges, group resolution
and collectives that do not take part in autograd."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moecore.collectives import group_rank, group_size
from moecore.parallel_state import get_parallel_state


class _TensorParallelGroup:
    """Sentinel default for ``group=`` arguments: "the global tensor-parallel group".

    ``None`` already means "a single rank, no communication", so the default needs its own value.
    """

    def __repr__(self) -> str:
        return "<tensor-parallel group>"


TP_GROUP = _TensorParallelGroup()


def resolve_group(group):
    """The ``ProcessGroup`` to use: the global TP group for :data:`TP_GROUP`, else ``group``."""
    if group is TP_GROUP:
        return get_parallel_state().tp_group
    return group


def ensure_divisibility(numerator: int, denominator: int, what: str = "size") -> None:
    """Raise ``ValueError`` unless ``denominator`` divides ``numerator``."""
    if denominator < 1 or numerator % denominator:
        raise ValueError(
            f"{what}={numerator} is not divisible by {denominator} (the parallel size); "
            f"choose a {what} that is a multiple of {denominator}")


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator``, raising ``ValueError`` when it does not divide exactly."""
    ensure_divisibility(numerator, denominator, what)
    return numerator // denominator


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous_split_chunks: bool = False) -> tuple[torch.Tensor, ...]:
    """``[..., n]`` -> ``num_partitions`` views ``[..., n / num_partitions]``."""
    last = divide(tensor.shape[-1], num_partitions, "last dimension")
    chunks = torch.split(tensor, last, dim=-1)
    if contiguous_split_chunks:
        return tuple(c.contiguous() for c in chunks)
    return chunks


class VocabUtility:
    """The vocabulary slice ``[first, last)`` owned by a tensor-parallel rank."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int,
                                                  world_size: int) -> tuple[int, int]:
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int,
                                           world_size: int) -> tuple[int, int]:
        per_partition = divide(global_vocab_size, world_size, "vocab size")
        return VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition, rank,
                                                                      world_size)


def _all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    # Newer torch renames all_gather_into_tensor; the old name warns there.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, tensor, group=group)


def all_gather_no_grad(tensor: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """``[n, ...]`` on every rank -> ``[world * n, ...]``, rank order, along dim 0, no autograd.

    Bool tensors travel as uint8 (gloo has no bool reductions or gathers on every version).
    """
    group = resolve_group(group)
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.dtype == torch.bool:
        return all_gather_no_grad(tensor.to(torch.uint8), group).bool()
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]) if tensor.dim() else (world,),
                      dtype=tensor.dtype, device=tensor.device)
    _all_gather_into(out, tensor.reshape(tensor.shape or (1,)), group)
    return out


def split_tensor_into_1d_equal_chunks(tensor: torch.Tensor, group=TP_GROUP) -> torch.Tensor:
    """This rank's ``1/world`` slice of ``tensor`` flattened (zero-padded to a multiple of the
    group size); undo with :func:`gather_split_1d_tensor`."""
    group = resolve_group(group)
    world = group_size(group)
    flat = tensor.reshape(-1)
    chunk = -(-flat.numel() // world)
    if chunk * world != flat.numel():
        flat = torch.nn.functional.pad(flat, (0, chunk * world - flat.numel()))
    rank = group_rank(group)
    return flat[rank * chunk:(rank + 1) * chunk].clone()


def gather_split_1d_tensor(chunk: torch.Tensor, shape: torch.Size, group=TP_GROUP) -> torch.Tensor:
    """Inverse of :func:`split_tensor_into_1d_equal_chunks`: all-gather and reshape to ``shape``."""
    full = all_gather_no_grad(chunk, group)
    return full[:shape.numel()].reshape(shape)
