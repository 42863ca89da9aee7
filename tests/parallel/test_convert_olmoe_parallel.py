"""OLMoE under tensor parallelism on gloo.

* The QK norm over the whole projection (:class:`ProjectionRMSNorm`) at TP=2 gives TP=1's
  output, input gradient and weight gradient (each rank's slice): the sum of squares is
  all-reduced over TP in both directions.
* The tiny random ``OlmoeForCausalLM`` of ``tests/unit/test_convert_olmoe.py`` converted to
  TP=2 x EP=2 (sequence parallel) and run through ``pretrain`` with the converter's flags on 4
  ranks gives transformers' logits and, after one backward, each rank's gradient shards.
"""

from __future__ import annotations

import torch

from moecore.convert import hf_olmoe
from moecore.parallel_state import destroy_model_parallel, initialize_model_parallel
from moecore.transformer.projection_norm import ProjectionRMSNorm
from tests import convert_harness as harness
from tests.dist_harness import run_distributed
from tests.unit.test_convert import rel_err
from tests.unit.test_convert_olmoe import OLMOE, V, hf_model

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
        return {"out": rel_err(y, y_ref[:, :, cut]), "dx": rel_err(xl.grad, xr.grad[:, :, cut]),
                "dw": rel_err(norm.weight.grad, ref.weight.grad.view(heads, d)[cut].reshape(-1))}
    finally:
        destroy_model_parallel()


def test_projection_norm_tp2_equals_tp1():
    per_rank = run_distributed(_norm_worker, 2)
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
           if not e < 1e-6]
    assert not bad, bad


def test_olmoe_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path):
    hf = hf_model(OLMOE)
    ids, labels = harness.ids_and_labels(V)
    ref = harness.saved_reference(hf, tmp_path, ids, labels, V)
    cfg = hf.config.to_dict()
    hub = harness.hub_grads(hf, cfg["intermediate_size"])
    grads = harness.global_grads(hub, cfg, hf_olmoe, CHECKED)
    res, per_rank = harness.run_converted_on_four_ranks(
        tmp_path, {"tp": 2, "ep": 2}, V, ids, labels, ref, grads, OLMOE["num_experts"])
    assert "--sequence-parallel" in res.flags and "--qk-layernorm-hidden-dim" in res.flags
    bad = harness.errors_over(per_rank, 1e-4)
    assert not bad, bad
    assert all(len(errs) == len(CHECKED) + 1 for errs in per_rank)
