"""Per-rank checkpoints in Megatron's ``torch`` layout, saved atomically.

Layout under ``--save``::

    latest_checkpointed_iteration.txt          # "1000": the newest complete checkpoint
    iter_0001000/mp_rank_{tp:02d}[_{pp:03d}]_{ep:03d}/model_optim_rng.pt

One file per distinct model shard: ranks with the same (tp, pp, ep[, etp]) coordinates hold
identical parameters (data-parallel replicas), and the lowest such rank writes it, including
the RNG states of all its replicas. A file holds the model (``model``, or ``model0``,
``model1``, ... for the chunks of an interleaved pipeline) and optimizer state (fp32 main params
and loss scaler included), the LR scheduler, every RNG state (Python, NumPy, torch CPU/CUDA, the
TP/EP tracker), the iteration, the data position (consumed samples) and the args.

The distributed optimizer's sharded state is gathered over the data-parallel group into a
per-parameter form before saving (:mod:`moecore.optimizer.distributed`), so the file does not
depend on the data-parallel size: a run saved at DP=4 resumes at DP=2 (same tp/pp/ep).

Atomicity: every rank writes into ``iter_XXXXXXX.tmp/``; after a barrier rank 0 renames it to
``iter_XXXXXXX/`` and only then replaces the tracker file (write to a temp file + rename). A
crash at any point leaves the previous checkpoint and tracker untouched.

Integrity: each file gets a CRC32 sidecar ``model_optim_rng.pt.crc32``
(:mod:`~moecore.checkpointing.checksum`), verified at load; a mismatch names the file. Files
saved before checksums load with a one-line note. With ``--ckpt-fallback-to-previous`` a
corrupt newest checkpoint (on any rank) makes every rank load the newest earlier intact one.

``--async-save``: the state is copied to host memory (training may then change the model) and
each writer writes its file in a background thread while training goes on; the checkpoint is
published as soon as every rank's write has finished (:mod:`~moecore.checkpointing.async_save`:
a per-iteration non-blocking check, the next save, the end of training, or an abort). Until
then the previous checkpoint stays the latest one.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch import nn

from moecore import backends
from moecore.checkpointing import async_save as async_saves
from moecore.checkpointing import checksum, dist_format
from moecore.checkpointing.async_save import (
    AsyncSave,
    maybe_finalize_async_save,
    publish_completed_async_save,
    submit,
)
from moecore.checkpointing.common import (  # noqa: F401 - re-exported
    TRACKER_FILENAME,
    _fsync_dir,
    _replace_tracker,
    get_rng_state,
    iteration_dir,
    published_iteration_dir,
    read_tracker,
    set_rng_state,
)
from moecore.checkpointing.errors import CheckpointError, CorruptCheckpointError
from moecore.parallel_state import ParallelState, get_parallel_state

CHECKPOINT_FILENAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 1
__all__ = ["CheckpointConfig", "CheckpointError", "CorruptCheckpointError", "finalize_async_save",
           "load_checkpoint", "maybe_finalize_async_save", "publish_completed_async_save",
           "read_tracker", "save_checkpoint"]

def args_to_dict(args: argparse.Namespace) -> dict:
    """Plain-Python view of ``args`` (str/int/float/bool/None/lists) for checkpoints and logs."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(
                x is None or isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = repr(v)
    return out


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and what :func:`save_checkpoint` / :func:`load_checkpoint` write and read; field
    names are the flags' ``dest`` (built once by :meth:`from_args`)."""

    save: str | None = None
    """Directory checkpoints are saved under (``--save``)."""
    load: str | None = None
    """Directory whose latest checkpoint is loaded (``--load``)."""
    async_save: bool = False
    """Write the files in a background thread; the save completes at the next
    :func:`finalize_async_save`."""
    no_save_optim: bool = False
    """Leave the optimizer and scheduler state out of saves."""
    no_save_rng: bool = False
    """Leave the RNG states out of saves."""
    no_load_optim: bool = False
    """Load the model only (the fp32 main params are refreshed from it)."""
    no_load_rng: bool = False
    """Keep this run's RNG states instead of the checkpoint's."""
    finetune: bool = False
    """Load the model only and restart at iteration 0."""
    exit_on_missing_checkpoint: bool = False
    """Raise instead of training from scratch when ``load`` holds no checkpoint."""
    overwrite_checkpoints: bool = False
    """Let a run replace checkpoints in ``save`` beyond its start iteration (otherwise refused
    at start-up, :func:`moecore.checkpointing.guards.check_no_overwrite`)."""
    ckpt_fallback_to_previous: bool = False
    """When the newest checkpoint is corrupt (checksum or unpickling fails on some rank), load
    the newest earlier intact one instead of raising."""
    ckpt_format: str = "torch"
    """Format saves are written in: ``torch`` (per-rank files, this module) or ``torch_dist``
    (DCP, any layout on load: :mod:`moecore.checkpointing.dist_format`)."""
    auto_detect_ckpt_format: bool = False
    """Load whichever format ``load`` holds instead of requiring ``ckpt_format``."""
    run_args: dict = field(default_factory=dict)
    """The run's args (:func:`args_to_dict`), saved with every checkpoint as ``args``."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CheckpointConfig:
        """The config of validated ``pretrain_gpt.py`` args (``--no-*`` flags default to None
        there, as in Megatron: read as False)."""
        values = {f.name: vars(args)[f.name] for f in fields(cls) if f.name != "run_args"}
        flags = {f.name for f in fields(cls) if f.type == "bool"}
        values = {k: bool(v) if k in flags else v for k, v in values.items()}
        return cls(**values, run_args=args_to_dict(args))


# ---- paths -----------------------------------------------------------------------------------
def shard_key(ps: ParallelState) -> tuple[int, int, int, int]:
    """(tp, pp, ep, etp) ranks: the coordinates that decide which parameters a rank holds."""
    return (ps.tp_rank, ps.pp_rank, ps.ep_rank, ps.etp_rank)


def shard_dirname(ps: ParallelState) -> str:
    tp, pp, ep, etp = shard_key(ps)
    name = f"mp_rank_{tp:02d}"
    if ps.pp_size > 1:
        name += f"_{pp:03d}"
    name += f"_{ep:03d}"
    if ps.etp_size != ps.tp_size:  # expert shards then vary independently of the dense ones
        name += f"_etp{etp:02d}"
    return name


def checkpoint_file(root: str, iteration: int, ps: ParallelState | None = None) -> str:
    ps = ps or get_parallel_state()
    return os.path.join(published_iteration_dir(root, iteration), shard_dirname(ps),
                        CHECKPOINT_FILENAME)


# ---- collectives -----------------------------------------------------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _all_gather(obj) -> list:
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _write_file(obj: dict, path: str) -> None:
    """Write one shard file, then its CRC32 sidecar, each durably (flushed and fsynced; the
    sidecar by temp file + rename, so its presence means the shard is complete). A full disk
    raises :class:`CheckpointError` naming the file (the ``.tmp`` directory is left for cleanup;
    the published checkpoints and the tracker are untouched)."""
    try:
        with open(path, "wb") as f:
            out = checksum.ChecksumWriter(f)
            torch.save(obj, out)
            f.flush()
            os.fsync(f.fileno())
        tmp = checksum.sidecar(path) + ".tmp"
        with open(tmp, "w") as f:
            f.write(out.record())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, checksum.sidecar(path))
    except (OSError, RuntimeError) as e:
        raise _write_error(path, e) from e


def _write_error(path: str, e: BaseException) -> BaseException:
    """``e`` of a failed write as a one-line :class:`CheckpointError` when the disk is full
    (torch.save reports ENOSPC as "enforce fail ... unexpected pos") or another I/O error; any
    other error unchanged."""
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "unexpected pos" in str(e) or "No space left" in str(e)
    if not full and not isinstance(e, OSError):
        return e
    why = "disk full (or quota exceeded)" if full else f"{type(e).__name__}: {e}"
    return CheckpointError(f"writing checkpoint file {path} failed: {why}; the previous "
                           "checkpoint is intact; free space (the partial "
                           f"{os.path.dirname(os.path.dirname(path))} may be deleted)")


# ---- save ------------------------------------------------------------------------------------
def _to_host(obj):
    """A copy of ``obj`` with every tensor in host memory (device tensors copied, host tensors
    cloned), so training can go on changing the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def finalize_async_save() -> None:
    """Complete a pending ``--async-save`` of either format (collective: every rank calls it at
    the same point): wait for the writes, then publish; a failed write raises here and the
    previous checkpoint stays the latest."""
    dist_format.finalize_async_save()
    async_saves.finalize_async_save()


