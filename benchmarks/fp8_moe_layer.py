"""MoE layer forward+backward in bf16 against FP8 (tensorwise, blockwise, ...) in one run.

For each shape of ``benchmarks/moe_layer.py`` (mixtral, deepseek, olmoe) the same
``moecore.moe.MoELayer`` (alltoall dispatcher, GroupedMLP, random router) is timed in bf16 and
with its expert GEMMs in FP8 (``moecore.fp8.apply_fp8``, hybrid format), and the speed-up over
bf16 is printed against the issue's targets (tensorwise >= 1.4x at mixtral, >= 1.2x at
deepseek/olmoe; blockwise >= 1.25x / 1.1x). The relative error of the FP8 layer output against
bf16 on the same input is reported too.

    python benchmarks/fp8_moe_layer.py --json fp8.json     # one GPU, all shapes and recipes
    python benchmarks/fp8_moe_layer.py --variants blockwise+cache@triton,blockwise+cache@torch
    python benchmarks/fp8_moe_layer.py --smoke              # CPU, tiny shape, emulated GEMMs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_layer import CONFIGS, make_config  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402
from moecore.fp8 import apply_fp8  # noqa: E402
from moecore.fp8.scaling import WeightCache  # noqa: E402
from moecore.kernels.fp8_gemm import FP8_GEMM_BACKENDS  # noqa: E402
from moecore.moe.layer import MoELayer  # noqa: E402

SMOKE = {"smoke": dict(hidden=128, ffn=128, experts=4, topk=2, tokens=256)}
TARGETS = {"tensorwise": {"mixtral": 1.4, "deepseek": 1.2, "olmoe": 1.2},
           "blockwise": {"mixtral": 1.25, "deepseek": 1.1, "olmoe": 1.1}}


def parse_variant(name: str) -> dict:
    """``recipe[+cache][+bf16wgrad][@backend]`` -> build options: ``cache`` = weights quantised
    once per optimizer step and reused (the training loop's steady state over micro-batches;
    without it every call quantises its weights, as with one micro-batch per step),
    ``bf16wgrad`` = ``--no-fp8-wgrad``, ``backend`` = this variant's ``--fp8-gemm-backend``
    (else the script's)."""
    spec, _, backend = name.partition("@")
    recipe, *opts = spec.split("+")
    if (recipe not in ("tensorwise", "delayed", "blockwise")
            or set(opts) - {"cache", "bf16wgrad"}
            or backend not in ("", *FP8_GEMM_BACKENDS)):
        raise argparse.ArgumentTypeError(
            f"unknown variant {name!r}: recipe[+cache][+bf16wgrad][@backend], backend one of "
            f"{list(FP8_GEMM_BACKENDS)}")
    return {"recipe": recipe, "cache": "cache" in opts, "wgrad": "bf16wgrad" not in opts,
            "gemm_backend": backend or None}


def build(shape: dict, device, dtype, variant: dict | None, gemm_backend: str):
    """The MoE layer (seed 0, random router), its experts in FP8 under ``variant``."""
    config = make_config(shape, dtype, "auto")
    if variant is not None:
        config = config.replace(fp8="hybrid", fp8_recipe=variant["recipe"],
                                fp8_gemm_backend=gemm_backend, fp8_wgrad=variant["wgrad"])
    torch.manual_seed(0)
    with torch.device(device):
        layer = MoELayer(config)
        with torch.no_grad():
            layer.router.weight.normal_(0.0, shape["hidden"] ** -0.5)
    apply_fp8(layer, config, 1)
    return layer


def time_variant(shape, device, dtype, variant, args, probe) -> dict:
    backend = (variant or {}).get("gemm_backend") or args.fp8_gemm_backend
    layer = build(shape, device, dtype, variant, "emulated" if args.smoke else backend)
    tokens, h = shape["tokens"], shape["hidden"]

    def setup():
        layer.zero_grad(set_to_none=True)
        x = torch.randn(tokens, 1, h, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randn(tokens, 1, h, device=device, dtype=dtype)

    def step(x, dy):
        layer(x)[0].backward(dy)

    WeightCache.enable(bool(variant and variant["cache"]))
    try:
        ms = median_ms(step, device, args.warmup, args.repeats, setup)
        with torch.no_grad():
            out = layer(probe)[0].float()
    finally:
        WeightCache.enable(False)
    return {"ms": ms, "out": out}


def run(args, device, dtype) -> list[dict]:
    shapes = SMOKE if args.smoke else {k: CONFIGS[k] for k in args.configs}
    rows = []
    for name, shape in shapes.items():
        probe = torch.randn(shape["tokens"], 1, shape["hidden"], device=device, dtype=dtype,
                            generator=torch.Generator(device).manual_seed(1))
        base = time_variant(shape, device, dtype, None, args, probe)
        row = {"config": name, **shape, "bf16_ms": base["ms"]}
        for variant in args.variants:
            options = parse_variant(variant)
            got = time_variant(shape, device, dtype, options, args, probe)
            err = ((got["out"] - base["out"]).norm() / base["out"].norm()).item()
            recipe = options["recipe"]
            row.update({f"{variant}_ms": got["ms"], f"{variant}_speedup": base["ms"] / got["ms"],
                        f"{variant}_rel_err": err,
                        f"{variant}_target": TARGETS.get(recipe, {}).get(name)})
        rows.append(row)
        print(f"{name}: {json.dumps(row)}", flush=True)
    return rows


def print_table(rows: list[dict], variants: list[str]) -> None:
    print(f"\n{'config':<10}{'bf16 ms':>9}  " + "  ".join(f"{v} ms / x bf16 (target)"
                                                       for v in variants))
    for row in rows:
        line = f"{row['config']:<10}{row['bf16_ms']:>9.2f}"
        for v in variants:
            target = row[f"{v}_target"]
            line += (f"  {row[f'{v}_ms']:>8.2f} / {row[f'{v}_speedup']:.2f}"
                     f" ({target if target else '-'}) err {row[f'{v}_rel_err']:.4f}")
        print(line)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   type=lambda s: [c for c in s.split(",") if c])
    p.add_argument("--variants", default="tensorwise,tensorwise+cache,"
                   "tensorwise+cache+bf16wgrad,blockwise,blockwise+cache+bf16wgrad",
                   type=lambda s: [c for c in s.split(",") if c and parse_variant(c)],
                   help="FP8 variants to time: recipe (tensorwise, delayed, blockwise), then "
                   "+cache (weights quantised once per step) and/or +bf16wgrad "
                   "(--no-fp8-wgrad), then @backend for this variant's --fp8-gemm-backend")
    p.add_argument("--fp8-gemm-backend", default="auto")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, one tiny shape, emulated FP8 GEMMs, 1 repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.fp8_gemm_backend, args.warmup, args.repeats = "emulated", 0, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            p.error("CUDA is not available; use --smoke on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = run(args, device, dtype)
    print_table(rows, args.variants)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
