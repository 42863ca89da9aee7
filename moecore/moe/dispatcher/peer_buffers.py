"""Symmetric buffers of one process group: every rank owns a same-sized byte buffer and holds a
tensor aliasing every peer's buffer, plus a barrier over the group.

Backends, chosen by the device:

- ``symm_mem`` (CUDA): PyTorch symmetric memory (``torch.distributed._symmetric_memory``):
  ``empty`` + ``rendezvous(t, group)``; peers are mapped through P2P/UVA and the barrier is a
  stream-ordered device kernel (``handle.barrier``). No NVLink multicast is used.
- ``shm`` (CPU): POSIX shared memory. Each rank creates a segment, the names travel with
  ``all_gather_object`` over the group, peers map them, and after a barrier every creator
  unlinks its name at once: from then on nothing can leak in ``/dev/shm``, even on a crash (the
  memory lives while mapped). The barrier is ``dist.barrier(group)``.

Each buffer is split in two halves used alternately by successive exchanges, so an exchange
needs one barrier only (after its writes): once exchange ``k+1``'s barrier has passed, every
rank has finished exchange ``k`` (stream order), the previous user of the half that exchange
``k+2`` writes. Buffers grow on demand through :meth:`PeerBuffers.ensure`, a collective that
every rank must call with the same size (the IPC dispatcher derives it from exchanged counts,
so they agree). Only one node: :func:`check_single_host` refuses a group that spans hosts.

One :class:`PeerBuffers` per (group, device) is shared by all MoE layers
(:func:`get_peer_buffers`); :func:`destroy_peer_buffers` frees them (also at exit).
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets
import socket
import warnings

import torch
import torch.distributed as dist

from moecore.parallel_state import register_destroy_hook

SHM_PREFIX = "moecore_ipc_"
_GROWTH = 1.25  # head room on each growth, so a slowly rising load does not reallocate often
_GROW_ALIGN = 1 << 20  # halves grow in MiB steps
_MIN_ALIGN = 256  # a half always starts at a multiple of this (any dtype's alignment)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _host_id() -> str:
    """This machine's identity: hostname plus boot id (containers on one host share the boot
    id; two hosts never do, even when their hostnames collide)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def check_launch_nodes(group) -> None:
    """Raise when torchrun's ``LOCAL_WORLD_SIZE`` places ``group``'s ranks on several nodes
    (no communication; torchrun gives node ``i`` global ranks ``i*L ... i*L+L-1``)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local <= 0:
        return
    nodes = sorted({r // local for r in _group_ranks(group)})
    if len(nodes) > 1:
        raise ValueError(_span_message(len(nodes), f"nodes {nodes} (LOCAL_WORLD_SIZE={local})"))


def check_single_host(group) -> None:
    """Raise on every rank of ``group`` (a collective) when its ranks run on several hosts."""
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, _host_id(), group=group)
    distinct = sorted(set(hosts))
    if len(distinct) > 1:
        names = sorted({h.split("/")[0] for h in distinct})
        raise ValueError(_span_message(len(distinct), f"hosts {names}"))


def _span_message(count: int, where: str) -> str:
    return (f"moe_token_dispatcher_type='ipc' moves rows through memory shared by the GPUs of "
            f"one node, but the expert-parallel group spans {count} {where}. Use "
            "--moe-token-dispatcher-type alltoall, or make expert_model_parallel_size fit in "
            "one node (EP ranks are placed by the rank order, see parallel_state)")


# ---- allocations ------------------------------------------------------------------------------


class _ShmAllocation:
    """``world`` POSIX shared-memory segments of ``nbytes``; ``peers[r]`` aliases rank r's."""

    def __init__(self, nbytes: int, group, rank: int, world: int):
        self.group = group
        self._maps: list[mmap.mmap] = []
        self._shm = None
        from multiprocessing.shared_memory import SharedMemory

        name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
        self._shm = SharedMemory(name=name, create=True, size=nbytes)
        try:
            names = [None] * world
            dist.all_gather_object(names, self._shm.name, group=group)
            self.peers = [self._map(n, nbytes, own=r == rank) for r, n in enumerate(names)]
            dist.barrier(group=group)  # every rank has mapped every segment
        finally:
            self._shm.unlink()  # the name goes now; the memory lives while it is mapped

    def _map(self, name: str, nbytes: int, own: bool) -> torch.Tensor:
        if own:
            return torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=nbytes)
        fd = os.open(os.path.join("/dev/shm", name.lstrip("/")), os.O_RDWR)
        try:
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._maps.append(mm)
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def release(self) -> None:
        self.peers = []
        for m in [*self._maps, self._shm]:
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere: the GC unmaps it later
                pass
        self._maps = []


