"""SwiGLU on the fc1 output: ``act = silu(x[:, :F]) * x[:, F:]`` and its backward.

``swiglu(x [N, 2F]) -> [N, F]`` is an autograd function that saves only ``x`` (which the fc1
GEMM's output already is) and recomputes ``silu`` in backward, so no ``silu(gate)`` [N, F]
intermediate is kept. Two implementations behind the ``moe_swiglu`` registry:

- ``torch``: the unfused ops (``F.silu(gate) * up``; backward ``grad * up`` through
  ``silu_backward`` and ``grad * silu(gate)``, then one ``cat``); bitwise what autograd computes
  for the unfused expression. Any device and dtype; the reference.
- ``triton``: one pass each way on CUDA (fp32, bf16, fp16), math in fp32: forward reads ``x``
  once and writes ``act``; backward reads ``x`` and ``grad`` once and writes the [N, 2F] grad.
  In 16-bit dtypes it rounds once where the unfused ops round two or three times.

Both directions can also record the amax (``max |value|``, fp32) of what they write, as the
next FP8 cast needs (``amax=`` a one-element fp32 tensor, raised in place): the Triton kernels
take it from the values in hand, so that cast needs no extra read of the [N, F] / [N, 2F] tensor.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available
from moecore.kernels.fp8_quant import amax as tensor_amax

if HAVE_TRITON:
    import triton
    import triton.language as tl


def _check(x: torch.Tensor) -> int:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"swiglu needs x [N, 2F]; got {tuple(x.shape)}")
    return x.shape[1] // 2


# ---- torch reference -----------------------------------------------------------------------


def _raise_amax(amax: torch.Tensor | None, t: torch.Tensor) -> None:
    """``amax [1] = max(amax, max |t|)`` in place (nothing when ``amax`` is None)."""
    if amax is not None:
        torch.maximum(amax, tensor_amax(t).reshape(1), out=amax)


def swiglu_forward_torch(x: torch.Tensor, out: torch.Tensor | None = None,
                         amax: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, 2F] (``[gate | up]``) -> ``silu(gate) * up`` [N, F] (written into ``out`` when
    given; its amax into ``amax [1]`` when given)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    act = torch.mul(F.silu(gate), up, **({} if out is None else {"out": out}))
    _raise_amax(amax, act)
    return act


def swiglu_backward_torch(x: torch.Tensor, grad: torch.Tensor,
                          amax: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, 2F], grad [N, F] -> grad_x [N, 2F] (x's dtype; its amax into ``amax [1]``)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    dx = torch.cat([grad_gate, grad * F.silu(gate)], dim=-1)
    _raise_amax(amax, dx)
    return dx


def swiglu_backward_and_forward_torch(x: torch.Tensor, grad: torch.Tensor):
    """``(swiglu_backward_torch(x, grad), swiglu_forward_torch(x))``: the gradient and the
    recomputed activation."""
    return swiglu_backward_torch(x, grad), swiglu_forward_torch(x)


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _gate_up_tile(x_ptr, N, FF, stride_x, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's [BLOCK_R, BLOCK_C] tile of ``x [N, 2F]``: (int64 row index [R, 1],
        columns [C], in-bounds mask [R, C], gate and up in fp32 [R, C])."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < N)[:, None] & (cols < FF)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x_off = rows64 * stride_x + cols[None, :]
        g = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + x_off + FF, mask=mask, other=0.0).to(tl.float32)
        return rows64, cols, mask, g, u

    @triton.jit
    def _tile_amax(v, mask):
        """``max |v|`` over the tile's in-bounds values (NaN counts as inf: the cast's scale is
        then 1, as from the torch amax, which is NaN there)."""
        a = tl.abs(v.to(tl.float32))
        a = tl.where(mask, tl.where(a != a, float("inf"), a), 0.0)
        return tl.max(tl.max(a, axis=1), axis=0)

    @triton.jit
    def _swiglu_fwd_kernel(x_ptr, out_ptr, amax_ptr, N, FF, stride_x, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr, AMAX: tl.constexpr):
        rows64, cols, mask, g, u = _gate_up_tile(x_ptr, N, FF, stride_x, BLOCK_R, BLOCK_C)
        act = (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows64 * FF + cols[None, :], act, mask=mask)
        if AMAX:  # of the values as stored
            tl.atomic_max(amax_ptr, _tile_amax(act, mask))

    @triton.jit
    def _swiglu_bwd_kernel(x_ptr, grad_ptr, dx_ptr, act_ptr, amax_ptr, N, FF, stride_x,
                           stride_g, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           STORE_ACT: tl.constexpr, AMAX: tl.constexpr):
        rows64, cols, mask, g, u = _gate_up_tile(x_ptr, N, FF, stride_x, BLOCK_R, BLOCK_C)
        dy = tl.load(grad_ptr + rows64 * stride_g + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        d_gate = dy * u * s * (1.0 + g * (1.0 - s))
        d_up = dy * g * s
        dx_off = rows64 * (2 * FF) + cols[None, :]
        d_gate, d_up = d_gate.to(dx_ptr.dtype.element_ty), d_up.to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + dx_off, d_gate, mask=mask)
        tl.store(dx_ptr + dx_off + FF, d_up, mask=mask)
        if AMAX:
            tl.atomic_max(amax_ptr, tl.maximum(_tile_amax(d_gate, mask),
                                               _tile_amax(d_up, mask)))
        if STORE_ACT:  # the forward's value: the same products in the same order
            act = g * s * u
            tl.store(act_ptr + rows64 * FF + cols[None, :], act.to(act_ptr.dtype.element_ty),
                     mask=mask)


def _grid(n: int, ff: int):
    block_c = min(1024, triton.next_power_of_2(max(ff, 1)))
    block_r = max(1, 4096 // block_c)
    return (triton.cdiv(n, block_r), triton.cdiv(ff, block_c)), block_r, block_c


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Row stride is free (fc1 output may be a column slice); columns must be unit-stride.
    return t if t.stride(-1) == 1 else t.contiguous()


def _amax_arg(amax: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if amax is None:
        return like
    if amax.dtype != torch.float32 or amax.numel() != 1 or not amax.is_contiguous():
        raise ValueError(f"swiglu amax must be a one-element contiguous fp32 tensor; got "
                         f"{tuple(amax.shape)} {amax.dtype}")
    return amax


def swiglu_forward_triton(x: torch.Tensor, out: torch.Tensor | None = None,
                          amax: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`swiglu_forward_torch` (one fused pass; ``out`` contiguous)."""
    ff = _check(x)
    x = _rows_contiguous(x)
    if out is None:
        out = torch.empty(x.shape[0], ff, dtype=x.dtype, device=x.device)
    elif out.shape != (x.shape[0], ff) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"swiglu out must be a contiguous [{x.shape[0]}, {ff}] {x.dtype} "
                         f"tensor; got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    grid, block_r, block_c = _grid(x.shape[0], ff)
    _swiglu_fwd_kernel[grid](x, out, _amax_arg(amax, out), x.shape[0], ff, x.stride(0),
                             BLOCK_R=block_r, BLOCK_C=block_c, AMAX=amax is not None)
    return out


