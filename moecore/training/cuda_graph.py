"""CUDA graphs of whole micro-batches: ``--cuda-graph-impl local`` (Megatron's
``--cuda-graph-scope full_iteration`` at micro-batch granularity; the optimizer stays eager).
Evaluation forwards are replayed too, through one forward-only graph (``run(...,
forward_only=True)``), after the first evaluation iteration ran eagerly.

A training micro-batch launches ~2,000 kernels (embedding, every layer's attention, router,
permute, grouped GEMMs, the loss, the whole backward and the fp32 main-grad accumulation). With
:class:`MicroBatchGraphs` the host launches them once into a CUDA graph and afterwards replays
the graph per micro-batch: one launch instead of thousands, and no gaps between kernels.

Protocol, per training iteration (``run``):

1. The first ``warmup_steps`` iterations run eagerly on the capture stream (Triton compiles and
   self-checks, cuBLAS workspaces and caches appear there, as CUDA graph capture requires).
2. Each micro-batch's tokens, labels and loss mask are copied into static input buffers.
3. The graph is looked up by the *Python-side* state that decides which kernels a backward
   launches: per parameter, whether its fp32 ``main_grad`` is stale (the first micro-batch after
   ``zero_grad`` overwrites it, later ones add) and which tensor ``param.grad`` is; plus the
   number of micro-batches (the loss is divided by it). In practice there are two graphs (the
   first micro-batch of an iteration and the others), or one with the distributed optimizer,
   whose gradient buffers are zeroed and always added to. A missing one is captured (a capture
   records kernels without running them), then replayed.
4. After a replay, what Python would have done is redone: the parameters' ``grad`` /
   ``_main_grad_stale`` are set to their state at the end of the capture, the micro-batch's
   ``lm loss`` is cloned out of the graph's static output, and the MoE losses the routers saved
   while being captured are added to :class:`~moecore.moe.losses.MoELossTracker`.

Replays compute what the eager step computes (same kernels, same order); the graphs share one
memory pool, so activation memory is that of one micro-batch, as in eager mode (plus the
static inputs).

Dropout works: the default CUDA generator is graph-safe, and the tensor-parallel RNG tracker
switches to generator objects that each graph registers (``RNGStatesTracker.make_graph_safe``).
The step must not synchronise with the host or copy RNG states (``torch.cuda.set_rng_state``):
``validate_args`` (and, for the experts' GEMM backend, :class:`MicroBatchGraphs`) rejects the
configurations known to (pipeline/tensor/expert/context parallelism, fp16's dynamic loss scale,
checkpoint-style activation recompute (selective ``moe_act`` / ``layernorm`` recompute is
capturable), overlapped grad reduction or param gather, capacity-factor token
dropping, Sinkhorn routing, the global aux loss under data parallelism, experts outside
``torch._grouped_mm``), and a capture that fails anyway raises an error naming the flag to
drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moecore.moe.experts import GroupedMLP
from moecore.moe.losses import MoELossTracker
from moecore.pipeline_parallel.steps import backward_step, forward_step, set_aux_loss_scale
from moecore.tensor_parallel.random import get_rng_tracker

# One static input buffer per batch key the loop's forward step reads.
_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _check_experts_capturable(model: nn.Module) -> None:
    """Experts must run on ``torch._grouped_mm``: the other grouped-GEMM backends read the
    per-expert token counts on the host, which a capture cannot."""
    for m in model.modules():
        if isinstance(m, GroupedMLP):
            backend = m._resolve(m.weight1.device, m.weight1.dtype)
            if backend.name != "torch":
                raise ValueError(
                    f"--cuda-graph-impl local needs the experts on torch._grouped_mm, but the "
                    f"grouped-GEMM backend here is '{backend.name}' (auto picks torch for bf16 "
                    "on compute capability >= 9.0); pass --moe-grouped-gemm-backend torch or "
                    "drop --cuda-graph-impl")


class CudaGraphBackend:
    """Capture and replay with ``torch.cuda.CUDAGraph`` on one side stream; graphs share one
    memory pool (they never run concurrently, and every replay's outputs are copied out)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pool = None
        # Dropout forked onto the tensor-parallel RNG streams draws from these generators.
        self.generators = get_rng_tracker().make_graph_safe()

    def eager(self, fn: Callable):
        """Run ``fn`` now on the capture stream (warm-up), ordered with the current stream."""
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
        """Record ``fn``'s kernels (not run); returns the graph and ``fn``'s static outputs."""
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                              capture_error_mode="thread_local"):
            out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


@dataclass(eq=False)
class _Graph:
    """One captured micro-batch and the Python state its replay stands for."""

    handle: object
    outputs: list[torch.Tensor]        # static: loss values, MoE loss vectors, then grads
    loss_names: list[str]
    tracker: list[tuple[str, object, object]]  # (name, reduce_group, avg_group)
    after: list[tuple[nn.Parameter, object, torch.Tensor | None]] = field(default_factory=list)


