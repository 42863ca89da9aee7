"""Hugging Face OLMoE (``OlmoeForCausalLM``) <-> moecore: the config and the parameter mapping.

=====================================================  =========================================
Hugging Face, layer ``i`` (``model.layers.{i}.``)      moecore global (``decoder.layers.{i}.``)
=====================================================  =========================================
``input_layernorm / post_attention_layernorm``         ``input_layernorm / pre_mlp_layernorm``
``self_attn.{q,k,v}_proj.weight``                      ``self_attention.linear_qkv.weight`` (rows
                                                       per query group, as for Mixtral)
``self_attn.o_proj.weight``                            ``self_attention.linear_proj.weight``
``self_attn.q_norm.weight [nh*d]``                     ``self_attention.q_proj_layernorm.weight``
``self_attn.k_norm.weight [ng*d]``                     ``self_attention.k_proj_layernorm.weight``
``mlp.gate.weight [E, H]``                             ``mlp.router.weight``
``mlp.experts.{e}.{gate,up}_proj [F, H]``              ``mlp.experts.weight1[e] = [gate; up].T``
``mlp.experts.{e}.down_proj [H, F]``                   ``mlp.experts.weight2[e] = down.T``
=====================================================  =========================================

Embedding, final norm and ``lm_head`` map as for Mixtral (:mod:`hf_base`). OLMoE's QK norm is
one RMSNorm over the whole q and k projections before the split into heads:
``--qk-layernorm --qk-layernorm-hidden-dim``. Routing: softmax over all experts, then the top-k
weights as they are (``norm_topk_prob: false``, OLMoE-1B-7B) = ``--moe-router-pre-softmax``;
``norm_topk_prob: true`` renormalises them = moecore's default (post-softmax) router.
``clip_qkv`` (clamping q, k, v) is not implemented: a config that sets it is refused.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moecore.convert import hf_mixtral
from moecore.convert.hf_base import (
    HFSinkBase,
    HFSourceBase,
    args_from_hf_flags,
    llama_attention_entries,
    llama_dims,
    llama_moe_flags,
    refuse_fields,
    refuse_flags,
    refuse_fractional_theta,
    rope_theta,
    set_head_dim,
    unsupported,
    warn_unknown_fields,
)

ARCHITECTURE = "OlmoeForCausalLM"
MODEL_TYPES = ("olmoe",)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_experts", "num_experts_per_tok")
# Read below, or about tokens, caching or the library rather than the computation.
_KNOWN = set(_REQUIRED) | {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "id2label",
    "label2id", "tokenizer_class", "initializer_range", "max_position_embeddings",
    "attention_dropout", "router_aux_loss_coef", "tie_word_embeddings", "num_key_value_heads",
    "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "clip_qkv", "norm_topk_prob", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type"}


def validate_hf_config(cfg: dict) -> None:
    """Raise ``ValueError`` naming the first field moecore cannot represent."""
    if cfg.get("model_type") not in MODEL_TYPES:
        raise unsupported("model_type", cfg.get("model_type"), "this converter reads OLMoE "
                          f"checkpoints ({ARCHITECTURE}, model_type 'olmoe')")
    for field in _REQUIRED:
        if cfg.get(field) is None:
            raise ValueError(f"config.json lacks the field {field}, which an OLMoE config has")
    checks = [
        ("clip_qkv", cfg.get("clip_qkv") is None,
         "clamping q, k and v is not implemented; only checkpoints with clip_qkv null convert"),
        ("hidden_act", cfg.get("hidden_act", "silu") == "silu",
         "moecore's gated MLP is SwiGLU (silu); other activations are not mapped"),
        ("rope_scaling", cfg.get("rope_scaling") in (None, {"rope_type": "default"},
                                                     {"type": "default"}),
         "scaled RoPE is not implemented"),
        ("attention_bias", not cfg.get("attention_bias", False),
         "moecore MoE models have no linear biases"),
        ("quantization_config", cfg.get("quantization_config") is None,
         "quantised weights are not converted; start from the unquantised checkpoint"),
    ]
    refuse_fields(cfg, checks)
    refuse_fractional_theta(rope_theta(cfg))


def args_from_hf_config(cfg: dict) -> argparse.Namespace:
    """Validate ``cfg`` and return the moecore model args (parsed from ``pretrain_gpt.py``
    flags), with the original config kept as ``hf_config`` for the way back."""
    validate_hf_config(cfg)
    warn_unknown_fields(cfg, _KNOWN)
    flags = llama_moe_flags(cfg, num_experts=cfg["num_experts"],
                            moe_ffn_hidden_size=cfg["intermediate_size"],
                            max_positions=4096, norm_eps=1e-5, aux_loss_coeff=0.01)
    flags += ["--qk-layernorm", "--qk-layernorm-hidden-dim"]
    if not cfg.get("norm_topk_prob", False):
        flags += ["--moe-router-pre-softmax"]
    return args_from_hf_flags(flags, cfg)


def _check_representable(ns: argparse.Namespace) -> None:
    freq = ns.moe_layer_freq
    all_moe = freq == 1 or (isinstance(freq, list) and all(x == 1 for x in freq))
    checks = [
        ("--num-experts", ns.num_experts is not None, "a dense model is not an OLMoE"),
        ("--moe-layer-freq", all_moe, "every OLMoE layer is MoE"),
        ("--position-embedding-type", ns.position_embedding_type == "rope", "OLMoE uses RoPE"),
        ("--normalization", ns.normalization == "RMSNorm", "OLMoE uses RMSNorm"),
        ("--qk-layernorm-hidden-dim", ns.qk_layernorm and ns.qk_layernorm_hidden_dim,
         "OLMoE normalises the whole q and k projections"),
        ("--swiglu", ns.swiglu, "OLMoE experts are SwiGLU"),
        ("--disable-bias-linear", not ns.add_bias_linear and not ns.add_qkv_bias,
         "OLMoE has no linear biases"),
        ("--apply-residual-connection-post-layernorm",
         not ns.apply_residual_connection_post_layernorm, "OLMoE is pre-norm"),
        ("--rotary-percent", ns.rotary_percent == 1.0, "OLMoE rotates whole heads"),
        ("--moe-shared-expert-intermediate-size", not ns.moe_shared_expert_intermediate_size,
         "OLMoE has no shared experts"),
        ("--moe-router-score-function", ns.moe_router_score_function == "softmax",
         "OLMoE's router is a softmax"),
        ("--moe-router-topk-scaling-factor", ns.moe_router_topk_scaling_factor in (None, 1.0),
         "OLMoE does not scale the routing weights"),
        ("--moe-router-num-groups", ns.moe_router_num_groups is None,
         "OLMoE has no group-limited routing"),
        ("--moe-router-enable-expert-bias", not ns.moe_router_enable_expert_bias,
         "OLMoE has no expert bias"),
        ("--mtp-num-layers", not ns.mtp_num_layers, "OLMoE has no multi-token prediction"),
    ]
    refuse_flags(ARCHITECTURE, checks)


def hf_config_from_args(ns: argparse.Namespace, vocab_size: int, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``ns``'s model; fields of an original Hugging Face config (token
    ids and the like) are carried over, every field the model depends on is set here."""
    _check_representable(ns)
    cfg = json.loads(ns.hf_config) if getattr(ns, "hf_config", None) else {}
    cfg.update({
        "architectures": [ARCHITECTURE], "model_type": "olmoe", "vocab_size": vocab_size,
        "hidden_size": ns.hidden_size, "intermediate_size": ns.moe_ffn_hidden_size,
        "num_hidden_layers": ns.num_layers, "num_attention_heads": ns.num_attention_heads,
        "num_key_value_heads": ns.num_query_groups, "hidden_act": "silu",
        "max_position_embeddings": ns.max_position_embeddings or ns.seq_length,
        "initializer_range": ns.init_method_std, "rms_norm_eps": ns.norm_epsilon,
        "attention_dropout": ns.attention_dropout, "attention_bias": False, "clip_qkv": None,
        "num_experts_per_tok": ns.moe_router_topk, "num_experts": ns.num_experts,
        "norm_topk_prob": not ns.moe_router_pre_softmax,
        "router_aux_loss_coef": ns.moe_aux_loss_coeff,
        "tie_word_embeddings": not ns.untie_embeddings_and_output_weights,
    })
    cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = (
        str(dtype).replace("torch.", ""))
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_theta": float(ns.rotary_base)}
    else:
        cfg["rope_theta"] = float(ns.rotary_base)
    set_head_dim(cfg, ns)
    cfg.setdefault("use_cache", True)
    return cfg


