"""Selective activation recompute: Megatron's ``--recompute-modules``.

Under ``recompute_granularity='selective'`` the modules named in ``recompute_modules`` (default
``("core_attn",)``, as Megatron) are recomputed in backward:

- ``core_attn``, ``mlp`` (dense MLPs), ``moe`` (the whole MoE MLP), ``shared_experts``: the
  module runs under :func:`moecore.tensor_parallel.random.checkpoint` (its inputs are kept,
  everything inside is recomputed; RNG states are restored for dropout).
- ``moe_act`` (the experts' activation output, ``[N, F]`` per routed row, kept only for the
  fc2 weight gradient) and ``layernorm`` (the outputs of ``input_layernorm`` and
  ``pre_mlp_layernorm``, kept by the GEMMs and the router that read them): the output's memory
  is freed right after its last forward use and refilled from the activation's / norm's saved
  input just before backward reaches the consumer (:func:`discard_until_backward`). Nothing
  else in the graph changes, no RNG is involved, the recomputed values are bit-identical (the
  same kernel on the same input), and it is CUDA-graph safe.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Recomputed without checkpoint-style replays: no RNG state, capturable in a CUDA graph.
DISCARD_RECOMPUTE_MODULES = ("moe_act", "layernorm")


def discard_until_backward(output: torch.Tensor, anchor: torch.Tensor,
                           recompute: Callable[[torch.Tensor], object]) -> bool:
    """Free ``output``'s memory now; refill it just before autograd runs ``anchor.grad_fn``.

    ``recompute(dst)`` must write ``output``'s values into ``dst``, a tensor with ``output``'s
    shape, strides and dtype over its restored memory (it runs under ``no_grad``). Every forward
    use of ``output`` must be done, and every backward reader of it must run at or after
    ``anchor``'s node (true of tensors saved by the ops between ``output`` and ``anchor``).
    Autograd keeps referring to the same storage, so no saved tensor changes identity or
    version. No-op (returns False) without a graph to hook, or when ``output`` does not own its
    whole storage (another tensor may live in it).
    """
    node = anchor.grad_fn
    if node is None or not torch.is_grad_enabled():
        return False
    storage = output.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0 or nbytes != output.numel() * output.element_size():
        return False
    layout = (output.storage_offset(), output.shape, output.stride())
    dtype, device = output.dtype, output.device
    storage.resize_(0)
    # Dropped once refilled: from then on only the tensors autograd saved hold the storage (and
    # whatever ``recompute`` closes over), so backward frees it as it would without recompute,
    # even while the caller keeps the loss (and with it this node and hook) alive.
    pending = [storage, recompute]

    def refill(_grad_outputs):
        if pending:  # a second backward (retain_graph) finds it filled
            store, fill = pending
            pending.clear()
            store.resize_(nbytes)
            dst = torch.empty(0, dtype=dtype, device=device).set_(store, *layout)
            with torch.no_grad():
                fill(dst)
        return None

    node.register_prehook(refill)
    return True
