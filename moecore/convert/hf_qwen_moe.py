"""Hugging Face Qwen3-MoE and Qwen2-MoE <-> moecore: the config and the parameter mapping.

=======================================================  =======================================
Hugging Face (``Qwen3MoeForCausalLM``/``Qwen2Moe...``)   moecore global (single-rank) parameter
=======================================================  =======================================
``model.layers.{i}.self_attn.{q,k,v}_proj.weight/bias``  ``...self_attention.linear_qkv.weight/
                                                         bias``: rows per query group ``g``: its
                                                         q heads, k head ``g``, v head ``g``
``...self_attn.o_proj.weight``                           ``...self_attention.linear_proj.weight``
``...self_attn.{q,k}_norm.weight [D]`` (Qwen3)           ``...self_attention.{q,k}_layernorm``
``...mlp.gate.weight [E, H]``                            ``...mlp.router.weight``
``...mlp.experts.{e}.{gate,up}_proj.weight [F, H]``      ``...mlp.experts.weight1[e]
                                                         = [gate; up].T``
``...mlp.experts.{e}.down_proj.weight [H, F]``           ``...mlp.experts.weight2[e] = down.T``
``...mlp.shared_expert.{gate,up,down}_proj`` (Qwen2)     ``...mlp.shared_experts.mlp.linear_fc1
                                                         ([gate; up]) / linear_fc2``
``...mlp.shared_expert_gate.weight [1, H]`` (Qwen2)      ``...mlp.shared_experts.gate_weight``
``...mlp.{gate,up,down}_proj`` (dense layers)            ``...mlp.linear_fc1 / linear_fc2``
=======================================================  =======================================

Embedding, norms and head map as for Mixtral (``hf_mixtral``).

Routing: both take the softmax over all experts and keep the top-k. With ``norm_topk_prob``
the kept weights are renormalised to sum to one, which equals moecore's default softmax over the
top-k logits; without it they are used as they are: ``--moe-router-pre-softmax``. Qwen3's
``q_norm``/``k_norm`` are RMSNorms over each head's ``head_dim`` before RoPE, as moecore's
``--qk-layernorm``. Qwen2's shared expert output is scaled by ``sigmoid(shared_expert_gate(x))``,
as moecore's ``--moe-shared-expert-gate``. Dense layers (``decoder_sparse_step``,
``mlp_only_layers``) become ``--moe-layer-freq``.
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
    llama_moe_flags,
    refuse_fields,
    refuse_flags,
    refuse_fractional_theta,
    rope_theta,
    split_qkv,
    unsupported,
    warn_unknown_fields,
)

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)
# Fields read below, or that describe tokens, caching or the library, not the computation.
_KNOWN = {"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
          "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
          "output_router_logits", "return_dict", "output_hidden_states", "output_attentions",
          "torchscript", "id2label", "label2id", "tokenizer_class", "initializer_range",
          "max_position_embeddings", "attention_dropout", "router_aux_loss_coef",
          "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
          "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
          "decoder_sparse_step", "moe_intermediate_size", "shared_expert_intermediate_size",
          "num_experts_per_tok", "num_experts", "norm_topk_prob", "mlp_only_layers",
          "qkv_bias", "attention_bias", "quantization_config", "num_local_experts"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_experts_per_tok", "moe_intermediate_size")


def num_experts(cfg: dict) -> int | None:
    """The hub's ``num_experts`` (transformers >= 5 writes it as ``num_local_experts``)."""
    return cfg.get("num_experts", cfg.get("num_local_experts"))


def moe_pattern(cfg: dict) -> list[int]:
    """1 for each Hugging Face layer that is sparse (the rule of transformers' decoder layer)."""
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0)
            for i in range(cfg["num_hidden_layers"])]


def _qkv_bias(cfg: dict) -> bool:
    # Qwen2-MoE: biases on q, k, v (``qkv_bias``, always on before transformers 5).
    return cfg["model_type"] == "qwen2_moe" and cfg.get("qkv_bias", True)


