"""Scaling state of one FP8 GEMM: how its input, weight and gradient are quantised.

:class:`Fp8Meta` is a child module of the layer that owns the GEMM. Under ``tensorwise`` each
tensor's scale comes from its current amax; under ``delayed`` from the amax history of earlier
calls (Transformer Engine's delayed scaling: ``max`` or ``most_recent`` of the last
``amax_history_len`` amaxes; the very first call, with an empty history, uses the current amax);
under ``blockwise`` from each tile's / block's own amax.

Amaxes of whole tensors are all-reduced (MAX) over ``group`` (the layer's tensor-parallel group,
the expert-tensor-parallel group for experts), as TE does, so every rank of the group picks the
same scale and TP=N quantises exactly as TP=1. The histories are non-persistent buffers:
checkpoints hold no FP8 state and stay precision-independent; a resumed FP8 run starts its
histories afresh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moecore.fp8.recipe import Fp8Recipe
from moecore.kernels.fp8_gemm import select_fp8_gemm
from moecore.kernels.fp8_quant import (
    FP8_CAST,
    Fp8Casts,
    Fp8Tensor,
    quantize_blocks,
    scale_from_amax,
)
from moecore.kernels.fp8_quant import amax as tensor_amax

ROLES = ("input", "weight", "grad")


class WeightCache:
    """Whether FP8 copies of weights may be reused across calls, and the weights' generation.

    Off by default: every call quantises its weight. A training loop that owns the optimizer
    turns it on (:meth:`enable`) and calls :meth:`weights_changed` after every optimizer step
    and checkpoint load; then each weight is quantised (and transposed) once per step, not once
    per micro-batch, as Transformer Engine does. Never reused: under the ``delayed`` recipe
    (its scale follows the amax history) and while a CUDA graph is being captured (the graph
    must hold the casts it replays)."""

    enabled = False
    generation = 0

    @classmethod
    def enable(cls, on: bool = True) -> None:
        cls.enabled = on
        cls.weights_changed()

    @classmethod
    def weights_changed(cls) -> None:
        cls.generation += 1


def reduce_amax(amax: torch.Tensor, group) -> torch.Tensor:
    """All-reduce ``amax`` (MAX) over ``group`` when it has more than one rank."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


