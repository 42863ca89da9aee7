"""RMSNorm over the last dim: ``y = (x * rsqrt(mean(x^2) + eps)) * weight`` and its backward.

``rms_norm(x [..., H], weight [H], eps) -> y [..., H]`` (x's dtype) is an autograd function that
saves ``x``, ``weight`` and the per-row ``rstd`` (fp32 [N], N = x.numel() // H), not ``y``. Math
is in fp32; ``weight`` may be fp32 while ``x`` is 16-bit (as ``F.rms_norm``: ``y`` and ``dx`` in
x's dtype, ``dweight`` in weight's). Backward, with ``x_hat = x * rstd`` per row::

    dx = rstd * (dy * w - x_hat * mean(dy * w * x_hat))      dweight = sum_rows(dy * x_hat)

``add_rms_norm(residual, out, weight, eps) -> (hidden, y)`` fuses the residual add in front of
the norm: ``hidden = residual + out`` (residual's dtype, summed in fp32 and rounded once, as
torch's ``residual + out``) and ``y = rms_norm(hidden, weight, eps)``. It saves ``hidden``,
``weight`` and ``rstd``; backward sums the two consumers' grads of ``hidden`` in fp32 with one
rounding: ``d_residual = d_out = dx(dy) + d_hidden``.

Two implementations; the ``rms_norm`` registry of :mod:`moecore.kernels.norm` runs the Triton
one as its backend ``triton``:

- ``torch`` (``rms_norm_forward_torch`` / ``rms_norm_backward_torch``, and
  ``add_rms_norm_forward_torch``): the formulas above in plain torch ops, any device; the
  reference (``rms_norm_torch`` / ``add_rms_norm_torch`` run it through the same autograd
  functions).
- ``triton``: one pass each way on CUDA (fp32, bf16, fp16), ``H <= MAX_H``; every row is one
  block of ``next_power_of_2(H)`` columns. Forward: each program normalises a few rows (>= 4096
  elements; for ``add_rms_norm`` it adds ``out`` first and stores ``hidden``). Backward: about
  ``4 * SMs`` programs (``2 * SMs`` for H > 2048) each loop over a contiguous slab of rows,
  write ``dx`` (plus ``d_hidden`` for ``add_rms_norm``: a constexpr flag of the same kernel) and
  keep a running ``dy * x_hat`` sum; their fp32 [programs, H] partials are then summed by torch,
  so ``dweight`` costs one small extra read.

Kernel times on one H200, bf16 (torch 2.11 ``F.rms_norm`` -> this): [16384, 1024] forward 24 ->
17.5 us, backward 94 -> 40 us; [16384, 4096] 79 -> 67 and 218 -> 121 us; [8192, 8192] 101 -> 68
and 254 -> 116 us. At H = 32768 the backward spilled (531 us against torch's 258), hence MAX_H.
"""

from __future__ import annotations

import functools

import torch

from moecore.kernels import HAVE_TRITON, TRITON_DTYPES, assert_close_rel, checked_triton_available

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_H = 16384  # widest row the Triton kernels take (one block per row; wider ones spill)


