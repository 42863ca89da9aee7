"""Grouped blockwise FP8 GEMMs in Triton (DeepSeek-V3's scaling), for the experts.

- :func:`grouped_block_mm` ``(a [T, K] tile, b [E, N, K] block, tokens_per_expert [E]) ->
  [T, N]``: row block ``e`` of ``a`` times ``b[e]^T`` (forward and dgrad);
- :func:`grouped_tile_wgrad` ``(a [N, P] tile, b [K, P] tile, ends [E]) -> [E, N, K]``:
  ``a[:, cols e] @ b[:, cols e]^T``, expert ``e`` owning columns ``ends[e-1]:ends[e]`` (multiples
  of 128, from :func:`~moecore.kernels.fp8_quant.group_row_map` at 128), the wgrad, whose
  contraction runs over tokens.

``tile``: one fp32 scale per 1x128 tile along the contraction dim; ``block``: one per 128x128
block (:mod:`moecore.kernels.fp8_quant`). Each 128-deep slice of the contraction is one FP8
tensor-core dot, scaled by its tiles' factors and added to an fp32 accumulator (DeepSeek-V3's
promotion every 128 elements). One launch per GEMM, all experts at once, no host sync: each
program of the row grid (sized for the worst case, ``ceil(T / BM) + E`` row tiles) finds its
expert from the counts. These replace one ``torch._scaled_mm`` per expert from Python (the
``torch`` backend's blockwise grouped path). On CUDA the tile sizes are autotuned per shape; the
Triton interpreter runs the first configuration, so the CPU tests check the same kernels.
"""

from __future__ import annotations

import torch

from moecore.kernels import HAVE_TRITON
from moecore.kernels.fp8_quant import BLOCK, Fp8Tensor

if HAVE_TRITON:
    import triton
    import triton.language as tl

_MM_CONFIGS = [dict(BM=128, num_warps=8, num_stages=3), dict(BM=64, num_warps=4, num_stages=4),
               dict(BM=128, num_warps=4, num_stages=4), dict(BM=64, num_warps=4, num_stages=3)]
_WGRAD_CONFIGS = [dict(BM=128, BN=128, num_warps=8, num_stages=3),
                  dict(BM=64, BN=128, num_warps=4, num_stages=4),
                  dict(BM=128, BN=64, num_warps=4, num_stages=4)]

