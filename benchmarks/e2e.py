"""End-to-end training throughput: run pretrain_gpt.py's loop on a ~1B-total MoE and report
tokens/s and MFU (active-parameter FLOPs incl. attention, see moecore/training/mfu.py), the
time per iteration split into train_step's phases (batch, forward-backward, grad-sync,
optimizer, other; CUDA events, no extra syncs) and the peak GPU memory allocated.

    python benchmarks/e2e.py                         # one GPU, the ~1B MoE below
    torchrun --nproc_per_node 4 benchmarks/e2e.py --ep 4
    python benchmarks/e2e.py --tiny --device cpu     # smoke run
    python benchmarks/e2e.py --model deepseek-v2-lite --max-memory-gib 79   # MLA + shared
    python benchmarks/e2e.py --model deepseek-v2-lite --tiny --device cpu    # its smoke run
    python benchmarks/e2e.py --cuda-graph-impl local # any pretrain_gpt.py flag passes through
    python benchmarks/e2e.py --fp8-format hybrid --fp8-recipe tensorwise   # FP8 (docs/fp8.md)
    python benchmarks/e2e.py --compare-fp8 tensorwise,blockwise
                                                     # bf16 and each FP8 recipe, one run each
                                                     # (subprocesses), tokens/s ratio printed
    python benchmarks/e2e.py --smoke --compare-fp8 tensorwise,blockwise   # CPU smoke of it
    python benchmarks/e2e.py --micro-batch-size 32 --global-batch-size 256 \
        --cuda-graph-impl local --cuda-graph-warmup-steps 2 --iters 6 --log-interval 2
                                                     # fastest on one H200 (109 GiB peak)
    python benchmarks/e2e.py --micro-batch-size 16 --global-batch-size 128 \
        --cuda-graph-impl local --recompute-granularity selective \
        --recompute-modules moe_act layernorm --max-memory-gib 79
                                                     # 67 GiB: room on an 80 GB H100

Model (``--model moe-1b``, the default): hidden 1024, 16 layers, 16 heads, 16 experts top-2,
expert FFN 2816, seq 2048, bf16, mock data, no dropout (as Mixtral, DeepSeek-MoE and OLMoE
pretrain; pass ``--attention-dropout 0.1 --hidden-dropout 0.1`` for Megatron's defaults).
``--model deepseek-v2-lite``: DeepSeek-V2-Lite's shape at ``--layers`` (see DSV2_LITE), seq
4096, the same training settings. The first ``--skip`` logged intervals
(warm-up, Triton compilation) are excluded from the reported medians. Results:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fp8_moe_layer import parse_variant  # noqa: E402
from moecore.training import pretrain  # noqa: E402

MODEL = ["--num-layers", "16", "--hidden-size", "1024", "--num-attention-heads", "16",
         "--ffn-hidden-size", "2816", "--moe-ffn-hidden-size", "2816", "--seq-length", "2048",
         "--max-position-embeddings", "2048", "--num-experts", "16", "--moe-router-topk", "2"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "64", "--seq-length", "64",
        "--max-position-embeddings", "64", "--num-experts", "4", "--moe-router-topk", "2"]
# DeepSeek-V2-Lite's shape (Hugging Face deepseek-ai/DeepSeek-V2-Lite config.json: MLA with kv
# latent 512 and no query LoRA, qk 128 + 64 RoPE, v 128, YaRN x40; 64 routed experts of FFN 1408
# top-6 (softmax over all, as --moe-router-pre-softmax) plus 2 shared; the first layer dense
# with FFN 10944; vocabulary 102400; sequence aux loss 1e-3) at fewer layers than its 27 so that
# weights, fp32 grads and Adam state (about 18 bytes a parameter) fit one 80 GB GPU: --layers 5
# (1 dense + 4 MoE) is 2.84B parameters (48 GiB of state), 0.83B active per token (embeddings
# included); --layers 6: 3.42B (57 GiB). All 27 layers: 15.7B, 2.66B active (as published).
DSV2_LITE = ["--hidden-size", "2048", "--num-attention-heads", "16", "--ffn-hidden-size", "10944",
             "--moe-ffn-hidden-size", "1408", "--moe-shared-expert-intermediate-size", "2816",
             "--num-experts", "64", "--moe-router-topk", "6", "--seq-length", "4096",
             "--max-position-embeddings", "4096", "--kv-lora-rank", "512",
             "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128",
             "--rotary-scaling-factor", "40", "--mscale", "0.707", "--mscale-all-dim", "0.707",
             "--original-max-position-embeddings", "4096"]
DSV2_TINY = ["--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "192",
             "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "64",
             "--num-experts", "8", "--moe-router-topk", "3", "--seq-length", "64",
             "--max-position-embeddings", "64", "--kv-lora-rank", "16", "--qk-head-dim", "16",
             "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--rotary-scaling-factor", "4",
             "--original-max-position-embeddings", "16"]
# After COMMON (the later flag wins): DeepSeek's attention, routing and loss.
DSV2_COMMON = ["--multi-latent-attention", "--rope-type", "yarn", "--qk-layernorm",
               "--norm-epsilon", "1e-6", "--moe-router-pre-softmax",
               "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3",
               "--vocab-size", "102399"]  # NullTokenizer adds EOD: 102400, DeepSeek-V2's
COMMON = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
          "--disable-bias-linear", "--untie-embeddings-and-output-weights",
          "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
          "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2",
          "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
          "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
          "--lr-warmup-iters", "5", "--clip-grad", "1.0", "--eval-iters", "0",
          "--eval-interval", "1000000", "--split", "100,0,0",
          "--attention-dropout", "0.0", "--hidden-dropout", "0.0"]


def without(argv: list[str], flags: dict[str, int]) -> list[str]:
    """``argv`` without each ``flag`` of ``flags`` and the number of values it takes."""
    out = list(argv)
    for flag, n in flags.items():
        i = out.index(flag)
        del out[i:i + 1 + n]
    return out


def _model_argv(args) -> list[str]:
    """The model's flags and COMMON, for ``--model`` (``--tiny``: its small version)."""
    if args.model == "moe-1b":
        if args.layers is not None:
            raise SystemExit("--layers applies to --model deepseek-v2-lite; pass --num-layers")
        return (TINY if args.tiny else MODEL) + COMMON
    layers = args.layers or (3 if args.tiny else 5)
    if layers < 2:
        raise SystemExit(f"--layers {layers}: deepseek-v2-lite needs >= 2 (the first is dense)")
    pattern = ["--num-layers", str(layers), "--moe-layer-freq", f"([0]*1+[1]*{layers - 1})"]
    return (DSV2_TINY if args.tiny else DSV2_LITE) + pattern + COMMON + DSV2_COMMON


