"""Checkpoint converter: Hugging Face Qwen3-MoE and Qwen2-MoE <-> moecore.

Tiny random ``transformers`` models (configs in this file, no downloads) are saved as the hub
stores them (sharded safetensors + index) and converted. Checks, fp32: logits and the gradients
of parameters of each kind match transformers' (Qwen3: per-head QK RMSNorm, head_dim != H / nh,
a dense layer from ``mlp_only_layers``, ``norm_topk_prob`` on and off; Qwen2: q/k/v biases, the
sigmoid-gated shared expert, dense layers from ``decoder_sparse_step``); converting back gives
byte-identical tensors and a config transformers loads to the same model; refusals.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from moecore.convert import convert, hf_qwen_moe
from moecore.convert.hf_base import copy_tokenizer_files
from moecore.convert.hf_qwen_moe import args_from_hf_config, family_of, is_qwen_model
from moecore.convert.io import INDEX_FILENAME, SafetensorsReader
from tests.convert_harness import (
    global_grads,
    hub_grads,
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
from tools.checkpoint.convert import main as cli_main

transformers = pytest.importorskip("transformers")

V = 96
# Qwen3-30B-A3B-shaped (GQA, head_dim 2x H/nh, top-k of many experts), scaled down.
QWEN3 = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0],
             decoder_sparse_step=1, max_position_embeddings=64, rope_theta=1000000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=5, eos_token_id=7)
QWEN3_NO_NORM = dict(QWEN3, norm_topk_prob=False, mlp_only_layers=[], tie_word_embeddings=True)
# Qwen1.5-MoE-A2.7B-shaped: q/k/v biases, a gated shared expert, no renormalisation.
QWEN2 = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
             decoder_sparse_step=2, max_position_embeddings=64, rope_theta=1000000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=5, eos_token_id=7)
CASES = {"qwen3": ("Qwen3Moe", QWEN3), "qwen3_no_norm": ("Qwen3Moe", QWEN3_NO_NORM),
         "qwen2": ("Qwen2Moe", QWEN2)}


def hf_model(case: str, seed: int = 0):
    """A random fp32 ``<family>ForCausalLM`` whose weights are large enough to route and attend
    unevenly (transformers' init is tiny)."""
    family, kwargs = CASES[case]
    return random_hf_model(family, kwargs, seed)[0]


def hf_grads_as_global(model, names) -> dict[str, torch.Tensor]:
    """transformers' gradients as moecore global tensors (the converter's own mapping)."""
    cfg = model.config.to_dict()
    return global_grads(hub_grads(model, cfg["moe_intermediate_size"]), cfg, hf_qwen_moe, names)


def checked_names(case: str) -> list[str]:
    """A parameter of each kind the case has."""
    a, m = "decoder.layers.1.self_attention.", "decoder.layers.1.mlp."
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
             a + "linear_qkv.weight", a + "linear_proj.weight",
             "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight",
             m + "router.weight", m + "experts.weight1", m + "experts.weight2"]
    if not CASES[case][1]["tie_word_embeddings"]:
        names.append("output_layer.weight")
    if case.startswith("qwen3"):
        names += [a + "q_layernorm.weight", a + "k_layernorm.weight"]
    else:
        names += [a + "linear_qkv.bias", m + "shared_experts.mlp.linear_fc1.weight",
                  m + "shared_experts.mlp.linear_fc2.weight", m + "shared_experts.gate_weight"]
    if case == "qwen3":
        names.append("decoder.layers.0.mlp.linear_fc1.weight")  # the dense layer
    if case == "qwen2":
        names.append("decoder.layers.2.mlp.linear_fc2.weight")
    return names


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param)
    save_hub(model, str(root / "hf"))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # stand-ins, copied byte for byte
        (root / "hf" / name).write_text(json.dumps({"file": name, "case": request.param}))
    res = convert("hf", "moecore", str(root / "hf"), str(root / "m"))
    return {"case": request.param, "root": root, "hf": model, "res": res,
            "moecore": moecore_model(str(root / "m"))}


