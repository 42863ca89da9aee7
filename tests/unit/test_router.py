"""TopKRouter: score functions against direct formulas, group-limited routing, Sinkhorn, expert
bias, input jitter, capacity dropping and validation."""

import math

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.kernels.router import group_limited_topk, topk_routing_with_score_function
from moecore.moe.losses import MoELossTracker
from moecore.moe.router import TopKRouter, sinkhorn_routing, update_expert_bias
from moecore.parallel_state import ParallelState

SINGLE = ParallelState.single()


def _cfg(**over):
    base = dict(num_layers=2, hidden_size=8, num_attention_heads=1, num_moe_experts=8,
                moe_router_topk=2, init_method_std=0.5)
    base.update(over)
    return TransformerConfig(**base)


def _gather(t, idx):
    return torch.gather(t, 1, idx)


def test_score_functions_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 8, generator=g) * 2
    for k in (1, 2, 3):
        sel = logits.topk(k, dim=-1).indices
        sig = torch.sigmoid(logits)
        soft = torch.softmax(logits, -1)
        cases = {
            ("softmax", False): torch.softmax(_gather(logits, sel), -1),
            ("softmax", True): _gather(soft, sel),
            ("sigmoid", False): _gather(sig, sel) / _gather(sig, sel).sum(-1, keepdim=True)
            if k > 1 else _gather(sig, sel),
        }
        for (fn, pre), want in cases.items():
            probs, rmap = topk_routing_with_score_function(logits, k, score_function=fn,
                                                           use_pre_softmax=pre,
                                                           scaling_factor=2.5)
            assert torch.equal(rmap, torch.zeros_like(rmap).scatter(1, sel, True))
            torch.testing.assert_close(_gather(probs, sel), 2.5 * want, rtol=1e-6, atol=1e-7)
            assert (probs[~rmap] == 0).all()


def test_expert_bias_changes_selection_not_weights():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 8, generator=g)
    bias = torch.tensor([5.0, 0, 0, 0, 0, 0, 0, -5.0])
    for fn, pre in (("sigmoid", False), ("softmax", True), ("softmax", False)):
        probs, rmap = topk_routing_with_score_function(logits, 2, score_function=fn,
                                                       use_pre_softmax=pre, expert_bias=bias)
        assert rmap[:, 0].all() and not rmap[:, 7].any()
        sel = rmap.nonzero()[:, 1].view(64, 2)
        if fn == "sigmoid":
            s = _gather(torch.sigmoid(logits), sel)
            want = s / s.sum(-1, keepdim=True)
        elif pre:
            want = _gather(torch.softmax(logits, -1), sel)
        else:
            want = torch.softmax(_gather(logits, sel), -1)
        torch.testing.assert_close(_gather(probs, sel), want, rtol=1e-6, atol=1e-7)


