"""The Triton kernels of ``moecore.kernels`` against their torch references, on CPU tensors under
the Triton interpreter. Run as ``TRITON_INTERPRET=1 python -m tests.unit.triton_interpret_checks
[name ...]``: the variable must be set before Triton is imported (kernels are bound at
definition), so ``test_fused_kernels.py`` runs this in one subprocess. Prints ``PASS name`` or
``FAIL name`` and a traceback per check; exits 1 if any failed.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tests.triton_interpret import run_checks


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(t, e, k, gen):
    idx = torch.randn(t, e, generator=gen).topk(k, dim=1).indices
    return torch.zeros(t, e, dtype=torch.bool).scatter(1, idx, True)


def check_swiglu(gen):
    from moecore.kernels import swiglu as S

    fns = (S.swiglu_forward_triton, S.swiglu_backward_triton)
    for n, f in [(0, 4), (1, 1), (7, 5), (33, 24), (3, 1030)]:
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            base = torch.randn(n, 2 * f + 3, generator=gen).to(dtype)
            x = base[:, : 2 * f].detach().requires_grad_()  # strided rows, as a padded GEMM out
            g = torch.randn(n, f, generator=gen).to(dtype)
            out = S._SwiGLU.apply(x, None, fns)
            out.backward(g)
            x_ref = x.detach().double().requires_grad_()
            gate, up = x_ref.chunk(2, dim=-1)
            ref = F.silu(gate) * up
            ref.backward(g.double())
            assert out.dtype == dtype and out.shape == (n, f)
            if n:
                assert _rel(out, ref) < tol, (n, f, dtype, _rel(out, ref))
                assert _rel(x.grad, x_ref.grad) < tol, (n, f, dtype)
            dx, act, _ = S.swiglu_backward_and_forward_triton(x.detach(), g)
            assert torch.equal(dx, x.grad) and torch.equal(act, out.detach()), (n, f, dtype)
            # the amax of what each direction writes, from the kernel, exactly
            amax = torch.full((2,), 0.5)  # raised in place, never lowered
            S.swiglu_forward_triton(x.detach(), amax=amax[:1])
            S.swiglu_backward_triton(x.detach(), g, amax=amax[1:])
            want = [max(0.5, t.abs().max().item()) if n else 0.5 for t in (out, x.grad)]
            assert amax.tolist() == want, (n, f, dtype, amax.tolist(), want)
    # weighted by per-row probabilities (the experts' SwiGLU): against autograd of the
    # unfused expression in float64, several column blocks (f = 1030), and bit-identical
    # recomputed activations
    for n, f in [(7, 5), (33, 1030)]:
        x = torch.randn(n, 2 * f, generator=gen).requires_grad_()
        p = torch.rand(n, generator=gen).requires_grad_()
        g = torch.randn(n, f, generator=gen)
        out = S._SwiGLU.apply(x, p, fns)
        out.backward(g)
        xd, pd = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
        gate, up = xd.chunk(2, dim=-1)
        (F.silu(gate) * up * pd[:, None]).backward(g.double())
        assert _rel(x.grad, xd.grad) < 1e-6 and _rel(p.grad, pd.grad) < 1e-6, (n, f)
        dx, act, dp = S.swiglu_backward_and_forward_triton(x.detach(), g, probs=p.detach())
        assert torch.equal(act, out.detach()) and torch.equal(dp, p.grad), (n, f)
    x = torch.randn(40, 2 * 300, generator=gen).bfloat16()
    x[17, 3] = float("nan")  # NaN counts as inf: the FP8 scale is then 1, as from torch
    amax = torch.zeros(1)
    S.swiglu_forward_triton(x, amax=amax)
    assert amax.item() == float("inf")


def check_router(gen):
    from moecore.kernels import router as R

    cases = [dict(score_function="softmax", topk=2),
             dict(score_function="softmax", topk=3, use_pre_softmax=True, scaling_factor=2.5),
             dict(score_function="sigmoid", topk=4),
             dict(score_function="sigmoid", topk=1, scaling_factor=0.5),
             dict(score_function="sigmoid", topk=3, bias=0.1),
             dict(score_function="softmax", topk=2, bias=1.0),
             dict(score_function="softmax", topk=2, use_pre_softmax=True, bias=0.01)]
    for case in cases:
        kw = dict(case)
        bias_scale = kw.pop("bias", None)
        for t, e in [(0, 6), (1, 13), (37, 13), (20, 64)]:
            if bias_scale is not None:
                kw["expert_bias"] = torch.randn(e, generator=gen) * bias_scale
            logits = torch.randn(t, e, generator=gen).requires_grad_()
            gp, ga = torch.randn(t, e, generator=gen), torch.randn(t, e, generator=gen)
            outs = []
            for fn in (R.route_triton, R.route_torch):
                logits.grad = None
                o = fn(logits, need_aux_scores=True, **kw)
                ((o.probs * gp).sum() + (o.aux_scores * ga).sum()).backward()
                outs.append((o, logits.grad.clone()))
            (a, grad_a), (b, grad_b) = outs
            assert torch.equal(a.routing_map, b.routing_map), (case, t, e)
            assert torch.equal(a.tokens_per_expert, b.tokens_per_expert), (case, t, e)
            if t:
                assert _rel(a.probs, b.probs) < 1e-6, case
                assert _rel(a.aux_scores, b.aux_scores) < 1e-6, case
                assert _rel(grad_a, grad_b) < 1e-5, (case, _rel(grad_a, grad_b))
    # probs-only backward (no aux scores asked for)
    logits = torch.randn(9, 7, generator=gen).requires_grad_()
    o = R.route_triton(logits, 2)
    assert o.aux_scores is None
    o.probs.sum().backward()


def check_permute(gen):
    from moecore.kernels import permute as P

    fns = (P.permute_forward_triton, P.permute_backward_triton)
    # (3, 16, 2): most experts empty; odd H; k = E; T = 0.
    for t, e, k, h in [(13, 6, 3, 5), (1, 4, 4, 7), (3, 16, 2, 9), (40, 16, 1, 8), (0, 4, 2, 3),
                       (25, 64, 8, 33)]:
        for dtype in (torch.float32, torch.bfloat16):
            rmap = _routing(t, e, k, gen)
            x = torch.randn(t, h, generator=gen).to(dtype).requires_grad_()
            got, parts = P._PermuteRows.apply(x, rmap, k, fns)
            ref_parts = P.plan_torch(rmap, k)
            for name, a, b in zip(P.PlanParts._fields, parts, ref_parts):
                assert torch.equal(a, b), (name, t, e, k)
            assert torch.equal(got, x.detach().index_select(0, ref_parts.sorted_indices))
            g = torch.randn(t * k, h, generator=gen).to(dtype)
            got.backward(g)
            want = P.permute_backward_torch(g.double(), ref_parts.slot_rows, k)
            if t:
                assert _rel(x.grad, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    # A map without exactly k experts per token fails the device-side assert.
    for per_token in ([3, 2, 1], [2, 2, 1]):
        rmap = torch.zeros(3, 4, dtype=torch.bool)
        for i, n in enumerate(per_token):
            rmap[i, :n] = True
        try:
            P.permute_forward_triton(torch.randn(3, 5), rmap, 2)
        except RuntimeError as exc:
            assert "exactly topk=2" in str(exc)
        else:
            raise AssertionError(f"no error for {per_token} experts per token")


def check_expert_positions(gen):
    """The chunked Triton scan vs torch's cumsum: one and many chunks, ragged last chunks, the
    widest expert tile, and the torch fallback (many experts); plans over several chunks."""
    from moecore.kernels import permute as P

    for t, e in [(1, 1), (5000, 16), (3001, 64), (1025, 3), (700, 100)]:
        mask = (torch.rand(t, e, generator=gen) < 0.3).to(torch.uint8)
        want = torch.cumsum(mask.T.contiguous(), 1, dtype=torch.int32)
        assert torch.equal(P.expert_positions(mask), want), (t, e)
    rmap = _routing(2500, 16, 2, gen)
    parts = P.permute_forward_triton(torch.randn(2500, 3, generator=gen), rmap, 2)[1]
    for name, a, b in zip(P.PlanParts._fields, parts, P.plan_torch(rmap, 2)):
        assert torch.equal(a, b), name


def check_combine(gen):
    from moecore.kernels import combine as C
    from moecore.moe.permute import TopKPlan

    for t, e, k, h in [(0, 4, 2, 3), (1, 4, 4, 7), (13, 6, 3, 5), (9, 8, 2, 2500), (30, 64, 8, 33)]:
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            rmap = _routing(t, e, k, gen)
            plan = TopKPlan(rmap, torch.rand(t, e, generator=gen), k)
            rows = torch.randn(t * k, h, generator=gen).to(dtype)
            grad_out = torch.randn(t, h, generator=gen).to(dtype)
            out = C.combine_forward_triton(rows, plan.slot_rows, plan.probs)
            ref = C.combine_forward_torch(rows.double(), plan.slot_rows, plan.probs.double())
            gr, gp = C.combine_backward_triton(grad_out, rows, plan.slot_rows, plan.probs, True)
            gr_ref, gp_ref = C.combine_backward_torch(grad_out.double(), rows.double(),
                                                      plan.slot_rows, plan.probs.double(), True)
            gr2, gp2 = C.combine_backward_triton(grad_out, rows, plan.slot_rows, plan.probs,
                                                 False)
            assert gp.shape == (t, k) and gp2 is None and torch.equal(gr2, gr)
            if t:
                assert _rel(out, ref) < tol and _rel(gr, gr_ref) < tol
                assert _rel(gp, gp_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def _force_triton_on_cpu():
    """Make the registries' ``auto`` pick the (interpreted) Triton kernels for CPU tensors."""
    import dataclasses

    import moecore.kernels as K
    import moecore.kernels.combine as C

    # checked_triton_available (router, permute, swiglu) looks this up at call time.
    K.cuda_triton_available = lambda *a, **kw: (True, "")
    fused = dataclasses.replace(C.COMBINE.get("triton"), is_available=lambda **kw: (True, ""))
    C.COMBINE._backends["triton"] = fused


