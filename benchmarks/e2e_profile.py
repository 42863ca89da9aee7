"""Profile the end-to-end training step of ``benchmarks/e2e.py`` with ``torch.profiler``.

    python benchmarks/e2e_profile.py --micro-batch-size 4 --out /tmp/prof
    python benchmarks/e2e_profile.py --contender moecore-dense --micro-batch-size 16 --iters 8 \
        --log-interval 2 --profile-start 7 --profile-iters 1   # e2e_compare's configuration

Runs ``pretrain`` on the e2e model for ``--iters`` iterations; iterations
``--profile-start .. --profile-start + --profile-iters - 1`` (1-based) run under the profiler.
Prints tokens/s and MFU of the logged intervals that end before profiling starts, peak GPU
memory, the top kernels by CUDA time, the host-side syncs and a GPU busy/idle summary, and
writes a gzipped Chrome trace of the profiled iterations to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import COMMON, MODEL, TINY  # noqa: E402

from moecore.training import loop  # noqa: E402

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
            "cudaEventSynchronize", "aten::item", "aten::_local_scalar_dense",
            "aten::nonzero", "aten::masked_select", "aten::to", "aten::copy_")


def _argv(mbs: int, iters: int, log_interval: int, extra: list[str],
          contender: str | None = None) -> list[str]:
    tiny = not torch.cuda.is_available()  # CPU smoke run
    if contender is not None:  # exactly what e2e_compare.py runs for that contender
        from benchmarks import compare_common as cc
        from benchmarks.e2e_compare import moecore_argv
        gbs = contender_gbs(extra) or (mbs if tiny else cc.Recipe().global_batch)
        recipe = cc.Recipe(steps=iters, warmup=0, log_interval=log_interval,
                           global_batch=int(gbs), lr_warmup=min(5, iters - 1))
        return moecore_argv(cc.SMOKE if tiny else cc.FULL, recipe, mbs,
                            contender == "moecore-dense", "cpu" if tiny else "cuda") + extra
    return (TINY if tiny else MODEL) + COMMON + [
        "--train-iters", str(iters), "--log-interval", str(log_interval),
        "--lr-decay-iters", str(iters), "--micro-batch-size", str(mbs),
        "--global-batch-size", str(mbs)] + ([] if tiny else ["--bf16"]) + extra


def contender_gbs(extra: list[str]) -> str | None:
    """``--global-batch-size`` among the extra flags, if given."""
    return extra[extra.index("--global-batch-size") + 1] if "--global-batch-size" in extra \
        else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Kernel-name substrings -> category, first match wins (names as CUDA/Triton report them).
CATEGORIES = (("grouped GEMM", ("cutlass", "grouped")), ("attention", ("sdpa", "flash", "fmha",
              "attention")), ("GEMM", ("nvjet", "gemm", "sm90_xmma", "cublas")),
              ("optimizer", ("adam", "multi_tensor_apply")), ("norm", ("norm", "GammaBeta",
              "_rms_")), ("main-grad accumulate", ("_accumulate_kernel",)),
              ("Triton MoE/SwiGLU/RoPE/CE", ("_kernel",)), ("copy/cast", ("copy", "Memcpy")),
              ("elementwise/reduce", ("elementwise", "reduce", "Memset")))


def _kernels(prof):
    """The profiler's CUDA kernel/memcpy events (not the user annotations mirrored on the GPU)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and e.time_range.elapsed_us() > 0]


