"""``--ckpt-format torch_dist``: one checkpoint on ``torch.distributed.checkpoint`` (DCP) that
loads under any TP/PP/EP/DP layout, resharding on load.

Layout under ``--save`` (the tracker and ``iter_XXXXXXX`` names of the ``torch`` format)::

    latest_checkpointed_iteration.txt
    iter_0001000/.metadata, __<rank>_0.distcp     # DCP: every global tensor, saved once
    iter_0001000/common.pt                         # iteration, data position, scheduler, args
    iter_0001000/rng/rank_<rank>.pt                # each rank's RNG states

Every model tensor is saved as its slice of the global (single-rank model) tensor
(:mod:`moecore.checkpointing.dist_slices`: global layer and expert numbers, TP/expert-TP
offsets); data-parallel replicas write the same slice, which DCP keeps once. The optimizer
state is saved in the per-parameter form of :mod:`moecore.optimizer.full_state` (fp32 main
value and Adam's moments of every parameter, the distributed optimizer's shards gathered first)
under the same keys, so it reshards with the model. Loading asks DCP for this rank's slices
under the current layout; DCP reads the overlapping parts of whatever slices were saved.

RNG states are per rank and restored only when the layout (world size and every parallel size)
is unchanged; under a new layout the run keeps its own seeded states and says so (dropout and
router-jitter streams then differ from an uninterrupted run; nothing else does).

Atomic publish as in the ``torch`` format: everything goes into ``iter_N.tmp/``, then rank 0
renames it to ``iter_N/`` and only then replaces the tracker. ``--async-save`` copies the state
to host memory and writes it with ``dcp.async_save`` on a dedicated gloo group (its collectives
run in a background thread and must not interleave with training's); the rename and tracker
follow in :func:`finalize_async_save`.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from moecore.checkpointing.common import (
    CheckpointError,
    _fsync_dir,
    _replace_tracker,
    get_rng_state,
    iteration_dir,
    published_iteration_dir,
    set_rng_state,
)
from moecore.checkpointing.dist_slices import (
    GlobalSlice,
    SliceLoadPlanner,
    SliceSavePlanner,
    global_slices,
    model_slices,
    param_names,
)
from moecore.optimizer.distributed import DistributedOptimizer
from moecore.optimizer.full_state import (
    FULL_STATE_FORMAT,
    MOMENTS,
    group_hparams,
    plain_state_to_full,
)
from moecore.parallel_state import ParallelState

FORMAT = "torch_dist"
COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
FIELDS = ("main",) + MOMENTS


def checkpoint_format(directory: str) -> str | None:
    """``"torch_dist"`` or ``"torch"``: the format of the iteration directory ``directory``
    (None when it holds neither)."""
    if os.path.isfile(os.path.join(directory, METADATA_FILE)):
        return FORMAT
    if os.path.isdir(directory) and any(d.startswith("mp_rank_") for d in os.listdir(directory)):
        return "torch"
    return None


# ---- collectives ------------------------------------------------------------------------------
_GROUP: tuple[object, object] | None = None  # (default group it belongs to, gloo group)


def _group():
    """A gloo group of all ranks for DCP's planning collectives (collective on first use)."""
    global _GROUP
    if not dist.is_initialized():
        return None
    world = dist.distributed_c10d._get_default_group()
    if _GROUP is None or _GROUP[0] is not world:
        _GROUP = (world, dist.new_group(backend="gloo"))
    return _GROUP[1]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _layout(ps: ParallelState) -> dict:
    s = ps.sizes
    return {"world_size": s.world_size, "tp": s.tp, "pp": s.pp, "cp": s.cp, "ep": s.ep,
            "etp": s.expert_tp, "order": s.order}


# ---- optimizer state as slices -----------------------------------------------------------------
def _full_optimizer_state(optimizer) -> dict:
    """The per-parameter optimizer state (collective over data parallel for the distributed
    optimizer, so every rank calls it)."""
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.state_dict(keep=True)
    return plain_state_to_full(optimizer.state_dict(), optimizer.model_params)


