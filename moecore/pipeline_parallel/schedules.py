"""Forward/backward schedules over micro-batches (Megatron-Core's ``schedules.py``): the
schedules themselves live in ``one_f_one_b.py`` and ``interleaved.py`` (both built on the
micro-batch steps of ``steps.py``); this module re-exports them and picks one for a layout.

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

from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.pipeline_parallel.interleaved import forward_backward_pipelining_with_interleaving
from moecore.pipeline_parallel.one_f_one_b import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)
from moecore.pipeline_parallel.steps import backward_step, forward_step, set_aux_loss_scale

__all__ = [
    "backward_step",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "forward_step",
    "get_forward_backward_func",
    "make_data_iterators",
    "set_aux_loss_scale",
]


def get_forward_backward_func(virtual_pipeline_model_parallel_size: int | None = None,
                              parallel_state: ParallelState | None = None) -> Callable:
    """The schedule for this layout: no pipelining at PP=1, interleaved 1F1B with more than one
    virtual stage per rank, 1F1B otherwise (Megatron's ``get_forward_backward_func``)."""
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
