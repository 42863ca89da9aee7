"""Checkpoint converter: Hugging Face Mixtral <-> moecore, and resharding across TP/PP/EP.

A tiny random Mixtral is written in Hugging Face's format (its parameter names, safetensors
sharded with an index); a plain-torch Mixtral forward in this file is the reference (and
``transformers.MixtralForCausalLM`` too when it is installed). Checks: logits of the converted
moecore model, loaded the way ``pretrain_gpt.py --load`` loads it; byte-identical tensors after
converting back; identical weights after TP=2/EP=2/PP=2 and back; the two pipeline stages run in
one process; the sharding table agrees with the model's own partition markers; refusals.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from moecore.convert import Layout, convert
from moecore.convert.hf_mixtral import hf_config_from_args
from moecore.convert.io import INDEX_FILENAME, SafetensorsReader, ShardedSafetensorsWriter
from moecore.convert.model_args import args_from_flags, expected_shard_state, target_args
from moecore.convert.reshard import (
    fake_parallel_state,
    merge_tensors,
    rule_for,
    shard_states,
    shard_tensor,
)

B, S = 2, 8
BASE_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 100,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 64, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "sliding_window": None, "attention_dropout": 0.0,
    "num_experts_per_tok": 2, "num_local_experts": 4, "router_aux_loss_coef": 0.02,
    "router_jitter_noise": 0.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "output_router_logits": False,
    "transformers_version": "4.46.0",
}


# ---- a tiny Hugging Face checkpoint --------------------------------------------------------------
def hf_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Mixtral weights under Hugging Face's names (fp32)."""
    g = torch.Generator().manual_seed(seed)
    h, f, e, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"],
                  cfg["vocab_size"])
    nh, ng = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    w = lambda *shape, std=0.2: torch.randn(*shape, generator=g) * std  # noqa: E731
    norm = lambda: 1.0 + 0.1 * torch.randn(h, generator=g)  # noqa: E731
    t = {"model.embed_tokens.weight": w(v, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "self_attn.q_proj.weight"] = w(nh * d, h)
        t[p + "self_attn.k_proj.weight"] = w(ng * d, h)
        t[p + "self_attn.v_proj.weight"] = w(ng * d, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * d)
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "block_sparse_moe.gate.weight"] = w(e, h, std=0.5)
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            t[q + "w1.weight"], t[q + "w2.weight"], t[q + "w3.weight"] = (
                w(f, h), w(h, f), w(f, h))
    t["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(v, h)
    return t


def _save_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:  # the converter's own writer (checked against safetensors elsewhere)
        directory = os.path.dirname(path)
        writer = ShardedSafetensorsWriter(
            directory, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 1 << 40)
        for n, t in tensors.items():
            writer.write(n, t)
        writer.close()
        os.replace(os.path.join(directory, "model.safetensors"), path)
        return
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_hf_checkpoint(directory: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """``config.json`` + two safetensors shards + ``model.safetensors.index.json``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        _save_safetensors(os.path.join(directory, fname), {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, INDEX_FILENAME), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def read_all(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors directory, read by the ``safetensors`` package when it is
    installed (an independent reader), else by the converter's."""
    try:
        from safetensors import safe_open
    except ImportError:
        r = SafetensorsReader(directory)
        return {k: r.get(k) for k in r.keys()}
    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(directory, fname), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ---- the reference Mixtral forward ---------------------------------------------------------------
def reference_logits(t: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Mixtral in plain torch (float64): RMSNorm, RoPE with rotate_half, GQA, causal softmax
    attention, softmax router with top-k weights renormalised to sum to 1, SwiGLU experts.
    ``ids [B, S]`` -> logits ``[B, S, V]``."""
    t = {k: v.double() for k, v in t.items()}
    h, nh, ng = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, topk = h // nh, cfg["rms_norm_eps"], cfg["num_experts_per_tok"]
    b, s = ids.shape
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    x = t["model.embed_tokens.weight"][ids]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms(x, t[p + "input_layernorm.weight"])
        q = (y @ t[p + "self_attn.q_proj.weight"].T).view(b, s, nh, d).transpose(1, 2)
        k = (y @ t[p + "self_attn.k_proj.weight"].T).view(b, s, ng, d).transpose(1, 2)
        v = (y @ t[p + "self_attn.v_proj.weight"].T).view(b, s, ng, d).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(causal, float("-inf"))
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * d)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        y = rms(x, t[p + "post_attention_layernorm.weight"])
        probs = (y @ t[p + "block_sparse_moe.gate.weight"].T).softmax(-1)
        top_w, top_i = probs.topk(topk, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(cfg["num_local_experts"]):
            q_ = f"{p}block_sparse_moe.experts.{e}."
            weight = (top_w * (top_i == e)).sum(-1, keepdim=True)
            act = F.silu(y @ t[q_ + "w1.weight"].T) * (y @ t[q_ + "w3.weight"].T)
            out = out + weight * (act @ t[q_ + "w2.weight"].T)
        x = x + out
    x = rms(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(3))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- loading converted checkpoints ---------------------------------------------------------------
RUN_FLAGS = ["--seq-length", str(S), "--micro-batch-size", "1", "--train-iters", "1",
             "--lr", "1e-4", "--mock-data", "--device", "cpu", "--num-workers", "0",
             "--eval-iters", "0"]


def load_with_pretrain(flags: list[str], vocab: int, train: bool = False):
    """Run ``pretrain_gpt.py``'s ``pretrain`` with the converter's printed flags (``--load``
    included) and return the model it built and loaded. Mock data's NullTokenizer has
    ``--vocab-size`` + 1 tokens (the EOD id), so ``vocab - 1`` is passed."""
    from moecore.training import pretrain
    from moecore.training.builders import default_model_provider

    built = []

    def provider(config, args, ps):
        built.append(default_model_provider(config, args, ps))
        return built[-1]

    run = ["--lr", "0", "--hidden-dropout", "0", "--attention-dropout", "0"] if train else \
        ["--skip-train"]
    pretrain(flags + RUN_FLAGS + run + ["--vocab-size", str(vocab - 1)], model_provider=provider,
             log=lambda *_: None)
    return built[0].eval()


def load_stage(save_dir: str, ps) -> list[torch.nn.Module]:
    """The model chunks of ``ps``'s shard file, built from the checkpoint's args as the trainer
    builds them (one chunk, or one per virtual pipeline stage) and loaded from the file."""
    from moecore.checkpointing import checkpoint_file, read_tracker
    from moecore.convert.model_args import args_from_dict, layout_of_args, transformer_config
    from moecore.convert.reshard import model_keys
    from moecore.models import GPTModel

    state = torch.load(checkpoint_file(save_dir, read_tracker(save_dir), ps), weights_only=True)
    ns = args_from_dict(state["args"])
    chunks = layout_of_args(ns).chunks(ns.num_layers)[ps.pp_rank]
    models = []
    for v, (key, (offset, n)) in enumerate(zip(model_keys(len(chunks)), chunks)):
        model = GPTModel(transformer_config(ns), vocab_size=ns.padded_vocab_size,
                         max_sequence_length=ns.max_position_embeddings,
                         pre_process=ps.is_pipeline_first_stage() and v == 0,
                         post_process=ps.is_pipeline_last_stage() and v == len(chunks) - 1,
                         share_embeddings_and_output_weights=(
                             not ns.untie_embeddings_and_output_weights),
                         parallel_state=ps, layer_offset=offset, num_layers=n)
        model.load_state_dict(state[key], strict=True)
        models.append(model.eval())
    return models


def pipeline_logits(save_dir: str, layout: Layout, ids: torch.Tensor) -> torch.Tensor:
    """Run every pipeline rank's chunks (TP = EP = 1) in one process, in the order the
    schedules run them: chunk 0 of every rank, then chunk 1, ...; each chunk's output is the
    next one's ``set_input_tensor``."""
    stages = [load_stage(save_dir, ps) for ps in shard_states(layout)]
    hidden = None
    with torch.no_grad():
        for v in range(layout.vp):
            for chunks in stages:
                if hidden is None:
                    hidden = chunks[v](ids)
                else:
                    chunks[v].set_input_tensor(hidden)
                    hidden = chunks[v](None)
    return hidden


def model_state(save_dir: str, layout: Layout) -> dict:
    from moecore.checkpointing import checkpoint_file, read_tracker

    it = read_tracker(save_dir)
    return {ps.rank: torch.load(checkpoint_file(save_dir, it, ps), weights_only=True)["model"]
            for ps in shard_states(layout)}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(-1).view(torch.uint8).equal(
            b[k].contiguous().view(-1).view(torch.uint8)), f"{k} differs"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cfg = dict(BASE_CONFIG)
    tensors = hf_tensors(cfg)
    write_hf_checkpoint(str(root / "hf"), cfg, tensors)
    ids = token_ids(cfg["vocab_size"])
    return {"root": root, "dir": str(root / "hf"), "cfg": cfg, "tensors": tensors, "ids": ids,
            "ref": reference_logits(tensors, cfg, ids)}


# ---- tests ---------------------------------------------------------------------------------------
def test_hf_in_logits_match_reference_and_back_is_byte_identical(mixtral, capsys):
    root, cfg = mixtral["root"], mixtral["cfg"]
    res = convert("hf", "moecore", mixtral["dir"], str(root / "m1"))
    assert res.padded_vocab_size == cfg["vocab_size"]  # auto padding: none needed at TP=1
    assert "--moe-grouped-gemm" in res.flags and "--rotary-base" in res.flags
    assert res.flags[res.flags.index("--rotary-base") + 1] == "1000000"
    log = capsys.readouterr().err
    assert all(f"layer {i + 1}/4" in log for i in range(4))
    model = load_with_pretrain(res.flags + ["--load", str(root / "m1"), "--no-load-optim",
                                            "--no-load-rng", "--save", str(root / "trained")],
                               cfg["vocab_size"], train=True)
    with torch.no_grad():
        logits = model(mixtral["ids"])
    assert logits.dtype == torch.float32
    assert rel_err(logits, mixtral["ref"]) < 1e-5
    assert (logits.double() - mixtral["ref"]).abs().max() < 1e-5 * mixtral["ref"].abs().max()

    convert("moecore", "hf", str(root / "m1"), str(root / "hf_back"))
    assert_same_tensors(read_all(str(root / "hf_back")), mixtral["tensors"])
    # The trainer's own checkpoint (one step at lr 0, optimizer state included) reads back too.
    convert("moecore", "hf", str(root / "trained"), str(root / "hf_trained"))
    assert_same_tensors(read_all(str(root / "hf_trained")), mixtral["tensors"])
    with open(root / "hf_back" / "config.json") as f:
        back = json.load(f)
    assert back == cfg  # every field, token ids included, survives the round trip


def test_transformers_mixtral_matches(mixtral):
    transformers = pytest.importorskip("transformers")
    root = mixtral["root"]
    if not (root / "hf_back").exists():
        convert("hf", "moecore", mixtral["dir"], str(root / "m_tf"))
        convert("moecore", "hf", str(root / "m_tf"), str(root / "hf_back"))
    for directory in (mixtral["dir"], str(root / "hf_back")):
        model = transformers.MixtralForCausalLM.from_pretrained(directory,
                                                                torch_dtype=torch.float32)
        with torch.no_grad():
            logits = model(mixtral["ids"]).logits
        assert rel_err(logits, mixtral["ref"]) < 1e-5, directory


def test_reshard_tp2_ep2_pp2_and_back_identical(mixtral):
    root = mixtral["root"]
    direct = root / "d1"
    convert("hf", "moecore", mixtral["dir"], str(direct))
    par = Layout(tp=2, pp=2, ep=2)
    convert("hf", "moecore", mixtral["dir"], str(root / "p222"), target=par)
    states = model_state(str(root / "p222"), par)
    assert len(states) == 8  # one file per (tp, pp, ep) shard
    convert("moecore", "moecore", str(root / "p222"), str(root / "p222_to_1"),
            target={"tp": 1, "pp": 1, "ep": 1})
    assert_same_tensors(model_state(str(root / "p222_to_1"), Layout())[0],
                        model_state(str(direct), Layout())[0])
    convert("moecore", "hf", str(root / "p222"), str(root / "p222_hf"), max_shard_size="40KB")
    files = sorted(os.listdir(root / "p222_hf"))
    assert INDEX_FILENAME in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert_same_tensors(read_all(str(root / "p222_hf")), mixtral["tensors"])


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(pp=2, vp=2), Layout(pp=3, first=2)],
                         ids=["pp2", "pp2_vp2", "pp3_uneven"])
def test_pipeline_stages_in_one_process(mixtral, layout, tmp_path):
    """Pipeline layouts (even, interleaved with two chunks per rank, uneven stages) with
    SequentialMLP experts: the chunks run in one process (TP/EP > 1 need process groups to run;
    those logits are checked on 4 ranks in tests/parallel/test_convert_parallel.py), then back to
    byte-identical Hugging Face tensors."""
    out = str(tmp_path / "pp")
    res = convert("hf", "moecore", mixtral["dir"], out, target=layout, grouped_gemm=False)
    assert "--moe-grouped-gemm" not in res.flags
    flag = res.flags.index("--pipeline-model-parallel-size")
    assert res.flags[flag + 1] == str(layout.pp)
    state = load_stage(out, shard_states(layout)[0])[0].state_dict()
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in state
    assert rel_err(pipeline_logits(out, layout, mixtral["ids"]), mixtral["ref"]) < 1e-5
    convert("moecore", "hf", out, str(tmp_path / "hf"), dtype="fp32")
    assert_same_tensors(read_all(str(tmp_path / "hf")), mixtral["tensors"])


def test_sequential_experts_tp2_ep2_pp2_back_to_hf(mixtral, tmp_path):
    seq = Layout(tp=2, ep=2, pp=2)
    convert("hf", "moecore", mixtral["dir"], str(tmp_path / "seq"), target=seq,
            grouped_gemm=False)
    convert("moecore", "moecore", str(tmp_path / "seq"), str(tmp_path / "grouped"),
            target={"tp": 1, "ep": 2, "pp": 1}, grouped_gemm=True)
    convert("moecore", "hf", str(tmp_path / "grouped"), str(tmp_path / "hf"))
    assert_same_tensors(read_all(str(tmp_path / "hf")), mixtral["tensors"])


def test_padded_vocab_tied_embeddings_and_bf16(tmp_path):
    cfg = dict(BASE_CONFIG, tie_word_embeddings=True, vocab_size=99)
    tensors = hf_tensors(cfg, seed=1)
    write_hf_checkpoint(str(tmp_path / "hf"), cfg, tensors)
    ids = token_ids(99)
    ref = reference_logits(tensors, cfg, ids)
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "m"),
                  make_vocab_size_divisible_by=8)
    assert res.padded_vocab_size == 104 and "--untie-embeddings-and-output-weights" not in \
        res.flags
    model = load_with_pretrain(res.flags + ["--load", str(tmp_path / "m")], 99)
    with torch.no_grad():
        logits = model(ids)
    assert rel_err(logits[..., :99], ref) < 1e-5
    assert logits[..., 99:].abs().max() == 0  # zero padding rows
    lay = Layout(pp=2)
    convert("moecore", "moecore", str(tmp_path / "m"), str(tmp_path / "pp"), target=lay)
    last = model_state(str(tmp_path / "pp"), lay)[1]
    first = model_state(str(tmp_path / "pp"), lay)[0]
    assert last["output_layer.weight"].equal(first["embedding.word_embeddings.weight"])
    convert("moecore", "hf", str(tmp_path / "pp"), str(tmp_path / "back"))
    assert_same_tensors(read_all(str(tmp_path / "back")), tensors)
    convert("moecore", "moecore", str(tmp_path / "m"), str(tmp_path / "bf"), dtype="bf16")
    bf = model_state(str(tmp_path / "bf"), Layout())[0]
    assert all(v.dtype == torch.bfloat16 for v in bf.values())
    convert("moecore", "hf", str(tmp_path / "bf"), str(tmp_path / "bf_hf"))
    got = read_all(str(tmp_path / "bf_hf"))
    assert_same_tensors(got, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    with open(tmp_path / "bf_hf" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


MODELS = {
    "mixtral": ["--group-query-attention", "--num-query-groups", "2", "--swiglu",
                "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "48",
                "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                "--untie-embeddings-and-output-weights"],
    # MoE and dense layers, a shared expert, QK LayerNorm with biases, qkv bias, learned
    # positions, tied embeddings.
    "mixed": ["--swiglu", "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm",
              "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "[1,0]",
              "--moe-shared-expert-intermediate-size", "32", "--normalization", "LayerNorm",
              "--position-embedding-type", "learned_absolute", "--max-position-embeddings",
              "16"],
    # Dense GELU MLP with every linear bias.
    "dense": ["--normalization", "LayerNorm", "--position-embedding-type", "rope",
              "--untie-embeddings-and-output-weights"],
}


def _tiny_args(grouped: bool, layout: Layout, model: str = "mixtral"):
    ns = args_from_flags(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
                          "4", "--ffn-hidden-size", "48", "--init-method-std", "0.1"]
                         + MODELS[model])
    return target_args(ns, layout, 100, torch.float32, grouped_gemm=grouped)


def _seeded_model(ns, ps):
    from moecore.convert.model_args import transformer_config
    from moecore.models import GPTModel

    torch.manual_seed(11)
    return GPTModel(transformer_config(ns), vocab_size=ns.padded_vocab_size,
                    max_sequence_length=16, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(), parallel_state=ps,
                    share_embeddings_and_output_weights=not ns.untie_embeddings_and_output_weights,
                    position_embedding_type=ns.position_embedding_type)


@pytest.mark.parametrize("layout", [Layout(tp=2, ep=2), Layout(tp=2, ep=4, etp=1, pp=2),
                                    Layout(tp=1, ep=2, etp=2)])
@pytest.mark.parametrize("model,grouped", [("mixtral", True), ("mixtral", False),
                                           ("mixed", True), ("dense", False)])
def test_sharding_table_matches_the_models_own_shards(layout, model, grouped):
    """moecore draws every weight as its full tensor and keeps its rank's shard, so a model built
    for any TP/EP rank from one seed holds exactly the shard of the TP=EP=1 model of the same
    pipeline stage: the table's shards must equal it, merging must rebuild that model, and every
    rule must agree with the partition markers the model sets on its parameters."""
    ns = _tiny_args(grouped, layout, model)
    stage_ns = _tiny_args(grouped, Layout(pp=layout.pp), model)
    gated = bool(ns.swiglu)
    stage_states = shard_states(Layout(pp=layout.pp))
    by_stage: dict[int, list] = {}
    for ps in shard_states(layout):
        net = _seeded_model(ns, ps)
        sd = net.state_dict()
        assert expected_shard_state(ns, ps)["model"].keys() == sd.keys()
        whole = _seeded_model(stage_ns, stage_states[ps.pp_rank]).state_dict()
        held = dict(filter(None, (shard_tensor(k, t, ps, gated=gated, num_experts=4)
                                  for k, t in whole.items())))
        assert held.keys() == sd.keys(), ps.rank
        for k in sd:
            assert torch.equal(held[k], sd[k]), (ps.rank, k)
        for name, p in net.named_parameters():
            rule, _ = rule_for(name)
            split_dim = rule.tp_dim if rule.tp_dim is not None else rule.etp_dim
            if getattr(p, "tensor_model_parallel", False):
                assert split_dim == p.partition_dim % p.dim(), name
                assert (2 if rule.glu and gated else 1) == getattr(p, "partition_stride", 1), name
            else:
                assert split_dim is None, name
        by_stage.setdefault(ps.pp_rank, [whole]).append((ps, sd))
    for whole, *shards in by_stage.values():
        merged = merge_tensors(shards, gated=gated, num_experts=4)
        assert merged.keys() == whole.keys()
        assert all(torch.equal(merged[k], whole[k]) for k in whole)


def test_refusals_name_the_field(tmp_path):
    for field, value in [("sliding_window", 4096), ("hidden_act", "gelu"),
                         ("rope_scaling", {"type": "linear", "factor": 2.0}),
                         ("attention_bias", True), ("model_type", "mistral"),
                         ("rope_theta", 10000.5), ("layer_types", ["sliding_attention"])]:
        d = tmp_path / field
        cfg = dict(BASE_CONFIG, num_hidden_layers=1, **{field: value})
        write_hf_checkpoint(str(d), cfg, hf_tensors(cfg))
        with pytest.raises(ValueError, match=field):
            convert("hf", "moecore", str(d), str(tmp_path / "out"))
    cfg = dict(BASE_CONFIG, num_hidden_layers=1)
    for change, match in [("drop", "missing from"), ("extra", "not part of"),
                          ("shape", "config.json implies")]:
        tensors = hf_tensors(cfg)
        if change == "drop":
            del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
        elif change == "extra":
            tensors["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)
        else:
            tensors["model.norm.weight"] = torch.ones(31)
        write_hf_checkpoint(str(tmp_path / change), cfg, tensors)
        with pytest.raises(ValueError, match=match):
            convert("hf", "moecore", str(tmp_path / change), str(tmp_path / "out"))
        assert not os.path.exists(tmp_path / "out")  # refused before anything is written
    ns = args_from_flags(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
                          "4", "--swiglu", "--num-experts", "4", "--normalization",
                          "LayerNorm", "--position-embedding-type", "rope"])
    with pytest.raises(ValueError, match="--normalization"):
        hf_config_from_args(ns, 100, torch.float32)
    d = tmp_path / "ok"
    cfg = dict(BASE_CONFIG, num_hidden_layers=1)
    write_hf_checkpoint(str(d), cfg, hf_tensors(cfg))
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible"):
        convert("hf", "moecore", str(d), str(tmp_path / "bad"), target={"tp": 4})
    with pytest.raises(ValueError, match="num_moe_experts=4 is not divisible"):
        convert("hf", "moecore", str(d), str(tmp_path / "bad"), target={"ep": 3})


def test_cli_prints_pretrain_flags(mixtral, tmp_path, capsys):
    from tools.checkpoint.convert import main

    out = str(tmp_path / "cli")
    assert main(["--loader", "hf", "--saver", "moecore", "--load-dir", mixtral["dir"],
                 "--save-dir", out, "--target-expert-parallel-size", "2",
                 "--dtype", "fp32"]) == 0
    flags = capsys.readouterr().out.split()
    assert flags[-4:] == ["--load", out, "--no-load-optim", "--no-load-rng"]
    assert flags[flags.index("--expert-model-parallel-size") + 1] == "2"
    assert flags[flags.index("--num-query-groups") + 1] == "2"
    from moecore.arguments import parse_args

    args = parse_args(flags + RUN_FLAGS + ["--vocab-size", "99"], world_size=2)
    assert (args.num_layers, args.num_experts, args.rotary_base) == (4, 4, 1000000)
    assert main(["--loader", "hf", "--saver", "moecore", "--load-dir", str(tmp_path / "none"),
                 "--save-dir", out]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_safetensors_writer_reader_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.zeros(0, 4)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(str(tmp_path), plan, max_shard_bytes=60)
    for n, t in tensors.items():
        w.write(n, t)
    names = w.close()
    assert len(names) > 1 and os.path.isfile(tmp_path / INDEX_FILENAME)
    assert_same_tensors(read_all(str(tmp_path)), tensors)
    r = SafetensorsReader(str(tmp_path))
    assert_same_tensors({k: r.get(k) for k in r.keys()}, tensors)
    w = ShardedSafetensorsWriter(str(tmp_path), plan, 1 << 20)  # again, as one file
    with pytest.raises(ValueError, match="plan expects 'a'"):
        w.write("b", tensors["b"])
    for n, t in tensors.items():
        w.write(n, t)
    assert w.close() == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # the old shards are gone
    assert_same_tensors(read_all(str(tmp_path)), tensors)


def test_fake_states_cover_every_shard():
    """The smallest world of a layout holds every distinct shard; larger ones add replicas."""
    from moecore.parallel_state import ParallelSizes

    lay = Layout(tp=2, ep=2, etp=1, pp=2)
    keys = {(ps.tp_rank, ps.pp_rank, ps.ep_rank, ps.etp_rank) for ps in shard_states(lay)}
    big = ParallelSizes(world_size=3 * lay.sizes().world_size, tp=2, pp=2, ep=2, etp=1)
    every = {(p.tp_rank, p.pp_rank, p.ep_rank, p.etp_rank)
             for p in (fake_parallel_state(big, r) for r in range(big.world_size))}
    assert keys == every and len(keys) == 4
