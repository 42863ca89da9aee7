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

Gradients are read from ``param.main_grad`` (fp32, filled by :func:`attach_main_grad` hooks
for bf16/fp16 parameters) or ``param.grad``. A parameter that received no gradient (an expert
that got no tokens) joins the all-reduce with zeros so every rank reduces the same buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moecore.optimizer.clip_grads import is_expert_param
from moecore.parallel_state import ParallelState, get_parallel_state


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None


def attach_main_grad(param: nn.Parameter) -> None:
    """Give a low-precision ``param`` an fp32 ``main_grad`` that accumulates every backward.

    Micro-batch gradients then add up in fp32 (Megatron's gradient-accumulation buffer) instead
    of in bf16/fp16 ``param.grad``.
    """
    if hasattr(param, "main_grad"):
        return
    param.main_grad = torch.zeros_like(param, dtype=torch.float32)
    param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)


def model_grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of ``param`` to reduce and step on; zeros when it got none."""
    if hasattr(param, "main_grad"):
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
                         parallel_state: ParallelState | None = None) -> None:
    """Synchronise gradients across ranks after backward (collective; see module docstring).

    Groups: ``tensor_model_parallel`` (sequence-parallel params, sum),
    ``data_parallel_with_cp`` (dense, mean), ``expert_data_parallel`` (experts, sum / dp_cp).
    """
    ps = parallel_state or get_parallel_state()
    modules = model if isinstance(model, (list, tuple)) else [model]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    grads = [model_grad(p) for p in params]
    sp = [g for p, g in zip(params, grads) if getattr(p, "sequence_parallel", False)]
    if ps.tp_size > 1:
        _coalesced_all_reduce(sp, ps.tp_group)
    dp_cp = ps.world_size_of("data_parallel_with_cp")
    dense = [g for p, g in zip(params, grads) if not is_expert_param(p)]
    expert = [g for p, g in zip(params, grads) if is_expert_param(p)]
    _coalesced_all_reduce(dense, ps.group("data_parallel_with_cp"), scale=1.0 / dp_cp)
    _coalesced_all_reduce(expert, ps.edp_group, scale=1.0 / dp_cp)