class _SymmMemAllocation:
    """PyTorch symmetric memory of ``nbytes`` on ``device``; ``peers[r]`` aliases rank r's."""

    def __init__(self, nbytes: int, group, rank: int, world: int, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        _enable_symm_mem(symm_mem, group)
        self.local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.local, group)
        self.peers = [self.local if r == rank else self.handle.get_buffer(r, (nbytes,),
                                                                          torch.uint8)
                      for r in range(world)]

    def barrier(self) -> None:
        # Stream-ordered: every rank's earlier kernels (its writes into peers) have finished
        # and are visible system-wide before any rank's later kernels start.
        self.handle.barrier(channel=0)

    def release(self) -> None:
        self.peers = []
        self.handle = None
        self.local = None


def _enable_symm_mem(symm_mem, group) -> None:
    """Older PyTorch needs ``enable_symm_mem_for_group`` before ``rendezvous``; newer ones
    deprecate it (a no-op there)."""
    enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", None)
    if enabled is not None and not enabled(group.group_name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)


# ---- the group's buffers ------------------------------------------------------------------


class PeerBuffers:
    """Same-sized buffers on every rank of ``group`` (world ``W``), each mapped by all ranks,
    in two halves of ``half_bytes``.

    ``next_half()`` -> the half (0 or 1) the next exchange uses (all ranks call it in the same
    order); ``views(dtype, cols, half)`` -> ``W`` tensors ``[capacity, cols]`` (index = group
    rank; the own one is local memory); ``ptr_table(dtype, cols, half)`` -> ``[W]`` int64 base
    addresses on the device; ``barrier()`` synchronises the group (stream-ordered on CUDA).
    """

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.half_bytes = 0
        self.allocations = 0  # how many times the buffers were (re)allocated
        self._alloc = None
        self._views: dict = {}
        self._host_checked = False
        self._exchanges = 0

    @property
    def nbytes(self) -> int:
        """Bytes per rank, both halves."""
        return 2 * self.half_bytes

    def next_half(self) -> int:
        self._exchanges += 1
        return self._exchanges % 2

    def ensure(self, half_bytes: int, limit: int) -> None:
        """Collective: make each half hold ``half_bytes`` (the same on all ranks); when too
        small, grow halves to ``1.25 * half_bytes`` rounded up to 1 MiB, but both halves within
        ``limit`` (the caller checks ``2 * half_bytes <= limit``; 256-byte rounding aside)."""
        if self._alloc is not None and half_bytes <= self.half_bytes:
            return
        if not self._host_checked:
            check_single_host(self.group)
            self._host_checked = True
        half = min(_round_up(int(half_bytes * _GROWTH), _GROW_ALIGN), limit // 2)
        half = _round_up(max(half, half_bytes, 1), _MIN_ALIGN)
        if self._alloc is not None:
            self.barrier()  # no peer still reads or writes the old buffers
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.release()
        size = 2 * half
        if self.device.type == "cuda":
            self._alloc = _SymmMemAllocation(size, self.group, self.rank, self.world, self.device)
        elif self.device.type == "cpu":
            self._alloc = _ShmAllocation(size, self.group, self.rank, self.world)
        else:
            raise ValueError(f"the IPC dispatcher supports CUDA and CPU tensors, not "
                             f"{self.device.type}; use --moe-token-dispatcher-type alltoall")
        self.half_bytes = half
        self.allocations += 1

    def views(self, dtype: torch.dtype, cols: int, half: int) -> list[torch.Tensor]:
        """Every rank's half ``half`` as ``[capacity, cols]`` of ``dtype`` (capacity =
        half_bytes // row bytes)."""
        key = (dtype, cols, half)
        if key not in self._views:
            row = cols * dtype.itemsize
            cap = self.half_bytes // row
            start = half * self.half_bytes
            views = [p[start:start + cap * row].view(dtype).view(cap, cols)
                     for p in self._alloc.peers]
            table = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64,
                                 device=self.device)
            self._views[key] = (views, table)
        return self._views[key][0]

    def ptr_table(self, dtype: torch.dtype, cols: int, half: int) -> torch.Tensor:
        self.views(dtype, cols, half)
        return self._views[(dtype, cols, half)][1]

    def barrier(self) -> None:
        self._alloc.barrier()

    def release(self) -> None:
        """Drop this rank's mappings (no communication)."""
        self._views = {}
        if self._alloc is not None:
            self._alloc.release()
        self._alloc = None
        self.half_bytes = 0


_BUFFERS: dict = {}


def get_peer_buffers(group, device: torch.device) -> PeerBuffers:
    """The shared :class:`PeerBuffers` of ``group`` on ``device`` (created empty on first use)."""
    key = (group, str(torch.device(device)))
    if key not in _BUFFERS:
        _BUFFERS[key] = PeerBuffers(group, device)
    return _BUFFERS[key]


def destroy_peer_buffers() -> None:
    """Release every group's buffers in this process (no communication; call it on all ranks
    once no dispatch or combine is in flight, e.g. before ``destroy_process_group``)."""
    for bufs in _BUFFERS.values():
        bufs.release()
    _BUFFERS.clear()


atexit.register(destroy_peer_buffers)
register_destroy_hook(destroy_peer_buffers)
