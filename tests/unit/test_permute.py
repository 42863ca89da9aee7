"""permute/unpermute against explicit per-token references: order, probs, capacity, gradients."""

import pytest
import torch

from moecore.moe.permute import PAD_INDEX, permute, unpermute


def _routing(num_tokens, num_experts, topk, seed, empty_expert=None, unrouted_token=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if empty_expert is not None:
        scores[:, empty_expert] = -1.0
    idx = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map.scatter_(1, idx, True)
    if unrouted_token is not None:
        routing_map[unrouted_token] = False
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=g), -1) * routing_map
    return routing_map, probs


def _expected_order(routing_map, capacity=None):
    """Per expert, its routed token ids in order (truncated to capacity, then -1 padding)."""
    rows = []
    for e in range(routing_map.shape[1]):
        ids = [t for t in range(routing_map.shape[0]) if routing_map[t, e]]
        if capacity is not None:
            ids = ids[:capacity] + [PAD_INDEX] * max(0, capacity - len(ids))
        rows.extend((e, t) for t in ids)
    return rows


def _expert_weights(num_experts, hidden, seed=5):
    return torch.randn(num_experts, hidden, hidden, generator=torch.Generator().manual_seed(seed))


def _dense_reference(x, probs, routing_map, w):
    """out[t] = sum_e map[t, e] * probs[t, e] * (x[t] @ w[e]), written token by token."""
    out = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(x.shape[1])
        for e in range(routing_map.shape[1]):
            if routing_map[t, e]:
                acc = acc + probs[t, e] * (x[t] @ w[e])
        out.append(acc)
    return torch.stack(out)


def test_dropless_order_probs_and_counts():
    routing_map, probs = _routing(11, 5, 2, seed=0, empty_expert=3, unrouted_token=4)
    x = torch.randn(11, 6)
    permuted, pprobs, idx, tpe = permute(x, routing_map, probs)
    expected = _expected_order(routing_map)
    assert idx.dtype == torch.int64 and tpe.dtype == torch.int64
    assert idx.tolist() == [t for _, t in expected]
    assert tpe.tolist() == routing_map.sum(0).tolist() and tpe[3] == 0
    assert torch.equal(permuted, x[idx])
    assert torch.equal(pprobs, torch.stack([probs[t, e] for e, t in expected]))
    _, none_probs, _, _ = permute(x, routing_map)
    assert none_probs is None


def test_round_trip_with_and_without_probs():
    routing_map, probs = _routing(9, 4, 3, seed=1, unrouted_token=2)
    x = torch.randn(9, 5)
    permuted, pprobs, idx, _ = permute(x, routing_map, probs)
    out = unpermute(permuted, idx, 9, pprobs)
    torch.testing.assert_close(out, x * (probs * routing_map).sum(1, keepdim=True),
                               rtol=1e-6, atol=1e-6)
    plain = unpermute(permuted, idx, 9)
    torch.testing.assert_close(plain, x * routing_map.sum(1, keepdim=True).float())
    assert torch.count_nonzero(plain[2]) == 0  # unrouted token gets zeros


