"""The experts' FP8 SwiGLU MLP both ways, for the tests that compare them bit for bit."""

from __future__ import annotations

import torch

from moecore.fp8 import fp8_grouped_mm
from moecore.fp8.swiglu_experts import fp8_swiglu_experts
from moecore.kernels.swiglu import swiglu


def swiglu_experts_grads(fused: bool, x, w1, w2, dy, counts, metas, probs=None,
                         swiglu_backend: str = "auto") -> tuple:
    """Forward and backward of ``fc1 -> SwiGLU (times probs) -> fc2`` in FP8: the fused op
    (``fused``) or ``fp8_grouped_mm`` twice around ``swiglu`` (on ``swiglu_backend``), with the
    two :class:`Fp8Meta` of ``metas``. Returns ``(out, dx, dw1, dw2, dprobs or None)``."""
    m1, m2 = metas
    xr, w1r, w2r = (t.clone().requires_grad_() for t in (x, w1, w2))
    pr = None if probs is None else probs.clone().requires_grad_()
    if fused:
        out = fp8_swiglu_experts(xr, w1r, w2r, counts, m1, m2, pr)
    else:
        h = fp8_grouped_mm(xr, w1r, counts, m1)
        out = fp8_grouped_mm(swiglu(h, swiglu_backend, probs=pr), w2r, counts, m2)
    out.backward(dy)
    return out, xr.grad, w1r.grad, w2r.grad, None if pr is None else pr.grad


def assert_same(fused: tuple, unfused: tuple, what: str = "") -> None:
    """Every output and gradient of :func:`swiglu_experts_grads` equal, bit for bit."""
    for name, a, b in zip(("out", "dx", "dw1", "dw2", "dprobs"), fused, unfused):
        assert (a is None and b is None) or torch.equal(a, b), f"{what} {name} differs"