def _categories(prof, n_iters: int) -> dict[str, float]:
    """CUDA kernel ms per iteration by :data:`CATEGORIES` (``other`` for the rest)."""
    out: dict[str, float] = {}
    for e in _kernels(prof):
        name = e.name.lower()
        cat = next((c for c, keys in CATEGORIES if any(k.lower() in name for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + e.time_range.elapsed_us() / 1e3 / n_iters
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _kernel_summary(prof, n_iters: int, wall_s: float) -> dict:
    """GPU busy time (union of kernel intervals) per iteration vs wall time."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in _kernels(prof))
    busy, cur_s, cur_e = 0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return {"gpu_busy_ms_per_iter": busy / 1e3 / n_iters,
            "wall_ms_per_iter": wall_s * 1e3 / n_iters,
            "kernels_per_iter": len(spans) / n_iters}


def run(mbs: int, iters: int, log_interval: int, prof_start: int, prof_iters: int,
        out: Path | None, extra: list[str], rows: int, shapes: bool = False,
        contender: str | None = None) -> dict:
    state = {"n": 0, "prof": None, "t0": 0.0}
    orig = loop.train_step

    def step(*a, **k):
        state["n"] += 1
        n = state["n"]
        if prof_iters and n == prof_start:
            _sync()
            state["prof"] = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU,
                            torch.profiler.ProfilerActivity.CUDA], record_shapes=shapes)
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        result = orig(*a, **k)
        if state["prof"] is not None and n == prof_start + prof_iters - 1:
            _sync()
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
        return result

    loop.train_step = step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        summary = loop.pretrain(_argv(mbs, iters, log_interval, extra, contender))
    finally:
        loop.train_step = orig
    clean = max(1, (prof_start - 1) // log_interval) if prof_iters else len(
        summary["tokens_per_sec"])
    tok = summary["tokens_per_sec"][1:clean] or summary["tokens_per_sec"][:clean]
    mfu = [m for m in (summary["mfu"][1:clean] or summary["mfu"][:clean]) if m is not None]
    res = {"micro_batch_size": mbs, "tokens_per_sec": statistics.median(tok),
           "mfu_percent": statistics.median(mfu) * 100 if mfu else None,
           "intervals_tok_s": [round(t) for t in summary["tokens_per_sec"]],
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30
           if torch.cuda.is_available() else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30
           if torch.cuda.is_available() else None,
           "final_lm_loss": summary["lm_loss"][-1]}
    prof = state["prof"]
    if prof is not None:
        ka = prof.key_averages()
        print(f"===== mbs {mbs}: top {rows} by CUDA time ({prof_iters} iterations) =====")
        print(ka.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
        if shapes:  # which aten ops (and input shapes) launch the kernels; eager mode only
            print(f"===== mbs {mbs}: top {rows} ops by device time, by input shape =====")
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_device_time_total", row_limit=rows, max_name_column_width=40,
                max_shapes_column_width=80))
        print(f"===== mbs {mbs}: top 25 by self CPU time =====")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        print(f"===== mbs {mbs}: host syncs / copies =====")
        for e in ka:
            if e.key in SYNC_OPS or "Memcpy" in e.key or "Memset" in e.key:
                print(f"{e.key:40s} calls {e.count // prof_iters:6d}/iter  cpu "
                      f"{e.cpu_time_total / 1e3 / prof_iters:8.2f} ms/iter  cuda "
                      f"{e.device_time_total / 1e3 / prof_iters:8.2f} ms/iter")
        res.update(_kernel_summary(prof, prof_iters, state["wall"]))
        res["kernel_ms_per_iter_by_category"] = _categories(prof, prof_iters)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            tmp = Path("/tmp") / f"trace_mbs{mbs}.json"
            prof.export_chrome_trace(str(tmp))
            with open(tmp, "rb") as f, gzip.open(out / f"trace_mbs{mbs}.json.gz", "wb") as g:
                shutil.copyfileobj(f, g)
    print("RESULT", json.dumps(res))
    return res


def attention_bench(batch: int, heads: int, seq: int, dim: int) -> None:
    """fwd+bwd ms of core_attention's SDPA call per backend, with and without dropout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moecore.kernels.attention import core_attention

    def qkv():
        return [torch.randn(seq, batch, heads, dim, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True) for _ in range(3)]

    rows = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", None):
        for p in (0.0, 0.1):
            q, k, v = qkv()
            ctx = sdpa_kernel([getattr(SDPBackend, name)]) if name else contextlib.nullcontext()
            try:
                with ctx:
                    for _ in range(3):
                        core_attention(q, k, v, None, p).sum().backward()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        out = core_attention(q, k, v, None, p)
                        out.backward(torch.ones_like(out))
                    torch.cuda.synchronize()
                rows.append((name or "torch default", p, (time.perf_counter() - t0) * 100))
            except RuntimeError as e:
                rows.append((name, p, f"n/a ({str(e).splitlines()[0][:60]})"))
    print("===== attention fwd+bwd ms per call (B, H, S, d) =", (batch, heads, seq, dim))
    for r in rows:
        print(f"{r[0]:22s} dropout {r[1]}: {r[2]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batch-size", type=int, nargs="+", default=[4])
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--profile-start", type=int, default=21)
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--attn-bench", action="store_true")
    p.add_argument("--shapes", action="store_true",
                   help="record input shapes and print the ops by device time per shape")
    p.add_argument("--contender", choices=("moecore", "moecore-dense"), default=None,
                   help="profile e2e_compare.py's configuration of this contender (its model, "
                        "recipe and fastest flags; global batch 32 unless given) instead of "
                        "e2e.py's model at global batch = micro-batch")
    args, extra = p.parse_known_args()
    if args.attn_bench and torch.cuda.is_available():
        attention_bench(4, 16, 2048, 64)
    results = []
    for i, mbs in enumerate(args.micro_batch_size):
        prof_iters = args.profile_iters if i == 0 else 0
        results.append(run(mbs, args.iters, args.log_interval, args.profile_start, prof_iters,
                           args.out, extra, args.rows, args.shapes, args.contender))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("SUMMARY", json.dumps(results))


if __name__ == "__main__":
    main()
