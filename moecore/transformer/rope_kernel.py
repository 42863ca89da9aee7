"""Fused RoPE on CUDA: one Triton kernel forward, one backward, beside the torch reference
:func:`moecore.transformer.rope.apply_rotary_pos_emb_torch`.

The reference runs ~8 elementwise kernels per call (upcast, two products, negate, concatenate,
add, downcast; as many again in backward) over ``[S, B, heads, d]`` fp32 temporaries; at the
e2e benchmark's size that was ~0.4 ms per layer forward on an H200. Here each program rotates
all heads of one ``(s, b)`` position: ``x`` is read once (any strides with a unit last stride,
e.g. the q/k views of the fused QKV output), the output written once.

Numerics: the same fp32 operations in the same order as the reference, each rounded to fp32
(FMA contraction is turned off at launch: the PTX has only ``mul.rn``/``add.rn``), then one cast
to ``x.dtype``. Under the Triton interpreter fp32 results equal the reference bit for bit; on an
H200 (2026-11-30) they were not bit-identical (rounding-level differences; cause not
established), so the check at first use on each device (:func:`use_fused`) accepts relative
error <= 1e-6 (fp32) / 8e-3 (16-bit) and otherwise falls back to the reference.

Backward (``y1 = x1 c1 - x2 s1``, ``y2 = x2 c2 + x1 s2`` on the two halves of the rotated
channels): ``dx1 = g1 c1 + g2 s2``, ``dx2 = g2 c2 - g1 s1``; pass-through channels copy ``g``.
"""

from __future__ import annotations

import os

import torch

from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available

if HAVE_TRITON:  # optional: CPU installs and CI run the torch reference
    import triton
    import triton.language as tl