def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    """``t [..., H]`` as ``[N, H]`` with unit column stride (a view when it can be)."""
    t = t.reshape(-1, h)
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- torch reference -----------------------------------------------------------------------


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def rms_norm_forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [N, H], weight [H] -> (y [N, H] in x's dtype, rstd [N] fp32 (fp64 for fp64 x))."""
    xf = x.to(_math_dtype(x))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return ((xf * rstd[:, None]) * weight.to(xf.dtype)).to(x.dtype), rstd


def add_rms_norm_forward_torch(residual: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                               eps: float):
    """residual, out [N, H] (one dtype), weight [H] -> (hidden = residual + out [N, H], y [N, H],
    rstd [N]): the sum in fp32 (fp64 for fp64) rounded once, then :func:`rms_norm_forward_torch`
    of that rounded ``hidden``."""
    ct = _math_dtype(residual)
    hidden = (residual.to(ct) + out.to(ct)).to(residual.dtype)
    return (hidden, *rms_norm_forward_torch(hidden, weight, eps))


def rms_norm_backward_torch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            rstd: torch.Tensor, need_dx: bool = True, need_dw: bool = True,
                            dx_add: torch.Tensor | None = None):
    """dy, x [N, H], weight [H], rstd [N] -> (dx [N, H] x's dtype or None, dweight [H] weight's
    dtype or None). ``dx_add`` [N, H] (optional) is added to ``dx`` before its one rounding."""
    ct = _math_dtype(x)
    dyf, x_hat = dy.to(ct), x.to(ct) * rstd[:, None].to(ct)
    dx = dw = None
    if need_dx:
        wdy = dyf * weight.to(ct)
        dx = rstd[:, None] * (wdy - x_hat * (wdy * x_hat).mean(-1, keepdim=True))
        dx = (dx if dx_add is None else dx + dx_add.to(ct)).to(x.dtype)
    if need_dw:
        dw = (dyf * x_hat).sum(0).to(weight.dtype)
    return dx, dw


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, add_ptr, hidden_ptr, w_ptr, y_ptr, rstd_ptr, N, H, stride_x,
                        stride_add, eps, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                        ADD: tl.constexpr):
        # ADD: normalise hidden = x + add (fp32 sum, rounded once to x's dtype), also stored.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)
        rmask, cmask = rows < N, cols < H
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
        if ADD:
            a = tl.load(add_ptr + rows64 * stride_add + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(hidden_ptr.dtype.element_ty)
            tl.store(hidden_ptr + rows64 * H + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
        y = (x * rstd[:, None]) * w[None, :]
        tl.store(y_ptr + rows64 * H + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, dx_add_ptr, N, H,
                        stride_dy, stride_x, stride_dx_add, ROWS_PER_PROGRAM: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, STORE_DX: tl.constexpr,
                        STORE_DW: tl.constexpr, ADD_DX: tl.constexpr):
        # ADD_DX: dx_add [N, H] is added to dx in fp32 before its one rounding.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < H
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_R):  # ROWS_PER_PROGRAM % BLOCK_R == 0
            rows = pid * ROWS_PER_PROGRAM + r0 + tl.arange(0, BLOCK_R)
            rmask = rows < N
            mask = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
            x_hat = x.to(tl.float32) * rstd  # 0 on masked rows and columns
            if STORE_DW:
                acc += dy * x_hat
            if STORE_DX:
                wdy = dy * w[None, :]
                c = tl.sum(wdy * x_hat, axis=1) / H
                dx = rstd * (wdy - x_hat * c[:, None])
                if ADD_DX:
                    dx += tl.load(dx_add_ptr + rows64 * stride_dx_add + cols[None, :], mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows64 * H + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=mask)
        if STORE_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=cmask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    h = x.shape[-1] if x.dim() else 0
    if weight.shape != (h,):
        raise ValueError(f"rms_norm needs x [..., H] and weight [H]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    return h


def _check_add(residual: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> int:
    """H of ``add_rms_norm``'s ``residual [..., H]``, ``out`` (same shape and dtype), ``weight``."""
    if out.shape != residual.shape or out.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm needs residual and out of one shape and dtype; got "
                         f"{tuple(residual.shape)} {residual.dtype} and {tuple(out.shape)} "
                         f"{out.dtype}")
    return _check(residual, weight)


def _check_triton(x: torch.Tensor, weight: torch.Tensor):
    """(BLOCK_R, BLOCK_H, num_warps) for the Triton kernels, or a clear error."""
    if not HAVE_TRITON:
        raise RuntimeError("the Triton rms_norm kernels need Triton (pip install triton)")
    h = x.shape[1]
    if not 0 < h <= MAX_H:
        raise ValueError(f"the Triton rms_norm kernels take 1 <= H <= {MAX_H}, not {h}")
    for t in (x, weight):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"the Triton rms_norm kernels take {TRITON_DTYPES}, not {t.dtype}")
    block_h = triton.next_power_of_2(h)
    # Tuned on an H200 (bf16, H = 1024..8192): a block of >= 4096 elements and two rows once
    # rows are wide, about 32 elements a thread.
    block_r = 1 if block_h > 8192 else max(2, 4096 // block_h)
    return block_r, block_h, min(16, max(4, block_r * block_h // 1024))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter (CPU tensors)
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    add: torch.Tensor | None = None, y: torch.Tensor | None = None):
    """One launch of ``_rms_fwd_kernel`` on x [N, H] (and ``add`` [N, H], x's dtype: then it
    normalises ``hidden = x + add``) -> (hidden [N, H] or None, y [N, H], rstd [N] fp32);
    ``y`` is written into when given (contiguous [N, H], x's dtype)."""
    block_r, block_h, warps = _check_triton(x, weight)
    n, h = x.shape
    if add is not None:
        _check_add(x, add, weight)
    if y is None:
        y = torch.empty(n, h, dtype=x.dtype, device=x.device)
    elif y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError(f"rms_norm out must be a contiguous {tuple(x.shape)} {x.dtype} tensor; "
                         f"got {tuple(y.shape)} {y.dtype}")
    hidden = None if add is None else torch.empty_like(y)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        a = x if add is None else add  # without ADD: never-read / never-written stand-ins
        _rms_fwd_kernel[(triton.cdiv(n, block_r),)](
            x, a, y if hidden is None else hidden, weight.contiguous(), y, rstd, n, h,
            x.stride(0), a.stride(0), eps, BLOCK_R=block_r, BLOCK_H=block_h,
            ADD=add is not None, num_warps=warps)
    return hidden, y, rstd


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Same contract as :func:`rms_norm_forward_torch` (rstd always fp32), one fused pass."""
    return _forward_triton(x, weight, eps)[1:]


def add_rms_norm_forward_triton(residual: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                                eps: float):
    """Same contract as :func:`add_rms_norm_forward_torch` (rstd always fp32): one pass that
    reads ``residual`` and ``out`` once and writes ``hidden``, ``y`` and ``rstd``."""
    return _forward_triton(residual, weight, eps, out)


def _backward_tile(block_h: int, block_r: int, warps: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps) of the backward: 8192-element row blocks and 4 warps up to
    ``BLOCK_H`` 4096 (swept on an H200 with ``benchmarks/small_kernels.py``: 88 -> 83 us at
    32768 x 1024, 211 -> 159 us at 16384 x 4096), else the forward's."""
    return (8192 // block_h, 4) if block_h <= 4096 else (block_r, warps)


def rms_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             rstd: torch.Tensor, need_dx: bool = True, need_dw: bool = True,
                             dx_add: torch.Tensor | None = None, num_programs: int | None = None):
    """Same contract as :func:`rms_norm_backward_torch`, one fused pass plus the [programs, H]
    partial-sum reduction (``dx_add`` [N, H], read in that pass); ``num_programs`` (default
    ``2 * SMs``) is rounded to whole power-of-two slabs of rows per program."""
    block_r, block_h, warps = _check_triton(x, weight)
    n, h = x.shape
    dx = torch.empty(n, h, dtype=x.dtype, device=x.device) if need_dx else None
    if n == 0 or not (need_dx or need_dw):
        return dx, torch.zeros_like(weight) if need_dw else None
    block_r, warps = _backward_tile(block_h, block_r, warps)
    # Two programs per SM: their fp32 partials cost programs * H * 8 bytes of traffic.
    programs = min(n, num_programs or 2 * _sm_count(x.device))
    # Whole row blocks per program, a power of two of them: few compiles of the (constexpr) loop
    # bound, and (programs / 2, programs] programs (a runtime bound would do on GPU, but the
    # interpreter cannot loop to one under numpy >= 2.4).
    rows_per_program = block_r * triton.next_power_of_2(triton.cdiv(n, block_r * programs))
    programs = triton.cdiv(n, rows_per_program)
    partial = torch.empty(programs, h, dtype=torch.float32, device=x.device) if need_dw else None
    add = need_dx and dx_add is not None
    if add and dx_add.shape != (n, h):
        raise ValueError(f"dx_add must be [N, H] = {(n, h)}, not {tuple(dx_add.shape)}")
    dxa = dx_add if add else dy  # never read without ADD_DX
    _rms_bwd_kernel[(programs,)](  # an output not asked for gets a never-written stand-in
        dy, x, weight.contiguous(), rstd, x if dx is None else dx,
        rstd if partial is None else partial, dxa, n, h, dy.stride(0), x.stride(0),
        dxa.stride(0), ROWS_PER_PROGRAM=rows_per_program, BLOCK_R=block_r, BLOCK_H=block_h,
        STORE_DX=need_dx, STORE_DW=need_dw, ADD_DX=add, num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype) if need_dw else None


# ---- autograd + self-check -----------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """RMSNorm of ``x [..., H]`` saving ``x``, ``weight`` and ``rstd [N]``."""

    @staticmethod
    def forward(ctx, x, weight, eps, fns):
        forward_fn, ctx.backward_fn = fns
        h = _check(x, weight)
        x2 = _rows(x, h)
        y, rstd = forward_fn(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = ctx.backward_fn(_rows(dy, x2.shape[1]), x2, weight, rstd, need_dx, need_dw)
        return (dx.view(ctx.x_shape) if need_dx else None), (dw if need_dw else None), None, None


class _AddRMSNorm(torch.autograd.Function):
    """``hidden = residual + out`` and RMSNorm of it (``[..., H]`` each), saving ``hidden``,
    ``weight`` and ``rstd [N]``; ``residual`` and ``out`` get one grad, ``dx + d_hidden``."""

    @staticmethod
    def forward(ctx, residual, out, weight, eps, fns):
        forward_fn, ctx.backward_fn = fns
        h = _check_add(residual, out, weight)
        hidden, y, rstd = forward_fn(_rows(residual, h), _rows(out, h), weight, eps)
        ctx.save_for_backward(hidden, weight, rstd)
        ctx.set_materialize_grads(False)  # d_hidden (or dy) is None when it is not used
        ctx.x_shape = residual.shape
        return hidden.view(residual.shape), y.view(residual.shape)

    @staticmethod
    def backward(ctx, d_hidden, dy):
        hidden, weight, rstd = ctx.saved_tensors
        need_res, need_out, need_dw = ctx.needs_input_grad[:3]
        if dy is None:  # y unused: d_hidden passes through, weight gets no grad
            dx, dw = d_hidden, None
        else:
            h = hidden.shape[1]
            d_add = None if d_hidden is None else _rows(d_hidden, h)
            dx, dw = ctx.backward_fn(_rows(dy, h), hidden, weight, rstd, need_res or need_out,
                                     need_dw, dx_add=d_add)
            dx = None if dx is None else dx.view(ctx.x_shape)
        return (dx if need_res else None), (dx if need_out else None), dw, None, None


TORCH_FNS = (rms_norm_forward_torch, rms_norm_backward_torch)
TRITON_FNS = (rms_norm_forward_triton, rms_norm_backward_triton)
ADD_TORCH_FNS = (add_rms_norm_forward_torch, rms_norm_backward_torch)
ADD_TRITON_FNS = (add_rms_norm_forward_triton, rms_norm_backward_triton)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The torch reference: ``x [..., H]``, ``weight [H]`` -> ``y [..., H]`` (x's dtype)."""
    return _RMSNorm.apply(x, weight, eps, TORCH_FNS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The Triton kernels: ``x [..., H]`` (``H <= MAX_H``), ``weight [H]`` -> ``y [..., H]``
    (x's dtype). CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``); no availability check,
    see :func:`triton_available`."""
    return _RMSNorm.apply(x, weight, eps, TRITON_FNS)


def rms_norm_into(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """:func:`rms_norm`'s forward values written into ``out`` (``x``'s shape, contiguous), no
    autograd: the recompute of a freed norm output (``--recompute-modules layernorm``)."""
    h = _check(x, weight)
    _forward_triton(_rows(x, h), weight, eps, y=out.view(-1, h))


def add_rms_norm_torch(residual: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`add_rms_norm`: ``residual, out [..., H]`` (one shape and
    dtype), ``weight [H]`` -> ``(hidden = residual + out, y = rms_norm(hidden))``, ``[..., H]``."""
    return _AddRMSNorm.apply(residual, out, weight, eps, ADD_TORCH_FNS)


def add_rms_norm(residual: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: ``residual, out [..., H]`` (one shape and dtype, ``H <= MAX_H``),
    ``weight [H]`` -> ``(hidden = residual + out, y = rms_norm(hidden, weight, eps))``, both
    ``[..., H]`` in residual's dtype; one kernel forward, one backward (both inputs get
    ``dx + d_hidden``). Same devices and checks as :func:`rms_norm`."""
    return _AddRMSNorm.apply(residual, out, weight, eps, ADD_TRITON_FNS)


def _self_check(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x, dy = (torch.randn(67, 300, device=device, generator=gen).to(dtype) for _ in range(2))
        w = (1 + torch.randn(300, device=device, generator=gen)).to(dtype)
        y, rstd = rms_norm_forward_triton(x, w, 1e-5)
        y_ref, rstd_ref = rms_norm_forward_torch(x.double(), w.double(), 1e-5)
        assert_close_rel(y, y_ref, tol, "forward")
        assert_close_rel(rstd, rstd_ref, 1e-5, "rstd")
        got = rms_norm_backward_triton(dy, x, w, rstd, num_programs=5)  # several rows each
        want = rms_norm_backward_torch(dy.double(), x.double(), w.double(), rstd_ref)
        for a, b, what in zip(got, want, ("dx", "dweight")):
            assert_close_rel(a, b, tol, what)
        # add_rms_norm: hidden = x + dy, y of that hidden, dx + d_hidden.
        hidden, y, _ = add_rms_norm_forward_triton(x, dy, w, 1e-5)
        assert_close_rel(hidden, x.double() + dy.double(), tol, "add forward hidden")
        assert_close_rel(y, rms_norm_forward_torch(hidden.double(), w.double(), 1e-5)[0], tol,
                         "add forward")
        dx, _ = rms_norm_backward_triton(dy, x, w, rstd, need_dw=False, dx_add=y)
        assert_close_rel(dx, want[0] + y.double(), tol, "add backward")


def triton_available(device=None, dtype=None, hidden=None, **ctx) -> tuple[bool, str]:
    """``(ok, reason)`` of the Triton backend for a ``device`` (``torch.device`` or type str),
    ``dtype`` and ``hidden`` size H: CUDA, Triton, H <= ``MAX_H``, self-check passed there."""
    if hidden is not None and not 0 < hidden <= MAX_H:
        return False, f"the Triton rms_norm kernels take 1 <= H <= {MAX_H}, not {hidden}"
    return checked_triton_available("rms_norm", _self_check, device, dtype)
