"""Process groups for tensor, pipeline, data, context, expert, expert-tensor and expert-data
parallelism.

Rank layout is a pure function (:func:`generate_rank_groups`) of the world size, the parallel
sizes and an order string such as ``"tp-cp-ep-dp-pp"``: the first name varies fastest, so TP
ranks are contiguous. Dense groups are built with ``ep=1``; expert groups reuse the same order
with ``tp -> expert_tensor_parallel``, ``cp -> 1`` and ``dp -> expert_data_parallel`` so that
each pipeline stage holds the same set of ranks in both views.

All groups live on one :class:`ParallelState`; the module-level getters read the global one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

ORDER_TOKENS = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"


def parse_order(order: str) -> list[str]:
    """Split ``"tp-cp-ep-dp-pp"`` into tokens, checking it is a permutation of the five names."""
    tokens = order.lower().split("-")
    if sorted(tokens) != sorted(ORDER_TOKENS):
        raise ValueError(
            f"unknown parallel order {order!r}: it must name each of {'-'.join(ORDER_TOKENS)} "
            f"exactly once, separated by '-' (for example {DEFAULT_ORDER!r})"
        )
    return tokens


def generate_rank_groups(
    world_size: int, sizes: dict[str, int], order: str, dims: str | list[str]
) -> list[list[int]]:
    """Rank lists of every group that varies over ``dims`` with all other dimensions fixed.

    ``sizes`` maps each order token to its size (missing tokens mean 1); their product must be
    ``world_size``. The rank of coordinates ``c`` is ``sum(c[d] * stride[d])`` with strides taken
    in ``order`` (first token fastest). Groups are returned sorted by their first rank, ranks
    inside a group in increasing coordinate order.
    """
    tokens = parse_order(order)
    if isinstance(dims, str):
        dims = [d for d in dims.split("-") if d]
    for d in dims:
        if d not in ORDER_TOKENS:
            raise ValueError(f"unknown parallel dimension {d!r}; expected one of {ORDER_TOKENS}")
    full = {t: int(sizes.get(t, 1)) for t in tokens}
    prod = 1
    for t in tokens:
        if full[t] < 1:
            raise ValueError(f"parallel size {t}={full[t]} must be >= 1")
        prod *= full[t]
    if prod != world_size:
        desc = " x ".join(f"{t}={full[t]}" for t in tokens)
        raise ValueError(
            f"parallel sizes {desc} multiply to {prod}, not the world size {world_size}")
    # Axis 0 of the grid is the slowest (last) token; a rank's value is its global rank.
    grid = np.arange(world_size).reshape([full[t] for t in reversed(tokens)])
    axis = {t: len(tokens) - 1 - i for i, t in enumerate(tokens)}
    inner = [axis[t] for t in tokens if t in dims]
    outer = [axis[t] for t in tokens if t not in dims]
    group_size = int(np.prod([full[t] for t in dims])) if dims else 1
    groups = np.sort(grid.transpose(outer + inner).reshape(-1, group_size), axis=1)
    groups = groups[np.argsort(groups[:, 0], kind="stable")]
    return groups.tolist()


@dataclass(frozen=True)
class ParallelSizes:
    """Validated parallel sizes for one world. ``edp`` (expert data parallel) is derived."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    order: str = DEFAULT_ORDER

    def __post_init__(self):
        parse_order(self.order)
        names = {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                 "context_parallel_size": self.cp, "expert_model_parallel_size": self.ep,
                 "expert_tensor_parallel_size": self.expert_tp}
        for name, v in names.items():
            if v < 1:
                raise ValueError(f"{name}={v} must be >= 1")
        model = self.tp * self.pp * self.cp
        if self.world_size % model:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tp}) x pipeline_model_parallel_size ({self.pp}) x context_parallel_size "
                f"({self.cp}) = {model}; choose sizes whose product divides the number of ranks"
            )
        expert = self.expert_tp * self.ep * self.pp
        if self.world_size % expert:
            raise ValueError(
                f"world size {self.world_size} is not divisible by expert_tensor_parallel_size "
                f"({self.expert_tp}) x expert_model_parallel_size ({self.ep}) x "
                f"pipeline_model_parallel_size ({self.pp}) = {expert}; reduce the expert sizes "
                f"or use a world size that is a multiple of {expert}"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.expert_tp * self.ep * self.pp)

    def dense_sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp}

    def expert_sizes(self) -> dict[str, int]:
        return {"tp": self.expert_tp, "cp": 1, "ep": self.ep, "dp": self.edp, "pp": self.pp}


