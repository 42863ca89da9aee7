"""Triton RMSNorm, fp32 main-grad accumulation and TritonAdamW on CUDA vs their references at
training sizes (outputs poisoned first), and that ``auto`` selects them after the self-checks."""

import pytest
import torch
import torch.nn.functional as F

from moecore.kernels import HAVE_TRITON
from moecore.kernels import optim as O
from moecore.kernels import rmsnorm as R

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON),
                                reason="needs CUDA and Triton")
DEV = torch.device("cuda")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", [(16384, 1024), (4097, 4096), (3, 1000), (0, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_fp64_reference(shape, dtype):
    gen = torch.Generator(device=DEV).manual_seed(shape[0])
    torch.full((64 << 20,), float("nan"), device=DEV)  # recycled NaN memory
    x = torch.randn(*shape, device=DEV, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[1], device=DEV, generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(*shape, device=DEV, generator=gen).to(dtype)
    y = R.rms_norm(x, w, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.rms_norm(x64, (shape[1],), w64, 1e-5)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if shape[0] == 0:
        assert y.shape == shape and dx.shape == shape and not dw.any()
        return
    for got, want, what in ((y, y64, "y"), (dx, dx64, "dx"), (dw, dw64, "dw")):
        assert _rel(got, want) < tol, what
    # no worse than torch's own bf16/fp32 kernel against the fp64 reference (x2 slack)
    xt, wt = x.detach().requires_grad_(), w.detach().requires_grad_()
    yt = F.rms_norm(xt, (shape[1],), wt, 1e-5)
    dxt, dwt = torch.autograd.grad(yt, (xt, wt), dy)
    for got, ref, want in ((y, yt, y64), (dx, dxt, dx64), (dw, dwt, dw64)):
        assert _rel(got, want) <= 2 * _rel(ref, want) + 1e-6


def test_auto_picks_triton_rms_norm_on_cuda():
    from moecore.transformer import norms

    norms.set_norm_backend("auto")
    norm = norms.RMSNorm(1024, params_dtype=torch.bfloat16).to(DEV)
    norm(torch.randn(8, 1024, device=DEV, dtype=torch.bfloat16))
    backend = next(b for k, b in norms._RESOLVED.items() if k[0] == "rms_norm")
    assert backend.name in ("triton", "te", "apex")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_accumulate_bitwise_on_cuda(dtype):
    gen = torch.Generator(device=DEV).manual_seed(1)
    n = (1 << 22) + 37  # above TRITON_MIN_NUMEL: the kernel path
    main = torch.randn(n, device=DEV, generator=gen)
    grad = torch.randn(n, device=DEV, generator=gen).to(dtype)
    assert O._triton_ready("main_grad_accumulate", DEV)
    for overwrite in (True, False):
        got, want = main.clone(), main.clone()
        O.accumulate_main_grad_(got, grad, overwrite)
        O.accumulate_main_grad_torch(want, grad, overwrite)
        assert torch.equal(got, want)


def test_triton_adamw_matches_torch_adamw_on_cuda():
    gen = torch.Generator(device=DEV).manual_seed(2)
    shapes = [(2048, 1024), (5, 3), (1 << 20,)]  # kernel, torch fallback, kernel
    ours = [torch.randn(s, device=DEV, generator=gen) for s in shapes]
    ref = [p.clone() for p in ours]
    models = [p.to(torch.bfloat16) for p in ours]
    opt = O.TritonAdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}],
                        lr=1e-3, weight_decay=0.1)
    opt.set_model_copies(zip(ours, models))
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}],
                                lr=1e-3, weight_decay=0.1, fused=True)
    for step in range(4):
        scale = torch.full((), 2.0, device=DEV) if step % 2 else None
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = 1e-3 / (step + 1)
            if scale is not None:
                o.grad_scale = scale
            elif hasattr(o, "grad_scale"):
                del o.grad_scale
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, device=DEV, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert opt.model_copies_written == {id(p) for p in ours}
    for p, q, m in zip(ours, ref, models):
        assert _rel(p, q) < 1e-6
        assert torch.equal(m, p.to(torch.bfloat16))
