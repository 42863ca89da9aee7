"""Tensor-parallel layers: ``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding`` (Megatron-Core's classes and conventions).

Weights are initialised as the full master weight, drawn in fp32 with ``init_method`` from the
default torch generator on every rank, then cast to ``config.params_dtype``; each rank keeps its
shard. So a model built from one seed is the same function at TP=1 and TP=N (every rank must
build the same modules in the same order, which keeps the generators in step). Biases start at
zero.

Parameter attributes read by the optimizer, grad reduction and checkpointing:
``tensor_model_parallel`` (sharded over TP), ``partition_dim``, ``partition_stride`` and, on
replicated parameters whose grads are partial sums under sequence parallel (the row-parallel
bias), ``sequence_parallel=True``: those grads must be all-reduced over the TP group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moecore.fp8 import Fp8Meta, check_fp8_sizes, fp8_linear
from moecore.kernels.embedding import embedding
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from moecore.tensor_parallel.utils import VocabUtility

_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {
    "tensor_model_parallel": False,
    "partition_dim": -1,
    "partition_stride": 1,
}


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int,
                                         stride: int = 1) -> None:
    """Mark ``tensor`` as sharded (or not) over TP along ``dim``."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    for name, value in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, name):
            setattr(tensor, name, value)


def copy_tensor_model_parallel_attributes(destination: torch.Tensor,
                                          source: torch.Tensor) -> None:
    for name in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor, tp_rank: int | None = None) -> bool:
    """True for TP-sharded params on every rank and for replicated params on TP rank 0 only
    (count each parameter once, e.g. for the grad norm)."""
    if getattr(param, "tensor_model_parallel", False):
        return True
    if tp_rank is None:
        tp_rank = get_parallel_state().tp_rank
    return tp_rank == 0


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            fp8: Fp8Meta | None) -> torch.Tensor:
    """``F.linear``, or its FP8 version once ``enable_fp8`` ran (see moecore.fp8)."""
    return F.linear(x, weight, bias) if fp8 is None else fp8_linear(x, weight, bias, fp8)


def _enable_fp8(layer: nn.Module, recipe) -> None:
    """Give ``layer`` (Column/RowParallelLinear) an FP8 GEMM whose amaxes reduce over TP."""
    check_fp8_sizes(type(layer).__name__, layer.weight.shape, recipe)
    layer.fp8 = Fp8Meta(recipe, group=layer.tp_group)


def _default_init(config) -> Callable[[torch.Tensor], torch.Tensor]:
    std = config.init_method_std
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _per_partition(size: int, tp: int, what: str, layer: str) -> int:
    if size % tp:
        raise ValueError(
            f"{layer}: {what}={size} is not divisible by the tensor parallel size {tp}; choose a "
            f"{what} that is a multiple of {tp} (or pad it, e.g. make_vocab_size_divisible_by)")
    return size // tp


