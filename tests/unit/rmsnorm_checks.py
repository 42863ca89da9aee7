"""The Triton RMSNorm kernels of ``moecore.kernels.rmsnorm`` against the torch reference, on CPU
tensors under the Triton interpreter. Run as ``TRITON_INTERPRET=1 python -m
tests.unit.rmsnorm_checks [name ...]`` (``test_rmsnorm_kernel.py`` does, in a subprocess).
Prints ``PASS name`` or ``FAIL name`` and a traceback per check; exits 1 if any failed.
"""

from __future__ import annotations

import sys

import torch

from moecore.kernels import assert_close_rel
from tests.triton_interpret import run_checks

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _ref(x, w, eps, dy):
    """fp64 y, rstd, dx, dweight of the reference for x [N, H]."""
    from moecore.kernels import rmsnorm as R

    y, rstd = R.rms_norm_forward_torch(x.double(), w.double(), eps)
    return (y, rstd, *R.rms_norm_backward_torch(dy.double(), x.double(), w.double(), rstd))


def check_kernels(gen):
    """The forward and backward launchers: odd H, N = 0 and 1, several rows per program."""
    from moecore.kernels import rmsnorm as R

    # (N, H, num_programs): H=300 -> 8 rows per block, 37 rows over 3 programs of 16 rows.
    cases = [(0, 7, None), (1, 1, None), (1, 1000, None), (37, 300, 3), (300, 24, None),
             (5, 5000, 2), (64, 128, 64)]
    for n, h, programs in cases:
        for dtype, tol in TOL.items():
            x, dy = (torch.randn(n, h, generator=gen).to(dtype) for _ in range(2))
            w = (1 + torch.randn(h, generator=gen)).to(dtype)
            y, rstd = R.rms_norm_forward_triton(x, w, 1e-5)
            dx, dw = R.rms_norm_backward_triton(dy, x, w, rstd, num_programs=programs)
            assert (y.dtype, dx.dtype, dw.dtype, rstd.dtype) == (dtype,) * 3 + (torch.float32,)
            assert y.shape == dx.shape == (n, h) and rstd.shape == (n,) and dw.shape == (h,)
            y_ref, rstd_ref, dx_ref, dw_ref = _ref(x, w, 1e-5, dy)
            if n == 0:
                assert torch.equal(dw, torch.zeros_like(w))
                continue
            for got, want, what in ((y, y_ref, "y"), (rstd, rstd_ref, "rstd"),
                                    (dx, dx_ref, "dx"), (dw, dw_ref, "dweight")):
                if what == "dx" and h == 1:  # dx ~ eps / x^2 cancels out: check it absolutely
                    scale = (rstd_ref[:, None] * dy.double() * w.double()).abs().max().item()
                    assert (dx.double() - dx_ref).abs().max() <= 1e-5 * scale, (dx, dx_ref)
                    continue
                assert_close_rel(got, want, 1e-5 if what == "rstd" else tol,
                                 f"{what} n={n} h={h} {dtype}")
            # Only one of the two grads asked for: the other is None, the one asked equal.
            dx2, none = R.rms_norm_backward_triton(dy, x, w, rstd, need_dw=False)
            none2, dw2 = R.rms_norm_backward_triton(dy, x, w, rstd, need_dx=False,
                                                    num_programs=programs)
            assert none is None and none2 is None
            assert torch.equal(dx2, dx) and torch.equal(dw2, dw)


def check_autograd(gen):
    """``rms_norm`` on [..., H] inputs: strided rows, transposed views, mixed weight dtype,
    requires_grad on only one input."""
    from moecore.kernels import rmsnorm as R

    eps = 1e-6
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.float32)):
        tol = TOL[dtype]
        for make in (lambda: torch.randn(3, 5, 100, generator=gen)[..., :72],  # row stride 100
                     lambda: torch.randn(72, 15, generator=gen).t(),  # column stride 15
                     lambda: torch.randn(0, 4, 72, generator=gen)):
            x = make().to(dtype).requires_grad_()
            w = (1 + torch.randn(72, generator=gen)).to(wdtype).requires_grad_()
            dy = torch.randn(x.shape, generator=gen).to(dtype)
            y = R.rms_norm(x, w, eps)
            y.backward(dy)
            assert y.shape == x.shape and y.dtype == dtype and x.grad.dtype == dtype
            assert w.grad.dtype == wdtype
            y_ref, _, dx_ref, dw_ref = _ref(x.detach().reshape(-1, 72), w.detach(), eps,
                                            dy.reshape(-1, 72))
            if x.numel():
                assert_close_rel(y.reshape(-1, 72), y_ref, tol, "y")
                assert_close_rel(x.grad.reshape(-1, 72), dx_ref, tol, "dx")
                assert_close_rel(w.grad, dw_ref, tol, "dweight")
            else:
                assert torch.equal(w.grad, torch.zeros_like(w))
            # One input without grad: its grad stays None, the other's is unchanged.
            x_only = x.detach().requires_grad_()
            R.rms_norm(x_only, w.detach(), eps).backward(dy)
            assert torch.equal(x_only.grad, x.grad)
            w_only = w.detach().requires_grad_()
            R.rms_norm(x.detach(), w_only, eps).backward(dy)
            assert torch.equal(w_only.grad, w.grad)
    wide = R.MAX_H + 1
    for x, w, what in ((torch.randn(2, 3, dtype=torch.float64), torch.ones(3), "float64"),
                       (torch.randn(1, wide), torch.ones(wide), f"H <= {R.MAX_H}")):
        try:
            R.rms_norm(x, w)
        except ValueError as exc:
            assert what in str(exc), exc
        else:
            raise AssertionError(f"no error for {what}")