# Each group kind: (layout, dims). "dense" uses dense_sizes, "expert" uses expert_sizes.
GROUP_KINDS: dict[str, tuple[str, str]] = {
    "tensor_model_parallel": ("dense", "tp"),
    "pipeline_model_parallel": ("dense", "pp"),
    "data_parallel": ("dense", "dp"),
    "data_parallel_with_cp": ("dense", "cp-dp"),
    "context_parallel": ("dense", "cp"),
    "tensor_and_context_parallel": ("dense", "tp-cp"),
    "tensor_and_data_parallel_with_cp": ("dense", "tp-cp-dp"),
    "model_parallel": ("dense", "tp-pp"),
    "expert_model_parallel": ("expert", "ep"),
    "expert_tensor_parallel": ("expert", "tp"),
    "expert_data_parallel": ("expert", "dp"),
    "expert_tensor_and_model_parallel": ("expert", "tp-ep"),
}


def all_rank_groups(sizes: ParallelSizes) -> dict[str, list[list[int]]]:
    """Every group kind's rank lists, plus the embedding group (first and last pipeline stage).

    Raises ``ValueError`` when the expert layout places pipeline stages differently from the dense
    layout (only possible with an order string that puts ``pp`` inside the other dimensions and
    ``expert_tensor_parallel_size != tensor_model_parallel_size``).
    """
    out = {}
    for kind, (layout, dims) in GROUP_KINDS.items():
        s = sizes.dense_sizes() if layout == "dense" else sizes.expert_sizes()
        out[kind] = generate_rank_groups(sizes.world_size, s, sizes.order, dims)
    pp_expert = generate_rank_groups(sizes.world_size, sizes.expert_sizes(), sizes.order, "pp")
    if pp_expert != out["pipeline_model_parallel"]:
        raise ValueError(
            f"order {sizes.order!r} with expert_tensor_parallel_size={sizes.expert_tp} != "
            f"tensor_model_parallel_size={sizes.tp} puts pipeline stages on different ranks for "
            "expert and dense layers; put 'pp' last in the order or make the two sizes equal"
        )
    out["embedding"] = [sorted({g[0], g[-1]}) for g in out["pipeline_model_parallel"]]
    return out