def check_moe_layer(gen):
    """A whole MoELayer (router -> permute -> GroupedMLP -> combine) fused vs unfused."""
    from moecore.moe.layer import MoELayer
    from moecore.parallel_state import ParallelState
    from tests.moe_reference import tiny_moe_config

    _force_triton_on_cpu()
    results = []
    for fused in (None, False):
        for score, pre in (("softmax", False), ("sigmoid", False), ("softmax", True)):
            cfg = tiny_moe_config(moe_router_fusion=fused, moe_permute_fusion=fused,
                                  bias_swiglu_fusion=fused is None, num_moe_experts=6,
                                  moe_router_topk=3, moe_router_score_function=score,
                                  moe_router_pre_softmax=pre,
                                  moe_router_load_balancing_type="seq_aux_loss")
            torch.manual_seed(0)
            layer = MoELayer(cfg, layer_number=1, parallel_state=ParallelState.single())
            x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1),
                            requires_grad=True)
            out, _ = layer(x)
            out.backward(torch.ones_like(out))
            grads = [x.grad] + [p.grad for p in layer.parameters()]
            results.append((out.detach(), grads))
    import moecore.kernels.permute as P
    import moecore.kernels.router as R
    import moecore.kernels.swiglu as S

    cpu = torch.device("cpu")
    assert R.select_router(cpu).name == "triton"
    assert P.select_permute(cpu, 6).name == "triton"
    assert S.select_swiglu(cpu, torch.float32).name == "triton"
    from moecore.moe.permute import combine_backend

    assert combine_backend(cpu).name == "triton"
    half = len(results) // 2
    for (out_a, grads_a), (out_b, grads_b) in zip(results[:half], results[half:]):
        assert _rel(out_a, out_b) < 1e-6
        for ga, gb in zip(grads_a, grads_b):
            assert _rel(ga, gb) < 1e-5


