"""Chaos: a storage stall during ``--async-save`` on one of 2 ranks. Training steps go on while
the write hangs; the checkpoint is published at the first iteration after every rank's write
has finished (not at the next save); and a NaN abort while a later save is being written still
publishes it once it completes."""

from __future__ import annotations

import math
import re
import threading

import pytest
import torch

from tests.chaos.harness import TINY
from tests.dist_harness import run_distributed

pytestmark = pytest.mark.chaos


def _stalled_run(rank, world_size, root):
    from moecore import checkpointing as ckpt
    from moecore.checkpointing import async_save, read_tracker
    from moecore.training import loop, pretrain

    release = {3: threading.Event(), 6: threading.Event()}
    stalled_out, seen, done = [], {}, [0]
    real_write, real_step = ckpt._write_file, loop.train_step

    def slow_write(obj, path):  # rank 1's disk hangs until the test releases it
        it = int(re.search(r"iter_(\d{7})", path).group(1))
        if rank == 1 and it in release and not release[it].wait(20):
            stalled_out.append(it)
        real_write(obj, path)

    def train_step(model, *args, **kwargs):
        it = done[0] + 1
        if it == 5:  # the write of 3, released after step 4, must be over before 5's check
            assert async_save.pending().wait(20)
        seen[it] = read_tracker(root)
        if it == 7:
            release[6].set()  # the write of 6 finishes during the abort
            with torch.no_grad():
                next(model[0].parameters()).fill_(math.nan)  # -> the NaN check raises
        out = real_step(model, *args, **kwargs)
        done[0] = it
        if it == 4:  # step 4 ran while the write of 3 hung: saving never blocked training
            release[3].set()
        return out

    ckpt._write_file, loop.train_step = slow_write, train_step
    argv = TINY + ["--expert-model-parallel-size", "2", "--train-iters", "10",
                   "--save-interval", "3", "--save", root, "--async-save"]
    try:
        pretrain(argv, log=lambda line: None)
        error = None
    except RuntimeError as e:
        error = str(e)
    return {"seen": seen, "stalled_out": stalled_out, "error": error,
            "tracker": read_tracker(root), "done": done[0]}


def test_stalled_async_write_never_blocks_steps_and_publishes_promptly(tmp_path):
    root = str(tmp_path / "ckpt")
    for rank, out in enumerate(run_distributed(_stalled_run, 2, root, timeout=180)):
        assert out["stalled_out"] == [], rank  # steps went on while rank 1's write hung
        assert out["seen"][4] is None and out["seen"][5] is None, out  # 3 still being written
        assert out["seen"][6] == 3, out  # published at iteration 5, before the save of 6
        assert out["seen"][7] == 3, out  # 6 still being written when step 7 starts
        assert "gradient norm is nan" in out["error"] and out["done"] == 6, out
        # Rank 0's abort handler published the completed save of 6 (other ranks only finish
        # their writes, so they may look before it did).
        assert out["tracker"] == 6 if rank == 0 else out["tracker"] in (3, 6), out
