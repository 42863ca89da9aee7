"""Multi-latent attention's core attention against PyTorch SDPA at head dim 128, in one run.

    python benchmarks/mla_attention.py                       # DeepSeek-V3 shapes, one GPU
    python benchmarks/mla_attention.py --json mla_attention.json --repeats 50
    python benchmarks/mla_attention.py --smoke               # tiny, on CPU

Rows (forward, and forward + backward through ``torch.autograd.grad``):

- ``moecore <backend>``: ``moecore.kernels.attention.core_attention`` (what MLA's ``_attend``
  calls) at DeepSeek-V3's per-head shapes: q and k ``[S, B, 128 heads, 192]`` (128 + 64 RoPE),
  v ``[S, B, 128, 128]``, causal, softmax scale ``1/sqrt(192)``; once with ``auto`` (the
  default ``--attention-backend``) and once per explicit backend of the ``attention`` registry
  (a backend that refuses the shapes is listed with PyTorch's reason).
- ``torch SDPA d128`` (the baseline): ``F.scaled_dot_product_attention(is_causal=True)`` on
  ``[B, 128, S, 128]`` q, k and v, PyTorch's own pick of kernel.
- ``moecore auto d128``: the moecore path at head dim 128, so a gap to the baseline can be told
  apart from the cost of the head dims (layout, output copy).

FLOPs (causal: half of the ``S x S`` scores, FlashAttention's convention): forward =
``QK^T + PV`` = ``2 * B * H * S * S * (d_qk + d_v) / 2``; backward = 2.5 x forward (``dV``,
``dP``, ``dQ``, ``dK`` and the recomputed ``QK^T``: 5 products against the forward's 2; exact
for ``d_qk == d_v``, and for MLA's 192/128 it under-counts the backward by 4%, so MLA's TFLOP/s
here is a lower bound). "vs SDPA d128" is the row's forward + backward TFLOP/s over the
baseline's (the acceptance: >= 0.75 for ``moecore auto``). Timing: CUDA events after a device
sync, median of ``--repeats`` after ``--warmup`` calls; inputs are reused. Each row's output is
compared with the ``auto`` row's (MLA shapes) or the baseline's (d128): "max |diff|".
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms  # noqa: E402

from moecore.kernels.attention import ATTENTION, core_attention  # noqa: E402

BACKWARD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (see the module docstring)


def attention_flops(b: int, h: int, s: int, d_qk: int, d_v: int, causal: bool = True) -> float:
    """Forward FLOPs of ``softmax(Q K^T) V``: ``2 * b * h * s * s * (d_qk + d_v)``, halved when
    causal."""
    return 2.0 * b * h * s * s * (d_qk + d_v) / (2 if causal else 1)


def _inputs(shape_qk, shape_v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32).to(device, dtype)
            .requires_grad_(True) for shape in (shape_qk, shape_qk, shape_v)]


def _time(fn, inputs, grad_out, device, warmup, repeats):
    """(forward ms, forward + backward ms, output) of ``fn(*inputs)``."""
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    out = fwd()
    return (median_ms(fwd, device, warmup, repeats), median_ms(fwd_bwd, device, warmup, repeats),
            out)


def _kernels(fn, inputs, grad_out) -> list[str]:
    """The attention kernels one forward + backward launches (CUDA; names shortened), so the
    table says what ``auto`` picked."""
    if inputs[0].device.type != "cuda":
        return []
    keys = ("flash", "fmha", "cudnn", "attention", "attn", "sdpa", "efficient")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(fn(*inputs), inputs, grad_out)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)}
    return sorted(n[:60] for n in names)


def _row(name, fn, inputs, grad_shape, flops, args, ref=None):
    """One table row: times, TFLOP/s and the max |diff| of the output against ``ref``."""
    device = inputs[0].device
    grad_out = torch.randn(grad_shape, dtype=inputs[0].dtype, device=device)
    try:
        fwd_ms, train_ms, out = _time(fn, inputs, grad_out, device, args.warmup, args.repeats)
    except RuntimeError as e:  # a pinned kernel that cannot take these shapes, or out of memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        msg = str(e).strip().splitlines()[0]
        msg = msg[msg.find("PyTorch said:"):] if "PyTorch said:" in msg else msg
        return {"name": name, "error": msg[:200]}, None
    diff = None if ref is None else (out.float() - ref.float()).abs().max().item()
    return {"name": name, "kernels": _kernels(fn, inputs, grad_out),
            "fwd_ms": fwd_ms, "fwd_bwd_ms": train_ms,
            "fwd_tflops": flops / fwd_ms / 1e9,
            "fwd_bwd_tflops": flops * (1 + BACKWARD_FACTOR) / train_ms / 1e9,
            "max_abs_diff": diff}, out


def run(args) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    S, B, H = args.seq, args.batch, args.heads
    d_qk, d_v, d_ref = args.qk_head_dim + args.qk_pos_emb_head_dim, args.v_head_dim, args.ref_dim
    mla = _inputs((S, B, H, d_qk), (S, B, H, d_v), dtype, device)
    mla_flops = attention_flops(B, H, S, d_qk, d_v)
    scale = 1.0 / math.sqrt(d_qk)
    rows, ref = [], None
    for backend in ["auto", *(n for n in ATTENTION.names() if n != "local")]:  # local = unfused
        row, out = _row(f"moecore {backend}",
                        lambda q, k, v, b=backend: core_attention(q, k, v, None, 0.0, b, scale),
                        mla, (S, B, H * d_v), mla_flops, args, ref)
        ref = out if backend == "auto" else ref
        rows.append({**row, "shape": f"qk {d_qk} v {d_v}"})
    del mla, ref
    base = _inputs((B, H, S, d_ref), (B, H, S, d_ref), dtype, device, seed=1)
    ref_flops = attention_flops(B, H, S, d_ref, d_ref)
    row, ref = _row("torch SDPA d128" if d_ref == 128 else f"torch SDPA d{d_ref}",
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    base, (B, H, S, d_ref), ref_flops, args)
    rows.append({**row, "shape": f"qk {d_ref} v {d_ref}", "baseline": True})
    # The same values through moecore's [S, B, H, d] layout (the output matches the baseline's).
    seq_first = [t.detach().permute(2, 0, 1, 3).contiguous().requires_grad_(True) for t in base]
    row, _ = _row(f"moecore auto d{d_ref}",
                  lambda q, k, v: core_attention(q, k, v, None, 0.0, "auto"),
                  seq_first, (S, B, H * d_ref), ref_flops, args,
                  None if ref is None else ref.permute(2, 0, 1, 3).reshape(S, B, H * d_ref))
    rows.append({**row, "shape": f"qk {d_ref} v {d_ref}"})
    baseline = rows[-2].get("fwd_bwd_tflops")
    for r in rows:
        if baseline and "fwd_bwd_tflops" in r:
            r["vs_sdpa_d128"] = r["fwd_bwd_tflops"] / baseline
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'row':<22}{'shape':<14}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}"
          f"{'vs SDPA d128':>14}{'max |diff|':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<22}{r['shape']:<14}  refused: {r['error']}")
            continue
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        ratio = f"{r['vs_sdpa_d128']:.3f}" if "vs_sdpa_d128" in r else "n/a"
        print(f"{r['name']:<22}{r['shape']:<14}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>10.4g}"
              f"{r['fwd_bwd_ms']:>9.3f}{r['fwd_bwd_tflops']:>10.4g}{ratio:>14}{diff:>12}")
    for r in rows:  # what each row ran (CUDA only)
        if r.get("kernels"):
            print(f"  {r['name']}: {', '.join(r['kernels'])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--qk-head-dim", type=int, default=128)
    p.add_argument("--qk-pos-emb-head-dim", type=int, default=64)
    p.add_argument("--v-head-dim", type=int, default=128)
    p.add_argument("--ref-dim", type=int, default=128, help="the baseline's head dim")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes in fp32 on CPU (checks the script, times nothing useful)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    if args.smoke:
        args.device, args.dtype, args.warmup, args.repeats = "cpu", "float32", 1, 2
        args.heads, args.seq, args.qk_head_dim, args.qk_pos_emb_head_dim = 2, 64, 16, 8
        args.v_head_dim, args.ref_dim = 16, 16
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    env = {"device": name, "torch": torch.__version__, "dtype": args.dtype, "heads": args.heads,
           "seq": args.seq, "batch": args.batch,
           "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    print(json.dumps(env))
    rows = run(args)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