if HAVE_TRITON:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, B, H, sx_s, sx_b, sx_g, sx_j, so_s, so_b,
                     so_g, so_j, sc_s, sc_b, D: tl.constexpr, HALF: tl.constexpr,
                     HPG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr):
        pid = tl.program_id(0)
        s = pid // B
        b = pid % B
        h = tl.arange(0, BLOCK_H)
        i = tl.arange(0, BLOCK_HALF)
        mask = (h[:, None] < H) & (i[None, :] < HALF)
        g, j = h // HPG, h % HPG  # head h is head j of group g
        x_row = (x_ptr + s.to(tl.int64) * sx_s + b.to(tl.int64) * sx_b
                 + (g * sx_g + j * sx_j)[:, None])
        out_row = (out_ptr + s.to(tl.int64) * so_s + b.to(tl.int64) * so_b
                   + (g * so_g + j * so_j)[:, None])
        x1 = tl.load(x_row + i[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
        c_row = s.to(tl.int64) * sc_s + b.to(tl.int64) * sc_b
        cmask = i < HALF
        c1 = tl.load(cos_ptr + c_row + i, mask=cmask, other=0.0)[None, :]
        c2 = tl.load(cos_ptr + c_row + HALF + i, mask=cmask, other=0.0)[None, :]
        s1 = tl.load(sin_ptr + c_row + i, mask=cmask, other=0.0)[None, :]
        s2 = tl.load(sin_ptr + c_row + HALF + i, mask=cmask, other=0.0)[None, :]
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 + -(x1 * s1)
        else:
            y1 = x1 * c1 + -x2 * s1
            y2 = x2 * c2 + x1 * s2
        dt = out_ptr.dtype.element_ty
        tl.store(out_row + i[None, :], y1.to(dt), mask=mask)
        tl.store(out_row + HALF + i[None, :], y2.to(dt), mask=mask)
        if BLOCK_PASS > 0:
            p_ = tl.arange(0, BLOCK_PASS)
            pmask = (h[:, None] < H) & (p_[None, :] < D - 2 * HALF)
            p = tl.load(x_row + 2 * HALF + p_[None, :], mask=pmask, other=0.0)
            tl.store(out_row + 2 * HALF + p_[None, :], p.to(dt), mask=pmask)


def _grouped_heads(t: torch.Tensor) -> torch.Tensor:
    """``[S, B, H, D]`` as ``[S, B, H, 1, D]``; ``[S, B, G, J, D]`` as is."""
    return t.unsqueeze(3) if t.dim() == 4 else t


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backward: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate ``x`` ``[S, B, H, D]`` (or ``[S, B, G, J, D]``: head ``g * J + j``, e.g. the query
    heads of each group in a fused QKV output) by ``cos``/``sin`` ``[S, B or 1, 1, R]`` fp32
    (``R`` even, ``<= D``); ``backward=True`` applies the transposed rotation (the gradient).
    Writes into ``out`` (``x``'s shape, any strides with a unit last stride) when given, else
    into a new contiguous ``[S, B, H or G * J, D]`` tensor of ``x``'s dtype; returns it."""
    x5 = _grouped_heads(x)
    S, B, G, J, D = x5.shape
    R = cos.shape[-1]
    if x5.stride(-1) != 1:
        x5 = x5.contiguous()
    cos = cos.float().reshape(cos.shape[0], cos.shape[1], R).contiguous()
    sin = sin.float().reshape(sin.shape[0], sin.shape[1], R).contiguous()
    if out is None:
        out = torch.empty((S, B, G * J, D), dtype=x.dtype, device=x.device)
        out5 = out.view(S, B, G, J, D)
    else:
        out5 = _grouped_heads(out)
        if out5.shape != x5.shape or out5.stride(-1) != 1:
            raise ValueError(f"rope out {tuple(out.shape)} (strides {out.stride()}) must have "
                             f"x's shape {tuple(x.shape)} and a unit last stride")
    if out5.numel() == 0:
        return out
    _launch(x5, out5, cos, sin, cos.stride(0), cos.stride(1) if cos.shape[1] > 1 else 0,
            R // 2, backward)
    return out


def _launch(x5, out5, cos, sin, sc_s: int, sc_b: int, half: int, backward: bool) -> None:
    """One program per ``(s, b)`` of ``x5``/``out5 [S, B, G, J, D]``; channels ``>= 2 * half``
    pass through unrotated (``half == 0``: a plain copy; cos/sin are then never read)."""
    S, B, G, J, D = x5.shape
    _rope_kernel[(S * B,)](
        x5, cos, sin, out5, B, G * J, *x5.stride()[:4], *out5.stride()[:4], sc_s, sc_b, D=D,
        HALF=half, HPG=J, BLOCK_H=triton.next_power_of_2(G * J),
        BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        BLOCK_PASS=triton.next_power_of_2(D - 2 * half) if D > 2 * half else 0,
        BACKWARD=backward, enable_fp_fusion=False)


def copy_heads(src: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(src)`` for ``[S, B, H, D]`` tensors with unit last strides, through the RoPE
    kernel with no rotated channels. torch's ``copy_`` into a strided slot (the ``v`` part of a
    QKV gradient) runs its generic strided kernel: 90 us for 64 MiB on an H200 (2026-12-01)."""
    if src.shape != out.shape or src.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"copy_heads needs equal shapes with unit last strides; got "
                         f"{tuple(src.shape)} {src.stride()} and {tuple(out.shape)} {out.stride()}")
    if out.numel():
        _launch(src.unsqueeze(3), out.unsqueeze(3), src, src, 0, 0, 0, False)


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_launch(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rope_launch(grad, cos, sin, backward=True), None, None


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Differentiable fused rotation of ``x`` (see :func:`rope_launch`); no grad to cos/sin."""
    return _FusedRope.apply(x, cos, sin)


def _qkv_views(t: torch.Tensor, heads_per_group: int, head_dim: int):
    """``t [S, B, G, (J + 2) * D]`` -> views ``q [S, B, G, J, D]``, ``k, v [S, B, G, D]``."""
    J, D = heads_per_group, head_dim
    return (t[..., : J * D].unflatten(3, (J, D)), t[..., J * D: (J + 1) * D],
            t[..., (J + 1) * D:])


class _FusedQKVRope(torch.autograd.Function):
    """Split a fused QKV output and rotate q and k; backward writes one [.., (J + 2) * D] grad.

    Unfused, ``torch.split`` + two rotations leave three gradients that autograd concatenates
    (one extra read and write of the whole QKV gradient per layer); here the two backward
    rotations write straight into their slots of the QKV gradient and ``dv`` is copied into its
    slot by the same kernel (:func:`copy_heads`), so that ``cat`` is gone. ``v`` is returned as
    a view of ``mixed`` (no copy).
    """

    @staticmethod
    def forward(ctx, mixed, cos, sin, heads_per_group, head_dim):
        q, k, v = _qkv_views(mixed, heads_per_group, head_dim)
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype, ctx.jd = mixed.shape, mixed.dtype, (heads_per_group, head_dim)
        return rope_launch(q, cos, sin), rope_launch(k, cos, sin), v  # q [S, B, G*J, D]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=cos.device)
        q_slot, k_slot, v_slot = _qkv_views(grad, *ctx.jd)
        if dq is not None:
            dq = dq.unflatten(2, q_slot.shape[2:4])  # [S, B, G*J, D] -> [S, B, G, J, D]
        for g, slot in ((dq, q_slot), (dk, k_slot)):
            if g is None:
                slot.zero_()
            else:
                rope_launch(g, cos, sin, backward=True, out=slot)
        if dv is None:
            v_slot.zero_()
        else:
            copy_heads(dv if dv.stride(-1) == 1 else dv.contiguous(), v_slot)
        return grad, None, None, None, None


def fused_qkv_rope(mixed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   heads_per_group: int, head_dim: int):
    """``mixed [S, B, G, (J + 2) * D]`` (per query group: J query heads, k, v) ->
    ``q [S, B, G * J, D]`` and ``k [S, B, G, D]`` rotated by ``cos``/``sin``
    ``[S, B or 1, 1, R]``, and ``v [S, B, G, D]`` (a view of ``mixed``); differentiable in
    ``mixed``. The same values as splitting and calling :func:`fused_rope` on q and k."""
    return _FusedQKVRope.apply(mixed, cos, sin, heads_per_group, head_dim)


def _check(device: torch.device) -> None:
    """Forward and backward agree with the reference (to rounding) on a small random case."""

    g = torch.Generator(device=device).manual_seed(0)
    with torch.enable_grad():  # the first call may come from an eval / no-grad forward
        _check_cases(device, g)


def _check_cases(device: torch.device, g: torch.Generator) -> None:
    from moecore.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb_torch

    for dtype, rot in ((torch.bfloat16, 1.0), (torch.float32, 0.5)):
        freqs = RotaryEmbedding(32, rot).to(device)(5, torch.randint(
            0, 64, (3, 5), device=device, generator=g))
        x = torch.randn(5, 3, 4, 32, device=device, dtype=dtype, generator=g)
        gy = torch.randn(5, 3, 4, 32, device=device, dtype=dtype, generator=g)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ref = apply_rotary_pos_emb_torch(xs[0], freqs)
        out = fused_rope(xs[1], freqs.cos(), freqs.sin())
        ref.backward(gy)
        out.backward(gy)
        # Rounding-level differences only (see the module docstring).
        tol = 1e-6 if dtype == torch.float32 else 8e-3
        for got, want, what in ((out, ref, "output"), (xs[1].grad, xs[0].grad, "grad")):
            assert_close_rel(got, want, tol, f"fused RoPE {what} ({dtype})")


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """``(ok, reason)`` for the fused kernel on ``device`` with ``dtype``."""
    if os.environ.get("MOECORE_ROPE_BACKEND", "auto") == "torch":
        return False, "MOECORE_ROPE_BACKEND=torch"
    return checked_triton_available("RoPE", _check, device, dtype)


_LOGGED: set = set()


def use_fused(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether :func:`apply_rotary_pos_emb` runs the fused kernel for ``t``/``freqs``."""
    if (t.dim() != 4 or freqs.dim() != 4 or freqs.shape[-1] % 2 or t.shape[-1] > 4096
            or freqs.shape[0] != t.shape[0] or freqs.shape[1] not in (1, t.shape[1])
            or freqs.shape[2] != 1):
        return False
    ok, reason = availability(t.device, t.dtype)
    key = (t.device, t.dtype, ok)
    if key not in _LOGGED:
        _LOGGED.add(key)
        import logging

        logging.getLogger("moecore").info("rope backend: %s on %s %s%s",
                                          "triton" if ok else "torch", t.device, t.dtype,
                                          "" if ok else f" ({reason})")
    return ok
