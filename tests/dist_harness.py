"""Run a function on N gloo ranks in spawned processes, for multi-rank tests on CPU.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes on a free port, calls
``fn(rank, world_size, *args)`` in each after ``init_process_group("gloo")``, and fails the test
with every failing rank's traceback. A run that exceeds ``timeout`` seconds is killed and fails
(a hang fails fast instead of stalling CI). ``fn`` must be a module-level function.

Starting a process costs seconds (importing torch), so put many checks in one ``fn``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle bytes, not the queue's own pickler: that one passes tensors as shared-memory
        # file descriptors, which the parent can fetch only while this process is alive (a rank
        # that exits first makes the parent's get() fail with "Connection reset by peer").
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from moecore import parallel_state

            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, object]] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, payload = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                    and r not in outcomes]
            if dead:
                errors.append(f"ranks {dead} exited with codes "
                              f"{[procs[r].exitcode for r in dead]} before reporting")
                break
            continue
        outcomes[rank] = (status, payload)
        if status == "error":
            errors.append(f"--- rank {rank} failed ---\n{payload}")
            break  # other ranks are likely blocked in a collective now
    timed_out = len(outcomes) < world_size and not errors
    for p in procs:
        p.join(timeout=5 if not (errors or timed_out) else 0.5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    # Collect errors other ranks reported while we were shutting down.
    while True:
        try:
            rank, status, payload = results.get_nowait()
        except queue.Empty:
            break
        if status == "error" and rank not in outcomes:
            errors.append(f"--- rank {rank} failed ---\n{payload}")
        outcomes.setdefault(rank, (status, payload))
    if timed_out:
        missing = sorted(set(range(world_size)) - set(outcomes))
        raise AssertionError(f"distributed test timed out after {timeout:.0f}s; "
                             f"ranks {missing} did not finish (deadlock?)")
    if errors:
        raise AssertionError("\n".join(errors))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
