"""Sliding-window / sink attention on CUDA: ``--attention-backend auto`` picks FlexAttention,
which matches the materialised reference in forward and backward (sinks included)."""

import pytest
import torch

from moecore.kernels.attention import (
    SINK_ATTENTION,
    core_attention,
    flex_sink_window_attention,
    sink_window_attention,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("window", [None, 127])
def test_flex_matches_the_reference_with_grads(window):
    assert SINK_ATTENTION.resolve("auto", device=torch.device("cuda")).name == "flex"
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, nh, ng, d = 512, 2, 16, 4, 64
    shapes = [(s, b, nh, d), (s, b, ng, d), (s, b, ng, d), (nh,)]
    inputs = [torch.randn(*sh, device="cuda", generator=g).requires_grad_() for sh in shapes]
    grad = torch.randn(s, b, nh * d, device="cuda", generator=g)
    out = flex_sink_window_attention(*inputs[:3], window=window, sinks=inputs[3])
    ref = sink_window_attention(*inputs[:3], window=window, sinks=inputs[3])
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=5e-3, atol=5e-3)
    # core_attention routes windows and sinks there under auto.
    via = core_attention(*inputs[:3], window=window, sinks=inputs[3])
    torch.testing.assert_close(via, out)
