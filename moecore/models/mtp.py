"""Multi-token prediction (DeepSeek-V3; Megatron-Core's ``multi_token_prediction.py``).

Depth ``k`` (1-based) predicts the token ``k + 1`` positions ahead. Its input at position ``i``
is the hidden state of depth ``k - 1`` at ``i`` (depth 0: the main model's output after its final
norm) and the embedding of token ``i + k``::

    h_k = final_layernorm(layer(eh_proj(cat(enorm(embed(tokens << k)), hnorm(h_{k-1})))))

``tokens << k`` is the token ids shifted left by ``k`` with zeros rolled in (Megatron's
``roll_tensor``). ``layer`` is one transformer layer of the model's own kind (dense or MoE as
the model's last layer), and the embedding and the output head are the model's. Depth ``k``'s
loss is the masked mean cross entropy against the labels shifted left by ``k``, whose loss mask
is shifted alike (so the last ``k`` positions of a sequence never count). The training
objective is ``lm_loss + mtp_loss_scaling_factor / D * sum_k mtp_loss_k`` over ``D =
mtp_num_layers`` depths; the MTP part reaches the gradients through
:class:`MoEAuxLossAutoScaler` (the schedules set its scale to the main loss's), so the loss the
model returns and the trainer logs as ``lm loss`` stays the LM loss alone. In training mode each
depth's loss is recorded in :class:`MoELossTracker` under :data:`MTP_LOSS_NAME`, slot ``k``.

Parameter names follow Megatron-Core: ``mtp.layers.{k-1}.{enorm,hnorm,eh_proj,transformer_layer,
final_layernorm}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from moecore.moe import MoELayer
from moecore.moe.losses import MoEAuxLossAutoScaler, MoELossTracker
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel import (
    ColumnParallelLinear,
    gather_from_tensor_model_parallel_region,
    get_rng_tracker,
    scatter_to_sequence_parallel_region,
)
from moecore.transformer.layer import TransformerLayer
from moecore.transformer.norms import build_norm
from moecore.transformer.utils import init_method_normal

MTP_LOSS_NAME = "mtp loss"


def roll_left(t: torch.Tensor) -> torch.Tensor:
    """``t [B, S]`` shifted left by one along S, the last column zero (``roll_tensor``)."""
    out = torch.roll(t, shifts=-1, dims=-1)
    out[..., -1] = 0
    return out


class MultiTokenPredictionLayer(nn.Module):
    """One MTP depth: ``forward(input_ids [B, S], position_ids [B, S] | None, hidden [S, B, H],
    embedding, attention_mask, rotary_pos_emb) -> (h [S, B, H], input_ids, position_ids)``,
    the ids shifted one further for the next depth. ``S`` is ``S/tp`` under sequence parallel
    for ``hidden`` and ``h``; ``embedding`` is the model's :class:`LanguageModelEmbedding`."""

    def __init__(self, config, depth: int, ps: ParallelState):
        super().__init__()
        self.config, self.depth, self.tp_group = config, depth, ps.tp_group
        self.enorm = build_norm(config, config.hidden_size)
        self.hnorm = build_norm(config, config.hidden_size)
        # [2H -> H] split over TP by output features, gathered after (as Megatron-Core).
        self.eh_proj = ColumnParallelLinear(
            2 * config.hidden_size, config.hidden_size, config=config,
            init_method=init_method_normal(config.init_method_std), bias=False,
            gather_output=False, parallel_state=ps)
        # The last decoder layer's number gives the model's layer kind and init; the MoE router
        # logs under its own slot after the decoder's layers.
        self.transformer_layer = TransformerLayer(config, config.num_layers, parallel_state=ps,
                                                  moe_layer=MoELayer)
        if self.transformer_layer.is_moe:
            self.transformer_layer.mlp.router.set_layer_number(config.num_layers + depth)
        self.final_layernorm = build_norm(config, config.hidden_size)

    def forward(self, input_ids, position_ids, hidden, embedding, attention_mask=None,
                rotary_pos_emb=None):
        input_ids = roll_left(input_ids)
        if position_ids is None and embedding.position_embeddings is not None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        if position_ids is not None:
            position_ids = roll_left(position_ids)
        emb = embedding(input_ids, position_ids)  # [S(/tp), B, H]
        x = torch.cat((self.enorm(emb), self.hnorm(hidden)), dim=-1)
        sp = self.config.sequence_parallel
        dropout = self.training and self.config.hidden_dropout > 0
        with get_rng_tracker().fork() if sp and dropout else contextlib.nullcontext():
            x, _ = self.eh_proj(x)  # [S, B, H/tp]
            x = gather_from_tensor_model_parallel_region(x, group=self.tp_group)
            if sp:
                x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
            x = self.transformer_layer(x, attention_mask, rotary_pos_emb)
        return self.final_layernorm(x), input_ids, position_ids


class MultiTokenPredictionBlock(nn.Module):
    """``config.mtp_num_layers`` depths, run in sequence on the last pipeline stage.

    ``forward(input_ids [B, S], position_ids, hidden [S, B, H], embedding, attention_mask,
    rotary_pos_emb) -> [h_1, ..., h_D]``, each ``[S, B, H]`` (``S/tp`` under sequence parallel).
    """

    def __init__(self, config, ps: ParallelState):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MultiTokenPredictionLayer(config, k + 1, ps)
                                    for k in range(config.mtp_num_layers))

    def forward(self, input_ids, position_ids, hidden, embedding, attention_mask=None,
                rotary_pos_emb=None) -> list[torch.Tensor]:
        outputs = []
        for layer in self.layers:
            hidden, input_ids, position_ids = layer(input_ids, position_ids, hidden, embedding,
                                                    attention_mask, rotary_pos_emb)
            outputs.append(hidden)
        return outputs


def attach_mtp_loss(hidden: torch.Tensor, mtp_hidden: list[torch.Tensor], labels: torch.Tensor,
                    loss_mask: torch.Tensor | None,
                    per_token_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    scaling_factor: float, training: bool,
                    per_token: bool = False) -> torch.Tensor:
    """``hidden`` (the main head's input) carrying the MTP losses into backward.

    ``per_token_loss(h [S, B, H], labels [B, S]) -> [B, S]`` is the model's head and cross
    entropy; ``loss_mask [B, S]`` (None: all ones) is the LM loss mask. Depth ``k`` adds
    ``scaling_factor / D * sum(mask_k * ce_k) / max(sum(mask_k), 1)`` with ``labels``/``mask``
    shifted left ``k`` times. With ``per_token`` (``--calculate-per-token-loss``, where the
    schedules divide every gradient by the global batch's token count) the depth's masked *sum*
    rescaled to the micro-batch's LM token count is added instead, as in Megatron-Core. In
    training, each depth's masked mean is saved to :class:`MoELossTracker` (``MTP_LOSS_NAME``,
    slot ``k``) for logging.
    """
    depths = len(mtp_hidden)
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else \
        loss_mask.float()
    lm_tokens = mask.sum()
    for k, h in enumerate(mtp_hidden, start=1):
        labels, mask = roll_left(labels), roll_left(mask)
        num_tokens = mask.sum().clamp(min=1.0)
        loss = (per_token_loss(h, labels).float() * mask).sum() / num_tokens
        if training:
            MoELossTracker.save(MTP_LOSS_NAME, k, loss, num_layers=depths)
        added = loss * lm_tokens if per_token else loss
        hidden = MoEAuxLossAutoScaler.apply(hidden, added * (scaling_factor / depths))
    return hidden
