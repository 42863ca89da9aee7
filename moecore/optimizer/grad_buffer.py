"""Contiguous gradient buffers, bucketed data-parallel reduction and parameter all-gather
(Megatron-Core's ``DistributedDataParallel`` + ``_ParamAndGradBuffer``, without wrapping the
model).

For every model chunk, the trainable parameters are grouped by (dense or expert, dtype). Each
group gets one flat fp32 gradient buffer; ``param.main_grad`` is a view into it, and a
post-accumulate-grad hook adds every micro-batch's ``param.grad`` there (then frees it), so
gradients accumulate in fp32. The buffer is cut into buckets (parameters in reverse
registration order, i.e. roughly the order backward produces them; at least
``bucket_size`` elements each), each padded to a multiple of the data-parallel size.

Reduction of a bucket (scaled by ``1 / dp_cp`` first, see :mod:`moecore.optimizer.grad_sync`):
all-reduce over the data-parallel group, or - for the distributed optimizer (``shard=True``) -
an in-place reduce-scatter that leaves rank ``r`` the reduced ``r``-th slice of the bucket.
Dense buckets use the ``data_parallel_with_cp`` group, expert buckets the
``expert_data_parallel`` group. With ``overlap_grad_reduce`` a bucket's collective starts
asynchronously during the last micro-batch's backward as soon as its gradients (and those of
every earlier bucket) are complete; buckets always start in the same order on every rank, so
the collectives match even when a parameter got no gradient on some rank.

With ``shard=True`` the parameters themselves also move into one flat buffer per group (same
layout), so after the optimizer updated its slice, one in-place all-gather per bucket
refreshes every replica (:meth:`DataParallelGradSync.start_param_sync`); with
``overlap_param_gather`` the all-gathers run in the background and each module waits for its
own parameters' buckets in a forward pre-hook.

A tied embedding/output weight held by two pipeline stages gets a bucket of its own, so its
shards line up on both stages and its reduced gradient can be summed over the embedding group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moecore.kernels.optim import accumulate_main_grad_
from moecore.optimizer.clip_grads import is_expert_param
from moecore.parallel_state import ParallelState

_DEFAULT_BUCKET_ELEMENTS = 40_000_000


def default_bucket_size(dp_size: int) -> int:
    """Megatron's default: ``max(40M, 1M x dp)`` elements per bucket."""
    return max(_DEFAULT_BUCKET_ELEMENTS, 1_000_000 * dp_size)


def _reduce_scatter(out, inp, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=True)


