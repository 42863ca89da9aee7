"""The experts' SwiGLU MLP in FP8 as one autograd op: ``fc1 -> SwiGLU -> fc2`` over expert-grouped
rows, for the tensorwise and delayed recipes with FP8 wgrad.

Same GEMMs, casts and values as :func:`~moecore.fp8.grouped.fp8_grouped_mm` twice around
:func:`~moecore.kernels.swiglu.swiglu` (bit for bit; ``tests/unit/test_fp8.py`` checks it), with
fewer passes over memory:

- the SwiGLU kernel records the amax of what it writes, forward (the activation, ``[N, F]``)
  and backward (fc1's output gradient, ``[N, 2F]``), so their FP8 casts read them once;
- every FP8 cast writes the GEMM's operand and the wgrad's transposed, expert-regrouped operand
  in one pass (:meth:`~moecore.fp8.scaling.Fp8Meta.quantize_transposed`).

Shapes: ``x [N, H]`` grouped by expert (``tokens_per_expert [E]``), ``w1 [E, H, 2F]``
(``[gate | up]``), ``w2 [E, F, H]``, ``probs [N]`` (each row's routing weight, applied in the
SwiGLU, or None) -> ``[N, H]``. Saved for backward: fc1's output ``h`` (as the
unfused SwiGLU saves it), the transposed FP8 ``x`` and activation, and the FP8 weights.
"""

from __future__ import annotations

import torch

from moecore.fp8.scaling import Fp8Meta
from moecore.kernels.fp8_quant import Fp8Tensor, group_row_map
from moecore.kernels.swiglu import select_swiglu


def fused_fp8_swiglu_applies(meta1: Fp8Meta | None, meta2: Fp8Meta | None) -> bool:
    """Whether :func:`fp8_swiglu_experts` computes what the two FP8 grouped GEMMs would: both
    projections in FP8 under the tensorwise or delayed recipe with FP8 wgrad."""
    return (meta1 is not None and meta2 is not None
            and all(m.recipe.recipe != "blockwise" and m.recipe.wgrad for m in (meta1, meta2)))


def _fp8(data: torch.Tensor, scale_inv: torch.Tensor) -> Fp8Tensor:
    return Fp8Tensor(data, scale_inv, "tensor")


class _Fp8SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, tokens_per_expert, probs, meta1: Fp8Meta, meta2: Fp8Meta):
        device = x.device
        swiglu_fwd, swiglu_bwd = select_swiglu(device, x.dtype).fn[:2]
        rows, ends = group_row_map(tokens_per_expert, x.shape[0], device)
        xq, x_t = meta1.quantize_transposed("input", x, rows)
        w1q, w1q_fwd = meta1.weight(w1)
        h = meta1.gemm(device).grouped_mm(xq, w1q_fwd, tokens_per_expert, x.dtype,
                                          fast_accum=True)
        del xq
        amax = torch.zeros(1, device=device)
        act = swiglu_fwd(h, amax=amax, probs=probs)
        aq, act_t = meta2.quantize_transposed("input", act, rows, amax=amax)
        del act
        w2q, w2q_fwd = meta2.weight(w2)
        out = meta2.gemm(device).grouped_mm(aq, w2q_fwd, tokens_per_expert, x.dtype,
                                            fast_accum=True)
        ctx.save_for_backward(h, x_t.data, x_t.scale_inv, act_t.data, act_t.scale_inv,
                              w1q.data, w1q.scale_inv, w2q.data, w2q.scale_inv,
                              tokens_per_expert, rows, ends, probs)
        ctx.metas, ctx.swiglu_bwd, ctx.wdtypes = (meta1, meta2), swiglu_bwd, (w1.dtype, w2.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        (h, x_t, x_t_s, act_t, act_t_s, w1q, w1q_s, w2q, w2q_s, tpe, rows, ends,
         probs) = ctx.saved_tensors
        meta1, meta2 = ctx.metas
        gemm1, gemm2 = meta1.gemm(dy.device), meta2.gemm(dy.device)
        dyq, dy_t = meta2.quantize_transposed("grad", dy.contiguous(), rows)
        d_act = gemm2.grouped_mm(dyq, _fp8(w2q, w2q_s), tpe, dy.dtype)
        dw2 = gemm2.grouped_wgrad(_fp8(act_t, act_t_s), dy_t, ends, ctx.wdtypes[1])
        del dyq, dy_t
        amax = torch.zeros(1, device=dy.device)
        dh, dprobs = ctx.swiglu_bwd(h, d_act, amax=amax, probs=probs)
        del d_act
        dhq, dh_t = meta1.quantize_transposed("grad", dh, rows, amax=amax)
        del dh
        dx = gemm1.grouped_mm(dhq, _fp8(w1q, w1q_s), tpe, dy.dtype)
        dw1 = gemm1.grouped_wgrad(_fp8(x_t, x_t_s), dh_t, ends, ctx.wdtypes[0])
        return dx, dw1, dw2, None, dprobs, None, None


def fp8_swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                       tokens_per_expert: torch.Tensor, meta1: Fp8Meta, meta2: Fp8Meta,
                       probs: torch.Tensor | None = None) -> torch.Tensor:
    """``grouped_mm(swiglu(grouped_mm(x, w1), probs=probs), w2)`` with both projections in FP8
    (module docstring; ``probs [N]`` fp32 row weights or None); requires
    :func:`fused_fp8_swiglu_applies`."""
    if not fused_fp8_swiglu_applies(meta1, meta2):
        raise ValueError("fp8_swiglu_experts needs the tensorwise or delayed FP8 recipe with "
                         "FP8 wgrad on both projections")
    if x.shape[0] == 0:  # keep the weights in the graph with zero gradients
        return x @ w1[0][:, : w2.shape[1]] @ w2[0]
    return _Fp8SwiGLUExperts.apply(x.contiguous(), w1, w2, tokens_per_expert, probs, meta1,
                                   meta2)
