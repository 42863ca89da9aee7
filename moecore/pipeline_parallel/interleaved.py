"""Interleaved 1F1B (virtual pipeline stages), following Megatron-Core's schedule.

Rank ``r`` of ``p`` holds ``v`` model chunks; chunk ``c`` of rank ``r`` is virtual stage
``c * p + r``. Micro-batches go through the chunks in groups of ``p``: forward step ``k`` runs
chunk ``(k mod p*v) // p`` (backward steps run the chunks in reverse). Warm-up is
``2 (p - r - 1) + (v - 1) p`` forwards (all of them when there are only ``p`` micro-batches),
then one forward + one backward per step, then the remaining backwards. Every step ends with
one combined exchange with both neighbours (:meth:`P2PCommunicator.communicate`); the flags
saying what to receive mirror what the neighbours send in that same step.
"""

from __future__ import annotations

from collections.abc import Callable

from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.pipeline_parallel.one_f_one_b import forward_backward_pipelining_without_interleaving
from moecore.pipeline_parallel.steps import (
    GradSyncHooks,
    as_list,
    backward_step,
    forward_step,
    mark_requires_grad,
    set_aux_loss_scale,
    stage_communicator,
)


class _Interleaved:
    """State of one interleaved run: per-chunk queues of inputs, outputs and output grads."""

    def __init__(self, forward_step_func, iters, models, num_microbatches, forward_only,
                 grad_scale_func, sync, comm, ps):
        self.fs, self.iters, self.models = forward_step_func, iters, models
        self.n_mb, self.forward_only = num_microbatches, forward_only
        self.grad_scale_func, self.sync, self.comm = grad_scale_func, sync, comm
        self.pp, self.rank, self.nc = ps.pp_size, ps.pp_rank, len(models)
        self.inputs: list[list] = [[] for _ in models]
        self.outputs: list[list] = [[] for _ in models]
        self.out_grads: list[list] = [[] for _ in models]
        self.backwards_done = [0] * self.nc
        self.store: list[dict] = []

    def chunk(self, k: int, forward: bool) -> int:
        c = (k % (self.pp * self.nc)) // self.pp
        return c if forward else self.nc - c - 1

    def is_first(self, c: int) -> bool:
        return self.rank == 0 and c == 0

    def is_last(self, c: int) -> bool:
        return self.rank == self.pp - 1 and c == self.nc - 1

    def received(self, t):
        return mark_requires_grad(t, self.forward_only)

    def forward(self, k: int):
        c = self.chunk(k, True)
        if self.is_first(c) and len(self.inputs[c]) == len(self.outputs[c]):
            self.inputs[c].append(None)
        out = forward_step(self.fs, self.iters[c], self.models[c], self.n_mb,
                           self.inputs[c][-1], self.store, self.is_last(c))
        self.outputs[c].append(out)
        if self.forward_only:
            self.inputs[c].pop()
            self.outputs[c].pop()
        return out

    def backward(self, k: int):
        c = self.chunk(k, False)
        if self.is_last(c) and not self.out_grads[c]:
            self.out_grads[c].append(None)
        inp, out, grad = self.inputs[c].pop(0), self.outputs[c].pop(0), self.out_grads[c].pop(0)
        self.backwards_done[c] += 1
        if self.backwards_done[c] == self.n_mb:  # this chunk's last micro-batch
            self.sync.enable(c)
        return backward_step(inp, out, grad, self.grad_scale_func)

    # ---- phases ------------------------------------------------------------------------------
    def warmup(self, n_warmup: int, total: int, all_warmup: bool) -> None:
        self.inputs[0].append(None if self.rank == 0 else
                              self.received(self.comm.communicate(recv_prev=True)[0]))
        for k in range(n_warmup):
            out = self.forward(k)
            next_c = self.chunk(k + 1, True)
            recv_prev = not (self.rank == 0 and next_c == 0) and k != total - 1
            if self.is_last(self.chunk(k, True)):
                out = None
            if k == n_warmup - 1 and not self.forward_only and not all_warmup:
                inp, grad = self.comm.communicate(send_next=out, recv_prev=recv_prev,
                                                  recv_next=self.rank != self.pp - 1)
                self.out_grads[self.nc - 1].append(grad)
            else:
                inp, _ = self.comm.communicate(send_next=out, recv_prev=recv_prev)
            self.inputs[next_c].append(self.received(inp))

    def steady(self, n_warmup: int, n_remaining: int) -> None:
        pp, nc = self.pp, self.nc
        for k in range(n_remaining):
            fk, bk = k + n_warmup, k
            out = self.forward(fk)
            in_grad = self.backward(bk)
            if self.is_last(self.chunk(fk, True)):
                out = None
            if self.is_first(self.chunk(bk, False)):
                in_grad = None
            recv_prev = True
            if self.rank == 0:  # the first stage runs p - 1 steps ahead of the last
                next_fc = self.chunk(fk - (pp - 1), True)
                recv_prev = next_fc != nc - 1
                next_fc += 1
            else:
                next_fc = self.chunk(fk + 1, True)
            recv_next = True
            if self.rank == pp - 1:  # ... and the last p - 1 steps ahead in backward
                next_bc = self.chunk(bk - (pp - 1), False)
                recv_next = next_bc != 0
                next_bc -= 1
            else:
                next_bc = self.chunk(bk + 1, False)
            if k == n_remaining - 1:
                recv_prev = False
            inp, grad = self.comm.communicate(send_next=out, send_prev=in_grad,
                                              recv_prev=recv_prev, recv_next=recv_next)
            if recv_prev:
                self.inputs[next_fc].append(self.received(inp))
            if recv_next:
                self.out_grads[next_bc].append(grad)

    def cooldown(self, n_remaining: int, total: int, all_warmup: bool) -> None:
        if all_warmup:
            grad = None if self.rank == self.pp - 1 else \
                self.comm.communicate(recv_next=True)[1]
            self.out_grads[self.nc - 1].append(grad)
        for k in range(n_remaining, total):
            in_grad = self.backward(k)
            next_bc = self.chunk(k + 1, False)
            recv_next = not (self.rank == self.pp - 1 and next_bc == self.nc - 1) \
                and k != total - 1
            _, grad = self.comm.communicate(send_prev=in_grad, recv_next=recv_next)
            self.out_grads[next_bc].append(grad)


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func: Callable, data_iterator, model, num_microbatches: int,
        seq_length: int | None = None, micro_batch_size: int | None = None,
        forward_only: bool = False, grad_scale_func: Callable | None = None, grad_sync=None,
        parallel_state: ParallelState | None = None, config=None, **unused) -> list[dict]:
    """Interleaved 1F1B: ``model`` and ``data_iterator`` are lists with one entry per chunk."""
    ps = parallel_state or get_parallel_state()
    models, iters = as_list(model), as_list(data_iterator)
    if len(iters) != len(models):
        raise ValueError(f"interleaved schedule: {len(models)} model chunks but "
                         f"{len(iters)} data iterators; pass one iterator per chunk")
    if len(models) == 1:
        return forward_backward_pipelining_without_interleaving(
            forward_step_func=forward_step_func, data_iterator=iters, model=models,
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=forward_only,
            grad_scale_func=grad_scale_func, grad_sync=grad_sync, parallel_state=ps,
            config=config)
    pp = ps.pp_size
    if num_microbatches % pp:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches "
                         f"({num_microbatches}) to be a multiple of the pipeline size {pp}; "
                         "change --global-batch-size or --micro-batch-size")
    comm = stage_communicator(models[0], config, seq_length, micro_batch_size, ps)
    set_aux_loss_scale(num_microbatches, grad_scale_func, models[0])
    sync = GradSyncHooks(grad_sync, forward_only)
    sync.disable()
    total = num_microbatches * len(models)
    all_warmup = not forward_only and num_microbatches == pp
    if forward_only or all_warmup:
        n_warmup = total
    else:
        n_warmup = min(2 * (pp - ps.pp_rank - 1) + (len(models) - 1) * pp, total)
    run = _Interleaved(forward_step_func, iters, models, num_microbatches, forward_only,
                       grad_scale_func, sync, comm, ps)
    run.warmup(n_warmup, total, all_warmup)
    run.steady(n_warmup, total - n_warmup)
    if not forward_only:
        run.cooldown(total - n_warmup, total, all_warmup)
    return run.store
