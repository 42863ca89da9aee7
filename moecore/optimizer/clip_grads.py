"""One global gradient norm over a model sharded by TP/EP, and clipping to it.

Megatron's counting rule: a dense parameter contributes on every TP rank when it is TP-sharded
(``tensor_model_parallel=True``; each rank holds a different slice) and only on TP rank 0
otherwise (replicas are counted once). The dense sum of squares is all-reduced over the
tensor-parallel group. Expert parameters (``allreduce=False`` or ``expert_parallel=True``)
follow the same rule with the expert-tensor rank and are summed over the expert-tensor x
expert-model group, since each EP rank holds different experts. The two sums are then added over
the pipeline group (stages hold different layers). A tied embedding/output weight held by the
first and the last stage (``shared_embedding=True``) counts on the first stage only.

Data-parallel replicas hold identical (already reduced) gradients, so no DP reduction is needed
- except with the distributed optimizer, where each data-parallel rank holds a disjoint slice of
every gradient (``data_parallel_sharded=True``): dense sums are first added over the
``data_parallel_with_cp`` group and expert sums over the ``expert_data_parallel`` group. Every
rank ends with the same norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moecore.collectives import all_reduce_inplace
from moecore.parallel_state import ParallelState, get_parallel_state


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False or bool(getattr(p, "expert_parallel", False))


def _sum_sq(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """Sum of squares of all entries, in fp32 (one fused norm kernel per dtype)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    fp32 = [t for t in tensors if t.dtype == torch.float32]
    other = [t.float() for t in tensors if t.dtype != torch.float32]
    for group in (fp32, other):
        if group:
            total += torch.stack(torch._foreach_norm(group)).pow(2).sum()
    return total


def _counted_on_this_stage(p: torch.Tensor, ps: ParallelState) -> bool:
    return not (getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage())


def _model_parallel_sum(dense: torch.Tensor, expert: torch.Tensor, ps: ParallelState,
                        data_parallel_sharded: bool = False) -> torch.Tensor:
    """Sum this rank's dense/expert values (squared norms, zero counts) over the groups that
    hold different parts: TP (expert: EP x ETP), then PP; first DP (expert: EDP) when the
    distributed optimizer shards them over data parallelism."""
    if data_parallel_sharded:
        all_reduce_inplace(dense, ps.group("data_parallel_with_cp"))
        all_reduce_inplace(expert, ps.edp_group)
    all_reduce_inplace(dense, ps.tp_group)
    all_reduce_inplace(expert, ps.group("expert_tensor_and_model_parallel"))
    total = dense + expert
    all_reduce_inplace(total, ps.pp_group)
    return total


def grads_for_norm(params: Iterable[torch.Tensor], ps: ParallelState
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(dense_grads, expert_grads)`` this rank counts towards the global norm."""
    dense, expert = [], []
    for p in params:
        g = p.grad
        if g is None or not _counted_on_this_stage(p, ps):
            continue
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        if is_expert_param(p):
            if sharded or ps.etp_rank == 0:
                expert.append(g)
        elif sharded or ps.tp_rank == 0:
            dense.append(g)
    return dense, expert


def get_grad_norm_fp32(params: Iterable[torch.Tensor],
                       parallel_state: ParallelState | None = None,
                       data_parallel_sharded: bool = False) -> float:
    """Global L2 norm of the gradients of ``params`` (collective over the tensor, expert and
    pipeline groups, and with ``data_parallel_sharded`` the data-parallel groups too)."""
    ps = parallel_state or get_parallel_state()
    params = list(params)
    device = params[0].device if params else torch.device(
        "cuda" if torch.cuda.is_available() and ps.sizes.world_size > 1 else "cpu")
    dense, expert = grads_for_norm(params, ps)
    dense_sq, expert_sq = _sum_sq(dense, device), _sum_sq(expert, device)
    return float(_model_parallel_sum(dense_sq, expert_sq, ps, data_parallel_sharded)
                 .sqrt().item())


def count_zeros_fp32(params: Iterable[torch.Tensor], parallel_state: ParallelState | None = None,
                     data_parallel_sharded: bool = False) -> torch.Tensor:
    """Number of zero gradient entries of ``params`` (``--log-num-zeros-in-grad``), counted as
    the global norm counts (each replica once), as a 0-dim fp64 device tensor: reading it is the
    caller's sync. Collective over the same groups as :func:`get_grad_norm_fp32`."""
    ps = parallel_state or get_parallel_state()
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    dense, expert = grads_for_norm(params, ps)

    def zeros(grads):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            total += (g == 0).sum()
        return total

    return _model_parallel_sum(zeros(dense), zeros(expert), ps, data_parallel_sharded)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float,
                   parallel_state: ParallelState | None = None,
                   total_norm: float | None = None) -> float:
    """Scale all gradients by ``max_norm / (norm + 1e-6)`` when that is below 1.

    Returns the norm before clipping. ``max_norm <= 0`` computes the norm only. Pass
    ``total_norm`` to reuse a norm computed already.
    """
    params = list(params)
    if total_norm is None:
        total_norm = get_grad_norm_fp32(params, parallel_state)
    if max_norm > 0:
        coeff = max_norm / (total_norm + 1e-6)
        if coeff < 1.0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coeff)
    return total_norm


def get_params_norm(params: Iterable[torch.Tensor],
                    parallel_state: ParallelState | None = None) -> float:
    """Global L2 norm of the parameters themselves, with the same counting rule as grads."""
    ps = parallel_state or get_parallel_state()
    params = [p for p in params if _counted_on_this_stage(p, ps)]
    device = params[0].device if params else torch.device("cpu")
    dense = [p.detach() for p in params if not is_expert_param(p)
             and (getattr(p, "tensor_model_parallel", False) or ps.tp_rank == 0)]
    expert = [p.detach() for p in params if is_expert_param(p)
              and (getattr(p, "tensor_model_parallel", False) or ps.etp_rank == 0)]
    dense_sq, expert_sq = _sum_sq(dense, device), _sum_sq(expert, device)
    return float(_model_parallel_sum(dense_sq, expert_sq, ps).sqrt().item())
