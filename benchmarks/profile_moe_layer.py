"""Profile one MoELayer forward+backward on CUDA and print the top kernels by GPU time and the
top ops by host (self CPU) time; 5 profiled iterations, gradients reset before each.

    python benchmarks/profile_moe_layer.py --config olmoe [--no-fusion] [--fp8-recipe tensorwise]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_layer import CONFIGS, make_config  # noqa: E402
from moecore.fp8 import apply_fp8  # noqa: E402
from moecore.moe.layer import MoELayer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="olmoe", choices=sorted(CONFIGS))
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-fusion", action="store_true",
                   help="without the router/permute/SwiGLU kernels (moecore.kernels)")
    p.add_argument("--fp8-recipe", default=None, choices=["tensorwise", "delayed", "blockwise"],
                   help="the experts' GEMMs in FP8 (hybrid format) under this recipe")
    args = p.parse_args()
    shape = CONFIGS[args.config]
    cfg = make_config(shape, torch.bfloat16, "auto", fused=not args.no_fusion)
    if args.fp8_recipe:
        cfg = cfg.replace(fp8="hybrid", fp8_recipe=args.fp8_recipe)
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.weight.normal_(0.0, shape["hidden"] ** -0.5)
    apply_fp8(layer, cfg, 1)
    x = torch.randn(shape["tokens"], 1, shape["hidden"], device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    dy = torch.randn_like(x)

    def step():  # as benchmarks/moe_layer.py times it: fresh gradients, none accumulated
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x)[0].backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    # The host's side: at the 64-expert shapes the eager layer's GPU waits for its launches for
    # 1.1-1.5 ms of each iteration (docs/benchmarks.md).
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                      max_name_column_width=70))


if __name__ == "__main__":
    main()
