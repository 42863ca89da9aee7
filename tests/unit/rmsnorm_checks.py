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
    ctx = dict(device="cpu", device_obj=torch.device("cpu"), dtype=torch.bfloat16, hidden=72,
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
        norms.set_norm_backend(name)
        norm = norms.RMSNorm(72, eps=1e-5, params_dtype=torch.bfloat16)
        with torch.no_grad():
            norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        x = torch.randn(2, 9, 72, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        x.requires_grad_()
        y = norm(x)
        y.float().square().sum().backward()
        assert norms._resolve(norms.RMS_NORM_BACKENDS, x).name == name
        results.append((y, x.grad, norm.weight.grad))
    for a, b in zip(*results):
        assert_close_rel(a, b, 1e-2, "triton vs torch backend")


CHECKS = {"kernels": check_kernels, "autograd": check_autograd, "norm_module": check_norm_module}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
