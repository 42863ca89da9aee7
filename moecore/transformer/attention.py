"""Causal self-attention with grouped-query attention (GQA), optional QK-norm and RoPE.

QK-norm (``qk_layernorm``) is per head (``q_layernorm``/``k_layernorm``, ``[d]``, replicated),
or with ``qk_layernorm_hidden_dim`` over the whole q and k projections as OLMoE
(``q_proj_layernorm [nh*d]``/``k_proj_layernorm [ng*d]``, split over TP with the heads).

Fused QKV weight layout (``linear_qkv.weight``, ``[(nh + 2 * ng) * d, H]`` as a full master
weight; ``nh`` query heads, ``ng`` query groups = key/value heads, ``d`` = ``kv_channels``,
``hpg = nh // ng`` query heads per group). Output rows are grouped per query group ``g`` in
order ``g = 0 .. ng-1``, each group a block of ``(hpg + 2) * d`` rows::

    rows [g*(hpg+2)*d           : g*(hpg+2)*d + hpg*d]      q heads g*hpg .. g*hpg+hpg-1 (d each)
    rows [g*(hpg+2)*d + hpg*d    : g*(hpg+2)*d + (hpg+1)*d]  k head g
    rows [g*(hpg+2)*d + (hpg+1)*d: (g+1)*(hpg+2)*d]          v head g

This is Megatron-Core's layout. Tensor parallelism splits the rows contiguously (``partition_dim
0``, stride 1), so TP rank ``r`` holds query groups ``r*ng/tp .. (r+1)*ng/tp - 1`` with their q
heads, k and v: no communication is needed inside attention. Query head ``i`` attends with
key/value head ``i // hpg``. ``add_qkv_bias`` / ``add_bias_linear`` bias follows the same order.
Converting from Hugging Face ``q_proj [nh*d, H]``, ``k_proj [ng*d, H]``, ``v_proj [ng*d, H]``:
``cat([q.view(ng, hpg*d, H), k.view(ng, d, H), v.view(ng, d, H)], dim=1).reshape(-1, H)``
(RoPE needs no row permutation: both use the non-interleaved ``rotate_half`` pairing).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moecore.kernels.rope import fused_qkv_rope, rope_cos_sin, select_rope
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel import random as tp_random
from moecore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from moecore.transformer.context_parallel import context_attention
from moecore.transformer.norms import build_norm
from moecore.transformer.projection_norm import ProjectionRMSNorm
from moecore.transformer.rope import apply_rotary_pos_emb, rope_request, yarn_attention_mscale
from moecore.transformer.utils import (
    check_attention_layout,
    init_method_normal,
    scaled_init_method_normal,
)


class SelfAttention(nn.Module):
    """``forward(hidden [S, B, H], attention_mask=None, rotary_pos_emb=None) -> (out, bias)``.

    ``hidden`` and ``out`` are ``[S/tp, B, H]`` under sequence parallel (``linear_qkv`` all-gathers
    the sequence over the TP group, ``linear_proj`` reduce-scatters it back); ``bias`` is the
    output projection's bias (``None`` without ``add_bias_linear``), left for the caller to add.
    Heads and query groups are split across the TP group.

    ``inference_context`` (generation, see :mod:`moecore.inference`): an object whose
    ``attend(layer_number, q, k, v, window=, sinks=, softmax_scale=) -> [S, B, nh_l * d]``
    stores this step's rotated ``k``/``v`` in its cache and attends over the cached keys.
    """

    def __init__(self, config, layer_number: int, parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        check_attention_layout(config, ps)
        self.config = config
        self.layer_number = layer_number
        self.tp_group = ps.tp_group
        self.cp_group = ps.cp_group
        tp = ps.tp_size
        nh, ng, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
        for name, v in (("num_attention_heads", nh), ("num_query_groups", ng)):
            if v % tp:
                raise ValueError(f"{name}={v} is not divisible by the tensor parallel size {tp}")
        self.heads_per_group = nh // ng
        self.num_heads_local = nh // tp
        self.num_groups_local = ng // tp
        self.head_dim = d
        init = init_method_normal(config.init_method_std)
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, (nh + 2 * ng) * d, config=config, init_method=init,
            bias=config.add_bias_linear or config.add_qkv_bias, gather_output=False,
            parallel_state=ps)
        self.q_layernorm = self.k_layernorm = None
        self.q_proj_layernorm = self.k_proj_layernorm = None
        if config.qk_layernorm and config.qk_layernorm_hidden_dim:
            # One norm over the whole projection, its weight split with the heads over TP (its
            # own name: the converter's sharding table splits it, not replicates it).
            self.q_proj_layernorm = ProjectionRMSNorm(nh, d, config.layernorm_epsilon,
                                                      config.params_dtype, tp, ps.tp_group)
            self.k_proj_layernorm = ProjectionRMSNorm(ng, d, config.layernorm_epsilon,
                                                      config.params_dtype, tp, ps.tp_group)
        elif config.qk_layernorm:
            # Each TP rank normalises only its own heads, so these grads are partial over TP.
            self.q_layernorm = build_norm(config, d, sequence_parallel=tp > 1)
            self.k_layernorm = build_norm(config, d, sequence_parallel=tp > 1)
        self.window = layer_window(config, layer_number)
        self.mscale = yarn_attention_mscale(config)
        if config.softmax_type == "learnable":
            # One logit per head; heads are split over TP (no gradient sync inside TP).
            self.sinks = nn.Parameter(torch.zeros(self.num_heads_local,
                                                  dtype=config.params_dtype))
            self.sinks.tensor_model_parallel = True
            self.sinks.partition_dim, self.sinks.partition_stride = 0, 1
        elif config.softmax_type == "off-by-one":
            self.register_buffer("sinks", torch.zeros(self.num_heads_local), persistent=False)
        else:
            self.sinks = None
        self.linear_proj = RowParallelLinear(
            nh * d, config.hidden_size, config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            parallel_state=ps)

    def split_qkv(self, mixed: torch.Tensor):
        """``[S, B, ng_l*(hpg+2)*d]`` -> q ``[S, B, nh_l, d]``, k, v ``[S, B, ng_l, d]``."""
        S, B = mixed.shape[:2]
        d, hpg = self.head_dim, self.heads_per_group
        mixed = mixed.view(S, B, self.num_groups_local, (hpg + 2) * d)
        q, k, v = torch.split(mixed, [hpg * d, d, d], dim=3)
        return q.reshape(S, B, self.num_heads_local, d), k, v

    def _fuse_split_and_rope(self, mixed: torch.Tensor, freqs: torch.Tensor | None) -> bool:
        """Whether the QKV split and both rotations run as one fused op
        (:func:`~moecore.kernels.rope.fused_qkv_rope`): RoPE on, no QK-norm between
        the split and the rotation, and the fused RoPE kernel usable here (CUDA, Triton,
        ``apply_rope_fusion``, angles without grad)."""
        if (freqs is None or self.config.qk_layernorm or not self.config.apply_rope_fusion
                or freqs.requires_grad):
            return False
        S, B = mixed.shape[:2]
        probe = mixed.view(S, B, self.num_groups_local, -1)[..., : self.head_dim]
        return select_rope(probe, freqs, rope_request(True)).name == "triton"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None, inference_context=None):
        mixed, _ = self.linear_qkv(hidden)
        if self._fuse_split_and_rope(mixed, rotary_pos_emb):
            S, B = mixed.shape[:2]
            cos, sin = rope_cos_sin(rotary_pos_emb)
            q, k, v = fused_qkv_rope(
                mixed.view(S, B, self.num_groups_local, -1), cos, sin, self.heads_per_group,
                self.head_dim)
        else:
            q, k, v = self.split_qkv(mixed)
            if self.q_layernorm is not None:
                q, k = self.q_layernorm(q), self.k_layernorm(k)
            elif self.q_proj_layernorm is not None:
                q, k = self.q_proj_layernorm(q), self.k_proj_layernorm(k)
            if rotary_pos_emb is not None:
                fused = self.config.apply_rope_fusion
                q = apply_rotary_pos_emb(q, rotary_pos_emb, fused=fused)
                k = apply_rotary_pos_emb(k, rotary_pos_emb, fused=fused)
        if self.mscale != 1.0:  # YaRN's cos/sin magnitude, on both q and k
            q, k = q * self.mscale, k * self.mscale
        if inference_context is not None:
            context = inference_context.attend(self.layer_number, q, k, v, window=self.window,
                                               sinks=self.sinks, softmax_scale=None)
            return self.linear_proj(context)
        dropout_p = self.config.attention_dropout if self.training else 0.0

        def attend(q_, k_, v_):
            # Heads differ across TP ranks, so their dropout masks come from the TP-rank RNG.
            rng = tp_random.get_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
            with rng:
                return context_attention(q_, k_, v_, attention_mask, dropout_p,
                                         self.config.attention_backend, cp_group=self.cp_group,
                                         cp_comm_type=self.config.cp_comm_type,
                                         window=self.window, sinks=self.sinks)

        if self.config.recomputes("core_attn") and torch.is_grad_enabled():
            context = tp_random.checkpoint(attend, False, q, k, v, group=self.tp_group)
        else:
            context = attend(q, k, v)
        return self.linear_proj(context)


def layer_window(config, layer_number: int) -> int | None:
    """The left window of (1-based) layer ``layer_number`` under ``window_size`` and
    ``window_attn_skip_freq`` (Megatron-Core's rule), or None for full attention."""
    if config.window_size is None:
        return None
    freq = config.window_attn_skip_freq
    if freq is None:
        windowed = True
    elif isinstance(freq, int):
        windowed = layer_number % freq != 0
    else:
        windowed = bool(freq[layer_number - 1])
    return config.window_size[0] if windowed else None
