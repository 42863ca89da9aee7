"""Hugging Face DeepSeek-V3 (``DeepseekV3ForCausalLM``: V3, R1, Kimi-K2, Moonlight) <-> moecore.

=====================================================  =========================================
Hugging Face, layer ``i`` (``model.layers.{i}.``)      moecore global (``decoder.layers.{i}.``)
=====================================================  =========================================
``self_attn.q_proj`` (no q LoRA)                       ``self_attention.linear_q_proj``
``self_attn.q_a_proj / q_a_layernorm / q_b_proj``      ``...linear_q_down_proj / q_layernorm /
                                                       linear_q_up_proj``
``self_attn.kv_a_proj_with_mqa / kv_a_layernorm``      ``...linear_kv_down_proj / kv_layernorm``
``self_attn.kv_b_proj / o_proj``                       ``...linear_kv_up_proj / linear_proj``
``input_layernorm / post_attention_layernorm``         ``input_layernorm / pre_mlp_layernorm``
``mlp.{gate,up}_proj [F, H], down_proj`` (dense,       ``mlp.linear_fc1 = [gate; up]``,
i < first_k_dense_replace)                             ``mlp.linear_fc2``
``mlp.gate.weight [E, H]``                             ``mlp.router.weight``
``mlp.gate.e_score_correction_bias [E]``               ``mlp.router.expert_bias``
``mlp.experts.{e}.{gate,up,down}_proj``                ``mlp.experts.weight1[e] = [gate; up].T``,
                                                       ``weight2[e] = down.T``
``mlp.shared_experts.{gate,up,down}_proj``             ``mlp.shared_experts.mlp.linear_fc1/2``
MTP depth ``k``: ``model.layers.{L+k}.`` +             ``mtp.layers.{k}.`` + ``enorm``, ``hnorm``,
``enorm``, ``hnorm``, ``eh_proj``,                     ``eh_proj``, ``final_layernorm``;
``shared_head.norm``; the layer's tensors as above     ``transformer_layer.`` + the layer's
``embed_tokens``, ``shared_head.head``                 (copies of the model's embedding / head)
=====================================================  =========================================

The attention tensors are Megatron's MLA parameters unchanged (moecore rotates DeepSeek's
interleaved RoPE pairs itself). Config: ``first_k_dense_replace`` -> ``--moe-layer-freq``
(dense first), ``n_shared_experts * moe_intermediate_size`` ->
``--moe-shared-expert-intermediate-size``, ``routed_scaling_factor`` ->
``--moe-router-topk-scaling-factor``, ``n_group``/``topk_group`` -> group-limited routing,
``e_score_correction_bias`` -> ``--moe-router-enable-expert-bias``, YaRN ``rope_scaling`` ->
``--rope-type yarn`` and its flags, ``num_nextn_predict_layers`` -> ``--mtp-num-layers`` (when
the files hold the MTP tensors: ``transformers`` drops them on save).

Routing: sigmoid scores, the bias added for the choice only, the weights (unbiased scores at the
chosen experts) normalised to sum 1 and scaled. Group-limited routing scores a group by the sum
of its best two experts in DeepSeek/``transformers``, by its best ``topk // topk_group`` in
Megatron-Core (and moecore): they agree when ``topk == 2 * topk_group`` (V3, R1), or when every
group is kept (``topk_group == n_group``: Kimi-K2, Moonlight); other configs are refused.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moecore.convert.hf_base import (
    EMBED,
    HEAD,
    HFSinkBase,
    HFSourceBase,
    args_from_hf_flags,
    refuse_fields,
    refuse_flags,
    refuse_fractional_theta,
    unsupported,
    warn_unknown_fields,
)

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPES = ("deepseek_v3", "kimi_k2")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_hidden_layers", "num_attention_heads", "n_routed_experts",
             "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
             "v_head_dim")
# Read below, or about tokens, caching or the library rather than the computation.
_KNOWN = set(_REQUIRED) | {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "return_dict",
    "output_router_logits", "output_hidden_states", "output_attentions", "torchscript",
    "id2label", "label2id", "tokenizer_class", "auto_map", "initializer_range",
    "max_position_embeddings", "attention_dropout", "attention_bias", "tie_word_embeddings",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "rope_interleave", "q_lora_rank", "qk_head_dim", "head_dim",
    "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "topk_method",
    "scoring_func", "norm_topk_prob", "first_k_dense_replace", "moe_layer_freq",
    "num_nextn_predict_layers", "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp",
    "quantization_config"}


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """``(rope_theta, yarn settings or None)`` from ``rope_scaling`` (hub configs) or
    ``rope_parameters`` (transformers >= 5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    field = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    if kind != "yarn":
        raise unsupported(field, scaling, "only plain RoPE and YaRN are implemented")
    if scaling.get("attention_factor") is not None:
        raise unsupported(field, scaling, "YaRN's attention_factor is not a moecore flag; "
                          "give mscale and mscale_all_dim instead")
    if (scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)) != (32, 1):
        raise unsupported(field, scaling, "YaRN's beta_fast/beta_slow are fixed at 32/1 "
                          "(Megatron has no flag for them either)")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale not in (None, 1, 1.0) and not mscale_all:
        raise unsupported(field, scaling, "transformers ignores mscale without "
                          "mscale_all_dim, moecore does not; set mscale_all_dim")
    return theta, {"factor": float(scaling["factor"]), "mscale": float(mscale or 1.0),
                   "mscale_all_dim": float(mscale_all or 0.0),
                   "original_max_position_embeddings": int(
                       scaling.get("original_max_position_embeddings")
                       or cfg.get("max_position_embeddings", 4096))}