def test_flags_follow_the_config(converted):
    flags, (family, kw) = converted["res"].flags, CASES[converted["case"]]
    value = lambda f: flags[flags.index(f) + 1]  # noqa: E731
    assert ("--moe-router-pre-softmax" in flags) == (not kw["norm_topk_prob"])
    assert ("--qk-layernorm" in flags) == (family == "Qwen3Moe")
    assert ("--moe-shared-expert-gate" in flags) == ("--add-qkv-bias" in flags) \
        == (family == "Qwen2Moe")
    expected = {"qwen3": "[0,1,1]", "qwen3_no_norm": "[1,1,1]", "qwen2": "[0,1,0,1]"}
    assert value("--moe-layer-freq") == expected[converted["case"]]
    if family == "Qwen3Moe":
        assert value("--kv-channels") == "16" and value("--num-query-groups") == "2"
    else:
        assert value("--moe-shared-expert-intermediate-size") == "24"


def test_logits_and_grads_match_transformers(converted):
    hf, ours = converted["hf"], converted["moecore"]
    ref, logits = logits_then_backward(hf, ours, *ids_and_labels(V), V)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-4
    names = checked_names(converted["case"])
    expected = hf_grads_as_global(hf, names)
    params = dict(ours.named_parameters())
    for name in names:
        assert expected[name].abs().sum() > 0, name
        assert rel_err(params[name].grad, expected[name]) < 1e-4, (name, rel_err(
            params[name].grad, expected[name]))


def test_back_to_hub_is_byte_identical(converted, tmp_path):
    root = converted["root"]
    # Through a TP=2 x EP=2 x PP=... resharded checkpoint and back.
    convert("moecore", "moecore", str(root / "m"), str(tmp_path / "p"),
            target={"tp": 2, "ep": 2})
    convert("moecore", "hf", str(tmp_path / "p"), str(tmp_path / "back"),
            max_shard_size="40KB")
    back = tmp_path / "back"
    assert_same_tensors(read_all(str(back)), read_all(str(root / "hf")))
    with open(back / INDEX_FILENAME) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == sorted(SafetensorsReader(str(back)).keys())
    assert all(os.path.isfile(back / name) for name in set(weight_map.values()))
    family, _ = CASES[converted["case"]]
    with open(back / "config.json") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [family + "ForCausalLM"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (5, 7)
    with open(root / "hf" / "config.json") as f:
        orig = json.load(f)
    assert {k: (v, cfg.get(k)) for k, v in orig.items() if cfg.get(k) != v} == {}
    assert set(cfg) - set(orig) <= {"head_dim"}  # written even where it is hidden / heads
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (root / "hf" / name).read_bytes(), name
    cls = getattr(transformers, family + "ForCausalLM")
    reloaded = cls.from_pretrained(str(back), attn_implementation="eager").eval()
    ids, _ = ids_and_labels(V)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, converted["hf"](ids).logits)


def test_hub_config_spelling_round_trips(converted, tmp_path):
    # The hub's configs predate transformers 5: "num_experts", "rope_theta", "torch_dtype".
    root = converted["root"]
    with open(root / "hf" / "config.json") as f:
        cfg = json.load(f)
    cfg["num_experts"] = cfg.pop("num_local_experts", cfg.get("num_experts"))
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"], cfg["torch_dtype"] = None, cfg.pop("dtype")
    tensors = read_all(str(root / "hf"))
    write_hf_checkpoint(str(tmp_path / "hf"), cfg, tensors)
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"))
    assert res.flags == converted["res"].flags
    convert("moecore", "hf", str(tmp_path / "m"), str(tmp_path / "back"))
    assert_same_tensors(read_all(str(tmp_path / "back")), tensors)
    with open(tmp_path / "back" / "config.json") as f:
        back = json.load(f)
    assert {k: back[k] for k in cfg if back[k] != cfg[k]} == {}
    assert "num_local_experts" not in back and "rope_parameters" not in back


