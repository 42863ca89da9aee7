"""All-gather dispatcher: every rank sees all tokens of its token group, keeps its experts' rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecore.moe.dispatcher.base import MoETokenDispatcher, check_dispatch_inputs
from moecore.moe.permute import PermutePlan, permute_tokens, unpermute_tokens
from moecore.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from moecore.tensor_parallel.utils import all_gather_no_grad


@dataclass(frozen=True)
class AllGatherHandle:
    """One all-gather dispatch: ``plan`` maps the local experts' rows back to the gathered
    tokens [T * token group size]."""

    plan: PermutePlan


class MoEAllGatherTokenDispatcher(MoETokenDispatcher):
    """All-gather tokens over the token group (etp x ep ranks), compute the local experts'
    weighted outputs for every gathered token, reduce-scatter the sums back to the owners.

    Communication per layer: all-gather [T, H] and reduce-scatter [T, H] over the token group.
    Simple and sync-free; best when the token group is small.
    """

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AllGatherHandle]:
        """``hidden`` [T, H], ``probs`` / ``routing_map`` [T, E] -> ``(tokens [N, H],
        tokens_per_expert [E_local], probs [N], handle)``; all-gathers over the token group."""
        check_dispatch_inputs(hidden, probs, routing_map)
        group = self.token_group
        # Autograd gathers: the backward reduce-scatters grads to the ranks that own the tokens.
        x_GH = gather_from_sequence_parallel_region(hidden, group=group)  # G = T * group size
        probs_GE = gather_from_sequence_parallel_region(probs, group=group)
        routing_map_GE = all_gather_no_grad(routing_map.to(torch.uint8), group).bool()
        lo, hi = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        # Each owner dropped to `capacity` per expert on its own tokens; pad for all of them.
        capacity = self.capacity_for(x_GH.shape[0] // self.token_group_size)
        if capacity is not None:
            capacity *= self.token_group_size
        tokens, tokens_per_expert, probs_N, plan = permute_tokens(
            x_GH, probs_GE[:, lo:hi], routing_map_GE[:, lo:hi], capacity=capacity)
        return tokens, tokens_per_expert, probs_N, AllGatherHandle(plan)

    def combine(self, expert_output: torch.Tensor, handle: AllGatherHandle) -> torch.Tensor:
        """``expert_output`` [N, H] (weighted rows) -> ``[T, H]``: this rank's tokens, summed
        over every rank's experts (reduce-scatter over the token group)."""
        out_GH = unpermute_tokens(expert_output, handle.plan)
        # Sums the other EP ranks' experts and the ETP partial sums, returns our tokens.
        return reduce_scatter_to_sequence_parallel_region(out_GH, group=self.token_group)