class Fp8Meta(nn.Module):
    """Recipe, amax histories and GEMM backend of one FP8 GEMM.

    ``num_weights``: 1 for a linear, ``E_local`` for grouped expert weights ``[E, N, K]`` (one
    scale per expert). Histories: ``amax_history_<role> [amax_history_len, n]`` (``n`` = 1, or
    ``num_weights`` for the weight), row 0 the most recent.
    """

    def __init__(self, recipe: Fp8Recipe, group=None, num_weights: int = 1,
                 grouped: bool = False):
        super().__init__()
        self.recipe, self.group, self.grouped = recipe, group, grouped
        self.num_weights = num_weights
        if recipe.recipe == "delayed":
            for role in ROLES:
                n = num_weights if role == "weight" else 1
                self.register_buffer(f"amax_history_{role}",
                                     torch.zeros(recipe.amax_history_len, n), persistent=False)
        self._gemm, self._casts = {}, {}
        self._weight_cache = None  # (key, (wq, wq_t))

    def gemm(self, device: torch.device):
        """The :class:`~moecore.kernels.fp8_gemm.Fp8Gemm` of the requested backend on
        ``device`` (resolved once per device)."""
        if device not in self._gemm:
            self._gemm[device] = select_fp8_gemm(self.recipe.gemm_backend, device,
                                                 self.recipe.recipe, self.grouped).fn
        return self._gemm[device]

    def casts(self, device: torch.device) -> Fp8Casts:
        """The casts and transpose of the requested cast backend on ``device``."""
        if device not in self._casts:
            self._casts[device] = FP8_CAST.select(self.recipe.cast_backend, device=device).fn
        return self._casts[device]

    def transpose(self, t: Fp8Tensor, rows: torch.Tensor | None = None) -> Fp8Tensor:
        """:func:`~moecore.kernels.fp8_quant.transpose` on the cast backend."""
        return self.casts(t.data.device).transpose(t, rows)

    def tiles(self, role: str, x: torch.Tensor) -> Fp8Tensor:
        """``x [..., K]`` in 1x128 tiles along K, in ``role``'s FP8 dtype (current amax)."""
        return self.casts(x.device).quantize_tiles(x, self.dtype(role), self.recipe.margin)

    def tiles_transposed(self, role: str, x: torch.Tensor, rows: torch.Tensor) -> Fp8Tensor:
        """``x [R, C]`` re-laid by ``rows [P]`` and transposed, in 1x128 tiles along ``P``
        (:func:`~moecore.kernels.fp8_quant.quantize_tiles_transposed`): a blockwise wgrad's
        operand."""
        return self.casts(x.device).quantize_tiles_transposed(x, rows, self.dtype(role),
                                                              self.recipe.margin)

    def weight(self, w: torch.Tensor) -> tuple[Fp8Tensor, Fp8Tensor]:
        """``(wq, wq_t)``: ``w`` (``[N, K]``, or ``[E, N, K]`` per expert) quantised as stored
        and its FP8 transpose; reused while :class:`WeightCache` allows it."""
        key = (w.data_ptr(), w._version, w.device, WeightCache.generation)
        cached = self._weight_cache
        if cached is not None and cached[0] == key and WeightCache.enabled:
            return cached[1]
        wq = self.quantize("weight", w)
        pair = (wq, self.transpose(wq))
        self._weight_cache = None
        if (WeightCache.enabled and self.recipe.recipe != "delayed"
                and not (w.is_cuda and torch.cuda.is_current_stream_capturing())):
            self._weight_cache = (key, pair)
        return pair

    def dtype(self, role: str) -> torch.dtype:
        """FP8 dtype of ``role``. The experts' grouped GEMMs (tensorwise/delayed) take E4M3 for
        every operand, the gradients too (PyTorch's grouped FP8 GEMM has no E5M2 form), under
        either ``--fp8-format``; on every backend, so numerics do not depend on it."""
        if role != "grad" or (self.grouped and self.recipe.recipe != "blockwise"):
            return self.recipe.fwd_dtype
        return self.recipe.bwd_dtype

    def quantize(self, role: str, x: torch.Tensor) -> Fp8Tensor:
        """``x`` (contraction dim last; ``[E, N, K]`` for grouped weights) in FP8 for ``role``."""
        dtype, margin = self.dtype(role), self.recipe.margin
        if self.recipe.recipe == "blockwise":
            return quantize_blocks(x, dtype, margin) if role == "weight" else \
                self.tiles(role, x)
        per_expert = role == "weight" and x.dim() == 3
        scale = self._scale(role, tensor_amax(x, (1, 2) if per_expert else None))
        return self.casts(x.device).quantize_tensor(x, scale, dtype)

    def quantize_transposed(self, role: str, x: torch.Tensor, rows: torch.Tensor,
                            amax: torch.Tensor | None = None) -> tuple[Fp8Tensor, Fp8Tensor]:
        """``(xq [R, C], xq_t [C, P])``: ``x [R, C]`` in FP8 for ``role`` and its transpose by
        the row map ``rows [P]`` (the wgrad's operand), from one read of ``x`` on the Triton
        cast backend. ``amax``: ``max |x|`` when the producer of ``x`` already has it (else
        computed here). Tensorwise and delayed recipes only."""
        if self.recipe.recipe == "blockwise":
            raise ValueError("quantize_transposed is for one scale per tensor, not blockwise")
        scale = self._scale(role, tensor_amax(x) if amax is None else amax.reshape(()))
        return self.casts(x.device).quantize_transposed(x, scale, self.dtype(role), rows)

    def _scale(self, role: str, amax: torch.Tensor) -> torch.Tensor:
        """The quantisation scale of ``role`` from this call's ``amax`` (reduced over the group;
        under ``delayed`` the history's amax is used and this one recorded)."""
        amax = reduce_amax(amax.float(), self.group)
        if self.recipe.recipe == "delayed":
            amax = self._delayed_amax(role, amax)
        return scale_from_amax(amax, self.dtype(role), self.recipe.margin)

    @torch.no_grad()
    def _delayed_amax(self, role: str, amax_now: torch.Tensor) -> torch.Tensor:
        """The amax the scale uses (from the history before this call), then record
        ``amax_now``. An empty history (first call) yields ``amax_now``."""
        history = getattr(self, f"amax_history_{role}")
        if history.device != amax_now.device:  # a meta not moved with its layer
            history = history.to(amax_now.device)
            setattr(self, f"amax_history_{role}", history)
        flat = amax_now.reshape(-1).to(history)
        if self.recipe.amax_compute_algo == "max":
            past = history.amax(0)
        else:
            past = history[0]
        used = torch.where(history.amax(0) > 0, past, flat)
        history.copy_(torch.roll(history, 1, 0))
        history[0] = flat
        return used.reshape(amax_now.shape)
