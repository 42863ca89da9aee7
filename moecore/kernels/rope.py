"""RoPE (Megatron's non-interleaved ``rotate_half``): the torch reference, a fused Triton kernel
(one launch forward, one backward) and the ``rope`` registry that chooses between them.

``apply_rotary_pos_emb_torch(t [S, B, H, D], freqs [S, B or 1, 1, R]) -> [S, B, H, D]`` is the
reference: ~8 elementwise kernels per call (upcast, two products, negate, concatenate, add,
downcast; as many again in backward) over ``[S, B, heads, d]`` fp32 temporaries, ~0.4 ms per
layer forward at ``benchmarks/e2e.py``'s size on an H200. The kernel rotates all heads of one
``(s, b)`` position per program: ``x`` is read once (any strides with a unit last stride, e.g.
the q/k views of the fused QKV output), the output written once.

Numerics: the same fp32 operations in the same order as the reference, each rounded to fp32
(FMA contraction is turned off at launch: the PTX has only ``mul.rn``/``add.rn``), then one cast
to ``x.dtype``. Under the Triton interpreter fp32 results equal the reference bit for bit; on an
H200 they are not bit-identical (rounding-level differences; cause not established), so the
self-check at first use on each device accepts relative error <= 1e-6 (fp32) / 8e-3 (16-bit)
and otherwise the ``triton`` backend is unavailable there.

Backward (``y1 = x1 c1 - x2 s1``, ``y2 = x2 c2 + x1 s2`` on the two halves of the rotated
channels): ``dx1 = g1 c1 + g2 s2``, ``dx2 = g2 c2 - g1 s1``; pass-through channels copy ``g``.

Registry ``ROPE`` (request from ``apply_rope_fusion``, ``--no-rope-fusion``): ``triton`` (CUDA,
fp32/bf16/fp16, self-check passed) and ``torch``; :func:`select_rope` takes the reference for
shapes the kernel does not take.
"""

from __future__ import annotations

import torch

from moecore.backends import AUTO, Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available

if HAVE_TRITON:  # optional: CPU installs and CI run the torch reference
    import triton
    import triton.language as tl


# ---- torch reference -----------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(freqs.cos(), freqs.sin())``, computed once per angle tensor: every layer's q and k of
    one forward rotate by the same ``freqs``, so the pair is cached on that tensor."""
    cached = getattr(freqs, "_moecore_cos_sin", None)
    if cached is not None and cached[0] == freqs._version:
        return cached[1], cached[2]
    cos, sin = freqs.cos(), freqs.sin()
    if not freqs.requires_grad:  # a cache must not cut a graph that reaches freqs
        freqs._moecore_cos_sin = (freqs._version, cos, sin)
    return cos, sin


def apply_rotary_pos_emb_torch(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The reference rotation of ``t [S, B, H, D]`` by ``freqs [S, B or 1, 1, R]``: fp32 torch
    ops, first ``R`` channels rotated, the rest passed through, cast back to ``t.dtype``."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = rope_cos_sin(freqs)
    rot = t_rot.float() * cos + _rotate_half(t_rot.float()) * sin
    rot = rot.to(t.dtype)
    if t_pass.shape[-1] == 0:
        return rot
    return torch.cat((rot, t_pass), dim=-1)


# ---- Triton kernel -------------------------------------------------------------------------

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
    QKV gradient) runs its generic strided kernel: 90 us for 64 MiB on an H200."""
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


def _check_freqs(rot_dim: int, position_ids: torch.Tensor) -> torch.Tensor:
    """Angles ``[S, B, 1, rot_dim]`` for ``position_ids [B, S]`` (base 10000), as
    ``RotaryEmbedding`` builds them."""
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64,
                                                device=position_ids.device) / rot_dim))).float()
    freqs = (position_ids.t().float()[..., None] * inv_freq)[:, :, None, :]
    return torch.cat((freqs, freqs), dim=-1)


def _check_cases(device: torch.device, g: torch.Generator) -> None:
    for dtype, rot in ((torch.bfloat16, 32), (torch.float32, 16)):
        freqs = _check_freqs(rot, torch.randint(0, 64, (3, 5), device=device, generator=g))
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


def fits(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel takes ``t [S, B, H, D]`` and ``freqs [S, B or 1, 1, R]`` (R even,
    D <= 4096, angles without grad)."""
    return (t.dim() == 4 and freqs.dim() == 4 and freqs.shape[-1] % 2 == 0
            and t.shape[-1] <= 4096 and freqs.shape[0] == t.shape[0]
            and freqs.shape[1] in (1, t.shape[1]) and freqs.shape[2] == 1
            and not freqs.requires_grad)


def rope_triton(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary_pos_emb_torch` through the fused kernel (for :func:`fits` shapes)."""
    cos, sin = rope_cos_sin(freqs)
    return fused_rope(t, cos, sin)


def _triton_available(device=None, dtype=None, **ctx) -> tuple[bool, str]:
    return checked_triton_available("RoPE", _check, device, dtype)


ROPE = BackendRegistry("rope", flag="--no-rope-fusion")
ROPE.register(Backend("triton", _triton_available, rope_triton,
                      description="one Triton kernel forward, one backward"))
ROPE.register(Backend("torch", always_available, apply_rotary_pos_emb_torch,
                      description="torch ops"))


def select_rope(t: torch.Tensor, freqs: torch.Tensor, requested: str = AUTO) -> Backend:
    """The ``rope`` backend for ``t``/``freqs`` (``torch`` for shapes the kernel does not
    take); resolved once per device, dtype and request."""
    if not fits(t, freqs):
        requested = "torch"
    return ROPE.resolve(requested, device=t.device, dtype=t.dtype)
