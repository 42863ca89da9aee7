"""Resharded checkpoints on 4 gloo ranks give the reference Mixtral's logits.

A tiny Hugging Face Mixtral is converted to two layouts of world size 4, then loaded on 4 ranks:

* TP=2 x EP=2 (sequence parallel, expert TP = 2) through ``pretrain`` itself, with the flags the
  converter prints (``--load`` the converted directory);
* TP=2 x EP=2 x PP=2 with expert TP = 1: each rank builds its stage's ``GPTModel`` and loads its
  shard file; stage 0 sends its hidden states to stage 1 (the pipeline schedules are tested
  elsewhere; here the point is that every shard holds the right weights).

Logits (gathered over the vocab-parallel TP group) must match the plain-torch reference.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

from moecore.convert import Layout, convert
from moecore.parallel_state import ParallelState
from tests.dist_harness import run_distributed
from tests.unit.test_convert import (
    BASE_CONFIG,
    S,
    hf_tensors,
    load_stage,
    load_with_pretrain,
    reference_logits,
    token_ids,
    write_hf_checkpoint,
)

V = BASE_CONFIG["vocab_size"]
PP_LAYOUT = Layout(tp=2, ep=2, etp=1, pp=2)


def _gather_vocab(logits: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(logits) for _ in range(ps.tp_size)]
    dist.all_gather(parts, logits.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pipeline_logits(directory: str, ids: torch.Tensor) -> torch.Tensor | None:
    """Stage 0 -> stage 1 by send/recv; the logits on stage 1's ranks, None on stage 0's."""
    ps = ParallelState.build(PP_LAYOUT.sizes())
    (model,) = load_stage(directory, ps)
    peers = ps.ranks["pipeline_model_parallel"]
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            hidden = model(ids)  # [S/tp, B, H] under sequence parallel
            dist.send(hidden.contiguous(), dst=peers[1])
            return None
        hidden = torch.empty(S // ps.tp_size, ids.shape[0], BASE_CONFIG["hidden_size"])
        dist.recv(hidden, src=peers[0])
        model.set_input_tensor(hidden)
        return _gather_vocab(model(None), ps)


def _worker(rank, world_size, flags, pp_dir, ids, ref):
    model = load_with_pretrain(flags, V)
    with torch.no_grad():
        logits = _gather_vocab(model(ids), model.ps)
    errors = {"tp2_ep2": _rel(logits, ref)}
    pp_logits = _pipeline_logits(pp_dir, ids)
    if pp_logits is not None:
        errors["tp2_ep2_etp1_pp2"] = _rel(pp_logits, ref)
    return errors


def test_resharded_mixtral_logits_on_four_ranks(tmp_path):
    cfg = dict(BASE_CONFIG)
    tensors = hf_tensors(cfg)
    write_hf_checkpoint(str(tmp_path / "hf"), cfg, tensors)
    ids = token_ids(V)
    ref = reference_logits(tensors, cfg, ids)
    quiet = io.StringIO()
    res = convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "tp2ep2"),
                  target={"tp": 2, "ep": 2}, log=quiet)
    assert "--sequence-parallel" in res.flags  # MoE at TP > 1 needs it
    convert("hf", "moecore", str(tmp_path / "hf"), str(tmp_path / "pp"), target=PP_LAYOUT,
            log=quiet)
    flags = res.flags + ["--load", str(tmp_path / "tp2ep2"), "--no-load-optim",
                         "--no-load-rng"]
    per_rank = run_distributed(_worker, 4, flags, str(tmp_path / "pp"), ids, ref, timeout=240)
    both = ["tp2_ep2", "tp2_ep2_etp1_pp2"]
    assert [sorted(e) for e in per_rank] == [["tp2_ep2"]] * 2 + [both] * 2  # PP: stage 1 only
    bad = [(r, k, e) for r, errs in enumerate(per_rank) for k, e in errs.items() if not e < 1e-5]
    assert not bad, bad
