"""Fused MoE kernels (moecore.kernels: swiglu, router, permute): the torch reference paths
against the unfused code, outputs and gradients, on random shapes with empty experts and odd
sizes; selection by flag; and, where Triton is installed, the Triton kernels themselves under
the Triton interpreter (one subprocess, see triton_interpret_checks.py)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from moecore.backends import BackendUnavailableError
from moecore.kernels import fusion_request
from moecore.kernels import permute as KP
from moecore.kernels.router import route_torch, scores_for_aux_loss
from moecore.kernels.swiglu import SWIGLU, swiglu
from moecore.moe.experts import GroupedMLP
from moecore.moe.losses import LOAD_BALANCING_LOSS_NAMES
from moecore.moe.permute import TopKPlan, permute, permute_topk, unpermute, unpermute_topk
from moecore.moe.router import TopKRouter
from moecore.parallel_state import ParallelState
from tests.moe_reference import tiny_moe_config
from tests.triton_interpret import assert_checks_pass

SINGLE = ParallelState.single()
CPU = torch.device("cpu")


def _routing(t, e, k, gen):
    idx = torch.randn(t, e, generator=gen).topk(k, dim=1).indices
    return torch.zeros(t, e, dtype=torch.bool).scatter(1, idx, True)


# ---- SwiGLU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,f", [(0, 4), (1, 1), (7, 5), (33, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_swiglu_reference_is_the_unfused_expression(n, f, dtype):
    gen = torch.Generator().manual_seed(n * 7 + f)
    x = torch.randn(n, 2 * f, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(n, f, generator=gen).to(dtype)
    out = swiglu(x, "torch")
    out.backward(g)
    x_ref = x.detach().clone().requires_grad_()
    gate, up = x_ref.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(g)
    # The same ops in the same order: bitwise equal, gradients too (silu recomputed).
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_swiglu_reference_is_the_unfused_expression(dtype):
    """``probs`` weights each row (fp32 product, one cast back), as the experts apply their
    routing probabilities; the probabilities get ``sum_f grad * silu(gate) * up``."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 2 * 6, generator=gen).to(dtype).requires_grad_()
    p = torch.rand(13, generator=gen).requires_grad_()
    g = torch.randn(13, 6, generator=gen).to(dtype)
    out = swiglu(x, "torch", probs=p)
    out.backward(g)
    x_ref, p_ref = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    gate, up = x_ref.chunk(2, dim=-1)
    ref = (F.silu(gate) * up * p_ref[:, None]).to(dtype)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-6)  # sum order
    with pytest.raises(ValueError, match="probs"):
        swiglu(x, "torch", probs=p.half())


