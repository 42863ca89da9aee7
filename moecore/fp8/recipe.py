"""FP8 recipes (Megatron's ``--fp8-format`` / ``--fp8-recipe`` settings) and which layers use one.

``Fp8Recipe.from_config(config)`` is None when FP8 is off. ``e4m3`` uses ``float8_e4m3fn``
everywhere; ``hybrid`` uses it in the forward pass and ``float8_e5m2`` (wider range) for the
gradients. Recipes: ``tensorwise`` (one scale per tensor from its current amax; per expert for
expert weights), ``delayed`` (the scale comes from an amax history of the previous steps) and
``blockwise`` (DeepSeek-V3: 1x128 activation/gradient tiles, 128x128 weight blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp8Recipe:
    """The FP8 settings of one run (see ``moecore.config.Fp8Config`` for each field)."""

    format: str
    recipe: str
    margin: int = 0
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    gemm_backend: str = "auto"
    cast_backend: str = "auto"
    wgrad: bool = True

    @classmethod
    def from_config(cls, config) -> Fp8Recipe | None:
        if not config.fp8:
            return None
        return cls(config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
                   config.fp8_amax_compute_algo, config.fp8_gemm_backend,
                   config.fp8_cast_backend, config.fp8_wgrad)

    @property
    def fwd_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def bwd_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn

    @property
    def dim_multiple(self) -> int:
        """GEMM sizes (weights' both dims) must be multiples of this (FP8 tensor cores: 16;
        the 128x128 weight blocks: 128)."""
        return 128 if self.recipe == "blockwise" else 16


def layer_uses_fp8(config, layer_number: int) -> bool:
    """Whether transformer layer ``layer_number`` (1-based, of ``config.num_layers``) runs its
    GEMMs in FP8: FP8 is on and, under ``first_last_layers_bf16``, the layer is not among the
    first ``num_layers_at_start_in_bf16`` or last ``num_layers_at_end_in_bf16``."""
    if not config.fp8:
        return False
    if not config.first_last_layers_bf16:
        return True
    start, end = config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16
    return start < layer_number <= config.num_layers - end
