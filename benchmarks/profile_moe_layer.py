"""Profile one MoELayer forward+backward on CUDA and print the top kernels by GPU time and the
top ops by host (self CPU) time; 5 profiled iterations, gradients reset before each.
``--host-python N`` instead runs N iterations under cProfile and prints the Python functions
that take the host's time (what the GPU waits for when the eager layer is launch-bound).

    python benchmarks/profile_moe_layer.py --config olmoe [--no-fusion] [--fp8-recipe tensorwise]
    python benchmarks/profile_moe_layer.py --config deepseek --host-python 20
    python benchmarks/profile_moe_layer.py --config tiny --device cpu --host-python 2  # smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_layer import CONFIGS, TINY, make_config  # noqa: E402
from moecore.fp8 import apply_fp8  # noqa: E402
from moecore.moe.layer import MoELayer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="olmoe", choices=sorted({**CONFIGS, **TINY}))
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-fusion", action="store_true",
                   help="without the router/permute/SwiGLU kernels (moecore.kernels)")
    p.add_argument("--fp8-recipe", default=None, choices=["tensorwise", "delayed", "blockwise"],
                   help="the experts' GEMMs in FP8 (hybrid format) under this recipe")
    p.add_argument("--host-python", type=int, default=0, metavar="ITERS",
                   help="cProfile ITERS iterations instead: the host's Python time per function")
    args = p.parse_args(argv)
    shape = {**CONFIGS, **TINY}[args.config]
    cfg = make_config(shape, torch.bfloat16, "auto", fused=not args.no_fusion)
    if args.fp8_recipe:
        cfg = cfg.replace(fp8="hybrid", fp8_recipe=args.fp8_recipe)
    torch.manual_seed(0)
    device = torch.device(args.device)
    with device:
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.weight.normal_(0.0, shape["hidden"] ** -0.5)
    apply_fp8(layer, cfg, 1)
    x = torch.randn(shape["tokens"], 1, shape["hidden"], device=device, dtype=torch.bfloat16,
                    requires_grad=True)
    dy = torch.randn_like(x)

    def step():  # as benchmarks/moe_layer.py times it: fresh gradients, none accumulated
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x)[0].backward(dy)

    for _ in range(3):
        step()
    _sync(device)
    if args.host_python:
        host_profile(step, args.host_python, device, args.rows)
        return
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    # The host's side (what a launch-bound layer waits for; --host-python for Python's view).
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                      max_name_column_width=70))



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_profile(step, iters: int, device: torch.device, rows: int) -> None:
    """``iters`` calls of ``step`` under cProfile (no sync inside): the wall time of the loop,
    the GPU's time to drain it, and the top functions by own and by cumulative host time."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(iters):
        step()
    prof.disable()
    issued = time.perf_counter()
    _sync(device)
    done = time.perf_counter()
    print(f"host: {(issued - start) * 1e3 / iters:.3f} ms per iteration to issue (under "
          f"cProfile), {(done - issued) * 1e3:.3f} ms more until the device finished")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(rows)
        text = out.getvalue()
        print(text[text.find("   ncalls"):])


if __name__ == "__main__":
    main()
