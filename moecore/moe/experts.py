"""Expert MLPs: ``GroupedMLP`` (one grouped GEMM per projection) and ``SequentialMLP`` (one
small MLP per expert, the readable reference). Both map expert-grouped rows ``[N, H]`` with
``tokens_per_expert [E_local]`` to ``([N, H], None)`` and hold identical weights (transposed).
Given ``probs [N]`` (the rows' routing weights, from the dispatcher), each row's activation is
multiplied by its weight before the second projection (as Megatron-Core's grouped MLP does), so
the outputs are already weighted and the combine only sums them.

Sharding: this rank holds global experts ``ep_rank * E_local ... + E_local - 1`` and, under
expert tensor parallelism (ETP), a ``1/etp`` slice of every expert's FFN dimension. The output is
then this rank's partial sum; the dispatcher reduces it over the ETP group.

Initialisation gives the same *global* weights at any EP/ETP layout: every rank draws every
expert's full ``[H, 2F]`` (then ``[F, H]``) matrix in order from the default generator and keeps
its shard. Cost: each rank draws all experts' weights once at construction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moecore.backends import BackendUnavailableError
from moecore.config import TransformerConfig
from moecore.fp8 import Fp8Meta, check_fp8_sizes, fp8_grouped_mm
from moecore.fp8.swiglu_experts import fp8_swiglu_experts, fused_fp8_swiglu_applies
from moecore.kernels.grouped_gemm import (
    default_compute_device,
    grouped_mm,
    select_backend,
    swiglu_grouped_mm,
)
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.transformer.mlp import activation_then, fused_swiglu


def _expert_layout(num_local_experts: int, config: TransformerConfig, ps: ParallelState):
    """Validate sizes; return ``(first_global_expert, ffn_shard)``."""
    if config.num_moe_experts is None or num_local_experts * ps.ep_size != config.num_moe_experts:
        raise ValueError(
            f"num_local_experts={num_local_experts} x expert parallel size {ps.ep_size} must equal "
            f"num_moe_experts={config.num_moe_experts}; pass num_moe_experts // ep_size")
    ffn = config.moe_ffn_hidden_size
    if ffn % ps.etp_size:
        raise ValueError(f"moe_ffn_hidden_size={ffn} is not divisible by the expert tensor "
                         f"parallel size {ps.etp_size}; choose a multiple of {ps.etp_size}")
    if config.add_bias_linear and ps.etp_size > 1:
        raise ValueError("expert biases (add_bias_linear) are not sharded over expert tensor "
                         "parallelism; use --expert-tensor-parallel-size 1 or "
                         "--disable-bias-linear")
    return ps.ep_rank * num_local_experts, ffn // ps.etp_size


def init_expert_weights(num_local_experts: int, config: TransformerConfig, ps: ParallelState):
    """This rank's shards of the global expert weights, drawn in fp32 on the default device.

    Returns ``w1 [E_local, H, 2F/etp]`` (gated: ``[gate_r | up_r]``) or ``[E_local, H, F/etp]``,
    and ``w2 [E_local, F/etp, H]``. All of ``w1`` is drawn (expert 0..E-1, each ``[H, 2F]`` from
    ``normal(0, init_method_std)``) before ``w2`` (each ``[F, H]`` with the scaled output std
    ``init_method_std / sqrt(2 * num_layers)``), so every layout consumes the generator alike.
    """
    first, shard = _expert_layout(num_local_experts, config, ps)
    hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
    gated = config.gated_linear_unit
    cols = slice(ps.etp_rank * shard, (ps.etp_rank + 1) * shard)
    local = range(first, first + num_local_experts)
    w1, w2 = [], []
    for e in range(config.num_moe_experts):
        full = torch.empty(hidden, (2 if gated else 1) * ffn).normal_(0, config.init_method_std)
        if e in local:
            w1.append(torch.cat([full[:, :ffn][:, cols], full[:, ffn:][:, cols]], dim=1)
                      if gated else full[:, cols])
    std2 = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    for e in range(config.num_moe_experts):
        full = torch.empty(ffn, hidden).normal_(0, std2)
        if e in local:
            w2.append(full[cols, :])
    return torch.stack(w1), torch.stack(w2)


def _mark_expert_param(param: nn.Parameter, partition_dim: int, stride: int = 1) -> None:
    # Megatron-Core's markers: no all-reduce over the full data-parallel group; the gradient is
    # synced over the expert-data-parallel group instead. The partition attributes describe the
    # ETP shard (for checkpoint resharding).
    param.allreduce = False
    param.expert_parallel = True
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def _check_probs(probs: torch.Tensor | None, rows: torch.Tensor) -> None:
    if probs is not None and (probs.shape != rows.shape[:1] or not probs.is_floating_point()):
        raise ValueError(f"expert probs must be a float tensor [{rows.shape[0]}] (one routing "
                         f"weight per row); got {tuple(probs.shape)} {probs.dtype}")


def _check_counts(tokens_per_expert: torch.Tensor, num_local_experts: int) -> None:
    if tokens_per_expert.shape != (num_local_experts,):
        raise ValueError(f"tokens_per_expert has shape {tuple(tokens_per_expert.shape)}; "
                         f"expected [{num_local_experts}] (one count per local expert)")


class GroupedMLP(nn.Module):
    """All local experts' MLPs as two grouped GEMMs.

    Parameters: ``weight1 [E_local, H, 2F/etp]`` (gated; ``[E_local, H, F/etp]`` otherwise) and
    ``weight2 [E_local, F/etp, H]``, in ``config.params_dtype``. The GEMM backend comes from
    ``config.moe_grouped_gemm_backend`` (see ``moecore.kernels.grouped_gemm``), resolved here.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        self.config = config
        self.num_local_experts = num_local_experts
        w1, w2 = init_expert_weights(num_local_experts, config, ps)
        self.weight1 = nn.Parameter(w1.to(config.params_dtype))
        self.weight2 = nn.Parameter(w2.to(config.params_dtype))
        _mark_expert_param(self.weight1, 2, 2 if config.gated_linear_unit else 1)
        _mark_expert_param(self.weight2, 1)
        self.bias1 = self.bias2 = None
        if config.add_bias_linear:  # gpt-oss: per-expert biases of both projections
            self.bias1 = nn.Parameter(torch.zeros(w1.shape[0], w1.shape[2],
                                                  dtype=config.params_dtype))
            self.bias2 = nn.Parameter(torch.zeros(w2.shape[0], w2.shape[2],
                                                  dtype=config.params_dtype))
            _mark_expert_param(self.bias1, 1, 2 if config.gated_linear_unit else 1)
            _mark_expert_param(self.bias2, 0)
            self.bias2.tensor_model_parallel = False  # whole on each rank (ETP is refused)
        self.etp_group = ps.etp_group
        self.fp8_fc1: Fp8Meta | None = None
        self.fp8_fc2: Fp8Meta | None = None
        self.backend_name = config.moe_grouped_gemm_backend
        self._backends: dict = {}
        self.backend = self._resolve_at_construction(
            torch.bfloat16 if config.bf16 else config.params_dtype)

    def enable_fp8(self, recipe) -> None:
        """Run both grouped GEMMs in FP8 (``moecore.fp8.apply_fp8``); amaxes reduce over ETP."""
        for name, w in (("fc1", self.weight1), ("fc2", self.weight2)):
            check_fp8_sizes(f"GroupedMLP {name}", w.shape, recipe)
            setattr(self, f"fp8_{name}", Fp8Meta(recipe, self.etp_group, w.shape[0], True))

    def _mm(self, x, w, tokens_per_expert, backend, fp8: Fp8Meta | None):
        if fp8 is not None:
            return fp8_grouped_mm(x, w, tokens_per_expert, fp8)
        return grouped_mm(x, w, tokens_per_expert, backend)

    def _resolve(self, device: torch.device, dtype: torch.dtype):
        key = (device.type, dtype)
        if key not in self._backends:
            self._backends[key] = select_backend(self.backend_name, device, dtype)
        return self._backends[key]

    def _resolve_at_construction(self, dtype: torch.dtype):
        """Pick the backend for where the weights will run; a named backend that cannot run
        there raises now. Weights built on the CPU may be moved to the GPU later, so then the
        GPU is tried first and the CPU accepted too."""
        device = self.weight1.device
        candidates = [device]
        if device.type == "cpu" and default_compute_device().type != "cpu":
            candidates = [default_compute_device(), device]
        errors = []
        for candidate in candidates:
            try:
                return self._resolve(candidate, dtype)
            except BackendUnavailableError as exc:
                errors.append(exc)
        raise errors[0]

    def forward(self, permuted: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs: torch.Tensor | None = None):
        """``permuted [N, H]`` grouped by local expert, ``tokens_per_expert [E_local]`` int64
        (host or device), ``probs [N]`` fp32 (each row's routing weight, applied to its
        activation, or None) -> ``(out [N, H], None)``; under ETP ``out`` is a partial sum."""
        _check_counts(tokens_per_expert, self.num_local_experts)
        _check_probs(probs, permuted)
        if (self.bias1 is None and self.bias2 is None and fused_swiglu(self.config)
                and fused_fp8_swiglu_applies(self.fp8_fc1, self.fp8_fc2)):
            return fp8_swiglu_experts(permuted, self.weight1, self.weight2, tokens_per_expert,
                                      self.fp8_fc1, self.fp8_fc2, probs), None
        backend = self._resolve(permuted.device, permuted.dtype)
        h = self._add_bias(self._mm(permuted, self.weight1, tokens_per_expert, backend,
                                    self.fp8_fc1), self.bias1, tokens_per_expert)
        recompute = self.config.recomputes("moe_act")
        out = None
        if (recompute and fused_swiglu(self.config) and torch.is_grad_enabled()
                and self.bias2 is None and self.fp8_fc2 is None):
            out = swiglu_grouped_mm(h, self.weight2, tokens_per_expert, backend, probs)
        if out is None:
            out = activation_then(
                self.config, h, lambda act: self._add_bias(
                    self._mm(act, self.weight2, tokens_per_expert, backend, self.fp8_fc2),
                    self.bias2, tokens_per_expert, probs), recompute, probs)
        return out, None

    @staticmethod
    def _add_bias(rows: torch.Tensor, bias: torch.Tensor | None,
                  tokens_per_expert: torch.Tensor,
                  probs: torch.Tensor | None = None) -> torch.Tensor:
        """``rows [N, X]`` grouped by expert plus each row's expert's ``bias [E_local, X]``
        (times the row's ``probs [N]``, in fp32, when given: the output's bias is weighted as
        the activation was)."""
        if bias is None:
            return rows
        counts = tokens_per_expert.to(device=bias.device, dtype=torch.long)
        per_row = bias.to(rows.dtype).repeat_interleave(counts, dim=0, output_size=rows.shape[0])
        if probs is None:
            return rows + per_row
        return (rows + per_row * probs.unsqueeze(-1)).to(rows.dtype)


