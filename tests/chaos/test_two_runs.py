"""Fault injection: two real training runs (``pretrain_gpt.py`` subprocesses, tiny model on
CPU) started on one ``--save``. The second stops at start-up with one line naming the first
(host, pid, start time) and exit code 2; the first's checkpoints stay intact, and after the
first is killed its lock is taken over with a warning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from moecore.checkpointing import CHECKPOINT_FILENAME, read_tracker
from moecore.checkpointing.run_lock import acquire_run_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("--num-layers 1 --hidden-size 16 --num-attention-heads 4 --seq-length 8 "
        "--micro-batch-size 2 --lr 1e-3 --mock-data --vocab-size 31 --device cpu "
        "--num-workers 0 --eval-iters 0 --log-interval 1000 --train-iters 1000000 "
        "--save-interval 5").split()


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _start(save: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *TINY,
                             "--save", save], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.chaos
def test_second_run_on_one_save_stops_and_the_first_keeps_its_checkpoints(tmp_path):
    save = str(tmp_path / "ckpt")
    first = _start(save)
    try:
        deadline = time.monotonic() + 180
        while read_tracker(save) is None:  # the first run trains and has saved
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run saved nothing in 180 s"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *TINY,
                                 "--save", save], cwd=REPO, env=_env(), capture_output=True,
                                text=True, timeout=180)
        assert first.poll() is None, "the first run must still be training"
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the kernel drops its flock
        first.wait(timeout=60)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith(f"error: --save {save} is in use by another run (host "
                               f"{socket.gethostname()}, pid {first.pid}, started "), lines[0]
    # The first run's checkpoints: every published iteration is complete and its own.
    latest = read_tracker(save)
    iterations = sorted(int(d[5:]) for d in os.listdir(save) if d.startswith("iter_")
                        and d[5:].isdigit())
    assert latest in iterations and all(i % 5 == 0 for i in iterations), iterations
    for i in iterations:
        state = torch.load(os.path.join(save, f"iter_{i:07d}", "mp_rank_00_000",
                                        CHECKPOINT_FILENAME), weights_only=True)
        assert state["iteration"] == i and state["args"]["save"] == save
    # Its lock record outlived it: the next run takes the lock over with a warning.
    warnings: list[str] = []
    acquire_run_lock(save, warn=warnings.append).release()
    assert len(warnings) == 1 and f"pid {first.pid}" in warnings[0] and "gone" in warnings[0]
