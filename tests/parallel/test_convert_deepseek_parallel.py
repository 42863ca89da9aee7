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

import io

import torch
import torch.distributed as dist

from moecore.convert import convert
from moecore.convert.hf_deepseek_v3 import args_from_hf_config, global_from_hf_layer
from moecore.convert.reshard import shard_tensor
from tests.dist_harness import run_distributed
from tests.unit.test_convert import load_with_pretrain
from tests.unit.test_convert_deepseek import V3, V, hf_model, ids_and_labels, save_hub

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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _global_grads(model, cfg: dict) -> dict[str, torch.Tensor]:
    """transformers' gradients as moecore global tensors (the converter's mapping)."""
    hub: dict[str, torch.Tensor] = {}
    f = cfg["moe_intermediate_size"]
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):  # fused [E, 2F, H]: gate rows, then up
            prefix = name[:-len("gate_up_proj")]
            for e in range(p.shape[0]):
                hub[f"{prefix}{e}.gate_proj.weight"] = p.grad[e, :f]
                hub[f"{prefix}{e}.up_proj.weight"] = p.grad[e, f:]
        elif name.endswith("experts.down_proj"):
            prefix = name[:-len("down_proj")]
            for e in range(p.shape[0]):
                hub[f"{prefix}{e}.down_proj.weight"] = p.grad[e]
        else:
            hub[name] = p.grad
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            hub[name] = torch.zeros_like(b)
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
        g = p.grad if p.grad is not None else p.main_grad
        if getattr(p, "sequence_parallel", False):  # partial over TP under SP (trainer sums)
            g = g.clone()
            dist.all_reduce(g, group=ps.tp_group)
        local, expected = shard_tensor(name, global_grad, ps, gated=True,
                                       num_experts=V3["n_routed_experts"])
        if ".experts." in name:
            # Both data-parallel replicas route the same batch to this rank's experts (expert
            # DP = 1): their gradient holds both replicas' contributions.
            expected = expected * ps.dp_size
        errors[name] = _rel(g, expected)
    return errors


def test_deepseek_v3_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path):
    hf = hf_model(V3)
    save_hub(hf, str(tmp_path / "hf"))
    ids, labels = ids_and_labels()
    ref = hf(ids).logits
    torch.nn.functional.cross_entropy(ref.reshape(-1, V), labels.reshape(-1)).backward()
    grads = _global_grads(hf, hf.config.to_dict() | {"rope_scaling": V3["rope_scaling"]})
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "tp2ep2"),
                  target={"tp": 2, "ep": 2}, log=io.StringIO())
    assert "--sequence-parallel" in res.flags
    flags = res.flags + ["--load", str(tmp_path / "tp2ep2"), "--no-load-optim",
                         "--no-load-rng"]
    per_rank = run_distributed(_worker, 4, flags, ids, labels, ref.detach(), grads, timeout=300)
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
           if not e < 1e-4]
    assert not bad, bad
    assert all(len(errs) == len(CHECKED) + 1 for errs in per_rank)
