"""Fused top-k router: score function, top-k, normalisation, per-expert counts, aux-loss scores.

``route(logits [T, E], topk, ...) -> RouterOutput``: ``probs`` [T, E] (routing weights, 0 off
the selected experts), ``routing_map`` [T, E] bool, ``tokens_per_expert`` [E] int32 (this
rank's assignment counts) and, when asked, ``aux_scores`` [T, E] (the scores the balance loss
uses: softmax, or sigmoid normalised per token). Backends in the ``moe_router`` registry:

- ``torch``: :func:`topk_routing_with_score_function` and :func:`scores_for_aux_loss` (any
  device/dtype, group-limited routing included); the reference.
- ``triton``: one pass forward over the fp32 logits, one pass backward that sums the gradients
  of ``probs`` and ``aux_scores`` into the logits' gradient (CUDA, fp32 logits, E <= 4096).
  Covers softmax (post- and pre-softmax), sigmoid, the scaling factor and the expert bias.

Selection: post-softmax, and pre-softmax/sigmoid without expert bias, select on the raw logits
(the score functions are monotonic), so the kernel picks the experts ``torch.topk`` picks,
ties aside (the kernel takes the lowest expert index of a tie). With an expert bias it selects on
``score + bias`` with its own score values, which can differ from torch's by an ulp (near-ties).
Group-limited routing and Sinkhorn are not covered: :func:`fused_router_unsupported` says why
and the router takes the torch path (logged).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_EXPERTS = 4096
SCORE_CODES = {("softmax", False): 0, ("softmax", True): 1, ("sigmoid", False): 2}


class RouterOutput(NamedTuple):
    probs: torch.Tensor  # [T, E], logits' dtype
    routing_map: torch.Tensor  # [T, E] bool
    tokens_per_expert: torch.Tensor  # [E] int32, this rank's tokens
    aux_scores: torch.Tensor | None  # [T, E] or None


def fused_router_unsupported(*, load_balancing_type: str, num_groups=None, num_experts: int,
                             dtype: torch.dtype = torch.float32) -> str:
    """Why the Triton router cannot serve this routing setup ("" when it can)."""
    if load_balancing_type == "sinkhorn":
        return "Sinkhorn routing is not fused"
    if num_groups:
        return "group-limited routing (moe_router_num_groups) is not fused"
    if num_experts > MAX_EXPERTS:
        return f"more than {MAX_EXPERTS} experts are not fused"
    if dtype != torch.float32:
        return f"the fused router takes fp32 logits, not {dtype}"
    return ""


# ---- torch reference -----------------------------------------------------------------------

def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int):
    """Top-k restricted to the ``group_topk`` best of ``num_groups`` contiguous expert groups.

    A group's score is the sum of its top ``max(1, topk // group_topk)`` scores (DeepSeek-V3,
    Megatron-Core; the ``max`` keeps ``topk < group_topk`` meaningful).

    Args:
        scores: ``[T, E]``, higher is better.
    Returns:
        ``(values [T, topk], indices [T, topk])`` like :func:`torch.topk`.
    """
    t, e = scores.shape
    per_group = max(1, topk // group_topk)
    group_scores = scores.view(t, num_groups, e // num_groups).topk(per_group, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, num_groups, e // num_groups).reshape(t, e)
    return torch.topk(scores.masked_fill(~expert_mask, float("-inf")), k=topk, dim=-1)


def topk_routing_with_score_function(
    logits: torch.Tensor, topk: int, *, score_function: str = "softmax",
    use_pre_softmax: bool = False, num_groups: int | None = None,
    group_topk: int | None = None, scaling_factor: float | None = None,
    expert_bias: torch.Tensor | None = None,
):
    """Select ``topk`` experts per token and their weights.

    softmax: ``use_pre_softmax`` -> weights are ``softmax(logits)`` over all experts at the
    selected ones; else a softmax over the ``topk`` selected logits only (sums to 1).
    sigmoid: weights are ``sigmoid(logits)`` at the selected experts, normalised to sum 1 when
    ``topk > 1``. ``expert_bias [E]`` is added to the selection scores (the logits for
    post-softmax, the probabilities otherwise) but never to the weights. ``scaling_factor``
    multiplies the weights.

    Args:
        logits: ``[T, E]``.
    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``; probs is 0 off the selected experts.
    """
    def select(scores):
        biased = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        if group_topk:
            idx = group_limited_topk(biased, topk, num_groups, group_topk)[1]
        else:
            idx = torch.topk(biased, k=topk, dim=-1)[1]
        return torch.gather(scores, 1, idx), idx

    if score_function == "softmax":
        if use_pre_softmax:
            weights, idx = select(torch.softmax(logits, dim=-1))
        else:
            top_logits, idx = select(logits)
            weights = torch.softmax(top_logits, dim=-1)
    elif score_function == "sigmoid":
        weights, idx = select(torch.sigmoid(logits))
        if topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"score_function={score_function!r} must be 'softmax' or 'sigmoid'")
    if scaling_factor:
        weights = weights * scaling_factor
    probs = torch.zeros_like(logits).scatter(1, idx, weights)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    return probs, routing_map


def scores_for_aux_loss(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """``[T, E]`` probabilities of all experts for the balance loss: softmax, or sigmoid
    normalised to sum 1 per token (Megatron-Core)."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)



