"""The router's gating GEMM: ``logits [T, E] = x [T, H] @ w [E, H]^T`` in fp32.

``gating(x, w, out_dtype) -> [T, E]`` in ``out_dtype`` (the router dtype). Backends in the
``moe_router_gating`` registry:

- ``torch``: upcast ``x`` and ``w`` to ``out_dtype`` and multiply (any device and dtype); the
  reference. For a bf16 model this writes an fp32 copy of the [T, H] activations, runs fp32
  (non-tensor-core) GEMMs with a contraction of only E in backward and casts the input gradient
  back: ~130 us per layer at 16384 x 1024 on an H200, for a matrix of 16 columns.
- ``triton`` (CUDA; ``x`` and ``w`` both bf16 or both fp16, fp32 logits): the same fp32 math
  without the copies. Forward: a tensor-core dot of the 16-bit operands accumulating in fp32; a
  product of two 16-bit floats is exact in fp32, so the logits equal the upcast GEMM's up to
  summation order. Backward keeps the fp32 logit gradient ``g`` unrounded: ``dx = g @ w`` and
  ``dw = g^T @ x`` run as 3xTF32 dots (``input_precision="tf32x3"``): ``g`` is split into two
  TF32 parts, the 16-bit operand is exact in TF32 and every product exact in fp32, so the only
  loss is ``g``'s ~2^-21 split remainder, below fp32 summation noise. ``dx`` is written in
  ``x``'s dtype, ``dw`` in ``w``'s (what autograd's casts give the torch path), ``dw`` summed
  over fixed token chunks (512, longer when the fp32 partials would pass 64 MiB) in a fixed
  order (deterministic, no atomics). Under the Triton interpreter (CPU tests) the dots run as
  plain fp32 (``WIDEN``), which the interpreter supports.
"""

from __future__ import annotations

import functools
import os

import torch

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available

if HAVE_TRITON:
    import triton
    import triton.language as tl

FUSED_INPUT_DTYPES = (torch.bfloat16, torch.float16)
# The interpreter multiplies 16-bit dots wrongly and has no TF32: widen to fp32 there.
_WIDEN = os.environ.get("TRITON_INTERPRET") == "1"
_PRECISION = "ieee" if _WIDEN else "tf32x3"


