"""Activation memory of one MoE layer: what autograd keeps for backward is the minimum the
design needs (no extra [T*k, H] copies of the routed rows), per token."""

import torch

from moecore.memory import saved_activations
from moecore.moe.layer import MoELayer
from moecore.parallel_state import ParallelState
from tests.moe_reference import tiny_moe_config


def test_dropless_layer_saves_only_what_backward_needs():
    # The torch._grouped_mm backend (the GPU fast path; fp32 on CPU). The portable bmm backend
    # saves expert-padded copies by design.
    T, H, F, E, k = 96, 64, 40, 8, 2
    cfg = tiny_moe_config(hidden_size=H, moe_ffn_hidden_size=F, num_moe_experts=E,
                          moe_router_topk=k, moe_grouped_gemm_backend="torch")
    layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single())
    x = torch.randn(T // 4, 4, H, requires_grad=True)
    (out, _), saved = saved_activations(lambda: layer(x), exclude=layer.parameters())
    out.sum().backward()
    f32 = 4
    # Needed: the layer input (router GEMM), the routed rows [T*k, H] (fc1 weight grad), the fc1
    # output [T*k, 2F] (SwiGLU backward) and the activation [T*k, F] (fc2 weight grad). Not the
    # expert output rows: the probabilities weight the activation, so the combine only sums.
    needed = (T * H + T * k * H + 3 * T * k * F) * f32
    # Routing metadata: fp32 logits/probs/scores [T, E] a few times, int64 indices [T*k], the
    # rows' probabilities [T*k] (fp32, for the SwiGLU backward).
    small = T * (4 * E * f32 + 6 * k * 8) + T * k * f32
    assert needed <= saved.total_bytes <= needed + small, (saved.total_bytes, needed,
                                                          saved.largest())
    one_more_copy = T * k * H * f32
    assert small < one_more_copy  # the bound would catch one extra copy of the routed rows
