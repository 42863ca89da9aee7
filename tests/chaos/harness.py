"""Start the 4 ranks of a ``pretrain`` run as separate processes (through
:mod:`tests.chaos.launcher`), and when one dies SIGKILL the rest, as torchrun does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from tests.dist_harness import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A tiny MoE GPT with dropout on (every RNG stream matters for a bitwise resume).
TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
    "--seq-length 16 --max-position-embeddings 16 --num-experts 4 --moe-router-topk 2 "
    "--moe-ffn-hidden-size 32 --moe-aux-loss-coeff 1e-2 --mock-data --vocab-size 15 "
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --min-lr 1e-3 "
    "--lr-decay-style cosine --lr-warmup-iters 1 --clip-grad 1.0 --disable-bias-linear "
    "--device cpu --num-workers 0 --seed 1234 --eval-iters 0 --log-interval 100"
).split()


def launch(tmp, name: str, fault: str, argv: list[str], world: int = 4,
           timeout: float = 150.0) -> tuple[list[int], list[dict]]:
    """Run ``pretrain argv`` on ``world`` ranks with ``fault`` (see the launcher); returns the
    exit codes (-9: SIGKILLed) and rank 0's per-iteration records."""
    record = os.path.join(tmp, f"{name}.jsonl")
    port = free_port()
    logs, procs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        logs.append(open(os.path.join(tmp, f"{name}.rank{rank}.log"), "w+"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.launcher", fault, record, "--", *argv],
            cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                assert failed, f"{name}: timed out after {timeout:.0f}s\n" + _tail(logs)
            time.sleep(0.05)
    finally:
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    if fault == "none":
        assert codes == [0] * world, f"{name}: exit codes {codes}\n" + _tail(logs)
    for f in logs:
        f.close()
    records = []
    if os.path.exists(record):
        with open(record) as f:
            records = [json.loads(line) for line in f]
    return codes, records


def _tail(logs) -> str:
    out = []
    for r, f in enumerate(logs):
        f.flush()
        f.seek(0)
        out.append(f"--- rank {r} ---\n" + f.read()[-2500:])
    return "\n".join(out)


def same_state(a, b, where: str = "") -> list[str]:
    """Paths at which two loaded checkpoint states differ (tensors compared bitwise)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        ok = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in same_state(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_state(x, y, f"{where}/{i}")]
    return [] if a == b else [where]
