"""SwiGLU on the fc1 output: ``act = silu(x[:, :F]) * x[:, F:]`` and its backward, optionally
times a per-row weight (the routing probability: ``act = silu(gate) * up * probs[:, None]``).

``swiglu(x [N, 2F], probs [N] | None) -> [N, F]`` is an autograd function that saves only ``x``
(which the fc1 GEMM's output already is) and ``probs``, and recomputes ``silu`` in backward, so
no ``silu(gate)`` [N, F] intermediate is kept. With ``probs`` the backward also gives
``d probs [N] = sum_f grad * silu(gate) * up`` (fp32) from the values in hand: the MoE experts
weight their rows here instead of in the combine, whose backward then needs no [N, H] rows.
Two implementations behind the ``moe_swiglu`` registry:

- ``torch``: the unfused ops (``F.silu(gate) * up``, then ``* probs`` in fp32 and one cast back;
  backward ``grad * up`` through ``silu_backward`` and ``grad * silu(gate)``, then one ``cat``);
  bitwise what autograd computes for the unfused expression. Any device and dtype; the
  reference.
- ``triton``: one pass each way on CUDA (fp32, bf16, fp16), math in fp32: forward reads ``x``
  once and writes ``act``; backward reads ``x`` and ``grad`` once and writes the [N, 2F] grad.
  In 16-bit dtypes it rounds once where the unfused ops round two or three times.

Both directions can also record the amax (``max |value|``, fp32) of what they write, as the
next FP8 cast needs (``amax=`` a one-element fp32 tensor, raised in place): the Triton kernels
take it from the values in hand, so that cast needs no extra read of the [N, F] / [N, 2F] tensor.

Each backend's functions: ``forward(x, out=None, amax=None, probs=None) -> act``,
``backward(x, grad, amax=None, probs=None) -> (dx, dprobs | None)``,
``backward_and_forward(x, grad, probs=None) -> (dx, act, dprobs | None)`` (the gradient and the
recomputed activation in one pass).
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


def _check_probs(x: torch.Tensor, probs: torch.Tensor | None) -> None:
    if probs is not None and (probs.shape != x.shape[:1] or probs.dtype not in (
            torch.float32, torch.float64)):
        raise ValueError(f"swiglu probs must be fp32 (or fp64) [{x.shape[0]}], one per row; "
                         f"got {tuple(probs.shape)} {probs.dtype}")


def swiglu_forward_torch(x: torch.Tensor, out: torch.Tensor | None = None,
                         amax: torch.Tensor | None = None,
                         probs: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, 2F] (``[gate | up]``) -> ``silu(gate) * up`` [N, F] (times ``probs [N]`` in fp32
    when given; written into ``out`` when given; its amax into ``amax [1]`` when given)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    kw = {} if out is None else {"out": out}
    if probs is None:
        act = torch.mul(F.silu(gate), up, **kw)
    else:
        weighted = F.silu(gate) * up * probs.unsqueeze(-1)  # promoted to fp32
        act = weighted.to(x.dtype) if out is None else out.copy_(weighted)
    _raise_amax(amax, act)
    return act


def swiglu_backward_torch(x: torch.Tensor, grad: torch.Tensor, amax: torch.Tensor | None = None,
                          probs: torch.Tensor | None = None):
    """x [N, 2F], grad [N, F] -> ``(grad_x [N, 2F] (x's dtype; its amax into amax [1]),
    grad_probs [N] fp32 or None)``."""
    gate, up = torch.chunk(x, 2, dim=-1)
    dprobs = None
    if probs is not None:
        dprobs = (grad.float() * (F.silu(gate) * up).float()).sum(-1)
        grad = (grad * probs.unsqueeze(-1)).to(x.dtype)  # promoted to fp32, then cast
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    dx = torch.cat([grad_gate, grad * F.silu(gate)], dim=-1)
    _raise_amax(amax, dx)
    return dx, dprobs


def swiglu_backward_and_forward_torch(x: torch.Tensor, grad: torch.Tensor,
                                      probs: torch.Tensor | None = None):
    """``(*swiglu_backward_torch(x, grad, probs=probs), swiglu_forward_torch(x, probs=probs))``
    as ``(dx, act, dprobs)``: the gradient and the recomputed activation."""
    dx, dprobs = swiglu_backward_torch(x, grad, probs=probs)
    return dx, swiglu_forward_torch(x, probs=probs), dprobs


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
    def _row_probs(probs_ptr, rows64, N):
        """``probs`` of the tile's rows (``rows64 [R, 1]``) as a [R, 1] fp32 column."""
        return tl.load(probs_ptr + rows64, mask=rows64 < N, other=0.0)

    @triton.jit
    def _swiglu_fwd_kernel(x_ptr, probs_ptr, out_ptr, amax_ptr, N, FF, stride_x,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, AMAX: tl.constexpr,
                           WEIGHTED: tl.constexpr):
        rows64, cols, mask, g, u = _gate_up_tile(x_ptr, N, FF, stride_x, BLOCK_R, BLOCK_C)
        act = g * tl.sigmoid(g) * u
        if WEIGHTED:
            act = act * _row_probs(probs_ptr, rows64, N)
        act = act.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows64 * FF + cols[None, :], act, mask=mask)
        if AMAX:  # of the values as stored
            tl.atomic_max(amax_ptr, _tile_amax(act, mask))

    @triton.jit
    def _swiglu_bwd_kernel(x_ptr, grad_ptr, probs_ptr, dx_ptr, act_ptr, amax_ptr, part_ptr, N,
                           FF, stride_x, stride_g, NCB, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr, STORE_ACT: tl.constexpr, AMAX: tl.constexpr,
                           WEIGHTED: tl.constexpr):
        rows64, cols, mask, g, u = _gate_up_tile(x_ptr, N, FF, stride_x, BLOCK_R, BLOCK_C)
        dy = tl.load(grad_ptr + rows64 * stride_g + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        if WEIGHTED:  # d probs: this column block's share of sum_f dy * silu(g) * u
            p = _row_probs(probs_ptr, rows64, N)
            part = tl.sum(tl.where(mask, dy * (g * s * u), 0.0), axis=1)
            tl.store(part_ptr + rows64.reshape([BLOCK_R]) * NCB + tl.program_id(1), part,
                     mask=rows64.reshape([BLOCK_R]) < N)
            dy = dy * p
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
            if WEIGHTED:
                act = act * p
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
                          amax: torch.Tensor | None = None,
                          probs: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`swiglu_forward_torch` (one fused pass; ``out`` contiguous)."""
    ff = _check(x)
    _check_probs(x, probs)
    x = _rows_contiguous(x)
    if out is None:
        out = torch.empty(x.shape[0], ff, dtype=x.dtype, device=x.device)
    elif out.shape != (x.shape[0], ff) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"swiglu out must be a contiguous [{x.shape[0]}, {ff}] {x.dtype} "
                         f"tensor; got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    grid, block_r, block_c = _grid(x.shape[0], ff)
    _swiglu_fwd_kernel[grid](x, out if probs is None else probs.float().contiguous(), out,
                             _amax_arg(amax, out), x.shape[0], ff, x.stride(0),
                             BLOCK_R=block_r, BLOCK_C=block_c, AMAX=amax is not None,
                             WEIGHTED=probs is not None)
    return out


def _backward_triton(x: torch.Tensor, grad: torch.Tensor, with_act: bool,
                     amax: torch.Tensor | None = None, probs: torch.Tensor | None = None):
    ff = _check(x)
    _check_probs(x, probs)
    x, grad = _rows_contiguous(x), _rows_contiguous(grad)
    n = x.shape[0]
    dx = torch.empty(n, 2 * ff, dtype=x.dtype, device=x.device)
    act = torch.empty(n, ff, dtype=x.dtype, device=x.device) if with_act else None
    dprobs = None if probs is None else torch.zeros(n, dtype=torch.float32, device=x.device)
    if dx.numel():
        grid, block_r, block_c = _grid(n, ff)
        part = dx if probs is None else torch.empty(n, grid[1], dtype=torch.float32,
                                                    device=x.device)
        _swiglu_bwd_kernel[grid](x, grad, dx if probs is None else probs.float().contiguous(), dx,
                                 dx if act is None else act, _amax_arg(amax, dx), part, n, ff,
                                 x.stride(0), grad.stride(0), grid[1], BLOCK_R=block_r,
                                 BLOCK_C=block_c, STORE_ACT=with_act, AMAX=amax is not None,
                                 WEIGHTED=probs is not None)
        if probs is not None:
            dprobs = part.sum(-1) if grid[1] > 1 else part.view(n)
    return dx, act, dprobs


def swiglu_backward_triton(x: torch.Tensor, grad: torch.Tensor,
                           amax: torch.Tensor | None = None, probs: torch.Tensor | None = None):
    """Same contract as :func:`swiglu_backward_torch` (one fused pass)."""
    dx, _, dprobs = _backward_triton(x, grad, False, amax, probs)
    return dx, dprobs


def swiglu_backward_and_forward_triton(x: torch.Tensor, grad: torch.Tensor,
                                       probs: torch.Tensor | None = None):
    """Same contract as :func:`swiglu_backward_and_forward_torch`: one pass that also writes
    the activation (bit-identical to :func:`swiglu_forward_triton`'s), for one extra write
    instead of a separate forward pass."""
    return _backward_triton(x, grad, True, probs=probs)


# ---- autograd + registry -------------------------------------------------------------------


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` (times ``probs``) saving only the input ``x [N, 2F]`` and ``probs``."""

    @staticmethod
    def forward(ctx, x, probs, fns):
        forward_fn, ctx.backward_fn = fns[:2]
        ctx.save_for_backward(x, probs)
        return forward_fn(x, probs=probs)

    @staticmethod
    def backward(ctx, grad):
        x, probs = ctx.saved_tensors
        dx, dprobs = ctx.backward_fn(x, grad, probs=probs)
        return dx, dprobs, None


def _check_triton(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 2 * 24, device=device, generator=gen).to(dtype)
        g = torch.randn(37, 24, device=device, generator=gen).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        probs = torch.rand(37, device=device, generator=gen)
        for p in (None, probs):
            pd = None if p is None else p.double()
            assert_close_rel(swiglu_forward_triton(x, probs=p),
                             swiglu_forward_torch(x.double(), probs=pd), tol, "fwd")
            dx, act, dp = swiglu_backward_and_forward_triton(x, g, probs=p)
            dx_ref, dp_ref = swiglu_backward_torch(x.double(), g.double(), probs=pd)
            assert_close_rel(dx, dx_ref, tol, "bwd")
            assert_close_rel(act, swiglu_forward_torch(x.double(), probs=pd), tol,
                             "bwd activation")
            if p is not None:
                assert_close_rel(dp, dp_ref, tol, "probs gradient")
        amax = torch.zeros(2, device=device)  # the fwd's and the bwd's
        out = swiglu_forward_triton(x, amax=amax[:1])
        dx = swiglu_backward_triton(x, g, amax=amax[1:])[0]
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


def swiglu_into(x: torch.Tensor, out: torch.Tensor, requested: str = "auto",
                probs: torch.Tensor | None = None) -> None:
    """The forward of :func:`swiglu` (same backend, same values), no autograd, written into
    ``out [N, F]`` (contiguous): the recompute of a discarded activation."""
    _check(x)
    _check_probs(x, probs)
    select_swiglu(x.device, x.dtype, requested).fn[0](x, out=out, probs=probs)


def swiglu(x: torch.Tensor, requested: str = "auto",
           probs: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[:, :F]) * x[:, F:]`` (times ``probs [N]`` fp32, one weight per row, when given)
    for ``x [N, 2F]`` -> ``[N, F]``, through the backend ``requested`` (a name or ``"auto"``);
    autograd saves only ``x`` and ``probs`` and gives ``probs`` its gradient."""
    _check(x)
    _check_probs(x, probs)
    backend = select_swiglu(x.device, x.dtype, requested)
    return _SwiGLU.apply(x, probs, backend.fn)