class _ExpertLinear(nn.Module):
    """``y = x @ weight.T`` with ``weight [out, in]`` (no bias)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class ExpertMLP(nn.Module):
    """One expert: ``linear_fc1.weight [2F/etp, H]`` (gated) -> activation ->
    ``linear_fc2.weight [H, F/etp]``."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.linear_fc1 = _ExpertLinear(w1)
        self.linear_fc2 = _ExpertLinear(w2)

    def forward(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """``x [n, H]``, ``probs [n]`` (row weights for the activation, or None) -> ``[n, H]``."""
        return activation_then(self.config, self.linear_fc1(x), self.linear_fc2,
                               self.config.recomputes("moe_act"), probs)


class SequentialMLP(nn.Module):
    """Reference experts: a Python loop over local experts, one small MLP each.

    Same initialisation as :class:`GroupedMLP`: ``local_experts[i].linear_fc1.weight`` equals
    ``GroupedMLP.weight1[i].T`` and ``linear_fc2.weight`` equals ``weight2[i].T``.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        if config.add_bias_linear:
            raise ValueError("expert biases are implemented in GroupedMLP only: use it "
                             "(--moe-grouped-gemm) or set add_bias_linear=False "
                             "(--disable-bias-linear)")
        self.config = config
        self.num_local_experts = num_local_experts
        w1, w2 = init_expert_weights(num_local_experts, config, ps)
        dtype = config.params_dtype
        self.local_experts = nn.ModuleList(
            ExpertMLP(w1[i].t().contiguous().to(dtype), w2[i].t().contiguous().to(dtype), config)
            for i in range(num_local_experts))
        for expert in self.local_experts:
            _mark_expert_param(expert.linear_fc1.weight, 0,
                               2 if config.gated_linear_unit else 1)
            _mark_expert_param(expert.linear_fc2.weight, 1)

    def forward(self, permuted: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs: torch.Tensor | None = None):
        """Same contract as :meth:`GroupedMLP.forward`."""
        _check_counts(tokens_per_expert, self.num_local_experts)
        _check_probs(probs, permuted)
        counts = tokens_per_expert.tolist()
        if sum(counts) != permuted.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {sum(counts)} but there are "
                             f"{permuted.shape[0]} rows")
        chunks = torch.split(permuted, counts)
        weights = [None] * len(chunks) if probs is None else torch.split(probs, counts)
        out = torch.cat([expert(chunk, w) for expert, chunk, w
                         in zip(self.local_experts, chunks, weights)])
        return out, None
