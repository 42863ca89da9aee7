"""``--cuda-graph-impl local`` on CUDA: training through replayed CUDA graphs against eager
training of the same model and data (the CPU logic test is tests/unit/test_cuda_graph.py)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from moecore.parallel_state import ParallelState
from moecore.tensor_parallel.random import (
    _MODEL_PARALLEL_RNG_TRACKER_NAME,
    get_rng_tracker,
    model_parallel_seed,
)
from moecore.training import loop, pretrain
from moecore.training.builders import default_model_provider
from moecore.training.cuda_graph import MicroBatchGraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BASE = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
        "--ffn-hidden-size", "512", "--seq-length", "128", "--max-position-embeddings", "128",
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--mock-data",
        "--vocab-size", "512", "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "4",
        "--global-batch-size", "12", "--lr", "1e-3", "--train-iters", "6", "--log-interval", "1",
        "--eval-iters", "2", "--eval-interval", "3", "--split", "80,20,0", "--device", "cuda",
        "--seed", "11",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--clip-grad", "1.0"]
MOE = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256",
       "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
       "--moe-shared-expert-intermediate-size", "256", "--moe-layer-freq", "[0,1]",
       "--moe-token-dispatcher-type", "alltoall"]


def _train(argv, monkeypatch):
    models, runners = [], []

    def provider(config, a, ps, **stage):
        models.append(default_model_provider(config, a, ps, **stage))
        return models[-1]

    def make(model, warmup):
        runners.append(MicroBatchGraphs(model, warmup))
        return runners[-1]

    monkeypatch.setattr(loop, "MicroBatchGraphs", make)
    return pretrain(argv, model_provider=provider), models[0], runners


DROPOUT = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]  # later flags win
RECOMPUTE = ["--recompute-granularity", "selective", "--recompute-modules", "moe_act",
             "layernorm"]


@pytest.mark.parametrize("argv", [BASE + MOE + ["--bf16"], BASE, BASE + MOE + ["--bf16"] + DROPOUT,
                                  BASE + MOE + ["--bf16"] + RECOMPUTE],
                         ids=["moe-bf16-main-grad", "dense-fp32-grad", "moe-bf16-dropout",
                              "moe-bf16-recompute"])
def test_graphed_training_matches_eager(monkeypatch, argv):
    eager, eager_model, _ = _train(argv, monkeypatch)
    graphed, graphed_model, runners = _train(
        argv + ["--cuda-graph-impl", "local", "--cuda-graph-warmup-steps", "2"], monkeypatch)
    (runner,) = runners
    # two training graphs (4 x 3 replays) and one evaluation graph (validation at 3 and 6, then
    # test; 2 x 3 micro-batches each, the first evaluation iteration eager)
    assert len(runner.graphs) == 3 and runner.replays == 4 * 3 + 5 * 3
    assert graphed["val_loss"].keys() == eager["val_loss"].keys() == {3, 6}
    torch.testing.assert_close(torch.tensor(list(graphed["val_loss"].values())),
                               torch.tensor(list(eager["val_loss"].values())), rtol=1e-5, atol=0)
    assert math.isclose(graphed["test_loss"], eager["test_loss"], rel_tol=1e-5)
    torch.testing.assert_close(torch.tensor(graphed["lm_loss"]), torch.tensor(eager["lm_loss"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(graphed["grad_norm"]),
                               torch.tensor(eager["grad_norm"]), rtol=1e-4, atol=0)
    for g, e in zip(graphed["moe_losses"], eager["moe_losses"]):
        assert g.keys() == e.keys() == ({"load_balancing_loss", "z_loss"} if MOE[0] in argv
                                        else set())
        for k in g:
            assert math.isclose(g[k], e[k], rel_tol=1e-4), k
    for (name, p), q in zip(eager_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("forked", [False, True], ids=["default-rng", "tracker-fork"])
def test_dropout_draws_new_masks_every_replay(forked):
    """Dropout is graph-safe, from the default generator and forked onto the tensor-parallel
    tracker's stream: replays of the same micro-batch draw fresh masks, so their losses differ."""
    model_parallel_seed(5, ParallelState.single())
    model = torch.nn.Linear(64, 64, device="cuda")
    x = torch.randn(8, 64, device="cuda")

    def forward_step_func(data_iterator, m):
        rng = get_rng_tracker().fork() if forked else contextlib.nullcontext()
        with rng:
            out = torch.nn.functional.dropout(m(next(data_iterator)["tokens"]), 0.5, True)
        return out, lambda o: (o.square().mean(), {"lm loss": o.square().mean().detach()})

    graphs = MicroBatchGraphs(model, 1)
    batches = [{"tokens": x}] * 4
    warm = graphs.run(batches, forward_step_func, lambda: [])
    assert warm == [] and not graphs.graphs
    before = get_rng_tracker().get_states()[_MODEL_PARALLEL_RNG_TRACKER_NAME]["cuda"]
    losses = [d["lm loss"].item() for d in graphs.run(batches, forward_step_func, None)]
    assert graphs.replays == 4 and all(math.isfinite(v) for v in losses)
    assert len(set(losses)) == 4, losses
    after = get_rng_tracker().get_states()[_MODEL_PARALLEL_RNG_TRACKER_NAME]["cuda"]
    assert torch.equal(before, after) != forked  # replays advance the forked stream


def test_graph_safe_tracker_draws_the_same_numbers():
    """``make_graph_safe`` swaps generator objects instead of copying states: the forked stream
    and the default stream draw exactly what the state-copying tracker draws."""
    def draws(graph_safe: bool):
        model_parallel_seed(9, ParallelState.single())
        if graph_safe:
            get_rng_tracker().make_graph_safe()
        out = [torch.rand(5, device="cuda")]
        for _ in range(2):
            with get_rng_tracker().fork():
                out.append(torch.rand(1000, device="cuda"))
            out.append(torch.rand(5, device="cuda"))
        states = get_rng_tracker().get_states()
        return out, {k: v["cuda"] for k, v in states.items()}

    (ref, ref_states), (got, got_states) = draws(False), draws(True)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for k in ref_states:
        assert torch.equal(ref_states[k], got_states[k]), k
    model_parallel_seed(9, ParallelState.single())  # back to a state-copying tracker