def check_router_gating(gen):
    """The gating kernels against an fp64 reference (ragged shapes, several expert and token
    chunks, no tokens), then a bf16 TopKRouter whose gating runs through them."""
    from moecore.kernels import router_gating as G

    for t, e, h in [(0, 4, 8), (1, 1, 8), (37, 10, 72), (600, 70, 130), (64, 16, 64)]:
        x = torch.randn(t, h, generator=gen).bfloat16()
        w = torch.randn(e, h, generator=gen).bfloat16()
        g = torch.randn(t, e, generator=gen)
        out = G.gating_forward_triton(x, w)
        dx, dw = G.gating_backward_triton(x, w, g)
        ref = x.double() @ w.double().t()
        assert out.dtype == torch.float32 and out.shape == (t, e)
        assert ((out.double() - ref).abs() <= 1e-6 * (1 + ref.abs()) * h ** 0.5).all()
        for got, want in ((dx, g.double() @ w.double()), (dw, g.double().t() @ x.double())):
            assert got.dtype == torch.bfloat16
            # one bf16 rounding of the fp32 result (the interpreter truncates): under one ulp
            assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -7 + 1e-5).all()
        dx_only, none = G.gating_backward_triton(x, w, g, need_dw=False)
        assert none is None and torch.equal(dx_only, dx)
    # Longer dw chunks once the fp32 partials would be too big (here: one chunk of 1024 rows).
    x, w = torch.randn(600, 130, generator=gen).bfloat16(), torch.randn(70, 130).bfloat16()
    g = torch.randn(600, 70, generator=gen)
    cap, G.MAX_PARTIAL_BYTES = G.MAX_PARTIAL_BYTES, 4 * 70 * 130
    try:
        assert G._rows_per_chunk(600, 70, 130) == 1024
        dw_long = G.gating_backward_triton(x, w, g, need_dx=False)[1]
    finally:
        G.MAX_PARTIAL_BYTES = cap
    want = g.double().t() @ x.double()
    assert ((dw_long.double() - want).abs() <= want.abs() * 2.0 ** -7 + 1e-5).all()

    from moecore.moe.router import TopKRouter
    from moecore.parallel_state import ParallelState
    from tests.moe_reference import tiny_moe_config

    _force_triton_on_cpu()
    outs = []
    for fused in (None, False):
        cfg = tiny_moe_config(moe_router_fusion=fused, num_moe_experts=6, moe_router_topk=2,
                              params_dtype=torch.bfloat16, bf16=True)
        torch.manual_seed(0)
        router = TopKRouter(cfg, parallel_state=ParallelState.single())
        x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
        x.requires_grad_()
        logits = router.gating(x)
        logits.backward(torch.linspace(-1, 1, logits.numel()).view_as(logits))
        outs.append((logits.detach(), x.grad, router.weight.grad))
    assert G.select_gating(torch.device("cpu")).name == "triton"
    assert _rel(outs[0][0], outs[1][0]) < 1e-6
    for a, b in zip(outs[0][1:], outs[1][1:]):  # bf16 grads; the interpreter truncates
        assert _rel(a, b) < 1e-2


