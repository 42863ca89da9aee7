"""FP8 linear ``y = x W^T`` (forward, dgrad and wgrad in FP8), saving FP8 operands for backward.

Forward ``x [..., K] @ W [N, K]^T``; dgrad ``dx = dy @ W`` (``W`` re-laid ``[K, N]``); wgrad
``dW = dy^T @ x`` (contraction over tokens). Tensorwise/delayed: the forward's FP8 ``x`` and
``W`` are reused transposed. Blockwise: the forward also quantises ``x`` along the tokens (1x128
tiles of ``x^T``, tokens zero-padded to a multiple of 128) for the wgrad; ``dy`` is quantised
both ways in backward. Outputs and gradients come back in the input / weight dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecore.fp8.scaling import Fp8Meta
from moecore.kernels.fp8_quant import BLOCK, Fp8Tensor, pad_fp8, transpose


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x [T, K]`` with zero rows appended up to a multiple of ``multiple`` (zeros add nothing
    to a contraction over rows)."""
    pad = -x.shape[0] % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _pack(t: Fp8Tensor) -> tuple:
    return t.data, t.scale_inv


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, meta: Fp8Meta):
        x2 = x.reshape(-1, x.shape[-1])
        gemm = meta.gemm(x.device)
        xq, wq = meta.quantize("input", x2), meta.quantize("weight", weight)
        out = gemm.mm(xq, wq, x.dtype, fast_accum=True)
        if meta.recipe.recipe == "blockwise":
            xq = meta.tiles("input", pad_rows(x2, BLOCK).t())
        ctx.meta, ctx.layouts = meta, (xq.layout, wq.layout)
        ctx.x_shape, ctx.wdtype = x.shape, weight.dtype
        ctx.save_for_backward(*_pack(xq), *_pack(wq))
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        meta, x_shape = ctx.meta, ctx.x_shape
        xq, wq = Fp8Tensor(x_data, x_scale, ctx.layouts[0]), Fp8Tensor(w_data, w_scale,
                                                                       ctx.layouts[1])
        gemm = meta.gemm(dy.device)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyq = meta.quantize("grad", dy2)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = gemm.mm(dyq, transpose(wq), dy.dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            if meta.recipe.recipe == "blockwise":
                dy_t = meta.tiles("grad", pad_rows(dy2, BLOCK).t())
                dw = gemm.mm(dy_t, xq, ctx.wdtype)
            else:
                dw = gemm.mm(_pad_t(transpose(dyq)), _pad_t(transpose(xq)), ctx.wdtype)
        return dx, dw, None


def _pad_t(t: Fp8Tensor) -> Fp8Tensor:
    """A tensorwise ``[N, T]`` operand with T zero-padded to a multiple of 16 (FP8 GEMMs need
    it; zeros add nothing)."""
    pad = -t.data.shape[-1] % 16
    if not pad:
        return t
    data = pad_fp8(t.data, (0, pad))
    return Fp8Tensor(data, t.scale_inv, t.layout)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               meta: Fp8Meta) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the GEMMs in FP8 (``x [..., K]``, ``weight [N, K]``);
    the bias is added in ``x``'s dtype."""
    out = _Fp8Linear.apply(x, weight, meta)
    return out if bias is None else out + bias
