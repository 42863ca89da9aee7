"""Permute routed tokens into expert-major order and back (pure torch, no loop over experts).

``permute`` turns tokens [T, H] and a routing map [T, E] into rows [N, H] grouped by expert
(expert 0's rows first, each expert's rows in token order), as Megatron-Core does: the token
indices are ``arange(T)`` masked by ``routing_map.T``. ``unpermute`` weights every row by its
probability (when given) and sums the rows of each token back into [T, H]. The MoE layer's
dispatchers (:func:`permute_tokens` / :func:`unpermute_tokens`) hand the rows' probabilities to
the experts instead, which weight their activations, and sum unweighted.

Determinism: the scatter-add in ``unpermute`` (and the backward of the gather in ``permute``)
uses atomics on CUDA; run with ``torch.use_deterministic_algorithms(True)`` for bitwise
reproducible sums (PyTorch then switches ``index_add_`` to a sort-based kernel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moecore.kernels import fusion_request
from moecore.kernels.combine import COMBINE
from moecore.kernels.permute import PlanParts, permute_rows, plan_torch

PAD_INDEX = -1  # sorted_indices value of a padding row (pad-to-capacity mode)


def _check_routing(tokens: torch.Tensor, routing_map: torch.Tensor, probs) -> None:
    if tokens.dim() != 2 or routing_map.dim() != 2 or routing_map.shape[0] != tokens.shape[0]:
        raise ValueError(f"permute needs tokens [T, H] and routing_map [T, E]; got "
                         f"{tuple(tokens.shape)} and {tuple(routing_map.shape)}")
    if probs is not None and probs.shape != routing_map.shape:
        raise ValueError(f"probs {tuple(probs.shape)} must have routing_map's shape "
                         f"{tuple(routing_map.shape)}")


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor | None = None,
            capacity: int | None = None):
    """Group the routed copies of ``tokens`` by expert.

    Args:
        tokens: ``[T, H]``.
        routing_map: ``[T, E]`` bool (or 0/1), token ``t`` goes to expert ``e`` where true.
        probs: optional ``[T, E]`` routing weights; the selected ones travel with their rows.
        capacity: pad to capacity: every expert gets exactly ``capacity`` rows (its routed
            tokens in token order, then zero rows). An expert routed more than ``capacity``
            tokens keeps its first ``capacity`` ones; drop by score beforehand
            (``moe/capacity.py``) to choose which.

    Returns:
        ``(permuted [N, H], permuted_probs [N] | None, sorted_indices [N] int64,
        tokens_per_expert [E] int64)``. Dropless: ``N = routing_map.sum()`` (a host sync, as
        the output size depends on it). With ``capacity``: ``N = E * capacity``, padding rows
        have ``sorted_indices == -1`` and probability 0, ``tokens_per_expert`` is all
        ``capacity``, and nothing syncs with the host.
    """
    _check_routing(tokens, routing_map, probs)
    if capacity is not None:
        return _permute_padded(tokens, routing_map, probs, capacity)
    num_tokens, num_experts = routing_map.shape
    mask = routing_map.bool().T.contiguous()  # [E, T]: expert-major row order
    token_ids = torch.arange(num_tokens, device=tokens.device).expand(num_experts, -1)
    sorted_indices = token_ids.masked_select(mask)
    permuted = tokens.index_select(0, sorted_indices)
    permuted_probs = probs.T.contiguous().masked_select(mask) if probs is not None else None
    tokens_per_expert = mask.sum(dim=1, dtype=torch.int64)
    return permuted, permuted_probs, sorted_indices, tokens_per_expert


def _permute_padded(tokens, routing_map, probs, capacity: int):
    if capacity < 0:
        raise ValueError(f"capacity={capacity} must be >= 0")
    num_tokens, num_experts = routing_map.shape
    device = tokens.device
    mask = routing_map.bool().T  # [E, T]
    # Slot of each routed token inside its expert's block (0-based, in token order).
    slot = torch.cumsum(mask, dim=1) - 1
    keep = mask & (slot < capacity)
    # Scatter every (expert, token) pair to its row; pairs not kept go to a dump slot at the end.
    # No nonzero()/masked_select: the output size is fixed, so nothing syncs with the host.
    dump = num_experts * capacity
    expert_base = torch.arange(num_experts, device=device).unsqueeze(1) * capacity
    dest = torch.where(keep, expert_base + slot, dump)
    token_ids = torch.arange(num_tokens, device=device).expand(num_experts, -1)
    sorted_indices = torch.full((dump + 1,), PAD_INDEX, dtype=torch.int64, device=device)
    sorted_indices = sorted_indices.scatter(0, dest.reshape(-1), token_ids.reshape(-1))[:dump]
    valid = sorted_indices != PAD_INDEX
    gathered = tokens.index_select(0, sorted_indices.clamp(min=0))
    permuted = gathered.masked_fill(~valid[:, None], 0)
    permuted_probs = None
    if probs is not None:
        row_expert = torch.arange(num_experts, device=device).repeat_interleave(capacity)
        picked = probs[sorted_indices.clamp(min=0), row_expert]
        permuted_probs = picked.masked_fill(~valid, 0)
    tokens_per_expert = torch.full((num_experts,), capacity, dtype=torch.int64, device=device)
    return permuted, permuted_probs, sorted_indices, tokens_per_expert


def unpermute(permuted: torch.Tensor, sorted_indices: torch.Tensor, num_tokens: int,
              permuted_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Sum every row of ``permuted`` [N, H] (times ``permuted_probs`` [N] when given) into its
    token ``sorted_indices`` [N]; rows with index -1 (padding) are ignored. Returns ``[T, H]``
    in ``permuted``'s dtype.

    Precision: rows are weighted and summed in fp32 when ``permuted`` is 16-bit (top-k sums of
    bf16 lose bits otherwise, as they would in Megatron-Core where fp32 probs promote the
    product), then cast back once.
    """
    if permuted.dim() != 2 or sorted_indices.shape != permuted.shape[:1]:
        raise ValueError(f"unpermute needs permuted [N, H] and sorted_indices [N]; got "
                         f"{tuple(permuted.shape)} and {tuple(sorted_indices.shape)}")
    if permuted_probs is not None and permuted_probs.shape != sorted_indices.shape:
        raise ValueError(f"permuted_probs {tuple(permuted_probs.shape)} must be [N] = "
                         f"{tuple(sorted_indices.shape)}")
    acc_dtype = torch.float32 if permuted.element_size() < 4 else permuted.dtype
    if permuted_probs is not None:
        # 16-bit rows times fp32 probs: type promotion makes the product fp32 in one kernel.
        rows = permuted * permuted_probs.to(acc_dtype).unsqueeze(-1)
    else:
        rows = permuted.to(acc_dtype)
    # Padding rows go to an extra dump row, so nothing from them (even NaN from never-written
    # kernel output) reaches a real token, and no host sync is needed to find them.
    index = torch.where(sorted_indices < 0, num_tokens, sorted_indices)
    return _SumRowsByIndex.apply(rows, index, num_tokens).to(permuted.dtype)