def validate_hf_config(cfg: dict) -> None:
    """Raise ``ValueError`` naming the first field moecore cannot represent."""
    if cfg.get("model_type") not in MODEL_TYPES:
        raise unsupported("model_type", cfg.get("model_type"), "this converter reads Qwen-MoE "
                          f"checkpoints (model_type {MODEL_TYPES})")
    for field in _REQUIRED:
        if cfg.get(field) is None:
            raise ValueError(f"config.json lacks the field {field}, which a "
                             f"{ARCHITECTURES[cfg['model_type']]} config has")
    checks = [
        ("hidden_act", cfg.get("hidden_act", "silu") == "silu",
         "moecore's gated MLP is SwiGLU (silu)"),
        ("use_sliding_window", not cfg.get("use_sliding_window", False),
         "sliding-window attention is not converted for Qwen-MoE"),
        ("layer_types", all(t == "full_attention" for t in cfg.get("layer_types") or []),
         "every layer must use full attention"),
        ("rope_scaling", cfg.get("rope_scaling") in (None, {"rope_type": "default"},
                                                     {"type": "default"}),
         "scaled RoPE is not converted for Qwen-MoE"),
        ("attention_bias", not cfg.get("attention_bias", False),
         "Qwen3-MoE's o_proj bias has no moecore counterpart (only q/k/v biases do)"),
        ("quantization_config", cfg.get("quantization_config") is None,
         "quantised weights are not converted; start from the unquantised checkpoint"),
        ("num_experts", (num_experts(cfg) or 0) > 0, "a model without experts is not an MoE"),
        ("shared_expert_intermediate_size", cfg["model_type"] != "qwen2_moe"
         or (cfg.get("shared_expert_intermediate_size") or 0) > 0,
         "moecore's gated shared expert needs a width"),
    ]
    refuse_fields(cfg, checks)
    refuse_fractional_theta(rope_theta(cfg))


def args_from_hf_config(cfg: dict) -> argparse.Namespace:
    """Validate ``cfg`` and return the moecore model args (parsed from ``pretrain_gpt.py``
    flags) of the same model, with the original config kept as ``hf_config`` for the way back."""
    validate_hf_config(cfg)
    warn_unknown_fields(cfg, _KNOWN)
    flags = llama_moe_flags(cfg, num_experts=num_experts(cfg),
                            moe_ffn_hidden_size=cfg["moe_intermediate_size"],
                            max_positions=32768, norm_eps=1e-6, aux_loss_coeff=0.001)
    flags += ["--moe-layer-freq", "[" + ",".join(map(str, moe_pattern(cfg))) + "]"]
    if not cfg.get("norm_topk_prob", False):
        flags += ["--moe-router-pre-softmax"]
    if cfg["model_type"] == "qwen3_moe":
        flags += ["--qk-layernorm"]
    else:
        flags += ["--moe-shared-expert-intermediate-size",
                  cfg["shared_expert_intermediate_size"], "--moe-shared-expert-gate"]
    if _qkv_bias(cfg):
        flags += ["--add-qkv-bias"]
    return args_from_hf_flags(flags, cfg)


# ---- the way out --------------------------------------------------------------------------------
def family_of(ns: argparse.Namespace) -> str:
    """``qwen3_moe`` (QK norm) or ``qwen2_moe`` (gated shared expert) for ``ns``'s model."""
    return "qwen3_moe" if ns.qk_layernorm else "qwen2_moe"


def is_qwen_model(ns: argparse.Namespace) -> bool:
    """Whether ``ns``'s model is written as a Qwen-MoE: converted from one, or carrying a
    feature only these families have here (QK norm on GQA, a gated shared expert)."""
    if getattr(ns, "hf_config", None):
        return json.loads(ns.hf_config).get("model_type") in MODEL_TYPES
    return not ns.multi_latent_attention and (ns.qk_layernorm or ns.moe_shared_expert_gate)