@dataclass
class ParallelState:
    """Process groups of one parallel layout, as seen from one rank.

    ``groups[kind]`` is the ``ProcessGroup`` this rank belongs to (``None`` when the world has one
    rank, meaning "no communication"); ``ranks[kind]`` is its global rank list.
    """

    sizes: ParallelSizes
    rank: int = 0
    groups: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)

    # ---- sizes and ranks -------------------------------------------------------------------
    def world_size_of(self, kind: str) -> int:
        return len(self.ranks[kind])

    def rank_in(self, kind: str) -> int:
        return self.ranks[kind].index(self.rank)

    def group(self, kind: str):
        return self.groups.get(kind)

    @property
    def tp_size(self) -> int:
        return self.sizes.tp

    @property
    def tp_rank(self) -> int:
        return self.rank_in("tensor_model_parallel")

    @property
    def tp_group(self):
        return self.group("tensor_model_parallel")

    @property
    def pp_size(self) -> int:
        return self.sizes.pp

    @property
    def pp_rank(self) -> int:
        return self.rank_in("pipeline_model_parallel")

    @property
    def pp_group(self):
        return self.group("pipeline_model_parallel")

    @property
    def dp_size(self) -> int:
        return self.sizes.dp

    @property
    def dp_rank(self) -> int:
        return self.rank_in("data_parallel")

    @property
    def dp_group(self):
        return self.group("data_parallel")

    @property
    def cp_size(self) -> int:
        return self.sizes.cp

    @property
    def cp_group(self):
        return self.group("context_parallel")

    @property
    def ep_size(self) -> int:
        return self.sizes.ep

    @property
    def ep_rank(self) -> int:
        return self.rank_in("expert_model_parallel")

    @property
    def ep_group(self):
        return self.group("expert_model_parallel")

    @property
    def etp_size(self) -> int:
        return self.sizes.expert_tp

    @property
    def etp_rank(self) -> int:
        return self.rank_in("expert_tensor_parallel")

    @property
    def etp_group(self):
        return self.group("expert_tensor_parallel")

    @property
    def edp_size(self) -> int:
        return self.sizes.edp

    @property
    def edp_group(self):
        return self.group("expert_data_parallel")

    def is_pipeline_first_stage(self) -> bool:
        return self.pp_rank == 0

    def is_pipeline_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def single(cls) -> ParallelState:
        """The layout of a one-process run: every group has one rank and no communicator."""
        sizes = ParallelSizes(world_size=1)
        return cls(sizes=sizes, rank=0, groups={}, ranks={k: v[0] for k, v in
                                                          all_rank_groups(sizes).items()})

    @classmethod
    def build(cls, sizes: ParallelSizes, backend: str | None = None,
              timeout: timedelta | None = None) -> ParallelState:
        """Create every group with ``torch.distributed.new_group`` (collective over the world).

        Each group is named after its kind (``group_desc``, shown in NCCL's watchdog errors)
        and gets ``timeout``; None means the world group's own timeout (what
        ``init_process_group`` was given), not torch's 30-minute default for new groups.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != sizes.world_size:
            raise ValueError(f"sizes describe {sizes.world_size} ranks but the world has {world}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = cls(sizes=sizes, rank=rank)
        if world > 1 and timeout is None:
            timeout = world_timeout()
        for kind, rank_lists in all_rank_groups(sizes).items():
            for ranks in rank_lists:
                # new_group is collective: every rank must call it for every group, in order.
                pg = dist.new_group(ranks, backend=backend, timeout=timeout,
                                    group_desc=kind) if world > 1 else None
                if rank in ranks:
                    state.groups[kind] = pg
                    state.ranks[kind] = ranks
        return state


def world_timeout() -> timedelta | None:
    """Timeout of the default (world) process group; None where torch does not expose it."""
    world = dist.group.WORLD
    device = torch.device("cuda" if dist.get_backend(world) == "nccl" else "cpu")
    try:  # torch keeps it on the backend's options only (no public getter as of 2.13)
        return world._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None


_GLOBAL_STATE: ParallelState | None = None
_SINGLE_STATE: ParallelState | None = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    order: str = DEFAULT_ORDER,
    backend: str | None = None,
    distributed_timeout_minutes: float | None = None,
) -> ParallelState:
    """Build all process groups for the current world and make them the global state.

    ``torch.distributed`` must be initialised when the world has more than one rank. Every
    group gets ``distributed_timeout_minutes`` (fractions allowed; None: the world group's
    timeout), so a stalled or dead rank fails the collectives of the others within it.
    """
    global _GLOBAL_STATE
    if _GLOBAL_STATE is not None:
        raise ValueError(
            "initialize_model_parallel was already called; call destroy_model_parallel() first "
            "to change the layout"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    sizes = ParallelSizes(
        world_size=world, tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size,
        cp=context_parallel_size, ep=expert_model_parallel_size,
        etp=expert_tensor_parallel_size, order=order,
    )
    all_rank_groups(sizes)  # validate before creating any communicator
    timeout = None
    if distributed_timeout_minutes is not None:
        if not distributed_timeout_minutes > 0:
            raise ValueError(f"distributed_timeout_minutes={distributed_timeout_minutes} must "
                             "be > 0 (minutes; fractions such as 0.5 are allowed)")
        timeout = timedelta(minutes=distributed_timeout_minutes)
    _GLOBAL_STATE = ParallelState.build(sizes, backend=backend, timeout=timeout)
    return _GLOBAL_STATE


def model_parallel_is_initialized() -> bool:
    return _GLOBAL_STATE is not None


_DESTROY_HOOKS: list = []


def register_destroy_hook(fn) -> None:
    """Call ``fn()`` from :func:`destroy_model_parallel` (e.g. to free buffers bound to groups)."""
    if fn not in _DESTROY_HOOKS:
        _DESTROY_HOOKS.append(fn)


def destroy_model_parallel() -> None:
    global _GLOBAL_STATE
    for fn in _DESTROY_HOOKS:
        fn()
    _GLOBAL_STATE = None


def get_parallel_state() -> ParallelState:
    """The global state; a one-rank state when nothing was initialised and the world is 1."""
    global _SINGLE_STATE
    if _GLOBAL_STATE is not None:
        return _GLOBAL_STATE
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "moecore.parallel_state.initialize_model_parallel() must be called before building "
            "parallel modules in a multi-rank job"
        )
    if _SINGLE_STATE is None:
        _SINGLE_STATE = ParallelState.single()
    return _SINGLE_STATE


def _make_getters(kind: str):
    def group():
        return get_parallel_state().group(kind)

    def rank() -> int:
        return get_parallel_state().rank_in(kind)

    def world_size() -> int:
        return get_parallel_state().world_size_of(kind)

    return group, rank, world_size


(get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
 get_tensor_model_parallel_world_size) = _make_getters("tensor_model_parallel")
(get_pipeline_model_parallel_group, get_pipeline_model_parallel_rank,
 get_pipeline_model_parallel_world_size) = _make_getters("pipeline_model_parallel")
(get_data_parallel_group, get_data_parallel_rank,
 get_data_parallel_world_size) = _make_getters("data_parallel")
(get_context_parallel_group, get_context_parallel_rank,
 get_context_parallel_world_size) = _make_getters("context_parallel")
(get_expert_model_parallel_group, get_expert_model_parallel_rank,
 get_expert_model_parallel_world_size) = _make_getters("expert_model_parallel")
(get_expert_tensor_parallel_group, get_expert_tensor_parallel_rank,
 get_expert_tensor_parallel_world_size) = _make_getters("expert_tensor_parallel")
(get_expert_data_parallel_group, get_expert_data_parallel_rank,
 get_expert_data_parallel_world_size) = _make_getters("expert_data_parallel")
(get_embedding_group, _, _) = _make_getters("embedding")


def is_pipeline_first_stage() -> bool:
    return get_parallel_state().is_pipeline_first_stage()


def is_pipeline_last_stage() -> bool:
    return get_parallel_state().is_pipeline_last_stage()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"