# --smoke: sizes that are multiples of 128 (FP8 blockwise) and the emulated FP8 GEMMs on CPU.
SMOKE = ["--hidden-size", "128", "--ffn-hidden-size", "256", "--moe-ffn-hidden-size", "128"]
FP8_TARGET = 1.3  # issue #21: FP8 tokens/s over bf16 in the same run


def fp8_flags(variant: str, emulated: bool = False) -> list[str]:
    """``recipe[+bf16wgrad][@backend]`` (``fp8_moe_layer.parse_variant``'s names) -> training
    flags, hybrid format; ``emulated``: the emulated FP8 GEMMs (CPU smoke runs)."""
    opts = parse_variant(variant)
    if opts["cache"]:
        raise argparse.ArgumentTypeError(
            f"--compare-fp8 {variant}: +cache is a layer-benchmark option (the training loop "
            "quantises each weight once per optimizer step already); drop it")
    return ["--fp8-format", "hybrid", "--fp8-recipe", opts["recipe"],
            *([] if opts["wgrad"] else ["--no-fp8-wgrad"]),
            *(["--fp8-gemm-backend", "emulated"] if emulated else
              ["--fp8-gemm-backend", opts["gemm_backend"]] if opts["gemm_backend"] else [])]


def compare_fp8(recipes: list[str], argv: list[str], smoke: bool) -> list[dict]:
    """Run this script once in bf16 and once per FP8 ``recipe`` (hybrid format), each in its own
    process with the same other flags; print tokens/s and the ratio to bf16."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in [None, *recipes]:
            extra = [] if recipe is None else fp8_flags(recipe, emulated=smoke)
            out = Path(tmp) / f"{recipe or 'bf16'}.json"
            subprocess.run([sys.executable, __file__, *argv, *extra, "--json", str(out)],
                           check=True)
            rows.append({"recipe": recipe or "bf16", **json.loads(out.read_text())})
    base = rows[0]["tokens_per_sec"]
    print(f"\n{'run':<12}{'tokens/s':>12}{'x bf16':>8}{'peak GiB':>10}  (target >= {FP8_TARGET}x)")
    for r in rows:
        r["speedup"] = r["tokens_per_sec"] / base
        print(f"{r['recipe']:<12}{r['tokens_per_sec']:>12.0f}{r['speedup']:>8.2f}"
              f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-':>10}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--skip", type=int, default=1, help="logged intervals to drop (warm-up)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="4 (moe-1b); 2 for deepseek-v2-lite (8192 tokens of 4096: its fp32 "
                        "logits over 102400 ids are large)")
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model", default="moe-1b", choices=["moe-1b", "deepseek-v2-lite"],
                   help="moe-1b: the ~1B MoE above; deepseek-v2-lite: DeepSeek-V2-Lite's shape "
                        "(MLA, 64 experts top-6 + 2 shared, first layer dense) at --layers")
    p.add_argument("--layers", type=int, default=None,
                   help="deepseek-v2-lite's layers, the first dense (default 5; 3 with --tiny)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compare-fp8", default=None,
                   type=lambda s: [c for c in s.split(",") if c and fp8_flags(c)],
                   help="comma-separated FP8 recipes (a recipe+bf16wgrad adds --no-fp8-wgrad): "
                        "run bf16 and each of them (hybrid) and print the tokens/s ratios")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: --tiny --device cpu, 6 iterations, sizes of 128")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="cap this process's CUDA allocations (e.g. 79 to check that a "
                        "configuration fits an 80 GB H100 on a larger GPU)")
    args, extra = p.parse_known_args()
    if args.compare_fp8:
        rest = [a for a in sys.argv[1:] if a not in ("--compare-fp8", ",".join(args.compare_fp8))]
        rows = compare_fp8(args.compare_fp8, [a for a in rest if a != "--json" and
                                              a != str(args.json)], args.smoke)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    if args.smoke:
        args.tiny, args.device, args.iters, args.log_interval, args.skip = True, "cpu", 6, 2, 0
        extra = SMOKE + extra
    if args.max_memory_gib is not None:
        import torch

        if not torch.cuda.is_available():
            p.error("--max-memory-gib caps CUDA memory; there is no CUDA device here")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * 2**30 / total))
    if args.micro_batch_size is None:
        args.micro_batch_size = 2 if args.model == "deepseek-v2-lite" else 4
    gbs = args.global_batch_size or args.micro_batch_size
    argv = _model_argv(args) + [
        "--train-iters", str(args.iters), "--log-interval", str(args.log_interval),
        "--lr-decay-iters", str(args.iters), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(gbs), "--expert-model-parallel-size", str(args.ep)]
    if not args.tiny:
        argv.append("--bf16")
    if args.device:
        argv += ["--device", args.device]
    summary = pretrain(argv + extra)
    full = argv + extra
    seq = int(full[len(full) - 1 - full[::-1].index("--seq-length") + 1])
    tok = summary["tokens_per_sec"][args.skip:] or summary["tokens_per_sec"]
    mfu = [m for m in (summary["mfu"][args.skip:] or summary["mfu"]) if m is not None]
    phases = [p for p in (summary["phase_ms"][args.skip:] or summary["phase_ms"]) if p]
    peak = [m for m in summary["peak_memory_gib"] if m is not None]
    result = {"tokens_per_sec": statistics.median(tok),
              "mfu_percent": statistics.median(mfu) * 100 if mfu else None,
              "ms_per_iter": gbs * seq / statistics.median(tok) * 1e3,
              # GPU-timeline ms per iteration of each phase of train_step (median interval)
              "phase_ms": {k: round(statistics.median(p[k] for p in phases), 2)
                           for k in (phases[0] if phases else {})},
              "peak_memory_gib": round(max(peak), 2) if peak else None,
              "flops_per_token": summary["flops_per_token"], "argv": argv + extra,
              "final_lm_loss": summary["lm_loss"][-1]}
    print(json.dumps({k: v for k, v in result.items() if k != "argv"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