def _publish(root: str, iteration: int, tmp_dir: str, final_dir: str, is_root: bool) -> None:
    """After every shard is written: rank 0 (``is_root``) renames the iteration directory into
    place, then the tracker (collective)."""
    _barrier()
    if is_root:
        _rename_into_place(root, iteration, tmp_dir, final_dir)
    _barrier()


def _rename_into_place(root: str, iteration: int, tmp_dir: str, final_dir: str) -> None:
    """Rank 0's part of :func:`_publish` (no collectives): the directory, then the tracker."""
    old = final_dir + ".old"
    if os.path.exists(final_dir):  # saving an iteration again (e.g. after a resume)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_dir, old)  # until the next rename, readers use .old
    os.rename(tmp_dir, final_dir)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    _replace_tracker(root, iteration)


def save_checkpoint(iteration: int, model: nn.Module | list[nn.Module], optimizer, scheduler,
                    config: CheckpointConfig, data_state: dict | None = None,
                    parallel_state: ParallelState | None = None) -> str:
    """Save this rank's shard of iteration ``iteration`` under ``config.save`` (collective).

    ``data_state``: ``{"consumed_train_samples": int, "consumed_valid_samples": int}``.
    ``config.no_save_optim`` / ``no_save_rng`` leave those parts out. With ``async_save`` the
    file is written in the background and the save completes at the next
    :func:`finalize_async_save` or earlier (see :mod:`~moecore.checkpointing.async_save`; the
    next save finalizes it first). Returns the iteration directory.
    """
    finalize_async_save()
    ps = parallel_state or get_parallel_state()
    if config.ckpt_format == dist_format.FORMAT:
        return dist_format.save(iteration, _chunks(model), optimizer, scheduler, config,
                                data_state, ps)
    async_save = config.async_save
    chunks = _chunks(model)
    root = config.save
    final_dir = iteration_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    key = shard_key(ps)
    gathered = _all_gather((ps.rank, key, shard_dirname(ps),
                            None if config.no_save_rng else get_rng_state()))
    sharers = sorted((r, rng) for r, k, _, rng in gathered if k == key)
    is_writer = sharers[0][0] == ps.rank
    if hasattr(optimizer, "sync_params"):
        optimizer.sync_params()  # background parameter all-gathers must have landed
    optim_state = None
    if not config.no_save_optim:
        if getattr(optimizer, "grad_sync", None) is not None and \
                getattr(optimizer.grad_sync, "shard", False):
            # Distributed optimizer: gathers over data parallel, so every rank takes part.
            optim_state = optimizer.state_dict(keep=is_writer)
        elif is_writer:
            optim_state = optimizer.state_dict()
    if ps.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crashed save
        os.makedirs(tmp_dir)
    _barrier()
    if is_writer:
        state = {
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            **_model_states(chunks),
            "args": {**config.run_args, "kernel_backends": backends.chosen()},
            "parallel_layout": _layout(ps, len(chunks)), "rng_ranks": [r for r, _ in sharers],
            **(data_state or {}),
        }
        if not config.no_save_optim:
            state["optimizer"] = optim_state
            state["opt_param_scheduler"] = scheduler.state_dict()
        if not config.no_save_rng:
            state["rng_state"] = [rng for _, rng in sharers]
        shard_dir = os.path.join(tmp_dir, shard_dirname(ps))
        os.makedirs(shard_dir, exist_ok=True)
        path = os.path.join(shard_dir, CHECKPOINT_FILENAME)
        if async_save:
            state = _to_host(state)  # blocking copies: the live tensors may change after this
        else:
            _write_file(state, path)
    if async_save:
        files = [os.path.join(tmp_dir, d, CHECKPOINT_FILENAME)
                 for d in sorted({d for _, _, d, _ in gathered})]
        submit(AsyncSave(
            iteration, root, files, ps.rank == 0,
            publish=lambda: _publish(root, iteration, tmp_dir, final_dir, ps.rank == 0),
            publish_here=lambda: _rename_into_place(root, iteration, tmp_dir, final_dir),
            write=(lambda: _write_file(state, path)) if is_writer else None))
        return final_dir
    _publish(root, iteration, tmp_dir, final_dir, ps.rank == 0)
    return final_dir


