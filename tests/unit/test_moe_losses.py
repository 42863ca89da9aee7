"""Load-balancing and z-losses: hand-computed values, gradients through the autograd hook,
loss scaling, and the per-layer tracker."""

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.moe.losses import (
    LOAD_BALANCING_LOSS_NAMES,
    MoEAuxLossAutoScaler,
    MoELossTracker,
    sequence_load_balancing_loss_func,
    switch_load_balancing_loss_func,
    z_loss_func,
)
from moecore.moe.router import TopKRouter
from moecore.parallel_state import ParallelState

# Hand-checkable case, E=4, T=4 (S=2, B=2, token t = s*B + b), top-2. Softmax probs P:
P = torch.tensor([[0.4, 0.3, 0.2, 0.1],   # t0 (s0, b0) -> experts {0, 1}
                  [0.1, 0.2, 0.3, 0.4],   # t1 (s0, b1) -> {2, 3}
                  [0.5, 0.1, 0.3, 0.1],   # t2 (s1, b0) -> {0, 2}
                  [0.6, 0.1, 0.1, 0.2]])  # t3 (s1, b1) -> {0, 3}
ROUTED = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [1, 0, 0, 1]]).bool()
# Per-token logit shifts leave softmax unchanged; logsumexp(log P + c) = c.
SHIFT = torch.tensor([1.0, -1.0, 2.0, 0.0])
# aux: counts [3, 1, 2, 2], prob sums [1.6, 0.7, 0.9, 0.8]; sum(prod) = 4.8+0.7+1.8+1.6 = 8.9;
#      E / (k T^2) * 8.9 = 4 / 32 * 8.9 = 1.1125.
AUX = 1.1125
# seq aux: b0 = {t0, t2}: counts [2, 1, 1, 0], prob sums [0.9, 0.4, 0.5, 0.2] -> 2.7 * 4/8 = 1.35;
#          b1 = {t1, t3}: counts [1, 0, 1, 2], prob sums [0.7, 0.3, 0.4, 0.6] -> 2.3 * 4/8 = 1.15;
#          mean over b = 1.25.
SEQ_AUX = 1.25
# z: mean(c^2) = (1 + 1 + 4 + 0) / 4 = 1.5.
Z = 1.5