class MicroBatchGraphs:
    """Forward-backward of each training micro-batch as a replayed CUDA graph.

    ``model``: this rank's model (one chunk; no pipeline parallelism). ``backend``: what
    captures and replays (``CudaGraphBackend`` on the parameters' CUDA device by default).
    """

    def __init__(self, model: nn.Module | list[nn.Module], warmup_steps: int,
                 backend=None):
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        if len(chunks) != 1:
            raise ValueError(f"CUDA graphs capture one model chunk; got {len(chunks)} "
                             "(pipeline parallelism is not supported with --cuda-graph-impl)")
        self.model = chunks[0]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.warmup_steps = warmup_steps
        if backend is None:
            _check_experts_capturable(self.model)
            backend = CudaGraphBackend(next(self.model.parameters()).device)
        self.backend = backend
        self.static_batch: dict[str, torch.Tensor] | None = None
        self.graphs: dict[tuple, _Graph] = {}
        self.steps = self.evals = 0
        self.replays = 0

    def run(self, batches: list[dict], forward_step_func: Callable, eager_schedule: Callable,
            grad_scale_func: Callable | None = None, forward_only: bool = False) -> list[dict]:
        """Forward and backward (or, with ``forward_only``, the evaluation forward of) every
        micro-batch of one iteration; returns the schedule's per-micro-batch loss dicts.
        ``eager_schedule()`` runs the iteration without graphs: for the training warm-up
        iterations, and for the first evaluation (forward-only kernels warm up there)."""
        if forward_only:
            self.evals += 1
            if self.evals == 1 or self.steps < self.warmup_steps:
                return self.backend.eager(eager_schedule)
        else:
            self.steps += 1
            if self.steps <= self.warmup_steps:
                return self.backend.eager(eager_schedule)
        n = len(batches)
        if not forward_only:
            set_aux_loss_scale(n, grad_scale_func, self.model)
        store = []
        for batch in batches:
            self._load(batch)
            key = ("forward", n, self.model.training) if forward_only else self._key(n)
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = self._capture(n, forward_step_func, grad_scale_func,
                                                         forward_only)
            self.backend.replay(graph.handle)
            self.replays += 1
            store.append(self._publish(graph))
        return store

    # ---- internals ---------------------------------------------------------------------------
    def _load(self, batch: dict) -> None:
        if self.static_batch is None:
            self.static_batch = {k: batch[k].clone() for k in _BATCH_KEYS
                                 if isinstance(batch.get(k), torch.Tensor)}
            return
        for k, static in self.static_batch.items():
            t = batch.get(k)
            if not isinstance(t, torch.Tensor) or t.shape != static.shape:
                raise ValueError(f"micro-batch '{k}' is {None if t is None else tuple(t.shape)}"
                                 f" but the captured CUDA graph takes {tuple(static.shape)}; "
                                 "CUDA graphs need every micro-batch to have the same shape")
            static.copy_(t, non_blocking=True)

    def _key(self, num_microbatches: int) -> tuple:
        return (num_microbatches, tuple(
            (getattr(p, "_main_grad_stale", None), None if p.grad is None else id(p.grad))
            for p in self.params))

    def _capture(self, n: int, forward_step_func: Callable, grad_scale_func,
                 forward_only: bool = False) -> _Graph:
        names: dict[str, list] = {}

        def step() -> list[torch.Tensor]:
            store: list[dict] = []
            loss = forward_step(forward_step_func, iter([self.static_batch]), self.model, n,
                                None, store, True)
            if not forward_only:
                backward_step(None, loss, None, grad_scale_func)
            names["loss"] = sorted(store[0])
            values = MoELossTracker.values()
            names["tracker"] = sorted(values)
            grads = [p.grad for p in self.params if p.grad is not None]
            return ([store[0][k] for k in names["loss"]] + [values[k] for k in names["tracker"]]
                    + grads)

        saved = MoELossTracker.state()
        MoELossTracker.clear()
        try:
            handle, outputs = self.backend.capture(step)
            tracker = [(name, *MoELossTracker.groups(name)) for name in names["tracker"]]
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(
                "capturing a micro-batch into a CUDA graph ran out of GPU memory (the graph "
                "keeps its own memory pool beside the eager warm-up's). Lower "
                "--micro-batch-size, free activations with --recompute-granularity selective "
                "--recompute-modules moe_act layernorm, or run without --cuda-graph-impl. "
                f"Cause: {e}") from e
        except RuntimeError as e:
            raise RuntimeError(
                "capturing a micro-batch into a CUDA graph failed. Some op in the "
                "forward or backward synchronises with the host or changes RNG state (known: "
                "the non-fused MoE permute (--no-moe-permute-fusion or a failed Triton "
                "self-check), grouped-GEMM backends other than torch._grouped_mm). Run "
                f"without --cuda-graph-impl. Cause: {e}") from e
        finally:
            MoELossTracker.set_state(saved)
        after = [] if forward_only else [(p, getattr(p, "_main_grad_stale", None), p.grad)
                                         for p in self.params]
        return _Graph(handle, outputs, names["loss"], tracker, after)

    def _publish(self, graph: _Graph) -> dict:
        """Redo the Python side of one replayed micro-batch; returns its loss dict."""
        for p, stale, grad in graph.after:
            if stale is not None:
                p._main_grad_stale = stale
            p.grad = grad
        k = len(graph.loss_names)
        for (name, reduce_group, avg_group), values in zip(graph.tracker,
                                                           graph.outputs[k:]):
            MoELossTracker.add_values(name, values, reduce_group, avg_group)
        return {name: t.clone() for name, t in zip(graph.loss_names, graph.outputs[:k])}