def _master_weight_shard(shape: tuple[int, int], partition_dim: int, ps: ParallelState,
                         init_method, dtype: torch.dtype) -> nn.Parameter:
    """Draw the full ``shape`` weight with ``init_method`` (fp32, default generator), cast it to
    ``dtype`` and return this TP rank's chunk along ``partition_dim`` as a parameter."""
    master = torch.empty(shape, dtype=torch.float32)
    with torch.no_grad():
        init_method(master)
    shard = master.to(dtype).chunk(ps.tp_size, dim=partition_dim)[ps.tp_rank]
    param = nn.Parameter(shard.clone(memory_format=torch.contiguous_format))
    set_tensor_model_parallel_attributes(param, True, partition_dim)
    param.allreduce = True
    return param


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A [output_size, input_size]`` split along its rows (output
    features) over the TP group: rank r holds ``weight [output_size/tp, input_size]``.

    ``forward(x [S, B, input_size])`` (``[S/tp, B, input_size]`` under sequence parallel, which
    is all-gathered along S first; its gradient is reduce-scattered back) returns
    ``(y, bias_or_None)`` with ``y [S, B, output_size/tp]``, or ``[S, B, output_size]`` with
    ``gather_output``. The bias is added inside unless ``skip_bias_add``. ``forward(x, weight=w)``
    uses ``w`` instead of the own weight (tied output layers; see
    ``skip_weight_param_allocation``).
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None,
                 bias: bool = False, gather_output: bool = False, skip_bias_add: bool = False,
                 skip_weight_param_allocation: bool = False,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        self.input_size, self.output_size = input_size, output_size
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.output_size_per_partition = _per_partition(output_size, ps.tp_size, "output_size",
                                                        "ColumnParallelLinear")
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = bool(config.sequence_parallel) and ps.tp_size > 1
        if gather_output and self.sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with "
                             "sequence_parallel; keep the output split and gather it yourself")
        dtype = config.params_dtype
        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            self.weight = _master_weight_shard((output_size, input_size), 0, ps,
                                               init_method or _default_init(config), dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=dtype))
            set_tensor_model_parallel_attributes(self.bias, True, 0)
            self.bias.allreduce = True
        else:
            self.register_parameter("bias", None)
        self.fp8: Fp8Meta | None = None

    def enable_fp8(self, recipe) -> None:
        """Run this layer's GEMMs in FP8 (called by ``moecore.fp8.apply_fp8``)."""
        _enable_fp8(self, recipe)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None):
        if weight is None:
            weight = self.weight
            if weight is None:
                raise ValueError("ColumnParallelLinear was built with "
                                 "skip_weight_param_allocation=True: pass forward(x, weight=...)")
        expected = (self.output_size_per_partition, self.input_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"ColumnParallelLinear: weight has shape {tuple(weight.shape)}, "
                             f"expected {expected} (output_size / tp, input_size)")
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(input_, True, group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        out = _linear(x, weight, None if self.skip_bias_add else self.bias, self.fp8)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A [output_size, input_size]`` split along its columns (input
    features) over the TP group: rank r holds ``weight [output_size, input_size/tp]``.

    ``forward(x [S, B, input_size/tp])`` (or the full ``[S, B, input_size]`` with
    ``input_is_parallel=False``, split here) sums the partial products over TP: an all-reduce
    giving ``[S, B, output_size]``, or under sequence parallel a reduce-scatter along S giving
    ``[S/tp, B, output_size]``. Returns ``(y, bias_or_None)``; the bias is replicated, added
    after the reduction unless ``skip_bias_add``.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None,
                 bias: bool = False, input_is_parallel: bool = True, skip_bias_add: bool = False,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        self.input_size, self.output_size = input_size, output_size
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.input_size_per_partition = _per_partition(input_size, ps.tp_size, "input_size",
                                                       "RowParallelLinear")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = bool(config.sequence_parallel) and ps.tp_size > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True "
                             "(feed it the output of a ColumnParallelLinear)")
        dtype = config.params_dtype
        self.weight = _master_weight_shard((output_size, input_size), 1, ps,
                                           init_method or _default_init(config), dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype))
            set_tensor_model_parallel_attributes(self.bias, False, -1)
            self.bias.allreduce = True
            # Each rank adds the bias to its own S/tp rows only, so its grad is a partial sum.
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)
        self.fp8: Fp8Meta | None = None

    def enable_fp8(self, recipe) -> None:
        """Run this layer's GEMMs in FP8 (called by ``moecore.fp8.apply_fp8``)."""
        _enable_fp8(self, recipe)

    def forward(self, input_: torch.Tensor):
        if self.input_is_parallel:
            x = input_
        else:
            x = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        partial = _linear(x, self.weight, None, self.fp8)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: rank r holds rows
    ``[r * V/tp, (r + 1) * V/tp)`` as ``weight [V/tp, H]``.

    ``forward(input_ids [...])`` looks up the ids this rank owns, zeroes the others and sums over
    TP: ``[..., H]``. With ``reduce_scatter_embeddings=True`` the ids must be ``[B, S]``; the
    result is transposed to ``[S, B, H]`` and reduce-scattered along S, returning this rank's
    sequence-parallel shard ``[S/tp, B, H]`` (one collective instead of all-reduce + scatter).
    The lookup goes through :func:`moecore.kernels.embedding.embedding` (``F.embedding``; on
    CUDA by default with the deterministic Triton backward; ``config.embedding_backend``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config, init_method=None,
                 reduce_scatter_embeddings: bool = False,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.backend = config.embedding_backend  # the ``embedding`` registry request
        per_partition = _per_partition(num_embeddings, ps.tp_size, "num_embeddings (vocab size)",
                                       "VocabParallelEmbedding")
        self.num_embeddings_per_partition = per_partition
        self.vocab_start_index, self.vocab_end_index = (
            VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition, ps.tp_rank,
                                                                   ps.tp_size))
        self.weight = _master_weight_shard((num_embeddings, embedding_dim), 0, ps,
                                           init_method or _default_init(config),
                                           config.params_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.reduce_scatter_embeddings and input_ids.dim() != 2:
            raise ValueError(f"VocabParallelEmbedding(reduce_scatter_embeddings=True) needs ids "
                             f"[B, S], got shape {tuple(input_ids.shape)}")
        if self.tp_size > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
            out = embedding(local_ids, self.weight, self.backend)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = embedding(input_ids, self.weight, self.backend)
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()  # [B, S, H] -> [S, B, H]
            return reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}, "
                f"reduce_scatter_embeddings={self.reduce_scatter_embeddings}")
