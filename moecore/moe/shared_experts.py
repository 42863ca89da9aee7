"""Shared experts: a dense MLP every token goes through, optionally gated (Qwen-style)."""

from __future__ import annotations

import torch
from torch import nn

from moecore.config import TransformerConfig
from moecore.parallel_state import ParallelState
from moecore.transformer.mlp import MLP


class SharedExpertMLP(nn.Module):
    """``forward(hidden [S, B, H]) -> [S, B, H]``: tensor-parallel MLP of width
    ``moe_shared_expert_intermediate_size``; with ``moe_shared_expert_gate`` the output is
    scaled by ``sigmoid(hidden @ gate_weight.T)`` (gate_weight [1, H], replicated over TP).
    """

    def __init__(self, config: TransformerConfig, parallel_state: ParallelState | None = None):
        super().__init__()
        self.mlp = MLP(config, ffn_hidden_size=config.moe_shared_expert_intermediate_size,
                       parallel_state=parallel_state)
        self.gate_weight = None
        if config.moe_shared_expert_gate:
            w = torch.empty(1, config.hidden_size, dtype=config.params_dtype)
            nn.init.normal_(w, 0.0, config.init_method_std)
            self.gate_weight = nn.Parameter(w)
            self.gate_weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(hidden)
        if bias is not None:
            out = out + bias
        if self.gate_weight is not None:
            gate = torch.sigmoid(hidden @ self.gate_weight.t().to(hidden.dtype))
            out = out * gate
        return out