def _optimizer_slices(params: list[dict], chunks: list[nn.Module], optimizer, ps: ParallelState
                      ) -> dict[str, GlobalSlice]:
    """``{"optimizer.<field>.<global key>": slice}`` of the per-parameter ``params`` (each
    ``{"main", "exp_avg", "exp_avg_sq"}``, shaped like its parameter)."""
    out = {}
    for (name, info), state in zip(param_names(chunks, optimizer.model_params), params):
        for f in FIELDS:
            for key, s in global_slices(name, state[f], ps, info):
                out[f"optimizer.{f}.{key}"] = s
    return out


# ---- save -------------------------------------------------------------------------------------
class _Pending:
    """A ``dcp.async_save`` in flight and what publishing it needs."""

    def __init__(self, root: str, iteration: int, tmp_dir: str, final_dir: str, future: Future):
        self.root, self.iteration, self.tmp_dir, self.final_dir = root, iteration, tmp_dir, \
            final_dir
        self.future = future


class _Staged:
    """DCP stager for a state already copied to host memory (``dcp.async_save`` then writes it
    as given)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


_PENDING: _Pending | None = None


def _host_copy(state: dict[str, GlobalSlice]) -> dict[str, GlobalSlice]:
    return {k: GlobalSlice(s.local.detach().to("cpu", copy=True), s.global_shape, s.offsets)
            for k, s in state.items()}


def _publish(root: str, iteration: int, tmp_dir: str, final_dir: str) -> None:
    """Rank 0 renames the complete ``tmp_dir`` into place, then replaces the tracker
    (collective; the previous checkpoint stays the latest until the tracker moves)."""
    _barrier()
    if _rank() == 0:
        old = final_dir + ".old"
        if os.path.exists(final_dir):  # the iteration saved again (e.g. after a restart)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _replace_tracker(root, iteration)
    _barrier()


def finalize_async_save() -> None:
    """Complete a pending torch_dist ``--async-save`` (collective): wait for DCP's write, then
    publish. A failed write raises here and the previous checkpoint stays the latest."""
    global _PENDING
    pending, _PENDING = _PENDING, None
    if pending is None:
        return
    error = None
    try:
        pending.future.result()
    except BaseException as e:  # noqa: BLE001 - every rank must learn of any rank's failure
        error = e
    failed = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(failed, error is not None)
    else:
        failed = [error is not None]
    if any(failed):
        raise CheckpointError(
            f"--async-save of iteration {pending.iteration} to {pending.root} failed on ranks "
            f"{[r for r, f in enumerate(failed) if f]} (this rank: {error!r}); the latest "
            "complete checkpoint is still the previous one") from error
    _publish(pending.root, pending.iteration, pending.tmp_dir, pending.final_dir)


def save(iteration: int, chunks: list[nn.Module], optimizer, scheduler, config,
         data_state: dict | None, ps: ParallelState) -> str:
    """Save iteration ``iteration`` under ``config.save`` (a ``CheckpointConfig``) in the
    torch_dist format (collective). Returns the iteration directory."""
    global _PENDING
    finalize_async_save()
    root = config.save
    final_dir = iteration_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    if hasattr(optimizer, "sync_params"):
        optimizer.sync_params()  # background parameter all-gathers must have landed
    state = model_slices(chunks, ps)
    common = {"checkpoint_format": FORMAT, "iteration": iteration, "args": config.run_args,
              "parallel_layout": _layout(ps), **(data_state or {})}
    if not config.no_save_optim:
        full = _full_optimizer_state(optimizer)
        state.update(_optimizer_slices(full["params"], chunks, optimizer, ps))
        common["optimizer"] = {"step": full["step"], "param_groups": full["param_groups"],
                               "grad_scaler": full["grad_scaler"]}
        common["opt_param_scheduler"] = scheduler.state_dict()
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crashed save
        os.makedirs(os.path.join(tmp_dir, "rng"))
        torch.save(common, os.path.join(tmp_dir, COMMON_FILE))
    _barrier()
    if not config.no_save_rng:
        torch.save(get_rng_state(), os.path.join(tmp_dir, "rng", f"rank_{_rank():05d}.pt"))
    writer = FileSystemWriter(tmp_dir)
    if config.async_save:
        future = dcp.async_save(_host_copy(state), storage_writer=writer,
                                planner=SliceSavePlanner(), process_group=_group(),
                                async_stager=_Staged())
        _PENDING = _Pending(root, iteration, tmp_dir, final_dir, future)
        return final_dir
    dcp.save(state, storage_writer=writer, planner=SliceSavePlanner(), process_group=_group())
    _publish(root, iteration, tmp_dir, final_dir)
    return final_dir


# ---- load -------------------------------------------------------------------------------------
def read_common(directory: str) -> dict:
    """The iteration directory's ``common.pt`` (iteration, args, data position, scheduler)."""
    path = os.path.join(directory, COMMON_FILE)
    try:
        common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - missing, truncated, unpicklable
        raise CheckpointError(f"torch_dist checkpoint file {path} is missing or unreadable "
                              f"({type(e).__name__}); restore it or point --load at another "
                              "checkpoint") from e
    if not isinstance(common, dict) or common.get("checkpoint_format") != FORMAT:
        raise CheckpointError(f"{path} is not a moecore torch_dist checkpoint's common state")
    return common