def _cfg(**over):
    base = dict(num_layers=2, hidden_size=4, num_attention_heads=1, num_moe_experts=4,
                moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    base.update(over)
    return TransformerConfig(**base)


def _identity_router(**over):
    router = TopKRouter(_cfg(**over), layer_number=1, parallel_state=ParallelState.single())
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router


def _hand_input():
    return (P.log() + SHIFT[:, None]).view(2, 2, 4)


def test_loss_functions_closed_form():
    counts = ROUTED.sum(0).float()
    assert counts.tolist() == [3, 1, 2, 2]
    assert switch_load_balancing_loss_func(P, counts, 4, 2, 4, 0.01).item() == \
        pytest.approx(0.01 * AUX, rel=1e-6)
    per_seq = ROUTED.view(2, 2, 4).sum(0).float()  # [B, E]
    assert sequence_load_balancing_loss_func(P, per_seq, 2, 2, 2, 4, 0.1).item() == \
        pytest.approx(0.1 * SEQ_AUX, rel=1e-6)
    logits = P.log() + SHIFT[:, None]
    assert z_loss_func(logits, 1e-3).item() == pytest.approx(1e-3 * Z, rel=1e-6)
    # Uniform probs and balanced counts give exactly the coefficient.
    assert switch_load_balancing_loss_func(torch.full((8, 4), 0.25), torch.full((4,), 4.0), 8,
                                           2, 4, 0.3).item() == pytest.approx(0.3, rel=1e-6)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        sequence_load_balancing_loss_func(P, counts, 2, 2, 2, 4, 0.1)


@pytest.mark.parametrize("kind,value", [("aux_loss", AUX), ("seq_aux_loss", SEQ_AUX),
                                        ("global_aux_loss", AUX)])
def test_router_records_hand_values(kind, value):
    MoELossTracker.clear()
    router = _identity_router(moe_router_load_balancing_type=kind)
    probs, routing_map = router(_hand_input())
    assert torch.equal(routing_map, ROUTED)
    # Post-softmax top-2 weights: P renormalised over the two picked experts.
    want = torch.where(ROUTED, P, 0.0) / torch.where(ROUTED, P, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(probs.detach(), want, rtol=1e-6, atol=1e-7)
    vals = MoELossTracker.values()
    name = LOAD_BALANCING_LOSS_NAMES[kind]  # Megatron-Core's name for each type
    assert set(vals) == {name, "z_loss"}
    assert vals[name].tolist() == pytest.approx([value, 0.0], rel=1e-6)
    assert vals["z_loss"].tolist() == pytest.approx([Z, 0.0], rel=1e-6)
    assert router.last_stats[name].item() == pytest.approx(value, rel=1e-6)
    assert router.last_stats["tokens_per_expert"].tolist() == [3, 1, 2, 2]
    MoELossTracker.clear()


def test_balance_losses_count_the_unbiased_top_k():
    """Expert bias moves the selection, not the balance loss (Megatron-Core, DeepSeek-V3)."""
    MoELossTracker.clear()
    router = _identity_router(moe_router_enable_expert_bias=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    _, routing_map = router(_hand_input())
    assert routing_map[:, 3].all() and not torch.equal(routing_map, ROUTED)
    assert router.last_stats["load_balancing_loss"].item() == pytest.approx(AUX, rel=1e-6)
    MoELossTracker.clear()


def _explicit_losses(x, w, cfg, kind, seq_len, batch):
    """Router outputs and losses written out directly from the formulas."""
    e, k = cfg.num_moe_experts, cfg.moe_router_topk
    logits = x.reshape(-1, x.shape[-1]) @ w.t()
    top, idx = logits.topk(k, dim=-1)
    probs = torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, -1))
    routed = torch.zeros_like(logits).scatter(1, idx, 1.0)
    scores = torch.softmax(logits, -1)
    if kind == "seq_aux_loss":
        counts = routed.view(seq_len, batch, e).sum(0)                  # [B, E]
        psum = scores.view(seq_len, batch, e).sum(0)
        aux = (counts * psum).sum(-1).mean() * e / (k * seq_len ** 2)
    else:
        t = logits.shape[0]
        aux = (routed.sum(0) * scores.sum(0)).sum() * e / (k * t * t)
    z = torch.logsumexp(logits, -1).square().mean()
    return probs, cfg.moe_aux_loss_coeff * aux + cfg.moe_z_loss_coeff * z


@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_gradients_reach_router_weight_through_hook(kind):
    torch.manual_seed(0)
    cfg = _cfg(hidden_size=8, num_moe_experts=6, moe_router_topk=2, init_method_std=0.5,
               moe_router_load_balancing_type=kind, moe_aux_loss_coeff=0.3,
               moe_z_loss_coeff=0.05)
    router = TopKRouter(cfg, parallel_state=ParallelState.single())
    x = torch.randn(5, 3, 8)
    upstream = torch.randn(15, 6)
    probs, _ = router(x)
    (probs * upstream).sum().backward()

    w = router.weight.detach().clone().requires_grad_(True)
    ref_probs, aux = _explicit_losses(x, w, cfg, kind, 5, 3)
    ((ref_probs * upstream).sum() + aux).backward()
    torch.testing.assert_close(probs.detach(), ref_probs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(router.weight.grad, w.grad, rtol=1e-5, atol=1e-8)

    # The aux part alone: without it the grads must differ (the hook does real work).
    w2 = router.weight.detach().clone().requires_grad_(True)
    (_explicit_losses(x, w2, cfg, kind, 5, 3)[0] * upstream).sum().backward()
    assert (w2.grad - w.grad).norm() > 1e-3 * w.grad.norm()


def _weight_grad(cfg, x, upstream):
    torch.manual_seed(3)
    router = TopKRouter(cfg, layer_number=1, parallel_state=ParallelState.single())
    probs, _ = router(x)
    (probs * upstream).sum().backward()
    return probs.detach(), router.weight.grad, router.last_stats


@pytest.mark.parametrize("types,coeffs", [(["seq_aux_loss", "global_aux_loss"], [0.1, 0.3]),
                                          (["aux_loss", "seq_aux_loss", "global_aux_loss"],
                                           [0.2, 0.05, 0.4])])
def test_listed_types_add_their_losses_each_with_its_coefficient(types, coeffs):
    """The combined loss is the sum of each type's loss times its own coefficient: the
    router-weight gradient equals the routing gradient plus each single-type router's
    balance-loss gradient, and each loss is logged under its own name with its own value."""
    x, upstream = torch.randn(5, 3, 8), torch.randn(15, 6)
    base = dict(hidden_size=8, num_moe_experts=6, init_method_std=0.5, moe_z_loss_coeff=None)
    MoELossTracker.clear()
    probs, grad, stats = _weight_grad(_cfg(moe_router_load_balancing_type=types,
                                           moe_aux_loss_coeff=coeffs, **base), x, upstream)
    logged = MoELossTracker.values()
    assert set(logged) == {LOAD_BALANCING_LOSS_NAMES[t] for t in types}
    _, want, _ = _weight_grad(_cfg(moe_aux_loss_coeff=0.0, **base), x, upstream)
    for kind, coeff in zip(types, coeffs):
        MoELossTracker.clear()
        single_probs, g, single = _weight_grad(
            _cfg(moe_router_load_balancing_type=kind, moe_aux_loss_coeff=coeff, **base),
            x, torch.zeros(15, 6))  # only the balance loss reaches the weight
        torch.testing.assert_close(single_probs, probs, rtol=0, atol=0)
        name = LOAD_BALANCING_LOSS_NAMES[kind]
        assert stats[name].item() == pytest.approx(single[name].item(), rel=1e-6)
        assert logged[name][0].item() == pytest.approx(single[name].item(), rel=1e-6)
        want = want + g
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-8)
    MoELossTracker.clear()


def test_list_form_needs_one_coefficient_per_type():
    with pytest.raises(ValueError, match="has 2 types but moe_aux_loss_coeff has 1 value;"):
        _cfg(moe_router_load_balancing_type=["seq_aux_loss", "global_aux_loss"],
             moe_aux_loss_coeff=1e-3)
    with pytest.raises(ValueError, match="moe_aux_loss_coeff has 2 values but"):
        _cfg(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=[1e-3, 1e-4])
    with pytest.raises(ValueError, match="'sinkhorn' is not supported"):
        _cfg(moe_router_load_balancing_type=["sinkhorn", "aux_loss"],
             moe_aux_loss_coeff=[0.0, 1e-3])
    with pytest.raises(ValueError, match="repeats a type"):
        _cfg(moe_router_load_balancing_type=["aux_loss", "aux_loss"],
             moe_aux_loss_coeff=[1e-3, 1e-3])
    one = _cfg(moe_router_load_balancing_type=["seq_aux_loss"], moe_aux_loss_coeff=1e-3)
    assert TopKRouter(one, parallel_state=ParallelState.single())._aux_coeffs() == \
        {"seq_aux_loss": 1e-3}


def test_loss_scale_scales_only_the_aux_gradient():
    torch.manual_seed(1)
    cfg = _cfg(hidden_size=8, num_moe_experts=6, init_method_std=0.5, moe_aux_loss_coeff=0.3)
    x = torch.randn(6, 2, 8)
    grads = []
    try:
        for scale in (1.0, 0.25):
            MoEAuxLossAutoScaler.set_loss_scale(scale)
            router = TopKRouter(cfg, parallel_state=ParallelState.single())
            with torch.no_grad():
                router.weight.copy_(torch.linspace(-1, 1, 48).view(6, 8))
            probs, _ = router(x)
            (probs * 0).sum().backward()  # only the attached losses produce a gradient
            grads.append(router.weight.grad.clone())
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(1.0)
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], 0.25 * grads[0], rtol=1e-6, atol=1e-9)