def validate_hf_config(cfg: dict) -> None:
    """Raise ``ValueError`` naming the first field moecore cannot represent."""
    if cfg.get("model_type") not in MODEL_TYPES:
        raise unsupported("model_type", cfg.get("model_type"), f"this converter reads "
                          f"{ARCHITECTURE} checkpoints (model_type {MODEL_TYPES})")
    for field in _REQUIRED:
        if cfg.get(field) is None:
            raise ValueError(f"config.json lacks the field {field}, which a DeepSeek-V3 config "
                             "has")
    nh, k = cfg["num_attention_heads"], cfg["num_experts_per_tok"]
    groups, top_groups = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    checks = [
        ("hidden_act", cfg.get("hidden_act", "silu") == "silu", "moecore's MLPs are SwiGLU"),
        ("attention_bias", not cfg.get("attention_bias", False), "MLA has no biases here"),
        ("quantization_config", cfg.get("quantization_config") is None,
         "quantised (fp8) weights are not converted; dequantise to bf16 first"),
        ("num_key_value_heads", cfg.get("num_key_value_heads") in (None, nh),
         "MLA has one key/value head per query head"),
        ("rope_interleave", cfg.get("rope_interleave", True), "moecore's MLA rotates "
         "DeepSeek's interleaved pairs"),
        ("scoring_func", cfg.get("scoring_func", "sigmoid") == "sigmoid",
         "DeepSeek-V3 routes on sigmoid scores"),
        ("topk_method", cfg.get("topk_method", "noaux_tc") == "noaux_tc",
         "transformers' DeepseekV3 routes as noaux_tc (bias for the choice only)"),
        ("norm_topk_prob", cfg.get("norm_topk_prob", True) or k == 1,
         "moecore (as Megatron-Core) always normalises top-k sigmoid weights to sum 1"),
        ("moe_layer_freq", cfg.get("moe_layer_freq", 1) == 1,
         "only first_k_dense_replace decides which layers are dense"),
        ("topk_group", top_groups == groups or k == 2 * top_groups,
         "a group's score is the sum of its best 2 experts in DeepSeek, of its best "
         "topk // topk_group in Megatron-Core/moecore: they agree only at topk = 2 * topk_group "
         "(or when all groups are kept)"),
        ("n_group", cfg["n_routed_experts"] % groups == 0, "n_group must divide the experts"),
        ("first_k_dense_replace", cfg.get("first_k_dense_replace", 0)
         <= cfg["num_hidden_layers"], "more dense layers than layers"),
    ]
    refuse_fields(cfg, checks)
    refuse_fractional_theta(rope_settings(cfg)[0])


