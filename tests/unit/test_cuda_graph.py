"""CUDA-graph training (``--cuda-graph-impl local``): the runner's logic on CPU, and the flags.

A CUDA graph replays kernels but none of the Python that launched them. ``RerunBackend`` gives
a CPU step those semantics: a capture runs the step once (the replay that follows it is that
run), a later replay reruns the step with Python's side effects on the MoE loss tracker
discarded and copies its results into the tensors the capture returned. Training through it must
match eager training exactly, which pins what the runner itself must redo after each replay
(input buffers, ``param.grad`` / stale main grads, loss values, MoE losses). The real graphs are
compared with eager training in ``tests/gpu/test_cuda_graph_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from moecore.arguments import parse_args
from moecore.arguments.validation import _validate_cuda_graph
from moecore.moe.losses import MoELossTracker
from moecore.training import loop, pretrain
from moecore.training.builders import default_model_provider
from moecore.training.cuda_graph import MicroBatchGraphs
from tests.cli import parse_error

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--seq-length", "16",
        "--max-position-embeddings", "16", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--mock-data", "--vocab-size", "64",
        "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "2",
        "--global-batch-size", "6", "--lr", "1e-3", "--train-iters", "5", "--log-interval", "1",
        "--eval-iters", "2", "--eval-interval", "2", "--split", "80,20,0", "--device", "cpu",
        "--seed", "7",
        "--attention-dropout", "0", "--hidden-dropout", "0"]


class RerunBackend:
    """CPU stand-in for ``CudaGraphBackend`` with a CUDA graph's semantics (module docstring)."""

    def __init__(self):
        self.eager_runs = self.captures = self.reruns = 0

    def eager(self, fn):
        self.eager_runs += 1
        return fn()

    def capture(self, fn):
        self.captures += 1
        outputs = fn()
        return {"fn": fn, "outputs": outputs, "fresh": True}, outputs

    def replay(self, handle):
        if handle["fresh"]:  # the capture's own run is this replay
            handle["fresh"] = False
            return
        saved = MoELossTracker.state()
        MoELossTracker.clear()
        new = handle["fn"]()
        MoELossTracker.set_state(saved)
        assert len(new) == len(handle["outputs"])
        for static, value in zip(handle["outputs"], new):
            static.copy_(value)
        self.reruns += 1


def train(argv, backend=None):
    """``pretrain(argv)`` -> (summary, model, graph runners); with ``backend``, the run uses
    ``--cuda-graph-impl local`` (one warm-up iteration) through that backend."""
    args = parse_args(argv)
    models, runners = [], []

    def provider(config, a, ps, **stage):
        models.append(default_model_provider(config, a, ps, **stage))
        return models[-1]

    def make(model, warmup):
        runners.append(MicroBatchGraphs(model, warmup, backend=backend))
        return runners[-1]

    if backend is not None:
        args.cuda_graph_impl, args.cuda_graph_warmup_steps = "local", 1
    original, loop.MicroBatchGraphs = loop.MicroBatchGraphs, make
    try:
        summary = pretrain(args, model_provider=provider)
    finally:
        loop.MicroBatchGraphs = original
    return summary, models[0], runners


