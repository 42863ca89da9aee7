"""All-to-all dispatcher: variable-split exchange of routed rows over the expert-parallel group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecore.moe.dispatcher.base import (
    MoETokenDispatcher,
    check_dispatch_inputs,
    chunk_permutation_index,
    reorder_rows,
)
from moecore.moe.permute import PermutePlan, unpermute_tokens
from moecore.tensor_parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from moecore.tensor_parallel.utils import all_gather_no_grad


@dataclass(frozen=True)
class AlltoAllHandle:
    """One all-to-all dispatch. ``plan``: this rank's permuted rows back to its tokens. With an
    exchange (else None): ``input_splits`` / ``output_splits`` [ep] rows sent to / received
    from each EP rank, ``etp_splits`` [etp] rows of each ETP rank (ETP > 1 only), and
    ``sort_index`` / ``unsort_index`` [N], the regrouping of received rows by local expert and
    its inverse."""

    plan: PermutePlan
    input_splits: list[int] | None = None
    output_splits: list[int] | None = None
    etp_splits: list[int] | None = None
    sort_index: torch.Tensor | None = None
    unsort_index: torch.Tensor | None = None


class MoEAlltoAllTokenDispatcher(MoETokenDispatcher):
    """Permute local tokens by expert, all-to-all them to the expert owners over the EP group,
    all-gather over the ETP group when experts are tensor-parallel, and reverse on combine.

    Row order on the expert side: received rows come as [etp_rank, src_ep_rank, local_expert];
    they are regrouped to [local_expert, etp_rank, src_ep_rank] so each expert's rows are
    contiguous for the grouped GEMM. The rows' probabilities [N] travel with them (the same
    exchanges, one value per row), the experts weight their activations with them, and
    ``combine`` sums each token's returned rows.
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

    @property
    def local_only(self) -> bool:
        """No exchange (EP = ETP = 1): counts stay on the device, the layer never syncs."""
        return self.ep_size == 1 and self.etp_size == 1

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AlltoAllHandle]:
        """``hidden`` [T, H], ``probs`` / ``routing_map`` [T, E] -> ``(tokens [N, H],
        tokens_per_expert [E_local], probs [N], handle)``; all-to-all over the EP group,
        all-gather over the ETP group."""
        check_dispatch_inputs(hidden, probs, routing_map)
        permuted, tokens_per_expert, probs_N, plan = self.permute_local(hidden, probs,
                                                                        routing_map)
        if self.local_only:
            return permuted, tokens_per_expert, probs_N, AlltoAllHandle(plan)
        recv = self._exchange_counts(tokens_per_expert)  # [etp, ep, E_local]
        # The only host sync of the layer: split sizes must be known on the host.
        recv_cpu = recv.cpu()
        input_splits = tokens_per_expert.reshape(self.ep_size, -1).sum(1).tolist()
        output_splits = recv_cpu[self.ps.etp_rank].sum(1).tolist()
        # One exchange per tensor: the rows, and their probabilities as a [N, 1] column.
        moved = [all_to_all(t, output_splits, input_splits, group=self.ep_group)
                 for t in (permuted, probs_N.unsqueeze(1))]
        etp_splits = None
        if self.etp_size > 1:
            etp_splits = recv_cpu.sum((1, 2)).tolist()
            # (backward: the ETP ranks' partial probability gradients are summed here)
            moved = [gather_from_sequence_parallel_region(
                t, group=self.etp_group, output_split_sizes=etp_splits) for t in moved]
        sort_index, unsort_index = _regroup_by_expert(recv_cpu, permuted.device)
        tokens, probs_N1 = (reorder_rows(t, sort_index, unsort_index) for t in moved)
        handle = AlltoAllHandle(plan, input_splits, output_splits, etp_splits, sort_index,
                                unsort_index)
        return tokens, recv_cpu.sum((0, 1)), probs_N1.squeeze(1), handle

    def combine(self, expert_output: torch.Tensor, handle: AlltoAllHandle) -> torch.Tensor:
        """``expert_output`` [N, H] (weighted rows) -> ``[T, H]``: the reverse exchange, then
        the sum of each token's rows."""
        if self.local_only:
            return unpermute_tokens(expert_output, handle.plan)
        restored = reorder_rows(expert_output, handle.unsort_index, handle.sort_index)
        if self.etp_size > 1:
            # Sum the ETP partial products and hand each ETP rank back its own rows.
            restored = reduce_scatter_to_sequence_parallel_region(
                restored, group=self.etp_group, input_split_sizes=handle.etp_splits)
        back = all_to_all(restored, handle.input_splits, handle.output_splits,
                          group=self.ep_group)
        return unpermute_tokens(back, handle.plan)


def _regroup_by_expert(recv_cpu: torch.Tensor, device: torch.device):
    """``(sort_index, unsort_index)`` [N] on ``device`` that regroup received rows, chunks of
    ``recv_cpu`` [etp, ep, E_local] sizes, to [E_local, etp, ep] order, and back."""
    sizes = recv_cpu.reshape(-1)
    order = torch.arange(sizes.numel()).reshape(recv_cpu.shape).permute(2, 0, 1).reshape(-1)
    sort_index = chunk_permutation_index(sizes, order)
    unsort_index = torch.empty_like(sort_index)
    unsort_index[sort_index] = torch.arange(sort_index.numel())
    return sort_index.to(device), unsort_index.to(device)
