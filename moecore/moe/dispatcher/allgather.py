"""All-gather dispatcher: every rank sees all tokens of its token group, keeps its experts' rows."""

from __future__ import annotations

import torch

from moecore.moe.dispatcher.base import MoETokenDispatcher
from moecore.moe.permute import permute, unpermute
from moecore.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from moecore.tensor_parallel.utils import all_gather_no_grad


class MoEAllGatherTokenDispatcher(MoETokenDispatcher):
    """All-gather tokens over the token group (etp x ep ranks), compute the local experts'
    weighted outputs for every gathered token, reduce-scatter the sums back to the owners.

    Communication per layer: all-gather [T, H] and reduce-scatter [T, H] over the token group.
    Simple and sync-free; best when the token group is small.
    """

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        self.hidden_shape = hidden.shape
        hidden = hidden.reshape(-1, hidden.shape[-1])
        group = self.token_group
        # Autograd gathers: the backward reduce-scatters grads to the ranks that own the tokens.
        hidden = gather_from_sequence_parallel_region(hidden, group=group)
        probs = gather_from_sequence_parallel_region(probs, group=group)
        routing_map = all_gather_no_grad(routing_map.to(torch.uint8), group).bool()
        lo, hi = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        local_map = routing_map[:, lo:hi]
        local_probs = probs[:, lo:hi]
        self.num_gathered_tokens = hidden.shape[0]
        # Each owner dropped to `capacity` per expert on its own tokens; pad for all of them.
        capacity = self.capacity_for(hidden.shape[0] // self.token_group_size)
        if capacity is not None:
            capacity *= self.token_group_size
        tokens, self.permuted_probs, self.sorted_indices, tokens_per_expert = permute(
            hidden, local_map, probs=local_probs, capacity=capacity)
        return tokens, tokens_per_expert

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        out = unpermute(expert_output, self.sorted_indices, self.num_gathered_tokens,
                        self.permuted_probs)
        # Sums the other EP ranks' experts and the ETP partial sums, returns our tokens.
        out = reduce_scatter_to_sequence_parallel_region(out, group=self.token_group)
        return out.reshape(self.hidden_shape)
