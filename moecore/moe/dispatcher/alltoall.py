"""All-to-all dispatcher: variable-split exchange of routed rows over the expert-parallel group."""

from __future__ import annotations

import torch

from moecore.moe.dispatcher.base import (
    MoETokenDispatcher,
    chunk_permutation_index,
    reorder_rows,
)
from moecore.moe.permute import permute, permute_topk, unpermute, unpermute_topk
from moecore.tensor_parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from moecore.tensor_parallel.utils import all_gather_no_grad


class MoEAlltoAllTokenDispatcher(MoETokenDispatcher):
    """Permute local tokens by expert, all-to-all them to the expert owners over the EP group,
    all-gather over the ETP group when experts are tensor-parallel, and reverse on combine.

    Row order on the expert side: received rows come as [etp_rank, src_ep_rank, local_expert];
    they are regrouped to [local_expert, etp_rank, src_ep_rank] so each expert's rows are
    contiguous for the grouped GEMM. Probabilities never travel: they weight the outputs back
    on the owning rank in ``combine``.
    """

    def _exchange_counts(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """[E] local counts -> [etp, ep, E_local] counts of rows this rank will receive."""
        counts = tokens_per_expert.reshape(1, -1)
        # [ep, E]: what every EP peer sends to every expert.
        counts = all_gather_no_grad(counts, self.ep_group)
        lo, hi = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        mine = counts[:, lo:hi].reshape(1, self.ep_size, self.num_local_experts)
        # ETP peers gather each other's received rows, so every ETP rank sees all of them.
        return all_gather_no_grad(mine.contiguous(), self.etp_group)

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        self.hidden_shape = hidden.shape
        hidden = hidden.reshape(-1, hidden.shape[-1])
        self.num_tokens = hidden.shape[0]
        permuted, tokens_per_expert = self._permute(hidden, probs, routing_map)
        self.local_only = self.ep_size == 1 and self.etp_size == 1
        if self.local_only:
            # No exchange: counts stay on the device, so the layer never syncs with the host.
            return permuted, tokens_per_expert
        recv = self._exchange_counts(tokens_per_expert)  # [etp, ep, E_local]
        # The only host sync of the layer: split sizes must be known on the host.
        recv_cpu = recv.cpu()
        self.input_splits = tokens_per_expert.reshape(self.ep_size, -1).sum(1).tolist()
        self.output_splits = recv_cpu[self.ps.etp_rank].sum(1).tolist()
        tokens = all_to_all(permuted, self.output_splits, self.input_splits, group=self.ep_group)
        if self.etp_size > 1:
            self.etp_splits = recv_cpu.sum((1, 2)).tolist()
            tokens = gather_from_sequence_parallel_region(
                tokens, group=self.etp_group, output_split_sizes=self.etp_splits)
        # Regroup [etp, ep, E_local] chunks to [E_local, etp, ep].
        sizes = recv_cpu.reshape(-1)
        order = torch.arange(sizes.numel()).reshape(recv_cpu.shape).permute(2, 0, 1).reshape(-1)
        sort_index = chunk_permutation_index(sizes, order)
        self.unsort_index = torch.empty_like(sort_index)
        self.unsort_index[sort_index] = torch.arange(sort_index.numel())
        self.sort_index = sort_index.to(tokens.device)
        self.unsort_index = self.unsort_index.to(tokens.device)
        tokens = reorder_rows(tokens, self.sort_index, self.unsort_index)
        tokens_per_local_expert = recv_cpu.sum((0, 1))
        return tokens, tokens_per_local_expert

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        if self.local_only:
            return self._unpermute(expert_output).reshape(self.hidden_shape)
        restored = reorder_rows(expert_output, self.unsort_index, self.sort_index)
        if self.etp_size > 1:
            # Sum the ETP partial products and hand each ETP rank back its own rows.
            restored = reduce_scatter_to_sequence_parallel_region(
                restored, group=self.etp_group, input_split_sizes=self.etp_splits)
        back = all_to_all(restored, self.input_splits, self.output_splits, group=self.ep_group)
        return self._unpermute(back).reshape(self.hidden_shape)

    def _permute(self, hidden, probs, routing_map):
        """Rows grouped by global expert; the gather/bmm top-k path when dropless."""
        self.plan = None
        if self.config.moe_expert_capacity_factor is None:
            permuted, self.plan, tokens_per_expert = permute_topk(
                hidden, routing_map, probs, self.config.moe_router_topk,
                fusion=self.config.moe_permute_fusion)
            return permuted, tokens_per_expert
        permuted, self.permuted_probs, self.sorted_indices, tokens_per_expert = permute(
            hidden, routing_map, probs=probs, capacity=self.capacity_for(self.num_tokens))
        return permuted, tokens_per_expert

    def _unpermute(self, rows):
        if self.plan is not None:
            return unpermute_topk(rows, self.plan)
        return unpermute(rows, self.sorted_indices, self.num_tokens, self.permuted_probs)
