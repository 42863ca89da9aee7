"""MFU ceiling of the ``benchmarks/e2e.py`` model from its matmuls and attention alone.

Times, on one GPU, every GEMM of one micro-batch's forward and backward at the model's shapes
(QKV and output projections, the experts' grouped GEMMs with tokens spread evenly over the
experts, the output head: forward, input-gradient and weight-gradient products) and causal
SDPA forward+backward, then reports each op's TFLOP/s and the MFU the step would reach if it
did nothing else: ``flops_per_token * tokens / (sum of those times * peak)``.

    python benchmarks/e2e_ceiling.py --micro-batch-size 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms  # noqa: E402

from moecore.config import TransformerConfig  # noqa: E402
from moecore.training import mfu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    bf16, dev = torch.bfloat16, "cuda"
    t, h, f, e = a.micro_batch_size * a.seq, a.hidden, a.ffn, a.experts
    rows: list[tuple[str, float, float, int]] = []  # (op, ms per call, FLOPs per call, calls)

    def dense(name, m, k, n, per_layer=True):
        x, w, dy = (torch.randn(*s, device=dev, dtype=bf16) for s in ((m, k), (k, n), (m, n)))
        for part, fn in (("fwd", lambda: x @ w), ("dgrad", lambda: dy @ w.t()),
                         ("wgrad", lambda: x.t() @ dy)):
            rows.append((f"{name} {part}", median_ms(fn, "cuda", 3, a.reps), 2 * m * k * n,
                         a.layers if per_layer else 1))

    def grouped(name, k, n):
        rows_total = t * a.topk
        offs = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * (rows_total // e)
        x = torch.randn(rows_total, k, device=dev, dtype=bf16)
        w = torch.randn(e, k, n, device=dev, dtype=bf16)
        dy = torch.randn(rows_total, n, device=dev, dtype=bf16)
        for part, fn in (("fwd", lambda: torch._grouped_mm(x, w, offs=offs)),
                         ("dgrad", lambda: torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs)),
                         ("wgrad", lambda: torch._grouped_mm(x.t(), dy, offs=offs))):
            rows.append((f"{name} {part}", median_ms(fn, "cuda", 3, a.reps),
                         2 * rows_total * k * n, a.layers))

    dense("qkv", t, h, 3 * h)
    dense("proj", t, h, h)
    grouped("experts fc1", h, 2 * f)
    grouped("experts fc2", f, h)
    dense("output head", t, h, a.vocab, per_layer=False)
    q, k, v = (torch.randn(a.micro_batch_size, a.heads, a.seq, h // a.heads, device=dev,
                           dtype=bf16, requires_grad=True) for _ in range(3))

    def attention():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(torch.ones_like(o))

    # fwd+bwd FLOPs over the full S x S square, as moecore.training.mfu counts them
    rows.append(("attention fwd+bwd (SDPA, causal)", median_ms(attention, "cuda", 3, a.reps),
                 3 * 4 * a.micro_batch_size * a.seq * a.seq * h, a.layers))
    print(f"{'op':36s} {'ms/call':>8s} {'calls':>5s} {'TFLOP/s':>8s}")
    for name, ms, flops, calls in rows:
        print(f"{name:36s} {ms:8.3f} {calls:5d} {flops / ms / 1e9:8.1f}")
    cfg = TransformerConfig(num_layers=a.layers, hidden_size=h, num_attention_heads=a.heads,
                            ffn_hidden_size=f, num_moe_experts=e, moe_ffn_hidden_size=f,
                            moe_router_topk=a.topk, gated_linear_unit=True)
    total_ms = sum(ms * calls for _, ms, _, calls in rows)
    peak = mfu.peak_tflops("cuda", bf16)
    ceiling = mfu.mfu(t / (total_ms / 1e3), mfu.flops_per_token(cfg, a.vocab, a.seq), 1, peak)
    print(f"GEMMs + attention: {total_ms:.1f} ms per micro-batch of {t} tokens -> MFU ceiling "
          f"{'n/a (unknown GPU peak)' if ceiling is None else f'{100 * ceiling:.1f}%'}")


if __name__ == "__main__":
    main()
