"""Dense tensor-parallel MLP: ``linear_fc1`` (column) -> activation -> ``linear_fc2`` (row).

With ``gated_linear_unit`` (SwiGLU when ``activation_func`` is silu) ``linear_fc1`` produces
``2F`` outputs. TP rank ``r`` holds ``[gate_r | up_r]`` (its ``F/tp`` gate rows followed by its
``F/tp`` up rows), so the activation needs no communication. In Megatron's terms the fc1 weight
is split with ``partition_stride=2``: the full master weight is ``[gate; up]`` (``[2F, H]``) and
rank ``r`` holds chunks ``r`` and ``r + tp`` of its ``2 * tp`` row chunks. The init draws the
``[gate; up]`` master weight exactly as at TP=1 and reorders rows so each contiguous shard is
``[gate_r; up_r]``: TP=1 and TP=N start as the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moecore.kernels.swiglu import swiglu, swiglu_into
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from moecore.transformer.recompute import discard_until_backward
from moecore.transformer.utils import check_tp_size, init_method_normal, scaled_init_method_normal


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``: Megatron's ``--quick-geglu`` activation (gpt-oss's experts)."""
    return x * torch.sigmoid(1.702 * x)


def fused_swiglu(config) -> bool:
    """Whether the activation is SwiGLU through :mod:`moecore.kernels.swiglu`."""
    return (config.gated_linear_unit and config.bias_swiglu_fusion
            and config.activation_func is F.silu and not config.glu_linear_offset
            and config.activation_func_clamp_value is None)


def apply_activation(config, h: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` on ``h [..., 2F]`` (gated, laid out ``[gate | up]``) or ``act(h)``;
    with ``probs`` (``[N]`` fp32 for ``h [N, *]``: the experts' routing weights) each row times
    its weight, in fp32 and cast back once.

    SwiGLU goes through ``moecore.kernels.swiglu`` (one fused pass each way on CUDA; autograd
    saves only ``h`` and ``probs``; on CPU bitwise the unfused ops) unless
    ``config.bias_swiglu_fusion`` is off. Shared by the dense MLP and the experts.
    """
    if fused_swiglu(config):
        act = swiglu(h.reshape(-1, h.shape[-1]), probs=probs)
        return act.view(*h.shape[:-1], h.shape[-1] // 2)
    if config.gated_linear_unit:
        gate, up = torch.chunk(h, 2, dim=-1)
        clamp = config.activation_func_clamp_value
        if clamp is not None:  # gpt-oss: gate <= c, -c <= up <= c
            gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
        if config.glu_linear_offset:
            up = up + config.glu_linear_offset
        act = config.activation_func(gate) * up
    else:
        act = config.activation_func(h)
    if probs is None:
        return act
    return (act * probs.unsqueeze(-1)).to(act.dtype)


def _activation_into(config, h: torch.Tensor, out: torch.Tensor,
                     probs: torch.Tensor | None = None) -> None:
    """Write :func:`apply_activation` ``(config, h, probs)`` into ``out`` (no autograd; the same
    kernels, so the same values)."""
    if fused_swiglu(config) and out.is_contiguous():
        swiglu_into(h.reshape(-1, h.shape[-1]), out.view(-1, out.shape[-1]), probs=probs)
    else:
        out.copy_(apply_activation(config, h, probs))


def activation_then(config, h: torch.Tensor, fc2: Callable[[torch.Tensor], torch.Tensor],
                    recompute: bool = False, probs: torch.Tensor | None = None) -> torch.Tensor:
    """``fc2(apply_activation(config, h, probs))``. With ``recompute`` the activation output
    (which ``fc2`` keeps only for its weight gradient) is freed after ``fc2``'s forward and
    recomputed from ``h`` (and ``probs``) just before ``fc2``'s backward (``--recompute-modules
    moe_act``)."""
    act = apply_activation(config, h, probs)
    out = fc2(act)
    if recompute:
        probs_now = None if probs is None else probs.detach()
        discard_until_backward(act, out, lambda dst: _activation_into(config, h, dst, probs_now))
    return out


def glu_interleaved_init(base_init, tp: int):
    """Init for the full ``[2F, H]`` fc1 master weight: draw ``[gate; up]`` with ``base_init``,
    then order rows as ``[gate_0; up_0; gate_1; up_1; ...]`` (``F/tp`` rows each) so the
    contiguous TP shard ``r`` is ``[gate_r; up_r]``."""

    def init_(w: torch.Tensor) -> torch.Tensor:
        base_init(w)
        if tp == 1:
            return w
        two_f = w.shape[0]
        if two_f % (2 * tp):
            raise ValueError(f"fc1 rows {two_f} must be divisible by 2 * tp = {2 * tp}")
        with torch.no_grad():
            gate, up = w.view(2, tp, two_f // (2 * tp), *w.shape[1:]).unbind(0)
            w.copy_(torch.stack((gate, up), dim=1).reshape(w.shape))
        return w

    return init_


class MLP(nn.Module):
    """``forward(hidden [S, B, H]) -> (out [S, B, H], bias [H] or None)``.

    ``hidden``/``out`` are ``[S/tp, B, H]`` under sequence parallel. ``bias`` is ``linear_fc2``'s
    bias left for the caller to add (fused with dropout and the residual).
    """

    def __init__(self, config, ffn_hidden_size: int | None = None,
                 parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        check_tp_size(config, ps)
        self.config = config
        ffn = ffn_hidden_size or config.ffn_hidden_size
        if ffn % ps.tp_size:
            raise ValueError(f"ffn_hidden_size={ffn} is not divisible by the tensor parallel size "
                             f"{ps.tp_size}")
        self.gated = config.gated_linear_unit
        init = init_method_normal(config.init_method_std)
        if self.gated:
            init = glu_interleaved_init(init, ps.tp_size)
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size, 2 * ffn if self.gated else ffn, config=config, init_method=init,
            bias=config.add_bias_linear, gather_output=False, parallel_state=ps)
        if self.gated:
            for p in self.linear_fc1.parameters():
                p.partition_stride = 2
        self.linear_fc2 = RowParallelLinear(
            ffn, config.hidden_size, config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            parallel_state=ps)

    def forward(self, hidden: torch.Tensor):
        x, _ = self.linear_fc1(hidden)
        return self.linear_fc2(apply_activation(self.config, x))
