"""Time the Triton RMSNorm (forward + backward), embedding and optimizer kernels against the torch
ops they replace, on one GPU, in one run.

    python benchmarks/norm_optim_kernels.py                 # CUDA with Triton
    python benchmarks/norm_optim_kernels.py --numel 1048576 # smaller optimizer tensor
    python benchmarks/norm_optim_kernels.py --shapes "" --gating ""  # no RMSNorm, gating rows

RMSNorm: ``F.rms_norm`` (torch's fused kernel) vs ``moecore.kernels.rmsnorm.rms_norm`` on bf16
``[tokens, hidden]``; router gating (fp32 logits from bf16 activations, forward + backward):
the upcast GEMMs vs ``moecore.kernels.router_gating`` at ``--gating`` (tokens x hidden x
experts); embedding (forward + weight grad, bf16): ``F.embedding`` vs
``moecore.kernels.embedding.embedding_triton`` at ``--embedding`` (tokens x hidden x vocab, ids
drawn Zipf-like as in text); optimizer: :func:`moecore.kernels.optim.benchmark` (fp32 += bf16
grad, fp32 = bf16 grad, AdamW step + bf16 model copy) on one tensor of ``--numel`` elements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms  # noqa: E402

from moecore.kernels import embedding, optim, rmsnorm, router_gating  # noqa: E402


def _fwd_bwd_ms(fn, x, w, dy, reps: int) -> float:
    """fn(x, w) and the grads of the inputs that require one."""
    inputs = tuple(t for t in (x, w) if t.requires_grad)
    return median_ms(lambda: torch.autograd.grad(fn(x, w), inputs, dy), w.device, 3, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="16384x1024,16384x4096,8192x8192")
    p.add_argument("--gating", default="16384x1024x16,32768x1024x16,16384x4096x64")
    p.add_argument("--embedding", default="32768x1024x32128,65536x1024x32128")
    p.add_argument("--numel", type=int, default=1 << 28)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU with Triton (the kernels under test are GPU kernels)")
    ok, why = rmsnorm.triton_available(torch.device("cuda"), torch.bfloat16)
    if not ok:
        sys.exit(f"Triton RMSNorm unavailable: {why}")
    rows = {}
    for shape in filter(None, args.shapes.split(",")):
        n, h = map(int, shape.split("x"))
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        t = _fwd_bwd_ms(lambda a, b: F.rms_norm(a, a.shape[-1:], b, 1e-5), x, w, dy, args.reps)
        k = _fwd_bwd_ms(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5), x, w, dy, args.reps)
        rows[f"rms_norm fwd+bwd {shape} bf16"] = (t, k)
    for shape in filter(None, args.gating.split(",")):
        n, h, e = map(int, shape.split("x"))
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(e, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(n, e, device="cuda")
        t = _fwd_bwd_ms(router_gating.gating_torch, x, w, dy, args.reps)
        k = _fwd_bwd_ms(router_gating.gating_triton, x, w, dy, args.reps)
        rows[f"router gating fwd+bwd {shape} bf16"] = (t, k)
    for shape in filter(None, args.embedding.split(",")):
        n, h, v = map(int, shape.split("x"))
        zipf = 1.0 / torch.arange(1, v + 1, device="cuda", dtype=torch.float64)
        ids = torch.multinomial(zipf, n, replacement=True)
        w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
        t = _fwd_bwd_ms(embedding.embedding_torch, ids, w, dy, args.reps)
        k = _fwd_bwd_ms(embedding.embedding_triton, ids, w, dy, args.reps)
        rows[f"embedding fwd+bwd {shape} bf16"] = (t, k)
    o = optim.benchmark(args.numel)
    rows[f"main_grad += bf16 grad ({args.numel})"] = (o["torch_add_ms"], o["triton_add_ms"])
    rows[f"main_grad = bf16 grad ({args.numel})"] = (o["torch_copy_ms"], o["triton_copy_ms"])
    rows[f"AdamW + bf16 copy ({args.numel})"] = (o["torch_fused_adamw_plus_copy_ms"],
                                                 o["triton_adamw_with_copy_ms"])
    print(f"{'op':48s} {'torch ms':>9s} {'triton ms':>9s} {'speed-up':>8s}")
    for name, (t, k) in rows.items():
        print(f"{name:48s} {t:9.3f} {k:9.3f} {t / k:8.2f}")
    print(json.dumps({k: [round(a, 4), round(b, 4)] for k, (a, b) in rows.items()}))


if __name__ == "__main__":
    main()
