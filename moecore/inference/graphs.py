"""CUDA graphs of the decode step: one graph per (batch bucket, cache length), each with its own
static KV cache and input buffers.

A decode step (one token per sequence) launches hundreds of small kernels; replaying them as
one graph removes the per-kernel launch cost. Everything in the captured step has a fixed
shape: the batch is padded to a bucket of :data:`BATCH_BUCKETS`, the cache length rounded up to
a multiple of :data:`LENGTH_QUANTUM` and attention reads the whole cache (masked by position),
and MoE layers run :func:`~moecore.inference.moe.static_moe_forward` (no host sync). Prefill
stays eager and writes the same cache. Where the model cannot be captured (experts split over
ranks, a grouped GEMM that reads counts on the host), :meth:`DecodeGraphs.get` returns None
and the engine decodes eagerly; :attr:`DecodeGraphs.reason` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from moecore.inference.kv_cache import KVCache
from moecore.inference.moe import moe_layers, static_moe, static_moe_supported

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_QUANTUM = 256
WARMUP_STEPS = 2

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    cache: KVCache
    ids: torch.Tensor  # [rows, 1]
    positions: torch.Tensor  # [rows, 1]
    logits: torch.Tensor  # [rows, V/tp]

    def step(self, ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Replay with ``ids``, ``positions [rows, 1]``; -> logits ``[rows, V/tp]`` (the
        static output buffer: read it before the next replay)."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Captured decode steps of ``model`` on ``device`` (CUDA), created on first use."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, torch.device(device)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.reason = self._unsupported_reason()
        if self.reason:
            log.info("decode steps run eagerly: %s", self.reason)

    def _unsupported_reason(self) -> str:
        if self.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        for layer in moe_layers(self.model):
            ok, why = static_moe_supported(layer, self.device)
            if not ok:
                return f"MoE layer {layer.layer_number}: {why}"
        return ""

    def get(self, batch: int, length: int, max_length: int, dtype: torch.dtype):
        """``(cache, step, rows)`` for ``batch`` sequences of up to ``length`` tokens, or None
        where decode steps cannot be graphed."""
        rows = next((b for b in BATCH_BUCKETS if b >= batch), None)
        if self.reason or rows is None:
            return None
        cache_len = min(-(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM, max_length)
        key = (rows, cache_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(rows, cache_len, dtype)
        g = self._graphs[key]
        return g.cache, g.step, rows

    def _capture(self, rows: int, cache_len: int, dtype: torch.dtype) -> _Graph:
        cache = KVCache(rows, cache_len, self.device, dtype)
        ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        # Warm-up and capture write slot cache_len - 1: any slot is rewritten by its own token
        # before a query reads it, so these writes are never seen.
        positions = torch.full((rows, 1), cache_len - 1, dtype=torch.long, device=self.device)

        def run():
            cache.set_positions(positions)
            return self.model(ids, position_ids=positions, inference_context=cache)[:, -1]

        with torch.no_grad(), static_moe(self.model):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = run()
        return _Graph(graph, cache, ids, positions, logits)