def _layout(ps: ParallelState, num_chunks: int = 1) -> dict:
    s = ps.sizes
    return {"world_size": s.world_size, "tp": s.tp, "pp": s.pp, "cp": s.cp, "ep": s.ep,
            "etp": s.expert_tp, "order": s.order, "vp": num_chunks}


def _chunks(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _model_keys(n: int) -> list[str]:
    """Megatron's keys: ``model`` for one chunk, ``model0``, ``model1``, ... for several."""
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_states(chunks: list[nn.Module]) -> dict:
    return {k: c.state_dict() for k, c in zip(_model_keys(len(chunks)), chunks)}


# ---- load ------------------------------------------------------------------------------------
def _read_shard(path: str, ps: ParallelState) -> dict:
    if not os.path.isfile(path):
        shards = sorted(os.listdir(os.path.dirname(os.path.dirname(path)))) \
            if os.path.isdir(os.path.dirname(os.path.dirname(path))) else []
        raise CheckpointError(
            f"checkpoint file {path} is missing for rank {ps.rank} (shard "
            f"{shard_dirname(ps)}); the iteration directory holds {shards or 'nothing'}. "
            "Was it saved with different parallel sizes or interrupted?")
    return _load_file(path)


_CORRUPT_FIX = ("; restore it, point --load at another checkpoint, or pass "
                "--ckpt-fallback-to-previous to load the newest intact earlier one")


def _verify_checksum(path: str) -> None:
    """:class:`CorruptCheckpointError` when ``path`` does not match its CRC32 sidecar; a
    one-line note (rank 0) for a file saved before checksums."""
    if not os.path.isfile(checksum.sidecar(path)):
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"NOTE: {path} has no checksum file (saved before moecore wrote them); "
                  "loading it unverified", flush=True)
        return
    why = checksum.mismatch(path)
    if why is not None:
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupt: {why}{_CORRUPT_FIX}")


