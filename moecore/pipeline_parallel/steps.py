"""One micro-batch's forward and backward, and the helpers every schedule shares.

:func:`forward_step` runs ``forward_step_func`` (Megatron's contract, see
:mod:`moecore.pipeline_parallel.schedules`) on one micro-batch; :func:`backward_step`
back-propagates it. :func:`set_aux_loss_scale` sets the MoE auxiliary losses' backward scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moecore.moe.losses import MoEAuxLossAutoScaler
from moecore.parallel_state import ParallelState
from moecore.pipeline_parallel.p2p import P2PCommunicator, get_tensor_shape


def as_list(x) -> list:
    """``x`` as a list: model chunks / data iterators come as one object or a list of them."""
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
    """MoE aux losses' backward scale: ``grad_scale_func(1) / num_microbatches``."""
    # On the model's device: a host tensor would be copied to the GPU (a host sync) in the
    # backward of every MoE layer.
    param = next(iter(as_list(model)[0].parameters()), None) if model is not None else None
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


class GradSyncHooks:
    """``grad_sync`` hooks, or nothing."""

    def __init__(self, grad_sync, forward_only: bool):
        self.gs = None if forward_only else grad_sync

    def disable(self) -> None:
        if self.gs is not None:
            self.gs.disable_grad_sync()

    def enable(self, chunk: int) -> None:
        if self.gs is not None:
            self.gs.enable_grad_sync(chunk)


def stage_communicator(model, config, seq_length: int | None, micro_batch_size: int | None,
                       ps: ParallelState) -> P2PCommunicator:
    """Point-to-point exchange of the activations ``[S, B, H]`` with the neighbour stages."""
    cfg = _model_config(model, config)
    if seq_length is None or micro_batch_size is None:
        raise ValueError("pipeline schedules need seq_length and micro_batch_size (the shape "
                         "of the activations exchanged between stages)")
    device = next(model.parameters()).device
    return P2PCommunicator(get_tensor_shape(cfg, seq_length, micro_batch_size, ps),
                           cfg.params_dtype, device, ps)


def mark_requires_grad(t: torch.Tensor | None, forward_only: bool) -> torch.Tensor | None:
    """A received stage input, made a leaf that collects the gradient to send back."""
    if t is not None and not forward_only:
        t.requires_grad_(True)
    return t