def _dcp_load(state: dict, directory: str) -> None:
    try:
        dcp.load(state, storage_reader=FileSystemReader(directory), planner=SliceLoadPlanner(),
                 process_group=_group())
    except (CheckpointException, RuntimeError, ValueError) as e:
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        first = str(cause).strip().splitlines()
        raise CheckpointError(
            f"torch_dist checkpoint {directory} does not fit this model "
            f"({first[0][:300] if first else type(cause).__name__}); the model flags (sizes, "
            "vocab padding: --make-vocab-size-divisible-by x TP, expert form: "
            "--moe-grouped-gemm) differ from the run that saved it") from e


def _load_rng(directory: str, common: dict, ps: ParallelState) -> None:
    path = os.path.join(directory, "rng", f"rank_{_rank():05d}.pt")
    if common.get("parallel_layout") == _layout(ps) and os.path.isfile(path):
        set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    elif _rank() == 0:
        print(f"WARNING: {directory} was saved with layout {common.get('parallel_layout')}; "
              f"this run uses {_layout(ps)}: its RNG states stay those of --seed (dropout and "
              "router jitter differ from an uninterrupted run)", flush=True)


def load(chunks: list[nn.Module], optimizer, scheduler, config, ps: ParallelState, root: str,
         iteration: int) -> dict:
    """Load iteration ``iteration`` of ``root`` (torch_dist) into this run's layout (collective).
    ``config`` is a ``CheckpointConfig``; returns what :func:`moecore.checkpointing.
    load_checkpoint` returns."""
    directory = published_iteration_dir(root, iteration)
    common = read_common(directory)
    state = model_slices(chunks, ps)
    finetune = config.finetune
    load_optim = not finetune and not config.no_load_optim and "optimizer" in common
    params = []
    if load_optim:
        params = [{f: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                   for f in FIELDS} for p in optimizer.model_params]
        state.update(_optimizer_slices(params, chunks, optimizer, ps))
    _dcp_load(state, directory)
    if load_optim:
        saved = common["optimizer"]
        full = {"format": FULL_STATE_FORMAT, "step": int(saved["step"]),
                "param_groups": [group_hparams(g) for g in optimizer.param_groups],
                "params": params, "grad_scaler": saved.get("grad_scaler")}
        try:
            optimizer.load_state_dict(full)
            # The scheduler sets every group's lr and weight decay for the saved step.
            scheduler.load_state_dict(common["opt_param_scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"torch_dist checkpoint {directory}: optimizer/scheduler "
                                  f"state does not fit this run ({e}); pass --no-load-optim to "
                                  "load the model only") from e
    else:
        optimizer.reload_model_params()
    if not finetune and not config.no_load_rng:
        _load_rng(directory, common, ps)
    _barrier()
    if finetune:
        return {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
    return {"iteration": int(common["iteration"]),
            "consumed_train_samples": int(common.get("consumed_train_samples", 0)),
            "consumed_valid_samples": int(common.get("consumed_valid_samples", 0))}
