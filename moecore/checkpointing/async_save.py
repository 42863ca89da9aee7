"""``--async-save``: the one checkpoint being written in the background, and its publishing.

:func:`moecore.checkpointing.save_checkpoint` copies the state to host memory and hands the
write to an :class:`AsyncSave` (a background thread on each writer rank). The checkpoint is
published (directory renamed into place, then the tracker) as soon as every rank's write has
finished:

* :func:`maybe_finalize_async_save`, which the training loop calls every iteration on every
  rank: one all-reduce (MIN) of a "my write is done" flag over a gloo group (host memory, so no
  device sync), and the publish once all are done. Nothing at all while no save is pending.
* :func:`finalize_async_save`: waits for the writes, then publishes (the next save and the end
  of training call it).
* :func:`publish_completed_async_save`, on an abort (an exception, the NaN check): no
  collectives, since another rank may be gone. Each rank waits for its own write; rank 0
  publishes when every shard's checksum file (written after the shard, see
  :mod:`moecore.checkpointing.checksum`) is there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from moecore.checkpointing import checksum
from moecore.checkpointing.errors import CheckpointError

ABORT_WAIT_S = 60.0
"""How long an abort waits for the pending writes before leaving the save unpublished."""


class AsyncSave:
    """One save in flight: ``write`` (None on ranks that write no file) runs in a background
    thread; ``publish`` (collective) or, on an abort, ``publish_here`` (rank 0 alone) makes
    the checkpoint the latest. ``shard_files`` are every writer's files, for the abort path."""

    def __init__(self, iteration: int, root: str, shard_files: list[str], is_root: bool,
                 publish: Callable[[], None], publish_here: Callable[[], None],
                 write: Callable[[], None] | None):
        self.iteration, self.root, self.shard_files, self.is_root = (iteration, root,
                                                                     shard_files, is_root)
        self.publish, self.publish_here = publish, publish_here
        self.error: BaseException | None = None
        self.thread = None
        if write is not None:
            self.thread = threading.Thread(target=self._run, args=(write,), daemon=True,
                                           name=f"moecore-save-{iteration}")
            self.thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - raised on every rank at the publish
            self.error = e

    def done(self) -> bool:
        """True once this rank's write has finished (or failed)."""
        return self.thread is None or not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done()


_PENDING: AsyncSave | None = None
_FLAG_GROUP: tuple[object, object] | None = None  # (the default group, its gloo group)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _flag_group():
    """A gloo group over all ranks for the done flags: the default group when it is gloo,
    else one made on first use (collective: :func:`submit` runs on every rank)."""
    global _FLAG_GROUP
    world = dist.group.WORLD
    if _FLAG_GROUP is None or _FLAG_GROUP[0] is not world:
        gloo = dist.get_backend() == "gloo"
        _FLAG_GROUP = (world, None if gloo else dist.new_group(backend="gloo"))
    return _FLAG_GROUP[1]


def pending() -> AsyncSave | None:
    """The save in flight, if any."""
    return _PENDING


def submit(save: AsyncSave) -> None:
    """Make ``save`` the pending one (collective; the previous one must be finalized)."""
    global _PENDING
    if _PENDING is not None:
        raise RuntimeError(f"the --async-save of iteration {_PENDING.iteration} is still "
                           "pending; finalize_async_save() first")
    if _world() > 1:
        _flag_group()
    _PENDING = save


def finalize_async_save() -> int | None:
    """Complete a pending ``--async-save`` (collective: every rank calls it at the same point):
    wait for this rank's write, then publish. A write that failed on any rank raises here on
    every rank, and the previous checkpoint stays the latest. Returns the iteration published."""
    global _PENDING
    save, _PENDING = _PENDING, None
    if save is None:
        return None
    save.wait()
    failed = [save.error is not None]
    if _world() > 1:
        failed = [None] * _world()
        dist.all_gather_object(failed, save.error is not None)
    if any(failed):
        raise CheckpointError(
            f"--async-save of iteration {save.iteration} to {save.root} failed on ranks "
            f"{[r for r, f in enumerate(failed) if f]} (this rank: {save.error!r}); the "
            "latest complete checkpoint is still the previous one") from save.error
    save.publish()
    return save.iteration


def maybe_finalize_async_save() -> int | None:
    """Publish the pending save if every rank's write has finished; never waits for a write.
    Collective over all ranks while a save is pending (call it at the same point on every
    rank, e.g. once per iteration); a no-op otherwise. Returns the iteration published."""
    save = _PENDING
    if save is None:
        return None
    if _world() > 1:
        flag = torch.tensor([int(save.done())], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_flag_group())
        if not flag.item():
            return None
    elif not save.done():
        return None
    return finalize_async_save()


def publish_completed_async_save(wait_s: float = ABORT_WAIT_S) -> int | None:
    """On an abort: publish the pending save if it completes, without collectives. Each rank
    waits up to ``wait_s`` for its own write; rank 0 then waits, within the same ``wait_s``,
    for every shard's checksum file and publishes when all are there. Returns the iteration
    published (on rank 0), else None; an incomplete save stays unpublished."""
    global _PENDING
    save, _PENDING = _PENDING, None
    if save is None:
        return None
    deadline = time.monotonic() + wait_s
    if not save.wait(wait_s) or not save.is_root or save.error is not None:
        return None
    while not all(checksum.is_complete(f) for f in save.shard_files):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    save.publish_here()
    return save.iteration