def test_export_of_a_checkpoint_pretrain_saved(converted, tmp_path):
    # pretrain_gpt.py's checkpoint keeps no Hugging Face config: the model's features pick the
    # family, the --tokenizer-model directory gives the token ids and tokenizer files. At lr 0
    # the weights are the original's.
    root, (family, _) = converted["root"], CASES[converted["case"]]
    load_with_pretrain(converted["res"].flags + [
        "--load", str(root / "m"), "--no-load-optim", "--no-load-rng",
        "--save", str(tmp_path / "trained"), "--tokenizer-model", str(root / "hf")], V,
        train=True)
    saved = torch.load(next((tmp_path / "trained").rglob("model_optim_rng.pt")),
                       weights_only=False)["args"]
    assert "hf_config" not in saved
    ns = args_from_hf_config(converted["hf"].config.to_dict())
    ns.hf_config = None
    assert is_qwen_model(ns) and family_of(ns) == family.lower().replace("moe", "_moe")
    convert("moecore", "hf", str(tmp_path / "trained"), str(tmp_path / "back"))
    assert_same_tensors(read_all(str(tmp_path / "back")), read_all(str(root / "hf")))
    with open(tmp_path / "back" / "config.json") as f:
        back = json.load(f)
    assert back["architectures"] == [family + "ForCausalLM"]
    assert (back["bos_token_id"], back["eos_token_id"], back["vocab_size"]) == (5, 7, V)
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    cls = getattr(transformers, family + "ForCausalLM")
    reloaded = cls.from_pretrained(str(tmp_path / "back"), attn_implementation="eager").eval()
    ids, _ = ids_and_labels(V)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, converted["hf"](ids).logits)


def test_tokenizer_files_come_from_the_first_source_holding_any(tmp_path):
    empty, tok, out = tmp_path / "empty", tmp_path / "tok", tmp_path / "out"
    for d in (empty, tok, out):
        d.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "merges.txt").write_text("a b")
    (tok / "model.safetensors").write_text("")  # not a tokenizer file
    (out / "merges.txt").write_text("kept")
    assert copy_tokenizer_files([None, str(empty), str(tok)], str(out)) == ["tokenizer.json"]
    assert sorted(os.listdir(out)) == ["merges.txt", "tokenizer.json"]
    assert (out / "merges.txt").read_text() == "kept"


def test_cli_bf16_through_pp2_ep2_and_back(tmp_path, capsys):
    save_hub(hf_model("qwen2", seed=1), str(tmp_path / "hf"))
    (tmp_path / "hf" / "merges.txt").write_text("q w")
    cli = ["--dtype", "bf16", "--load-dir"]
    assert cli_main(["--loader", "hf", "--saver", "moecore", *cli, str(tmp_path / "hf"),
                     "--save-dir", str(tmp_path / "m"), "--target-pipeline-parallel-size", "2",
                     "--target-expert-parallel-size", "2"]) == 0
    flags = capsys.readouterr().out.split()
    assert "--bf16" in flags and flags[flags.index("--pipeline-model-parallel-size") + 1] == "2"
    assert cli_main(["--loader", "moecore", "--saver", "hf", "--load-dir", str(tmp_path / "m"),
                     "--save-dir", str(tmp_path / "back")]) == 0
    expected = {k: t.to(torch.bfloat16) for k, t in read_all(str(tmp_path / "hf")).items()}
    assert_same_tensors(read_all(str(tmp_path / "back")), expected)
    assert (tmp_path / "back" / "merges.txt").read_text() == "q w"


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case, change, field", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_refusals_name_the_field(tmp_path, case, change, field):
    save_hub(hf_model(case), str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=f"config.json field {field}="):
        convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"))