def args_from_hf_config(cfg: dict, mtp_layers: int = 0) -> argparse.Namespace:
    """Validate ``cfg`` and return the moecore model args (``pretrain_gpt.py`` flags) of the
    same model with ``mtp_layers`` MTP depths; the original config is kept as ``hf_config``."""
    validate_hf_config(cfg)
    warn_unknown_fields(cfg, _KNOWN)
    layers, dense = cfg["num_hidden_layers"], cfg.get("first_k_dense_replace", 0)
    f_moe, shared = cfg["moe_intermediate_size"], cfg.get("n_shared_experts") or 0
    theta, yarn = rope_settings(cfg)
    flags = [
        "--num-layers", layers, "--hidden-size", cfg["hidden_size"],
        "--ffn-hidden-size", cfg["intermediate_size"],
        "--num-attention-heads", cfg["num_attention_heads"],
        "--max-position-embeddings", cfg.get("max_position_embeddings", 4096),
        "--position-embedding-type", "rope", "--rotary-base", int(theta),
        "--multi-latent-attention", "--kv-lora-rank", cfg["kv_lora_rank"],
        "--qk-head-dim", cfg["qk_nope_head_dim"], "--qk-pos-emb-head-dim",
        cfg["qk_rope_head_dim"], "--v-head-dim", cfg["v_head_dim"], "--qk-layernorm",
        "--normalization", "RMSNorm", "--norm-epsilon", cfg.get("rms_norm_eps", 1e-6),
        "--swiglu", "--disable-bias-linear",
        "--init-method-std", cfg.get("initializer_range", 0.02),
        "--attention-dropout", cfg.get("attention_dropout", 0.0), "--hidden-dropout", 0.0,
        "--num-experts", cfg["n_routed_experts"], "--moe-ffn-hidden-size", f_moe,
        "--moe-router-topk", cfg["num_experts_per_tok"],
        "--moe-layer-freq", "[" + ",".join(["0"] * dense + ["1"] * (layers - dense)) + "]",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-topk-scaling-factor", cfg.get("routed_scaling_factor", 1.0),
        "--moe-router-load-balancing-type",
        "seq_aux_loss" if cfg.get("seq_aux", True) else "aux_loss",
        "--moe-aux-loss-coeff", cfg.get("aux_loss_alpha", 1e-4), "--moe-grouped-gemm",
    ]
    if cfg.get("q_lora_rank") is not None:
        flags += ["--q-lora-rank", cfg["q_lora_rank"]]
    if yarn is None:
        flags += ["--rope-type", "rope"]
    else:
        flags += ["--rope-type", "yarn", "--rotary-scaling-factor", yarn["factor"],
                  "--mscale", yarn["mscale"], "--mscale-all-dim", yarn["mscale_all_dim"],
                  "--original-max-position-embeddings",
                  yarn["original_max_position_embeddings"]]
    if shared:
        flags += ["--moe-shared-expert-intermediate-size", shared * f_moe]
    groups, top_groups = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if top_groups < groups:
        flags += ["--moe-router-num-groups", groups, "--moe-router-group-topk", top_groups]
    if not cfg.get("tie_word_embeddings", False):
        flags += ["--untie-embeddings-and-output-weights"]
    if mtp_layers:
        flags += ["--mtp-num-layers", mtp_layers]
    return args_from_hf_flags(flags, cfg)


def _moe_pattern(ns: argparse.Namespace) -> list[int]:
    freq = ns.moe_layer_freq
    if isinstance(freq, list):
        return [int(x) for x in freq]
    return [1 if i % freq == 0 else 0 for i in range(ns.num_layers)]


def first_k_dense(ns: argparse.Namespace) -> int:
    """DeepSeek's ``first_k_dense_replace`` of ``ns``'s ``--moe-layer-freq`` (refused unless the
    dense layers come first)."""
    pattern = _moe_pattern(ns)
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * k + [1] * (len(pattern) - k):
        raise ValueError(f"the moecore model cannot be written as {ARCHITECTURE}: "
                         f"--moe-layer-freq {ns.moe_layer_freq} (DeepSeek's dense layers come "
                         "first, then only MoE layers)")
    return k


