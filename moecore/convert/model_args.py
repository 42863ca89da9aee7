"""The ``pretrain_gpt.py`` args that describe a converted model, and what follows from them.

A checkpoint stores its run's args (:func:`moecore.arguments.args_to_dict`); the converter reads
and writes the same namespace (built by moecore's own parser, so every field has its default).
From it come the :class:`TransformerConfig` of a layout, the exact per-shard parameter names and
shapes (the model built on the ``meta`` device for each shard's rank), and the
``pretrain_gpt.py`` flags that rebuild the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch

from moecore.arguments import build_parser, transformer_config_from_args
from moecore.arguments.checkpoint_args import MODEL_DESTS, PARALLEL_DESTS
from moecore.convert.reshard import Layout, model_keys
from moecore.data.tokenizers import vocab_size_with_padding
from moecore.models import GPTModel
from moecore.parallel_state import ParallelState

# Printed even at their default value: they define the model's shape.
_ALWAYS = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
           "max_position_embeddings", "position_embedding_type", "normalization", "norm_epsilon",
           "rotary_base",
           "num_experts", "moe_ffn_hidden_size", "moe_router_topk",
           "make_vocab_size_divisible_by", "tensor_model_parallel_size"}
TP_PP_DP_ORDER = "tp-cp-ep-pp-dp"


def default_args() -> argparse.Namespace:
    return build_parser().parse_args([])


def args_from_flags(flags: list[str]) -> argparse.Namespace:
    """Parse model flags with ``pretrain_gpt.py``'s parser (no run-level validation)."""
    return complete_model_args(build_parser().parse_args(flags))


def args_from_dict(saved: dict) -> argparse.Namespace:
    """A checkpoint's saved args over the parser defaults (older checkpoints may lack fields)."""
    ns = default_args()
    for k, v in saved.items():
        setattr(ns, k, v)
    return complete_model_args(ns)


def complete_model_args(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill the model fields ``pretrain_gpt.py``'s validation derives (query groups, FFN size,
    position embedding) so the namespace describes the model on its own."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(ns, flag) is None:
            raise ValueError(f"the model args lack --{flag.replace('_', '-')}")
    if ns.use_rotary_position_embeddings:
        ns.position_embedding_type = "rope"
    if not ns.group_query_attention:
        ns.num_query_groups = ns.num_attention_heads
    if ns.ffn_hidden_size is None:
        ns.ffn_hidden_size = (int(4 * ns.hidden_size * 2 / 3 / 64) * 64 if ns.swiglu
                              else 4 * ns.hidden_size)
    if ns.num_experts is not None and ns.moe_ffn_hidden_size is None:
        ns.moe_ffn_hidden_size = ns.ffn_hidden_size
    return ns


def virtual_stages(ns: argparse.Namespace) -> int:
    """Model chunks per pipeline rank from either of Megatron's two virtual-pipeline flags."""
    # virtual_pipeline_model_parallel_size: set by validation, absent from unvalidated args
    vp = vars(ns).get("virtual_pipeline_model_parallel_size") or \
        ns.num_virtual_stages_per_pipeline_rank
    per_stage = ns.num_layers_per_virtual_pipeline_stage
    if not vp and per_stage:
        vp = ns.num_layers // (ns.pipeline_model_parallel_size * per_stage)
    return vp or 1


def layout_of_args(ns: argparse.Namespace) -> Layout:
    return Layout(tp=ns.tensor_model_parallel_size, pp=ns.pipeline_model_parallel_size,
                  ep=ns.expert_model_parallel_size, etp=ns.expert_tensor_parallel_size,
                  order=TP_PP_DP_ORDER if ns.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp",
                  vp=virtual_stages(ns),
                  first=ns.decoder_first_pipeline_num_layers,
                  last=ns.decoder_last_pipeline_num_layers)


def auto_divisible_by(true_vocab_size: int, tp: int) -> int:
    """The largest power of two ``d <= 128`` for ``--make-vocab-size-divisible-by`` that pads the
    vocabulary no more than needed for TP (no padding when ``tp`` divides it): zero padding rows
    add logits that the original model did not have."""
    least = vocab_size_with_padding(true_vocab_size, 1, tp)
    d = 128
    while d > 1 and vocab_size_with_padding(true_vocab_size, d, tp) != least:
        d //= 2
    return d


def true_vocab_size_of(ns: argparse.Namespace) -> int | None:
    """The tokenizer's vocabulary size of a checkpoint's args, when they tell it: recorded by
    the converter, ``--vocab-size`` + 1 for the mock data's NullTokenizer (its EOD id), or the
    ``vocab_size`` of ``config.json`` in a ``--tokenizer-model`` directory."""
    if getattr(ns, "true_vocab_size", None):
        return ns.true_vocab_size
    if ns.tokenizer_type in (None, "NullTokenizer") and ns.vocab_size:
        return ns.vocab_size + 1
    # --tokenizer-model naming a Hugging Face model directory: its config's vocabulary.
    path = os.path.join(ns.tokenizer_model or "", "config.json")
    if ns.tokenizer_model and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("vocab_size")
    return None


