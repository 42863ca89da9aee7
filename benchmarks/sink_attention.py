"""gpt-oss attention: full causal with sinks and the 128-token sliding window with sinks against
PyTorch SDPA (full causal, no sinks), forward + backward, in one run.

    python benchmarks/sink_attention.py                      # gpt-oss-20b shapes, one GPU
    python benchmarks/sink_attention.py --json sink_attention.json
    python benchmarks/sink_attention.py --smoke              # tiny, on CPU (the reference path)

Shapes: q ``[S, B, 64, 64]``, k/v ``[S, B, 8, 64]`` (GQA), S = 4096, bf16. Rows:
``torch SDPA causal`` (``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, the
baseline), ``moecore causal + sinks`` and ``moecore window 128 + sinks``
(``moecore.kernels.attention.core_attention`` with ``--attention-backend auto``: FlexAttention on
CUDA). Timing: median of ``--repeats`` forward + backward calls (``torch.autograd.grad`` of q, k,
v and the sinks) after ``--warmup``. The acceptance: "causal+sinks / SDPA" <= 1.15 and
"SDPA / window" >= 3. Outputs are checked against the reference (``max |diff|``) at a short
sequence first.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms  # noqa: E402

from moecore.kernels.attention import (  # noqa: E402
    SINK_ATTENTION,
    core_attention,
    sink_window_attention,
)


def _sdpa(q, k, v, sinks):
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
    return out.permute(2, 0, 1, 3).flatten(2)


def _inputs(s, args, device, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(s, args.batch, args.heads, args.head_dim)] + \
        [(s, args.batch, args.kv_heads, args.head_dim)] * 2 + [(args.heads,)]
    return [torch.randn(sh, generator=g).to(device, dtype if len(sh) > 1 else torch.float32)
            .requires_grad_() for sh in shapes]


def run(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fns = {"torch SDPA causal": _sdpa,
           "moecore causal + sinks": lambda q, k, v, s: core_attention(q, k, v, sinks=s),
           "moecore window 128 + sinks": lambda q, k, v, s: core_attention(
               q, k, v, window=args.window - 1, sinks=s)}
    small = _inputs(min(args.seq, 512), args, device, dtype)
    checks = {name: (fns[name](*small).float() - sink_window_attention(
        *small[:3], window=args.window - 1 if "window" in name else None,
        sinks=small[3]).float()).abs().max().item() for name in list(fns)[1:]}
    inputs = _inputs(args.seq, args, device, dtype)
    grad = torch.randn(args.seq, args.batch, args.heads * args.head_dim, device=device,
                       dtype=dtype)
    rows = {}
    for name, fn in fns.items():
        step = lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs[:3], grad)  # noqa: E731
        rows[name] = median_ms(step, device, args.warmup, args.repeats)
    base = rows["torch SDPA causal"]
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else
            platform.processor() or "cpu", "torch": torch.__version__,
            "backend": SINK_ATTENTION.resolve("auto", device=device).name,
            "shape": vars(args), "fwd_bwd_ms": rows, "max_abs_diff_vs_reference": checks,
            "causal+sinks / SDPA": rows["moecore causal + sinks"] / base,
            "SDPA / window": base / rows["moecore window 128 + sinks"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=128, help="Hugging Face's sliding_window")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq, args.heads, args.kv_heads, args.head_dim, args.window = 64, 4, 2, 16, 8
        args.device, args.dtype, args.warmup, args.repeats = "cpu", "float32", 1, 2
    result = run(args)
    print(f"{result['device']}, backend {result['backend']}, S={args.seq}")
    for name, ms in result["fwd_bwd_ms"].items():
        print(f"  {name:28s} fwd+bwd {ms:9.3f} ms")
    print(f"  causal+sinks / SDPA = {result['causal+sinks / SDPA']:.3f} (want <= 1.15); "
          f"SDPA / window = {result['SDPA / window']:.2f} (want >= 3); "
          f"max |diff| vs reference {result['max_abs_diff_vs_reference']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
