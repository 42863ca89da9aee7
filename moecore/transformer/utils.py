"""Small helpers shared by the transformer modules: Megatron's init methods and layout checks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def init_method_normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w ~ N(0, std)`` in place (Megatron's ``init_method_normal``)."""

    def init_(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(w, mean=0.0, std=std)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> Callable[[torch.Tensor],
                                                                       torch.Tensor]:
    """``N(0, std / sqrt(2 * num_layers))``: Megatron's init for the output projections that feed
    the residual stream (attention ``linear_proj``, MLP ``linear_fc2``), so the residual's variance
    does not grow with depth."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def check_tp_size(config, ps) -> None:
    """The config's TP size must be the parallel state's: sequence parallel and the divisibility
    checks in ``TransformerConfig`` were validated against the config's number."""
    if config.tensor_model_parallel_size != ps.tp_size:
        raise ValueError(
            f"config.tensor_model_parallel_size={config.tensor_model_parallel_size} but the "
            f"parallel state has tp={ps.tp_size}; pass the same size to initialize_model_parallel "
            "and the config")


def check_attention_layout(config, ps) -> None:
    """:func:`check_tp_size`, and the config's context-parallel size is the state's."""
    check_tp_size(config, ps)
    if config.context_parallel_size != ps.cp_size:
        raise ValueError(
            f"config.context_parallel_size={config.context_parallel_size} but the parallel "
            f"state has cp={ps.cp_size}; pass the same size to initialize_model_parallel and "
            "the config")
