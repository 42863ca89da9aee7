"""MoELayer: router -> dispatcher -> experts -> combine (+ shared experts).

Data flow for hidden [S, B, H] (S is the local shard under sequence parallel), T = S*B:
router: probs [T, E] fp32 + routing_map [T, E] (aux losses attached through autograd)
-> dispatcher.dispatch: tokens [N, H] grouped by local expert, tokens_per_expert [E_local],
   the rows' probabilities [N], and a frozen handle of this call
-> experts: one grouped GEMM per projection over all local experts, each row's activation
   times its probability (Megatron-Core's grouped MLP does the same)
-> dispatcher.combine(expert_out, handle): rows back to their tokens, summed over top-k [T, H]
   (the combine's backward then needs no expert outputs: they are not kept)
-> + shared experts (dense MLP on every token) -> [S, B, H].
"""

from __future__ import annotations

import torch
from torch import nn

from moecore.config import TransformerConfig
from moecore.moe.dispatcher import DISPATCHERS
from moecore.moe.experts import GroupedMLP, SequentialMLP
from moecore.moe.router import TopKRouter
from moecore.moe.shared_experts import SharedExpertMLP
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel import random as tp_random


class MoELayer(nn.Module):
    """Mixture-of-Experts MLP. ``forward(hidden [S, B, H]) -> (out [S, B, H], None)``.

    ``last_stats`` after each forward: ``tokens_per_expert`` [E] (over the router's reduce
    group), ``dropped_tokens``, and the router's loss values, for logging.
    """

    def __init__(self, config: TransformerConfig, layer_number: int | None = None,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        if not config.is_moe:
            raise ValueError("MoELayer needs config.num_moe_experts to be set")
        self.config = config
        self.layer_number = layer_number
        ps = parallel_state or get_parallel_state()
        if ps.ep_size != config.expert_model_parallel_size or (
                ps.etp_size != config.expert_tensor_parallel_size):
            raise ValueError(
                f"config asks for expert_model_parallel_size={config.expert_model_parallel_size}"
                f", expert_tensor_parallel_size={config.expert_tensor_parallel_size} but the "
                f"parallel state has ep={ps.ep_size}, etp={ps.etp_size}; pass the same sizes to "
                "initialize_model_parallel and the config")
        self.num_local_experts = config.num_moe_experts // ps.ep_size
        self.tp_group = ps.tp_group
        self.router = TopKRouter(config, layer_number=layer_number, parallel_state=ps)
        expert_cls = GroupedMLP if config.moe_grouped_gemm else SequentialMLP
        self.experts = expert_cls(self.num_local_experts, config, parallel_state=ps)
        dispatcher_type = config.moe_token_dispatcher_type
        if dispatcher_type not in DISPATCHERS:
            raise ValueError(
                f"moe_token_dispatcher_type={dispatcher_type!r} is not available; use one of "
                f"{sorted(DISPATCHERS)}")
        self.token_dispatcher = DISPATCHERS[dispatcher_type](config, parallel_state=ps)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = SharedExpertMLP(config, parallel_state=ps)
        self._overlap_stream = None
        self.last_stats: dict = {}

    def forward(self, hidden: torch.Tensor):
        # Shared experts are issued first in both modes, so autograd sums the input gradient's
        # contributions in the same order and overlap on/off is bit-identical.
        overlap = self._shared_expert_stream(hidden)
        shared = None
        if overlap is not None:
            # Shared experts run on a side stream while the main stream routes, exchanges and
            # runs the routed experts; autograd replays each op's backward on the stream it
            # ran on, so the backward overlaps the same way.
            overlap.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(overlap):
                shared = self._shared(hidden)
        elif self.shared_experts is not None:
            shared = self._shared(hidden)
        probs, routing_map = self.router(hidden)
        routed = hidden
        if self.config.moe_apply_probs_on_input:
            # top-1: the token times its probability goes to the expert, which is combined
            # with weight 1 (probs' gradient flows through the scaled input)
            routed = hidden * probs.sum(-1).to(hidden.dtype).view(*hidden.shape[:-1], 1)
            probs = routing_map.to(probs.dtype)
        x_TH = routed.reshape(-1, routed.shape[-1])
        tokens_NH, tokens_per_expert, probs_N, handle = self.token_dispatcher.dispatch(
            x_TH, probs, routing_map)
        expert_out_NH, _ = self.experts(tokens_NH, tokens_per_expert, probs_N)
        out = self.token_dispatcher.combine(expert_out_NH, handle).reshape(hidden.shape)
        if overlap is not None:
            main = torch.cuda.current_stream(hidden.device)
            main.wait_stream(overlap)
            shared.record_stream(main)  # allocated on the side stream, consumed on main
        if shared is not None:
            out = out + shared
        self.last_stats = dict(getattr(self.router, "last_stats", {}))
        return out, None

    def _shared(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared experts' output, checkpointed under ``--recompute-modules shared_experts``."""
        if self.config.recomputes("shared_experts") and torch.is_grad_enabled():
            return tp_random.checkpoint(self.shared_experts, False, hidden, group=self.tp_group)
        return self.shared_experts(hidden)

    def _shared_expert_stream(self, hidden: torch.Tensor):
        """The side stream for ``moe_shared_expert_overlap`` on CUDA, else None (the shared
        experts then run on the current stream, before the routed path)."""
        if (self.shared_experts is None or not self.config.moe_shared_expert_overlap
                or hidden.device.type != "cuda"):
            return None
        if self._overlap_stream is None:
            self._overlap_stream = torch.cuda.Stream(device=hidden.device)
        return self._overlap_stream