def _all_gather(out, inp, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


@dataclass(eq=False)
class Bucket:
    """Parameters ``params`` occupying ``[start, end)`` of ``buffer`` (padded)."""

    buffer: GradBuffer
    params: list
    start: int = 0
    end: int = 0
    ready: set = field(default_factory=set)
    reduce_handle: object = None
    gather_handle: object = None

    def shard_range(self, dp_rank: int) -> tuple[int, int]:
        """``[lo, hi)`` of the bucket in buffer coordinates owned by data-parallel rank."""
        size = (self.end - self.start) // self.buffer.dp_size
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size

    def launch_reduce(self, shard: bool) -> None:
        b = self.buffer
        grads = b.grad_data[self.start:self.end]
        if b.scale != 1.0:
            grads.mul_(b.scale)
        if b.dp_size == 1 or b.group is None:
            return
        if shard:
            lo, hi = self.shard_range(b.dp_rank)
            self.reduce_handle = _reduce_scatter(b.grad_data[lo:hi], grads, b.group)
        else:
            self.reduce_handle = dist.all_reduce(grads, group=b.group, async_op=True)

    def wait_reduce(self) -> None:
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None

    def launch_gather(self) -> None:
        b = self.buffer
        if b.dp_size == 1 or b.group is None:
            return
        lo, hi = self.shard_range(b.dp_rank)
        self.gather_handle = _all_gather(b.param_data[self.start:self.end],
                                         b.param_data[lo:hi], b.group)

    def wait_gather(self) -> None:
        if self.gather_handle is not None:
            self.gather_handle.wait()
            self.gather_handle = None


class GradBuffer:
    """One flat fp32 gradient buffer (and, when sharded, parameter buffer) for parameters of one
    dtype and kind (dense or expert) of one model chunk."""

    def __init__(self, dtype: torch.dtype, expert: bool, ps: ParallelState, device):
        self.dtype, self.expert, self.device = dtype, expert, device
        kind = "expert_data_parallel" if expert else "data_parallel_with_cp"
        self.group = ps.group(kind)
        self.dp_size, self.dp_rank = ps.world_size_of(kind), ps.rank_in(kind)
        # Experts too are scaled by 1 / dp_cp: see moecore.optimizer.grad_sync.
        self.scale = 1.0 / ps.world_size_of("data_parallel_with_cp")
        self.buckets: list[Bucket] = []
        self.offsets: dict[int, tuple[int, int]] = {}
        self.grad_data: torch.Tensor | None = None
        self.param_data: torch.Tensor | None = None

    def allocate(self, shard: bool) -> None:
        """Lay the buckets out, allocate the buffers and point the params into them."""
        pos = 0
        for b in self.buckets:
            b.start = pos
            for p in b.params:
                self.offsets[id(p)] = (pos, pos + p.numel())
                pos += p.numel()
            pos = b.start + -(-(pos - b.start) // self.dp_size) * self.dp_size
            b.end = pos
        self.grad_data = torch.zeros(pos, dtype=torch.float32, device=self.device)
        if shard:
            self.param_data = torch.zeros(pos, dtype=self.dtype, device=self.device)
        for b in self.buckets:
            for p in b.params:
                lo, hi = self.offsets[id(p)]
                p.main_grad = self.grad_data[lo:hi].view(p.shape)
                if shard:
                    with torch.no_grad():
                        self.param_data[lo:hi].copy_(p.data.reshape(-1))
                    p.data = self.param_data[lo:hi].view(p.shape)


def _bucket_key(p: torch.Tensor) -> tuple[bool, torch.dtype]:
    return is_expert_param(p), p.dtype


class DataParallelGradSync:
    """Gradient buffers, hooks and bucketed collectives for a list of model chunks.

    Schedule hooks: :meth:`disable_grad_sync` / :meth:`enable_grad_sync` (chunk) - buckets only
    start during a backward of a chunk whose sync is enabled (its last micro-batch).
    """

    def __init__(self, chunks: list[nn.Module], ps: ParallelState, *, shard: bool = False,
                 overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
                 bucket_size: int | None = None):
        self.ps, self.shard = ps, shard
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather and shard
        self.buffers: list[GradBuffer] = []
        self.chunk_buckets: list[list[Bucket]] = []
        self._bucket_of: dict[int, Bucket] = {}
        self._chunk_of: dict[int, int] = {}
        self._enabled: list[bool] = []
        self._next: list[int] = []
        self.launched_during_backward = 0  # buckets started by backward hooks (overlap), total
        seen: set[int] = set()
        for c, chunk in enumerate(chunks):
            chunk._grad_sync = self  # finalize_model_grads finds it without being told
            params = [p for p in chunk.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            self.chunk_buckets.append(self._make_buckets(params, bucket_size))
            self._enabled.append(True)
            self._next.append(0)
            for p in params:
                self._chunk_of[id(p)] = c
                p.register_post_accumulate_grad_hook(self._on_grad)
        for buf in self.buffers:
            buf.allocate(shard)
        if self.overlap_param_gather:
            for chunk in chunks:
                for m in chunk.modules():
                    if any(p is not None for p in m._parameters.values()):
                        m.register_forward_pre_hook(self._wait_params_hook)

    def _make_buckets(self, params: list, bucket_size: int | None) -> list[Bucket]:
        """Buckets of one chunk in launch order (reverse registration order)."""
        buffers: dict = {}
        current: dict = {}
        order: list[Bucket] = []
        own_bucket = self.ps.pp_size > 1
        for p in reversed(params):
            key = _bucket_key(p)
            if key not in buffers:
                buffers[key] = GradBuffer(p.dtype, key[0], self.ps, p.device)
                self.buffers.append(buffers[key])
            buf = buffers[key]
            alone = own_bucket and getattr(p, "shared_embedding", False)
            b = current.get(key)
            if b is None or alone:
                b = Bucket(buf, [])
                buf.buckets.append(b)
                order.append(b)
                current[key] = b
            b.params.append(p)
            self._bucket_of[id(p)] = b
            size = sum(q.numel() for q in b.params)
            if alone or (bucket_size is not None and size >= bucket_size):
                current[key] = None
        return order

    # ---- gradient reduction ------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        accumulate_main_grad_(p.main_grad, p.grad)  # fp32 += grad; one Triton pass on CUDA
        p.grad = None
        c = self._chunk_of[id(p)]
        if self.overlap_grad_reduce and self._enabled[c]:
            self._bucket_of[id(p)].ready.add(id(p))
            self._launch_ready(c)

    def _launch_ready(self, c: int) -> None:
        buckets = self.chunk_buckets[c]
        while self._next[c] < len(buckets) and \
                len(buckets[self._next[c]].ready) == len(buckets[self._next[c]].params):
            buckets[self._next[c]].launch_reduce(self.shard)
            self._next[c] += 1
            self.launched_during_backward += 1

    def disable_grad_sync(self) -> None:
        self._enabled = [False] * len(self._enabled)

    def enable_grad_sync(self, chunk: int) -> None:
        self._enabled[chunk] = True

    def finish_grad_sync(self) -> None:
        """Start every bucket not started yet (in order) and wait for all (collective)."""
        for c, buckets in enumerate(self.chunk_buckets):
            for b in buckets[self._next[c]:]:
                b.launch_reduce(self.shard)
            self._next[c] = len(buckets)
        for buckets in self.chunk_buckets:
            for b in buckets:
                b.wait_reduce()
        self._enabled = [True] * len(self._enabled)

    def zero_grad(self) -> None:
        for buf in self.buffers:
            buf.grad_data.zero_()
        for c, buckets in enumerate(self.chunk_buckets):
            for b in buckets:
                if b.reduce_handle is not None:
                    raise RuntimeError("zero_grad() while a gradient reduction is in flight; "
                                       "call finish_grad_sync() first")
                b.ready.clear()
            self._next[c] = 0
        for buf in self.buffers:
            for b in buf.buckets:
                for p in b.params:
                    p.grad = None

    # ---- parameter all-gather (distributed optimizer) ------------------------------------------
    def start_param_sync(self) -> None:
        """All-gather every bucket's updated slices; waits unless ``overlap_param_gather``."""
        for buckets in self.chunk_buckets:
            for b in buckets:
                b.launch_gather()
        if not self.overlap_param_gather:
            self.finish_param_sync()

    def finish_param_sync(self) -> None:
        for buckets in self.chunk_buckets:
            for b in buckets:
                b.wait_gather()

    def _wait_params_hook(self, module: nn.Module, _args) -> None:
        for p in module._parameters.values():
            if p is not None and id(p) in self._bucket_of:
                self._bucket_of[id(p)].wait_gather()

    # ---- views ---------------------------------------------------------------------------------
    def params(self) -> list[torch.Tensor]:
        return [p for buf in self.buffers for b in buf.buckets for p in b.params]

    def bucket_of(self, p: torch.Tensor) -> Bucket:
        return self._bucket_of[id(p)]
