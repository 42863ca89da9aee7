"""One pre-norm transformer layer: attention and an MLP (dense or MoE), each in a residual block.

``x -> input_layernorm -> self_attention -> dropout -> + x -> pre_mlp_layernorm -> mlp -> dropout
-> + residual``. Whether the MLP is MoE is read from ``config.moe_layer_pattern()``, indexed by
``layer_number - 1`` (``layer_number`` is 1-based and global across pipeline stages). The MoE
module comes from the caller (``moe_layer``: the model passes :class:`moecore.moe.MoELayer`),
because the MoE package sits above this one (it builds on ``transformer.mlp``).

Where a residual add is plain (no bias, no active hidden dropout, the residual is the pre-norm
stream) it runs inside the norm that follows it, :meth:`add_and_norm`: the attention add inside
``pre_mlp_layernorm``, and, when the caller asks for it (``defer_residual``, as
:class:`TransformerBlock` does), the MLP add inside the next layer's ``input_layernorm`` or the
final norm. Under the ``triton`` RMSNorm backend that is one kernel each way with the same
forward values (the summed gradient of the residual stream is rounded once instead of twice);
under any other norm backend the same two ops as before. (So a forward hook on a layer inside
a block sees ``(residual, mlp_out)`` where the add was deferred; their sum is the layer output.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moecore.fp8 import apply_fp8
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel import random as tp_random
from moecore.transformer.attention import SelfAttention
from moecore.transformer.mla import MultiLatentAttention
from moecore.transformer.mlp import MLP
from moecore.transformer.norms import build_norm
from moecore.transformer.recompute import discard_until_backward


class TransformerLayer(nn.Module):
    """``forward(hidden [S, B, H], attention_mask=None, rotary_pos_emb=None) -> [S, B, H]``.

    ``S`` is the local shard ``S/tp`` under sequence parallel. ``rotary_pos_emb`` is the
    ``[S_full, B or 1, 1, rot_dim]`` angle tensor of :class:`RotaryEmbedding`.
    Selective recompute (``config.recomputes``): ``moe`` / ``mlp`` checkpoint the MLP,
    ``layernorm`` frees both norm outputs until their consumers' backward (see
    :mod:`moecore.transformer.recompute`); the whole-layer ``full`` recompute lives in
    :class:`TransformerBlock`, which decides which layers to checkpoint.

    ``moe_layer``: builds the MLP of an MoE layer as ``moe_layer(config,
    layer_number=..., parallel_state=...)`` (``moecore.moe.MoELayer``); needed only when the
    config makes this layer MoE.
    """

    def __init__(self, config, layer_number: int, parallel_state: ParallelState | None = None,
                 moe_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        if not 1 <= layer_number <= config.num_layers:
            raise ValueError(f"layer_number={layer_number} must be in [1, num_layers="
                             f"{config.num_layers}] (it is 1-based)")
        ps = parallel_state or get_parallel_state()
        self.config = config
        self.layer_number = layer_number
        self.tp_group = ps.tp_group
        self.is_moe = config.moe_layer_pattern()[layer_number - 1]
        self.input_layernorm = build_norm(config, config.hidden_size)
        attention = MultiLatentAttention if config.multi_latent_attention else SelfAttention
        self.self_attention = attention(config, layer_number, parallel_state=ps)
        self.pre_mlp_layernorm = build_norm(config, config.hidden_size)
        if self.is_moe:
            if moe_layer is None:
                raise ValueError(
                    f"layer {layer_number} is an MoE layer (num_moe_experts, moe_layer_freq) "
                    "but no moe_layer was given; pass moe_layer=moecore.moe.MoELayer")
            self.mlp = moe_layer(config, layer_number=layer_number, parallel_state=ps)
        else:
            self.mlp = MLP(config, parallel_state=ps)
        self.fp8 = apply_fp8(self, config, layer_number)  # its projections' GEMMs in FP8

    def _bias_dropout_add(self, out, bias, residual):
        if bias is not None:
            out = out + bias
        return residual + F.dropout(out, p=self.config.hidden_dropout, training=self.training)

    def _plain_residual_add(self, bias) -> bool:
        """Whether a residual add of this layer is plain ``residual + out`` (no bias, no active
        hidden dropout, the residual is the pre-norm stream), so the norm after it may run it
        (:meth:`add_and_norm`)."""
        cfg = self.config
        return (bias is None and (not self.training or cfg.hidden_dropout == 0)
                and not cfg.apply_residual_connection_post_layernorm)

    def _mlp(self, x: torch.Tensor):
        if self.config.recomputes("moe" if self.is_moe else "mlp") and torch.is_grad_enabled():
            return tp_random.checkpoint(lambda t: self.mlp(t)[0], False, x,
                                        group=self.tp_group), None
        return self.mlp(x)

    def _discard_norm_output(self, normed: torch.Tensor, norm, norm_input: torch.Tensor,
                             consumer_out: torch.Tensor) -> None:
        """``--recompute-modules layernorm``: free ``normed = norm(norm_input)`` (kept by the
        GEMMs / router that read it) until backward reaches ``consumer_out``."""
        if self.config.recomputes("layernorm"):
            discard_until_backward(normed, consumer_out,
                                   lambda dst: norm.recompute_into(norm_input, dst))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None, pending: torch.Tensor | None = None,
                defer_residual: bool = False, inference_context=None):
        """``hidden [S, B, H]`` -> ``[S, B, H]``.

        ``pending`` ``[S, B, H]``: the previous layer's deferred MLP output; this layer's input
        is ``hidden + pending``, added inside ``input_layernorm``. With ``defer_residual`` the
        result is ``(residual, mlp_out)``, whose sum is the layer output, when the final add is
        plain (else ``(output, None)``), for the next layer's ``pending``.
        ``inference_context``: the KV cache of generation, handed to the attention.
        """
        post_ln_residual = self.config.apply_residual_connection_post_layernorm
        if pending is None:
            x = self.input_layernorm(hidden)
        else:
            hidden, x = self.input_layernorm.add_and_norm(hidden, pending)
        attn_out, attn_bias = self.self_attention(x, attention_mask, rotary_pos_emb,
                                                  inference_context=inference_context)
        attn_in, attn_norm_in = x, hidden
        if self._plain_residual_add(attn_bias):
            hidden, x = self.pre_mlp_layernorm.add_and_norm(hidden, attn_out)
        else:
            hidden = self._bias_dropout_add(attn_out, attn_bias,
                                            x if post_ln_residual else hidden)
            x = self.pre_mlp_layernorm(hidden)
        self._discard_norm_output(attn_in, self.input_layernorm, attn_norm_in, attn_out)
        mlp_out, mlp_bias = self._mlp(x)
        if defer_residual and self._plain_residual_add(mlp_bias):
            self._discard_norm_output(x, self.pre_mlp_layernorm, hidden, mlp_out)
            return hidden, mlp_out
        out = self._bias_dropout_add(mlp_out, mlp_bias, x if post_ln_residual else hidden)
        self._discard_norm_output(x, self.pre_mlp_layernorm, hidden, mlp_out)
        return (out, None) if defer_residual else out
