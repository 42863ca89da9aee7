"""Test-only launcher: one rank of ``pretrain`` (torchrun's environment variables) with a fault
injected by monkeypatching, and a per-iteration record for the chaos tests.

    python -m tests.chaos.launcher FAULT RECORD -- PRETRAIN_ARGS...

``FAULT``: ``none``; ``kill-step:R:I`` (rank R SIGKILLs itself in iteration I, after the
forward-backward and before the gradient sync and optimizer step); ``kill-save:R:I`` (rank R's
disk stalls while writing its shard file of iteration I until iteration I + 2 starts, so every
other rank's write is long done and the per-iteration publish checks ran; then it SIGKILLs
itself halfway through the file). Rank 0 appends one JSON line per finished iteration to
``RECORD``: ``{"it", "loss", "consumed"}``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading

import torch

from moecore import checkpointing
from moecore.training import loop, pretrain
from moecore.training.state import RunState


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(fault: str, rank: int) -> None:
    if fault == "none":
        return
    kind, at_rank, at_it = fault.split(":")
    if int(at_rank) != rank:
        return
    at_it = int(at_it)
    real_start, current, later = RunState.iteration_start, {}, threading.Event()

    def iteration_start(self):
        current["it"] = self.iteration + 1
        if current["it"] >= at_it + 2:
            later.set()
        real_start(self)

    RunState.iteration_start = iteration_start
    if kind == "kill-step":
        real_grads = loop.finalize_model_grads

        def finalize_model_grads(*args, **kwargs):
            if current["it"] == at_it:
                _die()
            return real_grads(*args, **kwargs)

        loop.finalize_model_grads = finalize_model_grads
    elif kind == "kill-save":
        real_write = checkpointing._write_file

        def write(obj, path):
            if f"iter_{at_it:07d}" not in path:
                return real_write(obj, path)
            later.wait(60)
            buf = io.BytesIO()
            torch.save(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: buf.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()

        checkpointing._write_file = write
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def _record(path: str) -> None:
    real_end = RunState.iteration_end

    def iteration_end(self, out, flush=False):
        real_end(self, out, flush)
        with open(path, "a") as f:
            f.write(json.dumps({"it": self.iteration, "loss": float(out["lm loss"]),
                                "consumed": self.consumed_train_samples}) + "\n")

    RunState.iteration_end = iteration_end


def main(argv: list[str]) -> None:
    fault, record, sep, *args = argv
    assert sep == "--", "usage: FAULT RECORD -- PRETRAIN_ARGS..."
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    _inject(fault, rank)
    if rank == 0:
        _record(record)
    pretrain(args, log=lambda line: None)


if __name__ == "__main__":
    main(sys.argv[1:])