@pytest.mark.parametrize("capacity", [None, 2, 4, 9])
def test_expert_computation_outputs_and_gradients(capacity):
    """permute -> per-expert matmul -> unpermute == the dense per-token formula (with tokens
    past capacity dropped), for outputs and gradients wrt tokens, probs and weights."""
    num_tokens, num_experts, hidden = 10, 4, 6
    routing_map, probs = _routing(num_tokens, num_experts, 2, seed=2, empty_expert=1)
    x = torch.randn(num_tokens, hidden)
    w = _expert_weights(num_experts, hidden)
    kept = routing_map.clone()
    if capacity is not None:  # first `capacity` tokens of each expert survive
        kept &= (torch.cumsum(routing_map.long(), 0) <= capacity)
    dy = torch.randn(num_tokens, hidden)

    def run(use_permute):
        xx = x.clone().requires_grad_()
        pp = probs.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        if use_permute:
            permuted, pprobs, idx, tpe = permute(xx, routing_map, pp, capacity=capacity)
            rows = torch.cat([c @ ww[e] for e, c in enumerate(permuted.split(tpe.tolist()))])
            out = unpermute(rows, idx, num_tokens, pprobs)
        else:
            out = _dense_reference(xx, pp, kept, ww)
        (out * dy).sum().backward()
        return out.detach(), xx.grad, pp.grad, ww.grad

    for got, ref in zip(run(True), run(False)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_capacity_padding_layout():
    routing_map, probs = _routing(8, 3, 2, seed=3, empty_expert=2)
    x = torch.randn(8, 4) + 10.0  # no real row is zero
    capacity = 4
    permuted, pprobs, idx, tpe = permute(x, routing_map, probs, capacity=capacity)
    assert permuted.shape == (3 * capacity, 4)
    assert tpe.tolist() == [capacity] * 3
    expected = _expected_order(routing_map, capacity)
    assert idx.tolist() == [t for _, t in expected]
    pad = idx == PAD_INDEX
    assert pad[2 * capacity:].all()  # the empty expert is all padding
    assert torch.count_nonzero(permuted[pad]) == 0 and torch.count_nonzero(pprobs[pad]) == 0
    assert torch.equal(permuted[~pad], x[idx[~pad]])
    assert torch.equal(pprobs[~pad], torch.stack([probs[t, e] for e, t in expected if t >= 0]))


def test_padding_rows_never_reach_tokens_even_if_nan():
    routing_map, probs = _routing(6, 3, 1, seed=4)
    x = torch.randn(6, 3)
    permuted, pprobs, idx, _ = permute(x, routing_map, probs, capacity=5)
    garbage = permuted.clone()
    garbage[idx == PAD_INDEX] = float("nan")
    out = unpermute(garbage, idx, 6, pprobs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, unpermute(permuted, idx, 6, pprobs))


def test_capacity_zero_and_no_tokens():
    routing_map, probs = _routing(5, 2, 1, seed=6)
    x = torch.randn(5, 3)
    permuted, pprobs, idx, tpe = permute(x, routing_map, probs, capacity=0)
    assert permuted.shape == (0, 3) and pprobs.shape == (0,) and tpe.tolist() == [0, 0]
    assert torch.count_nonzero(unpermute(permuted, idx, 5, pprobs)) == 0
    empty = torch.zeros(0, 3)
    permuted, pprobs, idx, tpe = permute(empty, torch.zeros(0, 2, dtype=torch.bool),
                                         torch.zeros(0, 2))
    assert permuted.shape == (0, 3) and idx.numel() == 0 and tpe.tolist() == [0, 0]
    assert unpermute(permuted, idx, 0, pprobs).shape == (0, 3)


def test_non_contiguous_routing_slices():
    # The all-gather dispatcher passes routing_map[:, lo:hi] and probs[:, lo:hi].
    routing_map, probs = _routing(7, 6, 3, seed=7)
    x = torch.randn(7, 4)
    sub_map, sub_probs = routing_map[:, 2:5], probs[:, 2:5]
    assert not sub_map.is_contiguous()
    got = permute(x, sub_map, sub_probs)
    ref = permute(x, sub_map.contiguous(), sub_probs.contiguous())
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_bf16_unpermute_keeps_dtype_and_accumulates_in_fp32():
    routing_map, probs = _routing(64, 8, 8, seed=8)
    x = torch.randn(64, 16)
    permuted, pprobs, idx, _ = permute(x.bfloat16(), routing_map, probs)
    out = unpermute(permuted, idx, 64, pprobs)
    assert out.dtype == torch.bfloat16
    exact = unpermute(permuted.double(), idx, 64, pprobs.double())
    magnitude = unpermute(permuted.double().abs(), idx, 64, pprobs.double())
    # One rounding of an fp32 sum: half a bf16 ulp (2^-9 relative) plus fp32 summation error.
    err = (out.double() - exact).abs()
    assert (err <= 2.0 ** -9 * exact.abs() + 1e-6 * magnitude).all()


def test_bad_shapes_raise():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="routing_map"):
        permute(x, torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="probs"):
        permute(x, torch.zeros(4, 2, dtype=torch.bool), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="capacity=-1"):
        permute(x, torch.zeros(4, 2, dtype=torch.bool), capacity=-1)
    with pytest.raises(ValueError, match="sorted_indices"):
        unpermute(x, torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="permuted_probs"):
        unpermute(x, torch.zeros(4, dtype=torch.long), 4, torch.zeros(3))
