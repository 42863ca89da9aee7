"""RMSNorm kernel module: the torch reference against ``F.rms_norm`` + autograd, the ``triton``
backend of the norm registry on CPU, and the Triton kernels under the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.kernels import assert_close_rel
from moecore.kernels import rmsnorm as R
from moecore.transformer import norms
from tests.triton_interpret import assert_checks_pass


def _f_rms_norm(x, w, eps, dy):
    """y, dx, dweight of ``F.rms_norm`` through autograd, in fp64."""
    x = x.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    y = F.rms_norm(x, (x.shape[-1],), w, eps)
    y.backward(dy.double())
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype,wdtype,tol", [(torch.float32, torch.float32, 1e-6),
                                              (torch.bfloat16, torch.bfloat16, 1e-2),
                                              (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("shape", [(4, 3, 1000), (37, 64), (5, 1), (0, 16), (2, 0, 8)])
def test_reference_matches_f_rms_norm(shape, dtype, wdtype, tol):
    gen = torch.Generator().manual_seed(0)
    h = shape[-1]
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (1 + torch.randn(h, generator=gen)).to(wdtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    y = R.rms_norm_torch(x, w, 1e-5)
    y.backward(dy)
    assert (y.dtype, x.grad.dtype, w.grad.dtype) == (dtype, dtype, wdtype)
    assert y.shape == x.grad.shape == shape
    y_ref, dx_ref, dw_ref = _f_rms_norm(x, w, 1e-5, dy)
    if x.numel() == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))
        return
    assert_close_rel(y, y_ref, tol, "y")
    assert_close_rel(w.grad, dw_ref, tol, "dweight")
    if h == 1:  # dx ~ eps / x^2: all cancellation, compare absolutely
        torch.testing.assert_close(x.grad.double(), dx_ref, atol=1e-5, rtol=0)
    else:
        assert_close_rel(x.grad, dx_ref, tol, "dx")
    if dtype == wdtype:  # same rounding as torch's own kernel, to one ulp of the dtype
        same = F.rms_norm(x.detach(), (h,), w.detach(), 1e-5)
        torch.testing.assert_close(y, same)


def test_reference_strided_inputs_and_partial_grads():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, generator=gen)
    for x in (torch.randn(6, 40, generator=gen)[:, 8:32],  # row stride 40
              torch.randn(24, 6, generator=gen).t()):  # column stride 6: copied
        dy = torch.randn(6, 24, generator=gen)
        y_ref, dx_ref, dw_ref = _f_rms_norm(x, w, 1e-6, dy)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        for x_in, w_in in ((xg, w), (x, wg)):  # only one input needs a grad
            out = R.rms_norm_torch(x_in, w_in, 1e-6)
            assert_close_rel(out, y_ref, 1e-6, "y")
            out.backward(dy)
        assert_close_rel(xg.grad, dx_ref, 1e-6, "dx")
        assert_close_rel(wg.grad, dw_ref, 1e-6, "dweight")
    dx, dw = R.rms_norm_backward_torch(dy, x, w, torch.ones(6), need_dx=False)
    assert dx is None and dw.shape == (24,)
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        R.rms_norm_torch(torch.randn(3, 4), torch.ones(5))


def test_norm_registry_triton_backend_on_cpu():
    assert norms.RMS_NORM_BACKENDS.names() == ["te", "apex", "triton", "torch"]
    assert norms.LAYER_NORM_BACKENDS.names() == ["te", "apex", "torch"]
    assert "triton" in norms.NORM_BACKENDS
    x = torch.randn(3, 16)
    norm = norms.RMSNorm(16)
    try:
        norms.set_norm_backend("triton")
        with pytest.raises(BackendUnavailableError, match="rms_norm backend 'triton' is not "
                                                          "available: the Triton rms_norm "
                                                          "kernels run on CUDA tensors only"):
            norm(x)
        norms.set_norm_backend("auto")
        assert norms._resolve(norms.RMS_NORM_BACKENDS, x).name == "torch"
        torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, norm.eps))
    finally:
        norms.set_norm_backend("auto")
    # The old context (device type only) still resolves, and too wide rows are refused.
    assert norms.RMS_NORM_BACKENDS.select("auto", device="cpu", log=False).name == "torch"
    ok, why = R.triton_available("cuda", torch.bfloat16, hidden=R.MAX_H + 1)
    assert not ok and f"H <= {R.MAX_H}" in why


CHECKS = ("kernels", "autograd", "norm_module")


def test_triton_kernels_under_interpreter():
    assert_checks_pass("tests.unit.rmsnorm_checks", CHECKS)
