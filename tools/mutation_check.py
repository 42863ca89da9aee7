"""Mutation check: does the test suite catch realistic bugs in the core modules?

Each mutation is a text substitution in one file (a sign, a scale, an order, an off-by-one).
For each, the tree is copied to a temporary folder (the working tree: uncommitted edits count),
the substitution applied there (with an optional rebuild, e.g. the C++ helpers), and only the
tests mapped to that mutation run there. A mutation is *caught* when those tests fail. The
unmutated tests are run first in the same way (``--no-baseline`` skips that), so a failure
that is there anyway does not count as a catch.

    python tools/mutation_check.py                   # every mutation, markdown table on stdout
    python tools/mutation_check.py -k capacity wsd   # the mutations whose name contains a word
    python tools/mutation_check.py --list
    python tools/mutation_check.py --skip-rebuild    # C++ mutations reported as skipped

Exit status: 0 when every mutation that ran was caught, 1 otherwise, 2 on a stale mutation
(its text no longer found exactly once: update the list with the code).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".pylib*", "__pycache__", "*.egg-info", "build",
                                     ".ruff_cache", ".pytest_cache", ".venv", "venv")
PYTEST = (sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")
REBUILD_HELPERS = (sys.executable, "setup.py", "-q", "build_ext", "--inplace")


def interpreted(*checks: str) -> tuple[str, ...]:
    """Run Triton checks (tests/unit/triton_interpret_checks.py) under the CPU interpreter:
    the checks ``test_fused_kernels.py::test_triton_kernels_under_interpreter`` runs, only
    the ones named."""
    return (sys.executable, "-m", "tests.unit.triton_interpret_checks", *checks)


@dataclass(frozen=True)
class Mutation:
    """``edits``: (old, new) substitutions in ``path``, each ``old`` found exactly once;
    ``tests``: pytest arguments (files or node ids), or ``command``: another command whose
    failure means caught; ``rebuild``: run in the copy after editing."""

    name: str
    path: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    rebuild: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def _m(name, path, old, new, *tests, **kw) -> Mutation:
    return Mutation(name, path, ((old, new),), tuple(tests), **kw)


TRITON = (("TRITON_INTERPRET", "1"), ("PYTHONWARNINGS", "ignore"))
MUTATIONS = [
    # -- the four the audit of issue 26 found uncaught
    _m("capacity round instead of ceil", "moecore/moe/capacity.py",
       "capacity = math.ceil((num_tokens / num_experts) * capacity_factor)",
       "capacity = round((num_tokens / num_experts) * capacity_factor)",
       "tests/unit/test_capacity.py"),
    _m("WSD decay iters not scaled by global batch", "moecore/optimizer/lr_scheduler.py",
       "wsd = (args.lr_wsd_decay_iters or 0) * gbs", "wsd = args.lr_wsd_decay_iters or 0",
       "tests/unit/test_lr_scheduler.py"),
    _m("cosine weight-decay increment reversed", "moecore/optimizer/lr_scheduler.py",
       "coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)",
       "coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)", "tests/unit/test_lr_scheduler.py"),
    Mutation("tracker written before the folder rename", "moecore/checkpointing.py", (
        ("        _fsync_dir(root)\n        _replace_tracker(root, iteration)\n    _barrier()",
         "        _fsync_dir(root)\n    _barrier()"),
        ("    if is_root:\n        if os.path.exists(final_dir):",
         "    if is_root:\n        _replace_tracker(root, iteration)\n"
         "        if os.path.exists(final_dir):")),
        ("tests/unit/test_checkpointing.py", "-k", "crash")),
    # -- the ones the audit found caught
    _m("sigmoid router weights not normalised", "moecore/moe/router.py",
       "weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)", "weights = weights",
       "tests/unit/test_router.py"),
    _m("aux-loss scale without num_experts", "moecore/moe/losses.py",
       "scale = num_experts * coeff / (topk", "scale = coeff / (topk",
       "tests/unit/test_moe_losses.py"),
    _m("all-to-all input/output splits swapped", "moecore/moe/dispatcher/alltoall.py",
       "tokens = all_to_all(permuted, self.output_splits, self.input_splits,",
       "tokens = all_to_all(permuted, self.input_splits, self.output_splits,",
       "tests/parallel/test_moe_layer_parallel.py::test_moe_layer_world2_matches_reference"),
    _m("expert gradients scaled by 1/edp, not 1/dp", "moecore/optimizer/grad_buffer.py",
       'self.scale = 1.0 / ps.world_size_of("data_parallel_with_cp")',
       "self.scale = 1.0 / ps.world_size_of(kind)",
       "tests/parallel/test_distributed_optimizer.py"),
    _m("C++ sample index offset off by one", "csrc/helpers.cpp",
       "doc_offset += remaining_seq_length + doc_length - 1;",
       "doc_offset += remaining_seq_length + doc_length;",
       "tests/unit/test_sample_index.py", rebuild=REBUILD_HELPERS),
    _m("global aux loss not rescaled to the micro-batch", "moecore/moe/router.py",
       "return loss * (t_global / t_shard)", "return loss",
       "tests/parallel/test_router_parallel.py"),
    _m("Triton combine backward drops the prob", "moecore/kernels/combine.py",
       "(p * g).to(grad_rows_ptr.dtype.element_ty)", "g.to(grad_rows_ptr.dtype.element_ty)",
       command=interpreted("combine"), env=TRITON),
    # -- more
    _m("position drop policy keeps capacity - 1", "moecore/moe/capacity.py",
       "return routing_map & (order <= capacity)", "return routing_map & (order < capacity)",
       "tests/unit/test_capacity.py"),
    _m("z-loss not squared", "moecore/moe/losses.py",
       "torch.mean(torch.square(torch.logsumexp(logits, dim=-1)))",
       "torch.mean(torch.logsumexp(logits, dim=-1))", "tests/unit/test_moe_losses.py"),
    _m("grad clipping also scales up", "moecore/optimizer/clip_grads.py",
       "        if coeff < 1.0:\n            grads = [p.grad",
       "        if coeff != 1.0:\n            grads = [p.grad", "tests/unit/test_optimizer.py",
       "-k", "clip"),
    _m("Triton permute backward sums k - 1 rows", "moecore/kernels/permute.py",
       "        for j in tl.static_range(K):\n            src = tl.load(slot_rows_ptr",
       "        for j in tl.static_range(K - 1):\n            src = tl.load(slot_rows_ptr",
       command=interpreted("permute"), env=TRITON),
    _m("router init std ignored", "moecore/moe/router.py",
       "weight.normal_(0.0, config.init_method_std)", "weight.normal_(0.0, 0.02)",
       "tests/unit/test_router.py"),
]


def _apply(root: Path, m: Mutation) -> None:
    path = root / m.path
    text = path.read_text()
    for old, new in m.edits:
        if text.count(old) != 1:
            raise LookupError(f"stale mutation {m.name!r}: {old!r} occurs {text.count(old)} "
                              f"times in {m.path}; update MUTATIONS in {Path(__file__).name}")
        text = text.replace(old, new)
    path.write_text(text)


def _count(output: str) -> str:
    """'3 passed, 1 failed' from pytest's summary line, or the checks' PASS/FAIL lines."""
    summary = [line for line in output.splitlines()
               if re.search(r"\d+ (passed|failed|errors?|skipped).* in [0-9.]+s", line)]
    found = re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary[-1] if summary else "")
    if found:
        return ", ".join(f"{n} {what}" for n, what in found)
    return ", ".join(f"{len(re.findall(rf'^{w} ', output, re.M))} {w.lower()}"
                     for w in ("PASS", "FAIL"))


def _run(root: Path, m: Mutation, timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **dict(m.env),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = m.command or (*PYTEST, *m.tests)
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def check(m: Mutation, baseline: bool, skip_rebuild: bool, timeout: int) -> dict:
    """Run one mutation in a fresh copy of the tree; returns the table row."""
    row = {"mutation": m.name, "file": m.path,
           "tests": " ".join(m.tests) or " ".join(m.command[1:]), "seconds": 0.0}
    if m.rebuild and skip_rebuild:
        return {**row, "caught": "skipped (needs a rebuild: rerun without --skip-rebuild)",
                "ran": "-"}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(REPO, root, ignore=COPY_IGNORE)
        if baseline:
            rc, out = _run(root, m, timeout)
            if rc != 0:
                return {**row, "caught": f"baseline fails (rc {rc}): {_count(out)}",
                        "ran": _count(out), "seconds": time.monotonic() - start}
        _apply(root, m)
        if m.rebuild:
            built = subprocess.run(m.rebuild, cwd=root, capture_output=True, text=True)
            if built.returncode != 0:
                return {**row, "caught": f"rebuild failed: {built.stderr[-300:]}", "ran": "-",
                        "seconds": time.monotonic() - start}
        rc, out = _run(root, m, timeout)
    caught = {0: "no", 1: "yes"}.get(rc, f"error (rc {rc})")
    if m.command and rc not in (0, -1):
        caught = "yes"
    return {**row, "caught": caught, "ran": _count(out), "seconds": time.monotonic() - start}


def table(rows: list[dict]) -> str:
    lines = ["| mutation | file | tests run | caught | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mutation']} | `{r['file']}` | `{r['tests']}` ({r['ran']}) | "
                     f"{r['caught']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", nargs="*", default=None, help="words: run mutations whose name "
                   "contains any of them (case-insensitive)")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip running each test subset on the unmutated copy first")
    p.add_argument("--skip-rebuild", action="store_true",
                   help="skip mutations that need a rebuild (the C++ helpers)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS
              if not args.k or any(w.lower() in m.name.lower() for w in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests) or ' '.join(m.command[1:])}")
        return 0
    for m in chosen:  # stale texts fail before anything runs
        _apply_check = (REPO / m.path).read_text()
        for old, _ in m.edits:
            if _apply_check.count(old) != 1:
                print(f"stale mutation {m.name!r}: {old!r} is not in {m.path} exactly once",
                      file=sys.stderr)
                return 2
    rows = []
    for m in chosen:
        rows.append(check(m, not args.no_baseline, args.skip_rebuild, args.timeout))
        r = rows[-1]
        print(f"{r['mutation']}: caught={r['caught']} ({r['ran']}, {r['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    print(table(rows))
    return 0 if all(r["caught"] == "yes" or r["caught"].startswith("skipped")
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