if HAVE_TRITON:

    @triton.jit
    def _grouped_block_mm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, counts_ptr, N,
                                 E: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
                                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # This row tile's expert g (-1 past the last) and rows [r0, r1): expert e's rows are a
        # contiguous block of ceil(count / BM) tiles.
        pid_m = tl.program_id(0)
        g = -1
        r0 = 0
        r1 = 0
        tile0 = 0
        row0 = 0
        for e in range(E):
            c = tl.load(counts_ptr + e)
            t = (c + BM - 1) // BM
            hit = (pid_m >= tile0) & (pid_m < tile0 + t)
            g = tl.where(hit, e, g)
            r0 = tl.where(hit, row0 + (pid_m - tile0) * BM, r0)
            r1 = tl.where(hit, row0 + c, r1)
            tile0 += t
            row0 += c
        if g >= 0:
            rm = r0 + tl.arange(0, BM)
            m_ok = rm < r1
            rm64 = rm.to(tl.int64)
            rn = tl.program_id(1) * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            a_rows = a_ptr + rm64[:, None] * K + rk[None, :]
            b_cols = b_ptr + g.to(tl.int64) * N * K + rn.to(tl.int64)[None, :] * K + rk[:, None]
            sb_row = sb_ptr + (g.to(tl.int64) * (N // BN) + tl.program_id(1)) * KB
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for kb in range(KB):  # KB = K / BK slices of the contraction
                a = tl.load(a_rows + kb * BK, mask=m_ok[:, None], other=0.0)
                b = tl.load(b_cols + kb * BK)
                sa = tl.load(sa_ptr + rm64 * KB + kb, mask=m_ok, other=0.0)
                sb = tl.load(sb_row + kb)
                acc += tl.dot(a, b) * (sa[:, None] * sb)
            tl.store(c_ptr + rm64[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=m_ok[:, None])

    @triton.jit
    def _grouped_tile_wgrad_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, ends_ptr, N, K, P,
                                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        e = tl.program_id(0)
        stop = tl.load(ends_ptr + e).to(tl.int32)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(2) * BN + tl.arange(0, BN)
        m_ok, n_ok = rm < N, rn < K
        rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
        rk = tl.arange(0, BK)
        pb_n = P // BK
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for pb in range(start // BK, stop // BK):
            a = tl.load(a_ptr + rm64[:, None] * P + pb * BK + rk[None, :], mask=m_ok[:, None],
                        other=0.0)
            b = tl.load(b_ptr + rn64[None, :] * P + pb * BK + rk[:, None], mask=n_ok[None, :],
                        other=0.0)
            sa = tl.load(sa_ptr + rm64 * pb_n + pb, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + rn64 * pb_n + pb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        out = c_ptr + e.to(tl.int64) * N * K + rm64[:, None] * K + rn64[None, :]
        tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _grouped_block_mm_tuned = triton.autotune(
        [triton.Config({"BM": c["BM"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
         for c in _MM_CONFIGS], key=["N", "K"])(_grouped_block_mm_kernel)
    _grouped_tile_wgrad_tuned = triton.autotune(
        [triton.Config({"BM": c["BM"], "BN": c["BN"]}, num_warps=c["num_warps"],
                       num_stages=c["num_stages"]) for c in _WGRAD_CONFIGS],
        key=["N", "K"])(_grouped_tile_wgrad_kernel)


def _check_layouts(a: Fp8Tensor, b: Fp8Tensor, want: tuple[str, str], what: str) -> None:
    if (a.layout, b.layout) != want:
        raise ValueError(f"{what} takes {want[0]} x {want[1]} scaled operands, got "
                         f"{a.layout} x {b.layout}")


def _launch(kernel, tuned, configs: list[dict], grid, device: torch.device, *args, **const):
    """Autotuned on CUDA; the first configuration elsewhere (the Triton interpreter)."""
    if device.type == "cuda":
        tuned[grid](*args, **const)
        return
    cfg = dict(configs[0])
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    kernel[grid(cfg)](*args, **const, **cfg, **launch)


def grouped_block_mm(a: Fp8Tensor, b: Fp8Tensor, tokens_per_expert: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """``a [T, K]`` (1x128 tiles) grouped by expert times ``b [E, N, K]^T`` (128x128 blocks)
    -> ``[T, N]`` in ``out_dtype``; ``K`` and ``N`` multiples of 128."""
    _check_layouts(a, b, ("tile", "block"), "grouped_block_mm")
    (t, k), (e, n, _) = a.shape, b.shape
    out = torch.empty(t, n, dtype=out_dtype, device=a.data.device)
    if t == 0:
        return out
    counts = tokens_per_expert.to(a.data.device, torch.int32)
    args = (a.data, a.scale_inv.contiguous(), b.data.contiguous(), b.scale_inv.contiguous(),
            out, counts, n)
    _launch(_grouped_block_mm_kernel, _grouped_block_mm_tuned, _MM_CONFIGS,
            lambda m: (triton.cdiv(t, m["BM"]) + e, n // BLOCK), a.data.device, *args,
            E=e, K=k, KB=k // BLOCK, BN=BLOCK, BK=BLOCK)
    return out


def grouped_tile_wgrad(a: Fp8Tensor, b: Fp8Tensor, ends: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """``a [N, P]``, ``b [K, P]`` (1x128 tiles along ``P``, expert ``e`` owning columns
    ``ends[e-1]:ends[e]``, multiples of 128) -> ``[E, N, K]``, ``a_e @ b_e^T`` per expert."""
    _check_layouts(a, b, ("tile", "tile"), "grouped_tile_wgrad")
    (n, p), k, e = a.shape, b.shape[0], ends.shape[0]
    out = torch.empty(e, n, k, dtype=out_dtype, device=a.data.device)
    if e == 0:
        return out
    args = (a.data.contiguous(), a.scale_inv.contiguous(), b.data.contiguous(),
            b.scale_inv.contiguous(), out, ends.to(a.data.device, torch.int32), n, k, p)
    _launch(_grouped_tile_wgrad_kernel, _grouped_tile_wgrad_tuned, _WGRAD_CONFIGS,
            lambda m: (e, triton.cdiv(n, m["BM"]), triton.cdiv(k, m["BN"])), a.data.device,
            *args, BK=BLOCK)
    return out