def _load_file(path: str) -> dict:
    """One shard file's state (CPU tensors), checksum verified; :class:`CheckpointError` when
    it is corrupt (:class:`CorruptCheckpointError`), unreadable or not a moecore checkpoint."""
    _verify_checksum(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips, bad pickles, I/O errors
        raise CorruptCheckpointError(
            f"checkpoint file {path} is corrupt or unreadable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}){_CORRUPT_FIX}") from e
    if not isinstance(state, dict) or not ("model" in state or "model0" in state):
        raise CheckpointError(f"checkpoint file {path} has no model state; it is not a moecore "
                              "checkpoint")
    return state


def read_checkpoint_args(root: str) -> dict:
    """The args saved with ``root``'s latest checkpoint (every shard holds the same), for
    ``--use-checkpoint-args``."""
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"--use-checkpoint-args: no checkpoint in --load {root} (no "
                              f"{TRACKER_FILENAME}); drop the flag or point --load at a save")
    directory = published_iteration_dir(root, iteration)
    if dist_format.checkpoint_format(directory) == dist_format.FORMAT:
        return dist_format.read_common(directory).get("args") or {}
    shards = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if not shards:
        raise CheckpointError(f"--use-checkpoint-args: {directory} holds no shard")
    path = os.path.join(directory, shards[0], CHECKPOINT_FILENAME)
    state = _load_file(path)
    if not isinstance(state.get("args"), dict):
        raise CheckpointError(f"checkpoint file {path} holds no args; it was not saved by "
                              "pretrain_gpt.py; drop --use-checkpoint-args")
    return state["args"]