def route_torch(logits, topk, score_function="softmax", use_pre_softmax=False,
                scaling_factor=None, expert_bias=None, need_aux_scores=False) -> RouterOutput:
    """The unfused router ops, same outputs as the kernel."""
    probs, routing_map = topk_routing_with_score_function(
        logits, topk, score_function=score_function, use_pre_softmax=use_pre_softmax,
        scaling_factor=scaling_factor, expert_bias=expert_bias)
    counts = routing_map.sum(dim=0, dtype=torch.int32)
    aux = scores_for_aux_loss(logits, score_function) if need_aux_scores else None
    return RouterOutput(probs, routing_map, counts, aux)


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _scores(lg, valid, SCORE: tl.constexpr):
        """Row-wise softmax (SCORE 0/1) or sigmoid (2) of ``lg`` [BT, BE]; 0 where invalid."""
        if SCORE == 2:
            sc = tl.sigmoid(lg)
        else:
            top = tl.max(lg, axis=1)
            top = tl.where(top == float("-inf"), 0.0, top)  # padding rows: no inf - inf
            ex = tl.exp(lg - top[:, None])
            ex = tl.where(valid, ex, 0.0)
            sc = ex / tl.maximum(tl.sum(ex, axis=1), 1e-30)[:, None]
        return tl.where(valid, sc, 0.0)

    @triton.jit
    def _router_fwd_kernel(logits_ptr, bias_ptr, probs_ptr, map_ptr, counts_ptr, aux_ptr, T, E,
                           scale, K: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           NEED_AUX: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_E: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        cmask = cols < E
        valid = (rows < T)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
        lg = tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        sc = _scores(lg, valid, SCORE)
        key = lg
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            key = (lg if SCORE == 0 else sc) + bias[None, :]
        sel = cols[None, :] < 0  # all false, [1, BE] broadcast below
        sel = sel & valid
        for _ in tl.static_range(K):
            avail = valid & ~sel
            v = tl.where(avail, key, float("-inf"))
            best = tl.max(v, axis=1)
            hit = avail & (v == best[:, None])
            idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
            # NaN keys never compare equal: then take the first available expert.
            first = tl.min(tl.where(avail, cols[None, :], BLOCK_E), axis=1)
            idx = tl.where(idx < BLOCK_E, idx, first)
            sel = sel | (cols[None, :] == idx[:, None])
        if SCORE == 0:
            top = tl.max(tl.where(sel, lg, float("-inf")), axis=1)
            top = tl.where(top == float("-inf"), 0.0, top)
            w = tl.where(sel, tl.exp(lg - top[:, None]), 0.0)
            w = w / tl.maximum(tl.sum(w, axis=1), 1e-30)[:, None]
        else:
            w = tl.where(sel, sc, 0.0)
            if SCORE == 2 and K > 1:
                w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
        w = w * scale
        tl.store(probs_ptr + offs, w.to(probs_ptr.dtype.element_ty), mask=valid)
        tl.store(map_ptr + offs, sel.to(tl.uint8), mask=valid)
        tl.atomic_add(counts_ptr + cols, tl.sum(sel.to(tl.int32), axis=0), mask=cmask)
        if NEED_AUX:
            aux = sc
            if SCORE == 2:
                aux = sc / (tl.sum(sc, axis=1)[:, None] + 1e-20)
            tl.store(aux_ptr + offs, aux.to(aux_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _router_bwd_kernel(logits_ptr, map_ptr, gprobs_ptr, gaux_ptr, glogits_ptr, T, E, scale,
                           K: tl.constexpr, SCORE: tl.constexpr, HAS_GPROBS: tl.constexpr,
                           HAS_GAUX: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_E: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        valid = (rows < T)[:, None] & (cols < E)[None, :]
        offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
        lg = tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        sc = _scores(lg, valid, SCORE)
        dl = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        if HAS_GPROBS:
            sel = valid & (tl.load(map_ptr + offs, mask=valid, other=0) != 0)
            gw = tl.where(sel, tl.load(gprobs_ptr + offs, mask=valid, other=0.0), 0.0) * scale
            if SCORE == 0:  # softmax over the selected logits
                top = tl.max(tl.where(sel, lg, float("-inf")), axis=1)
                top = tl.where(top == float("-inf"), 0.0, top)
                w = tl.where(sel, tl.exp(lg - top[:, None]), 0.0)
                w = w / tl.maximum(tl.sum(w, axis=1), 1e-30)[:, None]
                dl = w * (gw - tl.sum(w * gw, axis=1)[:, None])
            elif SCORE == 1:  # softmax over all experts, read at the selected ones
                dl = sc * (gw - tl.sum(sc * gw, axis=1)[:, None])
            else:
                ds = gw
                if K > 1:
                    tot = tl.sum(tl.where(sel, sc, 0.0), axis=1)[:, None] + 1e-20
                    ds = tl.where(sel, gw / tot - tl.sum(gw * sc, axis=1)[:, None] / (tot * tot),
                                  0.0)
                dl = ds * sc * (1.0 - sc)
        if HAS_GAUX:
            ga = tl.load(gaux_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if SCORE == 2:
                tot = tl.sum(sc, axis=1)[:, None] + 1e-20
                ds = ga / tot - tl.sum(ga * sc, axis=1)[:, None] / (tot * tot)
                dl += ds * sc * (1.0 - sc)
            else:
                dl += sc * (ga - tl.sum(sc * ga, axis=1)[:, None])
        tl.store(glogits_ptr + offs, dl.to(glogits_ptr.dtype.element_ty), mask=valid)


def _blocks(e: int):
    block_e = triton.next_power_of_2(max(e, 1))
    return max(1, min(64, 4096 // block_e)), block_e


class _FusedRouter(torch.autograd.Function):
    """Triton forward/backward; saves the logits and the routing map (1 byte per entry)."""

    @staticmethod
    def forward(ctx, logits, bias, topk: int, score: int, scale: float, need_aux: bool):
        t, e = logits.shape
        logits = logits.contiguous()
        probs = torch.empty_like(logits)
        rmap = torch.empty(t, e, dtype=torch.uint8, device=logits.device)
        counts = torch.zeros(e, dtype=torch.int32, device=logits.device)
        aux = torch.empty_like(logits) if need_aux else None
        if t:
            block_t, block_e = _blocks(e)
            _router_fwd_kernel[(triton.cdiv(t, block_t),)](
                logits, bias if bias is not None else logits, probs, rmap, counts,
                aux if need_aux else probs, t, e, scale, K=topk, SCORE=score,
                HAS_BIAS=bias is not None, NEED_AUX=need_aux, BLOCK_T=block_t, BLOCK_E=block_e)
        ctx.save_for_backward(logits, rmap)
        ctx.meta = (topk, score, scale)
        routing_map = rmap.view(torch.bool)
        ctx.mark_non_differentiable(routing_map, counts)
        return probs, routing_map, counts, aux

    @staticmethod
    def backward(ctx, g_probs, _g_map, _g_counts, g_aux):
        logits, rmap = ctx.saved_tensors
        topk, score, scale = ctx.meta
        t, e = logits.shape
        grad = torch.empty_like(logits)
        if t:
            block_t, block_e = _blocks(e)
            _router_bwd_kernel[(triton.cdiv(t, block_t),)](
                logits, rmap, _contig(g_probs, logits), _contig(g_aux, logits), grad, t, e,
                scale, K=topk, SCORE=score, HAS_GPROBS=g_probs is not None,
                HAS_GAUX=g_aux is not None, BLOCK_T=block_t, BLOCK_E=block_e)
        return grad, None, None, None, None, None


def _contig(g, like):
    return like if g is None else g.to(like.dtype).contiguous()


def route_triton(logits, topk, score_function="softmax", use_pre_softmax=False,
                 scaling_factor=None, expert_bias=None, need_aux_scores=False) -> RouterOutput:
    """Same contract as :func:`route_torch`; one kernel each way."""
    score = SCORE_CODES[(score_function, bool(use_pre_softmax))]
    bias = None if expert_bias is None else expert_bias.detach().float().contiguous()
    probs, routing_map, counts, aux = _FusedRouter.apply(
        logits, bias, topk, score, float(scaling_factor or 1.0), need_aux_scores)
    return RouterOutput(probs, routing_map, counts, aux)


# ---- registry ------------------------------------------------------------------------------


def _check_triton(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for kw in (dict(score_function="softmax"), dict(score_function="sigmoid", topk=3),
               dict(score_function="softmax", use_pre_softmax=True, scaling_factor=2.0)):
        kw = {"topk": 2, **kw}
        logits = torch.randn(19, 10, device=device, generator=gen, requires_grad=True)
        grads = []
        outs = []
        for fn in (route_triton, route_torch):
            logits.grad = None
            out = fn(logits, need_aux_scores=True, **kw)
            (out.probs.sum() + (out.aux_scores * out.aux_scores).sum()).backward()
            grads.append(logits.grad.clone())
            outs.append(out)
        if not torch.equal(outs[0].routing_map, outs[1].routing_map):
            raise AssertionError(f"{kw}: the kernel selected other experts")
        assert_close_rel(outs[0].probs, outs[1].probs, 1e-5, f"{kw} probs")
        assert_close_rel(grads[0], grads[1], 1e-5, f"{kw} grad")


def _triton_available(device=None, **ctx):
    return checked_triton_available("router", _check_triton, device)


ROUTER = BackendRegistry("moe_router", flag="--moe-router-fusion")
ROUTER.register(Backend("triton", _triton_available, route_triton,
                        description="one fused pass each way over the fp32 logits"))
ROUTER.register(Backend("torch", always_available, route_torch,
                        description="unfused torch ops"))


@functools.cache
def select_router(device: torch.device, requested: str = "auto") -> Backend:
    """The router backend for logits on ``device`` (resolved once per process, logged once)."""
    return ROUTER.select(requested, device=device)
