"""Hugging Face Mixtral <-> moecore: the config and the parameter mapping.

=====================================================  =========================================
Hugging Face (``MixtralForCausalLM``)                  moecore global (single-rank) parameter
=====================================================  =========================================
``model.embed_tokens.weight [V, H]``                   ``embedding.word_embeddings.weight``
                                                       (rows padded with zeros to the padded
                                                       vocabulary; stripped on the way out)
``model.layers.{i}.input_layernorm.weight``            ``decoder.layers.{i}.input_layernorm.weight``
``model.layers.{i}.self_attn.{q,k,v}_proj.weight``     ``...self_attention.linear_qkv.weight``:
                                                       rows per query group ``g``: its q heads,
                                                       k head ``g``, v head ``g``
``model.layers.{i}.self_attn.o_proj.weight``           ``...self_attention.linear_proj.weight``
``model.layers.{i}.post_attention_layernorm.weight``   ``...pre_mlp_layernorm.weight``
``model.layers.{i}.block_sparse_moe.gate.weight``      ``...mlp.router.weight [E, H]``
``...block_sparse_moe.experts.{e}.w1/w3 [F, H]``       ``...mlp.experts.weight1[e] = [w1; w3].T``
``...block_sparse_moe.experts.{e}.w2 [H, F]``          ``...mlp.experts.weight2[e] = w2.T``
``model.norm.weight``                                  ``decoder.final_layernorm.weight``
``lm_head.weight [V, H]`` (absent when tied)           ``output_layer.weight`` (padded as above)
=====================================================  =========================================

Routing: Mixtral takes the softmax over all experts, keeps the top-k and renormalises them to sum
to one. That equals a softmax over the top-k logits, which is moecore's default softmax router
(``moe_router_pre_softmax=False``, no ``moe_router_topk_scaling_factor``). RoPE: both use the
non-interleaved ``rotate_half`` pairing, so q/k rows need no permutation.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moecore.convert.hf_base import (
    HFSinkBase,
    HFSourceBase,
    args_from_hf_flags,
    interleave_qkv,
    llama_attention_entries,
    llama_dims,
    llama_moe_flags,
    refuse_fields,
    refuse_flags,
    refuse_fractional_theta,
    rope_theta,
    set_head_dim,
    split_qkv,
    unsupported,
    warn_unknown_fields,
)

ARCHITECTURE = "MixtralForCausalLM"
# Fields read below, or that describe tokens, caching or the library, not the computation.
_KNOWN = {"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
          "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
          "output_router_logits", "return_dict", "output_hidden_states", "output_attentions",
          "torchscript", "id2label", "label2id", "tokenizer_class", "initializer_range",
          "max_position_embeddings", "attention_dropout", "router_aux_loss_coef",
          "router_jitter_noise", "tie_word_embeddings", "vocab_size", "hidden_size",
          "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
          "rope_scaling", "rope_parameters", "sliding_window", "num_experts_per_tok",
          "num_local_experts", "attention_bias", "mlp_bias", "quantization_config",
          "partial_rotary_factor", "layer_types"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_local_experts", "num_experts_per_tok")


def validate_hf_config(cfg: dict) -> None:
    """Raise ``ValueError`` naming the first field moecore cannot represent."""
    if cfg.get("model_type") != "mixtral":
        raise unsupported("model_type", cfg.get("model_type"), "this converter reads Mixtral "
                          f"checkpoints ({ARCHITECTURE}, model_type 'mixtral')")
    for field in _REQUIRED:
        if cfg.get(field) is None:
            raise ValueError(f"config.json lacks the field {field}, which a Mixtral config has")
    checks = [
        ("hidden_act", cfg.get("hidden_act", "silu") == "silu",
         "moecore's gated MLP is SwiGLU (silu); other activations are not mapped"),
        ("sliding_window", cfg.get("sliding_window") is None,
         "sliding-window attention is not implemented (set it to null only if your sequence "
         "length never exceeds the window)"),
        ("rope_scaling", cfg.get("rope_scaling") in (None, {"rope_type": "default"},
                                                     {"type": "default"}),
         "scaled RoPE is not implemented"),
        ("attention_bias", not cfg.get("attention_bias", False),
         "moecore MoE models have no linear biases (experts have none)"),
        ("mlp_bias", not cfg.get("mlp_bias", False), "experts have no biases"),
        ("quantization_config", cfg.get("quantization_config") is None,
         "quantised weights are not converted; start from the unquantised checkpoint"),
        ("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0) == 1.0,
         "Mixtral rotates whole heads"),
        ("layer_types", all(t == "full_attention" for t in cfg.get("layer_types") or []),
         "every layer must use full attention (sliding-window attention is not implemented)"),
    ]
    refuse_fields(cfg, checks)
    refuse_fractional_theta(rope_theta(cfg))


def args_from_hf_config(cfg: dict) -> argparse.Namespace:
    """Validate ``cfg`` and return the moecore model args (parsed from ``pretrain_gpt.py``
    flags) of the same model, with the original config kept as ``hf_config`` for the way back."""
    validate_hf_config(cfg)
    warn_unknown_fields(cfg, _KNOWN)
    flags = llama_moe_flags(cfg, num_experts=cfg["num_local_experts"],
                            moe_ffn_hidden_size=cfg["intermediate_size"],
                            max_positions=4096 * 32, norm_eps=1e-5, aux_loss_coeff=0.001)
    if cfg.get("router_jitter_noise"):
        flags += ["--moe-input-jitter-eps", cfg["router_jitter_noise"]]
    return args_from_hf_flags(flags, cfg)


def _check_representable(ns: argparse.Namespace) -> None:
    freq = ns.moe_layer_freq
    all_moe = freq == 1 or (isinstance(freq, list) and all(x == 1 for x in freq))
    checks = [
        ("--num-experts", ns.num_experts is not None, "a dense model is not a Mixtral"),
        ("--moe-layer-freq", all_moe, "every Mixtral layer is MoE"),
        ("--position-embedding-type", ns.position_embedding_type == "rope", "Mixtral uses RoPE"),
        ("--normalization", ns.normalization == "RMSNorm", "Mixtral uses RMSNorm"),
        ("--swiglu", ns.swiglu, "Mixtral experts are SwiGLU"),
        ("--disable-bias-linear", not ns.add_bias_linear and not ns.add_qkv_bias,
         "Mixtral has no linear biases"),
        ("--qk-layernorm", not ns.qk_layernorm, "Mixtral has no QK norm"),
        ("--apply-residual-connection-post-layernorm",
         not ns.apply_residual_connection_post_layernorm, "Mixtral is pre-norm"),
        ("--rotary-percent", ns.rotary_percent == 1.0, "Mixtral rotates whole heads"),
        ("--moe-shared-expert-intermediate-size", not ns.moe_shared_expert_intermediate_size,
         "Mixtral has no shared experts"),
        ("--moe-router-score-function", ns.moe_router_score_function == "softmax",
         "Mixtral's router is a softmax"),
        ("--moe-router-pre-softmax", not ns.moe_router_pre_softmax,
         "Mixtral renormalises the top-k weights (moecore's post-softmax router)"),
        ("--moe-router-topk-scaling-factor", ns.moe_router_topk_scaling_factor in (None, 1.0),
         "Mixtral does not scale the routing weights"),
        ("--moe-router-num-groups", ns.moe_router_num_groups is None,
         "Mixtral has no group-limited routing"),
        ("--moe-router-enable-expert-bias", not ns.moe_router_enable_expert_bias,
         "Mixtral has no expert bias"),
        ("--multi-latent-attention", not ns.multi_latent_attention,
         "Mixtral uses grouped-query attention"),
        ("--mtp-num-layers", not ns.mtp_num_layers, "Mixtral has no multi-token prediction"),
    ]
    refuse_flags(ARCHITECTURE, checks)


def hf_config_from_args(ns: argparse.Namespace, vocab_size: int, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``ns``'s model. Fields kept from an original Hugging Face config
    (token ids and the like) are carried over; every field the model depends on is set here."""
    _check_representable(ns)
    cfg = json.loads(ns.hf_config) if getattr(ns, "hf_config", None) else {}
    cfg.update({
        "architectures": [ARCHITECTURE], "model_type": "mixtral", "vocab_size": vocab_size,
        "hidden_size": ns.hidden_size, "intermediate_size": ns.moe_ffn_hidden_size,
        "num_hidden_layers": ns.num_layers, "num_attention_heads": ns.num_attention_heads,
        "num_key_value_heads": ns.num_query_groups, "hidden_act": "silu",
        "max_position_embeddings": ns.max_position_embeddings or ns.seq_length,
        "initializer_range": ns.init_method_std, "rms_norm_eps": ns.norm_epsilon,
        "rope_theta": float(ns.rotary_base), "sliding_window": None,
        "attention_dropout": ns.attention_dropout,
        "num_experts_per_tok": ns.moe_router_topk, "num_local_experts": ns.num_experts,
        "router_aux_loss_coef": ns.moe_aux_loss_coeff,
        "router_jitter_noise": ns.moe_input_jitter_eps or 0.0,
        "tie_word_embeddings": not ns.untie_embeddings_and_output_weights,
    })
    # transformers >= 4.56 writes "dtype" (and RoPE settings in "rope_parameters"); keep the
    # original's spelling so that the round trip gives the same config.
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dtype).replace("torch.", "")
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_theta": float(ns.rotary_base)}
    set_head_dim(cfg, ns)
    cfg.setdefault("use_cache", True)
    return cfg