def check_norm_module(gen):
    """The registry's ``triton`` backend with the CUDA test forced off: its self-check passes, a
    2% error in forward or dweight fails it (auto then falls back to torch), and ``RMSNorm``
    through it equals the ``torch`` backend."""
    import moecore.kernels as K
    from moecore.backends import BackendUnavailableError
    from moecore.kernels import rmsnorm as R
    from moecore.transformer import norms

    K.cuda_triton_available = lambda *a, **kw: (True, "")  # looked up at call time
    ctx = dict(device=torch.device("cpu"), dtype=torch.bfloat16, hidden=72,
               log=False)
    assert norms.RMS_NORM_BACKENDS.select("auto", **ctx).name == "triton"
    assert norms.RMS_NORM_BACKENDS.select("auto", **{**ctx, "hidden": R.MAX_H + 1}).name == "torch"
    real_fwd, real_bwd = R.rms_norm_forward_triton, R.rms_norm_backward_triton
    bugs = {"forward": ("rms_norm_forward_triton", lambda *a: (lambda y, r: (y * 1.02, r))(
                *real_fwd(*a))),
            "dweight": ("rms_norm_backward_triton", lambda *a, **kw: (lambda dx, dw: (
                dx, dw * 1.02))(*real_bwd(*a, **kw)))}
    for what, (attr, buggy) in bugs.items():
        setattr(R, attr, buggy)
        K.self_check.cache_clear()
        try:
            assert norms.RMS_NORM_BACKENDS.select("auto", **ctx).name == "torch", what
            try:
                norms.RMS_NORM_BACKENDS.select("triton", **ctx)
            except BackendUnavailableError as exc:
                msg = str(exc)
                assert "self-check of the Triton rms_norm kernel failed" in msg and what in msg
            else:
                raise AssertionError(f"a {what} bug passed the self-check")
        finally:
            R.rms_norm_forward_triton, R.rms_norm_backward_triton = real_fwd, real_bwd
            K.self_check.cache_clear()
    results = []
    for name in ("triton", "torch"):
        norm = norms.RMSNorm(72, eps=1e-5, params_dtype=torch.bfloat16, backend=name)
        with torch.no_grad():
            norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        x = torch.randn(2, 9, 72, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        x.requires_grad_()
        y = norm(x)
        y.float().square().sum().backward()
        assert norms.select_norm(norms.RMS_NORM_BACKENDS, x, name).name == name
        results.append((y, x.grad, norm.weight.grad))
    for a, b in zip(*results):
        assert_close_rel(a, b, 1e-2, "triton vs torch backend")


def _assert_one_rounding(hidden, residual, out):
    """``hidden`` is ``residual + out`` (fp32 sum) rounded once to their dtype: exactly torch's
    sum for fp32; for bf16 per element either torch's (round to nearest even, as on GPU) or the
    truncation the interpreter's casts do."""
    exact = residual.float() + out.float()
    if hidden.dtype == torch.float32:
        assert torch.equal(hidden, exact), "hidden != residual + out"
        return
    truncated = (exact.view(torch.int32) & -65536).view(torch.float32).to(hidden.dtype)
    ok = (hidden == exact.to(hidden.dtype)) | (hidden == truncated)
    assert ok.all(), f"hidden is not one rounding of residual + out at {(~ok).sum()} elements"


def check_add_kernels(gen):
    """``add_rms_norm``'s launchers: forward (hidden, and y / rstd equal to ``rms_norm``'s of
    that hidden) and backward with ``dx_add`` (strided, absent, or with only dweight asked), odd
    H, N = 0 and 1, several rows per program."""
    from moecore.kernels import rmsnorm as R

    eps = 1e-5
    for n, h, programs in [(0, 7, None), (1, 1000, None), (6, 1000, 2), (37, 300, 3),
                           (64, 128, 64)]:
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            res, out, dy = (torch.randn(n, h, generator=gen).to(dtype) for _ in range(3))
            dh = torch.randn(n, 2 * h, generator=gen).to(dtype)[:, h:]  # row stride 2H
            w = (1 + torch.randn(h, generator=gen)).to(dtype)
            hidden, y, rstd = R.add_rms_norm_forward_triton(res, out, w, eps)
            assert hidden.shape == y.shape == (n, h) and rstd.shape == (n,)
            assert (hidden.dtype, y.dtype, rstd.dtype) == (dtype, dtype, torch.float32)
            _assert_one_rounding(hidden, res, out)
            y_plain, rstd_plain = R.rms_norm_forward_triton(hidden, w, eps)
            assert torch.equal(y, y_plain) and torch.equal(rstd, rstd_plain)
            dx, dw = R.rms_norm_backward_triton(dy, hidden, w, rstd, dx_add=dh,
                                                num_programs=programs)
            y_ref, rstd_ref = R.rms_norm_forward_torch(hidden.double(), w.double(), eps)
            dx_ref, dw_ref = R.rms_norm_backward_torch(dy.double(), hidden.double(), w.double(),
                                                       rstd_ref, dx_add=dh.double())
            assert dx.shape == (n, h) and dx.dtype == dtype and dw.shape == (h,)
            if n == 0:
                assert torch.equal(dw, torch.zeros_like(w))
                continue
            for got, want, what in ((y, y_ref, "y"), (rstd, rstd_ref, "rstd"),
                                    (dx, dx_ref, "dx + d_hidden"), (dw, dw_ref, "dweight")):
                assert_close_rel(got, want, 1e-5 if what == "rstd" else tol,
                                 f"{what} n={n} h={h} {dtype}")
            # Without dx_add: the plain backward; dx_add with only dweight asked: ignored.
            dx_plain, dw_plain = R.rms_norm_backward_triton(dy, hidden, w, rstd,
                                                            num_programs=programs)
            none, dw_only = R.rms_norm_backward_triton(dy, hidden, w, rstd, need_dx=False,
                                                       dx_add=dh, num_programs=programs)
            assert none is None and torch.equal(dw_only, dw) and torch.equal(dw_plain, dw)
            assert not torch.equal(dx_plain, dx)
            assert_close_rel(dx_plain, R.rms_norm_backward_torch(
                dy.double(), hidden.double(), w.double(), rstd_ref)[0], tol, "dx")


def check_add_autograd(gen):
    """``add_rms_norm`` on [S, B, H] inputs (``out`` a transposed view) against the torch
    reference: both outputs used, only ``y`` (d_hidden None), only ``hidden`` (dy None), one
    input needing grad, fp32 weight with bf16 inputs."""
    from moecore.kernels import rmsnorm as R

    eps = 1e-6
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.float32)):
        tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
        res = torch.randn(5, 3, 72, generator=gen).to(dtype)
        out = torch.randn(72, 3, 5, generator=gen).to(dtype).permute(2, 1, 0)
        w = (1 + torch.randn(72, generator=gen)).to(wdtype)
        dh, dy = (torch.randn(5, 3, 72, generator=gen).to(dtype) for _ in range(2))
        for grads in ((dh, dy), (None, dy), (dh, None)):
            results = []
            for fn in (R.add_rms_norm, R.add_rms_norm_torch):
                r, o, wt = (t.clone().requires_grad_() for t in (res, out, w))
                outs = fn(r, o, wt, eps)
                used = [(t, g) for t, g in zip(outs, grads) if g is not None]
                torch.autograd.backward([t for t, _ in used], [g for _, g in used])
                assert torch.equal(r.grad, o.grad) and r.grad.dtype == dtype
                results.append((*outs, r.grad, wt.grad))
            (hidden, y, dx, dw), (hidden_ref, y_ref, dx_ref, dw_ref) = results
            _assert_one_rounding(hidden, res, out)
            assert_close_rel(y, y_ref, tol, "y")
            assert_close_rel(dx, dx_ref, tol, f"dx {dtype} {[g is None for g in grads]}")
            if grads[1] is None:  # y unused: d_hidden passes through, no weight grad
                assert torch.equal(dx, dh) and dw is None
            else:
                assert dw.dtype == wdtype
                assert_close_rel(dw, dw_ref, tol, "dweight")
        r = res.clone().requires_grad_()  # only residual needs a grad: the same one
        R.add_rms_norm(r, out, w, eps)[1].backward(dy)
        o = out.clone().requires_grad_()
        R.add_rms_norm(res, o, w, eps)[1].backward(dy)
        assert torch.equal(r.grad, o.grad)
    empty = torch.randn(0, 2, 16, generator=gen).requires_grad_()
    w = torch.ones(16, requires_grad=True)
    hidden, y = R.add_rms_norm(empty, empty.detach(), w)
    y.backward(torch.ones_like(y))
    assert hidden.shape == y.shape == empty.grad.shape == (0, 2, 16)
    assert torch.equal(w.grad, torch.zeros(16))


