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

``quantize_tensor`` / ``quantize_tiles`` / ``transpose`` / ``quantize_transposed`` /
``quantize_tiles_transposed`` have two backends (:data:`FP8_CAST`, request ``fp8_cast_backend``
/ ``--fp8-cast-backend``): ``torch`` (the reference, any device) and ``triton`` (CUDA: one pass
that reads ``x`` once and writes FP8, and for tiles the scales too; transposes move 1 byte per
element in coalesced tiles, where PyTorch's strided copy is slow; ``quantize_transposed`` writes
a tensor's GEMM operand and its wgrad operand from one read; the rounding to FP8 is done in fp32
arithmetic, round-to-nearest-even, so results are bit-identical to the reference and checkable
under the Triton interpreter). The scale math follows Transformer Engine:
``scale = fp8_max / amax / 2**margin`` (1 where ``amax`` is 0 or not finite), values are clamped
to ``[-fp8_max, fp8_max]`` before the cast (PyTorch's float8 casts do not saturate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, checked_triton_available

if HAVE_TRITON:
    import triton
    import triton.language as tl

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
    # tensor / tensor: correctly rounded (``float / tensor`` multiplies by a reciprocal), as the
    # Triton kernels' div_rn.
    scale = torch.full_like(amax, FP8_MAX[dtype]) / amax / (2.0 ** margin)
    ok = (amax > 0) & torch.isfinite(amax) & torch.isfinite(scale)
    return torch.where(ok, scale, torch.ones_like(scale))


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` correctly rounded (the dequantisation factor)."""
    scale = scale.float()
    return torch.ones_like(scale) / scale


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` in fp32, saturated, rounded to ``dtype``; contiguous (the GEMMs need the
    contraction dim dense; transposing after the cast moves 1 byte per element)."""
    bound = FP8_MAX[dtype]
    return (x.float() * scale).clamp_(-bound, bound).to(dtype).contiguous()


def pad_fp8(data: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """``F.pad`` of FP8 ``data`` with zeros (PyTorch has no pad kernel for float8; bits 0 are
    0.0)."""
    return torch.nn.functional.pad(data.view(torch.uint8), pad).view(data.dtype)


def amax(x: torch.Tensor, dim=None) -> torch.Tensor:
    """``max |x|`` (over ``dim``, all by default) in fp32, without an ``abs`` temporary."""
    return torch.linalg.vector_norm(x.detach(), float("inf"), dim=dim).float()


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Fp8Tensor:
    """``x [..., M, K]`` with ``scale`` ``[]`` or one per leading index (``[E]`` for
    ``[E, M, K]``) -> ``tensor`` layout."""
    expand = scale.reshape(scale.shape + (1,) * (x.dim() - scale.dim()))
    return Fp8Tensor(_cast(x, expand, dtype), reciprocal(scale), "tensor")


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
    return Fp8Tensor(data, reciprocal(scale), "tile")


def quantize_blocks(w: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> Fp8Tensor:
    """``w [..., N, K]`` -> ``block`` layout: one scale per 128x128 block (current amax)."""
    _check_multiple(w, (-2, -1), "128x128 blocks")
    *lead, n, k = w.shape
    blocks = w.reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = scale_from_amax(amax(blocks, (-3, -1)), dtype, margin)
    data = _cast(blocks, scale[..., :, None, :, None], dtype).reshape(w.shape)
    return Fp8Tensor(data, reciprocal(scale), "block")


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


def _check_rows(t: Fp8Tensor, rows: torch.Tensor | None) -> None:
    if t.layout == "tile":
        raise ValueError("a 1x128-tiled FP8 tensor cannot be transposed; requantise the source")
    if rows is not None and (t.layout != "tensor" or t.data.dim() != 2):
        raise ValueError("a row map needs a 2-D tensor-scaled FP8 tensor")


def _transposed_scale(t: Fp8Tensor) -> torch.Tensor:
    scale = t.scale_inv.transpose(-2, -1) if t.layout == "block" else t.scale_inv
    return scale.contiguous()


def transpose(t: Fp8Tensor, rows: torch.Tensor | None = None) -> Fp8Tensor:
    """Swap the last two dims of ``t`` (``tensor`` or ``block`` layout, whose scales do not
    depend on which dim is contracted): ``[..., R, C] -> [..., C, R]``, contiguous.

    ``rows [P]`` (int, 2-D ``tensor`` layout only) also re-lays the rows first: output column
    ``p`` is row ``rows[p]`` of ``t``, or zeros where ``rows[p] < 0`` -> ``[C, P]``
    (:func:`group_row_map`, :func:`padded_row_map`)."""
    _check_rows(t, rows)
    data = t.data
    if rows is not None:
        u = data.view(torch.uint8).index_select(0, rows.clamp_min(0).long())
        data = torch.where((rows >= 0)[:, None], u, 0).view(data.dtype)
    return Fp8Tensor(data.transpose(-2, -1).contiguous(), _transposed_scale(t), t.layout)


def _check_one_scale(x: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or scale.numel() != 1:
        raise ValueError(f"quantize_transposed needs x [R, C] and one scale; got "
                         f"{tuple(x.shape)} and {tuple(scale.shape)}")


def quantize_transposed(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                        rows: torch.Tensor) -> tuple[Fp8Tensor, Fp8Tensor]:
    """``x [R, C]`` with one ``scale []`` -> ``(xq [R, C], xq_t [C, P])``: :func:`quantize_tensor`
    and its :func:`transpose` by the row map ``rows [P]`` (the GEMM operand and the wgrad's
    operand of one tensor). ``rows`` must name every row of ``x`` once, as
    :func:`group_row_map` and :func:`padded_row_map` do."""
    _check_one_scale(x, scale)
    xq = quantize_tensor(x, scale.reshape(()), dtype)
    return xq, transpose(xq, rows)


def quantize_tiles_transposed(x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                              margin: int = 0) -> Fp8Tensor:
    """``x [R, C]`` re-laid by the row map ``rows [P]`` (``P`` a multiple of 128; zeros where
    ``rows[p] < 0``) and transposed, in 1x128 tiles along ``P``: ``tile`` layout ``[C, P]``,
    ``scale_inv [C, P/128]``. The blockwise wgrad's operand (its contraction runs over tokens);
    with :func:`group_row_map` at ``multiple=128`` no tile spans two experts."""
    if x.dim() != 2 or rows.dim() != 1:
        raise ValueError(f"quantize_tiles_transposed needs x [R, C] and rows [P]; got "
                         f"{tuple(x.shape)} and {tuple(rows.shape)}")
    picked = x.index_select(0, rows.clamp_min(0).long())
    picked = torch.where((rows >= 0)[:, None], picked, torch.zeros((), dtype=x.dtype))
    return quantize_tiles(picked.t(), dtype, margin)


def padded_row_map(rows: int, multiple: int, device) -> torch.Tensor:
    """``[P]`` int32 row map of :func:`transpose`: rows ``0..rows-1`` then ``-1`` (zeros) up
    to ``P``, the next multiple of ``multiple``."""
    index = torch.arange(-(-rows // multiple) * multiple, device=device, dtype=torch.int32)
    return torch.where(index < rows, index, -1)


def group_row_map(tokens_per_expert: torch.Tensor, rows: int, device,
                  multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by expert (``tokens_per_expert [E]``, summing to ``rows``) re-laid so that
    every group starts at a multiple of ``multiple`` and spans at least ``multiple`` rows (an
    expert without tokens gets zero rows, so a grouped GEMM over them writes zeros): returns
    ``(rows_map [P] int32, ends [E] int32)`` for :func:`transpose` and the grouped wgrad, with
    ``P = multiple * (ceil(rows / multiple) + E)``, known without a host sync."""
    counts = tokens_per_expert.to(device, torch.int64)
    e = counts.shape[0]
    padded = torch.clamp_min((counts + multiple - 1) // multiple * multiple, multiple)
    ends = torch.cumsum(padded, 0)
    shift = (ends - padded) - (torch.cumsum(counts, 0) - counts)  # per group
    expert = torch.repeat_interleave(torch.arange(e, device=device), counts, output_size=rows)
    dest = torch.arange(rows, device=device) + shift[expert]
    total = multiple * (-(-rows // multiple) + e)
    rows_map = torch.full((total,), -1, dtype=torch.int32, device=device)
    rows_map[dest] = torch.arange(rows, device=device, dtype=torch.int32)
    return rows_map, ends.to(torch.int32)


# ---- Triton -----------------------------------------------------------------------------------
# e4m3fn: 3 mantissa bits, smallest normal exponent -6; e5m2: 2 bits, -14.
_FORMAT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}

if HAVE_TRITON:

    @triton.jit
    def _round_fp8(y, FP8_MAX: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr):
        """``y`` (fp32) saturated to ``±FP8_MAX`` and rounded to the nearest FP8 value (ties to
        even), still as fp32: the final cast is then exact on every backend."""
        a = tl.minimum(tl.abs(y), FP8_MAX)
        exp = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exp = tl.maximum(exp, MIN_EXP)
        ulp = ((exp - MBITS + 127) << 23).to(tl.float32, bitcast=True)
        inv_ulp = ((127 - exp + MBITS) << 23).to(tl.float32, bitcast=True)
        q = a * inv_ulp  # exact (a power of two), < 2**(MBITS + 1)
        q = (q + 8388608.0) - 8388608.0  # fp32 add rounds to an integer, ties to even
        r = (q * ulp).to(tl.int32, bitcast=True)
        sign = y.to(tl.int32, bitcast=True) & -2147483648  # keeps -0.0 as the reference does
        return (r | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _cast_kernel(x_ptr, scale_ptr, out_ptr, n, group_numel, BLOCK: tl.constexpr,
                     FP8_MAX: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + offs // group_numel, mask=mask, other=1.0)
        r = _round_fp8(x * scale, FP8_MAX, MBITS, MIN_EXP)
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tile_scales(amax, inv_margin, FP8_MAX: tl.constexpr):
        """``(scale, scale_inv)`` of tiles with ``amax`` (fp32, any shape), bit for bit
        :func:`scale_from_amax` and :func:`reciprocal`: IEEE divisions, as torch's; 1 where
        ``amax`` is 0 or not finite."""
        top = tl.full(amax.shape, FP8_MAX, tl.float32)
        scale = tl.math.div_rn(top, amax) * inv_margin
        ok = (amax > 0) & (amax < float("inf")) & (scale < float("inf"))
        scale = tl.where(ok, scale, 1.0)
        return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)

    @triton.jit
    def _tile_kernel(x_ptr, out_ptr, scale_inv_ptr, rows, k, inv_margin, BLOCK_R: tl.constexpr,
                     TILE: tl.constexpr, FP8_MAX: tl.constexpr, MBITS: tl.constexpr,
                     MIN_EXP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        t = tl.program_id(1)
        c = t * TILE + tl.arange(0, TILE)
        mask = (r < rows)[:, None]
        offs = r[:, None] * k + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale, scale_inv = _tile_scales(tl.max(tl.abs(x), axis=1), inv_margin, FP8_MAX)
        q = _round_fp8(x * scale[:, None], FP8_MAX, MBITS, MIN_EXP)
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_inv_ptr + r * (k // TILE) + t, scale_inv, mask=r < rows)

    @triton.jit
    def _transpose_kernel(src_ptr, rows_ptr, out_ptr, R, C, P, HAS_ROWS: tl.constexpr,
                          BP: tl.constexpr, BC: tl.constexpr):
        """``out[b, c, p] = src[b, rows[p], c]`` (0 where ``rows[p] < 0``; ``rows[p] = p``
        without a map), bytes; loads along ``c`` and stores along ``p`` are both contiguous."""
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2).to(tl.int64)
        if HAS_ROWS:
            r = tl.load(rows_ptr + p, mask=p < P, other=-1)
        else:
            r = tl.where(p < P, p, -1)
        tile = tl.load(src_ptr + b * R * C + r.to(tl.int64)[:, None] * C + c[None, :],
                       mask=(r >= 0)[:, None] & (c < C)[None, :], other=0)
        tl.store(out_ptr + b * C * P + c.to(tl.int64)[:, None] * P + p[None, :], tl.trans(tile),
                 mask=(c < C)[:, None] & (p < P)[None, :])


    @triton.jit
    def _cast_transpose_kernel(x_ptr, scale_ptr, rows_ptr, out_ptr, out_t_ptr, R, C, P,
                               stride_x, BP: tl.constexpr, BC: tl.constexpr,
                               FP8_MAX: tl.constexpr, MBITS: tl.constexpr,
                               MIN_EXP: tl.constexpr):
        """``out[r, c] = q(x[r, c])`` and ``out_t[c, p] = q(x[rows[p], c])`` (0 where
        ``rows[p] < 0``): one read of ``x``, both FP8 layouts written (each row of ``x`` appears
        once in ``rows``)."""
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        r = tl.load(rows_ptr + p, mask=p < P, other=-1).to(tl.int64)
        valid = (r >= 0)[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=valid,
                    other=0.0).to(tl.float32)
        q = _round_fp8(x * tl.load(scale_ptr), FP8_MAX, MBITS, MIN_EXP)
        q = q.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * C + c[None, :], q, mask=valid)
        tl.store(out_t_ptr + c.to(tl.int64)[:, None] * P + p[None, :], tl.trans(q),
                 mask=(c < C)[:, None] & (p < P)[None, :])


    @triton.jit
    def _tile_transpose_kernel(x_ptr, rows_ptr, out_ptr, scale_inv_ptr, C, P, stride_x,
                               inv_margin, BC: tl.constexpr, TILE: tl.constexpr,
                               FP8_MAX: tl.constexpr, MBITS: tl.constexpr,
                               MIN_EXP: tl.constexpr):
        """``out[c, p] = q(x[rows[p], c])`` (0 where ``rows[p] < 0``), one scale per ``c`` and
        128 ``p``: the program's [TILE, BC] block of gathered rows is those tiles, transposed."""
        tp = tl.program_id(0)
        p = tp * TILE + tl.arange(0, TILE)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        r = tl.load(rows_ptr + p).to(tl.int64)
        cmask = c < C
        x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :],
                    mask=(r >= 0)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        scale, scale_inv = _tile_scales(tl.max(tl.abs(x), axis=0), inv_margin, FP8_MAX)
        q = _round_fp8(x * scale[None, :], FP8_MAX, MBITS, MIN_EXP)
        tl.store(out_ptr + c.to(tl.int64)[:, None] * P + p[None, :],
                 tl.trans(q.to(out_ptr.dtype.element_ty)), mask=cmask[:, None])
        tl.store(scale_inv_ptr + c * (P // TILE) + tp, scale_inv, mask=cmask)


def transpose_triton(t: Fp8Tensor, rows: torch.Tensor | None = None) -> Fp8Tensor:
    """:func:`transpose` in one Triton pass (1 byte read and written per element)."""
    _check_rows(t, rows)
    data = t.data.contiguous().view(torch.uint8)
    *lead, r, c = data.shape
    p = r if rows is None else rows.shape[0]
    out = torch.empty(*lead, c, p, dtype=torch.uint8, device=data.device)
    batch = out.numel() // max(c * p, 1)
    if out.numel():
        rows_arg = data if rows is None else rows.to(torch.int32).contiguous()
        _transpose_kernel[(triton.cdiv(p, 64), triton.cdiv(c, 64), batch)](
            data, rows_arg, out, r, c, p, HAS_ROWS=rows is not None, BP=64, BC=64)
    return Fp8Tensor(out.view(t.data.dtype), _transposed_scale(t), t.layout)


def quantize_tensor_triton(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Fp8Tensor:
    """:func:`quantize_tensor` in one Triton pass (the output is contiguous)."""
    xc = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    scale = scale.float().contiguous()
    n = xc.numel()
    if n:
        mbits, min_exp = _FORMAT[dtype]
        _cast_kernel[(triton.cdiv(n, 1024),)](xc, scale, out, n, max(n // scale.numel(), 1),
                                              BLOCK=1024, FP8_MAX=FP8_MAX[dtype], MBITS=mbits,
                                              MIN_EXP=min_exp)
    return Fp8Tensor(out, reciprocal(scale), "tensor")


def quantize_transposed_triton(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                               rows: torch.Tensor) -> tuple[Fp8Tensor, Fp8Tensor]:
    """:func:`quantize_transposed` in one Triton pass: ``x`` read once, both layouts written
    (the cast then the transpose would read the FP8 copy again)."""
    _check_one_scale(x, scale)
    if x.stride(-1) != 1:
        x = x.contiguous()
    (r, c), p = x.shape, rows.shape[0]
    out = torch.empty(r, c, device=x.device, dtype=dtype)
    out_t = torch.empty(c, p, device=x.device, dtype=dtype)
    scale = scale.float().reshape(1).contiguous()
    if c and p:
        mbits, min_exp = _FORMAT[dtype]
        _cast_transpose_kernel[(triton.cdiv(p, 64), triton.cdiv(c, 64))](
            x, scale, rows.to(torch.int32).contiguous(), out, out_t, r, c, p, x.stride(0),
            BP=64, BC=64, FP8_MAX=FP8_MAX[dtype], MBITS=mbits, MIN_EXP=min_exp)
    scale_inv = reciprocal(scale.reshape(()))
    return Fp8Tensor(out, scale_inv, "tensor"), Fp8Tensor(out_t, scale_inv, "tensor")


def quantize_tiles_transposed_triton(x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                                     margin: int = 0) -> Fp8Tensor:
    """:func:`quantize_tiles_transposed` in one Triton pass (no bf16 copy of the gathered
    rows)."""
    if x.dim() != 2 or rows.dim() != 1 or rows.shape[0] % BLOCK:
        raise ValueError(f"quantize_tiles_transposed needs x [R, C] and rows [P], P a multiple "
                         f"of {BLOCK}; got {tuple(x.shape)} and {tuple(rows.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    c, p = x.shape[1], rows.shape[0]
    out = torch.empty(c, p, device=x.device, dtype=dtype)
    scale_inv = torch.empty(c, p // BLOCK, device=x.device, dtype=torch.float32)
    if c and p:
        mbits, min_exp = _FORMAT[dtype]
        _tile_transpose_kernel[(p // BLOCK, triton.cdiv(c, 32))](
            x, rows.to(torch.int32).contiguous(), out, scale_inv, c, p, x.stride(0),
            2.0 ** -margin, BC=32, TILE=BLOCK, FP8_MAX=FP8_MAX[dtype], MBITS=mbits,
            MIN_EXP=min_exp)
    return Fp8Tensor(out, scale_inv, "tile")


def quantize_tiles_triton(x: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> Fp8Tensor:
    """:func:`quantize_tiles` in one Triton pass (amax, scale and cast per 1x128 tile)."""
    _check_multiple(x, (-1,), "1x128 tiles")
    xc = x.contiguous()
    k = x.shape[-1]
    rows = xc.numel() // k if k else 0
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    scale_inv = torch.empty(*x.shape[:-1], k // BLOCK, device=x.device, dtype=torch.float32)
    if rows and k:
        mbits, min_exp = _FORMAT[dtype]
        _tile_kernel[(triton.cdiv(rows, 16), k // BLOCK)](
            xc, out, scale_inv, rows, k, 2.0 ** -margin, BLOCK_R=16, TILE=BLOCK,
            FP8_MAX=FP8_MAX[dtype], MBITS=mbits, MIN_EXP=min_exp)
    return Fp8Tensor(out, scale_inv, "tile")


def _check_triton(device: torch.device) -> None:
    """Bit-identical to the torch reference on values that cover subnormals, ties and
    saturation (raises ``AssertionError`` otherwise)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(33, 256, device=device, generator=gen) * torch.logspace(
        -6, 3, 256, device=device)
    for dtype in FP8_MAX:
        scale = torch.tensor(3.0, device=device)
        a, b = quantize_tensor_triton(x, scale, dtype), quantize_tensor(x, scale, dtype)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), f"cast {dtype}"
        a, b = quantize_tiles_triton(x, dtype, 1), quantize_tiles(x, dtype, 1)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), f"tiles {dtype}"
        assert torch.equal(a.scale_inv, b.scale_inv), f"tile scales {dtype}"
    q = quantize_tensor(x[:, :200], torch.tensor(3.0, device=device), torch.float8_e4m3fn)
    rows = torch.tensor([4, -1, 0, 32, 7, -1, 1], device=device, dtype=torch.int32)
    for r in (None, rows):
        a, b = transpose_triton(q, r), transpose(q, r)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), "transpose"
    rows, _ = group_row_map(torch.tensor([20, 0, 13], device=device), 33, device, BLOCK)
    for dtype in FP8_MAX:
        a = quantize_tiles_transposed_triton(x.bfloat16(), rows, dtype, 1)
        b = quantize_tiles_transposed(x.bfloat16(), rows, dtype, 1)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), \
            f"tiles along rows {dtype}"
        assert torch.equal(a.scale_inv, b.scale_inv), f"tile scales along rows {dtype}"
    for dtype in FP8_MAX:
        got = quantize_transposed_triton(x.bfloat16()[:, :200], scale, dtype, rows)
        ref = quantize_transposed(x.bfloat16()[:, :200], scale, dtype, rows)
        for a, b in zip(got, ref):
            assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), \
                f"cast + transpose {dtype}"
    w = quantize_blocks(x[:, :256].reshape(1, 33, 256)[:, :32].repeat(2, 4, 1),
                        torch.float8_e4m3fn)
    a, b = transpose_triton(w), transpose(w)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), "block transpose"
    assert torch.equal(a.scale_inv, b.scale_inv), "block transpose scales"


def _triton_available(device=None, **_) -> tuple[bool, str]:
    return checked_triton_available("fp8_cast", _check_triton, device, torch.bfloat16)


@dataclass(frozen=True)
class Fp8Casts:
    """The functions of one cast backend: :func:`quantize_tensor`, :func:`quantize_tiles`,
    :func:`transpose`, :func:`quantize_transposed` and :func:`quantize_tiles_transposed` (same
    signatures)."""

    quantize_tensor: Callable
    quantize_tiles: Callable
    transpose: Callable
    quantize_transposed: Callable
    quantize_tiles_transposed: Callable


FP8_CAST = BackendRegistry("fp8_cast", flag="--fp8-cast-backend")
FP8_CAST.register(Backend("triton", _triton_available,
                          Fp8Casts(quantize_tensor_triton, quantize_tiles_triton,
                                   transpose_triton, quantize_transposed_triton,
                                   quantize_tiles_transposed_triton),
                          description="one fused pass per cast or transpose (CUDA)"))
FP8_CAST.register(Backend("torch", always_available,
                          Fp8Casts(quantize_tensor, quantize_tiles, transpose,
                                   quantize_transposed, quantize_tiles_transposed),
                          description="torch ops (the reference)"))
