"""Schedules over one model chunk per rank: no pipelining (one stage) and 1F1B.

See :mod:`moecore.pipeline_parallel.schedules` for the contract both follow.
"""

from __future__ import annotations

from collections.abc import Callable

from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.pipeline_parallel.steps import (
    GradSyncHooks,
    as_list,
    backward_step,
    forward_step,
    mark_requires_grad,
    set_aux_loss_scale,
    stage_communicator,
)


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator,
                                   model, num_microbatches: int, seq_length: int | None = None,
                                   micro_batch_size: int | None = None,
                                   forward_only: bool = False,
                                   grad_scale_func: Callable | None = None, grad_sync=None,
                                   parallel_state: ParallelState | None = None,
                                   config=None, **_unused) -> list[dict]:
    """All micro-batches through one stage; gradients accumulate over them."""
    models, iters = as_list(model), as_list(data_iterator)
    if len(models) != 1:
        raise ValueError(f"no-pipelining schedule takes one model chunk, got {len(models)}")
    model, data_iterator = models[0], iters[0]
    set_aux_loss_scale(num_microbatches, grad_scale_func, model)
    sync, store = GradSyncHooks(grad_sync, forward_only), []
    sync.disable()
    for i in range(num_microbatches):
        output = forward_step(forward_step_func, data_iterator, model, num_microbatches, None,
                              store, True)
        if not forward_only:
            if i == num_microbatches - 1:
                sync.enable(0)
            backward_step(None, output, None, grad_scale_func)
    return store


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func: Callable, data_iterator, model, num_microbatches: int,
        seq_length: int | None = None, micro_batch_size: int | None = None,
        forward_only: bool = False, grad_scale_func: Callable | None = None, grad_sync=None,
        parallel_state: ParallelState | None = None, config=None, **_unused) -> list[dict]:
    """1F1B over the pipeline group (see :mod:`moecore.pipeline_parallel.schedules`)."""
    ps = parallel_state or get_parallel_state()
    models, iters = as_list(model), as_list(data_iterator)
    if len(models) != 1:
        raise ValueError(f"1F1B takes one model chunk per rank, got {len(models)}; use the "
                         "interleaved schedule for virtual pipeline stages")
    model, data_iterator = models[0], iters[0]
    comm = stage_communicator(model, config, seq_length, micro_batch_size, ps)
    set_aux_loss_scale(num_microbatches, grad_scale_func, model)
    last = ps.is_pipeline_last_stage()
    sync, store = GradSyncHooks(grad_sync, forward_only), []
    sync.disable()
    n_warmup = num_microbatches if forward_only else \
        min(ps.pp_size - ps.pp_rank - 1, num_microbatches)
    n_steady = num_microbatches - n_warmup
    inputs: list = []
    outputs: list = []

    def fwd(input_tensor):
        return forward_step(forward_step_func, data_iterator, model, num_microbatches,
                            input_tensor, store, last)

    for _ in range(n_warmup):
        input_tensor = mark_requires_grad(comm.recv_forward(), forward_only)
        output = fwd(input_tensor)
        comm.send_forward(None if last else output)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
    input_tensor = mark_requires_grad(comm.recv_forward(), forward_only) if n_steady else None
    for i in range(n_steady):
        final = i == n_steady - 1
        output = fwd(input_tensor)
        if forward_only:
            comm.send_forward(None if last else output)
            if not final:
                input_tensor = comm.recv_forward()
            continue
        output_grad = comm.send_forward_recv_backward(None if last else output)
        inputs.append(input_tensor)
        outputs.append(output)
        input_tensor, output = inputs.pop(0), outputs.pop(0)
        if n_warmup == 0 and final:
            sync.enable(0)
        input_grad = backward_step(input_tensor, output, output_grad, grad_scale_func)
        if final:
            input_tensor = None
            comm.send_backward(input_grad)
        else:
            input_tensor = mark_requires_grad(comm.send_backward_recv_forward(input_grad),
                                          forward_only)
    if not forward_only:
        for i in range(n_warmup):
            if i == n_warmup - 1:
                sync.enable(0)
            input_tensor, output = inputs.pop(0), outputs.pop(0)
            output_grad = comm.recv_backward()
            comm.send_backward(backward_step(input_tensor, output, output_grad,
                                             grad_scale_func))
    return store
