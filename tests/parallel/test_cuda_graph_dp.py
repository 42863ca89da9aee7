"""``--cuda-graph-impl local`` with data parallelism on 2 gloo ranks: replayed micro-batches
(``RerunBackend``, CUDA-graph semantics on CPU; see tests/unit/test_cuda_graph.py) train exactly
as eager mode, with gradients reduced after the last micro-batch by ``finalize_model_grads``
(plain AdamW) and by the bucketed buffers of the distributed optimizer."""

from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed

# 2 ranks x micro-batch 2 x 3 micro-batches
DP_ARGS = ["--global-batch-size", "12", "--num-workers", "0", "--bf16"]


def _worker(rank, world_size, extra, graphs):
    from tests.unit.test_cuda_graph import ARGV, RerunBackend, assert_same_training, train

    argv = ARGV + DP_ARGS + extra
    eager, eager_model, _ = train(argv)
    backend = RerunBackend()
    graphed, graphed_model, runners = train(argv, backend)
    # + one forward-only graph for evaluation (see tests/unit/test_cuda_graph.py)
    assert backend.captures == graphs + 1 and runners[0].replays == 12 + 21
    assert_same_training(eager, eager_model, graphed, graphed_model)
    return eager["lm_loss"]


# Plain AdamW: per-parameter fp32 main grads, overwritten by an iteration's first micro-batch
# and added to by the others (two graphs). Distributed optimizer: bucket buffers zeroed by
# zero_grad, every micro-batch adds (one graph).
@pytest.mark.parametrize("extra, graphs", [([], 2), (["--use-distributed-optimizer"], 1)],
                         ids=["allreduce", "distributed-optimizer"])
def test_graphed_data_parallel_training_matches_eager(extra, graphs):
    losses = run_distributed(_worker, 2, extra, graphs)
    assert losses[0] == losses[1]  # the logged loss is the data-parallel mean on every rank
