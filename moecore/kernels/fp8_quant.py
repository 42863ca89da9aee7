"""FP8 casts: a high-precision tensor -> (float8 data, fp32 dequantisation scale).

An :class:`Fp8Tensor` holds ``data`` (``float8_e4m3fn`` or ``float8_e5m2``) and ``scale_inv``
(fp32, the factor that turns ``data`` back into values: ``x ~= data * scale_inv``) in one of
three layouts, always with the GEMM's contraction dimension last (``K``):

- ``tensor``: ``data [..., M, K]``, ``scale_inv []`` or one per leading index (``[E]`` for
  expert weights ``[E, N, K]``);
- ``tile`` (DeepSeek-V3's activations): one scale per 1x128 tile along K,
  ``scale_inv [..., M, K/128]``;
- ``block`` (DeepSeek-V3's weights): one scale per 128x128 block,
  ``scale_inv [..., M/128, K/128]``.

These are the torch references (any device); the scale math follows Transformer Engine:
``scale = fp8_max / amax / 2**margin`` (1 where ``amax`` is 0 or not finite), values are clamped
to ``[-fp8_max, fp8_max]`` before the cast (PyTorch's float8 casts do not saturate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
LAYOUTS = ("tensor", "tile", "block")


@dataclass(frozen=True)
class Fp8Tensor:
    """FP8 ``data`` and its fp32 dequantisation ``scale_inv`` in ``layout`` (module docstring)."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    layout: str

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """fp32 quantisation scale ``fp8_max / amax / 2**margin``; 1 where ``amax`` is 0 or inf."""
    amax = amax.float()
    scale = FP8_MAX[dtype] / amax / (2.0 ** margin)
    ok = (amax > 0) & torch.isfinite(amax) & torch.isfinite(scale)
    return torch.where(ok, scale, torch.ones_like(scale))


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` in fp32, saturated, rounded to ``dtype``; contiguous (the GEMMs need the
    contraction dim dense; transposing after the cast moves 1 byte per element)."""
    bound = FP8_MAX[dtype]
    return (x.float() * scale).clamp_(-bound, bound).to(dtype).contiguous()


def amax(x: torch.Tensor, dim=None) -> torch.Tensor:
    """``max |x|`` (over ``dim``, all by default) in fp32, without an ``abs`` temporary."""
    return torch.linalg.vector_norm(x.detach(), float("inf"), dim=dim).float()


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Fp8Tensor:
    """``x [..., M, K]`` with ``scale`` ``[]`` or one per leading index (``[E]`` for
    ``[E, M, K]``) -> ``tensor`` layout."""
    expand = scale.reshape(scale.shape + (1,) * (x.dim() - scale.dim()))
    return Fp8Tensor(_cast(x, expand, dtype), (1.0 / scale.float()), "tensor")


def _check_multiple(x: torch.Tensor, dims: tuple[int, ...], what: str) -> None:
    for d in dims:
        if x.shape[d] % BLOCK:
            raise ValueError(f"blockwise FP8 ({what}) needs dimension {d} of shape "
                             f"{tuple(x.shape)} to be a multiple of {BLOCK}; --fp8-recipe "
                             "blockwise needs hidden and FFN sizes that are multiples of 128")


def quantize_tiles(x: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> Fp8Tensor:
    """``x [..., M, K]`` -> ``tile`` layout: one scale per 1x128 tile along K (current amax)."""
    _check_multiple(x, (-1,), "1x128 tiles")
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    scale = scale_from_amax(amax(tiles, -1), dtype, margin)
    data = _cast(tiles, scale.unsqueeze(-1), dtype).reshape(x.shape)
    return Fp8Tensor(data, 1.0 / scale, "tile")


def quantize_blocks(w: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> Fp8Tensor:
    """``w [..., N, K]`` -> ``block`` layout: one scale per 128x128 block (current amax)."""
    _check_multiple(w, (-2, -1), "128x128 blocks")
    *lead, n, k = w.shape
    blocks = w.reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = scale_from_amax(amax(blocks, (-3, -1)), dtype, margin)
    data = _cast(blocks, scale[..., :, None, :, None], dtype).reshape(w.shape)
    return Fp8Tensor(data, 1.0 / scale, "block")


def expanded_scale_inv(t: Fp8Tensor) -> torch.Tensor:
    """``t.scale_inv`` broadcast to ``t.shape`` (fp32)."""
    s, shape = t.scale_inv, t.shape
    if t.layout == "tensor":
        return s.reshape(s.shape + (1,) * (len(shape) - s.dim())).expand(shape)
    if t.layout == "tile":
        return s.repeat_interleave(BLOCK, dim=-1)
    return s.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)


def dequantize(t: Fp8Tensor) -> torch.Tensor:
    """fp32 values of ``t``: ``data * scale_inv`` (broadcast per layout)."""
    return t.data.float() * expanded_scale_inv(t)


def transpose(t: Fp8Tensor) -> Fp8Tensor:
    """Swap the last two dims (contiguous copy of the data): valid for ``tensor`` and ``block``
    layouts, whose scales do not depend on which dim is contracted."""
    if t.layout == "tile":
        raise ValueError("a 1x128-tiled FP8 tensor cannot be transposed; requantise the source")
    scale = t.scale_inv.transpose(-2, -1) if t.layout == "block" else t.scale_inv
    return Fp8Tensor(t.data.transpose(-2, -1).contiguous(), scale.contiguous(), t.layout)
