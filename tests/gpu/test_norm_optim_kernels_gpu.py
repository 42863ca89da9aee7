"""Triton RMSNorm (also with the residual add fused in), fp32 main-grad accumulation and
TritonAdamW on CUDA vs their references at training sizes (outputs poisoned first), and that
``auto`` selects them after the self-checks."""

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


@pytest.mark.parametrize("shape", [(16384, 1024), (2049, 2, 1000), (3, 4096), (0, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_d_hidden", [True, False])
def test_add_rms_norm_matches_fp64_reference(shape, dtype, with_d_hidden):
    gen = torch.Generator(device=DEV).manual_seed(shape[0] + 1)
    torch.full((64 << 20,), float("nan"), device=DEV)  # recycled NaN memory
    h = shape[-1]
    res, out = (torch.randn(*shape, device=DEV, generator=gen).to(dtype).requires_grad_()
                for _ in range(2))
    w = (1 + 0.1 * torch.randn(h, device=DEV, generator=gen)).to(dtype).requires_grad_()
    dh, dy = (torch.randn(*shape, device=DEV, generator=gen).to(dtype) for _ in range(2))
    outs, seeds = (2, (dh, dy)) if with_d_hidden else (1, (dy,))
    hidden, y = R.add_rms_norm(res, out, w, 1e-5)
    dres, dout, dw = torch.autograd.grad((hidden, y)[-outs:], (res, out, w), seeds)
    # hidden is torch's own residual + out bit for bit; both inputs get one grad
    assert torch.equal(hidden, res.detach() + out.detach())
    assert torch.equal(dres, dout) and dres.dtype == dtype and dw.dtype == dtype
    r64, o64, w64 = (t.detach().double().requires_grad_() for t in (res, out, w))
    h64 = r64 + o64
    y64 = F.rms_norm(h64, (h,), w64, 1e-5)
    dr64, _, dw64 = torch.autograd.grad((h64, y64)[-outs:], (r64, o64, w64),
                                        [t.double() for t in seeds])
    if res.numel() == 0:
        assert y.shape == dres.shape == shape and not dw.any()
        return
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want, what in ((y, y64, "y"), (dres, dr64, "d_residual"), (dw, dw64, "dw")):
        assert _rel(got, want) < tol, what
    # no worse than the unfused torch ops (add, F.rms_norm, autograd's add) (x2 slack)
    rt, ot, wt = (t.detach().requires_grad_() for t in (res, out, w))
    ht = rt + ot
    yt = F.rms_norm(ht, (h,), wt, 1e-5)
    drt, _, dwt = torch.autograd.grad((ht, yt)[-outs:], (rt, ot, wt), seeds)
    for got, ref, want in ((y, yt, y64), (dres, drt, dr64), (dw, dwt, dw64)):
        assert _rel(got, want) <= 2 * _rel(ref, want) + 1e-6


@pytest.mark.parametrize("what,fused_calls", [("layer", 1), ("block", 6)])
def test_fused_residual_add_norm_matches_unfused_bf16(monkeypatch, what, fused_calls):
    """bf16 under the ``triton`` norm backend: a TransformerLayer (the attention residual add
    fused into pre_mlp_layernorm) and a 3-layer TransformerBlock (also each MLP add fused into
    the next input norm and the final norm) give the unfused output and grads."""
    from moecore.config import TransformerConfig
    from moecore.parallel_state import ParallelState
    from moecore.transformer import norms
    from moecore.transformer.block import TransformerBlock
    from moecore.transformer.layer import TransformerLayer

    calls = []
    real = R.add_rms_norm
    monkeypatch.setattr(R, "add_rms_norm", lambda *a: (calls.append(1), real(*a))[1])
    cfg = TransformerConfig(num_layers=3, hidden_size=1024, num_attention_heads=8,
                            num_query_groups=4, ffn_hidden_size=2048, bf16=True,
                            params_dtype=torch.bfloat16, norm_backend="triton")
    torch.manual_seed(0)
    ps = ParallelState.single()
    with torch.device(DEV):
        model = (TransformerLayer(cfg, layer_number=2, parallel_state=ps) if what == "layer"
                 else TransformerBlock(cfg, parallel_state=ps))
    gen = torch.Generator(device=DEV).manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms.RMSNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(1024, device=DEV, generator=gen))
    x0 = torch.randn(256, 2, 1024, device=DEV, generator=gen).bfloat16()
    probe = torch.randn(256, 2, 1024, device=DEV, generator=gen)
    results = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(TransformerLayer, "_plain_residual_add", lambda s, b: False)
        x = x0.clone().requires_grad_()
        loss = (model(x).float() * probe).sum()
        loss.backward()
        results.append((loss.detach(), x.grad, *[p.grad for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    assert len(calls) == fused_calls
    assert _rel(results[0][0], results[1][0]) < 1e-2, "loss"
    for a, b in zip(results[0][1:], results[1][1:]):
        assert _rel(a, b) < 1e-2


def test_auto_picks_triton_rms_norm_on_cuda():
    from moecore.transformer import norms

    norm = norms.RMSNorm(1024, params_dtype=torch.bfloat16).to(DEV)
    x = torch.randn(8, 1024, device=DEV, dtype=torch.bfloat16)
    norm(x)
    backend = norms.select_norm(norms.RMS_NORM_BACKENDS, x, norm.backend)
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


def test_bf16_moments_kernel_matches_the_reference_on_cuda():
    """--use-precision-aware-optimizer: bf16 moments through the kernel (large tensors) and the
    per-tensor reference (small ones), against the reference for every tensor."""
    gen = torch.Generator(device=DEV).manual_seed(4)
    shapes = [(2048, 1024), (5, 3), (1 << 20,)]  # kernel, reference, kernel
    ours = [torch.randn(s, device=DEV, generator=gen) for s in shapes]
    ref = [p.clone() for p in ours]
    models = [p.to(torch.bfloat16) for p in ours]
    opt = O.TritonAdamW(ours, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                        exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    opt.set_model_copies(zip(ours, models))
    moments = [[torch.zeros(s, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
               for s in shapes]
    for step in range(1, 5):
        for p, q, (m, v) in zip(ours, ref, moments):
            p.grad = torch.randn(p.shape, device=DEV, generator=gen)
            O.adamw_step_torch(q, p.grad, m, v, step=step, lr=1e-3, beta1=0.9, beta2=0.95,
                               eps=1e-8, weight_decay=0.1)
        opt.step()
    for p, q, m, (m_ref, v_ref) in zip(ours, ref, models, moments):
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert _rel(p, q) < 1e-6
        assert _rel(state["exp_avg"], m_ref) < 1e-3 and _rel(state["exp_avg_sq"], v_ref) < 1e-3
        assert torch.equal(m, p.to(torch.bfloat16))
