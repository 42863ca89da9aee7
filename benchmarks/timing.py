"""Timing one call for the benchmark scripts: CUDA events on CUDA, the wall clock elsewhere."""

from __future__ import annotations

import functools
import statistics
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


def median_ms(step: Callable[..., object], device: torch.device | str, warmup: int,
              repeats: int, setup: Callable[[], tuple] = tuple) -> float:
    """Median :func:`elapsed_ms` of ``step(*setup())`` over ``repeats`` runs after ``warmup``
    untimed ones; ``setup`` (fresh inputs, none by default) runs outside the timed region."""
    times = []
    for i in range(warmup + repeats):
        elapsed = elapsed_ms(functools.partial(step, *setup()), device)
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)
