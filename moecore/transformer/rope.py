"""Rotary position embedding (RoPE) in Megatron's non-interleaved ``rotate_half`` convention.

The rotated part of each head vector (its first ``rotary_percent * head_dim`` channels) is split
in two halves ``x1, x2``; channel ``i`` of ``x1`` and channel ``i`` of ``x2`` form one rotating
pair with frequency ``base ** (-2i / rot_dim)``. This is the layout Hugging Face Llama/Mixtral
use, so their q/k projection weights load without permuting rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moecore.backends import AUTO
from moecore.kernels.rope import select_rope


class RotaryEmbedding(nn.Module):
    """Produces the rotation angles; :func:`apply_rotary_pos_emb` applies them.

    Args:
        kv_channels: head dimension ``d``.
        rotary_percent: fraction of ``d`` that is rotated (the rest passes through unchanged).
        rotary_base: the ``theta`` of RoPE.
    """

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0,
                 rotary_base: float = 10000.0):
        super().__init__()
        dim = int(kv_channels * rotary_percent)
        if not 0.0 < rotary_percent <= 1.0 or dim < 2 or dim % 2:
            raise ValueError(
                f"rotary_percent={rotary_percent} of kv_channels={kv_channels} gives {dim} "
                "rotated channels; it must be an even number >= 2 (pick rotary_percent so that "
                "kv_channels * rotary_percent is even)")
        self.dim = dim
        self.rotary_base = float(rotary_base)
        inv_freq = 1.0 / (self.rotary_base ** (
            torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        # Not persistent: it is a pure function of the config, so checkpoints need not carry it.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, seq_len: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Angles ``[S, B or 1, 1, rot_dim]`` (fp32), ``cat(freqs, freqs)`` as Megatron builds them.

        ``position_ids`` ``[B, S]`` selects each token's position (default ``0..S-1`` for every
        sequence, returned with a broadcast batch dimension of 1).
        """
        inv_freq = self.inv_freq.float()
        if position_ids is None:
            pos = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq)[:, None, None, :]  # [S, 1, 1, rot/2]
        else:
            if position_ids.dim() != 2 or position_ids.shape[1] != seq_len:
                raise ValueError(f"position_ids must be [batch, {seq_len}], got "
                                 f"{tuple(position_ids.shape)}")
            pos = position_ids.t().to(device=inv_freq.device, dtype=torch.float32)  # [S, B]
            freqs = (pos[..., None] * inv_freq)[:, :, None, :]  # [S, B, 1, rot/2]
        return torch.cat((freqs, freqs), dim=-1)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


class YarnRotaryEmbedding(RotaryEmbedding):
    """YaRN (NTK-by-parts) angles: Megatron-Core's ``YarnRotaryEmbedding`` and Hugging Face's
    ``yarn`` rope type. Frequencies whose wavelength fits ``beta_fast`` times into
    ``original_max_position_embeddings`` are kept, those fitting fewer than ``beta_slow``
    times are divided by ``scaling_factor``, with a linear ramp between. ``forward`` returns
    angles as :class:`RotaryEmbedding` does; the cos/sin magnitude :attr:`mscale` is left to
    the caller (multi-latent attention applies it)."""

    def __init__(self, kv_channels: int, rotary_base: float = 10000.0,
                 scaling_factor: float = 1.0, original_max_position_embeddings: int = 4096,
                 beta_fast: float = 32.0, beta_slow: float = 1.0, mscale: float = 1.0,
                 mscale_all_dim: float = 0.0, round_to_int: bool = True):
        super().__init__(kv_channels, 1.0, rotary_base)
        dim, base = self.dim, self.rotary_base
        # fp32 as Megatron and Hugging Face compute it (the plain RoPE above uses fp64).
        extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        inter = 1.0 / (scaling_factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32)
                                                 / dim))
        low = _yarn_correction_dim(beta_fast, dim, base, original_max_position_embeddings)
        high = _yarn_correction_dim(beta_slow, dim, base, original_max_position_embeddings)
        if round_to_int:  # Hugging Face's rope_scaling.truncate (gpt-oss: false)
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high  # no zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
        self.inv_freq.copy_(inter * (1 - keep) + extra * keep)
        self.mscale = float(yarn_get_mscale(scaling_factor, mscale)
                            / yarn_get_mscale(scaling_factor, mscale_all_dim))


def uses_yarn(config) -> bool:
    """``rope_type`` resolved: YaRN by default under multi-latent attention only."""
    return (config.rope_type or ("yarn" if config.multi_latent_attention else "rope")) == "yarn"


def build_rotary_embedding(config) -> RotaryEmbedding:
    """The model's rotary embedding: over ``kv_channels`` for GQA; over
    ``qk_pos_emb_head_dim`` for multi-latent attention; YaRN under :func:`uses_yarn`."""
    dim = config.qk_pos_emb_head_dim if config.multi_latent_attention else config.kv_channels
    if not uses_yarn(config):
        percent = 1.0 if config.multi_latent_attention else config.rotary_percent
        return RotaryEmbedding(dim, percent, config.rotary_base)
    return YarnRotaryEmbedding(
        dim, config.rotary_base, config.rotary_scaling_factor,
        config.original_max_position_embeddings, config.beta_fast, config.beta_slow,
        config.mscale, config.mscale_all_dim, config.yarn_correction_range_round_to_int)


def yarn_attention_mscale(config) -> float:
    """The cos/sin magnitude of YaRN under GQA (1 without YaRN), applied to q and k after the
    rotation as Hugging Face's ``attention_factor``."""
    if not uses_yarn(config):
        return 1.0
    s = config.rotary_scaling_factor
    return float(yarn_get_mscale(s, config.mscale) / yarn_get_mscale(s, config.mscale_all_dim))


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Rotate ``t`` ``[S, B, heads, d]`` by angles ``freqs`` ``[S, B or 1, 1, rot_dim]``.

    The first ``rot_dim`` channels are rotated; the rest pass through. The rotation is done in
    fp32 and cast back to ``t.dtype`` so bf16 runs do not lose the angle precision at long S.
    The ``rope`` registry (:mod:`moecore.kernels.rope`) runs it: ``fused`` (the config's
    ``apply_rope_fusion``) requests ``auto`` (the Triton kernel on CUDA once it passed its
    self-check), ``fused=False`` (``--no-rope-fusion``) the torch reference.
    """
    rot_dim = freqs.shape[-1]
    if rot_dim > t.shape[-1]:
        raise ValueError(f"rotary dim {rot_dim} exceeds the head dim {t.shape[-1]}")
    return select_rope(t, freqs, rope_request(fused)).fn(t, freqs)


def rope_request(apply_rope_fusion: bool) -> str:
    """The ``rope`` registry request of ``apply_rope_fusion``: ``auto`` or ``torch``."""
    return AUTO if apply_rope_fusion else "torch"