def check_model_state(model: nn.Module, saved: dict, path: str) -> None:
    """Raise :class:`CheckpointError` naming the file and parameter on any key/shape mismatch."""
    current = model.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint file {path} does not match the model: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in current.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint file {path}: parameter {k!r} has shape {tuple(saved[k].shape)} in "
                f"the checkpoint but {tuple(v.shape)} in the model; the model flags (sizes, "
                "vocab, parallel layout) differ from the run that saved it")


def _check_layout(state: dict, ps: ParallelState, path: str, num_chunks: int = 1) -> None:
    saved, ours = state.get("parallel_layout"), _layout(ps, num_chunks)
    if saved is None:
        return
    saved = {"vp": 1, **saved}
    keys = ("tp", "pp", "ep", "etp", "vp")
    if any(saved.get(k) != ours[k] for k in keys):
        desc = lambda d: ", ".join(f"{k}={d.get(k)}" for k in keys)  # noqa: E731
        raise CheckpointError(f"checkpoint file {path} was saved with {desc(saved)} but this run "
                              f"uses {desc(ours)}; resume with the same parallel sizes "
                              "(a different data-parallel size is fine; tools/checkpoint "
                              "reshards the others)")


_ITER_DIR = re.compile(r"iter_(\d{7})(\.old)?$")