def target_args(source: argparse.Namespace, layout: Layout, true_vocab_size: int,
                dtype: torch.dtype, *, grouped_gemm: bool | None = None,
                divisible_by: int | None = None) -> argparse.Namespace:
    """``source``'s model at ``layout`` in ``dtype``: parallel sizes, sequence parallel (required
    for MoE at TP > 1), vocabulary padding, expert implementation and precision set."""
    ns = copy.deepcopy(source)
    ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size = layout.tp, layout.pp
    ns.expert_model_parallel_size = layout.ep
    ns.expert_tensor_parallel_size = layout.etp
    ns.use_tp_pp_dp_mapping = layout.order == TP_PP_DP_ORDER
    layout.chunks(ns.num_layers)  # raises when the layers do not split that way
    ns.num_layers_per_virtual_pipeline_stage = None
    ns.num_virtual_stages_per_pipeline_rank = layout.vp if layout.vp > 1 else None
    ns.virtual_pipeline_model_parallel_size = layout.vp if layout.vp > 1 else None
    ns.decoder_first_pipeline_num_layers = layout.first
    ns.decoder_last_pipeline_num_layers = layout.last
    if layout.tp == 1:
        ns.sequence_parallel = False
    elif ns.num_experts is not None:
        ns.sequence_parallel = True
    if grouped_gemm is not None:
        ns.moe_grouped_gemm = grouped_gemm
    ns.make_vocab_size_divisible_by = divisible_by or auto_divisible_by(true_vocab_size,
                                                                        layout.tp)
    ns.true_vocab_size = true_vocab_size  # the tokenizer's vocabulary (not a pretrain flag)
    ns.padded_vocab_size = vocab_size_with_padding(true_vocab_size,
                                                   ns.make_vocab_size_divisible_by, layout.tp)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cannot write parameters of dtype {dtype}; use --dtype bf16 or fp32")
    ns.bf16, ns.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    return ns


def transformer_config(ns: argparse.Namespace):
    """The :class:`TransformerConfig` of ``ns``'s model at ``ns``'s layout."""
    config = transformer_config_from_args(ns)
    # The dispatcher holds no parameters; allgather builds without process groups.
    return config.replace(moe_token_dispatcher_type="allgather",
                          moe_grouped_gemm_backend="auto")


def expected_shard_state(ns: argparse.Namespace, ps: ParallelState
                         ) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``{state key: {local name: (shape, dtype)}}`` of rank ``ps``'s model chunks (state key
    ``model``, or ``model0``, ``model1``, ... with virtual pipeline stages): the chunks built as
    the trainer builds them, on the ``meta`` device (no memory, no process groups)."""
    config = transformer_config(ns)
    chunks = layout_of_args(ns).chunks(ns.num_layers)[ps.pp_rank]
    out = {}
    for v, (key, (offset, n)) in enumerate(zip(model_keys(len(chunks)), chunks)):
        with torch.device("meta"):
            model = GPTModel(
                config, vocab_size=ns.padded_vocab_size,
                max_sequence_length=ns.max_position_embeddings or ns.seq_length or 1,
                pre_process=ps.is_pipeline_first_stage() and v == 0,
                post_process=ps.is_pipeline_last_stage() and v == len(chunks) - 1,
                share_embeddings_and_output_weights=not ns.untie_embeddings_and_output_weights,
                position_embedding_type=ns.position_embedding_type, parallel_state=ps,
                layer_offset=offset, num_layers=n)
        out[key] = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    return out


# ---- printing the flags --------------------------------------------------------------------------
def _actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser()._actions if a.option_strings}


def _render(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def pretrain_flags(ns: argparse.Namespace) -> list[str]:
    """The ``pretrain_gpt.py`` flags that rebuild ``ns``'s model at its layout and precision
    (data, tokenizer, batch and optimizer flags are the user's)."""
    actions = _actions()
    out: list[str] = []
    for dest in MODEL_DESTS + PARALLEL_DESTS:
        if dest not in actions:
            continue
        action, value = actions[dest], getattr(ns, dest)
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out += [flag] if value else []
        elif isinstance(action, argparse._StoreFalseAction):
            out += [] if value else [flag]
        elif value is not None and (value != action.default or dest in _ALWAYS):
            if dest == "num_query_groups" and not ns.group_query_attention:
                continue
            out += [flag, _render(value)]
    return out