def gating_fusable(x_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """Why the Triton gating kernels cannot take these dtypes ("" when they can)."""
    if x_dtype != w_dtype or x_dtype not in FUSED_INPUT_DTYPES:
        return (f"the fused gating GEMM takes bf16 or fp16 activations and weight of one dtype, "
                f"got {x_dtype} and {w_dtype}")
    if out_dtype != torch.float32:
        return f"the fused gating GEMM writes fp32 logits, not {out_dtype}"
    return ""


def gating_torch(x: torch.Tensor, w: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [T, H]``, ``w [E, H]`` -> ``x @ w^T`` [T, E], computed in ``out_dtype``."""
    return x.to(out_dtype) @ w.to(out_dtype).t()


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _tile(ptr, rows, cols, stride, rmask, cmask):
        """Pointers [R, C] and mask of the ``rows x cols`` tile of a matrix with unit column
        stride and row stride ``stride``."""
        return (ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
                rmask[:, None] & cmask[None, :])

    @triton.jit
    def _gating_fwd_kernel(x_ptr, w_ptr, out_ptr, T, H: tl.constexpr, E: tl.constexpr,
                           stride_x, stride_w, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_H: tl.constexpr, WIDEN: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        rmask, emask = rows < T, experts < E
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            x_at, x_in = _tile(x_ptr, rows, cols, stride_x, rmask, cols < H)
            w_at, w_in = _tile(w_ptr, experts, cols, stride_w, emask, cols < H)
            xt, wt = tl.load(x_at, mask=x_in, other=0.0), tl.load(w_at, mask=w_in, other=0.0)
            if WIDEN:
                acc += tl.dot(xt.to(tl.float32), tl.trans(wt).to(tl.float32),
                              input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt))  # exact products, fp32 accumulation
        out_at, out_in = _tile(out_ptr, rows, experts, E, rmask, emask)
        tl.store(out_at, acc, mask=out_in)

    @triton.jit
    def _gating_dx_kernel(g_ptr, w_ptr, dx_ptr, T, H: tl.constexpr, E: tl.constexpr, stride_w,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                          PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask, cmask = rows < T, cols < H
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            experts = e0 + tl.arange(0, BLOCK_E)
            g_at, g_in = _tile(g_ptr, rows, experts, E, rmask, experts < E)
            w_at, w_in = _tile(w_ptr, experts, cols, stride_w, experts < E, cmask)
            acc += tl.dot(tl.load(g_at, mask=g_in, other=0.0),
                          tl.load(w_at, mask=w_in, other=0.0).to(tl.float32),
                          input_precision=PRECISION)
        dx_at, dx_in = _tile(dx_ptr, rows, cols, H, rmask, cmask)
        tl.store(dx_at, acc.to(dx_ptr.dtype.element_ty), mask=dx_in)

    @triton.jit
    def _gating_dw_kernel(g_ptr, x_ptr, part_ptr, T, H: tl.constexpr, E: tl.constexpr,
                          stride_x, ROWS_PER_CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
        """Chunk ``program_id(2)`` of the token axis: ``part[chunk] = g[chunk]^T @ x[chunk]``."""
        cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        chunk = tl.program_id(2)
        cmask, emask = cols < H, experts < E
        acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
        for t0 in range(0, ROWS_PER_CHUNK, BLOCK_T):  # loop bounds are compile-time constants
            rows = chunk * ROWS_PER_CHUNK + t0 + tl.arange(0, BLOCK_T)
            g_at, g_in = _tile(g_ptr, rows, experts, E, rows < T, emask)
            x_at, x_in = _tile(x_ptr, rows, cols, stride_x, rows < T, cmask)
            acc += tl.dot(tl.trans(tl.load(g_at, mask=g_in, other=0.0)),
                          tl.load(x_at, mask=x_in, other=0.0).to(tl.float32),
                          input_precision=PRECISION)
        part_at, part_in = _tile(part_ptr + chunk.to(tl.int64) * E * H, experts, cols, H, emask,
                                 cmask)
        tl.store(part_at, acc, mask=part_in)


# (BLOCK_T, BLOCK_H, num_warps) of the backward kernels, from a sweep on an H200 (dx 43.7 ->
# 35.7 us and dw 85.8 -> 49.7 us at 32768 tokens x 1024 x 16 experts; the wide dw tile lost at
# 64 experts x 4096, which keeps the narrow one).
DX_TILE = (128, 64, 4)
DW_TILE_FEW_EXPERTS = (64, 128, 4)
DW_TILE = (32, 64, 4)


def _block_e(E: int) -> int:
    return min(64, max(16, triton.next_power_of_2(E)))


# The dw kernel's fp32 partial sums [chunks, E, H]: at most this many bytes (a power-of-two
# chunk length >= 512 tokens, so few distinct lengths get compiled).
MAX_PARTIAL_BYTES = 64 << 20


def _rows_per_chunk(T: int, E: int, H: int) -> int:
    """Tokens per ``dw`` chunk: 512, or the next power of two keeping the partials in
    :data:`MAX_PARTIAL_BYTES` (e.g. 256 experts x 7168 at 65536 tokens)."""
    max_chunks = max(1, MAX_PARTIAL_BYTES // (4 * E * H))
    return max(512, triton.next_power_of_2(triton.cdiv(T, max_chunks)))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gating_forward_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [T, H]``, ``w [E, H]`` (16-bit) -> fp32 logits [T, E]."""
    x, w = _row_major(x), _row_major(w)
    T, H = x.shape
    E = w.shape[0]
    out = torch.empty(T, E, device=x.device, dtype=torch.float32)
    if T == 0:
        return out
    be = _block_e(E)
    grid = (triton.cdiv(T, 64), triton.cdiv(E, be))
    _gating_fwd_kernel[grid](x, w, out, T, H, E, x.stride(0), w.stride(0), BLOCK_T=64,
                             BLOCK_E=be, BLOCK_H=64, WIDEN=_WIDEN)
    return out


def gating_backward_triton(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor,
                           need_dx: bool = True, need_dw: bool = True):
    """``grad [T, E]`` (fp32) -> ``(dx [T, H] in x's dtype, dw [E, H] in w's dtype)``; a part
    not asked for is ``None``."""
    x, w, grad = _row_major(x), _row_major(w), grad.float().contiguous()
    T, H = x.shape
    E = w.shape[0]
    be = _block_e(E)
    dx = dw = None
    if need_dx:
        dx = torch.empty(T, H, device=x.device, dtype=x.dtype)
        if T:
            bt, bh, warps = DX_TILE
            grid = (triton.cdiv(T, bt), triton.cdiv(H, bh))
            _gating_dx_kernel[grid](grad, w, dx, T, H, E, w.stride(0), BLOCK_T=bt, BLOCK_E=be,
                                    BLOCK_H=bh, PRECISION=_PRECISION, num_warps=warps)
    if need_dw:
        rows_per_chunk = _rows_per_chunk(T, E, H)
        chunks = max(1, triton.cdiv(T, rows_per_chunk))
        part = torch.empty(chunks, E, H, device=x.device, dtype=torch.float32)
        if T:
            bt, bh, warps = DW_TILE_FEW_EXPERTS if be <= 16 else DW_TILE
            grid = (triton.cdiv(H, bh), triton.cdiv(E, be), chunks)
            _gating_dw_kernel[grid](grad, x, part, T, H, E, x.stride(0),
                                    ROWS_PER_CHUNK=rows_per_chunk, BLOCK_T=bt, BLOCK_E=be,
                                    BLOCK_H=bh, PRECISION=_PRECISION, num_warps=warps)
        else:
            part.zero_()
        dw = part.sum(dim=0).to(w.dtype)
    return dx, dw


class _FusedGating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return gating_forward_triton(x, w)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return gating_backward_triton(x, w, grad, *ctx.needs_input_grad[:2])


def gating_triton(x: torch.Tensor, w: torch.Tensor,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same contract as :func:`gating_torch`, for the dtypes :func:`gating_fusable` accepts."""
    why = gating_fusable(x.dtype, w.dtype, out_dtype)
    if why:
        raise ValueError(why)
    return _FusedGating.apply(x, w)


def _check_triton(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for t, e, h in ((37, 10, 72), (130, 16, 64)):
        x = torch.randn(t, h, device=device, generator=gen).bfloat16().requires_grad_()
        w = torch.randn(e, h, device=device, generator=gen).bfloat16().requires_grad_()
        g = torch.randn(t, e, device=device, generator=gen)
        results = []
        for fn in (gating_triton, gating_torch):
            x.grad = w.grad = None
            out = fn(x, w)
            out.backward(g)
            results.append((out, x.grad, w.grad))
        for name, got, ref in zip(("logits", "dx", "dw"), *results):
            assert_close_rel(got, ref, 1e-2 if name != "logits" else 1e-5, f"gating {name}")


def _triton_available(device=None, **ctx):
    return checked_triton_available("router gating", _check_triton, device)


GATING = BackendRegistry("moe_router_gating", flag="--moe-router-fusion")
GATING.register(Backend("triton", _triton_available, gating_triton,
                        description="tensor-core dots at fp32 accuracy, no fp32 copies of "
                        "the activations"))
GATING.register(Backend("torch", always_available, gating_torch,
                        description="upcast to the router dtype, then matmul"))


@functools.cache
def select_gating(device: torch.device, requested: str = "auto") -> Backend:
    """The gating backend on ``device`` (resolved once per process, logged once)."""
    return GATING.select(requested, device=device)