def _check_representable(ns: argparse.Namespace) -> None:
    shared = ns.moe_shared_expert_intermediate_size or 0
    checks = [
        ("--multi-latent-attention", ns.multi_latent_attention, "DeepSeek-V3 uses MLA"),
        ("--num-experts", ns.num_experts is not None, "a dense model is not a DeepSeek-V3"),
        ("--qk-layernorm", ns.qk_layernorm, "DeepSeek-V3 has the latent norms"),
        ("--normalization", ns.normalization == "RMSNorm", "DeepSeek-V3 uses RMSNorm"),
        ("--swiglu", ns.swiglu, "DeepSeek-V3's MLPs are SwiGLU"),
        ("--disable-bias-linear", not ns.add_bias_linear and not ns.add_qkv_bias,
         "DeepSeek-V3 has no linear biases"),
        ("--apply-residual-connection-post-layernorm",
         not ns.apply_residual_connection_post_layernorm, "DeepSeek-V3 is pre-norm"),
        ("--moe-router-score-function", ns.moe_router_score_function == "sigmoid",
         "DeepSeek-V3 routes on sigmoid scores"),
        ("--moe-router-enable-expert-bias", ns.moe_router_enable_expert_bias,
         "DeepSeek-V3 has e_score_correction_bias"),
        ("--moe-shared-expert-gate", not ns.moe_shared_expert_gate,
         "DeepSeek-V3's shared experts are ungated"),
        ("--moe-shared-expert-intermediate-size", shared % ns.moe_ffn_hidden_size == 0,
         "it must be n_shared_experts * --moe-ffn-hidden-size"),
        ("--moe-router-group-topk", not ns.moe_router_num_groups
         or ns.moe_router_topk == 2 * ns.moe_router_group_topk,
         "DeepSeek scores a group by its best 2 experts: topk must be 2 * group topk"),
    ]
    refuse_flags(ARCHITECTURE, checks)
    first_k_dense(ns)


