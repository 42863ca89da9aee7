"""FP8 on the GPU: the ``torch`` FP8 GEMM backend against the ``emulated`` reference (same
quantised operands, so only accumulation differs), and FP8 layers against bf16 within FP8
tolerances. Skipped without a GPU of compute capability >= 8.9."""

import pytest
import torch

from moecore.fp8 import Fp8Meta, Fp8Recipe, fp8_grouped_mm, fp8_linear
from moecore.kernels.fp8_gemm import EMULATED, FP8_GEMM
from moecore.kernels.fp8_quant import quantize_blocks, quantize_tensor, quantize_tiles

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability >= 8.9")
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def _rel(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def _torch_gemm(recipe="tensorwise", grouped=False):
    backend = FP8_GEMM.get("torch")
    ok, why = backend.is_available(device=torch.device("cuda"), recipe=recipe, grouped=grouped)
    if not ok:
        pytest.fail(why)
    return backend.fn


def _q(x, dtype=E4):
    return quantize_tensor(x, 448.0 / x.abs().amax().float(), dtype)


@pytest.mark.parametrize("m,k,n", [(256, 512, 384), (48, 128, 16)])
def test_scaled_mm_matches_emulated(m, k, n):
    g = _torch_gemm()
    a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    for qa, qb in [(_q(a), _q(b)), (_q(a, E5), _q(b))]:
        assert _rel(g.mm(qa, qb, torch.float32), EMULATED.mm(qa, qb, torch.float32)) < 1e-5
    if k % 128 == 0 and n % 128 == 0:
        g = _torch_gemm("blockwise")
        for qb in (quantize_blocks(b, E4), quantize_tiles(b, E4)):
            qa = quantize_tiles(a * torch.logspace(-2, 2, k, device="cuda"), E5)
            assert _rel(g.mm(qa, qb, torch.float32), EMULATED.mm(qa, qb, torch.float32)) < 1e-4


def test_scaled_grouped_mm_matches_emulated():
    g = _torch_gemm(grouped=True)
    counts = torch.tensor([64, 0, 160, 32], device="cuda")
    x, dy = torch.randn(256, 256, device="cuda"), torch.randn(256, 384, device="cuda")
    w = torch.randn(4, 384, 256, device="cuda") * torch.tensor([1, 2, 3, 4], device="cuda")[
        :, None, None]
    qw = quantize_tensor(w, 448.0 / w.abs().amax((1, 2)), E4)
    qx, qdy = _q(x), _q(dy, E5)
    assert _rel(g.grouped_mm(qx, qw, counts, torch.float32),
                EMULATED.grouped_mm(qx, qw, counts.cpu(), torch.float32)) < 1e-5
    got = g.grouped_wgrad(qdy, qx, counts, torch.float32)
    ref = EMULATED.grouped_wgrad(qdy, qx, counts.cpu(), torch.float32)
    assert _rel(got, ref) < 1e-5 and got[1].abs().sum() == 0


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "blockwise"])
def test_fp8_linear_and_grouped_close_to_bf16(recipe):
    torch.manual_seed(0)
    rec = Fp8Recipe("hybrid", recipe)
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(1024, 512, device="cuda") * 0.02).bfloat16().requires_grad_()
    dy = torch.randn(4, 256, 1024, device="cuda", dtype=torch.bfloat16)
    grads = []
    for fn in (lambda: fp8_linear(x, w, None, Fp8Meta(rec)), lambda: x @ w.t()):
        x.grad = w.grad = None
        out = fn()
        out.backward(dy)
        grads.append((out, x.grad, w.grad))
    for got, ref in zip(*grads):
        assert _rel(got, ref) < 0.08
    counts = torch.tensor([300, 0, 500, 224], device="cuda")
    xe = x.detach().reshape(-1, 512)[:1024].clone().requires_grad_()
    we = (torch.randn(4, 512, 256, device="cuda") * 0.02).bfloat16().requires_grad_()
    dye = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    out = fp8_grouped_mm(xe, we, counts, Fp8Meta(rec, num_weights=4, grouped=True))
    out.backward(dye)
    got = (out, xe.grad, we.grad)
    xe.grad = we.grad = None
    ref_out = torch.cat([r @ we[e] for e, r in enumerate(xe.split(counts.tolist()))])
    ref_out.backward(dye)
    for a, b in zip(got, (ref_out, xe.grad, we.grad)):
        assert _rel(a, b) < 0.08


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_moe_layer_close_to_bf16(recipe):
    from benchmarks.fp8_moe_layer import build  # noqa: PLC0415 - GPU-only helper

    shape = dict(hidden=1024, ffn=512, experts=8, topk=2, tokens=2048)
    x = torch.randn(2048, 1, 1024, device="cuda", dtype=torch.bfloat16)
    outs = []
    for r in (recipe, None):
        layer = build(shape, torch.device("cuda"), torch.bfloat16, r, "torch")
        xr = x.clone().requires_grad_()
        out = layer(xr)[0]
        out.float().square().mean().backward()
        outs.append((out, xr.grad))
    for got, ref in zip(*outs):
        assert _rel(got, ref) < 0.1


def test_triton_casts_bit_identical_on_gpu():
    from moecore.kernels import fp8_quant as Q  # noqa: PLC0415

    ok, why = Q.FP8_CAST.get("triton").is_available(device=torch.device("cuda"))
    assert ok, why
    x = (torch.randn(4096, 1024, device="cuda") * 7).bfloat16()
    w = torch.randn(8, 256, 512, device="cuda").bfloat16()
    for dtype in Q.FP8_MAX:
        a, b = Q.quantize_tiles_triton(x, dtype), Q.quantize_tiles(x, dtype)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
        assert torch.equal(a.scale_inv, b.scale_inv)
        s = 448.0 / w.float().abs().amax((1, 2))
        a, b = Q.quantize_tensor_triton(w, s, dtype), Q.quantize_tensor(w, s, dtype)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
