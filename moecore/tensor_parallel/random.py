"""Random-number streams for tensor parallelism and activation recomputation.

Two kinds of randomness, as in Megatron-Core:

* the **default** torch generators (CPU and CUDA) are seeded identically on every rank of a
  pipeline stage, so replicated computations (weight init, dropout on replicated activations)
  agree across TP ranks;
* the **tracker** holds named generator states that differ per rank. ``with
  get_rng_tracker().fork():`` swaps the ``"model-parallel-rng"`` state into the default
  generators for dropout on tensor-parallel activations (each TP rank holds different heads or
  tokens, so their masks must differ), then swaps it back out, advanced.

``checkpoint(fn, distribute_saved_activations, *args)`` recomputes ``fn`` in the backward pass
with the RNG states of the original forward, so dropout masks match.
"""

from __future__ import annotations

import contextlib
import random as _py_random

import numpy as np
import torch

from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel.utils import (
    TP_GROUP,
    gather_split_1d_tensor,
    group_size,
    resolve_group,
    split_tensor_into_1d_equal_chunks,
)

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_EXPERT_PARALLEL_RNG_TRACKER_NAME = "expert-parallel-rng"
_DATA_PARALLEL_RNG_TRACKER_NAME = "data-parallel-rng"
# Megatron's offsets: seeds of the tracked streams never coincide with the default seed.
_MODEL_PARALLEL_SEED_OFFSET = 2718
_EXPERT_PARALLEL_SEED_OFFSET = 1024
_PIPELINE_SEED_STRIDE = 100


def _cuda_ready() -> bool:
    return torch.cuda.is_available()