class _SumRowsByIndex(torch.autograd.Function):
    """``out [T, H]``: row ``i`` of ``rows [N, H]`` added to ``out[index[i]]`` (``index == T``:
    dropped). Backward gathers ``grad[index]`` (0 for dropped rows) and keeps only ``index``,
    not the rows (autograd's ``index_add`` would keep them)."""

    @staticmethod
    def forward(ctx, rows, index, num_tokens: int):
        ctx.save_for_backward(index)
        out = rows.new_zeros(num_tokens + 1, rows.shape[1]).index_add_(0, index, rows)
        return out[:num_tokens]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
        return padded.index_select(0, index), None, None


# ---- dropless top-k fast path: gathers and a batched matmul, no atomics --------------------


class TopKPlan:
    """Where each token's k routed copies sit in the permuted rows (dropless routing only).

    ``sorted_indices`` [N]: token of each permuted row (expert-major, as ``permute``);
    ``slot_rows`` [T*k]: permuted row of token t's j-th expert (experts ascending);
    ``row_slots`` [N]: the inverse, flat (t*k + j) index of each row; ``probs`` [T, k] or None;
    ``expert_ids`` [T, k]: token t's experts, ascending. ``TopKPlan(routing_map, probs, topk)``
    builds it with the torch reference (``moecore.kernels.permute.plan_torch``).
    """

    def __init__(self, routing_map: torch.Tensor, probs: torch.Tensor | None, topk: int):
        self._set(plan_torch(routing_map, topk), probs, routing_map.shape[0], topk)

    @classmethod
    def from_parts(cls, parts: PlanParts, probs: torch.Tensor | None, num_tokens: int,
                   topk: int, request: str = "auto") -> TopKPlan:
        plan = cls.__new__(cls)
        plan._set(parts, probs, num_tokens, topk, request)
        return plan

    def _set(self, parts: PlanParts, probs, num_tokens: int, topk: int,
             request: str = "auto") -> None:
        self.topk = topk
        # moe_permute_fusion as a backend request: it picks the combine kernel too (Megatron's
        # permute fusion covers the unpermute).
        self.request = request
        self.num_tokens = num_tokens
        self.slot_rows, self.row_slots, self.sorted_indices = parts[:3]
        self.tokens_per_expert, self.expert_ids = parts[3:]
        # [T, E] -> [T, k] at the token's experts (differentiable in probs).
        self.probs = None if probs is None else probs.gather(1, self.expert_ids)


