"""Checkpoint converter: Hugging Face OLMoE (``OlmoeForCausalLM``) <-> moecore.

A tiny random ``transformers`` OlmoeForCausalLM (config in this file, no downloads; GQA, QK
norm over the whole q and k projections, top-k of a softmax over all experts without
renormalisation) is saved as the hub stores models (sharded safetensors + index) and
converted. Checks, fp32: logits and the gradients of parameters of each kind match moecore's;
converting back (also through a TP=2 x EP=2 reshard) gives byte-identical tensors and a config
transformers loads to the same model; ``norm_topk_prob: true`` maps to the renormalising
router; refusals (``clip_qkv``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from moecore.convert import Layout, convert
from moecore.convert.io import INDEX_FILENAME, SafetensorsReader
from moecore.convert.reshard import fake_parallel_state
from tests.convert_harness import (
    convert_saved,
    ids_and_labels,
    logits_then_backward,
    random_hf_model,
    save_hub,
)
from tests.unit.test_convert import assert_same_tensors, load_stage, read_all, rel_err

transformers = pytest.importorskip("transformers")

V = 96
OLMOE = dict(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=4,
             max_position_embeddings=32, norm_topk_prob=False, tie_word_embeddings=False,
             bos_token_id=5, eos_token_id=7, pad_token_id=1, rms_norm_eps=1e-5,
             router_aux_loss_coef=0.01)


def hf_model(kwargs: dict, seed: int = 0):
    """A random fp32 OlmoeForCausalLM whose weights are large enough to route and attend
    unevenly (transformers' init is tiny)."""
    return random_hf_model("Olmoe", kwargs, seed)[0]


@pytest.fixture(scope="module", params=["no_renorm", "renorm"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    kwargs = dict(OLMOE, norm_topk_prob=request.param == "renorm")
    return convert_saved(hf_model(kwargs), root) | {"kwargs": kwargs}


def test_flags_follow_the_config(converted):
    flags = converted["res"].flags
    assert "--qk-layernorm" in flags and "--qk-layernorm-hidden-dim" in flags
    assert ("--moe-router-pre-softmax" in flags) != converted["kwargs"]["norm_topk_prob"]
    assert flags[flags.index("--num-query-groups") + 1] == "2"
    assert flags[flags.index("--moe-router-topk") + 1] == "4"


def test_logits_and_grads_match_transformers(converted):
    hf, ours = converted["hf"], converted["moecore"]
    ref, logits = logits_then_backward(hf, ours, *ids_and_labels(V), V)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-4
    hp, mp = dict(hf.named_parameters()), dict(ours.named_parameters())
    same = lambda t: t  # noqa: E731
    pairs = [
        ("model.embed_tokens.weight", "embedding.word_embeddings.weight", same),
        ("model.layers.1.self_attn.o_proj.weight",
         "decoder.layers.1.self_attention.linear_proj.weight", same),
        ("model.layers.1.self_attn.q_norm.weight",
         "decoder.layers.1.self_attention.q_proj_layernorm.weight", same),
        ("model.layers.0.self_attn.k_norm.weight",
         "decoder.layers.0.self_attention.k_proj_layernorm.weight", same),
        ("model.layers.1.input_layernorm.weight", "decoder.layers.1.input_layernorm.weight",
         same),
        ("model.layers.1.mlp.gate.weight", "decoder.layers.1.mlp.router.weight", same),
        ("model.layers.1.mlp.experts.gate_up_proj", "decoder.layers.1.mlp.experts.weight1",
         lambda t: t.transpose(1, 2)),
        ("model.layers.0.mlp.experts.down_proj", "decoder.layers.0.mlp.experts.weight2",
         lambda t: t.transpose(1, 2)),
        ("model.norm.weight", "decoder.final_layernorm.weight", same),
        ("lm_head.weight", "output_layer.weight", same),
    ]
    for hname, mname, view in pairs:
        g_ref, g = hp[hname].grad, view(mp[mname].grad)
        assert g_ref.abs().sum() > 0, hname
        assert rel_err(g, g_ref) < 1e-4, (hname, rel_err(g, g_ref))
    # The q/k rows of the fused QKV weight (the norm's input).
    h, d = OLMOE["hidden_size"], OLMOE["hidden_size"] // OLMOE["num_attention_heads"]
    qkv = mp["decoder.layers.1.self_attention.linear_qkv.weight"].grad.view(2, 4 * d, h)
    ref_q = hp["model.layers.1.self_attn.q_proj.weight"].grad.view(2, 2 * d, h)
    ref_k = hp["model.layers.1.self_attn.k_proj.weight"].grad.view(2, d, h)
    assert rel_err(qkv[:, :2 * d], ref_q) < 1e-4
    assert rel_err(qkv[:, 2 * d:3 * d], ref_k) < 1e-4


def _assert_index_and_reload(converted, back: str) -> None:
    root = converted["root"]
    with open(os.path.join(back, INDEX_FILENAME)) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == sorted(SafetensorsReader(back).keys())
    with open(root / "hf" / "config.json") as f:
        orig = json.load(f)
    with open(os.path.join(back, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["OlmoeForCausalLM"] and cfg["eos_token_id"] == 7
    a = transformers.OlmoeConfig.from_dict(orig).to_dict()
    b = transformers.OlmoeConfig.from_dict(cfg).to_dict()
    assert {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v} == {}
    reloaded = transformers.OlmoeForCausalLM.from_pretrained(
        back, attn_implementation="eager").eval()
    ids, _ = ids_and_labels(V)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, converted["hf"](ids).logits)


def test_back_to_hub_is_byte_identical(converted):
    root = converted["root"]
    convert("moecore", "hf", str(root / "m"), str(root / "back"), max_shard_size="40KB")
    assert_same_tensors(read_all(str(root / "back")), read_all(str(root / "hf")))
    _assert_index_and_reload(converted, str(root / "back"))


def test_reshard_tp2_ep2_and_back_is_byte_identical(converted):
    root = converted["root"]
    convert("hf", "moecore", str(root / "hf"), str(root / "tp2ep2"),
            target={"tp": 2, "ep": 2, "pp": 2})
    convert("moecore", "moecore", str(root / "tp2ep2"), str(root / "tp1"),
            target={"tp": 1, "ep": 1, "pp": 1})
    convert("moecore", "hf", str(root / "tp1"), str(root / "back2"), max_shard_size="40KB")
    assert_same_tensors(read_all(str(root / "back2")), read_all(str(root / "hf")))
    # The projection norms are split with the heads over TP, not replicated.
    ps = fake_parallel_state(Layout(tp=2, ep=2, pp=2).sizes(), 0)
    (stage,) = load_stage(str(root / "tp2ep2"), ps)
    sd = stage.state_dict()
    assert sd["decoder.layers.0.self_attention.q_proj_layernorm.weight"].shape == (16,)
    assert sd["decoder.layers.0.self_attention.k_proj_layernorm.weight"].shape == (8,)


def test_clip_qkv_is_refused(tmp_path):
    model = hf_model(dict(OLMOE, clip_qkv=8.0))
    save_hub(model, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="clip_qkv=8.0"):
        convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"))


def test_cli_in_and_out(converted, tmp_path, capsys):
    """tools/checkpoint/convert.py: hub -> moecore at EP=2 prints OLMoE's flags; -> hub again."""
    from tools.checkpoint.convert import main

    root, mid, back = converted["root"], str(tmp_path / "ep2"), str(tmp_path / "back")
    assert main(["--loader", "hf", "--saver", "moecore", "--load-dir", str(root / "hf"),
                 "--save-dir", mid, "--target-expert-parallel-size", "2"]) == 0
    flags = capsys.readouterr().out.split()
    assert "--qk-layernorm-hidden-dim" in flags
    assert flags[flags.index("--expert-model-parallel-size") + 1] == "2"
    assert main(["--loader", "moecore", "--saver", "hf", "--load-dir", mid,
                 "--save-dir", back]) == 0
    assert_same_tensors(read_all(back), read_all(str(root / "hf")))