def test_group_limited_routing_stays_in_top_groups():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(200, 16, generator=g)
    num_groups, group_topk, k = 4, 2, 4
    _, idx = group_limited_topk(scores, k, num_groups, group_topk)
    grouped = scores.view(200, num_groups, 4)
    for t in range(200):
        gs = [grouped[t, j].topk(k // group_topk).values.sum().item() for j in range(num_groups)]
        best = set(sorted(range(num_groups), key=lambda j: -gs[j])[:group_topk])
        picked = idx[t].tolist()
        assert {e // 4 for e in picked} <= best
        allowed = [e for e in range(16) if e // 4 in best]
        want = sorted(allowed, key=lambda e: -scores[t, e].item())[:k]
        assert sorted(picked) == sorted(want)
    # Through the router (sigmoid + expert bias, as DeepSeek-V3): never outside the top groups.
    cfg = _cfg(hidden_size=8, num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=4,
               moe_router_group_topk=2, moe_router_score_function="sigmoid",
               moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.0)
    router = TopKRouter(cfg, parallel_state=SINGLE)
    router.expert_bias.copy_(torch.randn(16, generator=g) * 0.1)
    x = torch.randn(50, 2, 8, generator=g)
    _, rmap = router(x)
    biased = (torch.sigmoid(router.gating(x.view(100, 8))) + router.expert_bias).detach()
    group_score = biased.view(100, 4, 4).topk(2, dim=-1).values.sum(-1)
    top_groups = group_score.topk(2, dim=-1).indices
    allowed = torch.zeros(100, 4, dtype=torch.bool).scatter(1, top_groups, True)
    assert not (rmap & ~allowed.repeat_interleave(4, dim=1)).any()
    assert (rmap.sum(1) == 4).all()


def test_sinkhorn_balances_skewed_logits_and_eval_is_plain_topk():
    g = torch.Generator().manual_seed(3)
    skew = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    logits = torch.randn(512, 8, generator=g) + skew
    for k in (1, 2):
        plain = torch.zeros(512, 8).scatter(1, logits.topk(k, -1).indices, 1.0).sum(0)
        probs, rmap = sinkhorn_routing(logits, k, training=True)
        load = rmap.sum(0).float()
        assert plain.max() / plain.min().clamp_min(1) > 10  # the skew is real
        assert load.max() / load.min() < 1.5, load
        assert (rmap.sum(1) == k).all()
        act = torch.sigmoid(logits) if k == 1 else torch.softmax(logits, -1)
        torch.testing.assert_close(probs, act * rmap)
        probs_eval, rmap_eval = sinkhorn_routing(logits, k, training=False)
        assert torch.equal(rmap_eval.float().sum(0), plain)
    cfg = _cfg(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1)
    router = TopKRouter(cfg, parallel_state=SINGLE).eval()
    x = torch.randn(16, 2, 8, generator=g)
    _, rmap = router(x)
    assert torch.equal(rmap, torch.zeros_like(rmap).scatter(
        1, router.gating(x.view(32, 8)).argmax(-1, keepdim=True), True))


def test_expert_bias_update_reduces_imbalance():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    cfg = _cfg(num_moe_experts=8, moe_router_topk=2, moe_router_score_function="sigmoid",
               moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01,
               moe_aux_loss_coeff=0.0)
    router = TopKRouter(cfg, parallel_state=SINGLE)
    with torch.no_grad():  # feature 0 is always 1: expert logits skewed by 2, 1.5, ..., -1.5
        router.weight[:, 0] = torch.linspace(2.0, -1.5, 8)

    def load(tokens):
        x = torch.randn(tokens, 2, 8, generator=g)
        x[..., 0] = 1.0
        return router(x)[1].sum(0).float()

    def imbalance():  # max/mean load on a large held-out batch, counted in eval mode
        router.eval()
        lo = load(2048)
        router.train()
        return (lo.max() / lo.mean()).item()

    before = imbalance()
    assert router.local_tokens_per_expert.sum() == 0  # eval passes do not count
    for _ in range(50):
        load(128)
        counts = router.local_tokens_per_expert.clone()
        assert counts.sum().item() == 128 * 2 * 2
        bias = router.expert_bias.clone()
        update_expert_bias(router)  # a module holding routers works too
        want = bias + 0.01 * torch.sign(counts.mean() - counts)
        torch.testing.assert_close(router.expert_bias, want)
        assert router.local_tokens_per_expert.abs().sum() == 0
    after = imbalance()
    assert before > 2.5 and after < 1.5, (before, after)
    with torch.no_grad():  # no-grad passes (e.g. a recompute's first pass) do not count
        load(16)
    assert router.local_tokens_per_expert.sum() == 0


def test_input_jitter_only_in_training():
    cfg = _cfg(moe_input_jitter_eps=0.1, moe_aux_loss_coeff=0.0)
    router = TopKRouter(cfg, parallel_state=SINGLE)
    x = torch.randn(8, 2, 8)
    clean = router.gating(x.view(16, 8))
    noisy = router.apply_input_jitter(x)
    ratio = noisy / x
    assert not torch.equal(noisy, x) and ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    torch.manual_seed(5)
    p1, _ = router(x)
    torch.manual_seed(5)
    p2, _ = router(x)
    assert torch.equal(p1, p2)  # noise comes from the default generator
    router.eval()
    assert torch.equal(router.apply_input_jitter(x), x)
    p_eval, m_eval = router(x)
    want, want_map = topk_routing_with_score_function(clean, 2)
    assert torch.equal(m_eval, want_map)
    torch.testing.assert_close(p_eval, want)


def test_router_capacity_dropping_and_stats():
    g = torch.Generator().manual_seed(6)
    cfg = _cfg(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs",
               moe_aux_loss_coeff=0.0)
    router = TopKRouter(cfg, parallel_state=SINGLE)
    x = torch.randn(10, 3, 8, generator=g)
    probs, rmap = router(x)
    cap = router.last_capacity
    assert cap == 4  # ceil(30 * 2 / 8 * 0.5)
    assert (rmap.sum(0) <= cap).all()
    full_probs, full_map = topk_routing_with_score_function(router.gating(x.view(30, 8)), 2)
    assert torch.equal(router.last_stats["tokens_per_expert"], full_map.sum(0).float())
    assert router.last_stats["dropped_tokens"].item() == int(full_map.sum() - rmap.sum()) > 0
    assert not (rmap & ~full_map).any()
    torch.testing.assert_close(probs, full_probs * rmap)
    dropless = TopKRouter(_cfg(moe_aux_loss_coeff=0.0), parallel_state=SINGLE)
    dropless(x)
    assert dropless.last_capacity is None
    assert dropless.last_stats["dropped_tokens"].item() == 0


def test_router_init_is_normal_with_the_configured_std():
    """``init_method_std`` is the std of a zero-mean normal: over n = 65536 weights the sample
    mean, std and kurtosis stay within 6 standard errors (sigma / sqrt(n), sigma / sqrt(2n),
    sqrt(24 / n)) of 0, sigma and 3 -- a 1.7% band on the std, where a wrong scale or a
    uniform init of the same std fails."""
    torch.manual_seed(11)
    w = TopKRouter(_cfg(hidden_size=1024, num_moe_experts=64, init_method_std=0.02),
                   parallel_state=SINGLE).weight.detach().double().reshape(-1)
    n, sigma = w.numel(), 0.02
    assert abs(w.mean().item()) <= 6 * sigma / math.sqrt(n)
    assert abs(w.std().item() - sigma) <= 6 * sigma / math.sqrt(2 * n)
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var(unbiased=False) ** 2
    assert abs(kurtosis.item() - 3) <= 6 * math.sqrt(24 / n)


def test_router_init_shapes_and_validation():
    torch.manual_seed(7)
    r1 = TopKRouter(_cfg(), parallel_state=SINGLE)
    torch.manual_seed(7)
    r2 = TopKRouter(_cfg(), parallel_state=SINGLE)
    assert r1.weight.shape == (8, 8) and torch.equal(r1.weight, r2.weight)
    assert r1.weight.sequence_parallel is False and r1.expert_bias is None
    rb = TopKRouter(_cfg(moe_router_enable_expert_bias=True), parallel_state=SINGLE).bfloat16()
    rb(torch.randn(4, 8).bfloat16())
    assert rb.expert_bias.dtype == torch.float32
    x2d = torch.randn(6, 8)
    torch.testing.assert_close(r1(x2d)[0], r1(x2d.view(6, 1, 8))[0])
    with pytest.raises(ValueError, match="num_moe_experts"):
        TopKRouter(_cfg(num_moe_experts=None), parallel_state=SINGLE)
    with pytest.raises(ValueError, match="moe_router_dtype"):
        TopKRouter(_cfg(moe_router_dtype="fp8"), parallel_state=SINGLE)
    with pytest.raises(ValueError, match="sinkhorn"):
        TopKRouter(_cfg(moe_router_load_balancing_type="sinkhorn",
                        moe_router_enable_expert_bias=True), parallel_state=SINGLE)
    with pytest.raises(ValueError, match="hidden size 5"):
        r1(torch.randn(3, 2, 5))
    MoELossTracker.clear()


def test_force_load_balancing_routes_uniformly_and_passes_gradients_through():
    """Benchmark flag: a router that sends every token to expert 0 is overridden by random
    logits (about T*k/E tokens per expert); the router weight still gets the gradient of the
    probabilities as if those logits were its own."""
    T, E, k = 4096, 8, 2
    for force in (False, True):
        torch.manual_seed(0)
        router = TopKRouter(_cfg(num_moe_experts=E, moe_router_topk=k, moe_aux_loss_coeff=0.0,
                                 moe_router_force_load_balancing=force),
                            parallel_state=ParallelState.single())
        with torch.no_grad():
            router.weight.zero_()
            router.weight[0] = 1.0
        x = torch.rand(T, 1, router.weight.shape[1]) + 0.5  # all logits favour expert 0
        probs, routing_map = router(x)
        counts = routing_map.sum(0).float()
        if not force:
            assert counts[0] == T
            continue
        assert (counts - T * k / E).abs().max() < 0.1 * T * k / E, counts
        probs.square().sum().backward()
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    from moecore.arguments import parse_args
    from moecore.arguments.validation import transformer_config_from_args
    from tests.cli import BASE

    cfg = transformer_config_from_args(parse_args(BASE + [
        "--num-experts", "4", "--disable-bias-linear", "--moe-router-force-load-balancing"]))
    assert cfg.moe_router_force_load_balancing


def test_pre_softmax_is_ignored_with_sigmoid():
    """DeepSeek-V3 recipes pass --moe-router-pre-softmax with the sigmoid score function;
    Megatron-Core reads it only for softmax, so the routing, losses and gradients are exactly
    those without it (group-limited, biased, scaled routing with a sequence aux loss)."""
    x = torch.randn(6, 2, 8)
    outs = []
    for pre in (False, True):
        MoELossTracker.clear()
        torch.manual_seed(4)
        cfg = _cfg(moe_router_score_function="sigmoid", moe_router_pre_softmax=pre,
                   moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2,
                   moe_router_topk_scaling_factor=2.5, moe_router_enable_expert_bias=True,
                   moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)
        router = TopKRouter(cfg, layer_number=1, parallel_state=SINGLE)
        router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
        probs, rmap = router(x)
        (probs * torch.arange(8.0)).sum().backward()
        outs.append((probs.detach(), rmap, router.weight.grad,
                     router.last_stats["seq_load_balancing_loss"]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    MoELossTracker.clear()
