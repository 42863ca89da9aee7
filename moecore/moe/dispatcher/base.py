"""Token-dispatcher base: what every dispatcher shares (expert ranges, chunk reordering, the
permutation of local tokens).

Every rank of the *token group* (the expert-tensor-and-model-parallel group, ``etp x ep`` ranks)
contributes its own tokens and gets back exactly the outputs for them. Ranks whose tokens are
duplicates (tensor parallel without sequence parallel) still get correct results; they only
spend extra expert compute, as in Megatron-Core.
"""

from __future__ import annotations

import torch

from moecore.config import TransformerConfig
from moecore.moe.capacity import get_capacity
from moecore.moe.permute import PermutePlan, permute_tokens
from moecore.parallel_state import ParallelState, get_parallel_state


def chunk_permutation_index(split_sizes: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Row index that reorders consecutive chunks (sizes ``split_sizes`` [C]) into ``order``.

    ``x.index_select(0, idx)`` equals ``cat([chunk[i] for i in order])`` without a Python loop.
    """
    split_sizes = split_sizes.to(torch.long)
    starts = torch.cumsum(split_sizes, 0) - split_sizes
    new_sizes = split_sizes[order]
    new_starts = starts[order]
    new_offsets = torch.cumsum(new_sizes, 0) - new_sizes
    total = int(new_sizes.sum())
    shift = torch.repeat_interleave(new_starts - new_offsets, new_sizes, output_size=total)
    return shift + torch.arange(total, device=split_sizes.device)


class _ReorderRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for a permutation ``index``, whose backward is the gather by
    the inverse permutation instead of index_select's atomic scatter-add."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def reorder_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, H] reordered by the permutation ``index`` [N] (``inverse[index] = arange``)."""
    return _ReorderRows.apply(x, index, inverse)


def check_dispatch_inputs(hidden: torch.Tensor, probs: torch.Tensor,
                          routing_map: torch.Tensor) -> None:
    """``hidden`` [T, H], ``probs`` and ``routing_map`` [T, E], else a ValueError."""
    if hidden.dim() != 2 or routing_map.dim() != 2 or probs.shape != routing_map.shape or (
            routing_map.shape[0] != hidden.shape[0]):
        raise ValueError(f"dispatch needs hidden [T, H], probs and routing_map [T, E]; got "
                         f"{tuple(hidden.shape)}, {tuple(probs.shape)}, "
                         f"{tuple(routing_map.shape)} (flatten [S, B, H] to [S*B, H] first)")


class MoETokenDispatcher:
    """Moves routed tokens to the ranks holding their experts and the results back.

    ``dispatch(hidden [T, H], probs [T, E], routing_map [T, E]) ->
    (tokens [N, H], tokens_per_expert [E_local], probs [N], handle)``: ``probs [N]`` (fp32) are
    the rows' routing weights, travelling with them (differentiable), for the experts to apply
    to their activations; ``combine(expert_out [N, H], handle) -> [T, H]`` sums each token's
    (weighted) rows. The handle is a frozen record of one
    call (each dispatcher has its own type); the dispatcher keeps nothing of it, so several
    dispatches may be in flight before their combines (run the collective ones in the same
    order on every rank).
    """

    def __init__(self, config: TransformerConfig, parallel_state: ParallelState | None = None):
        self.config = config
        self.ps = parallel_state or get_parallel_state()
        self.num_experts = config.num_moe_experts
        self.ep_size, self.ep_rank = self.ps.ep_size, self.ps.ep_rank
        self.num_local_experts = self.num_experts // self.ep_size
        first = self.ep_rank * self.num_local_experts
        self.local_expert_indices = list(range(first, first + self.num_local_experts))
        self.ep_group = self.ps.ep_group
        self.etp_group = self.ps.etp_group
        self.etp_size = self.ps.etp_size
        self.token_group = self.ps.group("expert_tensor_and_model_parallel")
        self.token_group_size = self.ps.world_size_of("expert_tensor_and_model_parallel")

    def capacity_for(self, num_tokens: int) -> int | None:
        """Rows per expert when padding to capacity, else None (dropless or drop-only)."""
        cfg = self.config
        if not cfg.moe_pad_expert_input_to_capacity:
            return None
        return get_capacity(num_tokens * cfg.moe_router_topk, self.num_experts,
                            cfg.moe_expert_capacity_factor)

    def permute_local(self, x_TH: torch.Tensor, probs_TE: torch.Tensor,
                      routing_map_TE: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PermutePlan]:
        """This rank's tokens grouped by global expert, before an exchange:
        ``(rows_NH, tokens_per_expert_E, probs_N, plan)``; the gather/bmm top-k path when
        dropless."""
        cfg = self.config
        if cfg.moe_expert_capacity_factor is None:
            return permute_tokens(x_TH, probs_TE, routing_map_TE, topk=cfg.moe_router_topk,
                                  fusion=cfg.moe_permute_fusion)
        return permute_tokens(x_TH, probs_TE, routing_map_TE,
                              capacity=self.capacity_for(x_TH.shape[0]))

    # Megatron-Core's older names.
    def token_permutation(self, hidden, probs, routing_map):
        return self.dispatch(hidden, probs, routing_map)

    def token_unpermutation(self, expert_output, handle):
        return self.combine(expert_output, handle)