def _earlier_iterations(root: str, iteration: int) -> list[int]:
    """The published iterations in ``root`` below ``iteration``, newest first (rank 0's
    listing, so every rank tries the same ones)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    found = {int(m.group(1)) for m in map(_ITER_DIR.match, names) if m}
    return _all_gather(sorted((i for i in found if i < iteration), reverse=True))[0]


def _quarantine(root: str, corrupt: list[int], loaded: int) -> None:
    """Rename the corrupt checkpoints skipped by a fallback to ``iter_N.corrupt`` (kept, out of
    the way of later saves) and point the tracker at the loaded ``loaded`` (rank 0); a
    read-only ``--load`` is left as it is, with a warning."""
    try:
        for it in corrupt:
            src = published_iteration_dir(root, it)
            if os.path.isdir(src):
                os.replace(src, iteration_dir(root, it) + ".corrupt")
                print(f"WARNING: moved corrupt checkpoint {src} to {iteration_dir(root, it)}"
                      ".corrupt", flush=True)
        _replace_tracker(root, loaded)
    except OSError as e:
        print(f"WARNING: could not set the corrupt checkpoints in {root} aside ({e}); a run "
              "saving there will be asked for --overwrite-checkpoints", flush=True)


def _read_agreed(root: str, iteration: int, ps: ParallelState,
                 fallback: bool) -> tuple[int, str, dict]:
    """``(iteration, path, state)`` of this rank's shard of ``iteration``, or with
    ``fallback`` of the newest earlier iteration that no rank finds corrupt (collective: all
    ranks load the same iteration, and a read error on one rank raises on every rank)."""
    candidates = [iteration] + (_earlier_iterations(root, iteration) if fallback else [])
    for it in candidates:
        path = checkpoint_file(root, it, ps)
        try:
            state, error = _read_shard(path, ps), None
        except CheckpointError as e:
            state, error = None, e
        report = None if error is None else (isinstance(error, CorruptCheckpointError), str(error))
        bad = [(r, e) for r, e in enumerate(_all_gather(report)) if e is not None]
        if not bad:
            if it != iteration and ps.rank == 0:
                print(f"WARNING: --ckpt-fallback-to-previous: loaded iteration {it} instead of "
                      f"the newest, {iteration}", flush=True)
                _quarantine(root, [c for c in candidates if c > it], it)
            return it, path, state
        if not (fallback and all(corrupt for _, (corrupt, _) in bad)):
            if error is not None:
                raise error
            rank, (corrupt, msg) = bad[0]
            raise (CorruptCheckpointError if corrupt else CheckpointError)(f"rank {rank}: {msg}")
        if ps.rank == 0:
            print(f"WARNING: iteration {it} is corrupt (rank {bad[0][0]}: "
                  f"{bad[0][1][1].split(';')[0]})", flush=True)
    raise CorruptCheckpointError(f"--ckpt-fallback-to-previous: every checkpoint in --load "
                                 f"{root} (iterations {candidates}) is corrupt")


def _load_format(config: CheckpointConfig, root: str, iteration: int) -> str:
    """The format to read ``root``'s iteration in: ``config.ckpt_format``, or with
    ``auto_detect_ckpt_format`` the one on disk; a mismatch is a one-line error."""
    directory = published_iteration_dir(root, iteration)
    found = dist_format.checkpoint_format(directory)
    if found is None:  # the configured format's reader says what is missing
        return config.ckpt_format
    if found != config.ckpt_format and not config.auto_detect_ckpt_format:
        raise CheckpointError(f"--load {root} holds a '{found}' checkpoint but --ckpt-format is "
                              f"'{config.ckpt_format}'; pass --ckpt-format {found} or "
                              "--auto-detect-ckpt-format")
    return found


def load_checkpoint(model: nn.Module | list[nn.Module], optimizer, scheduler,
                    config: CheckpointConfig,
                    parallel_state: ParallelState | None = None) -> dict | None:
    """Load ``config.load``'s latest checkpoint into ``model``/``optimizer``/``scheduler``.

    Honors ``no_load_optim`` (model only; the fp32 main params are refreshed from it),
    ``no_load_rng`` and ``finetune`` (model only, iteration 0). Returns ``{"iteration",
    "consumed_train_samples", "consumed_valid_samples"}``, or None when ``config.load`` holds no
    checkpoint (training starts from scratch unless ``exit_on_missing_checkpoint``).
    """
    ps = parallel_state or get_parallel_state()
    chunks = _chunks(model)
    root = config.load
    iteration = read_tracker(root) if root else None
    if iteration is None:
        msg = f"no checkpoint found at --load {root} ({TRACKER_FILENAME} missing)"
        if config.exit_on_missing_checkpoint:
            raise CheckpointError(msg + " and --exit-on-missing-checkpoint is set")
        if ps.rank == 0:
            print(f"WARNING: {msg}; training from scratch", flush=True)
        return None
    if _load_format(config, root, iteration) == dist_format.FORMAT:
        return dist_format.load(chunks, optimizer, scheduler, config, ps, root, iteration)
    iteration, path, state = _read_agreed(root, iteration, ps, config.ckpt_fallback_to_previous)
    _check_layout(state, ps, path, len(chunks))
    keys = _model_keys(len(chunks))
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {path} has no {missing} entries for this run's "
                              f"{len(chunks)} model chunk(s); it was saved with another "
                              "virtual pipeline size")
    for key, chunk in zip(keys, chunks):
        check_model_state(chunk, state[key], path)
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(state[key], strict=True)
    finetune = config.finetune
    if not finetune and not config.no_load_optim and "optimizer" in state:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["opt_param_scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {path}: optimizer/scheduler state does not "
                                  f"fit this run ({e}); pass --no-load-optim to load the model "
                                  "only") from e
    else:
        optimizer.reload_model_params()
    if not finetune and not config.no_load_rng and state.get("rng_state"):
        ranks = state.get("rng_ranks", [])
        rngs = state["rng_state"]
        # A rank restores the state its own replica saved; with a new layout, the first one.
        idx = ranks.index(ps.rank) if ps.rank in ranks and len(ranks) == len(rngs) else 0
        set_rng_state(rngs[idx])
    _barrier()
    if finetune:
        return {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
    return {"iteration": int(state["iteration"]),
            "consumed_train_samples": int(state.get("consumed_train_samples", 0)),
            "consumed_valid_samples": int(state.get("consumed_valid_samples", 0))}