def assert_same_training(eager, eager_model, graphed, graphed_model) -> None:
    """Graphed training gave exactly eager training's losses, norms, MoE losses and weights."""
    assert graphed["lm_loss"] == eager["lm_loss"] and len(eager["lm_loss"]) == 5
    assert graphed["val_loss"] == eager["val_loss"] and len(eager["val_loss"]) == 3
    assert graphed["test_loss"] == eager["test_loss"] is not None
    assert graphed["grad_norm"] == eager["grad_norm"]
    assert graphed["moe_losses"] == eager["moe_losses"]
    assert set(eager["moe_losses"][0]) == {"load_balancing_loss", "z_loss"}
    for (name, p), q in zip(eager_model.named_parameters(), graphed_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("precision", [
    [], ["--bf16"],
    ["--recompute-granularity", "selective", "--recompute-modules", "moe_act", "layernorm"]],
    ids=["fp32-grad", "bf16-main-grad", "recompute-moe-act-layernorm"])
def test_graphed_training_matches_eager(precision):
    eager, eager_model, _ = train(ARGV + precision)
    backend = RerunBackend()
    graphed, graphed_model, runners = train(ARGV + precision, backend)
    # Training: 1 warm-up iteration, then 4 x 3 micro-batches through two graphs (the first
    # micro-batch of an iteration, and the others). Evaluation (validation at iterations 2, 4
    # and 5, then test; 2 iterations of 3 micro-batches each): the first iteration eager, the
    # other 7 through one forward-only graph.
    assert backend.eager_runs == 2 and backend.captures == 3
    assert runners[0].replays == 12 + 21 and backend.reruns == 33 - 3
    assert_same_training(eager, eager_model, graphed, graphed_model)


def test_stale_static_inputs_would_be_caught(monkeypatch):
    """If the runner skipped copying a micro-batch into the static buffers, every replay would
    train on the captured micro-batch again: the losses would differ from eager training."""
    eager, _, _ = train(ARGV)
    monkeypatch.setattr(MicroBatchGraphs, "_load", lambda self, batch: (
        None if self.static_batch is not None else
        setattr(self, "static_batch", {k: v.clone() for k, v in batch.items()
                                       if isinstance(v, torch.Tensor)})))
    broken, _, _ = train(ARGV, RerunBackend())
    assert broken["lm_loss"][0] == eager["lm_loss"][0]  # the warm-up iteration is eager
    assert broken["lm_loss"][1:] != eager["lm_loss"][1:]


def test_running_out_of_memory_in_capture_names_the_fixes():
    class OutOfMemoryBackend(RerunBackend):
        def capture(self, fn):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.38 GiB.")

    with pytest.raises(torch.OutOfMemoryError, match="--micro-batch-size.*--recompute-modules"
                                                     ".*Tried to allocate"):
        train(ARGV, OutOfMemoryBackend())


def test_micro_batch_shape_change_is_an_error():
    model = torch.nn.Linear(2, 2)
    graphs = MicroBatchGraphs(model, 1, backend=RerunBackend())
    graphs._load({"tokens": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="same shape"):
        graphs._load({"tokens": torch.zeros(2, 5, dtype=torch.long)})


def _cuda_args(*extra):
    args = parse_args(ARGV + ["--bf16"] + list(extra))
    args.device = "cuda"  # validation of the graph flags alone; no GPU is touched
    args.cuda_graph_impl = "local"
    return args


@pytest.mark.parametrize("extra, field, value, match", [
    ([], "tensor_model_parallel_size", 2, "--tensor-model-parallel-size 2"),
    ([], "expert_model_parallel_size", 2, "--expert-model-parallel-size 2"),
    ([], "pipeline_model_parallel_size", 2, "--pipeline-model-parallel-size 2"),
    ([], "fp16", True, "--fp16"),
    ([], "bf16", False, "torch._grouped_mm"),
    ([], "moe_grouped_gemm_backend", "bmm", "torch._grouped_mm"),
    ([], "recompute_granularity", "full", "recompute"),
    ([], "calculate_per_token_loss", True, "--calculate-per-token-loss"),
    ([], "overlap_grad_reduce", True, "--overlap-grad-reduce"),
    ([], "moe_expert_capacity_factor", 1.0, "capacity"),
    ([], "moe_router_load_balancing_type", "sinkhorn", "Sinkhorn"),
    (["--moe-router-load-balancing-type", "global_aux_loss"], "data_parallel_size", 2,
     "global_aux_loss"),
    ([], "moe_grouped_gemm", False, "--moe-grouped-gemm"),
    ([], "cuda_graph_warmup_steps", 0, "warmup-steps"),
    ([], "cuda_graph_scope", "full", "full_iteration"),
])
def test_configurations_graphs_cannot_capture_are_rejected(extra, field, value, match):
    args = _cuda_args(*extra)
    _validate_cuda_graph(args)  # the base configuration is accepted
    setattr(args, field, value)
    with pytest.raises(ValueError, match=match):
        _validate_cuda_graph(args)


def test_only_capturable_recompute_modules_are_accepted():
    args = _cuda_args("--recompute-granularity", "selective", "--recompute-modules", "moe_act",
                      "layernorm")
    _validate_cuda_graph(args)  # no checkpoint replay, no RNG: capturable
    for modules in (None, ["moe_act", "core_attn"], ["moe"]):
        args.recompute_modules = modules  # None: Megatron's default, core_attn
        with pytest.raises(ValueError, match="only --recompute-modules moe_act / layernorm"):
            _validate_cuda_graph(args)


def test_cuda_graph_flags(capsys):
    assert "needs a CUDA device" in parse_error(ARGV + ["--cuda-graph-impl", "local"], capsys)
    # Megatron's older spelling of --cuda-graph-impl local
    assert "needs a CUDA device" in parse_error(ARGV + ["--enable-cuda-graph"], capsys)
    assert "use --cuda-graph-impl local" in parse_error(
        ARGV + ["--cuda-graph-impl", "transformer_engine"], capsys)
    assert "use --cuda-graph-impl local" in parse_error(ARGV + ["--external-cuda-graph"],
                                                        capsys)
    assert parse_args(ARGV).cuda_graph_impl == "none"


def test_experts_off_torch_grouped_mm_are_rejected_before_capture():
    from moecore.config import TransformerConfig
    from moecore.moe.experts import GroupedMLP

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            ffn_hidden_size=32, num_moe_experts=2, moe_ffn_hidden_size=8,
                            moe_grouped_gemm_backend="bmm")
    with pytest.raises(ValueError, match="grouped-GEMM backend here is 'bmm'"):
        MicroBatchGraphs(torch.nn.Sequential(GroupedMLP(2, cfg)), 1)
