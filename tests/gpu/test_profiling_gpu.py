"""``--profile`` for nsys (cudaProfilerStart/Stop, NVTX) and ``--record-memory-history`` on
CUDA (the torch-profiler path is tested on CPU in tests/unit/test_profiling.py)."""

from __future__ import annotations

import pickle

import pytest
import torch

from moecore.training import pretrain
from tests.unit.test_profiling import BASE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_nsys_window_and_memory_snapshot(tmp_path):
    snapshot = tmp_path / "snap.pickle"
    argv = [a if a != "cpu" else "cuda" for a in BASE]
    out = pretrain(argv + ["--profile", "--profile-step-start", "2", "--profile-step-end", "4",
                           "--record-memory-history", "--memory-snapshot-path", str(snapshot)])
    assert len(out["lm_loss"]) == 5
    with open(snapshot, "rb") as f:
        snap = pickle.load(f)
    assert snap["segments"] and any(snap["device_traces"])  # allocations were recorded