def test_no_loss_in_eval_or_without_grad():
    MoELossTracker.clear()
    router = _identity_router()
    router.eval()
    probs, _ = router(_hand_input())
    assert probs.grad_fn is None or "AutoScaler" not in type(probs.grad_fn).__name__
    router.train()
    with torch.no_grad():
        router(_hand_input())
    assert MoELossTracker.values() == {}
    assert "load_balancing_loss" not in router.last_stats
    # Coefficient 0 or type "none": no balance loss, z-loss still applies.
    for over in (dict(moe_aux_loss_coeff=0.0), dict(moe_router_load_balancing_type="none")):
        MoELossTracker.clear()
        _identity_router(**over)(_hand_input())
        assert set(MoELossTracker.values()) == {"z_loss"}
    MoELossTracker.clear()


def test_tracker_accumulates_and_reduces_without_groups():
    MoELossTracker.clear()
    MoELossTracker.save("load_balancing_loss", 2, torch.tensor(0.5), num_layers=3)
    MoELossTracker.save("load_balancing_loss", 2, torch.tensor(0.25), num_layers=3)
    MoELossTracker.save("z_loss", 4, torch.tensor(1.0))  # grows past num_layers
    vals = MoELossTracker.values()
    assert vals["load_balancing_loss"].tolist() == [0.0, 0.75, 0.0]
    assert vals["z_loss"].tolist() == [0.0, 0.0, 0.0, 1.0]
    red = MoELossTracker.reduce()
    assert all(torch.equal(red[k], vals[k]) for k in vals)
    with pytest.raises(ValueError, match="layer_number"):
        MoELossTracker.save("z_loss", 0, torch.tensor(1.0))
    MoELossTracker.clear()
    assert MoELossTracker.values() == {}
