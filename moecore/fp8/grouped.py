"""FP8 grouped GEMM of the experts: ``out[rows of e] = x[rows of e] @ w[e]`` in FP8, forward,
dgrad and wgrad, for ``x [T, K]`` grouped by expert and ``w [E, K, M]`` (GroupedMLP's layout).

Tensorwise/delayed: one scale for ``x`` and ``dy``, one per expert for ``w``; each of ``x`` and
``dy`` is cast once into the GEMM's operand and the wgrad's transposed, expert-regrouped one
(:meth:`Fp8Meta.quantize_transposed`), of which the forward saves the transposed ``x``.
Blockwise (1x128 tiles of ``x`` / ``dy``, 128x128 blocks of ``w``): the wgrad contracts over
tokens, so ``x`` is kept in its own dtype and ``x`` and ``dy`` are tiled along the tokens in
backward, every expert's tokens starting a new tile (:func:`group_row_map` at 128). The three
GEMMs are single grouped GEMMs of the backend (:mod:`moecore.kernels.fp8_gemm`). Under
``--no-fp8-wgrad`` the wgrad runs in ``x``'s precision (bf16 grouped GEMM) and ``x`` is saved as
it is. Weights come from :meth:`Fp8Meta.weight` (cached per optimizer step where allowed).
"""

from __future__ import annotations

import torch

from moecore.fp8.scaling import Fp8Meta
from moecore.kernels.fp8_quant import BLOCK, Fp8Tensor, group_row_map
from moecore.kernels.grouped_gemm import grouped_wgrad


class _Fp8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, tokens_per_expert, meta: Fp8Meta):
        gemm = meta.gemm(x.device)
        recipe = meta.recipe
        blockwise, fp8_wgrad = recipe.recipe == "blockwise", recipe.wgrad
        rows = ends = None
        if fp8_wgrad and not blockwise:  # one read of x: the GEMM's and the wgrad's operand
            rows, ends = group_row_map(tokens_per_expert, x.shape[0], x.device)
            xq, x_wgrad = meta.quantize_transposed("input", x, rows)
        else:
            xq = meta.quantize("input", x)
        # Quantised as stored, [E, K, M] (what dgrad contracts over M); the forward's [E, M, K]
        # is its FP8 transpose (1 byte per element moved, not 2).
        wq, wq_fwd = meta.weight(w)
        out = gemm.grouped_mm(xq, wq_fwd, tokens_per_expert, x.dtype, fast_accum=not blockwise)
        # The wgrad's operand: x itself (blockwise tiles it along the tokens; without FP8
        # wgrad it stays in x's precision), else the FP8 x^T regrouped by expert.
        if rows is None:
            ctx.save_for_backward(x, x.new_empty(0), wq.data, wq.scale_inv, tokens_per_expert)
        else:
            ctx.save_for_backward(x_wgrad.data, x_wgrad.scale_inv, wq.data, wq.scale_inv,
                                  tokens_per_expert, rows, ends)
        ctx.meta, ctx.layout, ctx.wdtype = meta, wq.layout, w.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        meta = ctx.meta
        gemm = meta.gemm(dy.device)
        dy = dy.contiguous()
        x_data, x_scale, w_data, w_scale, tpe, *row_map = ctx.saved_tensors
        if row_map:  # FP8 wgrad: dy in both layouts from one read
            dyq, dyq_t = meta.quantize_transposed("grad", dy, row_map[0])
        else:
            dyq = meta.quantize("grad", dy)
        wq_t = Fp8Tensor(w_data, w_scale, ctx.layout)  # [E, K, M]
        dx = gemm.grouped_mm(dyq, wq_t, tpe, dy.dtype)
        if not meta.recipe.wgrad:  # --no-fp8-wgrad
            dw = grouped_wgrad(x_data, dy, tpe).to(ctx.wdtype)
        elif meta.recipe.recipe == "blockwise":  # 1x128 tiles along the tokens, per expert
            rows, ends = group_row_map(tpe, dy.shape[0], dy.device, BLOCK)
            dw = gemm.grouped_wgrad(meta.tiles_transposed("input", x_data, rows),
                                    meta.tiles_transposed("grad", dy, rows), ends, ctx.wdtype)
        else:
            x_t = Fp8Tensor(x_data, x_scale, "tensor")
            dw = gemm.grouped_wgrad(x_t, dyq_t, row_map[1], ctx.wdtype)  # [E, K, M], as w
        return dx, dw, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
                   meta: Fp8Meta) -> torch.Tensor:
    """``[T, K] x [E, K, M] -> [T, M]`` grouped by ``tokens_per_expert [E]``, GEMMs in FP8.
    No rows: the plain product (keeps ``w`` in the graph with a zero gradient)."""
    if x.shape[0] == 0:
        return x @ w[0]
    return _Fp8GroupedMM.apply(x, w, tokens_per_expert, meta)