# ---- per-layer mapping ---------------------------------------------------------------------------
def hf_layer_entries(i: int, ns: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of layer ``i``'s Hugging Face tensors, in the order they are written."""
    h, nh, ng, d, f, e = llama_dims(ns)
    p = f"model.layers.{i}."
    out = llama_attention_entries(p, ns) + [(p + "self_attn.q_norm.weight", (nh * d,)),
                                            (p + "self_attn.k_norm.weight", (ng * d,)),
                                            (p + "post_attention_layernorm.weight", (h,)),
                                            (p + "mlp.gate.weight", (e, h))]
    for x in range(e):
        q = f"{p}mlp.experts.{x}."
        out += [(q + "gate_proj.weight", (f, h)), (q + "up_proj.weight", (f, h)),
                (q + "down_proj.weight", (h, f))]
    return out


_FROM_MIXTRAL = {"block_sparse_moe.gate.": "mlp.gate.", ".block_sparse_moe.experts.":
                 ".mlp.experts.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.",
                 ".w2.": ".down_proj."}


def _olmoe_name(name: str) -> str:
    """Mixtral's name of a tensor (the shared attention and expert mapping) as OLMoE's."""
    for a, b in _FROM_MIXTRAL.items():
        name = name.replace(a, b)
    return name


def global_from_hf_layer(i: int, get, ns: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Layer ``i``'s moecore global tensors (grouped experts) from ``get(hf_name)``."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = hf_mixtral.global_from_hf_layer(i, lambda n: get(_olmoe_name(n)), ns)
    out[g + "self_attention.q_proj_layernorm.weight"] = get(p + "self_attn.q_norm.weight")
    out[g + "self_attention.k_proj_layernorm.weight"] = get(p + "self_attn.k_norm.weight")
    return out


def hf_from_global_layer(i: int, sd: dict[str, torch.Tensor], ns: argparse.Namespace
                         ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`global_from_hf_layer`; ``sd`` holds grouped experts."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {_olmoe_name(n): t for n, t in hf_mixtral.hf_from_global_layer(i, sd, ns).items()}
    out[p + "self_attn.q_norm.weight"] = sd[g + "self_attention.q_proj_layernorm.weight"]
    out[p + "self_attn.k_norm.weight"] = sd[g + "self_attention.k_proj_layernorm.weight"]
    return out


# ---- source and sink ----------------------------------------------------------------------------
class HFSource(HFSourceBase):
    """Reads a Hugging Face OLMoE directory (``config.json`` + safetensors) layer by layer."""

    model_name = "OLMoE"
    family = sys.modules[__name__]  # the hooks call this module's functions


class HFSink(HFSinkBase):
    """Writes an OLMoE's ``config.json`` and safetensors."""

    family = sys.modules[__name__]  # the hooks call this module's functions
