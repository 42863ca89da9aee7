"""Single-GPU training speed of one MoE model in four trainers, in one run: (a) moecore at its
fastest one-GPU configuration, (b) torchtitan (its Llama-4 MoE, torch.compile per block),
(c) Megatron-Core (GPTModel + MoE, local spec: no Transformer Engine), (d) moecore's dense twin
(one SwiGLU MLP of 2 x 2816 per layer: the same active FLOPs). Prints tokens/s, MFU (moecore's
formula for all, ``moecore/training/mfu.py``), peak memory and the loss at the last step.

Model: ``benchmarks/e2e.py``'s (hidden 1024, 16 layers, 16 heads, 16 experts top-2, expert FFN
2816, seq 2048, vocab 32000 + EOD padded to 32128), bf16; the same mock tokens (moecore's
``MockGPTDataset``, seed 1234) and global batch for all; AdamW (0.9, 0.95, wd 0.1), lr 3e-4
warm-up 5 then cosine to 3e-5, clip 1.0; 30 steps, timed in intervals of 5 after the first 10.
Each contender runs in its own process with its own timeout; one that runs out of memory is
retried at half its micro-batch. ``--max-memory-gib 79`` (default) caps each process as an
80 GB H100.

Device run (one GPU; wheels of torchtitan, megatron-core and their missing deps in .whl/,
carried with ``carry: [".whl"]``; no NCCL settings needed for one GPU)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 python3 benchmarks/e2e_compare.py --json $OUT/e2e_compare.json

CPU smoke run (tiny shapes; contenders whose package is missing are reported, not run)::

    python benchmarks/e2e_compare.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import compare_common as cc  # noqa: E402
from benchmarks.e2e import COMMON, without  # noqa: E402
from moecore.training import pretrain  # noqa: E402

CONTENDERS = ("moecore", "torchtitan", "megatron-core", "moecore-dense")
# (micro-batch, timeout s) per contender on the GPU. moecore: its fastest configuration within
# 79 GiB (docs/benchmarks.md: mbs 16 + CUDA graphs + selective recompute, 67 GiB).
# torchtitan keeps fp32 weights (autocast) and Megatron-Core's unfused attention keeps
# [mbs, heads, seq, seq] scores per layer: smaller micro-batches.
GPU_DEFAULTS = {"moecore": (16, 120), "torchtitan": (8, 160), "megatron-core": (2, 200),
                "moecore-dense": (16, 90)}
MOECORE_FAST = ["--bf16", "--cuda-graph-impl", "local", "--cuda-graph-warmup-steps", "2",
                "--recompute-granularity", "selective"]


def moecore_argv(shape: cc.Shape, recipe: cc.Recipe, micro_batch: int, dense: bool,
                 device: str) -> list[str]:
    """pretrain_gpt.py flags: e2e.py's COMMON recipe at ``shape``, the shared optimizer
    settings, and (on CUDA) the fastest one-GPU configuration."""
    common = without(COMMON, {"--moe-grouped-gemm": 0, "--moe-token-dispatcher-type": 1,
                              "--moe-router-load-balancing-type": 1,
                              "--moe-aux-loss-coeff": 1}) if dense else list(COMMON)
    model = ["--num-layers", shape.layers, "--hidden-size", shape.hidden,
             "--num-attention-heads", shape.heads, "--seq-length", shape.seq,
             "--max-position-embeddings", shape.seq, "--vocab-size", shape.vocab,
             "--ffn-hidden-size", shape.dense_ffn if dense else shape.expert_ffn]
    if not dense:
        model += ["--num-experts", shape.experts, "--moe-router-topk", shape.topk,
                  "--moe-ffn-hidden-size", shape.expert_ffn]
    run = ["--train-iters", recipe.steps, "--lr-decay-iters", recipe.steps,
           "--log-interval", recipe.log_interval, "--lr-warmup-iters", recipe.lr_warmup,
           "--micro-batch-size", micro_batch, "--global-batch-size", recipe.global_batch,
           "--lr", recipe.lr, "--min-lr", recipe.min_lr, "--weight-decay", recipe.weight_decay,
           "--adam-beta1", recipe.betas[0], "--adam-beta2", recipe.betas[1],
           "--adam-eps", recipe.eps, "--clip-grad", recipe.clip_grad, "--seed", cc.SEED]
    fast = MOECORE_FAST + ["--recompute-modules", "layernorm"] + ([] if dense else ["moe_act"])
    tail = fast if device == "cuda" else ["--device", "cpu", "--num-workers", "0"]
    return [str(a) for a in common + model + run + tail]  # the later flag wins


def run_moecore(shape: cc.Shape, recipe: cc.Recipe, device: torch.device, micro_batch: int,
                dense: bool) -> dict:
    """moecore's pretrain loop (the one pretrain_gpt.py runs) on ``moecore_argv``."""
    argv = moecore_argv(shape, recipe, micro_batch, dense, device.type)
    summary = pretrain(argv)
    skip = recipe.warmup // recipe.log_interval
    tok = summary["tokens_per_sec"][skip:] or summary["tokens_per_sec"]
    seconds = [recipe.global_batch * shape.seq * recipe.log_interval / t for t in tok]
    name = "moecore-dense" if dense else "moecore"
    rec = cc.result(name, shape, dataclasses.replace(recipe, warmup=0), seconds,
                    summary["lm_loss"], device, micro_batch, dense=dense)
    return {**rec, "argv": " ".join(argv)}


