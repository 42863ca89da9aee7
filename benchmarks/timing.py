"""Timing one call for the benchmark scripts: CUDA events on CUDA, the wall clock elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def elapsed_ms(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds of one ``fn()``: on CUDA between two events after a device sync (so only
    ``fn``'s kernels are timed), elsewhere by ``time.perf_counter``."""
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