def _rope_config(ns: argparse.Namespace, transformers5: bool) -> dict:
    theta = float(ns.rotary_base)
    if (ns.rope_type or "yarn") == "rope":
        return ({"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
                if transformers5 else {"rope_scaling": None, "rope_theta": theta})
    yarn = {"type": "yarn", "factor": ns.rotary_scaling_factor, "mscale": ns.mscale,
            "mscale_all_dim": ns.mscale_all_dim, "beta_fast": 32, "beta_slow": 1,
            "original_max_position_embeddings": ns.original_max_position_embeddings or 4096}
    if transformers5:
        return {"rope_parameters": {**yarn, "rope_type": "yarn", "rope_theta": theta}}
    return {"rope_scaling": yarn, "rope_theta": theta}


def hf_config_from_args(ns: argparse.Namespace, vocab_size: int, dtype: torch.dtype,
                        base: dict | None = None) -> dict:
    """The ``config.json`` of ``ns``'s model over ``base`` (the original config's fields, e.g.
    token ids, kept); every field the model depends on is set here."""
    _check_representable(ns)
    cfg = dict(base or {})
    transformers5 = "rope_parameters" in cfg
    cfg.pop("rope_scaling" if transformers5 else "rope_parameters", None)
    f_moe = ns.moe_ffn_hidden_size
    cfg.update({
        "architectures": [ARCHITECTURE],
        "model_type": cfg.get("model_type") if cfg.get("model_type") in MODEL_TYPES
        else "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": ns.hidden_size,
        "intermediate_size": ns.ffn_hidden_size, "moe_intermediate_size": f_moe,
        "num_hidden_layers": ns.num_layers, "num_attention_heads": ns.num_attention_heads,
        "num_key_value_heads": ns.num_attention_heads, "hidden_act": "silu",
        "q_lora_rank": ns.q_lora_rank, "kv_lora_rank": ns.kv_lora_rank,
        "qk_nope_head_dim": ns.qk_head_dim, "qk_rope_head_dim": ns.qk_pos_emb_head_dim,
        "v_head_dim": ns.v_head_dim, "rope_interleave": True,
        "n_routed_experts": ns.num_experts, "num_experts_per_tok": ns.moe_router_topk,
        "n_shared_experts": (ns.moe_shared_expert_intermediate_size or 0) // f_moe,
        "routed_scaling_factor": ns.moe_router_topk_scaling_factor or 1.0,
        "n_group": ns.moe_router_num_groups or 1, "topk_group": ns.moe_router_group_topk or 1,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": first_k_dense(ns),
        "num_nextn_predict_layers": ns.mtp_num_layers or 0,
        "max_position_embeddings": ns.max_position_embeddings or ns.seq_length,
        "initializer_range": ns.init_method_std, "rms_norm_eps": ns.norm_epsilon,
        "attention_bias": False, "attention_dropout": ns.attention_dropout,
        "tie_word_embeddings": not ns.untie_embeddings_and_output_weights,
        **_rope_config(ns, transformers5),
    })
    if "qk_head_dim" in cfg:  # transformers >= 5 writes the derived sizes too
        cfg["qk_head_dim"] = ns.qk_head_dim + ns.qk_pos_emb_head_dim
        cfg["head_dim"] = ns.qk_pos_emb_head_dim
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.setdefault("use_cache", True)
    return cfg


# ---- per-layer mapping ---------------------------------------------------------------------------
def _attention_pairs(ns: argparse.Namespace) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(hf suffix, moecore suffix, shape)`` of one layer's attention and norms."""
    h, nh = ns.hidden_size, ns.num_attention_heads
    dn, dr, dv, rkv = ns.qk_head_dim, ns.qk_pos_emb_head_dim, ns.v_head_dim, ns.kv_lora_rank
    a, m = "self_attn.", "self_attention."
    out = [("input_layernorm.weight", "input_layernorm.weight", (h,))]
    if ns.q_lora_rank is None:
        out.append((a + "q_proj.weight", m + "linear_q_proj.weight", (nh * (dn + dr), h)))
    else:
        rq = ns.q_lora_rank
        out += [(a + "q_a_proj.weight", m + "linear_q_down_proj.weight", (rq, h)),
                (a + "q_a_layernorm.weight", m + "q_layernorm.weight", (rq,)),
                (a + "q_b_proj.weight", m + "linear_q_up_proj.weight", (nh * (dn + dr), rq))]
    return out + [
        (a + "kv_a_proj_with_mqa.weight", m + "linear_kv_down_proj.weight", (rkv + dr, h)),
        (a + "kv_a_layernorm.weight", m + "kv_layernorm.weight", (rkv,)),
        (a + "kv_b_proj.weight", m + "linear_kv_up_proj.weight", (nh * (dn + dv), rkv)),
        (a + "o_proj.weight", m + "linear_proj.weight", (h, nh * dv)),
        ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", (h,))]


def _mlp_entries(prefix: str, f: int, h: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "gate_proj.weight", (f, h)), (prefix + "up_proj.weight", (f, h)),
            (prefix + "down_proj.weight", (h, f))]


def _is_moe(i: int, ns: argparse.Namespace) -> bool:
    """Layer ``i`` is MoE; an MTP layer (``i >= num_layers``) is of the last layer's kind."""
    return bool(_moe_pattern(ns)[min(i, ns.num_layers - 1)])


def hf_layer_entries(i: int, ns: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of Hugging Face layer ``i``'s tensors (``i >= num_layers``: the
    transformer layer of MTP depth ``i - num_layers``), in the order they are written."""
    p, h = f"model.layers.{i}.", ns.hidden_size
    out = [(p + n, s) for n, _, s in _attention_pairs(ns)]
    if not _is_moe(i, ns):
        return out + _mlp_entries(p + "mlp.", ns.ffn_hidden_size, h)
    e, f = ns.num_experts, ns.moe_ffn_hidden_size
    out += [(p + "mlp.gate.weight", (e, h)), (p + "mlp.gate.e_score_correction_bias", (e,))]
    for x in range(e):
        out += _mlp_entries(f"{p}mlp.experts.{x}.", f, h)
    if ns.moe_shared_expert_intermediate_size:
        out += _mlp_entries(p + "mlp.shared_experts.", ns.moe_shared_expert_intermediate_size, h)
    return out


def _gate_up(get, prefix: str) -> torch.Tensor:
    return torch.cat([get(prefix + "gate_proj.weight"), get(prefix + "up_proj.weight")], dim=0)


def global_from_hf_layer(i: int, get, ns: argparse.Namespace, g: str | None = None
                         ) -> dict[str, torch.Tensor]:
    """Layer ``i``'s moecore global tensors (grouped experts, under prefix ``g``; default
    ``decoder.layers.{i}.``) from ``get(hf_name)``."""
    p, g = f"model.layers.{i}.", g or f"decoder.layers.{i}."
    out = {g + m: get(p + n) for n, m, _ in _attention_pairs(ns)}
    if not _is_moe(i, ns):
        out[g + "mlp.linear_fc1.weight"] = _gate_up(get, p + "mlp.")
        out[g + "mlp.linear_fc2.weight"] = get(p + "mlp.down_proj.weight")
        return out
    w1 = [_gate_up(get, f"{p}mlp.experts.{x}.").t() for x in range(ns.num_experts)]
    w2 = [get(f"{p}mlp.experts.{x}.down_proj.weight").t() for x in range(ns.num_experts)]
    bias = get(p + "mlp.gate.e_score_correction_bias")
    out.update({g + "mlp.router.weight": get(p + "mlp.gate.weight"),
                g + "mlp.router.expert_bias": bias,
                g + "mlp.router.local_tokens_per_expert": torch.zeros_like(bias),
                g + "mlp.experts.weight1": torch.stack(w1),
                g + "mlp.experts.weight2": torch.stack(w2)})
    if ns.moe_shared_expert_intermediate_size:
        s = g + "mlp.shared_experts.mlp."
        out[s + "linear_fc1.weight"] = _gate_up(get, p + "mlp.shared_experts.")
        out[s + "linear_fc2.weight"] = get(p + "mlp.shared_experts.down_proj.weight")
    return out


def _split_gate_up(out: dict, prefix: str, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
    gate, up = fc1.chunk(2, dim=0)
    out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = gate, up
    out[prefix + "down_proj.weight"] = fc2


def hf_from_global_layer(i: int, sd: dict[str, torch.Tensor], ns: argparse.Namespace,
                         g: str | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`global_from_hf_layer`; ``sd`` holds grouped experts."""
    p, g = f"model.layers.{i}.", g or f"decoder.layers.{i}."
    out = {p + n: sd[g + m] for n, m, _ in _attention_pairs(ns)}
    if not _is_moe(i, ns):
        _split_gate_up(out, p + "mlp.", sd[g + "mlp.linear_fc1.weight"],
                       sd[g + "mlp.linear_fc2.weight"])
        return out
    out[p + "mlp.gate.weight"] = sd[g + "mlp.router.weight"]
    out[p + "mlp.gate.e_score_correction_bias"] = sd[g + "mlp.router.expert_bias"]
    w1, w2 = sd[g + "mlp.experts.weight1"], sd[g + "mlp.experts.weight2"]
    for x in range(ns.num_experts):
        _split_gate_up(out, f"{p}mlp.experts.{x}.", w1[x].t(), w2[x].t())
    if ns.moe_shared_expert_intermediate_size:
        s = g + "mlp.shared_experts.mlp."
        _split_gate_up(out, p + "mlp.shared_experts.", sd[s + "linear_fc1.weight"],
                       sd[s + "linear_fc2.weight"])
    return out


