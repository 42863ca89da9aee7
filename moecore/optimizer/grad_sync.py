"""Gradient synchronisation after the last micro-batch's backward (Megatron's
``finalize_model_grads``).

* Dense parameters: all-reduce over the data-parallel (x context-parallel) group, scaled by
  ``1 / dp_cp`` (the mean of the replicas' gradients).
* Expert parameters (``allreduce=False`` / ``expert_parallel=True``): all-reduce over the
  expert-data-parallel group, *also* scaled by ``1 / dp_cp``. An expert's local gradient is
  already the sum over every data replica whose tokens it received (through the dispatcher's
  all-to-all), so summing over its replicas and dividing by the dense DP size gives the mean
  over all data replicas — Megatron-Core's ``expert_gradient_scaling_factor``.
* Replicated parameters marked ``sequence_parallel=True`` (norm weights, router weights under
  sequence parallel): each TP rank saw a different slice of the sequence, so their gradients are
  summed over the TP group.

* Tied embedding/output weights (``shared_embedding=True``) held by the first and the last
  pipeline stage: each stage saw one use of the weight, so their gradients are summed over the
  embedding group (after the data-parallel reduction, as in Megatron-Core).

Gradients are read from ``param.main_grad`` (fp32, filled by :func:`attach_main_grad` hooks
for bf16/fp16 parameters, or a view into the buffers of a
:class:`~moecore.optimizer.grad_buffer.DataParallelGradSync`) or ``param.grad``. A parameter
that received no gradient (an expert that got no tokens) joins the all-reduce with zeros so
every rank reduces the same buffers. With a ``grad_sync`` the data-parallel reduction is its
bucketed all-reduce / reduce-scatter (possibly started during backward); after a reduce-scatter
only this rank's slice of each bucket is reduced, and the later sums (TP, embedding group) are
exact on that slice because the slices line up across those ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moecore.kernels.optim import accumulate_main_grad_
from moecore.optimizer.clip_grads import is_expert_param
from moecore.parallel_state import ParallelState, get_parallel_state


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    # The first gradient since reset_main_grad overwrites instead of zeroing then adding (two
    # passes over the fp32 buffer fewer; 0 + g == g exactly). One Triton pass on CUDA.
    accumulate_main_grad_(param.main_grad, param.grad, overwrite=param._main_grad_stale)
    param._main_grad_stale = False
    param.grad = None


def attach_main_grad(param: nn.Parameter) -> None:
    """Give a low-precision ``param`` an fp32 ``main_grad`` that accumulates every backward.

    Micro-batch gradients then add up in fp32 (Megatron's gradient-accumulation buffer) instead
    of in bf16/fp16 ``param.grad``. Reset it with :func:`reset_main_grad` and read it with
    :func:`model_grad`.
    """
    if hasattr(param, "main_grad"):
        return
    param.main_grad = torch.zeros_like(param, dtype=torch.float32)
    param._main_grad_stale = False
    param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)


def reset_main_grad(param: torch.Tensor) -> None:
    """Start a new accumulation in ``param.main_grad`` (of :func:`attach_main_grad`).

    Lazy: the buffer is not zeroed; the next backward overwrites it, and :func:`model_grad`
    zeroes it only when no backward wrote it. Until then ``param.main_grad`` holds stale values:
    read it through :func:`model_grad`.
    """
    param._main_grad_stale = True


def model_grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of ``param`` to reduce and step on; zeros when it got none."""
    if hasattr(param, "main_grad"):
        if getattr(param, "_main_grad_stale", False):
            param.main_grad.zero_()
            param._main_grad_stale = False
        return param.main_grad
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def _coalesced_all_reduce(tensors: list[torch.Tensor], group, scale: float = 1.0) -> None:
    """Scale then sum ``tensors`` over ``group`` in one flat buffer per dtype (in place)."""
    if not tensors:
        return
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        if scale != 1.0:
            torch._foreach_mul_(tensors, scale)
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, group=group)
        for t, synced in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(synced)


def finalize_model_grads(model: nn.Module | list[nn.Module],
                         parallel_state: ParallelState | None = None, grad_sync=None) -> None:
    """Synchronise gradients across ranks after backward (collective; see module docstring).

    Groups: ``data_parallel_with_cp`` (dense, mean), ``expert_data_parallel`` (experts,
    sum / dp_cp), ``tensor_model_parallel`` (sequence-parallel params, sum), ``embedding`` (tied
    weights across pipeline stages, sum). ``grad_sync``: the optimizer's
    :class:`~moecore.optimizer.grad_buffer.DataParallelGradSync` (found on the model when not
    given).
    """
    ps = parallel_state or get_parallel_state()
    modules = model if isinstance(model, (list, tuple)) else [model]
    if grad_sync is None:  # buffers built by get_megatron_optimizer register themselves
        grad_sync = getattr(modules[0], "_grad_sync", None)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    grads = [model_grad(p) for p in params]
    if grad_sync is not None:
        grad_sync.finish_grad_sync()
    else:
        dp_cp = ps.world_size_of("data_parallel_with_cp")
        dense = [g for p, g in zip(params, grads) if not is_expert_param(p)]
        expert = [g for p, g in zip(params, grads) if is_expert_param(p)]
        _coalesced_all_reduce(dense, ps.group("data_parallel_with_cp"), scale=1.0 / dp_cp)
        _coalesced_all_reduce(expert, ps.edp_group, scale=1.0 / dp_cp)
    sp = [g for p, g in zip(params, grads) if getattr(p, "sequence_parallel", False)]
    if ps.tp_size > 1:
        _coalesced_all_reduce(sp, ps.tp_group)
    if ps.pp_size > 1:
        tied = [g for p, g in zip(params, grads) if getattr(p, "shared_embedding", False)]
        if tied:  # only the first and last stages hold (and share) it
            _coalesced_all_reduce(tied, ps.group("embedding"))
