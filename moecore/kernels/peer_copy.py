"""Row copies between this rank and its peers' symmetric buffers (the IPC dispatcher's data path).

``push``: ``peers[owner[i]][slot[i]] = rows[i]`` (scatter this rank's rows into the owners'
buffers); ``pull``: ``out[i] = peers[owner[i]][slot[i]]`` (gather them back). ``peers`` are
tensors ``[capacity, H]`` aliasing every rank's buffer (a remote GPU's memory through P2P/UVA,
or a shared-memory mapping on CPU); rows bound for one owner are contiguous (``splits``).

Two implementations behind the ``peer_copy`` backend registry:

- ``triton``: one launch for all peers; each program copies one row block, reading the owner's
  base address from a pointer table ``[world]`` int64, with vector loads/stores.
- ``torch``: one ``index_copy_`` / ``index_select`` per peer (any device); the reference.

Both take the same arguments; ``tests/parallel/test_ipc_dispatcher.py`` checks the Triton kernel
against the reference (``TRITON_INTERPRET=1`` on CPU) and the GPU tests on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, triton_on_cuda

if HAVE_TRITON:  # optional: CPU installs and CI run the torch reference
    import triton
    import triton.language as tl


# ---- torch reference -----------------------------------------------------------------------


def push_torch(rows: torch.Tensor, slot: torch.Tensor, owner: torch.Tensor,
               splits: Sequence[int], peers: Sequence[torch.Tensor], ptr_table) -> None:
    """rows [n, H] -> peers[p][slot[i]] for the ``splits[p]`` rows of owner p (in order)."""
    start = 0
    for p, size in enumerate(splits):
        if size:
            peers[p].index_copy_(0, slot[start:start + size], rows[start:start + size])
        start += size


def pull_torch(out: torch.Tensor, slot: torch.Tensor, owner: torch.Tensor,
               splits: Sequence[int], peers: Sequence[torch.Tensor], ptr_table) -> None:
    """out [n, H] <- peers[p][slot[i]] for the ``splits[p]`` rows of owner p (in order)."""
    start = 0
    for p, size in enumerate(splits):
        if size:
            torch.index_select(peers[p], 0, slot[start:start + size],
                               out=out[start:start + size])
        start += size


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _peer_copy_kernel(local_ptr, slot_ptr, owner_ptr, table_ptr, H,
                          PUSH: tl.constexpr, BLOCK_H: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        p = tl.load(owner_ptr + i)
        row = tl.load(slot_ptr + i).to(tl.int64)
        peer = tl.load(table_ptr + p).to(tl.pointer_type(local_ptr.dtype.element_ty))
        if PUSH:
            x = tl.load(local_ptr + i * H + offs, mask=mask)
            tl.store(peer + row * H + offs, x, mask=mask)
        else:
            x = tl.load(peer + row * H + offs, mask=mask)
            tl.store(local_ptr + i * H + offs, x, mask=mask)


# (most columns per program, warps): 1024 x 4 warps moves 16-byte vectors per thread for
# 16-bit rows. benchmarks/dispatch.py --copy-configs times alternatives.
LAUNCH_CONFIG = (1024, 4)


def _launch(local, slot, owner, ptr_table, push: bool) -> None:
    n, h = local.shape
    if n == 0:
        return
    block_max, warps = LAUNCH_CONFIG
    block = min(block_max, triton.next_power_of_2(h))
    grid = (n, triton.cdiv(h, block))
    _peer_copy_kernel[grid](local, slot, owner, ptr_table, h, PUSH=push, BLOCK_H=block,
                            num_warps=warps)


def push_triton(rows, slot, owner, splits, peers, ptr_table) -> None:
    _launch(rows.contiguous(), slot, owner, ptr_table, push=True)


def pull_triton(out, slot, owner, splits, peers, ptr_table) -> None:
    _launch(out, slot, owner, ptr_table, push=False)


# ---- registry ------------------------------------------------------------------------------


PEER_COPY = BackendRegistry("peer_copy", flag="--moe-peer-copy-backend")
PEER_COPY.register(Backend("triton", triton_on_cuda("peer-copy"), (push_triton, pull_triton),
                           description="one launch for all peers through a pointer table"))
PEER_COPY.register(Backend("torch", always_available, (push_torch, pull_torch),
                           description="index_copy_ / index_select per peer"))


@functools.cache
def select_peer_copy(device_type: str, requested: str = "auto") -> Backend:
    """The peer-copy backend for tensors of ``device_type`` (chosen once, logged once)."""
    return PEER_COPY.select(requested, device=torch.device(device_type))
