"""Group helpers, the one autograd-free all-reduce that moecore's modules share, and the
one-line explanation of a collective that timed out or lost a peer.

``group=None`` means "this rank alone": every collective over it is the identity (unlike
``torch.distributed``, where ``None`` is the world group). Callers pass the group they reduce
over explicitly, e.g. ``ps.tp_group`` or ``ps.group("data_parallel_with_cp")``.
"""

from __future__ import annotations

import os
from types import FrameType, TracebackType

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


class CollectiveTimeoutError(RuntimeError):
    """A collective did not finish within ``--distributed-timeout-minutes`` or lost a peer."""


# Lower-case fragments of gloo's and NCCL's errors for a peer that stalled or died.
_TIMED_OUT = ("timed out", "timeout", "watchdog")
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")
_TORCH_DIST = os.path.join("torch", "distributed", "")


def _frames(tb: TracebackType | None) -> list[FrameType]:
    """Frames of a traceback, innermost first."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def _group_of(frame: FrameType):
    """The process group a frame's call runs over: its ``group`` argument (``None`` is the
    world), a p2p op list's group, or else any ``ProcessGroup`` local; ``False`` if none."""
    local = frame.f_locals
    if "group" in local and (local["group"] is None or
                             isinstance(local["group"], dist.ProcessGroup)):
        return local["group"] if local["group"] is not None else dist.group.WORLD
    ops = local.get("p2p_op_list")
    if ops:
        return getattr(ops[0], "group", None) or dist.group.WORLD
    return next((v for v in local.values() if isinstance(v, dist.ProcessGroup)), False)


def _describe_group(group) -> str:
    if group is False:
        return "an unknown group"
    name = getattr(group, "group_desc", "") or "unnamed"
    try:
        ranks = f" (ranks {dist.get_process_group_ranks(group)})"
    except (RuntimeError, ValueError):  # destroyed meanwhile
        ranks = ""
    return f"the {'world' if name == 'default_pg' else name} group{ranks}"


def collective_failure(exc: BaseException, timeout_minutes: float) -> CollectiveTimeoutError | None:
    """``exc`` as one line naming the operation, group and call site of the collective that
    timed out or lost a peer; None when ``exc`` is not such a failure.

    The operation and its group come from the traceback: the innermost ``torch.distributed``
    call (``all_reduce``, ``barrier``, ...), else the moecore frame that waited on async work.
    """
    text = str(exc).lower()
    timed_out = any(m in text for m in _TIMED_OUT)
    if not isinstance(exc, RuntimeError) or not (timed_out or any(m in text for m in _PEER_GONE)):
        return None
    frames = _frames(exc.__traceback__)
    ops = [f for f in frames if _TORCH_DIST in f.f_code.co_filename
           and not f.f_code.co_name.startswith("_") and hasattr(dist, f.f_code.co_name)]
    ours = [f for f in frames if _TORCH_DIST not in f.f_code.co_filename
            and os.path.join("torch", "") not in f.f_code.co_filename]
    if ops:
        op, group = ops[0].f_code.co_name, _group_of(ops[0])
    else:  # an async op's wait(): trust it only where a frame holds the group it runs over
        op = "wait() on an async collective"
        group = next((g for g in map(_group_of, ours) if g is not False), False)
        if group is False:
            return None
    site = ""
    if ours:
        path = ours[0].f_code.co_filename
        path = path[path.rfind("moecore" + os.sep):] if "moecore" + os.sep in path else path
        site = f" at {path}:{ours[0].f_lineno} ({ours[0].f_code.co_name})"
    what = (f"timed out after {timeout_minutes:g} min (--distributed-timeout-minutes): a rank of "
            "the group stalled or died; check the other ranks' logs, or raise "
            "--distributed-timeout-minutes if the step is just slow") if timed_out else (
            "failed because a rank of the group exited or crashed (connection closed); check "
            "the other ranks' logs")
    return CollectiveTimeoutError(f"collective {op} over {_describe_group(group)}{site} {what}")
