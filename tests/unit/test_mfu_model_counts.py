"""The MFU parameter count equals the matmul weights of the model moecore builds: MLA, routed
and shared experts, first layers dense, and multi-token prediction (whose layer and projection
count, and whose second pass through the output head adds FLOPs but no weights)."""

from __future__ import annotations

import pytest

from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.parallel_state import ParallelState
from moecore.training.mfu import flops_per_token, matmul_params

V, S = 40, 16
NH, DN, DR, DV = 4, 8, 4, 6


def _config(mtp, moe_last: bool) -> TransformerConfig:
    return TransformerConfig(
        num_layers=3, hidden_size=32, num_attention_heads=NH, ffn_hidden_size=48,
        multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=10, qk_head_dim=DN,
        qk_pos_emb_head_dim=DR, v_head_dim=DV, qk_layernorm=True, rope_type="rope",
        num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
        moe_shared_expert_intermediate_size=24, gated_linear_unit=True,
        moe_layer_freq=[0, 1, 1] if moe_last else [0, 1, 0], mtp_num_layers=mtp)


@pytest.mark.parametrize("mtp", [None, 1, 2])
@pytest.mark.parametrize("moe_last", [True, False])
def test_matmul_params_match_the_built_model(mtp, moe_last):
    cfg = _config(mtp, moe_last)
    model = GPTModel(cfg, vocab_size=V, max_sequence_length=S,
                     share_embeddings_and_output_weights=False,
                     parallel_state=ParallelState.single())
    weights = {n: p.numel() for n, p in model.named_parameters()
               if p.dim() >= 2 and "word_embeddings" not in n}
    assert any(".mtp." in f".{n}" for n in weights) == bool(mtp)
    assert any("shared_experts" in n for n in weights)
    assert matmul_params(cfg, V, active_only=False) == sum(weights.values())
    # Active: two of the four routed experts in each MoE layer (the MTP layer's kind is the
    # last layer's).
    moe_layers = 2 if moe_last else 1
    moe_layers += (mtp or 0) if moe_last else 0
    expert = 3 * 32 * 16
    assert matmul_params(cfg, V) == sum(weights.values()) - moe_layers * 2 * expert
    layers = 3 + (mtp or 0)
    attn = 6 * layers * NH * (DN + DR + DV) * S
    head = (mtp or 0) * V * 32
    assert flops_per_token(cfg, V, S) == 6.0 * (matmul_params(cfg, V) + head) + attn
