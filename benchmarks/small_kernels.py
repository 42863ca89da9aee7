"""Time small memory-bound kernels of the training step against the torch ops they replace,
and sweep the tiles of two backward kernels, on one GPU in one run.

    python benchmarks/small_kernels.py            # copies, scans, and the tile sweeps
    python benchmarks/small_kernels.py --no-sweep

- ``copy_heads``: dv into the v slot of a QKV gradient (``rope.copy_heads``) vs
  ``Tensor.copy_``, from a contiguous and a ``[B, H, S, D]`` source (S 2048, B 16, 16 heads of
  64, bf16).
- ``expert_positions``: the fused permute's per-expert running counts (chunked Triton scan) vs
  ``torch.cumsum`` along the tokens, at ``--positions`` (tokens x experts).
Both are timed as GPU time of 20 calls in one CUDA graph (:func:`timing.graph_ms`).
- ``--sweep``: router gating backward (dx, dw) tiles and RMSNorm backward (with the residual
  gradient) row blocks / warps / programs, timed from the host (CUDA events around one call,
  median of 30); the first rows of each list are the fastest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import graph_ms, median_ms  # noqa: E402

from moecore.kernels import (  # noqa: E402
    permute,
    rmsnorm,
    rope,  # noqa: E402
    router_gating,
)


def copies() -> None:
    grad = torch.empty(2048, 16, 16, 192, device="cuda", dtype=torch.bfloat16)
    slot = grad[..., 128:]
    sources = {"contiguous": torch.randn(2048, 16, 16, 64, device="cuda", dtype=torch.bfloat16),
               "[B, H, S, D]": torch.randn(16, 16, 2048, 64, device="cuda",
                                           dtype=torch.bfloat16).permute(2, 0, 1, 3)}
    for name, src in sources.items():
        rope.copy_heads(src, slot)
        assert torch.equal(slot, src)
        t = graph_ms(lambda s=src: slot.copy_(s)) * 1e3
        k = graph_ms(lambda s=src: rope.copy_heads(s, slot)) * 1e3
        print(f"dv -> v slot, {name} source: copy_ {t:.1f} us, copy_heads {k:.1f} us")


def positions(shapes: str) -> None:
    for shape in filter(None, shapes.split(",")):
        t, e = map(int, shape.split("x"))
        mask = (torch.rand(t, e, device="cuda") < 2 / e).to(torch.uint8)
        want = torch.cumsum(mask.T.contiguous(), 1, dtype=torch.int32)
        assert torch.equal(permute.expert_positions(mask), want)
        ref = graph_ms(lambda m=mask: torch.cumsum(m.T.contiguous(), 1, dtype=torch.int32))
        got = graph_ms(lambda m=mask: permute.expert_positions(m))
        print(f"expert positions {t} x {e}: torch {ref * 1e3:.1f} us, Triton {got * 1e3:.1f} us")


def _fastest(label: str, timed: list[tuple[float, object]], current) -> None:
    timed.sort(key=lambda r: r[0])
    now = [f"{ms * 1e3:.1f}" for ms, cfg in timed if cfg == current]
    print(f"{label}: current {current} {now[0] if now else '-'} us; fastest "
          + ", ".join(f"{cfg} {ms * 1e3:.1f} us" for ms, cfg in timed[:4]))


def sweep_gating(t: int, h: int, e: int) -> None:
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, h, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(t, e, device="cuda")
    tiles = [(bt, bh, nw) for bt in (32, 64, 128) for bh in (64, 128, 256) for nw in (4, 8)]
    saved = router_gating.DX_TILE, router_gating.DW_TILE, router_gating.DW_TILE_FEW_EXPERTS
    for part, attrs in (("dx", ("DX_TILE",)), ("dw", ("DW_TILE", "DW_TILE_FEW_EXPERTS"))):
        timed = []
        current = getattr(router_gating, attrs[-1] if e <= 16 else attrs[0])
        for tile in tiles:
            for a in attrs:
                setattr(router_gating, a, tile)
            call = (lambda dx_only=part == "dx": router_gating.gating_backward_triton(
                x, w, g, need_dx=dx_only, need_dw=not dx_only))
            try:
                timed.append((median_ms(call, "cuda", 3, 30), tile))
            except Exception:  # noqa: BLE001 - a tile that does not fit (shared memory)
                pass
        router_gating.DX_TILE, router_gating.DW_TILE, router_gating.DW_TILE_FEW_EXPERTS = saved
        _fastest(f"gating {part} {t} x {h} x {e}", timed, current)


def sweep_rmsnorm(n: int, h: int) -> None:
    x, dy, res = (torch.randn(n, h, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(h, device="cuda", dtype=torch.bfloat16)
    rstd = rmsnorm.rms_norm_forward_triton(x, w, 1e-5)[1]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tile, timed = rmsnorm._backward_tile, []
    for block_r in (1, 2, 4, 8, 16):
        for warps in (4, 8):
            if block_r * h > 32768:
                continue
            rmsnorm._backward_tile = lambda *_, r=block_r, nw=warps: (r, nw)
            for per_sm in (2, 4, 8):
                call = (lambda p=per_sm: rmsnorm.rms_norm_backward_triton(
                    dy, x, w, rstd, dx_add=res, num_programs=p * sms))
                timed.append((median_ms(call, "cuda", 3, 30), (block_r, warps, per_sm)))
    rmsnorm._backward_tile = tile
    now = median_ms(lambda: rmsnorm.rms_norm_backward_triton(dy, x, w, rstd, dx_add=res),
                    "cuda", 3, 30)
    _fastest(f"RMSNorm backward + residual grad {n} x {h} (block_r, warps, programs/SM)",
             timed + [(now, "current")], "current")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", default="32768x16,65536x16,65536x64,16384x8")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("small_kernels.py times CUDA kernels; no GPU here")
    copies()
    positions(args.positions)
    if args.sweep:
        for shape in ((32768, 1024, 16), (65536, 1024, 16), (16384, 4096, 64)):
            sweep_gating(*shape)
        for shape in ((32768, 1024), (65536, 1024), (16384, 4096)):
            sweep_rmsnorm(*shape)


if __name__ == "__main__":
    main()
