"""A converted Hugging Face gpt-oss at TP=2 x EP=2 (expert TP 1) on 4 gloo ranks gives
transformers' logits and gradients.

The tiny random ``GptOssForCausalLM`` of ``tests/unit/test_gpt_oss.py`` (sliding and full layers,
attention sinks, biases everywhere, YaRN, clamped quick-GeGLU experts) is converted to TP=2 x
EP=2 and run through ``pretrain`` with the flags the converter prints. Expert biases are not
sharded over expert TP, so expert TP is 1 (expert data parallel 2). Logits (gathered over the
vocab-parallel group) must match transformers'; after one backward of the same loss each rank's
gradient shards (summed over the replicas the trainer would sum) must match transformers'.
"""

from __future__ import annotations

from moecore.convert import hf_gpt_oss
from tests import convert_harness as harness
from tests.unit.test_gpt_oss import GPT_OSS, B, S, V, hf_model

CHECKED = (
    "embedding.word_embeddings.weight", "output_layer.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.self_attention.linear_proj.bias",
    "decoder.layers.0.self_attention.sinks", "decoder.layers.1.self_attention.sinks",
    "decoder.layers.1.input_layernorm.weight", "decoder.layers.2.mlp.router.weight",
    "decoder.layers.2.mlp.router.bias", "decoder.layers.0.mlp.experts.weight1",
    "decoder.layers.0.mlp.experts.bias1", "decoder.layers.2.mlp.experts.weight2",
    "decoder.layers.2.mlp.experts.bias2", "decoder.final_layernorm.weight",
)


def test_gpt_oss_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path):
    hf = hf_model()
    ids, labels = harness.ids_and_labels(V, B, S)
    ref = harness.saved_reference(hf, tmp_path, ids, labels, V)
    cfg = hf.config.to_dict() | {"rope_parameters": GPT_OSS["rope_parameters"]}
    grads = harness.global_grads(harness.hub_grads(hf), cfg, hf_gpt_oss, CHECKED)
    # Expert biases are not sharded over expert TP: expert TP 1, expert data parallel 2.
    res, per_rank = harness.run_converted_on_four_ranks(
        tmp_path, {"tp": 2, "ep": 2, "etp": 1}, V, ids, labels, ref, grads,
        GPT_OSS["num_local_experts"], sum_expert_dp=True)
    assert "--sequence-parallel" in res.flags
    bad = harness.errors_over(per_rank, 1e-4)
    assert not bad, bad
    assert all(len(errs) == len(CHECKED) + 1 for errs in per_rank)
