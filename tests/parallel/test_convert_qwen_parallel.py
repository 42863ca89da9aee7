"""Converted Hugging Face Qwen3-MoE and Qwen2-MoE at TP=2 x EP=2 on 4 gloo ranks give
transformers' logits and gradients.

The tiny random models of ``tests/unit/test_convert_qwen.py`` (Qwen3: per-head QK norm, a dense
layer, top-k renormalised; Qwen2: q/k/v biases, the gated shared expert, no renormalisation) are
converted to TP=2 x EP=2 (sequence parallel, expert TP = 2) and run through ``pretrain`` with the
flags the converter prints. Logits (gathered over the vocab-parallel group) must match
transformers'; after one backward of the same loss, each rank's gradient shards must match
transformers' gradients, sharded by the converter's own table.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

from moecore.convert import convert
from moecore.convert.reshard import shard_tensor
from tests.dist_harness import run_distributed
from tests.unit.test_convert import load_with_pretrain
from tests.unit.test_convert_qwen import (
    CASES,
    V,
    checked_names,
    hf_grads_as_global,
    hf_model,
    ids_and_labels,
    save_hub,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _worker(rank, world_size, flags, ids, labels, ref, grads, num_experts):
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
                                       num_experts=num_experts)
        if ".experts." in name:
            # Both data-parallel replicas route the same batch to this rank's experts (expert
            # DP = 1): their gradient holds both replicas' contributions.
            expected = expected * ps.dp_size
        errors[name] = _rel(g, expected)
    return errors


@pytest.mark.parametrize("case", ["qwen3", "qwen2"])
def test_qwen_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path, case):
    hf = hf_model(case)
    save_hub(hf, str(tmp_path / "hf"))
    ids, labels = ids_and_labels()
    ref = hf(ids).logits
    torch.nn.functional.cross_entropy(ref.reshape(-1, V), labels.reshape(-1)).backward()
    names = checked_names(case)
    grads = hf_grads_as_global(hf, names)
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "tp2ep2"),
                  target={"tp": 2, "ep": 2}, log=io.StringIO())
    assert "--sequence-parallel" in res.flags
    flags = res.flags + ["--load", str(tmp_path / "tp2ep2"), "--no-load-optim",
                         "--no-load-rng"]
    per_rank = run_distributed(_worker, 4, flags, ids, labels, ref.detach(), grads,
                               CASES[case][1]["num_experts"], timeout=300)
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items()
           if not e < 1e-4]
    assert not bad, bad
    assert all(len(errs) == len(names) + 1 for errs in per_rank)
