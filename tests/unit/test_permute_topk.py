"""The dropless top-k path (gathers + bmm) equals permute/unpermute, values and gradients."""

import pytest
import torch

from moecore.moe.permute import TopKPlan, permute, permute_topk, unpermute, unpermute_topk


def _routing(T, E, k, g):
    idx = torch.randn(T, E, generator=g).topk(k, dim=1).indices
    return torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)


@pytest.mark.parametrize("T,E,k,H", [(13, 6, 3, 5), (1, 4, 4, 7), (40, 16, 1, 8), (0, 4, 2, 3)])
def test_topk_path_matches_reference(T, E, k, H):
    g = torch.Generator().manual_seed(T * 31 + E)
    rm = _routing(T, E, k, g)
    probs = torch.rand(T, E, generator=g, requires_grad=True)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w = torch.randn(H, H, generator=g)
    gout = torch.randn(T, H, generator=g)
    results = []
    for fast in (False, True):
        x.grad = probs.grad = None
        if fast:
            rows, plan, tpe = permute_topk(x, rm, probs, k)
            y = unpermute_topk(torch.tanh(rows @ w), plan)
        else:
            rows, pp, si, tpe = permute(x, rm, probs)
            y = unpermute(torch.tanh(rows @ w), si, T, pp)
        (y * gout).sum().backward()
        results.append((rows.detach(), tpe, y.detach(), x.grad.clone(), probs.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_plan_rejects_dropped_routing():
    rm = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="exactly topk=1"):
        TopKPlan(rm, None, 1)


def test_bf16_combine_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    rm = _routing(64, 8, 2, g)
    probs = torch.rand(64, 8, generator=g)
    rows = torch.randn(128, 32, generator=g)
    plan = TopKPlan(rm, probs, 2)
    ref = unpermute_topk(rows, plan)
    got = unpermute_topk(rows.bfloat16(), plan).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
