"""Transformer building blocks: norms, RoPE, attention, MLP, layer and block."""

from moecore.kernels.attention import core_attention
from moecore.transformer.attention import SelfAttention
from moecore.transformer.block import TransformerBlock
from moecore.transformer.layer import TransformerLayer
from moecore.transformer.mla import MultiLatentAttention
from moecore.transformer.mlp import MLP
from moecore.transformer.norms import LayerNorm, RMSNorm, build_norm
from moecore.transformer.rope import RotaryEmbedding, YarnRotaryEmbedding, apply_rotary_pos_emb

__all__ = [
    "MLP", "LayerNorm", "MultiLatentAttention", "RMSNorm", "RotaryEmbedding", "SelfAttention",
    "TransformerBlock", "TransformerLayer", "YarnRotaryEmbedding", "apply_rotary_pos_emb",
    "build_norm", "core_attention",
]
