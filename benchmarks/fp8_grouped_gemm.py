"""The experts' three grouped GEMMs alone, bf16 against FP8, at the shapes of
``benchmarks/moe_layer.py``: which GEMM FP8 speeds up and which it does not.

For each shape (rows ``T*k`` split evenly over the experts, the first expert projection
``[T*k, H] x [E, H, 2F]``) it times, with CUDA events, median of the repeats:

- ``fprop``  ``y = x @ w_e``, ``dgrad`` ``dx = dy @ w_e^T`` (row-grouped), ``wgrad``
  ``dw_e = x_e^T dy_e`` (grouped along the tokens);
- bf16: ``torch._grouped_mm`` (moecore's bf16 path); FP8: ``moecore.kernels.fp8_gemm``'s torch
  backend (``TORCH.grouped_mm`` / ``grouped_wgrad``: ``torch._scaled_grouped_mm``, E4M3,
  tensorwise scales) on operands quantised and laid out beforehand (casts and transposes not
  timed), with fast accumulation off and on (moecore uses it for fprop only, as Transformer
  Engine does).

Prints TFLOP/s per GEMM and FP8's speed-up over bf16.

    python benchmarks/fp8_grouped_gemm.py [--configs mixtral,deepseek] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_layer import CONFIGS  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402
from moecore.kernels.fp8_gemm import TORCH  # noqa: E402
from moecore.kernels.fp8_quant import (  # noqa: E402
    group_row_map,
    quantize_tensor,
    scale_from_amax,
    transpose,
)

E4 = torch.float8_e4m3fn


def _q(t: torch.Tensor, per_expert: bool = False):
    amax = t.float().abs().amax((1, 2) if per_expert else None)
    return quantize_tensor(t, scale_from_amax(amax, E4), E4)


def _fp8_calls(x, w, dy, counts):
    """``{gemm: fn(fast_accum)}``: moecore's FP8 torch backend on operands quantised and laid
    out beforehand (``w [E, K, N]`` as stored; its ``[E, N, K]`` transpose for fprop)."""
    xq, dyq, wq = _q(x), _q(dy), _q(w, per_expert=True)
    wq_t = transpose(wq)
    rows, ends = group_row_map(counts, x.shape[0], x.device)
    xt, dyt = transpose(xq, rows), transpose(dyq, rows)
    bf16 = torch.bfloat16
    return {"fprop": lambda fast: TORCH.grouped_mm(xq, wq_t, counts, bf16, fast_accum=fast),
            "dgrad": lambda fast: TORCH.grouped_mm(dyq, wq, counts, bf16, fast_accum=fast),
            "wgrad": lambda fast: TORCH.grouped_wgrad(xt, dyt, ends, bf16, fast_accum=fast)}


def _bf16_calls(x, w, dy, offs):
    return {"fprop": lambda: torch._grouped_mm(x, w, offs=offs),
            "dgrad": lambda: torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs),
            "wgrad": lambda: torch._grouped_mm(x.t(), dy, offs=offs)}


def time_shape(name: str, args) -> list[dict]:
    device, s = torch.device("cuda"), CONFIGS[name]
    t, h, f2, e = s["tokens"] * s["topk"], s["hidden"], 2 * s["ffn"], s["experts"]
    counts = torch.full((e,), t // e, device=device, dtype=torch.int64)
    counts[0] += t - int(counts.sum())
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(t, h, device=device, generator=g).bfloat16()
    w = (torch.randn(e, h, f2, device=device, generator=g) * h ** -0.5).bfloat16()
    dy = torch.randn(t, f2, device=device, generator=g).bfloat16()
    bf16 = _bf16_calls(x, w, dy, torch.cumsum(counts, 0).to(torch.int32))
    fp8 = _fp8_calls(x, w, dy, counts)
    flops, rows = 2 * t * h * f2, []
    for gemm in ("fprop", "dgrad", "wgrad"):
        row = {"config": name, "gemm": gemm,
               "bf16_ms": median_ms(bf16[gemm], device, args.warmup, args.repeats)}
        for fast in (False, True):
            row[f"fp8_fast{int(fast)}_ms"] = median_ms(functools.partial(fp8[gemm], fast),
                                                       device, args.warmup, args.repeats)
        row.update({key.replace("_ms", "_tflops"): flops / ms / 1e9
                    for key, ms in list(row.items()) if key.endswith("_ms")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   type=lambda s: [c for c in s.split(",") if c])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU of compute capability >= 8.9")
    rows = [r for name in args.configs for r in time_shape(name, args)]
    print(f"\n{'config':<10}{'gemm':<7}{'bf16':>8}{'fp8':>8}{'fp8 fast':>10}  TFLOP/s; "
          "x bf16 (fp8, fp8 fast)")
    for r in rows:
        print(f"{r['config']:<10}{r['gemm']:<7}{r['bf16_tflops']:>8.0f}"
              f"{r['fp8_fast0_tflops']:>8.0f}{r['fp8_fast1_tflops']:>10.0f}  "
              f"{r['bf16_ms'] / r['fp8_fast0_ms']:.2f}, {r['bf16_ms'] / r['fp8_fast1_ms']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
