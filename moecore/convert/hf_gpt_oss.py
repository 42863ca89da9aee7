"""Hugging Face gpt-oss (``GptOssForCausalLM``) <-> moecore: the config and the parameter mapping.

=====================================================  =========================================
Hugging Face (``model.layers.{i}.`` prefix)            moecore global (``decoder.layers.{i}.``)
=====================================================  =========================================
``input_layernorm.weight``                             ``input_layernorm.weight``
``self_attn.{q,k,v}_proj.{weight,bias}``               ``self_attention.linear_qkv.{weight,bias}``
                                                       (rows per query group: its q heads, k, v)
``self_attn.o_proj.{weight,bias}``                     ``self_attention.linear_proj.{weight,bias}``
``self_attn.sinks [nh]``                               ``self_attention.sinks``
``post_attention_layernorm.weight``                    ``pre_mlp_layernorm.weight``
``mlp.router.{weight [E, H], bias [E]}``               ``mlp.router.{weight,bias}``
``mlp.experts.gate_up_proj [E, H, 2F]``                ``mlp.experts.weight1 [E, H, 2F]``:
(gate/up *interleaved*: ``[..., ::2]`` / ``[..., 1::2]``)  ``[gate | up]`` (de-interleaved)
``mlp.experts.gate_up_proj_bias [E, 2F]``              ``mlp.experts.bias1`` (de-interleaved)
``mlp.experts.down_proj [E, F, H]`` (+ ``_bias [E, H]``)   ``mlp.experts.weight2`` (+ ``bias2``)
=====================================================  =========================================

Embedding, final norm and ``lm_head`` as in :mod:`moecore.convert.hf_mixtral`. The hub stores the
expert matrices in MXFP4 (``quantization_config.quant_method == 'mxfp4'``): ``{name}_blocks
[E, out, in/32, 16]`` uint8 (two e2m1 codes a byte, low nibble first) and ``{name}_scales
[E, out, in/32]`` uint8 (a power-of-two exponent, bias 127 per 32 values); they are dequantised
on import (:func:`dequantize_mxfp4`) and exported unquantised.

Layers: ``sliding_window W`` on ``layer_types`` 'sliding_attention' is moecore's window ``W - 1``
(query ``i`` sees ``i - W + 1 .. i``, Megatron/flash's inclusive left window); alternating
sliding/full from layer 0 is ``--window-attn-skip-freq 2``. Router: top-k of the biased logits,
softmax over the k selected (moecore's default softmax router). Experts: ``(clamp(up, -c, c) + 1)
* g * sigmoid(1.702 g)`` with ``g = clamp(gate, max=c)``: ``--quick-geglu --glu-linear-offset 1
--activation-func-clamp-value c``. RoPE: YaRN (``rope_parameters``) on whole heads, non-interleaved.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moecore.convert.hf_base import (
    HFSinkBase,
    HFSourceBase,
    args_from_hf_flags,
    export_base_config,
    interleave_qkv,
    llama_dims,
    refuse_flags,
    split_qkv,
    unsupported,
    warn_unknown_fields,
)

ARCHITECTURE = "GptOssForCausalLM"
MODEL_TYPES = ("gpt_oss",)
QUICK_GELU_ALPHA = 1.702
_KNOWN = {"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
          "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
          "output_router_logits", "return_dict", "output_hidden_states", "output_attentions",
          "torchscript", "id2label", "label2id", "tokenizer_class", "initializer_range",
          "max_position_embeddings", "attention_dropout", "router_aux_loss_coef",
          "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
          "sliding_window", "num_experts_per_tok", "num_local_experts", "attention_bias",
          "quantization_config", "layer_types", "swiglu_limit", "swiglu_alpha", "problem_type",
          "chunk_size_feed_forward", "is_encoder_decoder", "experts_per_token",
          "initial_context_length"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_local_experts", "num_experts_per_tok", "head_dim")
_EXPERT_MATS = ("gate_up_proj", "down_proj")


def rope_parameters(cfg: dict) -> dict:
    """The YaRN settings, from ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` +
    ``rope_theta`` (the hub's config.json)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 150000.0))
    return params


def is_mxfp4(cfg: dict) -> bool:
    return (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def _layer_windows(cfg: dict) -> list[bool]:
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                       for i in range(n)]
    if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise unsupported("layer_types", types, "one of 'sliding_attention' / "
                          "'full_attention' per layer is expected")
    return [t == "sliding_attention" for t in types]


def validate_hf_config(cfg: dict) -> None:
    """Raise ``ValueError`` naming the first field moecore cannot represent."""
    if cfg.get("model_type") not in MODEL_TYPES:
        raise unsupported("model_type", cfg.get("model_type"), f"this converter reads "
                          f"gpt-oss checkpoints ({ARCHITECTURE}, model_type 'gpt_oss')")
    for field in _REQUIRED:
        if cfg.get(field) is None:
            raise ValueError(f"config.json lacks the field {field}, which a gpt-oss config has")
    rope = rope_parameters(cfg)
    quant = cfg.get("quantization_config")
    checks = [
        ("attention_bias", cfg.get("attention_bias", True),
         "gpt-oss attention has biases (moecore's add_bias_linear covers attention and experts)"),
        ("swiglu_alpha", cfg.get("swiglu_alpha", QUICK_GELU_ALPHA) == QUICK_GELU_ALPHA,
         "--quick-geglu's sigmoid slope is fixed at 1.702"),
        ("rope_parameters", rope.get("rope_type", rope.get("type")) == "yarn"
         and not any(k in rope for k in ("attention_factor", "mscale", "mscale_all_dim"))
         and rope.get("beta_fast", 32.0) == 32.0 and rope.get("beta_slow", 1.0) == 1.0,
         "YaRN with beta_fast 32, beta_slow 1 and the default attention factor is mapped"),
        ("quantization_config", quant is None or is_mxfp4(cfg),
         "only MXFP4 expert weights are dequantised; start from an unquantised checkpoint"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise unsupported(field, cfg.get(field, rope if field == "rope_parameters" else None),
                              why)
    if float(rope["rope_theta"]) != int(rope["rope_theta"]):
        raise unsupported("rope_theta", rope["rope_theta"], "--rotary-base takes integers")
    if any(_layer_windows(cfg)) and not cfg.get("sliding_window"):
        raise unsupported("sliding_window", cfg.get("sliding_window"), "sliding layers need it")


def _skip_freq(windows: list[bool]) -> str:
    """``--window-attn-skip-freq``: ``2`` for sliding/full alternation, else the pattern."""
    if windows == [i % 2 == 0 for i in range(len(windows))]:
        return "2"
    return "[" + ",".join(str(int(w)) for w in windows) + "]"


def args_from_hf_config(cfg: dict) -> argparse.Namespace:
    """Validate ``cfg`` and return the moecore model args of the same model (the original config
    kept as ``hf_config`` for the way back)."""
    validate_hf_config(cfg)
    warn_unknown_fields(cfg, _KNOWN)
    rope, windows = rope_parameters(cfg), _layer_windows(cfg)
    nh = cfg["num_attention_heads"]
    ng = cfg.get("num_key_value_heads") or nh
    f = cfg["intermediate_size"]
    flags = [
        "--num-layers", cfg["num_hidden_layers"], "--hidden-size", cfg["hidden_size"],
        "--ffn-hidden-size", f, "--num-attention-heads", nh, "--kv-channels", cfg["head_dim"],
        "--group-query-attention", "--num-query-groups", ng,
        "--max-position-embeddings", cfg.get("max_position_embeddings", 131072),
        "--position-embedding-type", "rope", "--rotary-base", int(rope["rope_theta"]),
        "--rope-type", "yarn", "--rotary-scaling-factor", rope.get("factor", 1.0),
        "--original-max-position-embeddings",
        rope.get("original_max_position_embeddings", 4096),
        "--normalization", "RMSNorm", "--norm-epsilon", cfg.get("rms_norm_eps", 1e-5),
        "--quick-geglu", "--glu-linear-offset", 1.0,
        "--activation-func-clamp-value", cfg.get("swiglu_limit", 7.0),
        "--softmax-type", "learnable",
        "--init-method-std", cfg.get("initializer_range", 0.02),
        "--attention-dropout", cfg.get("attention_dropout", 0.0), "--hidden-dropout", 0.0,
        "--num-experts", cfg["num_local_experts"], "--moe-ffn-hidden-size", f,
        "--moe-router-topk", cfg["num_experts_per_tok"],
        "--moe-router-score-function", "softmax", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", cfg.get("router_aux_loss_coef", 0.001), "--moe-grouped-gemm",
    ]
    if not rope.get("truncate", True):
        flags += ["--no-yarn-correction-range-round-to-int"]
    if any(windows):
        flags += ["--window-size", f"{cfg['sliding_window'] - 1},0",
                  "--window-attn-skip-freq", _skip_freq(windows)]
    if not cfg.get("tie_word_embeddings", False):
        flags += ["--untie-embeddings-and-output-weights"]
    stored = {k: v for k, v in cfg.items() if k != "quantization_config"}
    return args_from_hf_flags(flags, cfg, stored)


def _check_representable(ns: argparse.Namespace) -> None:
    freq = ns.moe_layer_freq
    checks = [
        ("--num-experts", ns.num_experts is not None, "a dense model is not a gpt-oss"),
        ("--moe-layer-freq", freq == 1 or (isinstance(freq, list) and all(freq)),
         "every gpt-oss layer is MoE"),
        ("--softmax-type", ns.softmax_type == "learnable", "gpt-oss has attention sinks"),
        ("--quick-geglu", ns.quick_geglu and ns.glu_linear_offset == 1.0,
         "gpt-oss experts are (up + 1) * quick_gelu(gate) (--glu-linear-offset 1)"),
        ("--add-bias-linear", ns.add_bias_linear, "gpt-oss has linear biases"),
        ("--rope-type", ns.rope_type == "yarn", "gpt-oss uses YaRN"),
        ("--normalization", ns.normalization == "RMSNorm", "gpt-oss uses RMSNorm"),
        ("--qk-layernorm", not ns.qk_layernorm, "gpt-oss has no QK norm"),
        ("--moe-shared-expert-intermediate-size", not ns.moe_shared_expert_intermediate_size,
         "gpt-oss has no shared experts"),
        ("--moe-router-pre-softmax", not ns.moe_router_pre_softmax and
         ns.moe_router_score_function == "softmax", "gpt-oss: softmax over the top-k logits"),
        ("--window-size", ns.window_size is None or tuple(ns.window_size)[1] == 0,
         "gpt-oss windows are causal"),
    ]
    refuse_flags(ARCHITECTURE, checks)


def _layer_types(ns: argparse.Namespace) -> list[str]:
    from_flags = []
    for n in range(1, ns.num_layers + 1):
        freq = ns.window_attn_skip_freq
        windowed = ns.window_size is not None and (
            freq is None or (n % freq != 0 if isinstance(freq, int) else bool(freq[n - 1])))
        from_flags.append("sliding_attention" if windowed else "full_attention")
    return from_flags


def hf_config_from_args(ns: argparse.Namespace, vocab_size: int, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``ns``'s model (non-model fields of an original config kept)."""
    _check_representable(ns)
    cfg = export_base_config(ns)  # the original config, or token ids from the tokenizer dir
    rope = {**rope_parameters(cfg), "rope_type": "yarn", "rope_theta": float(ns.rotary_base),
            "factor": float(ns.rotary_scaling_factor), "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": ns.original_max_position_embeddings or 4096,
            "truncate": bool(ns.yarn_correction_range_round_to_int)}
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    cfg.update({
        "architectures": [ARCHITECTURE], "model_type": "gpt_oss", "vocab_size": vocab_size,
        "hidden_size": ns.hidden_size, "intermediate_size": ns.moe_ffn_hidden_size,
        "num_hidden_layers": ns.num_layers, "num_attention_heads": ns.num_attention_heads,
        "num_key_value_heads": ns.num_query_groups,
        "head_dim": ns.kv_channels or ns.hidden_size // ns.num_attention_heads,
        "max_position_embeddings": ns.max_position_embeddings or ns.seq_length,
        "initializer_range": ns.init_method_std, "rms_norm_eps": ns.norm_epsilon,
        "rope_parameters": rope, "attention_bias": True,
        "attention_dropout": ns.attention_dropout, "layer_types": _layer_types(ns),
        "sliding_window": (ns.window_size[0] + 1) if ns.window_size is not None else None,
        "num_experts_per_tok": ns.moe_router_topk, "num_local_experts": ns.num_experts,
        "router_aux_loss_coef": ns.moe_aux_loss_coeff,
        "swiglu_limit": ns.activation_func_clamp_value, "swiglu_alpha": QUICK_GELU_ALPHA,
        "tie_word_embeddings": not ns.untie_embeddings_and_output_weights,
    })
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.setdefault("hidden_act", "silu")
    cfg.setdefault("use_cache", True)
    return cfg


# ---- MXFP4 ---------------------------------------------------------------------------------------
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``blocks [E, out, G, 16]`` uint8, ``scales [E, out, G]`` uint8 -> ``[E, G*32, out]``
    (``in`` first, as ``gate_up_proj`` / ``down_proj`` are stored unquantised): byte ``b``
    holds e2m1 codes ``b & 15`` then ``b >> 4``; each group of 32 is scaled by
    ``2 ** (scale - 127)``."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                         "do not match; the checkpoint is not in the hub's MXFP4 layout")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8).long()
    vals = torch.stack([lut[b & 15], lut[b >> 4]], dim=-1).flatten(-2)  # [E, out, G, 32]
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127)[..., None].float())
    e, out = blocks.shape[:2]
    return vals.reshape(e, out, -1).transpose(1, 2).contiguous().to(dtype)


# ---- per-layer mapping ---------------------------------------------------------------------------
def hf_layer_entries(i: int, ns: argparse.Namespace, mxfp4: bool = False
                     ) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of layer ``i``'s Hugging Face tensors, in the order they are written
    (``mxfp4``: the expert matrices as ``_blocks`` / ``_scales``)."""
    h, nh, ng, d, f, e = llama_dims(ns)
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", (h,))]
    for x, rows in (("q", nh * d), ("k", ng * d), ("v", ng * d)):
        out += [(f"{p}self_attn.{x}_proj.weight", (rows, h)), (f"{p}self_attn.{x}_proj.bias",
                                                               (rows,))]
    out += [(p + "self_attn.o_proj.weight", (h, nh * d)), (p + "self_attn.o_proj.bias", (h,)),
            (p + "self_attn.sinks", (nh,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.router.weight", (e, h)), (p + "mlp.router.bias", (e,))]
    x = p + "mlp.experts."
    for name, (n_in, n_out) in zip(_EXPERT_MATS, ((h, 2 * f), (f, h))):
        if mxfp4:
            out += [(f"{x}{name}_blocks", (e, n_out, n_in // 32, 16)),
                    (f"{x}{name}_scales", (e, n_out, n_in // 32))]
        else:
            out.append((x + name, (e, n_in, n_out)))
        out.append((f"{x}{name}_bias", (e, n_out)))
    return out


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """``[..., 2F]`` gate/up interleaved -> ``[gate | up]``."""
    return torch.cat([t[..., ::2], t[..., 1::2]], dim=-1)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_deinterleave`."""
    gate, up = torch.chunk(t, 2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def global_from_hf_layer(i: int, get, ns: argparse.Namespace, mxfp4: bool = False,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Layer ``i``'s moecore global tensors from ``get(hf_name)``."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    a = p + "self_attn."
    qkv = interleave_qkv(*(get(f"{a}{x}_proj.weight") for x in "qkv"), ns)
    qkv_b = interleave_qkv(*(get(f"{a}{x}_proj.bias") for x in "qkv"), ns)
    x = p + "mlp.experts."

    def mat(name):
        if mxfp4:
            return dequantize_mxfp4(get(f"{x}{name}_blocks"), get(f"{x}{name}_scales"), dtype)
        return get(x + name)

    return {g + "input_layernorm.weight": get(p + "input_layernorm.weight"),
            g + "self_attention.linear_qkv.weight": qkv,
            g + "self_attention.linear_qkv.bias": qkv_b,
            g + "self_attention.linear_proj.weight": get(a + "o_proj.weight"),
            g + "self_attention.linear_proj.bias": get(a + "o_proj.bias"),
            g + "self_attention.sinks": get(a + "sinks"),
            g + "pre_mlp_layernorm.weight": get(p + "post_attention_layernorm.weight"),
            g + "mlp.router.weight": get(p + "mlp.router.weight"),
            g + "mlp.router.bias": get(p + "mlp.router.bias"),
            g + "mlp.experts.weight1": _deinterleave(mat("gate_up_proj")),
            g + "mlp.experts.bias1": _deinterleave(get(x + "gate_up_proj_bias")),
            g + "mlp.experts.weight2": mat("down_proj"),
            g + "mlp.experts.bias2": get(x + "down_proj_bias")}


def hf_from_global_layer(i: int, sd: dict[str, torch.Tensor], ns: argparse.Namespace
                         ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`global_from_hf_layer` (unquantised)."""
    p, g = f"model.layers.{i}.", f"decoder.layers.{i}."
    a, x = p + "self_attn.", p + "mlp.experts."
    q, k, v = split_qkv(sd[g + "self_attention.linear_qkv.weight"], ns)
    qb, kb, vb = split_qkv(sd[g + "self_attention.linear_qkv.bias"], ns)
    return {p + "input_layernorm.weight": sd[g + "input_layernorm.weight"],
            a + "q_proj.weight": q, a + "q_proj.bias": qb,
            a + "k_proj.weight": k, a + "k_proj.bias": kb,
            a + "v_proj.weight": v, a + "v_proj.bias": vb,
            a + "o_proj.weight": sd[g + "self_attention.linear_proj.weight"],
            a + "o_proj.bias": sd[g + "self_attention.linear_proj.bias"],
            a + "sinks": sd[g + "self_attention.sinks"],
            p + "post_attention_layernorm.weight": sd[g + "pre_mlp_layernorm.weight"],
            p + "mlp.router.weight": sd[g + "mlp.router.weight"],
            p + "mlp.router.bias": sd[g + "mlp.router.bias"],
            x + "gate_up_proj": _interleave(sd[g + "mlp.experts.weight1"]),
            x + "gate_up_proj_bias": _interleave(sd[g + "mlp.experts.bias1"]),
            x + "down_proj": sd[g + "mlp.experts.weight2"],
            x + "down_proj_bias": sd[g + "mlp.experts.bias2"]}


# ---- source and sink ----------------------------------------------------------------------------
class HFSource(HFSourceBase):
    """Reads a Hugging Face gpt-oss directory (MXFP4 experts dequantised to the embedding's
    dtype)."""

    model_name = "gpt-oss"

    def args_from_hf_config(self, cfg: dict) -> argparse.Namespace:
        self.mxfp4 = is_mxfp4(cfg)
        return args_from_hf_config(cfg)

    def layer_entries(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        return hf_layer_entries(i, self.args, self.mxfp4)

    def global_from_hf_layer(self, i: int) -> dict[str, torch.Tensor]:
        return global_from_hf_layer(i, self.reader.get, self.args, self.mxfp4, self.dtype)


class HFSink(HFSinkBase):
    """Writes a gpt-oss ``config.json`` and (unquantised) safetensors."""

    family = sys.modules[__name__]  # the hooks call this module's functions


def is_gpt_oss(ns: argparse.Namespace) -> bool:
    """Whether a moecore model's args describe a gpt-oss (attention sinks)."""
    return getattr(ns, "softmax_type", "vanilla") == "learnable"
