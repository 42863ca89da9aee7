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

import io

import torch
import torch.distributed as dist

from moecore.convert import convert
from moecore.convert.hf_gpt_oss import args_from_hf_config, global_from_hf_layer
from moecore.convert.reshard import shard_tensor
from tests.dist_harness import run_distributed
from tests.unit.test_convert import load_with_pretrain
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _global_grads(model, cfg: dict) -> dict[str, torch.Tensor]:
    """transformers' gradients as moecore global tensors (the converter's mapping)."""
    hub = {name: p.grad for name, p in model.named_parameters()}
    ns = args_from_hf_config(cfg)
    out = {"embedding.word_embeddings.weight": hub["model.embed_tokens.weight"],
           "output_layer.weight": hub["lm_head.weight"],
           "decoder.final_layernorm.weight": hub["model.norm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        out.update(global_from_hf_layer(i, hub.__getitem__, ns))
    return {k: out[k] for k in CHECKED}


def _worker(rank, world_size, flags, ids, labels, ref, grads):
    model = load_with_pretrain(flags, V)
    ps = model.ps
    logits = model(ids)  # [B, S, V/tp]
    parts = [torch.empty_like(logits) for _ in range(ps.tp_size)]
    dist.all_gather(parts, logits.detach().contiguous(), group=ps.tp_group)
    errors = {"logits": _rel(torch.cat(parts, dim=-1), ref)}
    model(ids, labels=labels).mean().backward()
    params = dict(model.named_parameters())
    for name, global_grad in grads.items():
        p = params[name]
        g = (p.grad if p.grad is not None else p.main_grad).clone()
        if getattr(p, "sequence_parallel", False):  # partial over TP under SP (trainer sums)
            dist.all_reduce(g, group=ps.tp_group)
        local, expected = shard_tensor(name, global_grad, ps, gated=True,
                                       num_experts=GPT_OSS["num_local_experts"])
        if ".experts." in name:
            # Every data-parallel replica runs the same batch; the trainer sums expert grads
            # over the expert-data-parallel group.
            dist.all_reduce(g, group=ps.group("expert_data_parallel"))
            expected = expected * ps.dp_size
        errors[name] = _rel(g, expected)
    return errors


def test_gpt_oss_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path):
    hf = hf_model()
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)
    ref = hf(ids).logits
    torch.nn.functional.cross_entropy(ref.reshape(-1, V), labels.reshape(-1)).backward()
    grads = _global_grads(hf, hf.config.to_dict() | {"rope_parameters":
                                                     GPT_OSS["rope_parameters"]})
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "tp2ep2"),
                  target={"tp": 2, "ep": 2, "etp": 1}, log=io.StringIO())
    assert "--sequence-parallel" in res.flags
    flags = res.flags + ["--load", str(tmp_path / "tp2ep2"), "--no-load-optim",
                         "--no-load-rng"]
    per_rank = run_distributed(_worker, 4, flags, ids, labels, ref.detach(), grads, timeout=300)
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
           if not e < 1e-4]
    assert not bad, bad
    assert all(len(errs) == len(CHECKED) + 1 for errs in per_rank)
