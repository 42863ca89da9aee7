"""OLMoE under tensor parallelism on gloo.

* The QK norm over the whole projection (:class:`ProjectionRMSNorm`) at TP=2 gives TP=1's
  output, input gradient and weight gradient (each rank's slice): the sum of squares is
  all-reduced over TP in both directions.
* The tiny random ``OlmoeForCausalLM`` of ``tests/unit/test_convert_olmoe.py`` converted to
  TP=2 x EP=2 (sequence parallel) and run through ``pretrain`` with the converter's flags on 4
  ranks gives transformers' logits and, after one backward, each rank's gradient shards.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

from moecore.convert import convert
from moecore.convert.hf_olmoe import args_from_hf_config, global_from_hf_layer
from moecore.convert.reshard import shard_tensor
from moecore.parallel_state import destroy_model_parallel, initialize_model_parallel
from moecore.transformer.projection_norm import ProjectionRMSNorm
from tests.dist_harness import run_distributed
from tests.unit.test_convert import load_with_pretrain
from tests.unit.test_convert_olmoe import OLMOE, V, hf_model, ids_and_labels, save_hub

CHECKED = (  # a parameter of each kind: split over TP (rows, columns, the projection norms),
    # replicated (SP-partial), router, experts
    "embedding.word_embeddings.weight", "output_layer.weight",
    "decoder.layers.1.self_attention.linear_qkv.weight",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.self_attention.q_proj_layernorm.weight",
    "decoder.layers.0.self_attention.k_proj_layernorm.weight",
    "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.mlp.router.weight",
    "decoder.layers.1.mlp.experts.weight1", "decoder.layers.0.mlp.experts.weight2",
    "decoder.final_layernorm.weight",
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _norm_worker(rank, world_size):
    heads, d = 4, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, heads, d, generator=g)
    w = 1.0 + 0.1 * torch.randn(heads * d, generator=g)
    dy = torch.randn(5, 2, heads, d, generator=g)
    ref = ProjectionRMSNorm(heads, d, 1e-5, torch.float32, 1, None)
    with torch.no_grad():
        ref.weight.copy_(w)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * dy).sum().backward()
    ps = initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        hl = heads // world_size
        cut = slice(rank * hl, (rank + 1) * hl)
        norm = ProjectionRMSNorm(heads, d, 1e-5, torch.float32, world_size, ps.tp_group)
        with torch.no_grad():
            norm.weight.copy_(w.view(heads, d)[cut].reshape(-1))
        xl = x[:, :, cut].clone().requires_grad_()
        y = norm(xl)
        (y * dy[:, :, cut]).sum().backward()
        return {"out": _rel(y, y_ref[:, :, cut]), "dx": _rel(xl.grad, xr.grad[:, :, cut]),
                "dw": _rel(norm.weight.grad, ref.weight.grad.view(heads, d)[cut].reshape(-1))}
    finally:
        destroy_model_parallel()


def test_projection_norm_tp2_equals_tp1():
    per_rank = run_distributed(_norm_worker, 2)
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
           if not e < 1e-6]
    assert not bad, bad


def _global_grads(model, cfg: dict) -> dict[str, torch.Tensor]:
    """transformers' gradients as moecore global tensors (the converter's mapping)."""
    hub: dict[str, torch.Tensor] = {}
    f = cfg["intermediate_size"]
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
                                       num_experts=OLMOE["num_experts"])
        if ".experts." in name:
            # Both data-parallel replicas route the same batch to this rank's experts (expert
            # DP = 1): their gradient holds both replicas' contributions.
            expected = expected * ps.dp_size
        errors[name] = _rel(g, expected)
    return errors


def test_olmoe_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path):
    hf = hf_model(OLMOE)
    save_hub(hf, str(tmp_path / "hf"))
    ids, labels = ids_and_labels()
    ref = hf(ids).logits
    torch.nn.functional.cross_entropy(ref.reshape(-1, V), labels.reshape(-1)).backward()
    grads = _global_grads(hf, hf.config.to_dict())
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "tp2ep2"),
                  target={"tp": 2, "ep": 2}, log=io.StringIO())
    assert "--sequence-parallel" in res.flags and "--qk-layernorm-hidden-dim" in res.flags
    flags = res.flags + ["--load", str(tmp_path / "tp2ep2"), "--no-load-optim",
                         "--no-load-rng"]
    per_rank = run_distributed(_worker, 4, flags, ids, labels, ref.detach(), grads, timeout=300)
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
           if not e < 1e-4]
    assert not bad, bad
    assert all(len(errs) == len(CHECKED) + 1 for errs in per_rank)