def get_device_rng_state() -> dict:
    """The default generators' states: ``{"cpu": ByteTensor, "cuda": ByteTensor | None}``."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if _cuda_ready() else None}


def set_device_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and _cuda_ready():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_default_generators(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    if _cuda_ready():
        torch.cuda.manual_seed(seed)


class RNGStatesTracker:
    """Named generator states (CPU and, when available, the current CUDA device's)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, dict] = {}
        self.seeds_: set[int] = set()
        self.generators_: dict[str, torch.Generator] = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self) -> dict[str, dict]:
        """A copy of every named state, for checkpoints and recomputation."""
        for name, gen in self.generators_.items():
            self.states_[name]["cuda"] = gen.get_state()
        return {name: dict(state) for name, state in self.states_.items()}

    def set_states(self, states: dict[str, dict]) -> None:
        """Replace the named states (e.g. from a checkpoint); seeds are not restored."""
        self.states_ = {name: dict(state) for name, state in states.items()}
        for name, gen in self.generators_.items():
            gen.set_state(self.states_[name]["cuda"])

    def make_graph_safe(self) -> list[torch.Generator]:
        """Keep each stream's CUDA state in a ``torch.Generator`` from now on, and fork by
        swapping generator states (``graphsafe_set_state``) instead of copying them in and out
        with ``torch.cuda.set_rng_state``, which a CUDA graph capture forbids. The streams draw
        the same numbers either way. Returns the generators, which every graph that forks must
        register (``CUDAGraph.register_generator_state``)."""
        for name, state in self.states_.items():
            if name not in self.generators_ and state.get("cuda") is not None:
                gen = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
                gen.set_state(state["cuda"])
                self.generators_[name] = gen
        return list(self.generators_.values())

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` without disturbing the default state."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already backs another RNG stream; use a distinct seed")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() first")
        self.seeds_.add(seed)
        saved = get_device_rng_state()
        try:
            _seed_default_generators(seed)
            self.states_[name] = get_device_rng_state()
        finally:
            set_device_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with stream ``name`` as the default generators' state; keep its advance."""
        if name not in self.states_:
            raise RuntimeError(
                f"RNG stream {name!r} was never added; call "
                "moecore.tensor_parallel.model_parallel_seed(seed) after initialize_model_parallel")
        gen = self.generators_.get(name)
        if gen is None:
            outside = get_device_rng_state()
            set_device_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = get_device_rng_state()
                set_device_rng_state(outside)
            return
        # Graph-safe: the default CUDA generator shares the stream's state while forked, so what
        # the body draws advances the stream; the CPU state is copied as above.
        default = torch.cuda.default_generators[gen.device.index]
        outside_cpu, outside_cuda = torch.get_rng_state(), default.graphsafe_get_state()
        torch.set_rng_state(self.states_[name]["cpu"])
        default.graphsafe_set_state(gen.graphsafe_get_state())
        try:
            yield
        finally:
            default.graphsafe_set_state(outside_cuda)
            self.states_[name]["cpu"] = torch.get_rng_state()
            torch.set_rng_state(outside_cpu)


_RNG_STATE_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker."""
    return _RNG_STATE_TRACKER


get_cuda_rng_tracker = get_rng_tracker


def get_expert_parallel_rng_tracker_name() -> str:
    return _EXPERT_PARALLEL_RNG_TRACKER_NAME


def get_data_parallel_rng_tracker_name() -> str:
    return _DATA_PARALLEL_RNG_TRACKER_NAME


def model_parallel_seed(seed: int, parallel_state: ParallelState | None = None) -> int:
    """Seed every generator of this rank from one global ``seed`` (Megatron's constants).

    * default generators (torch CPU/CUDA, Python ``random``, NumPy):
      ``seed + 100 * pp_rank`` - equal on all TP/DP ranks of a pipeline stage;
    * tracker ``"model-parallel-rng"``: ``that + 2718 + tp_rank`` (differs across TP ranks);
    * tracker ``"expert-parallel-rng"``: ``that + 1024 + 100 * ep_rank + etp_rank``;
    * tracker ``"data-parallel-rng"``: ``that`` (a replicated stream).

    Returns the default seed used on this rank.
    """
    ps = parallel_state or get_parallel_state()
    base = int(seed) + _PIPELINE_SEED_STRIDE * ps.pp_rank
    _py_random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, base + _MODEL_PARALLEL_SEED_OFFSET + ps.tp_rank)
    tracker.add(_EXPERT_PARALLEL_RNG_TRACKER_NAME,
                base + _EXPERT_PARALLEL_SEED_OFFSET + 100 * ps.ep_rank + ps.etp_rank)
    tracker.add(_DATA_PARALLEL_RNG_TRACKER_NAME, base)
    return base


model_parallel_cuda_manual_seed = model_parallel_seed


# ---- activation recomputation ----------------------------------------------------------------


class CheckpointFunction(torch.autograd.Function):
    """Run ``fn`` without saving activations; rerun it in backward under the forward's RNG states.

    ``args`` may mix tensors and other objects; only tensors are saved. With
    ``distribute_saved_activations`` the first argument is kept as this TP rank's ``1/tp`` flat
    slice and all-gathered back before recomputation.
    """

    @staticmethod
    def forward(ctx, fn, distribute_saved_activations, group, *args):
        ctx.fn, ctx.group = fn, group
        ctx.distribute = distribute_saved_activations and group_size(group) > 1
        ctx.rng_state = get_device_rng_state()
        ctx.tracker_states = get_rng_tracker().get_states()
        with torch.no_grad():
            outputs = fn(*args)
        saved = list(args)
        if ctx.distribute:
            if not torch.is_tensor(args[0]):
                raise ValueError("distribute_saved_activations needs a tensor first argument")
            ctx.first_shape = args[0].shape
            saved[0] = split_tensor_into_1d_equal_chunks(args[0].detach(), group)
        ctx.tensor_index = [i for i, a in enumerate(saved) if torch.is_tensor(a)]
        ctx.inputs_need_grad = [torch.is_tensor(a) and a.requires_grad for a in args]
        ctx.others = [None if torch.is_tensor(a) else a for a in saved]
        ctx.save_for_backward(*[saved[i] for i in ctx.tensor_index])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpoint() is not compatible with torch.autograd.grad(); "
                               "use .backward()")
        inputs = list(ctx.others)
        for i, t in zip(ctx.tensor_index, ctx.saved_tensors):
            inputs[i] = t
        if ctx.distribute:
            inputs[0] = gather_split_1d_tensor(inputs[0], ctx.first_shape, ctx.group)
        detached = [t.detach().requires_grad_(rg) if torch.is_tensor(t) else t
                    for t, rg in zip(inputs, ctx.inputs_need_grad)]

        backward_state, backward_tracker = get_device_rng_state(), get_rng_tracker().get_states()
        set_device_rng_state(ctx.rng_state)
        get_rng_tracker().set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*detached)
        finally:
            set_device_rng_state(backward_state)
            get_rng_tracker().set_states(backward_tracker)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(t.grad if torch.is_tensor(t) and t.requires_grad else None
                      for t in detached)
        return (None, None, None) + grads


def checkpoint(function, distribute_saved_activations: bool, *args, group=TP_GROUP):
    """``function(*args)`` with its activations recomputed in the backward pass.

    The CPU/CUDA default RNG states and the tracker's named states at this call are restored for
    the recomputation, so dropout inside ``function`` (forked or not) draws the same masks.
    ``distribute_saved_activations`` keeps only a ``1/tp`` slice of ``args[0]`` per TP rank of
    ``group`` (it must be replicated across them, as Megatron's hidden states are without
    sequence parallel).
    """
    return CheckpointFunction.apply(function, distribute_saved_activations,
                                    resolve_group(group), *args)
