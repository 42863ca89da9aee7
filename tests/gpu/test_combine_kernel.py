"""Triton top-k combine kernels vs the torch reference (CUDA only)."""

import pytest
import torch

from moecore.kernels import combine as C

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and C.HAVE_TRITON),
                                reason="needs CUDA and Triton")


def _case(T, E, k, H, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randn(T, E, device="cuda", generator=g).topk(k, dim=1).indices
    rm = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter(1, idx, True)
    from moecore.moe.permute import TopKPlan

    probs = torch.rand(T, E, device="cuda", generator=g)
    plan = TopKPlan(rm, probs, k)
    rows = torch.randn(T * k, H, device="cuda", generator=g).to(dtype)
    grad_out = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    return plan, rows, grad_out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T,E,k,H", [(1, 4, 2, 8), (257, 64, 8, 2048), (100, 8, 2, 4096),
                                     (33, 16, 6, 1000), (0, 8, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_combine_matches_torch(T, E, k, H, dtype):
    plan, rows, grad_out = _case(T, E, k, H, dtype, seed=T + H)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    # Poison: outputs must be fully written.
    ref = C.combine_forward_torch(rows.double(), plan.slot_rows, plan.probs.double())
    out = C.combine_forward_triton(rows, plan.slot_rows, plan.probs)
    assert out.dtype == dtype and not out.isnan().any()
    if T:
        assert _rel(out, ref) < tol
    gr_ref, gp_ref = C.combine_backward_torch(grad_out.double(), rows.double(),
                                              plan.slot_rows, plan.probs.double(), True)
    gr, gp = C.combine_backward_triton(grad_out, rows, plan.slot_rows, plan.probs, True)
    if T:
        assert _rel(gr, gr_ref) < tol
        assert _rel(gp, gp_ref) < (1e-5 if dtype == torch.float32 else 8e-3)
    gr2, gp2 = C.combine_backward_triton(grad_out, rows, plan.slot_rows, plan.probs, False)
    assert gp2 is None and torch.equal(gr2, gr)
