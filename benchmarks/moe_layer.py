"""Forward+backward time of one MoELayer against a dense-GEMM equivalent, per model shape.

For each config (hidden H, expert FFN F, experts E, top-k k, tokens T) it times:

- the whole ``moecore.moe.MoELayer`` (router -> alltoall dispatcher -> GroupedMLP -> combine),
  bf16, dropless, no aux loss, random inputs routed by random (balanced in expectation) router
  weights;
- the *dense equivalent*: the same ``T * k`` rows through ONE dense SwiGLU MLP of size H, F, i.e.
  the same expert FLOPs as one big GEMM chain, the best the grouped GEMMs could do.

Reported: layer ms, dense ms, ratio dense/layer (1.0 = the MoE layer costs no more than its
FLOPs in dense GEMMs), expert TFLOP/s = ``6 * T * k * 3 * H * F / layer time``, and peak memory.
``--backends`` instead times ``grouped_mm`` alone (the first expert projection, mixtral shapes)
for every available backend against a dense matmul of the same FLOPs. ``--compare-fusion`` times
each layer twice, with the fused kernels of ``moecore.kernels`` (router, permute, SwiGLU: the
default) and without them (``--no-moe-router-fusion --no-moe-permute-fusion
--no-bias-swiglu-fusion``), and prints both side by side; ``--no-fusion`` times only the latter.

    python benchmarks/moe_layer.py --json out.json          # CUDA, the three model shapes
    python benchmarks/moe_layer.py --compare-fusion         # unfused vs fused, side by side
    python benchmarks/moe_layer.py --cuda-graphs            # + both as replayed CUDA graphs
    python benchmarks/moe_layer.py --backends               # grouped-GEMM backends only
    python benchmarks/moe_layer.py --device cpu --tiny      # smoke run on CPU

Timing: CUDA events around each iteration, warm-up iterations first, the median of the
repeats; fresh random inputs are drawn before each iteration, outside the timed region. Each
such iteration starts after a sync, so it includes the launch latency of its first kernels (at
the 64-expert shapes on an H100 ~0.6 ms of ~10.7; back to back, and as graphs, the layer takes
the same time: docs/benchmarks.md); ``--cuda-graphs`` also times both sides as replayed CUDA
graphs (as ``--cuda-graph-impl local`` trains), GPU time only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import graph_ms, median_ms  # noqa: E402
from moecore.config import TransformerConfig  # noqa: E402
from moecore.kernels.grouped_gemm import GROUPED_GEMM, grouped_mm  # noqa: E402
from moecore.memory import saved_activations  # noqa: E402

CONFIGS = {
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, topk=2, tokens=8192),
    "deepseek": dict(hidden=2048, ffn=1408, experts=64, topk=6, tokens=16384),
    "olmoe": dict(hidden=2048, ffn=1024, experts=64, topk=8, tokens=16384),
}
TINY = {"tiny": dict(hidden=64, ffn=96, experts=4, topk=2, tokens=256)}


def pipelined_ms(step, setup, reset, device: torch.device, repeats: int = 10) -> float | None:
    """Mean ms per step of ``repeats`` steps run back to back, inputs drawn beforehand, with no
    sync in between: the CPU may run ahead of the GPU as it does in a model of many layers, so
    launch gaps at the start of a step are hidden. ``reset()`` (host-side, e.g. dropping the
    grads) runs before each step. CUDA only (None elsewhere)."""
    if device.type != "cuda":
        return None
    inputs = [setup() for _ in range(repeats)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for args in inputs:
        reset()
        step(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def graphed_ms(step, setup, reset, device: torch.device, repeats: int = 10) -> float | str | None:
    """GPU ms per step with ``repeats`` steps (``reset()`` then ``step(*inputs)``, one set of
    static inputs) captured in one CUDA graph and replayed: the layer as training runs it under
    ``--cuda-graph-impl local``, with no host launch cost. CUDA only (None elsewhere); the
    reason, as a string, when the step cannot be captured."""
    if device.type != "cuda":
        return None
    inputs = setup()

    def run():
        reset()
        for t in inputs:
            t.grad = None
        step(*inputs)

    try:
        return graph_ms(run, repeats)
    except RuntimeError as e:
        return "capture failed: " + str(e).strip().splitlines()[0][:200]


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def make_config(shape: dict, dtype: torch.dtype, gemm_backend: str,
                fused: bool = True) -> TransformerConfig:
    """The layer's config; ``fused=False`` turns the router/permute/SwiGLU kernels off (the
    Triton top-k combine stays, as before those kernels existed)."""
    off = {} if fused else dict(moe_router_fusion=False, moe_permute_fusion=False,
                                bias_swiglu_fusion=False)
    return TransformerConfig(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=1,
        num_moe_experts=shape["experts"], moe_ffn_hidden_size=shape["ffn"],
        moe_router_topk=shape["topk"], moe_grouped_gemm=True, moe_grouped_gemm_backend=gemm_backend,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, gated_linear_unit=True, activation_func=F.silu,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, **off)


def time_layer(shape, device, dtype, args, fused: bool = True) -> dict:
    from moecore.moe.layer import MoELayer

    config = make_config(shape, dtype, args.gemm_backend, fused)
    h, tokens = shape["hidden"], shape["tokens"]
    torch.manual_seed(0)
    with torch.device(device):
        layer = MoELayer(config)
        # Random router: iid N(0, 1) logits per expert, so routing is balanced in expectation.
        with torch.no_grad():
            layer.router.weight.normal_(0.0, h ** -0.5)

    def setup():
        layer.zero_grad(set_to_none=True)
        x = torch.randn(tokens, 1, h, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randn(tokens, 1, h, device=device, dtype=dtype)

    def step(x, dy):
        out, _ = layer(x)
        out.backward(dy)

    _peak_reset(device)
    ms = median_ms(step, device, args.warmup, args.repeats, setup)
    peak = _peak_gib(device)
    pipe = pipelined_ms(step, setup, lambda: layer.zero_grad(set_to_none=True), device)
    graphed = graphed_ms(step, setup, lambda: layer.zero_grad(set_to_none=True), device) \
        if args.cuda_graphs else None
    backend = getattr(layer.experts, "backend", None)
    x, dy = setup()
    (out, _), saved = saved_activations(lambda: layer(x), exclude=layer.parameters())
    out.backward(dy)
    return {"layer_ms": ms, "layer_pipelined_ms": pipe, "layer_graph_ms": graphed,
            "layer_peak_gib": peak,
            "saved_bytes_per_token": saved.total_bytes / tokens,
            "gemm_backend": backend.name if backend is not None else "sequential"}


def time_dense_equivalent(shape, device, dtype, args) -> dict:
    """``T * k`` rows through one dense SwiGLU MLP (H -> 2F -> F -> H), forward + backward."""
    h, f, rows = shape["hidden"], shape["ffn"], shape["tokens"] * shape["topk"]
    w1 = (torch.randn(h, 2 * f, device=device, dtype=dtype) * 0.02).requires_grad_()
    w2 = (torch.randn(f, h, device=device, dtype=dtype) * 0.02).requires_grad_()

    def setup():
        w1.grad = w2.grad = None
        x = torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randn(rows, h, device=device, dtype=dtype)

    def step(x, dy):
        gate, up = (x @ w1).chunk(2, dim=-1)
        ((F.silu(gate) * up) @ w2).backward(dy)

    def reset():
        w1.grad = w2.grad = None

    _peak_reset(device)
    ms = median_ms(step, device, args.warmup, args.repeats, setup)
    peak = _peak_gib(device)
    return {"dense_ms": ms, "dense_pipelined_ms": pipelined_ms(step, setup, reset, device),
            "dense_graph_ms": graphed_ms(step, setup, reset, device) if args.cuda_graphs
            else None, "dense_peak_gib": peak}


def expert_flops(shape) -> float:
    """Expert MLP FLOPs, fwd + bwd: forward is 2*Tk*H*2F + 2*Tk*F*H = 6*Tk*H*F, backward twice
    that, so ``3 * 6 * T * k * H * F``."""
    return 6.0 * shape["tokens"] * shape["topk"] * 3 * shape["hidden"] * shape["ffn"]


def run_layers(args, device, dtype) -> list[dict]:
    shapes = TINY if args.tiny else {k: CONFIGS[k] for k in args.configs}
    variants = (False, True) if args.compare_fusion else (not args.no_fusion,)
    results = []
    for name, shape in shapes.items():
        row = {"config": name, **shape}
        for fused in variants:
            suffix = "" if fused or len(variants) == 1 else "_unfused"
            timed = time_layer(shape, device, dtype, args, fused)
            row.update({key + suffix: value for key, value in timed.items()})
        row["fused_kernels"] = variants[-1]
        row.update(time_dense_equivalent(shape, device, dtype, args))
        for suffix in ("", "_unfused"):
            if "layer_ms" + suffix in row:
                ms = row["layer_ms" + suffix]
                row["ratio_dense_over_layer" + suffix] = row["dense_ms"] / ms
                row["expert_tflops" + suffix] = expert_flops(shape) / (ms * 1e-3) / 1e12
        g, dg = row.get("layer_graph_ms"), row.get("dense_graph_ms")
        if isinstance(g, float) and isinstance(dg, float):
            row["ratio_dense_over_layer_graph"] = dg / g
        results.append(row)
        print(f"{name}: {json.dumps(row)}", flush=True)
    return results


def run_backends(args, device, dtype) -> list[dict]:
    """``grouped_mm`` of the first expert projection (x [T*k, H] @ w [E, H, 2F]), fwd + bwd,
    per available backend, against one dense ``[T*k, H] @ [H, 2F]`` of the same FLOPs."""
    shape = TINY["tiny"] if args.tiny else CONFIGS["mixtral"]
    e, h, f = shape["experts"], shape["hidden"], shape["ffn"]
    rows = shape["tokens"] * shape["topk"]
    flops = 3 * 2.0 * rows * h * 2 * f
    w = (torch.randn(e, h, 2 * f, device=device, dtype=dtype) * 0.02).requires_grad_()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def setup():
        w.grad = None
        counts = torch.bincount(torch.randint(0, e, (rows,), generator=gen), minlength=e)
        x = torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True)
        return x, counts, torch.randn(rows, 2 * f, device=device, dtype=dtype)

    results = []
    for name in GROUPED_GEMM.available(device=device, dtype=dtype):
        backend = GROUPED_GEMM.get(name)

        def step(x, counts, dy, backend=backend):
            grouped_mm(x, w, counts, backend).backward(dy)

        _peak_reset(device)
        ms = median_ms(step, device, args.warmup, args.repeats, setup)
        results.append({"backend": name, "ms": ms, "tflops": flops / ms / 1e9,
                        "peak_gib": _peak_gib(device)})
        print(json.dumps(results[-1]), flush=True)
    dense_w = w[0].detach().clone().requires_grad_()

    def dense_step(x, counts, dy):
        (x @ dense_w).backward(dy)

    ms = median_ms(dense_step, device, args.warmup, args.repeats, setup)
    results.append({"backend": "dense matmul", "ms": ms, "tflops": flops / ms / 1e9,
                    "peak_gib": None})
    for r in results:
        r["ratio_dense_over_backend"] = ms / r["ms"]
    return results


def print_tables(layers: list[dict], backends: list[dict]) -> None:
    if layers and "layer_ms_unfused" in layers[0]:
        print(f"\n{'config':<10}{'unfused ms':>11}{'fused ms':>10}{'dense ms':>10}"
              f"{'unfused d/l':>12}{'fused d/l':>11}{'speedup':>9}{'peak GiB':>16}")
        for r in layers:
            peaks = "-"
            if r["layer_peak_gib"] is not None:
                peaks = f"{r['layer_peak_gib_unfused']:.2f}->{r['layer_peak_gib']:.2f}"
            print(f"{r['config']:<10}{r['layer_ms_unfused']:>11.2f}{r['layer_ms']:>10.2f}"
                  f"{r['dense_ms']:>10.2f}{r['ratio_dense_over_layer_unfused']:>12.2f}"
                  f"{r['ratio_dense_over_layer']:>11.2f}"
                  f"{r['layer_ms_unfused'] / r['layer_ms']:>9.2f}{peaks:>16}")
        if layers[0].get("layer_pipelined_ms") is not None:
            print("pipelined (steps back to back, no sync between): ms and dense/layer")
            for r in layers:
                u, f, d = (r["layer_pipelined_ms_unfused"], r["layer_pipelined_ms"],
                           r["dense_pipelined_ms"])
                print(f"{r['config']:<10}{u:>11.2f}{f:>10.2f}{d:>10.2f}{d / u:>12.2f}"
                      f"{d / f:>11.2f}{u / f:>9.2f}")
    elif layers:
        print(f"\n{'config':<10}{'layer ms':>10}{'dense ms':>10}{'dense/layer':>12}"
              f"{'expert TFLOP/s':>16}{'peak GiB':>10}  backend")
        for r in layers:
            peak = f"{r['layer_peak_gib']:.2f}" if r["layer_peak_gib"] is not None else "-"
            print(f"{r['config']:<10}{r['layer_ms']:>10.2f}{r['dense_ms']:>10.2f}"
                  f"{r['ratio_dense_over_layer']:>12.2f}{r['expert_tflops']:>16.1f}{peak:>10}"
                  f"  {r['gemm_backend']}")
    if layers and layers[0].get("layer_graph_ms") is not None:
        print("as replayed CUDA graphs (GPU time only): layer ms, dense ms, dense/layer")
        for r in layers:
            g, d = r["layer_graph_ms"], r["dense_graph_ms"]
            if isinstance(g, float) and isinstance(d, float):
                print(f"{r['config']:<10}{g:>10.2f}{d:>10.2f}{d / g:>12.2f}")
            else:
                print(f"{r['config']:<10}  {g if isinstance(g, str) else d}")
    if layers:
        print("activation memory kept for backward (moecore.memory.saved_activations), "
              "KiB per token:")
        for r in layers:
            print(f"{r['config']:<10}{r['saved_bytes_per_token'] / 1024:>10.1f}")
    if backends:
        print(f"\n{'grouped_mm backend':<20}{'ms':>10}{'TFLOP/s':>10}{'dense/backend':>15}")
        for r in backends:
            print(f"{r['backend']:<20}{r['ms']:>10.2f}{r['tflops']:>10.1f}"
                  f"{r['ratio_dense_over_backend']:>15.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        type=lambda s: [c for c in s.split(",") if c])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (CPU smoke run)")
    parser.add_argument("--backends", action="store_true",
                        help="time grouped_mm backends alone instead of the layer")
    parser.add_argument("--gemm-backend", default="auto", help="moe_grouped_gemm_backend")
    parser.add_argument("--compare-fusion", action="store_true",
                        help="time each layer without and with the fused kernels")
    parser.add_argument("--no-fusion", action="store_true",
                        help="time the layer without the router/permute/SwiGLU kernels")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time the layer and its dense equivalent as replayed CUDA "
                             "graphs (as --cuda-graph-impl local trains): GPU time only")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "warmup": args.warmup,
              "repeats": args.repeats, "layers": [], "backends": []}
    if args.backends:
        report["backends"] = run_backends(args, device, dtype)
    else:
        report["layers"] = run_layers(args, device, dtype)
    print_tables(report["layers"], report["backends"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
