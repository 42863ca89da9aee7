"""FP8 grouped GEMM of the experts: ``out[rows of e] = x[rows of e] @ w[e]`` in FP8, forward,
dgrad and wgrad, for ``x [T, K]`` grouped by expert and ``w [E, K, M]`` (GroupedMLP's layout).

Tensorwise/delayed: one scale for ``x`` and ``dy``, one per expert for ``w``; the three GEMMs
are single grouped GEMMs (``torch._scaled_grouped_mm`` on the GPU) and the FP8 ``x`` and ``w``
are saved for backward. Blockwise: PyTorch has no blockwise grouped GEMM for sm90, so each
expert runs the blockwise ``_scaled_mm`` (1x128 tiles of ``x`` / ``dy``, 128x128 blocks of
``w``; each expert's tokens zero-padded to a multiple of 128 for the wgrad). That needs the
counts on the host and keeps ``x`` in its own dtype for the wgrad's token-wise tiles.
Under ``--no-fp8-wgrad`` the wgrad runs in ``x``'s precision (bf16 grouped GEMM) and ``x`` is
saved as it is. Weights come from :meth:`Fp8Meta.weight` (cached per optimizer step where
allowed).
"""

from __future__ import annotations

import torch

from moecore.fp8.linear import pad_rows
from moecore.fp8.scaling import Fp8Meta
from moecore.kernels.fp8_quant import BLOCK, Fp8Tensor, group_row_map
from moecore.kernels.grouped_gemm import grouped_wgrad


def _rows(t: Fp8Tensor, start: int, end: int) -> Fp8Tensor:
    return Fp8Tensor(t.data[start:end], t.scale_inv[start:end], t.layout)


def _expert(t: Fp8Tensor, e: int) -> Fp8Tensor:
    return Fp8Tensor(t.data[e], t.scale_inv[e], t.layout)


def _blockwise_mm(gemm, a: Fp8Tensor, b: Fp8Tensor, counts: list[int], out_dtype):
    """Per expert ``a[rows of e] @ b[e]^T`` for tiled ``a [T, K]`` and blocked ``b [E, N, K]``."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(gemm.mm(_rows(a, start, start + n), _expert(b, e), out_dtype))
        start += n
    if not outs:
        return a.data.new_zeros(0, b.shape[1], dtype=out_dtype)
    return torch.cat(outs)


def _blockwise_wgrad(gemm, x, dy, counts: list[int], meta: Fp8Meta, out_dtype):
    """``[E, K, M]``: per expert ``x_e^T @ dy_e`` with 1x128 tiles along the tokens."""
    dw = x.new_zeros(len(counts), x.shape[1], dy.shape[1], dtype=out_dtype)
    start = 0
    for e, n in enumerate(counts):
        if n:
            xt = meta.tiles("input", pad_rows(x[start:start + n], BLOCK).t())
            dyt = meta.tiles("grad", pad_rows(dy[start:start + n], BLOCK).t())
            dw[e] = gemm.mm(xt, dyt, out_dtype)
        start += n
    return dw


class _Fp8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, tokens_per_expert, meta: Fp8Meta):
        gemm = meta.gemm(x.device)
        recipe = meta.recipe
        blockwise, fp8_wgrad = recipe.recipe == "blockwise", recipe.wgrad
        counts = [int(c) for c in tokens_per_expert.tolist()] if blockwise else None
        rows = ends = None
        if fp8_wgrad and not blockwise:  # one read of x: the GEMM's and the wgrad's operand
            rows, ends = group_row_map(tokens_per_expert, x.shape[0], x.device)
            xq, x_wgrad = meta.quantize_transposed("input", x, rows)
        else:
            xq = meta.quantize("input", x)
        # Quantised as stored, [E, K, M] (what dgrad contracts over M); the forward's [E, M, K]
        # is its FP8 transpose (1 byte per element moved, not 2).
        wq, wq_fwd = meta.weight(w)
        if blockwise:
            out = _blockwise_mm(gemm, xq, wq_fwd, counts, x.dtype)
        else:
            out = gemm.grouped_mm(xq, wq_fwd, tokens_per_expert, x.dtype, fast_accum=True)
        # The wgrad's operand: x itself (blockwise tiles it along the tokens; without FP8
        # wgrad it stays in x's precision), else the FP8 x^T regrouped by expert.
        if rows is None:
            ctx.save_for_backward(x, x.new_empty(0), wq.data, wq.scale_inv, tokens_per_expert)
        else:
            ctx.save_for_backward(x_wgrad.data, x_wgrad.scale_inv, wq.data, wq.scale_inv,
                                  tokens_per_expert, rows, ends)
        ctx.meta, ctx.counts, ctx.layout, ctx.wdtype = meta, counts, wq.layout, w.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        meta, counts = ctx.meta, ctx.counts
        gemm = meta.gemm(dy.device)
        dy = dy.contiguous()
        x_data, x_scale, w_data, w_scale, tpe, *row_map = ctx.saved_tensors
        if row_map:  # FP8 wgrad: dy in both layouts from one read
            dyq, dyq_t = meta.quantize_transposed("grad", dy, row_map[0])
        else:
            dyq = meta.quantize("grad", dy)
        wq_t = Fp8Tensor(w_data, w_scale, ctx.layout)  # [E, K, M]
        if counts is not None:
            dx = _blockwise_mm(gemm, dyq, wq_t, counts, dy.dtype)
        else:
            dx = gemm.grouped_mm(dyq, wq_t, tpe, dy.dtype)
        if not meta.recipe.wgrad:  # --no-fp8-wgrad
            dw = grouped_wgrad(x_data, dy, tpe).to(ctx.wdtype)
        elif counts is not None:
            dw = _blockwise_wgrad(gemm, x_data, dy, counts, meta, ctx.wdtype)
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
