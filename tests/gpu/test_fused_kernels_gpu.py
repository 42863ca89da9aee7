"""Triton SwiGLU / router / permute kernels vs their torch references on CUDA (fp32, bf16), random
shapes with empty experts and odd sizes, outputs poisoned before each run; the whole MoE layer
fused vs unfused, and row by row per expert against float64; auto selection after the
self-checks."""

import pytest
import torch

from moecore.kernels import HAVE_TRITON
from moecore.kernels import permute as P
from moecore.kernels import router as R
from moecore.kernels import router_gating as G
from moecore.kernels import swiglu as S

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON),
                                reason="needs CUDA and Triton")
DEV = torch.device("cuda")


def _poison():
    # Recycled NaN memory: an output element the kernel forgets to write shows up as NaN.
    buf = torch.full((32 << 20,), float("nan"), device=DEV)
    del buf


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.mark.parametrize("n,f", [(0, 64), (1, 1), (333, 24), (4099, 1408), (2048, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_triton_matches_reference(n, f, dtype):
    g = _gen(n + f)
    x = torch.randn(n, 2 * f + 8, device=DEV, generator=g).to(dtype)[:, : 2 * f]  # strided
    dy = torch.randn(n, f, device=DEV, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    _poison()
    out = S.swiglu_forward_triton(x)
    _poison()
    dx = S.swiglu_backward_triton(x, dy)[0]
    assert out.dtype == dtype and dx.shape == (n, 2 * f)
    assert not out.isnan().any() and not dx.isnan().any()
    if n:
        assert _rel(out, S.swiglu_forward_torch(x.double())) < tol
        assert _rel(dx, S.swiglu_backward_torch(x.double(), dy.double())[0]) < tol
    _poison()
    dx2, act, _ = S.swiglu_backward_and_forward_triton(x, dy)
    # the recomputed activation (--recompute-modules moe_act) is the forward's, bit for bit
    assert torch.equal(dx2, dx) and torch.equal(act, out)
    # weighted by per-row routing probabilities (the experts' SwiGLU), and their gradient
    probs = torch.rand(n, device=DEV, generator=g)
    out = S.swiglu_forward_triton(x, probs=probs)
    dx, dp = S.swiglu_backward_triton(x, dy, probs=probs)
    dx2, act, dp2 = S.swiglu_backward_and_forward_triton(x, dy, probs=probs)
    assert torch.equal(dx2, dx) and torch.equal(act, out) and torch.equal(dp2, dp)
    if n:
        pd = probs.double()
        dx_ref, dp_ref = S.swiglu_backward_torch(x.double(), dy.double(), probs=pd)
        assert _rel(out, S.swiglu_forward_torch(x.double(), probs=pd)) < tol
        assert _rel(dx, dx_ref) < tol and _rel(dp, dp_ref) < max(tol, 1e-5)


CASES = [dict(score_function="softmax"), dict(score_function="softmax", use_pre_softmax=True),
         dict(score_function="sigmoid", scaling_factor=2.5), dict(score_function="sigmoid",
                                                                  expert_bias=0.05)]


@pytest.mark.parametrize("t,e,k", [(0, 8, 2), (1, 8, 8), (4097, 64, 8), (1000, 160, 6),
                                   (3000, 8, 1)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_router_triton_matches_reference(t, e, k, case):
    kw = dict(CASES[case])
    g = _gen(t * 7 + e + case)
    if "expert_bias" in kw:
        kw["expert_bias"] = torch.randn(e, device=DEV, generator=g) * kw["expert_bias"]
    logits = (torch.randn(t, e, device=DEV, generator=g) * 2).requires_grad_()
    gp, ga = (torch.randn(t, e, device=DEV, generator=g) for _ in range(2))
    outs = []
    for fn in (R.route_triton, R.route_torch):
        logits.grad = None
        _poison()
        o = fn(logits, k, need_aux_scores=True, **kw)
        ((o.probs * gp).sum() + (o.aux_scores * ga).sum()).backward()
        outs.append((o, logits.grad.clone()))
    (a, grad_a), (b, grad_b) = outs
    assert torch.equal(a.routing_map, b.routing_map)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    if t:
        assert _rel(a.probs, b.probs) < 1e-6 and _rel(a.aux_scores, b.aux_scores) < 1e-6
        assert _rel(grad_a, grad_b) < 1e-5


@pytest.mark.parametrize("t,e,k,h", [(0, 8, 2, 64), (3, 64, 2, 2048), (257, 64, 8, 2048),
                                     (100, 8, 2, 4096), (33, 16, 6, 1000), (4096, 64, 6, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_triton_matches_reference(t, e, k, h, dtype):
    g = _gen(t + h + k)
    idx = torch.randn(t, e, device=DEV, generator=g).topk(k, dim=1).indices
    rmap = torch.zeros(t, e, dtype=torch.bool, device=DEV).scatter(1, idx, True)
    x = torch.randn(t, h, device=DEV, generator=g).to(dtype)
    _poison()
    rows, parts = P.permute_forward_triton(x, rmap, k)
    ref_rows, ref_parts = P.permute_forward_torch(x, rmap, k)
    for name, a, b in zip(P.PlanParts._fields, parts, ref_parts):
        assert torch.equal(a, b), name
    assert torch.equal(rows, ref_rows)
    dy = torch.randn(t * k, h, device=DEV, generator=g).to(dtype)
    _poison()
    dx = P.permute_backward_triton(dy, parts.slot_rows, k)
    assert not dx.isnan().any()
    if t:
        want = P.permute_backward_torch(dy.double(), parts.slot_rows, k)
        assert _rel(dx, want) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("t,e", [(65536, 16), (32768, 8), (16384, 64), (200000, 16),
                                 (4096, 128)])
def test_expert_positions_match_cumsum(t, e):
    """The chunked scan (and its fallbacks: 200000 tokens, 128 experts) vs torch.cumsum."""
    g = _gen(t + e)
    mask = (torch.rand(t, e, device=DEV, generator=g) < 0.2).to(torch.uint8)
    _poison()
    want = torch.cumsum(mask.T.contiguous(), 1, dtype=torch.int32)
    assert torch.equal(P.expert_positions(mask), want)


def test_fused_permute_does_not_sync():
    g = _gen(0)
    idx = torch.randn(512, 64, device=DEV, generator=g).topk(8, dim=1).indices
    rmap = torch.zeros(512, 64, dtype=torch.bool, device=DEV).scatter(1, idx, True)
    x = torch.randn(512, 256, device=DEV, generator=g)
    P.permute_forward_triton(x, rmap, 8)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        P.permute_forward_triton(x, rmap, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("t,e,h", [(0, 8, 1024), (1, 8, 64), (16384, 16, 1024), (4099, 64, 2048),
                                   (1000, 160, 4096), (777, 8, 1030),
                                   (8192, 256, 7168)])  # 1024-token dw chunks (partials cap)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_gating_triton_matches_upcast_gemm(t, e, h, dtype):
    g = _gen(t + e + h)
    x = torch.randn(t, h, device=DEV, generator=g).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(e, h, device=DEV, generator=g)).to(dtype).requires_grad_()
    dlogits = torch.randn(t, e, device=DEV, generator=g)
    results = []
    for fn in (G.gating_triton, G.gating_torch):
        _poison()
        x.grad = w.grad = None
        out = fn(x, w)
        out.backward(dlogits)
        results.append((out.detach(), x.grad, w.grad))
    (out, dx, dw), (ref, dx_ref, dw_ref) = results
    assert out.dtype == torch.float32 and dx.dtype == dw.dtype == dtype
    # fp32 accumulation either way: logits agree to fp32 summation noise (the tensor-core dot
    # sums in another order: 4.9e-6 against fp64 at H = 4096 on an H200), the 16-bit gradients
    # are the same rounding of nearly the same fp32 value (a near-tie may round the other way).
    assert _rel(out, x.detach().double() @ w.detach().double().t()) < 1e-5
    if t:
        assert _rel(out, ref) < 1e-5
        for got, want in ((dx, dx_ref), (dw, dw_ref)):
            assert (got == want).float().mean().item() > 0.99
            assert _rel(got, want) < 2e-3


def test_router_gating_selected_for_bf16_routers():
    from moecore.moe.router import TopKRouter
    from moecore.parallel_state import ParallelState
    from tests.moe_reference import tiny_moe_config

    assert G.select_gating(torch.device("cuda", torch.cuda.current_device())).name == "triton"
    calls = []
    orig = G._FusedGating.forward

    def spy(ctx, x, w):
        calls.append(x.shape)
        return orig(ctx, x, w)

    for fusion, expect in ((None, 1), (False, 0)):
        calls.clear()
        cfg = tiny_moe_config(moe_router_fusion=fusion, params_dtype=torch.bfloat16, bf16=True)
        router = TopKRouter(cfg, parallel_state=ParallelState.single()).to(DEV)
        G._FusedGating.forward = staticmethod(spy)
        try:
            router.gating(torch.randn(5, 16, device=DEV, dtype=torch.bfloat16))
        finally:
            G._FusedGating.forward = staticmethod(orig)
        assert len(calls) == expect


def test_auto_selects_triton_after_self_checks():
    assert S.select_swiglu(DEV, torch.bfloat16).name == "triton"
    assert S.select_swiglu(DEV, torch.float64).name == "torch"
    assert R.select_router(DEV).name == "triton"
    assert P.select_permute(DEV, 64).name == "triton"


@pytest.mark.parametrize("score,pre", [("softmax", False), ("sigmoid", False), ("softmax", True)])
def test_moe_layer_fused_matches_unfused(score, pre):
    from moecore.moe.layer import MoELayer
    from moecore.parallel_state import ParallelState
    from tests.moe_reference import tiny_moe_config

    results = []
    for fused in (None, False):
        cfg = tiny_moe_config(hidden_size=256, moe_ffn_hidden_size=384, num_moe_experts=16,
                              moe_router_topk=4, moe_router_score_function=score,
                              moe_router_pre_softmax=pre, moe_grouped_gemm_backend="auto",
                              moe_router_fusion=fused, moe_permute_fusion=fused,
                              bias_swiglu_fusion=fused is None, bf16=True,
                              params_dtype=torch.bfloat16,
                              moe_shared_expert_intermediate_size=256)  # dense MLP SwiGLU too
        torch.manual_seed(0)
        with torch.device(DEV):
            layer = MoELayer(cfg, parallel_state=ParallelState.single())
        x = torch.randn(64, 4, 256, device=DEV, generator=_gen(1)).bfloat16().requires_grad_()
        out, _ = layer(x)
        out.float().square().sum().backward()
        results.append((out, x.grad, *[p.grad for p in layer.parameters()]))
    for a, b in zip(*results):
        assert _rel(a, b) < 3e-2


U_BF16 = 2.0 ** -9  # bf16 unit roundoff


def _row_err(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[N]`` normwise relative error of each row of ``got`` against float64 ``ref``."""
    return (got.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def _expert_mlp64(rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP in float64: ``rows [n, H] @ w1 [H, 2F]`` -> silu(gate) * up ->
    ``@ w2 [F, H]``."""
    gate, up = (rows.double() @ w1.double()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w2.double()


def check_moe_rows_against_float64(layer, x: torch.Tensor, rows_tol: float = 8 * U_BF16,
                                   grad_tol: float = 16 * U_BF16) -> None:
    """Run a bf16 MoELayer on ``x [S, B, H]`` and check it row by row, expert by expert,
    against float64 arithmetic on the same routing: every permuted row is its token's row bit
    for bit, in expert-major / token order; every expert's output rows, the combined output
    rows and every expert's input-row gradients within ``rows_tol`` (normwise per row); every
    expert's weight gradients within ``grad_tol`` (normwise per expert)."""
    seen = {}
    hooks = [layer.router.register_forward_hook(lambda m, i, o: seen.update(route=o)),
             layer.experts.register_forward_hook(
                 lambda m, i, o: seen.update(inp=i[0], counts=i[1], out=o[0]))]
    if layer.shared_experts is not None:
        hooks.append(layer.shared_experts.register_forward_hook(
            lambda m, i, o: seen.update(shared=o)))
    try:
        x = x.detach().requires_grad_()
        out, _ = layer(x)
        seen["out"].retain_grad()
        seen["inp"].retain_grad()
        out.float().square().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    probs, rmap = seen["route"]
    flat = x.detach().reshape(-1, x.shape[-1])
    w1, w2 = layer.experts.weight1, layer.experts.weight2
    counts = [int(c) for c in seen["counts"].tolist()]
    assert counts == rmap.sum(0).tolist()
    expert_of_row, start = [], 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        start += n
        expert_of_row += [e] * n
        tokens = rmap[:, e].nonzero().squeeze(1)
        assert torch.equal(seen["inp"][rows], flat[tokens]), f"expert {e}: wrong rows"
        if n == 0:
            continue
        inp = seen["inp"][rows].detach().double().requires_grad_()
        w1e = w1[e].detach().double().requires_grad_()
        w2e = w2[e].detach().double().requires_grad_()
        ref = _expert_mlp64(inp, w1e, w2e)
        err = _row_err(seen["out"][rows].detach(), ref.detach())
        assert err.max() <= rows_tol, (f"expert {e}: worst output row {err.argmax().item()} "
                                       f"off by {err.max().item():.2e}")
        ref.backward(seen["out"].grad[rows].double())
        err = _row_err(seen["inp"].grad[rows], inp.grad)
        assert err.max() <= rows_tol, f"expert {e}: input-row gradient off by {err.max():.2e}"
        for name, got, want in (("weight1", w1.grad[e], w1e.grad), ("weight2", w2.grad[e],
                                                                      w2e.grad)):
            rel = ((got.double() - want).norm() / want.norm()).item()
            assert rel <= grad_tol, f"expert {e}: {name} gradient off by {rel:.2e}"
    # combine: each token's output row is the prob-weighted sum of its experts' rows
    token_of_row = torch.cat([rmap[:, e].nonzero().squeeze(1) for e in range(len(counts))])
    want = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
    weight = probs[token_of_row, torch.tensor(expert_of_row, device=flat.device)].double()
    want.index_add_(0, token_of_row, seen["out"].detach().double() * weight[:, None])
    if "shared" in seen:
        want += seen["shared"].detach().reshape(flat.shape).double()
    err = _row_err(out.detach().reshape(flat.shape), want)
    assert err.max() <= rows_tol, f"combined row {err.argmax().item()} off by {err.max():.2e}"


@pytest.mark.parametrize("score,pre", [("softmax", False), ("sigmoid", False), ("softmax", True)])
def test_moe_layer_fused_rows_match_float64_per_expert(score, pre):
    """The fused bf16 layer (Triton router, permute, SwiGLU, combine) row by row against
    float64: a wrong row in one expert fails here even where the whole-layer norm above would
    hide it."""
    from moecore.moe.layer import MoELayer
    from moecore.parallel_state import ParallelState
    from tests.moe_reference import tiny_moe_config

    cfg = tiny_moe_config(hidden_size=256, moe_ffn_hidden_size=384, num_moe_experts=16,
                          moe_router_topk=4, moe_router_score_function=score,
                          moe_router_pre_softmax=pre, moe_grouped_gemm_backend="auto",
                          bf16=True, params_dtype=torch.bfloat16,
                          moe_shared_expert_intermediate_size=256)
    torch.manual_seed(0)
    with torch.device(DEV):
        layer = MoELayer(cfg, parallel_state=ParallelState.single())
    x = torch.randn(64, 4, 256, device=DEV, generator=_gen(1)).bfloat16()
    check_moe_rows_against_float64(layer, x)
