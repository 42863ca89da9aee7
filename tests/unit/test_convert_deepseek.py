"""Checkpoint converter: Hugging Face DeepSeek-V3 (``DeepseekV3ForCausalLM``) <-> moecore.

A tiny random ``transformers`` DeepseekV3ForCausalLM (config in this file, no downloads) is
saved as the hub stores models (sharded safetensors + index) and converted. Checks, fp32: its
logits and the gradients of parameters of each kind match moecore's (MLA with and without q
LoRA, YaRN, a dense first layer, shared experts, sigmoid + group-limited routing with a non-zero
e_score_correction_bias, tied and untied embeddings); converting back gives byte-identical
tensors, the same index semantics and a config transformers loads to the same model; MTP
tensors (which transformers drops) survive hub -> moecore (resharded) -> hub; the token ids of
the config survive an export from a checkpoint ``pretrain_gpt.py`` saved; refusals.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from moecore.convert import convert
from moecore.convert.hf_base import export_base_config
from moecore.convert.io import INDEX_FILENAME, SafetensorsReader
from moecore.convert.model_args import args_from_flags, true_vocab_size_of
from tests.convert_harness import (
    convert_saved,
    ids_and_labels,
    logits_then_backward,
    moecore_model,
    random_hf_model,
    save_hub,
)
from tests.unit.test_convert import (
    assert_same_tensors,
    load_with_pretrain,
    read_all,
    rel_err,
    write_hf_checkpoint,
)

transformers = pytest.importorskip("transformers")

V = 96
YARN = {"type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1}
# V3/R1-shaped: q LoRA, YaRN, 4 groups of which 2 kept (topk = 2 * topk_group), untied.
V3 = dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
          n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
          qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
          num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True,
          max_position_embeddings=32, rope_scaling=YARN, tie_word_embeddings=False,
          bos_token_id=5, eos_token_id=7, rms_norm_eps=1e-6)
# Moonlight/Kimi-K2-shaped: no q LoRA, one group, plain RoPE, tied embeddings.
MOONLIGHT = dict(V3, q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=2,
                 n_shared_experts=1, routed_scaling_factor=2.446, rope_scaling=None,
                 tie_word_embeddings=True)


def hf_model(kwargs: dict, seed: int = 0):
    """A random fp32 DeepseekV3ForCausalLM whose weights are large enough to route and attend
    unevenly (transformers' init is tiny), with a non-zero expert bias."""
    model, g = random_hf_model("DeepseekV3", kwargs, seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=["v3", "moonlight"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    kwargs = V3 if request.param == "v3" else MOONLIGHT
    return convert_saved(hf_model(kwargs), root) | {"kwargs": kwargs}


def test_flags_follow_the_config(converted):
    flags, kw = converted["res"].flags, converted["kwargs"]
    value = lambda f: flags[flags.index(f) + 1]  # noqa: E731
    assert value("--moe-layer-freq") == "[0,1,1]"
    assert value("--moe-shared-expert-intermediate-size") == str(
        kw["n_shared_experts"] * kw["moe_intermediate_size"])
    assert float(value("--moe-router-topk-scaling-factor")) == kw["routed_scaling_factor"]
    assert "--moe-router-enable-expert-bias" in flags
    assert ("--q-lora-rank" in flags) == (kw["q_lora_rank"] is not None)
    assert ("--moe-router-num-groups" in flags) == (kw["topk_group"] < kw["n_group"])
    assert ("--untie-embeddings-and-output-weights" in flags) != kw["tie_word_embeddings"]
    if kw["rope_scaling"]:
        assert value("--rope-type") == "yarn" and value("--rotary-scaling-factor") == "4.0"
        assert value("--original-max-position-embeddings") == "8"


def test_logits_and_grads_match_transformers(converted):
    hf, ours = converted["hf"], converted["moecore"]
    ref, logits = logits_then_backward(hf, ours, *ids_and_labels(V), V)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-4
    # Gradients of parameters of each kind (after one backward of the same loss).
    hp = dict(hf.named_parameters())
    mp = dict(ours.named_parameters())
    f = converted["kwargs"]["moe_intermediate_size"]
    fs = f * converted["kwargs"]["n_shared_experts"]
    attn = ("self_attn.q_b_proj" if converted["kwargs"]["q_lora_rank"] else "self_attn.q_proj",
            "self_attention.linear_q_up_proj" if converted["kwargs"]["q_lora_rank"]
            else "self_attention.linear_q_proj")
    pairs = [
        ("model.embed_tokens.weight", "embedding.word_embeddings.weight", lambda t: t),
        (f"model.layers.1.{attn[0]}.weight", f"decoder.layers.1.{attn[1]}.weight", lambda t: t),
        ("model.layers.1.self_attn.kv_b_proj.weight",
         "decoder.layers.1.self_attention.linear_kv_up_proj.weight", lambda t: t),
        ("model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
         "decoder.layers.2.self_attention.linear_kv_down_proj.weight", lambda t: t),
        ("model.layers.1.input_layernorm.weight", "decoder.layers.1.input_layernorm.weight",
         lambda t: t),
        ("model.layers.2.self_attn.kv_a_layernorm.weight",
         "decoder.layers.2.self_attention.kv_layernorm.weight", lambda t: t),
        ("model.layers.0.mlp.down_proj.weight", "decoder.layers.0.mlp.linear_fc2.weight",
         lambda t: t),
        ("model.layers.1.mlp.gate.weight", "decoder.layers.1.mlp.router.weight", lambda t: t),
        ("model.layers.2.mlp.experts.gate_up_proj", "decoder.layers.2.mlp.experts.weight1",
         lambda t: t.transpose(1, 2)),
        ("model.layers.2.mlp.experts.down_proj", "decoder.layers.2.mlp.experts.weight2",
         lambda t: t.transpose(1, 2)),
        ("model.layers.1.mlp.shared_experts.up_proj.weight",
         "decoder.layers.1.mlp.shared_experts.mlp.linear_fc1.weight", lambda t: t[fs:]),
        ("model.norm.weight", "decoder.final_layernorm.weight", lambda t: t),
    ]
    assert f < fs or converted["kwargs"]["n_shared_experts"] == 1
    for hname, mname, view in pairs:
        g_ref, g = hp[hname].grad, view(mp[mname].grad)
        assert g_ref.abs().sum() > 0, hname
        assert rel_err(g, g_ref) < 1e-4, (hname, rel_err(g, g_ref))


def test_back_to_hub_is_byte_identical(converted):
    root = converted["root"]
    convert("moecore", "hf", str(root / "m"), str(root / "back"), max_shard_size="40KB")
    assert_same_tensors(read_all(str(root / "back")), read_all(str(root / "hf")))
    for d in ("hf", "back"):  # both sharded with an index naming every tensor's file
        with open(root / d / INDEX_FILENAME) as f:
            weight_map = json.load(f)["weight_map"]
        assert sorted(weight_map) == sorted(SafetensorsReader(str(root / d)).keys())
        assert all(os.path.isfile(root / d / name) for name in set(weight_map.values()))
    with open(root / "hf" / "config.json") as f:
        orig = json.load(f)
    with open(root / "back" / "config.json") as f:
        back = json.load(f)
    assert back["bos_token_id"] == 5 and back["eos_token_id"] == 7
    assert back["architectures"] == ["DeepseekV3ForCausalLM"]
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(root / "back"), attn_implementation="eager").eval()
    ids, _ = ids_and_labels(V)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, converted["hf"](ids).logits)
    a = transformers.DeepseekV3Config.from_dict(orig).to_dict()
    b = transformers.DeepseekV3Config.from_dict(back).to_dict()
    # Every field the same, but for the MTP depth: the files hold none (transformers dropped it)
    assert {k: (v, b[k]) for k, v in a.items() if k in b and b[k] != v} == {
        "num_nextn_predict_layers": (1, 0)}


def test_bf16_weights_with_an_fp32_expert_bias_round_trip(converted, tmp_path):
    # As the hub stores DeepSeek-V3: bf16 weights, e_score_correction_bias in fp32.
    tensors = {k: t if k.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
               for k, t in read_all(str(converted["root"] / "hf")).items()}
    with open(converted["root"] / "hf" / "config.json") as f:
        cfg = json.load(f)
    write_hf_checkpoint(str(tmp_path / "hf"), cfg, tensors)
    convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"), target={"tp": 2})
    convert("moecore", "hf", str(tmp_path / "m"), str(tmp_path / "back"))
    assert_same_tensors(read_all(str(tmp_path / "back")), tensors)


# ---- multi-token prediction: a tensor round trip (transformers' model has no MTP) -------------
def _with_mtp(src: str, dst: str) -> dict[str, torch.Tensor]:
    """The hub checkpoint in ``src`` plus one random MTP depth under DeepSeek's hub names
    (``model.layers.{L}.*``; its embedding and head copies equal the model's), in ``dst``."""
    tensors = read_all(src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    g = torch.Generator().manual_seed(9)
    L, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    for name, t in list(tensors.items()):
        if name.startswith(f"model.layers.{L - 1}."):  # the MTP layer is of the last kind
            tensors[name.replace(f"layers.{L - 1}.", f"layers.{L}.")] = torch.randn(
                t.shape, generator=g)
    p = f"model.layers.{L}."
    tensors[p + "enorm.weight"] = torch.randn(h, generator=g)
    tensors[p + "hnorm.weight"] = torch.randn(h, generator=g)
    tensors[p + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g)
    tensors[p + "shared_head.norm.weight"] = torch.randn(h, generator=g)
    tensors[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    head = "model.embed_tokens.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"
    tensors[p + "shared_head.head.weight"] = tensors[head].clone()
    cfg["num_nextn_predict_layers"] = 1
    write_hf_checkpoint(dst, cfg, tensors)
    return tensors


def test_mtp_tensors_round_trip_through_a_resharded_checkpoint(converted, tmp_path):
    root = converted["root"]
    tensors = _with_mtp(str(root / "hf"), str(tmp_path / "hf_mtp"))
    res = convert("hf", "moecore", str(tmp_path / "hf_mtp"), str(tmp_path / "m1"))
    assert res.flags[res.flags.index("--mtp-num-layers") + 1] == "1"
    state = moecore_model(str(tmp_path / "m1")).state_dict()
    L = converted["kwargs"]["num_hidden_layers"]
    assert torch.equal(state["mtp.layers.0.eh_proj.weight"],
                       tensors[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(state["mtp.layers.0.final_layernorm.weight"],
                       tensors[f"model.layers.{L}.shared_head.norm.weight"])
    layout = {"tp": 2, "ep": 2, "pp": 2, "first": 1}  # 3 layers: stages of 1 and 2
    convert("hf", "moecore", str(tmp_path / "hf_mtp"), str(tmp_path / "p"), target=layout)
    convert("moecore", "hf", str(tmp_path / "p"), str(tmp_path / "back"), max_shard_size="40KB")
    assert_same_tensors(read_all(str(tmp_path / "back")), tensors)
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1


def test_transformers_saved_checkpoint_without_mtp_tensors_warns(converted, tmp_path, capsys):
    # transformers writes num_nextn_predict_layers=1 but no MTP tensors
    assert "--mtp-num-layers" not in converted["res"].flags
    convert("hf", "moecore", str(converted["root"] / "hf"), str(tmp_path / "m"))
    assert "announces 1 MTP layers but the files hold none" in capsys.readouterr().err


# ---- non-model fields after pretrain_gpt.py saved the checkpoint -------------------------------
def test_token_ids_survive_an_export_from_a_pretrain_checkpoint(tmp_path):
    model = hf_model(MOONLIGHT, seed=1)
    save_hub(model, str(tmp_path / "hf"))
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"))
    # A training run from the converted checkpoint that names the hub directory as its
    # tokenizer, as DeepSeek recipes do (--tokenizer-model DIR); its saved args have no HF
    # config of their own.
    load_with_pretrain(res.flags + ["--load", str(tmp_path / "m"), "--no-load-optim",
                                    "--no-load-rng", "--save", str(tmp_path / "trained"),
                                    "--tokenizer-model", str(tmp_path / "hf")], V, train=True)
    saved = torch.load(next((tmp_path / "trained").rglob("model_optim_rng.pt")),
                       weights_only=False)["args"]
    assert "hf_config" not in saved
    convert("moecore", "hf", str(tmp_path / "trained"), str(tmp_path / "back"))
    with open(tmp_path / "back" / "config.json") as f:
        back = json.load(f)
    assert (back["bos_token_id"], back["eos_token_id"]) == (5, 7)
    assert back["vocab_size"] == V
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert reloaded.config.first_k_dense_replace == 1


def test_true_vocab_size_from_the_tokenizer_directory(tmp_path):
    ns = args_from_flags(["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads",
                          "2", "--tokenizer-type", "HuggingFaceTokenizer",
                          "--tokenizer-model", str(tmp_path)])
    assert true_vocab_size_of(ns) is None
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"vocab_size": 129280, "bos_token_id": 0, "num_hidden_layers": 61}, f)
    assert true_vocab_size_of(ns) == 129280
    assert export_base_config(ns) == {"bos_token_id": 0}  # model fields are not taken


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"n_group": 4, "topk_group": 1}, "topk_group"),  # topk 4 != 2 * 1: HF and Megatron differ
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"rope_scaling": dict(YARN, beta_fast=1)}, "rope_scaling"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_refusals_name_the_field(tmp_path, change, field):
    model = hf_model(V3)
    save_hub(model, str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    cfg.update(change)
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=f"config.json field {field}="):
        convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"))
