"""Capacity and token dropping against a straightforward per-expert loop."""

import pytest
import torch

from moecore.kernels.router import topk_routing_with_score_function
from moecore.moe.capacity import apply_token_drop, get_capacity


def _loop_reference(probs, routing_map, capacity, policy):
    """Per expert: the routed tokens, ordered by policy, first ``capacity`` kept."""
    keep = torch.zeros_like(routing_map)
    for e in range(routing_map.shape[1]):
        tokens = [t for t in range(routing_map.shape[0]) if routing_map[t, e]]
        if policy == "probs":
            tokens = sorted(tokens, key=lambda t: (-probs[t, e].item(), t))
        for t in tokens[:capacity]:
            keep[t, e] = True
    return keep


def test_get_capacity():
    assert get_capacity(16, 4, 1.0) == 4
    assert get_capacity(10, 4, 1.5) == 4          # ceil(3.75)
    assert get_capacity(10, 4, 1.5, min_capacity=6) == 6
    assert get_capacity(0, 4, 2.0) == 0
    for bad in (dict(capacity_factor=0.0), dict(capacity_factor=None), dict(num_experts=0)):
        args = dict(num_tokens=8, num_experts=4, capacity_factor=1.0) | bad
        with pytest.raises(ValueError):
            get_capacity(**args)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_drop_matches_loop_reference(policy):
    g = torch.Generator().manual_seed(0)
    for t, e, k, cap in [(20, 4, 2, 6), (33, 8, 3, 5), (7, 5, 1, 0), (9, 4, 2, 50), (1, 2, 2, 1)]:
        logits = torch.randn(t, e, generator=g)
        probs, rmap = topk_routing_with_score_function(logits, k, use_pre_softmax=True)
        probs.requires_grad_(True)
        out_probs, out_map = apply_token_drop(probs, rmap, cap, policy)
        want = _loop_reference(probs, rmap, cap, policy)
        assert torch.equal(out_map, want), (t, e, k, cap)
        assert (out_map.sum(0) <= cap).all()
        assert torch.equal(out_probs.detach(), torch.where(want, probs.detach(), 0.0))
        out_probs.sum().backward()  # gradient only through the kept entries
        assert torch.equal(probs.grad, want.float())


def test_probs_policy_breaks_ties_by_position():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    rmap = torch.ones(3, 2, dtype=torch.bool)
    _, out = apply_token_drop(probs, rmap, 2, "probs")
    assert out.tolist() == [[True, True], [False, True], [True, False]]


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_pad_to_capacity_fills_each_expert(policy):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 6, generator=g)
    logits[:, 0] += 3.0  # expert 0 overflows, others may be short
    probs, rmap = topk_routing_with_score_function(logits, 2)
    for cap in (3, 5, 20):
        out_probs, out_map = apply_token_drop(probs, rmap, cap, policy, pad_to_capacity=True)
        kept = _loop_reference(probs, rmap, cap, policy)
        assert (out_map.sum(0) == min(cap, 12)).all()
        assert not (kept & ~out_map).any()
        pads = out_map & ~kept
        assert not (pads & rmap).any()                  # padding never revives dropped tokens
        assert (out_probs[pads] == 0).all()
        assert torch.equal(out_probs, torch.where(kept, probs, 0.0))
        # Padding is the earliest free tokens of each expert.
        for e in range(6):
            free = [t for t in range(12) if not kept[t, e]]
            assert pads[:, e].nonzero().flatten().tolist() == free[:max(0, min(cap, 12)
                                                                       - int(kept[:, e].sum()))]


def test_bad_inputs():
    probs, rmap = torch.rand(4, 3), torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="drop_policy"):
        apply_token_drop(probs, rmap, 2, "random")
    with pytest.raises(ValueError, match="tokens, experts"):
        apply_token_drop(probs, rmap[:, :2], 2)
    with pytest.raises(ValueError, match="capacity"):
        apply_token_drop(probs, rmap, -1)


@pytest.mark.parametrize("tokens,experts,factor,want", [
    (10, 4, 1.0, 3),    # 2.5 -> 3 (round() gives 2: ties go to even)
    (9, 4, 1.0, 3),     # 2.25 -> 3 (round() gives 2)
    (1, 4, 1.0, 1),     # 0.25 -> 1: one token still finds a slot
    (3, 8, 1.0, 1),     # 0.375 -> 1
    (14, 4, 1.0, 4),    # 3.5 -> 4 (round() gives 4 too: ties to even)
    (12, 8, 1.25, 2),   # 1.875 -> 2
    (20, 8, 1.1, 3),    # 2.75 -> 3
    (40, 16, 1.0, 3),   # 2.5 -> 3
])
def test_get_capacity_rounds_up_at_fractions(tokens, experts, factor, want):
    """Every fraction of a row rounds up (Megatron-Core's ``ceil``): rounding to nearest would
    drop tokens that fit. The ``want`` values are worked by hand."""
    assert get_capacity(tokens, experts, factor) == want


def test_router_capacity_is_the_rounded_up_share():
    """Layer level: 5 tokens x top-2 over 4 experts at factor 1.0 -> ceil(2.5) = 3 rows per
    expert; the router keeps every assignment that fits in them."""
    from moecore.moe.router import TopKRouter
    from moecore.parallel_state import ParallelState
    from tests.moe_reference import tiny_moe_config

    cfg = tiny_moe_config(num_moe_experts=4, moe_router_topk=2, moe_expert_capacity_factor=1.0,
                          moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    router = TopKRouter(cfg, parallel_state=ParallelState.single())
    with torch.no_grad():  # tokens 0-2 pick experts {0, 1}, tokens 3-4 experts {2, 3}
        router.weight.copy_(torch.eye(4, cfg.hidden_size))
    x = torch.zeros(5, cfg.hidden_size)
    x[:3, :2] = torch.tensor([3.0, 2.0])
    x[3:, 2:4] = torch.tensor([3.0, 2.0])
    router.eval()
    _, rmap = router(x)
    assert router.last_capacity == 3
    assert rmap.sum(0).tolist() == [3, 3, 2, 2]