# ---- multi-token prediction (hub names model.layers.{L+k}.*) -------------------------------------
_MTP_OWN = (("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"),
            ("eh_proj.weight", "eh_proj.weight"),
            ("shared_head.norm.weight", "final_layernorm.weight"))
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # the model's embedding, head


def mtp_entries(k: int, ns: argparse.Namespace, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of MTP depth ``k``'s hub tensors (0-based ``k``)."""
    i, h = ns.num_layers + k, ns.hidden_size
    p = f"model.layers.{i}."
    own = {"eh_proj.weight": (h, 2 * h)}
    return ([(p + "embed_tokens.weight", (vocab, h))]
            + [(p + n, own.get(n, (h,))) for n, _ in _MTP_OWN]
            + hf_layer_entries(i, ns) + [(p + "shared_head.head.weight", (vocab, h))])


def mtp_layers_in(names, cfg: dict) -> int:
    """How many of ``num_nextn_predict_layers`` MTP depths the files hold (all or none)."""
    n, layers = cfg.get("num_nextn_predict_layers") or 0, cfg["num_hidden_layers"]
    present = [f"model.layers.{layers + k}.eh_proj.weight" in names for k in range(n)]
    if any(present) and not all(present):
        raise ValueError(f"the files hold {sum(present)} of the {n} MTP layers that config.json "
                         "field num_nextn_predict_layers announces")
    if n and not any(present):
        print(f"[convert] WARNING: config.json announces {n} MTP layers but the files hold none "
              "(transformers drops them on save); converting the model without MTP",
              file=sys.stderr)
    return n if all(present) else 0


class HFSource(HFSourceBase):
    """Reads a Hugging Face DeepSeek-V3 directory layer by layer (MTP depths too)."""

    model_name = "DeepSeek-V3"
    family = sys.modules[__name__]  # the hooks call this module's functions

    def __init__(self, directory: str):
        super().__init__(directory)
        self.num_mtp = self.args.mtp_num_layers or 0

    def args_from_hf_config(self, cfg: dict) -> argparse.Namespace:
        # The MTP depth depends on which tensors the files hold.
        return args_from_hf_config(cfg, mtp_layers_in(set(self.reader.keys()), cfg))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes()
        for k in range(self.args.mtp_num_layers or 0):
            shapes.update(mtp_entries(k, self.args, self.true_vocab_size))
        return shapes

    def read_mtp(self) -> dict[str, torch.Tensor]:
        """``mtp.layers.*`` global tensors; the depths' embedding and head copies must equal the
        model's (moecore shares them)."""
        out = {}
        shared = {"embed_tokens.weight": self.reader.get(EMBED),
                  "shared_head.head.weight": self.reader.get(EMBED if self.tied else HEAD)}
        for k in range(self.num_mtp):
            i = self.num_layers + k
            p, g = f"model.layers.{i}.", f"mtp.layers.{k}."
            for name in _MTP_COPIES:
                if not torch.equal(self.reader.get(p + name), shared[name]):
                    raise ValueError(f"{p + name} differs from the model's own; moecore's MTP "
                                     "shares the embedding and output head")
            out.update({g + m: self.reader.get(p + n) for n, m in _MTP_OWN})
            out.update(global_from_hf_layer(i, self.reader.get, self.args,
                                            g + "transformer_layer."))
        return out


class HFSink(HFSinkBase):
    """Writes a DeepSeek-V3's ``config.json`` and safetensors; MTP depths as hub layers
    ``model.layers.{L+k}`` after ``lm_head``, with copies of the embedding and head."""

    family = sys.modules[__name__]  # the hooks call this module's functions

    def __init__(self, directory: str, ns: argparse.Namespace, vocab_size: int,
                 dtype: torch.dtype, max_shard_bytes: int, base: dict | None = None):
        self._base = base
        super().__init__(directory, ns, vocab_size, dtype, max_shard_bytes)
        self._copies: dict[str, torch.Tensor] = {}

    def hf_config_from_args(self, ns, vocab_size: int, dtype: torch.dtype) -> dict:
        return hf_config_from_args(ns, vocab_size, dtype, self._base)

    def dtype_of(self, name: str) -> torch.dtype:
        # The hub keeps the expert bias in fp32 next to bf16 weights (moecore's buffer is fp32
        # too): a bf16 copy would lose the small updates that aux-loss-free balancing makes.
        if name.endswith("e_score_correction_bias"):
            return torch.float32
        return self.dtype

    def plan(self) -> list[tuple[str, tuple[int, ...]]]:
        out = super().plan()
        for k in range(self.ns.mtp_num_layers or 0):
            out += mtp_entries(k, self.ns, self.vocab_size)
        return out

    def write_embedding(self, sd: dict[str, torch.Tensor]) -> None:
        super().write_embedding(sd)
        if self.ns.mtp_num_layers:
            emb = self._vocab_rows(sd["embedding.word_embeddings.weight"], EMBED)
            self._copies = {"embed_tokens.weight": emb, "shared_head.head.weight": emb}

    def write_final(self, sd: dict[str, torch.Tensor]) -> None:
        super().write_final(sd)
        if self.ns.mtp_num_layers and not self.tied:
            self._copies["shared_head.head.weight"] = self._vocab_rows(
                sd["output_layer.weight"], "output_layer.weight")

    def write_mtp(self, sd: dict[str, torch.Tensor]) -> None:
        for k in range(self.ns.mtp_num_layers or 0):
            i, g = self.ns.num_layers + k, f"mtp.layers.{k}."
            p = f"model.layers.{i}."
            hf = {p + n: sd[g + m] for n, m in _MTP_OWN}
            hf.update({p + n: t for n, t in self._copies.items()})
            hf.update(hf_from_global_layer(i, sd, self.ns, g + "transformer_layer."))
            for name, _ in mtp_entries(k, self.ns, self.vocab_size):
                self._write(name, hf[name])