def worker(args) -> None:
    """Run one contender in this process and write its record (``--out``)."""
    shape = cc.SMOKE if args.smoke else cc.FULL
    recipe = recipe_from(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cc.cap_memory(device, args.max_memory_gib)
    try:
        if args.worker in ("moecore", "moecore-dense"):
            rec = run_moecore(shape, recipe, device, args.micro_batch,
                              args.worker == "moecore-dense")
        elif args.worker == "torchtitan":
            from benchmarks import compare_torchtitan  # needs the torchtitan package

            rec = compare_torchtitan.run(shape, recipe, device, args.micro_batch,
                                         compile_model=not args.smoke)
        else:
            from benchmarks import compare_megatron  # needs the megatron-core package

            rec = compare_megatron.run(shape, recipe, device, args.micro_batch)
    except torch.OutOfMemoryError as e:
        rec = {"name": args.worker, "status": "oom", "error": str(e).split("\n")[0][:200]}
    except ModuleNotFoundError as e:
        rec = {"name": args.worker, "status": f"not installed: {e.name}"}
    cc.write_result(Path(args.out), {"device": str(device), **rec})


def recipe_from(args) -> cc.Recipe:
    if args.smoke:
        return cc.Recipe(steps=4, warmup=2, log_interval=2, global_batch=4, lr_warmup=1)
    return cc.Recipe(steps=args.steps, warmup=args.warmup, log_interval=args.log_interval,
                     global_batch=args.global_batch_size)


def run_contender(name: str, args, micro_batch: int, timeout: float) -> dict:
    """Run ``name`` in a subprocess; on out-of-memory retry at half the micro-batch while
    time is left. Returns its record (status says what went wrong, if anything)."""
    deadline = time.monotonic() + timeout
    while True:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out),
                   "--micro-batch", str(micro_batch), *passthrough(args)]
            try:
                proc = subprocess.run(cmd, timeout=max(deadline - time.monotonic(), 1),
                                      capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                return {"name": name, "status": f"timeout after {timeout:.0f} s",
                        "micro_batch": micro_batch}
            if args.log_dir:
                Path(args.log_dir, f"{name}-mbs{micro_batch}.log").write_text(
                    proc.stdout + proc.stderr)
            if out.exists():
                rec = json.loads(out.read_text())
            else:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                rec = {"name": name, "status": f"failed (rc {proc.returncode}): {last[0][:200]}"}
        if rec["status"] != "oom" or micro_batch == 1 or time.monotonic() > deadline:
            return {"micro_batch": micro_batch, **rec}
        print(f"{name}: out of memory at micro-batch {micro_batch}; retrying at "
              f"{micro_batch // 2}", flush=True)
        micro_batch //= 2


def passthrough(args) -> list[str]:
    flags = ["--steps", args.steps, "--warmup", args.warmup, "--log-interval",
             args.log_interval, "--global-batch-size", args.global_batch_size]
    if args.max_memory_gib is not None:
        flags += ["--max-memory-gib", args.max_memory_gib]
    return [str(f) for f in flags] + (["--smoke"] if args.smoke else [])


def table(records: list[dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{'contender':<15}{'mbs':>4}{'tokens/s':>11}{'MFU %':>7}{'peak GiB':>9}"
             f"{'loss':>8}  status"]
    for r in records:
        lines.append(f"{r['name']:<15}{fmt(r.get('micro_batch'), 'd'):>4}"
                     f"{fmt(r.get('tokens_per_sec'), ',.0f'):>11}"
                     f"{fmt(r.get('mfu_percent'), '.1f'):>7}"
                     f"{fmt(r.get('peak_memory_gib'), '.2f'):>9}"
                     f"{fmt(r.get('loss'), '.4f'):>8}  {r['status']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--log-interval", type=int, default=5, help="steps per timed interval")
    p.add_argument("--global-batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="one micro-batch for every contender (default: per contender)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per contender (default: per contender, 100-210)")
    p.add_argument("--max-memory-gib", type=float, default=79.0,
                   help="cap each contender's CUDA allocations (79: an 80 GB H100)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 4 steps")
    p.add_argument("--log-dir", default=None, help="write each contender's output here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup >= args.steps or args.steps % args.log_interval:
        p.error("--steps must exceed --warmup and be a multiple of --log-interval")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    records = []
    for name in args.contenders:
        mbs, timeout = GPU_DEFAULTS[name]
        if args.smoke:
            mbs, timeout = 2, 300
        rec = run_contender(name, args, args.micro_batch or mbs, args.timeout or timeout)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
