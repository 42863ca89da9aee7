"""FP8 GEMMs on :class:`~moecore.kernels.fp8_quant.Fp8Tensor` operands, contraction dim last.

Each backend of :data:`FP8_GEMM` is an :class:`Fp8Gemm` with

- ``mm(a [M, K], b [N, K], out_dtype) -> a @ b^T [M, N]``;
- ``grouped_mm(a [T, K], b [E, N, K], tokens_per_expert [E], out_dtype) -> [T, N]`` (row block
  ``e`` times ``b[e]^T``; ``tensor`` layout, one scale for ``a``, one per expert for ``b``, or
  blockwise: ``a`` in 1x128 tiles, ``b`` in 128x128 blocks);
- ``grouped_wgrad(dy_t [N, P], x_t [K, P], ends [E], out_dtype, fast_accum=False) -> [E, N, K]``
  (``dy_e^T @ x_e``; ``tensor`` layout, one scale each, or blockwise: 1x128 tiles along ``P``):
  the operands transposed, their rows re-laid by
  :func:`~moecore.kernels.fp8_quant.group_row_map` (expert ``e`` owns columns
  ``ends[e-1]:ends[e]``, at least 16 of them, 128-aligned for tiles, zeros past its tokens).

Backends:

- ``torch``: ``torch._scaled_mm`` (tensorwise; 1x128 x 128x128 and 1x128 x 1x128 blockwise
  scales, cuBLAS on sm90) and ``torch._scaled_grouped_mm`` (CUTLASS, sm90; E4M3 operands, bf16
  output; per-row scales carry our per-tensor/per-expert ones); blockwise grouped GEMMs as one
  ``_scaled_mm`` per expert (the counts come to the host). Needs CUDA compute capability >= 8.9;
  the probe runs each kind once per device at shapes with no degenerate dims.
- ``triton``: ``torch`` for dense GEMMs and tensorwise grouped ones; the blockwise grouped
  GEMMs run as one Triton kernel each (:mod:`moecore.kernels.fp8_block_gemm`) instead of one
  ``_scaled_mm`` per expert, without a host sync. ``auto`` picks it for blockwise experts (once
  its self-check against ``emulated`` passes on the device).
- ``emulated``: dequantise to fp32 and matmul. The documented CPU reference: the same FP8
  rounding of every operand as on the GPU, exact fp32 products, so the recipes' logic runs in CI.

``auto`` picks ``triton`` for blockwise experts and ``torch`` elsewhere, where they run; never
``emulated`` (that one must be asked for, with ``--fp8-gemm-backend emulated``, since it is
slower than bf16). The request is the config's
``fp8_gemm_backend``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moecore.backends import AUTO, Backend, BackendRegistry, always_available
from moecore.kernels import checked_triton_available
from moecore.kernels.fp8_block_gemm import grouped_block_mm, grouped_tile_wgrad
from moecore.kernels.fp8_quant import (
    BLOCK,
    Fp8Tensor,
    dequantize,
    group_row_map,
    pad_fp8,
    quantize_blocks,
    quantize_tensor,
    quantize_tiles,
    quantize_tiles_transposed,
    scale_from_amax,
    transpose,
)

FP8_GEMM = BackendRegistry("fp8_gemm", flag="--fp8-gemm-backend")
FP8_GEMM_BACKENDS = ("auto", "triton", "torch", "emulated")


@dataclass(frozen=True)
class Fp8Gemm:
    mm: callable
    grouped_mm: callable
    grouped_wgrad: callable


# --------------------------------------------------------------------------------------------
# emulated (reference)
# --------------------------------------------------------------------------------------------
def _emulated_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype, fast_accum=False):
    return (dequantize(a) @ dequantize(b).t()).to(out_dtype)


def _splits(tokens_per_expert) -> list[int]:
    return [int(c) for c in tokens_per_expert.tolist()]


def _emulated_grouped_mm(a: Fp8Tensor, b: Fp8Tensor, tokens_per_expert, out_dtype,
                         fast_accum=False):
    x, w = dequantize(a), dequantize(b)
    rows = torch.split(x, _splits(tokens_per_expert))
    out = [r @ w[e].t() for e, r in enumerate(rows)]
    return torch.cat(out).to(out_dtype) if out else x.new_zeros(0, w.shape[1], dtype=out_dtype)


def _group_bounds(ends: torch.Tensor) -> list[tuple[int, int]]:
    stops = [int(c) for c in ends.tolist()]
    return list(zip([0, *stops[:-1]], stops))


def _emulated_grouped_wgrad(dy_t: Fp8Tensor, x_t: Fp8Tensor, ends, out_dtype,
                            fast_accum=False):
    g, x = dequantize(dy_t), dequantize(x_t)
    return torch.stack([g[:, a:b] @ x[:, a:b].t() for a, b in _group_bounds(ends)]).to(out_dtype)


EMULATED = Fp8Gemm(_emulated_mm, _emulated_grouped_mm, _emulated_grouped_wgrad)


# --------------------------------------------------------------------------------------------
# torch._scaled_mm / torch._scaled_grouped_mm
# --------------------------------------------------------------------------------------------
def _outer_major(t: torch.Tensor) -> torch.Tensor:
    """``t [R, C]`` laid out column by column (stride ``(1, R)``), as cuBLAS reads 1x128 tile
    scales of the left operand."""
    return t.t().contiguous().t()


def _block_scales_rhs(scale_inv: torch.Tensor) -> torch.Tensor:
    """128x128 block scales ``[N/128, K/128]`` of ``b [N, K]`` as ``torch._scaled_mm`` wants
    them for ``mat2 = b^T``: ``[K/128, N/128]`` with stride ``(1, K/128)``."""
    return scale_inv.contiguous().t()


def _pad_k(t: Fp8Tensor, k_blocks: int) -> Fp8Tensor:
    """``t`` (``tile`` or ``block`` layout, ``[R, K]``) with zeros appended along K up to
    ``k_blocks`` 128-wide blocks (scale 1 there): zeros add nothing to the product."""
    pad = k_blocks * 128 - t.data.shape[-1]
    data = pad_fp8(t.data, (0, pad))
    scale = torch.nn.functional.pad(t.scale_inv, (0, k_blocks - t.scale_inv.shape[-1]),
                                    value=1.0)
    return Fp8Tensor(data, scale, t.layout)


def _mm_scales(a: Fp8Tensor, b: Fp8Tensor):
    """Scales in ``torch._scaled_mm``'s forms: scalars; ``scale_a [M, K/128]`` outer-dim-major
    with ``scale_b [K/128, N/128]`` (1x128 x 128x128) or ``[K/128, N]`` (1x128 x 1x128)."""
    if a.layout == "tensor" and b.layout == "tensor":
        return a.scale_inv.float().reshape(()), b.scale_inv.float().reshape(())
    if a.layout != "tile" or b.layout not in ("tile", "block"):
        raise ValueError(f"fp8 mm: unsupported scale layouts {a.layout} x {b.layout}")
    sb = _block_scales_rhs(b.scale_inv) if b.layout == "block" else b.scale_inv.t().contiguous()
    return _outer_major(a.scale_inv), sb


def _pad_tile_rows(a: Fp8Tensor, multiple: int = 16) -> Fp8Tensor:
    """A tiled ``a [M, K]`` with zero rows (scale 1) appended up to a multiple of ``multiple``
    rows, as the blockwise cuBLAS kernels want."""
    pad = -a.data.shape[0] % multiple
    if not pad:
        return a
    data = pad_fp8(a.data, (0, 0, 0, pad))
    scale = torch.nn.functional.pad(a.scale_inv, (0, 0, 0, pad), value=1.0)
    return Fp8Tensor(data, scale, a.layout)


def _torch_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype, fast_accum=False):
    m = a.data.shape[0]
    if a.layout == "tile":
        a = _pad_tile_rows(a)
    k_blocks = a.data.shape[-1] // 128
    if b.layout == "block" and k_blocks % 4:
        # cuBLAS reads 128x128 block scales with a leading dim padded to 4 blocks (16 bytes),
        # which PyTorch 2.11's stride check does not ask for: wrong sums on H100 otherwise.
        a, b = _pad_k(a, -(-k_blocks // 4) * 4), _pad_k(b, -(-k_blocks // 4) * 4)
    sa, sb = _mm_scales(a, b)
    out = torch._scaled_mm(a.data, b.data.t(), sa, sb, out_dtype=out_dtype,
                           use_fast_accum=fast_accum and a.layout == "tensor")
    return out[:m]


def _offsets(tokens_per_expert, device) -> torch.Tensor:
    return torch.cumsum(tokens_per_expert.to(torch.int64), 0).to(device, torch.int32)


def _torch_blockwise_grouped_mm(a: Fp8Tensor, b: Fp8Tensor, tokens_per_expert, out_dtype):
    """One blockwise ``_scaled_mm`` per expert (tiled ``a``, blocked ``b``; the counts come to
    the host)."""
    outs, start = [], 0
    for e, n in enumerate(_splits(tokens_per_expert)):
        if n:
            rows = Fp8Tensor(a.data[start:start + n], a.scale_inv[start:start + n], a.layout)
            outs.append(_torch_mm(rows, Fp8Tensor(b.data[e], b.scale_inv[e], b.layout),
                                  out_dtype))
        start += n
    if not outs:
        return a.data.new_zeros(0, b.shape[1], dtype=out_dtype)
    return torch.cat(outs)


def _torch_blockwise_grouped_wgrad(dy_t: Fp8Tensor, x_t: Fp8Tensor, ends, out_dtype):
    """One blockwise ``_scaled_mm`` per expert over its columns (1x128 tiles on both sides)."""
    def cols(t: Fp8Tensor, a: int, b: int) -> Fp8Tensor:
        return Fp8Tensor(t.data[:, a:b].contiguous(),
                         t.scale_inv[:, a // BLOCK:b // BLOCK].contiguous(), t.layout)

    return torch.stack([_torch_mm(cols(dy_t, a, b), cols(x_t, a, b), out_dtype)
                        for a, b in _group_bounds(ends)])


def _torch_grouped_mm(a: Fp8Tensor, b: Fp8Tensor, tokens_per_expert, out_dtype,
                      fast_accum=False):
    if a.layout != "tensor":
        return _torch_blockwise_grouped_mm(a, b, tokens_per_expert, out_dtype)
    t, (e, n, _) = a.shape[0], b.shape
    sa = a.scale_inv.float().reshape(1).expand(t).contiguous()
    sb = b.scale_inv.float().reshape(e, 1).expand(e, n).contiguous()
    out = torch._scaled_grouped_mm(a.data, b.data.transpose(-2, -1), sa, sb,
                                   offs=_offsets(tokens_per_expert, a.data.device),
                                   out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return out.to(out_dtype)


def _torch_grouped_wgrad(dy_t: Fp8Tensor, x_t: Fp8Tensor, ends, out_dtype, fast_accum=False):
    if dy_t.layout != "tensor":
        return _torch_blockwise_grouped_wgrad(dy_t, x_t, ends, out_dtype)
    (n, _), k, e = dy_t.shape, x_t.shape[0], ends.shape[0]
    sa = dy_t.scale_inv.float().reshape(1).expand(e * n).contiguous()
    sb = x_t.scale_inv.float().reshape(1).expand(e * k).contiguous()
    # Every group spans >= 16 columns (zeros for an expert without tokens), so the kernel
    # writes every expert's block.
    out = torch._scaled_grouped_mm(dy_t.data, x_t.data.t(), sa, sb, offs=ends,
                                   out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return out.to(out_dtype)


TORCH = Fp8Gemm(_torch_mm, _torch_grouped_mm, _torch_grouped_wgrad)


def _probe_blockwise(device) -> None:
    """Blockwise GEMMs at shapes with no size-1 scale dims (K/128 = 3, rows not a multiple of
    16), checked against the emulated reference: a layout the kernel misreads is refused."""
    dt = torch.float8_e4m3fn
    x, w = torch.randn(200, 384, device=device), torch.randn(256, 384, device=device)
    for qb in (quantize_blocks(w, dt), quantize_tiles(w, dt)):
        qa = quantize_tiles(x, dt)
        got, ref = _torch_mm(qa, qb, torch.float32), _emulated_mm(qa, qb, torch.float32)
        err = ((got - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"blockwise {qb.layout} GEMM result off by {err:.3g} (relative)")


@functools.cache
def _probe(device: torch.device, what: str) -> str:
    """Run a tiny FP8 GEMM of kind ``what`` on ``device``; the error text, empty when it works."""
    try:
        dt = torch.float8_e4m3fn
        x = torch.randn(200, 256, device=device)
        if what == "tensorwise":
            q = quantize_tensor(x, scale_from_amax(x.abs().amax(), dt), dt)
            w = torch.randn(384, 256, device=device)
            _torch_mm(q, quantize_tensor(w, scale_from_amax(w.abs().amax(), dt), dt),
                      torch.bfloat16)
        elif what == "blockwise":
            _probe_blockwise(device)
        else:
            q = quantize_tensor(x, scale_from_amax(x.abs().amax(), dt), dt)
            w = quantize_tensor(torch.randn(3, 128, 256, device=device),
                                torch.ones(3, device=device), dt)
            counts = torch.tensor([50, 0, 150], device=device)  # groups not multiples of 16
            _torch_grouped_mm(q, w, counts, torch.bfloat16)
            dy = quantize_tensor(torch.randn(200, 128, device=device),
                                 torch.ones((), device=device), dt)
            rows, ends = group_row_map(counts, 200, device)
            dy_t, q_t = transpose(dy, rows), transpose(q, rows)
            got = _torch_grouped_wgrad(dy_t, q_t, ends, torch.float32)
            ref = _emulated_grouped_wgrad(dy_t, q_t, ends, torch.float32)
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise RuntimeError(f"grouped FP8 wgrad off by {err:.3g} (relative)")
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run here"
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return ""


def _torch_available(device=None, recipe: str = "tensorwise", grouped: bool = False,
                     **_) -> tuple[bool, str]:
    device = torch.device(device or "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, ("FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 (Ada/Hopper); "
                       "on CPU only --fp8-gemm-backend emulated (a slow reference) runs")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"FP8 GEMMs need compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"PyTorch {torch.__version__} has no torch._scaled_mm"
    kinds = ["blockwise" if recipe == "blockwise" else "tensorwise"]
    if grouped and recipe != "blockwise":
        if not hasattr(torch, "_scaled_grouped_mm"):
            return False, f"PyTorch {torch.__version__} has no torch._scaled_grouped_mm"
        kinds.append("grouped")
    for kind in kinds:
        err = _probe(device, kind)
        if err:
            return False, (f"torch's {kind} FP8 GEMM fails on this GPU (compute capability "
                           f"{cap[0]}.{cap[1]}, PyTorch {torch.__version__}): {err}")
    return True, ""


def _triton_grouped_mm(a: Fp8Tensor, b: Fp8Tensor, tokens_per_expert, out_dtype,
                       fast_accum=False):
    if a.layout == "tensor":
        return _torch_grouped_mm(a, b, tokens_per_expert, out_dtype, fast_accum)
    return grouped_block_mm(a, b, tokens_per_expert, out_dtype)


def _triton_grouped_wgrad(dy_t: Fp8Tensor, x_t: Fp8Tensor, ends, out_dtype, fast_accum=False):
    if dy_t.layout == "tensor":
        return _torch_grouped_wgrad(dy_t, x_t, ends, out_dtype, fast_accum)
    return grouped_tile_wgrad(dy_t, x_t, ends, out_dtype)


TRITON = Fp8Gemm(_torch_mm, _triton_grouped_mm, _triton_grouped_wgrad)


def check_block_kernels(device) -> None:
    """The Triton blockwise grouped GEMMs against the emulated reference at shapes with an
    empty expert, a group smaller than a row tile and one of several tiles, hybrid operands
    (raises ``AssertionError``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    counts = torch.tensor([70, 0, 150, 1, 35], device=device)
    t = int(counts.sum())
    x = torch.randn(t, 256, device=device, generator=gen).bfloat16()
    w = torch.randn(5, 384, 256, device=device, generator=gen)
    dy = torch.randn(t, 384, device=device, generator=gen).bfloat16()
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    for a_dtype in (e4, e5):
        a, b = quantize_tiles(x, a_dtype), quantize_blocks(w, e4)
        got = grouped_block_mm(a, b, counts, torch.float32)
        ref = _emulated_grouped_mm(a, b, counts, torch.float32)
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-3, f"grouped blockwise GEMM ({a_dtype}) off by {err:.3g}"
    rows, ends = group_row_map(counts, t, device, BLOCK)
    a, b = quantize_tiles_transposed(dy, rows, e5), quantize_tiles_transposed(x, rows, e4)
    got = grouped_tile_wgrad(a, b, ends, torch.float32)
    ref = _emulated_grouped_wgrad(a, b, ends, torch.float32)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-3 and got[1].abs().sum() == 0, f"grouped blockwise wgrad off by {err:.3g}"


def _triton_gemm_available(device=None, recipe: str = "tensorwise", grouped: bool = False,
                           **ctx) -> tuple[bool, str]:
    ok, reason = _torch_available(device, recipe, grouped, **ctx)
    if not ok:
        return ok, reason
    return checked_triton_available("fp8_block_gemm", check_block_kernels, device)


FP8_GEMM.register(Backend(
    "triton", _triton_gemm_available, TRITON,
    auto_ok=lambda recipe="tensorwise", grouped=False, **_: recipe == "blockwise" and grouped,
    description="torch's FP8 GEMMs, and for blockwise experts one Triton grouped GEMM each "
                "(no per-expert loop)"))
FP8_GEMM.register(Backend("torch", _torch_available, TORCH,
                          description="torch._scaled_mm / torch._scaled_grouped_mm"))
FP8_GEMM.register(Backend("emulated", always_available, EMULATED,
                          auto_ok=lambda **_: False,
                          description="dequantise + fp32 matmul (CPU reference)"))


def select_fp8_gemm(requested: str = AUTO, device=None, recipe: str = "tensorwise",
                    grouped: bool = False, log: bool = True) -> Backend:
    """Resolve an ``fp8_gemm_backend`` request for ``device`` and ``recipe``; raises
    ``BackendUnavailableError`` with the reason (no CUDA, compute capability < 8.9, ...)."""
    return FP8_GEMM.select(requested, log=log, device=torch.device(device or "cpu"),
                           recipe=recipe, grouped=grouped)
