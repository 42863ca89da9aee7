"""FP8 linear ``y = x W^T`` (forward, dgrad and wgrad in FP8), saving FP8 operands for backward.

Forward ``x [..., K] @ W [N, K]^T``; dgrad ``dx = dy @ W`` (``W`` re-laid ``[K, N]``); wgrad
``dW = dy^T @ x`` (contraction over tokens). Tensorwise/delayed: ``x`` and ``dy`` are each cast
once into both FP8 layouts (:meth:`Fp8Meta.quantize_transposed`: the GEMM's, and the wgrad's
with tokens zero-padded to a multiple of 16); the forward saves only the transposed ``x``.
Blockwise: the forward also quantises ``x`` along the tokens (1x128 tiles of ``x^T``, tokens
zero-padded to a multiple of 128, one pass) for the wgrad; ``dy`` is quantised both ways in
backward. ``--no-fp8-wgrad``: the wgrad runs in ``x``'s precision on ``x`` as it is. The weight
and its transpose come from :meth:`Fp8Meta.weight` (cached per optimizer step where allowed).
Outputs and gradients come back in the input / weight dtype.
"""

from __future__ import annotations

import torch

from moecore.fp8.scaling import Fp8Meta
from moecore.kernels.fp8_quant import BLOCK, Fp8Tensor, padded_row_map


def _pack(t: Fp8Tensor) -> tuple:
    return t.data, t.scale_inv


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, meta: Fp8Meta):
        x2 = x.reshape(-1, x.shape[-1])
        gemm = meta.gemm(x.device)
        blockwise, wgrad = meta.recipe.recipe == "blockwise", meta.recipe.wgrad
        if wgrad and not blockwise:  # one read of x for the GEMM's and the wgrad's operand
            xq, x_wgrad = meta.quantize_transposed("input", x2, _token_rows(x2))
        else:
            xq = meta.quantize("input", x2)
            x_wgrad = meta.tiles_transposed("input", x2, _token_rows(x2, BLOCK)) if wgrad \
                else None
        wq, wq_t = meta.weight(weight)
        out = gemm.mm(xq, wq, x.dtype, fast_accum=True)
        # The wgrad's operand: FP8 x^T, or (--no-fp8-wgrad) x as it is (layout None).
        saved_x = _pack(x_wgrad) if wgrad else (x2, x2.new_empty(0))
        ctx.meta, ctx.layouts = meta, (x_wgrad.layout if wgrad else None, wq_t.layout)
        ctx.x_shape, ctx.wdtype = x.shape, weight.dtype
        ctx.save_for_backward(*saved_x, *_pack(wq_t))
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        meta, x_shape = ctx.meta, ctx.x_shape
        wq_t = Fp8Tensor(w_data, w_scale, ctx.layouts[1])
        gemm = meta.gemm(dy.device)
        dy2 = dy.reshape(-1, dy.shape[-1])
        fp8_wgrad = ctx.needs_input_grad[1] and ctx.layouts[0] == "tensor"
        if fp8_wgrad:
            dyq, dyq_t = meta.quantize_transposed("grad", dy2, _token_rows(dy2))
        else:
            dyq = meta.quantize("grad", dy2)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = gemm.mm(dyq, wq_t, dy.dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.layouts[0] is None:  # --no-fp8-wgrad
                dw = (dy2.t() @ x_data).to(ctx.wdtype)
            elif meta.recipe.recipe == "blockwise":
                dy_t = meta.tiles_transposed("grad", dy2, _token_rows(dy2, BLOCK))
                dw = gemm.mm(dy_t, Fp8Tensor(x_data, x_scale, ctx.layouts[0]), ctx.wdtype)
            else:
                dw = gemm.mm(dyq_t, Fp8Tensor(x_data, x_scale, ctx.layouts[0]), ctx.wdtype)
        return dx, dw, None


def _token_rows(x2: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """The wgrad's row map of ``x2 [T, K]``: tokens zero-padded to a multiple of 16, as FP8
    GEMMs need (of 128 for 1x128 tiles along the tokens)."""
    return padded_row_map(x2.shape[0], multiple, x2.device)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               meta: Fp8Meta) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the GEMMs in FP8 (``x [..., K]``, ``weight [N, K]``);
    the bias is added in ``x``'s dtype."""
    out = _Fp8Linear.apply(x, weight, meta)
    return out if bias is None else out + bias
