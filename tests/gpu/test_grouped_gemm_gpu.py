"""CUDA grouped-GEMM backends in bf16 against an fp32 per-expert reference (sm90+ only)."""

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.kernels.grouped_gemm import GROUPED_GEMM, grouped_mm, select_backend
from moecore.moe.experts import GroupedMLP, SequentialMLP
from moecore.parallel_state import ParallelState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="torch._grouped_mm fast path needs sm90+")

# (counts, K, M): empty experts, unaligned K/M (padded by the backend), N = 0, a big expert.
SHAPES = [
    ([3, 0, 5, 2], 13, 7),
    ([0, 0, 0, 0], 64, 32),
    ([0, 130, 0, 1, 77, 0, 0, 5], 256, 192),
    ([1000, 0, 24], 128, 96),
    ([17, 33, 0, 65], 512, 1024),
]


def _fp32_reference(x, w, counts, dy):
    x = x.float().requires_grad_()
    w = w.float().requires_grad_()
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x[start:start + c] @ w[e])
        start += c
    y = torch.cat(outs)
    (y * dy.float()).sum().backward()
    return y.detach(), x.grad, w.grad


def _bf16_run(backend, x, w, tpe, dy):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = grouped_mm(x, w, tpe, backend=backend)
    # Recycled NaN memory: a kernel that skips empty experts' weight gradients would show it.
    dirty = [torch.full_like(w, float("nan")) for _ in range(3)]
    del dirty
    (y * dy).sum().backward()
    return y.detach(), x.grad, w.grad


def _rel(a, b):
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("backend", ["torch", "bmm", "loop", "grouped_gemm"])
@pytest.mark.parametrize("counts,k,m", SHAPES)
def test_cuda_backend_bf16_matches_fp32_reference(backend, counts, k, m):
    dev = torch.device("cuda")
    ok, reason = GROUPED_GEMM.get(backend).is_available(device=dev, dtype=torch.bfloat16)
    if not ok:
        pytest.skip(reason)
    if backend == "torch" and not _sm90():
        pytest.skip("sm90+ only")
    g = torch.Generator(device=dev).manual_seed(len(counts) * 1000 + k)
    n = sum(counts)
    x = torch.randn(n, k, device=dev, generator=g).bfloat16()
    w = (torch.randn(len(counts), k, m, device=dev, generator=g) / k ** 0.5).bfloat16()
    dy = torch.randn(n, m, device=dev, generator=g).bfloat16()
    for tpe in (torch.tensor(counts), torch.tensor(counts, device=dev)):  # host and device
        y, dx, dw = _bf16_run(backend, x, w, tpe, dy)
        y_ref, dx_ref, dw_ref = _fp32_reference(x, w, counts, dy)
        assert y.dtype == torch.bfloat16 and y.shape == (n, m)
        # bf16 output rounding (2^-9) plus accumulation-order differences.
        for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
            assert _rel(got, ref) < 1e-2
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.count_nonzero(dw[e]) == 0


@needs_sm90
def test_auto_picks_torch_on_sm90_bf16():
    assert select_backend("auto", torch.device("cuda"), torch.bfloat16, log=False).name == "torch"
    assert select_backend("auto", torch.device("cuda"), torch.float32, log=False).name in (
        "grouped_gemm", "bmm")


@needs_sm90
def test_grouped_mlp_bf16_torch_backend_matches_sequential():
    config = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                               num_moe_experts=8, moe_ffn_hidden_size=384, bf16=True,
                               params_dtype=torch.bfloat16, moe_grouped_gemm_backend="auto")
    counts = [40, 0, 13, 200, 0, 1, 77, 9]
    with torch.device("cuda"):
        torch.manual_seed(0)
        grouped = GroupedMLP(8, config, parallel_state=ParallelState.single())
        torch.manual_seed(0)
        seq = SequentialMLP(8, config.replace(params_dtype=torch.float32),
                            parallel_state=ParallelState.single())
        x = torch.randn(sum(counts), 256).bfloat16()
        dy = torch.randn(sum(counts), 256).bfloat16()
    assert grouped.backend.name == "torch"
    xg = x.clone().requires_grad_()
    out, _ = grouped(xg, torch.tensor(counts, device="cuda"))
    (out * dy).sum().backward()
    xs = x.float().requires_grad_()
    ref, _ = seq(xs, torch.tensor(counts))
    (ref * dy.float()).sum().backward()
    assert _rel(out, ref.detach()) < 2e-2
    assert _rel(xg.grad, xs.grad) < 2e-2
    ref_w1 = torch.stack([e.linear_fc1.weight.grad.t() for e in seq.local_experts])
    assert _rel(grouped.weight1.grad, ref_w1) < 2e-2
