"""GPTModel: token (+ position) embedding -> TransformerBlock -> vocab-parallel output head.

Parameter names follow Megatron-Core (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.self_attention.linear_qkv.weight``, ``decoder.final_layernorm.weight``,
``output_layer.weight``, ...), so checkpoint tools can map them one to one.

Initialisation is deterministic in the TP layout: every weight is drawn as its full master tensor
from the default torch generator, in construction order (embedding, position embedding, layers
in order, output layer), and then sharded. The same seed gives the same full model at any TP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moecore.kernels import fusion_request
from moecore.models.mtp import MultiTokenPredictionBlock, attach_mtp_loss
from moecore.moe import MoELayer
from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    get_rng_tracker,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from moecore.transformer.block import TransformerBlock
from moecore.transformer.rope import build_rotary_embedding
from moecore.transformer.utils import check_tp_size, init_method_normal

POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute", "none")


class LanguageModelEmbedding(nn.Module):
    """``forward(input_ids [B, S], position_ids [B, S] | None) -> [S, B, H]``.

    Word embeddings are vocab-parallel (summed over the TP group); learned absolute position
    embeddings are replicated. Under sequence parallel the output is this rank's ``[S/tp, B, H]``
    slice (one reduce-scatter over TP, or all-reduce + scatter when learned positions must be
    added to the full sequence first). Dropout is ``config.hidden_dropout``.
    """

    def __init__(self, config, vocab_size: int, max_sequence_length: int,
                 position_embedding_type: str, ps: ParallelState):
        super().__init__()
        self.config = config
        self.tp_group = ps.tp_group
        self.max_sequence_length = max_sequence_length
        std = config.embedding_init_method_std
        init = init_method_normal(config.init_method_std if std is None else std)
        learned = position_embedding_type == "learned_absolute"
        # Under sequence parallel, one reduce-scatter replaces all-reduce + scatter, as long as
        # nothing (learned positions) must be added to the full sequence first.
        self.reduce_scatter = config.sequence_parallel and ps.tp_size > 1 and not learned
        self.word_embeddings = VocabParallelEmbedding(vocab_size, config.hidden_size,
                                                      config=config, init_method=init,
                                                      reduce_scatter_embeddings=self.reduce_scatter,
                                                      parallel_state=ps)
        self.position_embeddings = None
        if learned:
            w = torch.empty(max_sequence_length, config.hidden_size, dtype=config.params_dtype)
            init(w)
            self.position_embeddings = nn.Embedding(max_sequence_length, config.hidden_size,
                                                    _weight=w)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        emb = self.word_embeddings(input_ids)  # [B, S, H]; [S/tp, B, H] when reduce-scattered
        if self.position_embeddings is not None:
            S = input_ids.shape[1]
            if S > self.max_sequence_length:
                raise ValueError(f"sequence length {S} exceeds max_sequence_length="
                                 f"{self.max_sequence_length} of the learned position embedding")
            if position_ids is None:
                position_ids = torch.arange(S, device=input_ids.device)[None, :]
            emb = emb + self.position_embeddings(position_ids)
        if not self.reduce_scatter:
            emb = emb.transpose(0, 1).contiguous()  # [S, B, H]
            if self.config.sequence_parallel:
                emb = scatter_to_sequence_parallel_region(emb, group=self.tp_group)
        if self.config.sequence_parallel:
            if self.training and self.config.hidden_dropout > 0:
                # Each TP rank holds different tokens: draw their masks from the TP-rank RNG.
                with get_rng_tracker().fork():
                    return F.dropout(emb, p=self.config.hidden_dropout, training=True)
        return F.dropout(emb, p=self.config.hidden_dropout, training=self.training)


class GPTModel(nn.Module):
    """Decoder-only language model.

    ``forward(input_ids [B, S], position_ids [B, S] | None = None, attention_mask=None,
    labels [B, S] | None = None)`` returns the per-token fp32 loss ``[B, S]`` when ``labels`` are
    given, else logits ``[B, S, V/tp]`` (vocab split over TP). On a stage without
    ``post_process`` it returns the hidden states ``[S(/tp), B, H]`` for the next stage.
    ``attention_mask`` is ``None`` (causal) or a bool mask ``[B, 1, S, S]``, ``True`` = masked.
    ``inference_context`` (generation, :mod:`moecore.inference`): the KV cache the attention
    layers read and extend; ``position_ids`` then give each token's position.

    ``share_embeddings_and_output_weights`` and ``position_embedding_type`` (``rope``,
    ``learned_absolute`` or ``none``) default to the config's fields of those names.
    ``num_layers``/``layer_offset`` choose this stage's layers (default: the pipeline stage's even
    share); interleaved pipelines build one model chunk per virtual stage with explicit values.
    With ``share_embeddings_and_output_weights`` the output head uses the word-embedding weight;
    when the last pipeline stage does not hold the embedding it keeps a copy marked
    ``shared_embedding=True``, synchronised at construction over the embedding group, whose grad
    the trainer must all-reduce over that group.

    With ``config.mtp_num_layers`` the last stage also runs the multi-token prediction block
    (:mod:`moecore.models.mtp`) when ``labels`` are given; pass the ``loss_mask [B, S]`` then
    (None: all ones). Its losses reach the gradients through the aux-loss hook, not the returned
    loss. The MTP depths embed the input tokens, so under pipeline parallelism the last stage
    holds a copy of the embedding (``embedding.*``, marked ``shared_embedding=True`` on both
    ends, synchronised like the tied head weight), as Megatron-Core does.
    """

    def __init__(self, config, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True,
                 share_embeddings_and_output_weights: bool | None = None,
                 position_embedding_type: str | None = None,
                 parallel_state: ParallelState | None = None,
                 num_layers: int | None = None, layer_offset: int | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        check_tp_size(config, ps)
        if position_embedding_type is None:
            position_embedding_type = config.position_embedding_type
        if share_embeddings_and_output_weights is None:
            share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        if position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type={position_embedding_type!r}; choose one "
                             f"of {POSITION_EMBEDDING_TYPES}")
        if vocab_size % ps.tp_size:
            raise ValueError(f"vocab_size={vocab_size} is not divisible by the tensor parallel "
                             f"size {ps.tp_size}; pad the vocabulary to a multiple of it")
        self.config, self.ps = config, ps
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.mtp_process = post_process and bool(config.mtp_num_layers)
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type
        self.embedding = None
        if pre_process or self.mtp_process:
            # The last stage's copy is overwritten by the first stage's (_sync_shared_weight):
            # drawing it from a forked generator keeps every later weight as the one-stage
            # model's.
            fork = torch.random.fork_rng(devices=[], enabled=not pre_process)
            with fork:
                self.embedding = LanguageModelEmbedding(config, vocab_size, max_sequence_length,
                                                        position_embedding_type, ps)
        self.rotary_pos_emb = None
        if position_embedding_type == "rope":
            self.rotary_pos_emb = build_rotary_embedding(config)
        self.decoder = TransformerBlock(config, pre_process=pre_process,
                                        post_process=post_process, layer_offset=layer_offset,
                                        num_layers=num_layers, parallel_state=ps,
                                        moe_layer=MoELayer)
        self.mtp = MultiTokenPredictionBlock(config, ps) if self.mtp_process else None
        self.output_layer = None
        if post_process:
            # With tied weights on a stage that holds the embedding, the head computes with the
            # embedding's weight and owns none.
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config,
                init_method=init_method_normal(config.init_method_std), bias=False,
                gather_output=False, parallel_state=ps,
                skip_weight_param_allocation=share_embeddings_and_output_weights
                and self.embedding is not None)
        self._sync_shared_weight()
        for weight in (None if self.embedding is None else self.embedding.word_embeddings.weight,
                       None if self.output_layer is None else self.output_layer.weight):
            if weight is not None:  # --decoupled-lr's parameters (Megatron's marker)
                weight.is_embedding_or_output_parameter = True

    # ---- tied embeddings ----------------------------------------------------------------------
    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        if self.embedding is not None:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def _shared_weights(self) -> list[torch.Tensor]:
        """The weights the first and the last pipeline stage each hold: the embedding's (both
        ends hold it with MTP), or the tied embedding/head weight; none elsewhere."""
        if self.config.mtp_num_layers and self.embedding is not None:
            return list(self.embedding.parameters())
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
            return [] if weight is None else [weight]
        return []

    def _sync_shared_weight(self) -> None:
        """With pipeline stages, copy the first stage's shared weights into the last stage's
        copies by a sum all-reduce over the embedding group (the copies are zeroed first)."""
        weights = self._shared_weights()
        for weight in weights:
            weight.shared_embedding = True
        if not weights or (self.pre_process and self.post_process):
            return  # one stage holds both ends: they are literally the same tensors
        group = self.ps.group("embedding")
        for weight in weights:
            if not self.pre_process:
                weight.data.zero_()
            if group is not None:
                dist.all_reduce(weight.data, group=group)

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """Pipeline parallel: hand the previous stage's output ``[S(/tp), B, H]`` to the block."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"GPTModel takes one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # ---- forward -------------------------------------------------------------------------------
    def _rotary(self, input_ids, position_ids):
        if self.rotary_pos_emb is None:
            return None
        if input_ids is not None:
            seq_len = input_ids.shape[1]
        else:
            seq_len = self.decoder.input_tensor.shape[0]
            if self.config.sequence_parallel:
                seq_len *= self.ps.tp_size
        return self.rotary_pos_emb(seq_len, position_ids)

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None,
                inference_context=None) -> torch.Tensor:
        hidden = self.embedding(input_ids, position_ids) if self.pre_process else None
        rotary = self._rotary(input_ids, position_ids)
        hidden = self.decoder(hidden, attention_mask, rotary, inference_context=inference_context)
        if not self.post_process:
            return hidden
        if labels is None:
            logits, _ = self.output_layer(hidden, weight=self._head_weight())  # [S, B, V/tp]
            return logits.transpose(0, 1).contiguous()
        if self.mtp is not None:
            mtp_hidden = self.mtp(input_ids, position_ids, hidden, self.embedding,
                                  attention_mask, rotary)
            hidden = attach_mtp_loss(hidden, mtp_hidden, labels, loss_mask, self._token_loss,
                                     self.config.mtp_loss_scaling_factor, self.training,
                                     self.config.calculate_per_token_loss)
        return self._token_loss(hidden, labels)

    def _head_weight(self) -> torch.Tensor | None:
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return None

    def _token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Output head and cross entropy: ``hidden [S, B, H]``, ``labels [B, S]`` -> fp32
        ``[B, S]``."""
        logits, _ = self.output_layer(hidden, weight=self._head_weight())  # [S, B, V/tp]
        # Unconverted logits: the loss upcasts to fp32 inside (a fused kernel on CUDA reads the
        # bf16 logits once instead of materialising fp32 copies of [S, B, V/tp]).
        loss = vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1).contiguous(), group=self.ps.tp_group,
            backend=fusion_request(self.config.cross_entropy_loss_fusion))
        return loss.transpose(0, 1).contiguous()  # [B, S]

    # ---- accounting ----------------------------------------------------------------------------
    def num_parameters(self, active_only: bool = False) -> int:
        """Parameters of the whole model (all TP/EP shards and pipeline stages).

        ``active_only`` counts the parameters one token passes through: routed experts weigh
        ``topk / num_experts`` of their size. Collective over the pipeline group when PP > 1.
        """
        expert_ids = {id(p) for m in self.modules() if isinstance(m, MoELayer)
                      for p in m.experts.parameters()}
        ps = self.ps
        total = experts = 0
        for p in self.parameters():
            if getattr(p, "shared_embedding", False) and not self.pre_process:
                continue  # the last stage's copy of the tied embedding
            is_expert = id(p) in expert_ids
            n = p.numel()
            if getattr(p, "tensor_model_parallel", False):
                n *= ps.etp_size if is_expert else ps.tp_size
            if is_expert:
                n *= ps.ep_size
                experts += n
            total += n
        if active_only and self.config.is_moe:
            frac = self.config.moe_router_topk / self.config.num_moe_experts
            total = total - experts + round(experts * frac)
        if ps.pp_size > 1 and ps.pp_group is not None:
            # On the parameters' device: NCCL groups reduce CUDA tensors only.
            device = next(self.parameters()).device
            t = torch.tensor([total], dtype=torch.float64, device=device)
            dist.all_reduce(t, group=ps.pp_group)
            total = int(t.item())
        return total