def check_add_layer(gen):
    """A TransformerLayer under the ``triton`` norm backend: the fused attention residual add +
    pre-MLP norm (taken, counted) against the unfused layer, fp32 and bf16."""
    from moecore.kernels import rmsnorm as R

    real_available, real_add = R.triton_available, R.add_rms_norm
    R.triton_available = lambda *a, **kw: (True, "")  # norms' probe looks it up at call time
    calls = []
    R.add_rms_norm = lambda *a: (calls.append(1), real_add(*a))[1]
    try:
        _compare_layers(gen, calls)  # configs with norm_backend="triton"
    finally:
        R.triton_available, R.add_rms_norm = real_available, real_add


def _compare_layers(gen, calls):
    """check_add_layer's comparison; ``calls`` records each fused op call. A layer fuses its
    attention residual add; a 3-layer block also each MLP add into the next norm (6 calls)."""
    from moecore.config import TransformerConfig
    from moecore.transformer import norms
    from moecore.transformer.block import TransformerBlock
    from moecore.transformer.layer import TransformerLayer

    x0 = torch.randn(6, 2, 32, generator=gen)
    plain = TransformerLayer._plain_residual_add
    # bf16: the interpreter truncates hidden where torch rounds it, a bf16 ulp at most per
    # fused add (6 of them in the block).
    for what, n_calls in (("layer", 1), ("block", 6)):
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2 * (1 + (what == "block")))):
            cfg = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=48,
                                    init_method_std=0.05, params_dtype=dtype,
                                    bf16=dtype == torch.bfloat16, norm_backend="triton")
            torch.manual_seed(0)
            model = TransformerLayer(cfg, layer_number=1) if what == "layer" else \
                TransformerBlock(cfg)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, norms.RMSNorm):
                        m.weight.normal_(generator=gen)
            results = []
            try:
                for fuse in (True, False):
                    if not fuse:  # the unfused code path
                        TransformerLayer._plain_residual_add = lambda self, bias: False
                    x = x0.to(dtype).clone().requires_grad_()
                    out = model(x)
                    out.float().square().sum().backward()
                    results.append([out.detach(), x.grad] + [p.grad for p in model.parameters()])
                    model.zero_grad(set_to_none=True)
            finally:
                TransformerLayer._plain_residual_add = plain
            assert len(calls) == n_calls, (what, calls)
            calls.clear()
            assert norms.select_norm(norms.RMS_NORM_BACKENDS, x, "triton").name == "triton"
            for a, b in zip(*results):
                assert_close_rel(a, b, tol, f"{what} {dtype}")
            if dtype == torch.float32:  # the same fp32 math: the forward is bit for bit equal
                assert torch.equal(results[0][0], results[1][0])