def test_swiglu_registry_on_cpu():
    assert SWIGLU.select("auto", device=CPU, dtype=torch.float32, log=False).name == "torch"
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        SWIGLU.select("triton", device=CPU, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[N, 2F\]"):
        swiglu(torch.randn(3, 5))


def test_grouped_mlp_same_with_and_without_swiglu_fusion():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 2, 0, 4])  # empty experts
    x = torch.randn(int(counts.sum()), 16, generator=gen)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        mlp = GroupedMLP(8, tiny_moe_config(bias_swiglu_fusion=fused), parallel_state=SINGLE)
        xi = x.clone().requires_grad_()
        out, _ = mlp(xi, counts)
        out.backward(torch.ones_like(out))
        results.append([out, xi.grad, mlp.weight1.grad, mlp.weight2.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- router ---------------------------------------------------------------------------------


@pytest.mark.parametrize("score,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_route_torch_outputs(score, pre):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 7, generator=gen)
    out = route_torch(logits, 3, score_function=score, use_pre_softmax=pre,
                      need_aux_scores=True)
    assert torch.equal(out.tokens_per_expert, out.routing_map.sum(0).int())
    assert torch.equal(out.aux_scores, scores_for_aux_loss(logits, score))
    assert route_torch(logits, 3, score_function=score, use_pre_softmax=pre).aux_scores is None


def _router_reference(x, weight, score, pre, topk, balance, aux_coeff, z_coeff):
    """Float64 TopKRouter written from the formulas, token by token: ``x [S, B, H]`` ->
    ``(probs [T, E], routing_map [T, E], balance loss / aux_coeff, z loss / z_coeff)``."""
    s, b, _ = x.shape
    logits = x.double().reshape(s * b, -1) @ weight.double().T  # token s * B + b
    t, e = logits.shape
    probs = torch.zeros_like(logits)
    for i in range(t):
        row = logits[i]
        if score == "sigmoid":
            select = torch.sigmoid(row)
        else:
            select = torch.softmax(row, 0) if pre else row
        chosen = torch.topk(select, topk).indices
        if score == "sigmoid":
            w = torch.sigmoid(row[chosen])
            probs[i, chosen] = w / w.sum()
        elif pre:
            probs[i, chosen] = torch.softmax(row, 0)[chosen]
        else:
            probs[i, chosen] = torch.softmax(row[chosen], 0)
    rmap = probs > 0
    if score == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    if balance in ("aux_loss", "global_aux_loss"):  # E * sum_e f_e P_e over all T tokens
        f = rmap.sum(0).double() / (t * topk)
        balance_loss = e * (f * scores.mean(0)).sum()
    elif balance == "seq_aux_loss":  # the same per sequence b (tokens b, B + b, ...), averaged
        per_seq = [e * ((rmap[j::b].sum(0).double() / (s * topk)) * scores[j::b].mean(0)).sum()
                   for j in range(b)]
        balance_loss = torch.stack(per_seq).mean()
    else:
        balance_loss = logits.new_zeros(())
    z = torch.logsumexp(logits, -1).square().mean()
    return probs, rmap, balance_loss, z


@pytest.mark.parametrize("balance", ["aux_loss", "seq_aux_loss", "global_aux_loss", "none"])
@pytest.mark.parametrize("score,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_router_auto_and_torch_paths_match_a_float64_reference(balance, score, pre):
    """The router on CPU (``auto``, which picks torch there, and ``torch``) against the float64
    reference above: selection exactly, probs, losses and the gradients of ``x`` and the weight
    (balance and z losses added with their coefficients, as the aux-loss scaler does) to fp32
    accuracy."""
    aux_coeff, z_coeff = 1e-2, 1e-3
    for fusion in (None, False):
        cfg = tiny_moe_config(moe_router_fusion=fusion, moe_router_load_balancing_type=balance,
                              moe_router_score_function=score, moe_router_pre_softmax=pre,
                              moe_router_topk=3, moe_aux_loss_coeff=aux_coeff,
                              moe_z_loss_coeff=z_coeff)
        torch.manual_seed(0)
        router = TopKRouter(cfg, parallel_state=SINGLE)
        x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
        probs, rmap = router(x)
        # O(1) gradients: a probe of the size of the probs keeps fp32 cancellation small
        probe = torch.randn(probs.shape, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
        (probs * probe.float()).sum().backward()

        x64 = x.detach().double().requires_grad_()
        w64 = router.weight.detach().double().requires_grad_()
        want, want_map, balance_loss, z = _router_reference(x64, w64, score, pre, 3, balance,
                                                             aux_coeff, z_coeff)
        total = (want * probe).sum() + z_coeff * z
        if balance != "none":
            total = total + aux_coeff * balance_loss
        total.backward()
        assert torch.equal(rmap, want_map), fusion
        stats = router.last_stats
        assert torch.equal(stats["tokens_per_expert"], want_map.sum(0).float())
        # fp32 vs float64: a few fp32 roundings (eps 1.2e-7) of the largest entry's size
        for got, ref in ((probs, want), (x.grad, x64.grad), (router.weight.grad, w64.grad),
                         (stats["z_loss"], z)):
            err = (got.double() - ref).abs().max()
            assert err <= 1e-6 * ref.abs().max(), (fusion, err.item(), ref.abs().max().item())
        if balance != "none":
            err = (stats[LOAD_BALANCING_LOSS_NAMES[balance]].double() - balance_loss).abs()
            assert err <= 1e-6 * balance_loss, (fusion, err)
        else:
            assert not set(LOAD_BALANCING_LOSS_NAMES.values()) & set(stats)


def test_router_fusion_flag_semantics(caplog, monkeypatch):
    from moecore import backends

    x = torch.randn(6, 16)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        TopKRouter(tiny_moe_config(moe_router_fusion=True), parallel_state=SINGLE)(x)
    # Group-limited routing is not fused: explicit fallback to torch, with a warning.
    monkeypatch.setattr(backends, "_LOGGED", {})
    cfg = tiny_moe_config(moe_router_fusion=True, moe_router_num_groups=2,
                          moe_router_group_topk=1)
    with caplog.at_level(logging.INFO, logger="moecore"):
        probs, rmap = TopKRouter(cfg, parallel_state=SINGLE)(x)
    assert rmap.sum(1).eq(2).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("group-limited" in w for w in warnings), warnings


def test_fusion_request_mapping():
    assert [fusion_request(f) for f in (None, True, False)] == ["auto", "triton", "torch"]


# ---- permute --------------------------------------------------------------------------------

# (3, 16, 2): most experts empty; (1, 4, 4): k = E; odd H; T = 0.
SHAPES = [(13, 6, 3, 5), (1, 4, 4, 7), (3, 16, 2, 9), (40, 16, 1, 8), (0, 4, 2, 3),
          (57, 64, 6, 33)]


@pytest.mark.parametrize("t,e,k,h", SHAPES)
def test_permute_reference_matches_general_permute(t, e, k, h):
    gen = torch.Generator().manual_seed(t * 13 + e)
    rmap = _routing(t, e, k, gen)
    probs = torch.rand(t, e, generator=gen, requires_grad=True)
    x = torch.randn(t, h, generator=gen, requires_grad=True)
    rows, parts = KP.permute_rows(x, rmap, k, "torch")
    ref_rows, ref_probs, ref_sorted, ref_counts = permute(x.detach(), rmap, probs.detach())
    assert torch.equal(rows, ref_rows) and torch.equal(parts.sorted_indices, ref_sorted)
    assert torch.equal(parts.tokens_per_expert, ref_counts)
    assert torch.equal(parts.slot_rows[parts.row_slots], torch.arange(t * k))
    want_ids = torch.arange(e).expand(t, e).masked_select(rmap).view(t, k)
    assert torch.equal(parts.expert_ids, want_ids)
    plan = TopKPlan.from_parts(parts, probs, t, k)
    assert torch.equal(plan.probs.reshape(-1)[plan.row_slots], ref_probs)
    g = torch.randn(t * k, h, generator=gen)
    rows.backward(g)
    assert torch.allclose(x.grad, unpermute(g, ref_sorted, t), atol=1e-6)


@pytest.mark.parametrize("t,e,k,h", SHAPES)
def test_permute_topk_flag_paths_match_unfused(t, e, k, h):
    gen = torch.Generator().manual_seed(t + 5 * e)
    rmap = _routing(t, e, k, gen)
    probs = torch.rand(t, e, generator=gen, requires_grad=True)
    x = torch.randn(t, h, generator=gen, requires_grad=True)
    w = torch.randn(h, h, generator=gen)
    gout = torch.randn(t, h, generator=gen)
    results = []
    for fusion in (None, False, "unfused"):
        x.grad = probs.grad = None
        if fusion == "unfused":
            rows, pp, si, tpe = permute(x, rmap, probs)
            y = unpermute(torch.tanh(rows @ w), si, t, pp)
        else:
            rows, plan, tpe = permute_topk(x, rmap, probs, k, fusion=fusion)
            y = unpermute_topk(torch.tanh(rows @ w), plan)
        (y * gout).sum().backward()
        results.append((rows.detach(), tpe, y.detach(), x.grad.clone(), probs.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_permute_fusion_required_raises_on_cpu():
    rmap = _routing(4, 4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        permute_topk(torch.randn(4, 3), rmap, None, 2, fusion=True)


# ---- flags ----------------------------------------------------------------------------------


def test_fusion_flags_reach_the_config():
    from moecore.arguments import parse_args, transformer_config_from_args
    from tests.unit.test_arguments import BASE

    cfg = transformer_config_from_args(parse_args(list(BASE)))
    flags = ("moe_router_fusion", "moe_permute_fusion", "bias_swiglu_fusion", "apply_rope_fusion")
    assert tuple(getattr(cfg, f) for f in flags) == (None, None, True, True)
    args = parse_args(BASE + ["--moe-router-fusion", "--no-moe-permute-fusion",
                              "--no-bias-swiglu-fusion", "--no-rope-fusion"])
    cfg = transformer_config_from_args(args)
    assert tuple(getattr(cfg, f) for f in flags) == (True, False, False, False)


# ---- Triton kernels under the interpreter ---------------------------------------------------

CHECKS = ("swiglu", "router", "permute", "expert_positions", "combine", "moe_layer",
          "router_gating", "cp_merge")


def test_triton_kernels_under_interpreter():
    assert_checks_pass("tests.unit.triton_interpret_checks", CHECKS)