def moe_pattern_of(ns: argparse.Namespace) -> list[int]:
    freq = ns.moe_layer_freq
    if isinstance(freq, list):
        return [int(x) for x in freq]
    return [1 if i % freq == 0 else 0 for i in range(ns.num_layers)]


def _sparse_fields(pattern: list[int]) -> dict:
    """``decoder_sparse_step`` and ``mlp_only_layers`` giving ``pattern`` (a plain step when
    one does, else step 1 with the dense layers listed)."""
    for step in range(1, len(pattern) + 1):
        if pattern == [int((i + 1) % step == 0) for i in range(len(pattern))]:
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, x in enumerate(pattern) if not x]}


def _check_representable(ns: argparse.Namespace, family: str) -> None:
    arch = ARCHITECTURES[family]
    shared = ns.moe_shared_expert_intermediate_size
    checks = [
        ("--num-experts", ns.num_experts is not None, "a dense model is not an MoE"),
        ("--multi-latent-attention", not ns.multi_latent_attention, "Qwen uses GQA"),
        ("--normalization", ns.normalization == "RMSNorm", "Qwen uses RMSNorm"),
        ("--swiglu", ns.swiglu, "Qwen's MLPs are SwiGLU"),
        ("--disable-bias-linear", not ns.add_bias_linear, "Qwen has no MLP or output biases"),
        ("--apply-residual-connection-post-layernorm",
         not ns.apply_residual_connection_post_layernorm, "Qwen is pre-norm"),
        ("--position-embedding-type", ns.position_embedding_type == "rope", "Qwen uses RoPE"),
        ("--rope-type", (ns.rope_type or "rope") == "rope", "only plain RoPE is converted"),
        ("--moe-router-score-function", ns.moe_router_score_function == "softmax",
         "Qwen routes on softmax scores"),
        ("--moe-router-topk-scaling-factor", ns.moe_router_topk_scaling_factor in (None, 1.0),
         "Qwen does not scale the routing weights"),
        ("--moe-router-num-groups", ns.moe_router_num_groups is None,
         "Qwen has no group-limited routing"),
        ("--moe-router-enable-expert-bias", not ns.moe_router_enable_expert_bias,
         "Qwen has no expert bias"),
        ("--mtp-num-layers", not ns.mtp_num_layers, "Qwen has no multi-token prediction"),
    ]
    if family == "qwen3_moe":
        checks += [("--moe-shared-expert-intermediate-size", not shared,
                    "Qwen3-MoE has no shared experts"),
                   ("--add-qkv-bias", not ns.add_qkv_bias, "Qwen3-MoE has no q/k/v biases")]
    else:
        checks += [("--moe-shared-expert-gate", bool(shared) and ns.moe_shared_expert_gate,
                    "Qwen2-MoE has one shared expert with a sigmoid gate")]
    refuse_flags(arch, checks)


def hf_config_from_args(ns: argparse.Namespace, vocab_size: int, dtype: torch.dtype,
                        base: dict | None = None) -> dict:
    """The ``config.json`` of ``ns``'s model over ``base`` (the original config's non-model
    fields, e.g. token ids); every field the model depends on is set here."""
    family = family_of(ns)
    _check_representable(ns, family)
    cfg = dict(base or {})
    d = ns.kv_channels or ns.hidden_size // ns.num_attention_heads
    theta = float(ns.rotary_base)
    cfg.update({
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": vocab_size, "hidden_size": ns.hidden_size,
        "intermediate_size": ns.ffn_hidden_size, "moe_intermediate_size": ns.moe_ffn_hidden_size,
        "num_hidden_layers": ns.num_layers, "num_attention_heads": ns.num_attention_heads,
        "num_key_value_heads": ns.num_query_groups, "head_dim": d, "hidden_act": "silu",
        "max_position_embeddings": ns.max_position_embeddings or ns.seq_length,
        "initializer_range": ns.init_method_std, "rms_norm_eps": ns.norm_epsilon,
        "use_sliding_window": False, "attention_dropout": ns.attention_dropout,
        "num_local_experts" if "num_local_experts" in cfg else "num_experts": ns.num_experts,
        "num_experts_per_tok": ns.moe_router_topk,
        "norm_topk_prob": not ns.moe_router_pre_softmax,
        "router_aux_loss_coef": ns.moe_aux_loss_coeff,
        "tie_word_embeddings": not ns.untie_embeddings_and_output_weights,
        **_sparse_fields(moe_pattern_of(ns)),
    })
    if family == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = ns.moe_shared_expert_intermediate_size
        cfg["qkv_bias"] = bool(ns.add_qkv_bias)
    else:
        cfg["attention_bias"] = False
    # transformers >= 5 keeps the RoPE settings in "rope_parameters"; keep the original's form.
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_theta": theta}
    else:
        cfg["rope_theta"], cfg["rope_scaling"] = theta, None
    if "layer_types" in cfg:  # transformers >= 5 writes it (all full attention here)
        cfg["layer_types"] = ["full_attention"] * ns.num_layers
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.setdefault("use_cache", True)
    return cfg


