"""Forward/backward schedules over micro-batches (Megatron-Core's ``schedules.py``).

* :func:`forward_backward_no_pipelining` - one stage: forward and backward each micro-batch.
* :func:`forward_backward_pipelining_without_interleaving` - 1F1B: stage ``r`` of ``p`` runs
  ``p - r - 1`` warm-up forwards, then alternates one forward and one backward, then drains the
  remaining backwards. At most ``p - r`` micro-batches' activations are alive per stage.
* :func:`forward_backward_pipelining_with_interleaving` - interleaved 1F1B: each rank holds
  ``v`` model chunks (virtual stages) and cycles through them in groups of ``p`` micro-batches,
  which shrinks the pipeline bubble by ``v``.

Common contract (keyword arguments as in Megatron):
``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)``; on the last stage
``loss_func(output_tensor) -> (loss, {name: detached value})``. The loss is divided by
``num_microbatches`` (gradients are then the mean over micro-batches) and multiplied by
``grad_scale_func`` (the fp16 loss scale) before backward. MoE auxiliary losses ride the
autograd graph of the stage that owns their router; their backward scale is set here to
``loss_scale / num_microbatches`` on every stage (:class:`MoEAuxLossAutoScaler`).
Returns the list of per-micro-batch loss dicts on the last stage (``[]`` elsewhere).

``grad_sync`` (optional) lets overlapped data-parallel gradient reduction start during the last
backward of each model chunk: the schedule calls ``grad_sync.disable_grad_sync()`` first and
``grad_sync.enable_grad_sync(chunk_id)`` right before the last backward of that chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from moecore.moe.losses import MoEAuxLossAutoScaler
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.pipeline_parallel.p2p import P2PCommunicator, get_tensor_shape


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _model_config(model: nn.Module, config):
    if config is not None:
        return config
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("the pipeline schedules need the model's TransformerConfig (for the "
                         "activation shape and dtype): give the model a .config or pass config=")
    return cfg


def set_aux_loss_scale(num_microbatches: int, grad_scale_func, model=None) -> None:
    # On the model's device: a host tensor would be copied to the GPU (a host sync) in the
    # backward of every MoE layer.
    param = next(iter(_as_list(model)[0].parameters()), None) if model is not None else None
    scale = torch.ones(1, device=param.device if param is not None else "cpu")
    if grad_scale_func is not None:
        scale = grad_scale_func(scale).detach().float()
    MoEAuxLossAutoScaler.set_loss_scale(scale / num_microbatches)


def forward_step(forward_step_func: Callable, data_iterator, model: nn.Module,
                 num_microbatches: int, input_tensor: torch.Tensor | None,
                 forward_data_store: list, is_last_stage: bool) -> torch.Tensor:
    """One micro-batch forward through ``model``; on the last stage returns the loss divided by
    ``num_microbatches`` (and records its reduced values), elsewhere the hidden states."""
    set_input = getattr(model, "set_input_tensor", None)
    if set_input is not None:
        set_input(input_tensor)
    elif input_tensor is not None:
        raise ValueError("a pipeline stage without pre_process needs model.set_input_tensor()")
    output, loss_func = forward_step_func(data_iterator, model)
    if not is_last_stage:
        return output
    loss, reduced = loss_func(output)
    forward_data_store.append(reduced)
    return loss / num_microbatches


def backward_step(input_tensor: torch.Tensor | None, output_tensor: torch.Tensor,
                  output_tensor_grad: torch.Tensor | None,
                  grad_scale_func: Callable | None) -> torch.Tensor | None:
    """Back-propagate one micro-batch; returns the gradient of the stage input (None on the
    first stage). On the last stage ``output_tensor`` is the loss, scaled by the loss scale."""
    if output_tensor_grad is None and grad_scale_func is not None:
        output_tensor = grad_scale_func(output_tensor)
    torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    return None if input_tensor is None else input_tensor.grad


class _Sync:
    """``grad_sync`` hooks, or nothing."""

    def __init__(self, grad_sync, forward_only: bool):
        self.gs = None if forward_only else grad_sync

    def disable(self) -> None:
        if self.gs is not None:
            self.gs.disable_grad_sync()

    def enable(self, chunk: int) -> None:
        if self.gs is not None:
            self.gs.enable_grad_sync(chunk)


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator,
                                   model, num_microbatches: int, seq_length: int | None = None,
                                   micro_batch_size: int | None = None,
                                   forward_only: bool = False,
                                   grad_scale_func: Callable | None = None, grad_sync=None,
                                   parallel_state: ParallelState | None = None,
                                   config=None, **_unused) -> list[dict]:
    """All micro-batches through one stage; gradients accumulate over them."""
    models, iters = _as_list(model), _as_list(data_iterator)
    if len(models) != 1:
        raise ValueError(f"no-pipelining schedule takes one model chunk, got {len(models)}")
    model, data_iterator = models[0], iters[0]
    set_aux_loss_scale(num_microbatches, grad_scale_func, model)
    sync, store = _Sync(grad_sync, forward_only), []
    sync.disable()
    for i in range(num_microbatches):
        output = forward_step(forward_step_func, data_iterator, model, num_microbatches, None,
                              store, True)
        if not forward_only:
            if i == num_microbatches - 1:
                sync.enable(0)
            backward_step(None, output, None, grad_scale_func)
    return store


def _communicator(model, config, seq_length, micro_batch_size, ps) -> P2PCommunicator:
    cfg = _model_config(model, config)
    if seq_length is None or micro_batch_size is None:
        raise ValueError("pipeline schedules need seq_length and micro_batch_size (the shape "
                         "of the activations exchanged between stages)")
    device = next(model.parameters()).device
    return P2PCommunicator(get_tensor_shape(cfg, seq_length, micro_batch_size, ps),
                           cfg.params_dtype, device, ps)


def _requires_grad(t: torch.Tensor | None, forward_only: bool) -> torch.Tensor | None:
    if t is not None and not forward_only:
        t.requires_grad_(True)
    return t


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func: Callable, data_iterator, model, num_microbatches: int,
        seq_length: int | None = None, micro_batch_size: int | None = None,
        forward_only: bool = False, grad_scale_func: Callable | None = None, grad_sync=None,
        parallel_state: ParallelState | None = None, config=None, **_unused) -> list[dict]:
    """1F1B over the pipeline group (see module docstring)."""
    ps = parallel_state or get_parallel_state()
    models, iters = _as_list(model), _as_list(data_iterator)
    if len(models) != 1:
        raise ValueError(f"1F1B takes one model chunk per rank, got {len(models)}; use the "
                         "interleaved schedule for virtual pipeline stages")
    model, data_iterator = models[0], iters[0]
    comm = _communicator(model, config, seq_length, micro_batch_size, ps)
    set_aux_loss_scale(num_microbatches, grad_scale_func, model)
    last = ps.is_pipeline_last_stage()
    sync, store = _Sync(grad_sync, forward_only), []
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
        input_tensor = _requires_grad(comm.recv_forward(), forward_only)
        output = fwd(input_tensor)
        comm.send_forward(None if last else output)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
    input_tensor = _requires_grad(comm.recv_forward(), forward_only) if n_steady else None
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
            input_tensor = _requires_grad(comm.send_backward_recv_forward(input_grad),
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


def get_forward_backward_func(virtual_pipeline_model_parallel_size: int | None = None,
                              parallel_state: ParallelState | None = None) -> Callable:
    """The schedule for this layout: no pipelining at PP=1, interleaved 1F1B with more than one
    virtual stage per rank, 1F1B otherwise (Megatron's ``get_forward_backward_func``)."""
    from moecore.pipeline_parallel.interleaved import (
        forward_backward_pipelining_with_interleaving,
    )

    ps = parallel_state or get_parallel_state()
    if ps.pp_size == 1:
        return forward_backward_no_pipelining
    if virtual_pipeline_model_parallel_size and virtual_pipeline_model_parallel_size > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


def make_data_iterators(batches: list, num_chunks: int) -> list[Iterator]:
    """One iterator per model chunk over the same micro-batches (every chunk reads each
    micro-batch once, in order)."""
    return [iter(batches) for _ in range(num_chunks)]
