"""A converted Hugging Face DeepSeek-V3 at TP=2 x EP=2 on 4 gloo ranks gives transformers'
logits and gradients.

The tiny random ``DeepseekV3ForCausalLM`` of ``tests/unit/test_convert_deepseek.py`` (q LoRA,
YaRN, a dense first layer, shared experts, sigmoid + group-limited routing with a non-zero
e_score_correction_bias) is converted to TP=2 x EP=2 (sequence parallel, expert TP = 2) and run
through ``pretrain`` with the flags the converter prints. Logits (gathered over the vocab-parallel
group) must match transformers'; after one backward of the same loss, each rank's gradient
shards must match transformers' gradients, sharded by the converter's own table.
"""

from __future__ import annotations

from moecore.convert import hf_deepseek_v3
from tests import convert_harness as harness
from tests.unit.test_convert_deepseek import V3, V, hf_model

CHECKED = (  # a parameter of each kind: split over TP, replicated (SP-partial), expert, ...
    "embedding.word_embeddings.weight", "output_layer.weight",
    "decoder.layers.1.self_attention.linear_q_up_proj.weight",
    "decoder.layers.1.self_attention.linear_kv_down_proj.weight",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.input_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.2.mlp.router.weight", "decoder.layers.2.mlp.experts.weight1",
    "decoder.layers.2.mlp.experts.weight2",
    "decoder.layers.1.mlp.shared_experts.mlp.linear_fc1.weight", "decoder.final_layernorm.weight",
)


def test_deepseek_v3_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path):
    hf = hf_model(V3)
    ids, labels = harness.ids_and_labels(V)
    ref = harness.saved_reference(hf, tmp_path, ids, labels, V)
    cfg = hf.config.to_dict() | {"rope_scaling": V3["rope_scaling"]}
    hub = harness.hub_grads(hf, cfg["moe_intermediate_size"])
    grads = harness.global_grads(hub, cfg, hf_deepseek_v3, CHECKED)
    res, per_rank = harness.run_converted_on_four_ranks(
        tmp_path, {"tp": 2, "ep": 2}, V, ids, labels, ref, grads, V3["n_routed_experts"])
    assert "--sequence-parallel" in res.flags
    bad = harness.errors_over(per_rank, 1e-4)
    assert not bad, bad
    assert all(len(errs) == len(CHECKED) + 1 for errs in per_rank)