@functools.cache
def combine_backend(device: torch.device, requested: str = "auto"):
    """The ``moe_combine`` backend :func:`unpermute_topk` runs on ``device`` for ``requested``
    (the plan's ``moe_permute_fusion`` request; chosen once per device, logged once)."""
    return COMBINE.select(requested, device=device)


class _CombineRows(torch.autograd.Function):
    """``out[t] = sum_j probs[t, j] * rows[slot_rows[t, j]]`` through the ``moe_combine``
    backend (a fused Triton pass on CUDA, gather + batched matmul elsewhere)."""

    @staticmethod
    def forward(ctx, permuted, probs_tk, plan: TopKPlan):
        forward_fn, ctx.backward_fn = combine_backend(permuted.device, plan.request).fn
        ctx.plan = plan
        # The rows are read back only for the probabilities' gradient: without one (weights
        # applied by the experts, or none), backward keeps only their shape.
        need_rows = ctx.needs_input_grad[1]
        ctx.rows_like = None if need_rows else (permuted.shape, permuted.dtype)
        ctx.save_for_backward(permuted if need_rows else None, probs_tk)
        return forward_fn(permuted, plan.slot_rows, probs_tk)

    @staticmethod
    def backward(ctx, grad_out):
        permuted, probs_tk = ctx.saved_tensors
        if permuted is None:  # a stand-in with the rows' shape and dtype; never read
            shape, dtype = ctx.rows_like
            permuted = grad_out.new_empty((), dtype=dtype).expand(shape)
        grad_rows, grad_probs = ctx.backward_fn(grad_out, permuted, ctx.plan.slot_rows, probs_tk,
                                                ctx.needs_input_grad[1])
        if grad_probs is not None:
            grad_probs = grad_probs.to(probs_tk.dtype)
        return grad_rows, grad_probs, None