# ---- per-layer mapping ---------------------------------------------------------------------------
def hf_layer_entries(i: int, ns: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of layer ``i``'s Hugging Face tensors, in the order they are written."""
    h, _, _, _, f, e = llama_dims(ns)
    p = f"model.layers.{i}."
    out = llama_attention_entries(p, ns) + [(p + "post_attention_layernorm.weight", (h,)),
                                            (p + "block_sparse_moe.gate.weight", (e, h))]
    for x in range(e):
        q = f"{p}block_sparse_moe.experts.{x}."
        out += [(q + "w1.weight", (f, h)), (q + "w2.weight", (h, f)), (q + "w3.weight", (f, h))]
    return out


def global_from_hf_layer(i: int, get, ns: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Layer ``i``'s moecore global tensors (grouped experts) from ``get(hf_name)``."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    qkv = interleave_qkv(*(get(f"{p}self_attn.{x}_proj.weight") for x in "qkv"), ns)
    w1, w2 = [], []
    for x in range(ns.num_experts):
        q_ = f"{p}block_sparse_moe.experts.{x}."
        w1.append(torch.cat([get(q_ + "w1.weight"), get(q_ + "w3.weight")], dim=0).t())
        w2.append(get(q_ + "w2.weight").t())
    return {g + "input_layernorm.weight": get(p + "input_layernorm.weight"),
            g + "self_attention.linear_qkv.weight": qkv,
            g + "self_attention.linear_proj.weight": get(p + "self_attn.o_proj.weight"),
            g + "pre_mlp_layernorm.weight": get(p + "post_attention_layernorm.weight"),
            g + "mlp.router.weight": get(p + "block_sparse_moe.gate.weight"),
            g + "mlp.experts.weight1": torch.stack(w1), g + "mlp.experts.weight2": torch.stack(w2)}


def hf_from_global_layer(i: int, sd: dict[str, torch.Tensor], ns: argparse.Namespace
                         ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`global_from_hf_layer`; ``sd`` holds grouped experts."""
    f, e = ns.moe_ffn_hidden_size, ns.num_experts
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    q, k, v = split_qkv(sd[g + "self_attention.linear_qkv.weight"], ns)
    out = {p + "input_layernorm.weight": sd[g + "input_layernorm.weight"],
           p + "self_attn.q_proj.weight": q,
           p + "self_attn.k_proj.weight": k,
           p + "self_attn.v_proj.weight": v,
           p + "self_attn.o_proj.weight": sd[g + "self_attention.linear_proj.weight"],
           p + "post_attention_layernorm.weight": sd[g + "pre_mlp_layernorm.weight"],
           p + "block_sparse_moe.gate.weight": sd[g + "mlp.router.weight"]}
    w1, w2 = sd[g + "mlp.experts.weight1"], sd[g + "mlp.experts.weight2"]
    for x in range(e):
        q_ = f"{p}block_sparse_moe.experts.{x}."
        out[q_ + "w1.weight"] = w1[x, :, :f].t()
        out[q_ + "w2.weight"] = w2[x].t()
        out[q_ + "w3.weight"] = w1[x, :, f:].t()
    return out


# ---- source and sink ----------------------------------------------------------------------------
class HFSource(HFSourceBase):
    """Reads a Hugging Face Mixtral directory (``config.json`` + safetensors) layer by layer."""

    model_name = "Mixtral"
    family = sys.modules[__name__]  # the hooks call this module's functions


class HFSink(HFSinkBase):
    """Writes a Mixtral's ``config.json`` and safetensors."""

    family = sys.modules[__name__]  # the hooks call this module's functions
