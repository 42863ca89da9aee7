"""RMSNorm kernel module: the torch reference against ``F.rms_norm`` + autograd, the ``triton``
backend of the norm registry on CPU, ``add_rms_norm`` (residual add fused into the norm) against
the add then ``F.rms_norm`` and where ``TransformerLayer`` uses it, and the Triton kernels under
the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.config import NORM_BACKENDS
from moecore.kernels import assert_close_rel
from moecore.kernels import norm as N
from moecore.kernels import rmsnorm as R
from moecore.moe import MoELayer
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
    assert "triton" in NORM_BACKENDS  # --norm-backend's choices
    x = torch.randn(3, 16)
    norm = norms.RMSNorm(16, backend="triton")
    with pytest.raises(BackendUnavailableError, match="rms_norm backend 'triton' \\(set by "
                                                      "--norm-backend\\) is not "
                                                      "available: the Triton rms_norm "
                                                      "kernels run on CUDA tensors only"):
        norm(x)
    norm.backend = "auto"
    assert N.select_norm(norms.RMS_NORM_BACKENDS, x, norm.backend).name == "torch"
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, norm.eps))
    # The old context (device type only) still resolves, and too wide rows are refused.
    assert norms.RMS_NORM_BACKENDS.select("auto", device="cpu", log=False).name == "torch"
    ok, why = R.triton_available("cuda", torch.bfloat16, hidden=R.MAX_H + 1)
    assert not ok and f"H <= {R.MAX_H}" in why


# ---- add_rms_norm: the residual add fused into the norm ----------------------------------------


def _plain_add_norm(residual, out, w, eps, d_hidden, dy, dtype=torch.float64):
    """hidden, y, d_residual, d_out, dweight of ``residual + out`` then ``F.rms_norm`` through
    autograd in ``dtype`` (``d_hidden`` / ``dy`` None: that output unused)."""
    r, o, w = (t.detach().to(dtype).requires_grad_() for t in (residual, out, w))
    hidden = r + o
    y = F.rms_norm(hidden, (hidden.shape[-1],), w, eps)
    used = [(t, g.to(dtype)) for t, g in ((hidden, d_hidden), (y, dy)) if g is not None]
    torch.autograd.backward([t for t, _ in used], [g for _, g in used])
    return hidden, y, r.grad, o.grad, w.grad


@pytest.mark.parametrize("dtype,wdtype,tol", [(torch.float32, torch.float32, 1e-6),
                                              (torch.bfloat16, torch.bfloat16, 1e-2),
                                              (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("shape", [(4, 3, 1000), (37, 64), (0, 2, 16)])
@pytest.mark.parametrize("used", ["both", "y", "hidden"])
def test_add_rms_norm_reference_matches_add_then_f_rms_norm(shape, dtype, wdtype, tol, used):
    gen = torch.Generator().manual_seed(3)
    h = shape[-1]
    res, out = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    w = (1 + torch.randn(h, generator=gen)).to(wdtype).requires_grad_()
    d_hidden, dy = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    d_hidden, dy = (None if used == "y" else d_hidden), (None if used == "hidden" else dy)
    hidden, y = R.add_rms_norm_torch(res, out, w, 1e-5)
    outs = [(t, g) for t, g in ((hidden, d_hidden), (y, dy)) if g is not None]
    torch.autograd.backward([t for t, _ in outs], [g for _, g in outs])
    assert (hidden.dtype, y.dtype, res.grad.dtype, w.dtype) == (dtype, dtype, dtype, wdtype)
    assert hidden.shape == y.shape == res.grad.shape == shape
    # hidden is torch's own residual + out, bit for bit; both inputs get the same grad
    assert torch.equal(hidden, res.detach() + out.detach())
    assert torch.equal(res.grad, out.grad)
    if used == "hidden":  # y unused: d_hidden passes through unrounded, weight gets no grad
        assert torch.equal(res.grad, d_hidden) and w.grad is None
        return
    _, y_ref, dres_ref, dout_ref, dw_ref = _plain_add_norm(res, out, w, 1e-5, d_hidden, dy)
    torch.testing.assert_close(dres_ref, dout_ref, rtol=0, atol=0)
    if res.numel() == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))
        return
    for got, want, what in ((y, y_ref, "y"), (res.grad, dres_ref, "d_residual"),
                            (w.grad, dw_ref, "dweight")):
        assert_close_rel(got, want, tol, what)
    if dtype == wdtype:  # the plain path in the same dtype: y to one ulp, grads to rounding
        _, y_same, dres_same, _, dw_same = _plain_add_norm(res, out, w, 1e-5, d_hidden, dy, dtype)
        torch.testing.assert_close(y, y_same)
        assert_close_rel(res.grad, dres_same, tol, "d_residual vs plain path")
        assert_close_rel(w.grad, dw_same, tol, "dweight vs plain path")


def test_add_rms_norm_reference_partial_grads_strides_and_errors():
    gen = torch.Generator().manual_seed(4)
    res = torch.randn(5, 2, 24, generator=gen)
    out = torch.randn(24, 2, 5, generator=gen).permute(2, 1, 0)  # column stride 10: copied
    w = torch.randn(24, generator=gen)
    dy = torch.randn(5, 2, 24, generator=gen)
    _, _, dres_ref, _, dw_ref = _plain_add_norm(res, out, w, 1e-6, None, dy)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        r, o, wt = (t.clone().requires_grad_(n) for t, n in zip((res, out, w), needs))
        R.add_rms_norm_torch(r, o, wt, 1e-6)[1].backward(dy)
        for t, n, want in zip((r, o, wt), needs, (dres_ref, dres_ref, dw_ref)):
            if n:
                assert_close_rel(t.grad, want, 1e-6, "grad")
            else:
                assert t.grad is None
    with torch.no_grad():  # no autograd: the same values
        hidden, y = R.add_rms_norm_torch(res, out, w, 1e-6)
    assert torch.equal(hidden, res + out) and y.shape == res.shape
    with pytest.raises(ValueError, match="one shape and dtype"):
        R.add_rms_norm_torch(res, out.double(), w)
    with pytest.raises(ValueError, match="one shape and dtype"):
        R.add_rms_norm_torch(res, out[:1], w)
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        R.add_rms_norm_torch(res, out, torch.ones(5))


def _layer_grads(layer, x):
    """Output and grads (input, then every parameter) of ``layer`` on ``x``."""
    x = x.clone().requires_grad_()
    out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


def _count_add_and_norm(monkeypatch) -> list:
    """Patch both norms' ``add_and_norm`` to record the class of each call."""
    calls = []
    for cls in (norms.LayerNorm, norms.RMSNorm):
        real = cls.add_and_norm
        monkeypatch.setattr(cls, "add_and_norm", lambda self, r, o, _real=real, _cls=cls: (
            calls.append(_cls), _real(self, r, o))[1])
    return calls


