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


def graph_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """GPU milliseconds per call of ``fn`` (CUDA): ``repeats`` calls captured in one CUDA graph
    and replayed once, so host launch cost does not count (small kernels timed from the host
    measure their launches)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph wants
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    return elapsed_ms(graph.replay, "cuda") / repeats