def _backward_triton(x: torch.Tensor, grad: torch.Tensor, with_act: bool,
                     amax: torch.Tensor | None = None):
    ff = _check(x)
    x, grad = _rows_contiguous(x), _rows_contiguous(grad)
    dx = torch.empty(x.shape[0], 2 * ff, dtype=x.dtype, device=x.device)
    act = torch.empty(x.shape[0], ff, dtype=x.dtype, device=x.device) if with_act else None
    if dx.numel():
        grid, block_r, block_c = _grid(x.shape[0], ff)
        _swiglu_bwd_kernel[grid](x, grad, dx, dx if act is None else act,
                                 _amax_arg(amax, dx), x.shape[0], ff, x.stride(0),
                                 grad.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                                 STORE_ACT=with_act, AMAX=amax is not None)
    return dx, act


def swiglu_backward_triton(x: torch.Tensor, grad: torch.Tensor,
                           amax: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`swiglu_backward_torch` (one fused pass)."""
    return _backward_triton(x, grad, False, amax)[0]


def swiglu_backward_and_forward_triton(x: torch.Tensor, grad: torch.Tensor):
    """Same contract as :func:`swiglu_backward_and_forward_torch`: one pass that also writes
    the activation (bit-identical to :func:`swiglu_forward_triton`'s), for one extra write
    instead of a separate forward pass."""
    return _backward_triton(x, grad, True)


# ---- autograd + registry -------------------------------------------------------------------


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` saving only the input ``x [N, 2F]``."""

    @staticmethod
    def forward(ctx, x, fns):
        forward_fn, ctx.backward_fn = fns[:2]
        ctx.save_for_backward(x)
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.backward_fn(x, grad), None


def _check_triton(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 2 * 24, device=device, generator=gen).to(dtype)
        g = torch.randn(37, 24, device=device, generator=gen).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert_close_rel(swiglu_forward_triton(x), swiglu_forward_torch(x.double()), tol, "fwd")
        dx, act = swiglu_backward_and_forward_triton(x, g)
        assert_close_rel(dx, swiglu_backward_torch(x.double(), g.double()), tol, "bwd")
        assert_close_rel(act, swiglu_forward_torch(x.double()), tol, "bwd activation")
        amax = torch.zeros(2, device=device)  # the fwd's and the bwd's
        out = swiglu_forward_triton(x, amax=amax[:1])
        dx = swiglu_backward_triton(x, g, amax=amax[1:])
        want = torch.stack([tensor_amax(out), tensor_amax(dx)])
        assert torch.equal(amax, want), f"amax {amax.tolist()} != {want.tolist()}"


def _triton_available(device=None, dtype=None, **ctx):
    return checked_triton_available("swiglu", _check_triton, device, dtype)


SWIGLU = BackendRegistry("moe_swiglu", flag="--no-bias-swiglu-fusion")
# Each backend's fn: (forward, backward, backward_and_forward).
SWIGLU.register(Backend("triton", _triton_available,
                        (swiglu_forward_triton, swiglu_backward_triton,
                         swiglu_backward_and_forward_triton),
                        description="one fused pass forward and backward"))
SWIGLU.register(Backend("torch", always_available,
                        (swiglu_forward_torch, swiglu_backward_torch,
                         swiglu_backward_and_forward_torch),
                        description="unfused ops, silu recomputed in backward"))


@functools.cache
def select_swiglu(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> Backend:
    """The SwiGLU backend for ``device``/``dtype`` (resolved once per process, logged once)."""
    return SWIGLU.select(requested, device=device, dtype=dtype)


def swiglu_into(x: torch.Tensor, out: torch.Tensor, requested: str = "auto") -> None:
    """The forward of :func:`swiglu` (same backend, same values), no autograd, written into
    ``out [N, F]`` (contiguous): the recompute of a discarded activation."""
    _check(x)
    select_swiglu(x.device, x.dtype, requested).fn[0](x, out=out)


def swiglu(x: torch.Tensor, requested: str = "auto") -> torch.Tensor:
    """``silu(x[:, :F]) * x[:, F:]`` for ``x [N, 2F]`` -> ``[N, F]``, through the backend
    ``requested`` (a name or ``"auto"``); autograd saves only ``x``."""
    _check(x)
    backend = select_swiglu(x.device, x.dtype, requested)
    return _SwiGLU.apply(x, backend.fn)
