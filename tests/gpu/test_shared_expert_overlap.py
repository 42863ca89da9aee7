"""``moe_shared_expert_overlap`` on CUDA: the side-stream shared experts give bit-identical
outputs and gradients to the sequential order."""

import pytest
import torch

from moecore.moe.layer import MoELayer
from moecore.parallel_state import ParallelState
from tests.moe_reference import tiny_moe_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layer(overlap: bool, hidden: int, dtype: torch.dtype) -> MoELayer:
    cfg = tiny_moe_config(hidden_size=hidden, num_attention_heads=8, num_moe_experts=8,
                          moe_ffn_hidden_size=2 * hidden, moe_router_topk=2,
                          moe_grouped_gemm_backend="auto", params_dtype=dtype, bf16=True,
                          moe_shared_expert_intermediate_size=4 * hidden,
                          moe_shared_expert_overlap=overlap)
    torch.manual_seed(0)
    return MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single()).cuda()


def _run(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, _ = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]


def test_overlap_is_bit_identical():
    hidden, dtype = 1024, torch.bfloat16
    plain, overlapped = _layer(False, hidden, dtype), _layer(True, hidden, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1024, 4, hidden, device="cuda", dtype=dtype, generator=g)
    grad = torch.randn(1024, 4, hidden, device="cuda", dtype=dtype, generator=g)
    a, b = _run(plain, x, grad), _run(overlapped, x, grad)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2]))

