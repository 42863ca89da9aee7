"""``--calculate-per-token-loss`` at data parallel 2 (gloo) against one process over the same
micro-batches: ranks with different token counts still weight every token equally."""

from __future__ import annotations

import pytest
import torch

from moecore.optimizer import finalize_model_grads
from moecore.optimizer.grad_sync import model_grad
from moecore.parallel_state import ParallelSizes, ParallelState
from moecore.training import loop
from tests.dist_harness import run_distributed
from tests.unit.test_per_token_loss import model_and_batches, schedule_grads


def _worker(rank, world_size, moe):
    ps = ParallelState.build(ParallelSizes(world_size=world_size))
    model, batches = model_and_batches(moe, n=3, offset=3 * rank, ps=ps)  # 2..8 / 11..17
    store, opt = schedule_grads(model, batches, ps)
    finalize_model_grads(model, ps, getattr(opt, "grad_sync", None))
    loss = loop._reported_loss(store, ps, torch.device("cpu"), True)
    return loss, {n: model_grad(p).clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_data_parallel_matches_one_process(moe):
    per_rank = run_distributed(_worker, 2, moe, timeout=120)
    model, batches = model_and_batches(moe, n=6)
    store, _ = schedule_grads(model, batches)
    want_loss = loop._reported_loss(store, ParallelState.single(), torch.device("cpu"), True)
    for loss, grads in per_rank:
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], model_grad(p), rtol=1e-5, atol=1e-7, msg=n)


PP_ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
           "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
           "--global-batch-size", "8", "--lr", "1e-2", "--train-iters", "3", "--mock-data",
           "--vocab-size", "64", "--device", "cpu", "--eval-iters", "1", "--eval-interval", "3",
           "--eod-mask-loss", "--calculate-per-token-loss", "--num-workers", "0",
           "--hidden-dropout", "0", "--attention-dropout", "0"]


def _pp_worker(rank, world_size):
    from moecore.training import pretrain

    out = pretrain(PP_ARGV + ["--pipeline-model-parallel-size", "2"])
    return out["lm_loss"], out["val_loss"]


def test_pipeline_parallel_matches_one_stage():
    """PP=2: every stage takes the same (per-token) path through the loss reductions."""
    from moecore.training import pretrain

    per_rank = run_distributed(_pp_worker, 2, timeout=120)
    want = pretrain(PP_ARGV)
    for losses, val in per_rank:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want["lm_loss"]),
                                   rtol=1e-5, atol=0)
        assert val.keys() == want["val_loss"].keys()
