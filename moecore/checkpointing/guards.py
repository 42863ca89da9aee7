"""Start-up checks of the checkpoint directories, before a run trains or writes anything.

* :func:`check_save_writable`: ``--save`` can be created and written (a read-only directory
  is found now, not at the first save);
* :func:`check_no_overwrite`: a run does not replace checkpoints it did not start from (a
  missing tracker or a mistyped ``--load`` would train from scratch over ``iter_*`` and move
  the tracker back);
* :func:`saved_run_args`: the args of ``--load``'s latest checkpoint, for the resume check
  (:func:`moecore.arguments.checkpoint_args.check_checkpoint_args`);
* :func:`on_rank0`: run one of them on global rank 0 and give every rank the same outcome.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist

from moecore.checkpointing import (
    CHECKPOINT_FILENAME,
    TRACKER_FILENAME,
    CheckpointConfig,
    CheckpointError,
    dist_format,
    published_iteration_dir,
    read_tracker,
)
from moecore.checkpointing.run_lock import RunLockError

_ITER_DIR = re.compile(r"^iter_(\d{7})(\.old)?$")


def on_rank0(fn: Callable, *args):
    """``fn(*args)`` on global rank 0 (collective over the world when distributed): returns its
    result there (None on the other ranks); a :class:`CheckpointError` it raises is raised on
    every rank, with the same message and class."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    result, outcome = None, [None]
    if rank == 0:
        try:
            result = fn(*args)
        except CheckpointError as e:
            outcome = [(type(e) is RunLockError, str(e))]
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        is_lock, message = outcome[0]
        error = (RunLockError if is_lock else CheckpointError)(message)
        error.agreed = True  # every rank raises it: pretrain_gpt.py prints it once
        raise error
    return result


def check_save_writable(save_dir: str) -> None:
    """Create ``save_dir`` if missing and write a probe file into it; :class:`CheckpointError`
    naming the directory and the reason when that fails."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moecore-write-probe-", dir=save_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--save {save_dir} is not writable ({e.strerror or e}); "
                              "checkpoints could not be saved: fix its permissions or mount, "
                              "or pick another --save") from None


def existing_iterations(root: str) -> list[int]:
    """Iterations of the published checkpoints under ``root`` (``iter_N``, and ``iter_N.old``
    of an interrupted re-save); in-progress ``.tmp`` directories do not count."""
    if not os.path.isdir(root):
        return []
    found = {int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root))
             if m and os.path.isdir(os.path.join(root, m.group(0)))}
    return sorted(found)


def _fmt(iterations: list[int]) -> str:
    shown = ", ".join(map(str, iterations[:5]))
    return shown + (f", ... ({len(iterations)} in all)" if len(iterations) > 5 else "")


def check_no_overwrite(config: CheckpointConfig, start_iteration: int, loaded: bool) -> None:
    """Refuse (:class:`CheckpointError`) a run whose saves would replace checkpoints of
    ``config.save`` or move its tracker back: any iteration there after ``start_iteration``,
    unless ``config.overwrite_checkpoints``. ``loaded``: whether a checkpoint was loaded."""
    root = config.save
    if not root or config.overwrite_checkpoints:
        return
    tracker = read_tracker(root)
    existing = set(existing_iterations(root)) | ({tracker} if tracker is not None else set())
    doomed = sorted(i for i in existing if i > start_iteration)
    if not doomed:
        return
    where = f"--save {root} holds checkpoints of iterations {_fmt(doomed)}" + (
        f" ({TRACKER_FILENAME}: {tracker})" if tracker is not None else
        f" but no {TRACKER_FILENAME}")
    if not loaded:
        why = (f"--load {config.load} holds no checkpoint" if config.load else "no --load given")
        raise CheckpointError(f"{where}, and this run loaded none ({why}): it would train from "
                              "scratch over them; resume with --load pointing at them, pick "
                              "another --save, or pass --overwrite-checkpoints")
    raise CheckpointError(f"{where} after this run's start iteration {start_iteration}: its "
                          "saves would replace them and move the tracker back; pick another "
                          "--save, or pass --overwrite-checkpoints")


def saved_run_args(root: str) -> dict | None:
    """The args saved with ``root``'s latest checkpoint (memory-mapped: only the header is
    read); None when there is no checkpoint or it records none (the load reports damage)."""
    iteration = read_tracker(root)
    if iteration is None:
        return None
    directory = published_iteration_dir(root, iteration)
    if dist_format.checkpoint_format(directory) == dist_format.FORMAT:
        try:
            args = dist_format.read_common(directory).get("args")
        except CheckpointError:  # load_checkpoint names the damaged file
            return None
        return args if isinstance(args, dict) else None
    shards = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for shard in shards:
        path = os.path.join(directory, shard, CHECKPOINT_FILENAME)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - load_checkpoint names the damaged file
            return None
        args = state.get("args") if isinstance(state, dict) else None
        return args if isinstance(args, dict) else None
    return None
