"""Helpers to compare a parallel MoELayer against the single-process reference on every rank.

The reference is the same layer built with ``ParallelState.single()`` from the same seed, so it
holds the *global* weights; ``reference_shard`` cuts a reference tensor down to what a rank of a
given layout holds, so outputs and gradients can be compared parameter by parameter.
"""

from __future__ import annotations

import torch

from moecore.config import TransformerConfig
from moecore.parallel_state import ParallelSizes, ParallelState


def tiny_moe_config(**overrides) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=24,
                num_moe_experts=8, moe_ffn_hidden_size=12, moe_router_topk=2,
                moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, moe_grouped_gemm=True,
                moe_grouped_gemm_backend="bmm", init_method_std=0.2,
                moe_token_dispatcher_type="alltoall")
    base.update(overrides)
    return TransformerConfig(**base)


def chunk(t: torch.Tensor, dim: int, n: int, i: int) -> torch.Tensor:
    return t.chunk(n, dim=dim)[i] if n > 1 else t


def gated_chunk(t: torch.Tensor, dim: int, n: int, i: int) -> torch.Tensor:
    """Shard of a fused [gate | up] tensor: rank i holds [gate_i | up_i] along ``dim``."""
    gate, up = t.chunk(2, dim=dim)
    return torch.cat([chunk(gate, dim, n, i), chunk(up, dim, n, i)], dim=dim)


def reference_shard(name: str, ref: torch.Tensor, cfg: TransformerConfig,
                    ps: ParallelState) -> torch.Tensor:
    """The part of the global reference tensor ``ref`` (param ``name``) that rank ``ps`` holds."""
    if name.startswith("experts."):
        e_local = cfg.num_moe_experts // ps.ep_size
        ref = ref.narrow(0, ps.ep_rank * e_local, e_local)
        etp, r = ps.etp_size, ps.etp_rank
        if name.endswith("weight1"):
            fn = gated_chunk if cfg.gated_linear_unit else chunk
            return fn(ref, 2, etp, r)
        if name.endswith("weight2"):
            return chunk(ref, 1, etp, r)
        raise AssertionError(f"unexpected expert param {name}")
    if name.startswith("shared_experts.mlp."):
        tp, r = ps.tp_size, ps.tp_rank
        if "fc1" in name:
            fn = gated_chunk if cfg.gated_linear_unit else chunk
            return fn(ref, 0, tp, r)
        if "fc2" in name and name.endswith("weight"):
            return chunk(ref, 1, tp, r)
    return ref  # replicated: router weight, shared gate, biases of row layers


def build_state(world: int, tp=1, ep=1, etp=None) -> ParallelState:
    return ParallelState.build(ParallelSizes(world_size=world, tp=tp, ep=ep, etp=etp))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
