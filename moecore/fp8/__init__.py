"""FP8 training without Transformer Engine: recipes, scaling state and FP8 GEMM autograd ops.

Modules with FP8-capable GEMMs (``ColumnParallelLinear``, ``RowParallelLinear``,
``GroupedMLP``) define ``enable_fp8(recipe)``; :func:`apply_fp8` calls it on every such module
of one transformer layer when that layer runs in FP8 (:func:`layer_uses_fp8`). Everything else
(embeddings, router, norms, attention softmax, output layer, loss) stays in its own precision.
See docs/fp8.md.
"""

from __future__ import annotations

from torch import nn

from moecore.fp8.grouped import fp8_grouped_mm
from moecore.fp8.linear import fp8_linear
from moecore.fp8.recipe import Fp8Recipe, layer_uses_fp8
from moecore.fp8.scaling import Fp8Meta

__all__ = ["Fp8Meta", "Fp8Recipe", "apply_fp8", "check_fp8_sizes", "fp8_grouped_mm",
           "fp8_linear", "layer_uses_fp8"]


def check_fp8_sizes(name: str, shape, recipe: Fp8Recipe) -> None:
    """Raise a one-line error when a weight's GEMM dims (the last two) do not fit the recipe."""
    m = recipe.dim_multiple
    if any(d % m for d in shape[-2:]):
        raise ValueError(f"{name} weight {tuple(shape)}: --fp8-recipe {recipe.recipe} needs GEMM "
                         f"sizes that are multiples of {m}; change the hidden/FFN/head sizes or "
                         "keep this layer in bf16 (--first-last-layers-bf16)")


def apply_fp8(module: nn.Module, config, layer_number: int) -> bool:
    """Switch the FP8-capable GEMMs inside ``module`` (transformer layer ``layer_number``) to
    FP8 when the config asks for it there; returns whether it did."""
    if not layer_uses_fp8(config, layer_number):
        return False
    recipe = Fp8Recipe.from_config(config)
    for sub in module.modules():
        if hasattr(sub, "enable_fp8"):
            sub.enable_fp8(recipe)
    return True