def check_recompute_layernorm(gen):
    """``--recompute-modules layernorm`` under the ``triton`` norm backend: the freed norm
    outputs are rewritten by :func:`rms_norm_into` (2 per layer) and a block trains bit for bit
    as without recompute, fp32 and bf16."""
    from moecore.config import TransformerConfig
    from moecore.kernels import rmsnorm as R
    from moecore.transformer.block import TransformerBlock

    real_available, real_into = R.triton_available, R.rms_norm_into
    R.triton_available = lambda *a, **kw: (True, "")
    calls = []
    R.rms_norm_into = lambda *a: (calls.append(1), real_into(*a))[1]
    try:
        x0 = torch.randn(6, 2, 32, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            results = []
            for modules in ((), ("layernorm",)):
                cfg = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                                        ffn_hidden_size=48, init_method_std=0.05,
                                        params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                        recompute_granularity="selective",
                                        recompute_modules=modules, norm_backend="triton")
                torch.manual_seed(0)
                block = TransformerBlock(cfg)
                x = x0.to(dtype).clone().requires_grad_()
                out = block(x)
                out.float().square().sum().backward()
                results.append([out.detach(), x.grad] + [p.grad for p in block.parameters()])
            assert len(calls) == 2 * 3, calls
            calls.clear()
            for a, b in zip(*results):
                assert torch.equal(a, b), dtype
    finally:
        R.triton_available, R.rms_norm_into = real_available, real_into


CHECKS = {"kernels": check_kernels, "autograd": check_autograd, "norm_module": check_norm_module,
          "add_kernels": check_add_kernels, "add_autograd": check_add_autograd,
          "add_layer": check_add_layer, "recompute_layernorm": check_recompute_layernorm}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
