"""The transformer layers of one pipeline stage (plus the final norm on the last stage)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel import random as tp_random
from moecore.transformer.layer import TransformerLayer
from moecore.transformer.norms import build_norm

RECOMPUTE_METHODS = ("uniform", "block")


def stage_layers(config, ps: ParallelState, layer_offset: int | None,
                 num_layers: int | None) -> tuple[int, int]:
    """``(layer_offset, num_layers)`` of this stage; defaults split the layers evenly over PP."""
    if layer_offset is None or num_layers is None:
        if config.num_layers % ps.pp_size:
            raise ValueError(
                f"num_layers={config.num_layers} is not divisible by the pipeline parallel size "
                f"{ps.pp_size}; pass layer_offset and num_layers explicitly for uneven stages")
        per_stage = config.num_layers // ps.pp_size
        layer_offset = ps.pp_rank * per_stage if layer_offset is None else layer_offset
        num_layers = per_stage if num_layers is None else num_layers
    if layer_offset < 0 or num_layers < 0 or layer_offset + num_layers > config.num_layers:
        raise ValueError(f"layers [{layer_offset}, {layer_offset + num_layers}) are outside the "
                         f"model's {config.num_layers} layers")
    return layer_offset, num_layers


class TransformerBlock(nn.Module):
    """``forward(hidden [S, B, H], attention_mask=None, rotary_pos_emb=None) -> [S, B, H]``.

    Holds layers ``layer_offset + 1 .. layer_offset + num_layers`` (1-based; by default this
    pipeline stage's even share) and, when ``post_process``, the final norm. Without
    ``pre_process`` the input comes from :meth:`set_input_tensor` (the previous stage's output)
    and the ``hidden`` argument is ignored. ``S`` is ``S/tp`` under sequence parallel.

    ``recompute_granularity='full'`` recomputes whole layers in backward: ``recompute_method``
    ``'uniform'`` (default) checkpoints consecutive chunks of ``recompute_num_layers`` (default 1)
    layers, ``'block'`` checkpoints the first ``recompute_num_layers`` layers of this stage.
    ``moe_layer`` builds the MLP of MoE layers (see :class:`TransformerLayer`).
    """

    def __init__(self, config, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int | None = None, num_layers: int | None = None,
                 parallel_state: ParallelState | None = None,
                 moe_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        self.config = config
        self.tp_group = ps.tp_group
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset, self.num_layers = stage_layers(config, ps, layer_offset, num_layers)
        if config.recompute_granularity == "full" and (
                config.recompute_method not in (None, *RECOMPUTE_METHODS)):
            raise ValueError(f"recompute_method={config.recompute_method!r} must be one of "
                             f"{RECOMPUTE_METHODS} (or None for 'uniform')")
        self.layers = nn.ModuleList(
            TransformerLayer(config, self.layer_offset + i + 1, parallel_state=ps,
                             moe_layer=moe_layer)
            for i in range(self.num_layers))
        self.final_layernorm = build_norm(config, config.hidden_size) if post_process else None
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """Pipeline parallel: the activation received from the previous stage ``[S, B, H]``."""
        self.input_tensor = input_tensor

    def _layers(self, start: int, end: int, hidden, attention_mask, rotary_pos_emb,
                inference_context=None):
        """Layers ``start .. end - 1`` -> ``(residual, pending)``: their output is
        ``residual + pending`` (``pending`` None when the last add was not deferred)."""
        pending = None
        for layer in self.layers[start:end]:
            hidden, pending = layer(hidden, attention_mask, rotary_pos_emb, pending=pending,
                                    defer_residual=True, inference_context=inference_context)
        return hidden, pending

    def _run_layers(self, hidden, attention_mask, rotary_pos_emb):
        """All layers -> ``(residual, pending)`` (see :meth:`_layers`); checkpointed chunks
        return their summed output, since a recompute boundary needs one tensor."""
        def run(start, end):
            def fn(h):
                h, pending = self._layers(start, end, h, attention_mask, rotary_pos_emb)
                return h if pending is None else h + pending
            return fn

        n_layers = len(self.layers)
        if self.config.recompute_granularity != "full" or not torch.is_grad_enabled():
            return self._layers(0, n_layers, hidden, attention_mask, rotary_pos_emb)
        chunk = self.config.recompute_num_layers or 1
        if self.config.recompute_method == "block":
            n_ckpt = min(chunk, n_layers)
            for i in range(n_ckpt):
                hidden = tp_random.checkpoint(run(i, i + 1), False, hidden, group=self.tp_group)
            return self._layers(n_ckpt, n_layers, hidden, attention_mask, rotary_pos_emb)
        for start in range(0, n_layers, chunk):
            end = min(start + chunk, n_layers)
            hidden = tp_random.checkpoint(run(start, end), False, hidden, group=self.tp_group)
        return hidden, None

    def forward(self, hidden: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None,
                inference_context=None) -> torch.Tensor:
        """``inference_context``: generation's KV cache (:mod:`moecore.inference`); the layers
        then run plainly (no recompute, no dropout RNG fork)."""
        if not self.pre_process:
            if self.input_tensor is None:
                raise ValueError("this block has pre_process=False: call set_input_tensor() with "
                                 "the previous pipeline stage's output before forward")
            hidden = self.input_tensor
        if inference_context is not None:
            hidden, pending = self._layers(0, len(self.layers), hidden, attention_mask,
                                           rotary_pos_emb, inference_context)
            return self._final_norm(hidden, pending)
        # Under sequence parallel each TP rank holds different tokens, so their dropout masks
        # must differ: draw them from the TP-rank RNG. Without it the tokens are replicated and
        # the default (TP-identical) RNG keeps the replicas equal.
        dropout = self.training and self.config.hidden_dropout > 0
        rng = (tp_random.get_rng_tracker().fork() if dropout and self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            hidden, pending = self._run_layers(hidden, attention_mask, rotary_pos_emb)
        return self._final_norm(hidden, pending)

    def _final_norm(self, hidden: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        if self.final_layernorm is not None:
            if pending is None:
                return self.final_layernorm(hidden)
            return self.final_layernorm.add_and_norm(hidden, pending)[1]
        return hidden if pending is None else hidden + pending