# ---- per-layer mapping ---------------------------------------------------------------------------
def _attention_pairs(ns: argparse.Namespace) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(hf suffix, moecore suffix, shape)`` of one layer's tensors that map one to one."""
    h, d = ns.hidden_size, ns.kv_channels or ns.hidden_size // ns.num_attention_heads
    a, m = "self_attn.", "self_attention."
    out = [("input_layernorm.weight", "input_layernorm.weight", (h,)),
           (a + "o_proj.weight", m + "linear_proj.weight", (h, ns.num_attention_heads * d)),
           ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", (h,))]
    if ns.qk_layernorm:
        out += [(a + "q_norm.weight", m + "q_layernorm.weight", (d,)),
                (a + "k_norm.weight", m + "k_layernorm.weight", (d,))]
    return out


def _qkv_entries(p: str, ns: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    h, nh, ng = ns.hidden_size, ns.num_attention_heads, ns.num_query_groups
    d = ns.kv_channels or h // nh
    out = []
    for x, n in (("q", nh), ("k", ng), ("v", ng)):
        out.append((f"{p}self_attn.{x}_proj.weight", (n * d, h)))
        if ns.add_qkv_bias:
            out.append((f"{p}self_attn.{x}_proj.bias", (n * d,)))
    return out


def _mlp_entries(prefix: str, f: int, h: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "gate_proj.weight", (f, h)), (prefix + "up_proj.weight", (f, h)),
            (prefix + "down_proj.weight", (h, f))]


def hf_layer_entries(i: int, ns: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of layer ``i``'s Hugging Face tensors, in the order they are written."""
    p, h = f"model.layers.{i}.", ns.hidden_size
    out = _qkv_entries(p, ns) + [(p + n, s) for n, _, s in _attention_pairs(ns)]
    if not moe_pattern_of(ns)[i]:
        return out + _mlp_entries(p + "mlp.", ns.ffn_hidden_size, h)
    out.append((p + "mlp.gate.weight", (ns.num_experts, h)))
    for x in range(ns.num_experts):
        out += _mlp_entries(f"{p}mlp.experts.{x}.", ns.moe_ffn_hidden_size, h)
    if ns.moe_shared_expert_intermediate_size:
        out += _mlp_entries(p + "mlp.shared_expert.", ns.moe_shared_expert_intermediate_size, h)
        out.append((p + "mlp.shared_expert_gate.weight", (1, h)))
    return out


def _gate_up(get, prefix: str) -> torch.Tensor:
    return torch.cat([get(prefix + "gate_proj.weight"), get(prefix + "up_proj.weight")], dim=0)


def global_from_hf_layer(i: int, get, ns: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Layer ``i``'s moecore global tensors (grouped experts) from ``get(hf_name)``."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {g + m: get(p + n) for n, m, _ in _attention_pairs(ns)}
    kinds = ("weight", "bias") if ns.add_qkv_bias else ("weight",)
    for kind in kinds:
        out[f"{g}self_attention.linear_qkv.{kind}"] = interleave_qkv(
            *(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), ns)
    if not moe_pattern_of(ns)[i]:
        out[g + "mlp.linear_fc1.weight"] = _gate_up(get, p + "mlp.")
        out[g + "mlp.linear_fc2.weight"] = get(p + "mlp.down_proj.weight")
        return out
    e = ns.num_experts
    out[g + "mlp.router.weight"] = get(p + "mlp.gate.weight")
    out[g + "mlp.experts.weight1"] = torch.stack(
        [_gate_up(get, f"{p}mlp.experts.{x}.").t() for x in range(e)])
    out[g + "mlp.experts.weight2"] = torch.stack(
        [get(f"{p}mlp.experts.{x}.down_proj.weight").t() for x in range(e)])
    if ns.moe_shared_expert_intermediate_size:
        s = g + "mlp.shared_experts."
        out[s + "mlp.linear_fc1.weight"] = _gate_up(get, p + "mlp.shared_expert.")
        out[s + "mlp.linear_fc2.weight"] = get(p + "mlp.shared_expert.down_proj.weight")
        out[s + "gate_weight"] = get(p + "mlp.shared_expert_gate.weight")
    return out


def _split_gate_up(out: dict, prefix: str, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
    gate, up = fc1.chunk(2, dim=0)
    out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = gate, up
    out[prefix + "down_proj.weight"] = fc2


def hf_from_global_layer(i: int, sd: dict[str, torch.Tensor], ns: argparse.Namespace
                         ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`global_from_hf_layer`; ``sd`` holds grouped experts."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {p + n: sd[g + m] for n, m, _ in _attention_pairs(ns)}
    kinds = ("weight", "bias") if ns.add_qkv_bias else ("weight",)
    for kind in kinds:
        q, k, v = split_qkv(sd[f"{g}self_attention.linear_qkv.{kind}"], ns)
        out.update({f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                    f"{p}self_attn.v_proj.{kind}": v})
    if not moe_pattern_of(ns)[i]:
        _split_gate_up(out, p + "mlp.", sd[g + "mlp.linear_fc1.weight"],
                       sd[g + "mlp.linear_fc2.weight"])
        return out
    out[p + "mlp.gate.weight"] = sd[g + "mlp.router.weight"]
    w1, w2 = sd[g + "mlp.experts.weight1"], sd[g + "mlp.experts.weight2"]
    for x in range(ns.num_experts):
        _split_gate_up(out, f"{p}mlp.experts.{x}.", w1[x].t(), w2[x].t())
    if ns.moe_shared_expert_intermediate_size:
        s = g + "mlp.shared_experts."
        _split_gate_up(out, p + "mlp.shared_expert.", sd[s + "mlp.linear_fc1.weight"],
                       sd[s + "mlp.linear_fc2.weight"])
        out[p + "mlp.shared_expert_gate.weight"] = sd[s + "gate_weight"]
    return out


# ---- source and sink ----------------------------------------------------------------------------
class HFSource(HFSourceBase):
    """Reads a Hugging Face Qwen3-MoE or Qwen2-MoE directory layer by layer."""

    model_name = "Qwen-MoE"
    family = sys.modules[__name__]  # the hooks call this module's functions


class HFSink(HFSinkBase):
    """Writes a Qwen3-MoE or Qwen2-MoE ``config.json`` and safetensors."""

    family = sys.modules[__name__]  # the hooks call this module's functions

    def __init__(self, directory: str, ns, vocab_size: int, dtype: torch.dtype,
                 max_shard_bytes: int, base: dict | None = None):
        self.base = base
        super().__init__(directory, ns, vocab_size, dtype, max_shard_bytes)

    def hf_config_from_args(self, ns, vocab_size: int, dtype: torch.dtype) -> dict:
        return hf_config_from_args(ns, vocab_size, dtype, self.base)