def check_cp_merge(gen):
    from moecore.kernels import block_attention as BA

    BA._check_merge(torch.device("cpu"))  # the kernel's own self-check: strided, empty rows
    for b, h, s, dv, dtype in [(1, 2, 5, 300, torch.float32), (2, 1, 70, 64, torch.float16),
                               (1, 1, 1, 8, torch.bfloat16)]:
        acc = torch.randn(b, h, 2 * s, dv, generator=gen)
        acc_lse = torch.randn(b, h, 2 * s, generator=gen)
        part = torch.randn(b, h, s, dv, generator=gen).to(dtype)
        part_lse = torch.randn(b, h, s, generator=gen)
        got, want = (acc.clone(), acc_lse.clone()), (acc.clone(), acc_lse.clone())
        BA.merge_partial_triton(got[0][:, :, s:], got[1][:, :, s:], part, part_lse)
        BA.merge_partial_torch(want[0][:, :, s:], want[1][:, :, s:], part, part_lse)
        assert _rel(got[0], want[0]) < 1e-6 and _rel(got[1], want[1]) < 1e-6, (s, dv, dtype)
        assert torch.equal(got[0][:, :, :s], acc[:, :, :s])  # rows outside the view untouched


CHECKS = {"swiglu": check_swiglu, "router": check_router, "permute": check_permute,
          "expert_positions": check_expert_positions,
          "combine": check_combine, "moe_layer": check_moe_layer,
          "router_gating": check_router_gating, "cp_merge": check_cp_merge}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