_LAYER_CASES = [  # (config overrides, training, plain attention residual add)
    (dict(), True, True),
    (dict(hidden_dropout=0.1), True, False),
    (dict(hidden_dropout=0.1), False, True),
    (dict(add_bias_linear=True), True, False),
    (dict(apply_residual_connection_post_layernorm=True), True, False),
    (dict(normalization="LayerNorm"), True, True),
    (dict(num_moe_experts=4, moe_ffn_hidden_size=24, moe_layer_recompute=True), True, True),
]


@pytest.mark.parametrize("overrides,training,plain", _LAYER_CASES)
def test_layer_fuses_pre_mlp_add_only_where_it_is_exact(monkeypatch, overrides, training, plain):
    """The layer hands the attention residual add to ``pre_mlp_layernorm.add_and_norm`` only
    without bias, active dropout or post-norm residual; on CPU (torch backend) that is bit for
    bit the unfused layer, for RMSNorm and LayerNorm."""
    from moecore.config import TransformerConfig
    from moecore.transformer.layer import TransformerLayer

    cfg = TransformerConfig(**{**dict(num_layers=1, hidden_size=32, num_attention_heads=4,
                                      num_query_groups=2, ffn_hidden_size=48,
                                      init_method_std=0.05), **overrides})
    torch.manual_seed(0)
    layer = TransformerLayer(cfg, layer_number=1, moe_layer=MoELayer).train(training)
    for p in layer.parameters():  # non-trivial norm weights and biases
        with torch.no_grad():
            p.add_(0.1 * torch.randn(p.shape))
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    calls = _count_add_and_norm(monkeypatch)
    got = _layer_grads(layer, x)
    assert calls == ([type(layer.pre_mlp_layernorm)] if plain else []), calls
    monkeypatch.setattr(type(layer), "_plain_residual_add", lambda self, bias: False)
    torch.manual_seed(2)  # the same dropout masks
    want = _layer_grads(layer, x)
    assert len(calls) == int(plain)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_add_and_norm_dispatch(monkeypatch):
    """torch backend: exactly ``residual + out`` and the norm, values and grads; a ``triton``
    resolution calls the fused op (here its torch reference) unless shape or dtype differ."""
    gen = torch.Generator().manual_seed(5)
    norm = norms.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
    res, out = (torch.randn(3, 2, 16, generator=gen).requires_grad_() for _ in range(2))
    dh, dy = torch.randn(2, 3, 2, 16, generator=gen)
    results = []
    for fused in (True, False):
        hidden, y = norm.add_and_norm(res, out) if fused else (res + out, None)
        y = norm(hidden) if y is None else y  # the old code: one add, its result normalised
        torch.autograd.backward([hidden, y], [dh, dy])
        results.append([hidden, y, res.grad, out.grad, norm.weight.grad])
        res.grad = out.grad = norm.weight.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    calls = []
    monkeypatch.setattr(R, "add_rms_norm",
                        lambda *a: (calls.append(a), R.add_rms_norm_torch(*a))[1])
    triton = norms.RMS_NORM_BACKENDS.get("triton")
    monkeypatch.setattr(norms, "select_norm", lambda reg, x, requested: triton)
    hooked = []  # module hooks (the distributed optimizer's param-gather wait) still run
    norm.register_forward_pre_hook(lambda module, args: hooked.append(module))
    hidden, y = norm.add_and_norm(res, out)
    assert hooked == [norm]
    assert len(calls) == 1 and calls[0][2] is norm.weight and calls[0][3] == norm.eps
    assert torch.equal(hidden, res + out)
    assert_close_rel(y, results[0][1], 1e-6, "fused reference y")
    for other in (out.double(), out[:1]):  # not the fused op's contract: the two ops
        monkeypatch.setattr(norms.RMSNorm, "forward", lambda self, x: x * 2)
        hidden, y = norm.add_and_norm(res, other)
        assert len(calls) == 1 and torch.equal(y, 2 * (res + other))
    assert len(hooked) == 3


CHECKS = ("kernels", "autograd", "norm_module", "add_kernels", "add_autograd", "add_layer")


def test_triton_kernels_under_interpreter():
    assert_checks_pass("tests.unit.rmsnorm_checks", CHECKS)