def permute_topk(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor | None,
                 topk: int, fusion: bool | None = None):
    """Dropless ``permute`` for exactly ``topk`` experts per token.

    Returns ``(permuted [T*k, H], plan, tokens_per_expert [E])``; rows are in the same order as
    :func:`permute`. Pass ``plan`` to :func:`unpermute_topk`. ``fusion`` (the config's
    ``moe_permute_fusion``) picks the ``moe_permute`` and ``moe_combine`` backends: ``None``
    auto (the fused Triton kernels on CUDA, no host sync), ``True`` Triton required, ``False``
    the torch references.
    """
    _check_routing(tokens, routing_map, probs)
    request = fusion_request(fusion)
    permuted, parts = permute_rows(tokens, routing_map, topk, request)
    plan = TopKPlan.from_parts(parts, probs, routing_map.shape[0], topk, request)
    return permuted, plan, plan.tokens_per_expert


def unpermute_topk(permuted: torch.Tensor, plan: TopKPlan) -> torch.Tensor:
    """Weighted top-k sum of ``permuted`` [T*k, H] back to ``[T, H]`` (probs from the plan)."""
    if plan.probs is None:
        ones = torch.ones(plan.num_tokens, plan.topk, dtype=permuted.dtype,
                          device=permuted.device)
        return _CombineRows.apply(permuted, ones, plan)
    return _CombineRows.apply(permuted, plan.probs, plan)


# ---- what the dispatchers call: one of the two paths above, and its inverse ----------------


@dataclass(frozen=True)
class PermutePlan:
    """How :func:`permute_tokens`'s rows go back to their tokens (what :func:`unpermute_tokens`
    needs): the top-k ``topk_plan`` when dropless, else ``sorted_indices`` [N] of
    :func:`permute`; ``num_tokens`` T."""

    num_tokens: int
    topk_plan: TopKPlan | None = None
    sorted_indices: torch.Tensor | None = None


def permute_tokens(x_TH: torch.Tensor, probs_TE: torch.Tensor | None,
                   routing_map_TE: torch.Tensor, topk: int | None = None,
                   capacity: int | None = None, fusion: bool | None = None):
    """Rows of ``x_TH`` grouped by expert: ``(rows_NH, tokens_per_expert_E, probs_N,
    PermutePlan)``, ``probs_N`` [N] the rows' routing weights (differentiable in ``probs_TE``;
    None without ``probs_TE``), for the experts to apply.

    ``topk`` (dropless routing, exactly ``topk`` experts per token) takes the gather/bmm path
    :func:`permute_topk` (``fusion`` picks its backend); otherwise :func:`permute` with
    ``capacity`` (None: no padding; padding rows get weight 0). Rows are in the same order
    either way.
    """
    if topk is not None:
        rows_NH, plan, tokens_per_expert = permute_topk(x_TH, routing_map_TE, None, topk,
                                                        fusion=fusion)
        probs_N = None
        if probs_TE is not None:  # [T, E] -> [T, k] at the token's experts -> row order
            probs_N = probs_TE.gather(1, plan.expert_ids).reshape(-1).index_select(
                0, plan.row_slots)
        return rows_NH, tokens_per_expert, probs_N, PermutePlan(x_TH.shape[0], topk_plan=plan)
    rows_NH, probs_N, sorted_indices, tokens_per_expert = permute(
        x_TH, routing_map_TE, probs=probs_TE, capacity=capacity)
    return rows_NH, tokens_per_expert, probs_N, PermutePlan(x_TH.shape[0],
                                                            sorted_indices=sorted_indices)


def unpermute_tokens(rows_NH: torch.Tensor, plan: PermutePlan) -> torch.Tensor:
    """Inverse of :func:`permute_tokens`: each token's rows summed, ``[T, H]`` (in fp32 for
    16-bit rows, cast back once). The rows are already weighted (the experts applied
    ``probs_N``)."""
    if plan.topk_plan is not None:
        return unpermute_topk(rows_NH, plan.topk_plan)
    return unpermute(rows_NH, plan.sorted_indices, plan.num_tokens)
