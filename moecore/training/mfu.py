"""Model FLOPs per token and peak device throughput, for MoE-aware MFU.

Training FLOPs per token (forward + backward = 3 x forward, each multiply-add = 2 FLOPs)::

    flops_per_token = 6 * N_active + 6 * L * heads * (d_qk + d_v) * S

(``d_qk = d_v = kv_channels`` for GQA; ``qk_head_dim + qk_pos_emb_head_dim`` and ``v_head_dim``
for multi-latent attention.) ``N_active`` counts the matmul weights one token passes through:
per layer the attention projections (for MLA the down-, up- and output projections), the dense
MLP or — in an MoE layer — the router, ``topk`` routed experts and the shared experts, plus the
output head (``V * H``). Each multi-token-prediction depth adds its ``[2H -> H]`` projection,
one layer of the last layer's kind (to ``L`` as well) and a second pass through the shared output
head. The input embedding is a lookup (no FLOPs);
norms and biases are negligible and left out. The second term is self-attention's ``QK^T`` and
``AV`` products over the full ``S x S`` square (the PaLM / Megatron convention, which does not
halve for the causal mask). MFU = achieved FLOP/s / (devices x peak FLOP/s).
"""

from __future__ import annotations

import torch

# Dense peak TFLOP/s per device: "bf16" for bf16/fp16 training, "fp32" is TF32 tensor cores.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp32": 494.5},
    "H200": {"bf16": 989.0, "fp32": 494.5},
    "H800": {"bf16": 989.0, "fp32": 494.5},
    "GH200": {"bf16": 989.0, "fp32": 494.5},
    "B200": {"bf16": 2250.0, "fp32": 1100.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "A800": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
}


def peak_tflops(device: torch.device | str, dtype: torch.dtype,
                override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device: ``override`` if given, else the table entry whose name
    occurs in the CUDA device name; None on CPU or for an unknown GPU (MFU is then n/a)."""
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    kind = "fp32" if dtype == torch.float32 else "bf16"
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks[kind]
    return None


def _mlp_params(hidden: int, ffn: int, gated: bool) -> int:
    return hidden * ffn * (2 if gated else 1) + ffn * hidden


def _attention_params(config) -> int:
    """Matmul weights of one attention layer: GQA's QKV and output projections, or multi-latent
    attention's down-, up- and output projections."""
    h, nh = config.hidden_size, config.num_attention_heads
    if not config.multi_latent_attention:
        q, kv = nh * config.kv_channels, config.num_query_groups * config.kv_channels
        return h * (q + 2 * kv) + q * h
    dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    rq, rkv = config.q_lora_rank, config.kv_lora_rank
    q = h * nh * (dn + dr) if rq is None else h * rq + rq * nh * (dn + dr)
    return q + h * (rkv + dr) + rkv * nh * (dn + dv) + nh * dv * h


def _attention_dims(config) -> int:
    """Per-head ``d_qk + d_v`` of the ``QK^T`` and ``AV`` products."""
    if config.multi_latent_attention:
        return config.qk_head_dim + config.qk_pos_emb_head_dim + config.v_head_dim
    return 2 * config.kv_channels


def matmul_params(config, vocab_size: int, active_only: bool = True) -> int:
    """Matmul weights of the model, from ``config`` (see module docstring).

    ``active_only`` counts ``topk`` routed experts per MoE layer instead of all of them.
    Excludes the input embedding, norms and biases.
    """
    h = config.hidden_size
    pattern = config.moe_layer_pattern()
    total = vocab_size * h + sum(_layer_params(config, is_moe, active_only) for is_moe in pattern)
    for _ in range(config.mtp_num_layers or 0):  # eh_proj and one layer of the last one's kind
        total += 2 * h * h + _layer_params(config, pattern[-1], active_only)
    return total


def _layer_params(config, is_moe: bool, active_only: bool) -> int:
    """Matmul weights of one transformer layer: attention plus the dense MLP, or the router,
    the routed experts (``topk`` of them if ``active_only``) and the shared experts."""
    h, gated = config.hidden_size, config.gated_linear_unit
    if not is_moe:
        return _attention_params(config) + _mlp_params(h, config.ffn_hidden_size, gated)
    n_experts = config.moe_router_topk if active_only else config.num_moe_experts
    total = _attention_params(config) + h * config.num_moe_experts
    total += n_experts * _mlp_params(h, config.moe_ffn_hidden_size, gated)
    if config.moe_shared_expert_intermediate_size:
        total += _mlp_params(h, config.moe_shared_expert_intermediate_size, gated)
    return total


def flops_per_token(config, vocab_size: int, seq_length: int) -> float:
    """Training FLOPs per token: ``6 * N_active + 6 * L * heads * (d_qk + d_v) * S`` (``d_qk =
    d_v = kv_channels`` for GQA: ``12 * L * heads * kv_channels * S``); with ``D`` MTP depths
    ``L`` includes them and ``N_active`` adds ``D`` passes through the output head."""
    mtp = config.mtp_num_layers or 0
    attn = 6 * (config.num_layers + mtp) * config.num_attention_heads \
        * _attention_dims(config) * seq_length
    head = mtp * vocab_size * config.hidden_size
    return 6.0 * (matmul_params(config, vocab_size, active_only=True) + head) + float(attn)


def mfu(tokens_per_sec: float, flops_token: float, num_devices: int,
        peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_sec * flops_token / (num_devices * peak * 1e12)
