"""MoE layers at inference: dropless whatever the training capacity, and a fixed-shape forward
that a CUDA graph can capture.

:func:`dropless` switches token dropping off for the duration of generation (the router and
dispatchers read ``moe_expert_capacity_factor`` / ``moe_pad_expert_input_to_capacity`` at each
forward). :func:`static_moe_forward` computes the same function as ``MoELayer.forward`` with
every shape fixed by the token count (``T * topk`` expert rows, sorted by expert on the device,
one grouped GEMM per projection over device-side counts): no host sync, so decode steps can be
graphed. It needs all experts on this rank (EP = ETP = 1) and the grouped experts
(``--moe-grouped-gemm``) with a sync-free GEMM backend (:func:`static_moe_supported`).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from moecore.moe import MoELayer
from moecore.moe.experts import GroupedMLP

# Grouped-GEMM backends that take device-side counts without reading them on the host.
SYNC_FREE_GEMM = ("torch", "grouped_gemm")


@contextlib.contextmanager
def dropless(config):
    """No token dropping while inside (restores the config's capacity settings after)."""
    saved = (config.moe_expert_capacity_factor, config.moe_pad_expert_input_to_capacity)
    config.moe_expert_capacity_factor, config.moe_pad_expert_input_to_capacity = None, False
    try:
        yield
    finally:
        config.moe_expert_capacity_factor, config.moe_pad_expert_input_to_capacity = saved


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def static_moe_supported(layer: MoELayer, device: torch.device) -> tuple[bool, str]:
    """Whether :func:`static_moe_forward` can run ``layer`` (and why not)."""
    if layer.token_dispatcher.ep_size > 1 or layer.token_dispatcher.ps.etp_size > 1:
        return False, "experts are split over ranks (EP or expert TP > 1)"
    if not isinstance(layer.experts, GroupedMLP):
        return False, "the experts are not grouped (--moe-grouped-gemm is off)"
    backend = layer.experts._resolve(device, layer.experts.weight1.dtype)
    if backend.name not in SYNC_FREE_GEMM:
        return False, f"the grouped GEMM backend {backend.name!r} reads the counts on the host"
    if layer.config.moe_apply_probs_on_input:
        return False, "moe_apply_probs_on_input is set"
    return True, ""


def static_moe_forward(layer: MoELayer, hidden: torch.Tensor):
    """``hidden [S, B, H]`` -> ``(out [S, B, H], None)``, as ``layer.forward`` (dropless)."""
    probs, routing_map = layer.router(hidden)  # [T, E] fp32, [T, E] bool
    k = layer.config.moe_router_topk
    x_TH = hidden.reshape(-1, hidden.shape[-1])
    # Exactly k experts per token (dropless): their indices without nonzero().
    idx_TK = torch.topk(routing_map.float(), k, dim=-1).indices
    weight_TK = probs.gather(1, idx_TK)
    expert_N = idx_TK.reshape(-1)  # N = T * k
    order_N = torch.argsort(expert_N, stable=True)
    rows_NH = x_TH.index_select(0, order_N // k)
    counts = torch.zeros(layer.num_local_experts, dtype=torch.int64, device=hidden.device)
    counts.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    out_rows_NH, _ = layer.experts(rows_NH, counts)
    out_NH = torch.empty_like(out_rows_NH).index_copy_(0, order_N, out_rows_NH)
    out_TKH = out_NH.view(-1, k, out_NH.shape[-1]).float() * weight_TK[..., None]
    out = out_TKH.sum(1).to(hidden.dtype).reshape(hidden.shape)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(hidden)
    return out, None


@contextlib.contextmanager
def static_moe(model: nn.Module):
    """Every MoE layer of ``model`` runs :func:`static_moe_forward` while inside."""
    layers = moe_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(static_moe_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
