"""Embedding lookup ``embedding(ids [...], weight [V, H]) -> [..., H]`` with a deterministic
Triton backward. Backends of the ``embedding`` registry:

- ``torch``: ``F.embedding`` (autograd's ``embedding_dense_backward``: sort + segment sums +
  scatter); any device and dtype; the reference.
- ``triton``: the same forward (``F.embedding``, a gather) and a custom backward (CUDA; fp32,
  bf16, fp16) giving ``grad_weight [V, H]`` in the grad's dtype: each row the fp32 sum of the
  grad rows of its ids, rounded once; rows without ids zero. No atomics: every run gives the
  same bits. No host sync (CUDA-graph capturable):

  1. ``sorted, perm = sort(ids)`` (stable; keys cast to int16/int32 when V allows: fewer radix
     passes) and ``starts = searchsorted(sorted, arange(V))``: row v's ids sit at sorted
     positions ``[starts[v], starts[v + 1])``.
  2. ``_run_sums_kernel``, grid ``(cdiv(N, TILE), cdiv(H, BLOCK_H))``: each program takes TILE
     sorted positions in ``SUBS`` steps of ``[BLOCK_N, BLOCK_H]`` grad rows (gathered through
     ``perm``; the next step's ids prefetched). A step sums each run of equal ids with one
     product ``one_hot[runs, positions] @ rows`` (tensor cores for 16-bit grads, ieee fp32 for
     fp32: exact products, fp32 accumulation), the run open at the last step's end carried on.
     A run that starts and ends in the tile is complete: its row is written. The sums of the
     tile's first and last runs go to ``partial [tiles, 2, H]`` (fp32).
  3. ``_fill_rows_kernel``, grid ``(cdiv(V, BLOCK_V), cdiv(H, BLOCK_H))``: rows without ids get
     zeros; a run crossing tiles t0 < t1 gets ``partial[t0, 1] + sum(partial[t0+1 .. t1, 0])``.

  Every row is written once: N*H grad reads and V*H writes (plus 8*H bytes per tile of
  partials), where zero-filling first would write the table twice. A program's work is bounded
  by TILE whatever the id distribution; a row with L ids costs ~L/TILE partial reads.

Choice: the config's ``embedding_backend`` (``--embedding-backend auto|triton|torch``, default
``auto`` = ``triton`` on CUDA once its self-check passed there, else ``torch``), passed to
:func:`embedding` by ``VocabParallelEmbedding``; resolved once per device, dtype and request.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moecore.backends import AUTO, Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available

if HAVE_TRITON:
    import triton
    import triton.language as tl

FLAG = "--embedding-backend"
# The interpreter multiplies 16-bit dots wrongly (bf16 bits as integers): widen to fp32 there.
_WIDEN = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N, SUBS = 32, 4  # sorted positions per step, steps per tile (TILE = 128)


# ---- references --------------------------------------------------------------------------


def embedding_torch(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding``: ids [...] -> [..., H] (the reference, forward and backward)."""
    return F.embedding(ids, weight)


def embedding_backward_reference(grad: torch.Tensor, ids: torch.Tensor,
                                 num_rows: int) -> torch.Tensor:
    """grad [..., H], ids [...] -> grad_weight [V, H] by ``index_add_`` in grad's dtype (pass
    fp64 for an exact-ish reference)."""
    h = grad.shape[-1]
    out = torch.zeros(num_rows, h, dtype=grad.dtype, device=grad.device)
    return out.index_add_(0, ids.reshape(-1), grad.reshape(-1, h))


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _row_of(x, pick):
        """Row ``x[i]`` of x [R, C] where ``pick`` [R] is true (zeros if none)."""
        return tl.sum(tl.where(pick[:, None], x, 0.0), 0)

    @triton.jit
    def _per_run(member, x):
        """For each run r, the max of ``x`` [BLOCK_N] (int) over its positions (``member``
        [runs, positions]); -1 for an empty run."""
        return tl.max(tl.where(member, x[None, :], -1), 1)

    @triton.jit
    def _load_keys(keys_ptr, perm_ptr, p, valid, N, D1, stride0, stride1):
        """Sorted positions ``p`` [BLOCK_N] (``valid``): their keys, the keys before and after
        them (-1 off the ends) and the offsets of their grad rows: flat position i's row starts
        at ``(i // D1) * stride0 + (i % D1) * stride1``."""
        key = tl.load(keys_ptr + p, mask=valid, other=-1)
        prev = tl.load(keys_ptr + p - 1, mask=valid & (p > 0), other=-1)
        nxt = tl.load(keys_ptr + p + 1, mask=valid & (p < N - 1), other=-1)
        src = tl.load(perm_ptr + p, mask=valid, other=0).to(tl.int32)  # < N < 2**31
        row = (src // D1).to(tl.int64) * stride0 + (src % D1).to(tl.int64) * stride1
        return key, prev, nxt, row

    @triton.jit
    def _run_sums_kernel(keys_ptr, perm_ptr, grad_ptr, gw_ptr, part_ptr, N, H, D1, stride0,
                         stride1, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                         SUBS: tl.constexpr, WIDEN: tl.constexpr):
        first = tl.program_id(0) * (BLOCK_N * SUBS)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        part = part_ptr + tl.program_id(0).to(tl.int64) * (2 * H) + cols  # slot 0; slot 1 at + H
        r = tl.arange(0, BLOCK_N)
        carry = tl.zeros([BLOCK_H], tl.float32)  # the sum of the run open at the last step's end
        n_starts = 0  # run starts (new ids) seen in this tile
        n_ends = 0  # run ends seen in this tile
        p = first + r
        key, prev, nxt, row = _load_keys(keys_ptr, perm_ptr, p, p < N, N, D1, stride0, stride1)
        for sub in range(SUBS):
            g = tl.load(grad_ptr + row[:, None] + cols[None, :],
                        mask=(p < N)[:, None] & cmask[None, :], other=0.0)
            # Prefetch the next step's keys and row offsets while this one is summed.
            p_next = p + BLOCK_N
            # Masks combine a tensor with a scalar condition through tl.where: Triton 3.9's
            # interpreter gives ``tensor & scalar_bool`` an integer dtype and rejects it.
            keys_next = _load_keys(keys_ptr, perm_ptr, p_next,
                                   tl.where(sub + 1 < SUBS, p_next < N, False),
                                   N, D1, stride0, stride1)
            start = ((key != prev) & (p < N)).to(tl.int32)
            end = ((key != nxt) & (p < N)).to(tl.int32)
            reset = start | (p == first)
            # Run r of this step; run 0 goes on from the last step when position 0 is no reset.
            go_on = tl.sum(tl.where(r == 0, 1 - reset, 0), 0)
            run = tl.cumsum(reset, 0) - 1 + go_on
            member = run[None, :] == r[:, None]  # [runs, positions]
            # fp32 sums of each run's rows: a one-hot product (exact products; ieee for fp32)
            if WIDEN:
                g = g.to(tl.float32)
            sums = tl.dot(member.to(g.dtype), g, input_precision="ieee")
            sums = tl.where(((r == 0) & (go_on > 0))[:, None], sums + carry[None, :], sums)
            # a run ending here is complete when it started in this tile
            began = (_per_run(member, start) > 0) | tl.where((go_on > 0) & (n_starts > 0),
                                                             r == 0, False)
            complete = (_per_run(member, end) > 0) & began
            tl.store(gw_ptr + _per_run(member, key).to(tl.int64)[:, None] * H + cols[None, :],
                     sums.to(gw_ptr.dtype.element_ty), mask=complete[:, None] & cmask[None, :])
            # slot 0: the tile's first run (read when it came from earlier tiles) is run 0 of
            # the step where the first run end falls
            n_end = tl.sum(end, 0)
            tl.store(part, _row_of(sums, r == 0),
                     mask=tl.where((n_ends == 0) & (n_end > 0), cmask, False))
            n_starts += tl.sum(start, 0)
            n_ends += n_end
            carry = _row_of(sums, r == tl.max(run, 0))
            p = p_next
            key, prev, nxt, row = keys_next
        # The tile's last run, read when it goes on into the next tile (this tile is then full,
        # so its last position ends the last step). Slot 0 too when no run ended here.
        tl.store(part + H, carry, mask=cmask)
        tl.store(part, carry, mask=tl.where(n_ends == 0, cmask, False))

    @triton.jit
    def _fill_rows_kernel(starts_ptr, part_ptr, gw_ptr, V, N, H, TILE: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = (cols < H)[None, :]
        inside = rows < V
        a = tl.load(starts_ptr + rows, mask=inside, other=0)
        b = tl.load(starts_ptr + rows + 1, mask=rows + 1 < V, other=N)
        empty = inside & (a == b)
        t0 = a // TILE
        cross = inside & (b > a) & ((b - 1) // TILE > t0)  # sum partials t0 .. last
        acc = tl.load(part_ptr + (2 * t0 + 1).to(tl.int64)[:, None] * H + cols[None, :],
                      mask=cross[:, None] & cmask, other=0.0)
        last = (b - 1) // TILE
        t = t0 + 1
        while tl.max((cross & (t <= last)).to(tl.int32), 0) > 0:
            for k in tl.static_range(4):  # the tiles the run covers, in order, 4 loads at once
                acc += tl.load(part_ptr + (2 * (t + k)).to(tl.int64)[:, None] * H + cols[None, :],
                               mask=(cross & (t + k <= last))[:, None] & cmask, other=0.0)
            t += 4
        tl.store(gw_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :],
                 acc.to(gw_ptr.dtype.element_ty), mask=(empty | cross)[:, None] & cmask)


def _grad_rows(grad: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """grad [..., H] as (tensor, D1, stride0, stride1) with flat position i's row at
    ``(i // D1) * stride0 + (i % D1) * stride1``: no copy for up to two leading dims of any
    strides (ids [B, S] with a transposed grad), else a reshape."""
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    if grad.dim() == 3:
        return grad, grad.shape[1], grad.stride(0), grad.stride(1)
    if grad.dim() != 2:
        grad = grad.reshape(-1, grad.shape[-1])
    return grad, 1, grad.stride(0), 0


def _key_dtype(num_rows: int) -> torch.dtype:
    for dtype in (torch.int16, torch.int32):
        if num_rows <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def embedding_backward_triton(grad: torch.Tensor, ids: torch.Tensor, num_rows: int, *,
                              block_n: int = BLOCK_N, subs: int = SUBS) -> torch.Tensor:
    """grad [..., H], ids [...] (ids in [0, V)) -> grad_weight [V = num_rows, H] in grad's
    dtype, see the module docstring; ``block_n`` (a power of two >= 16, for ``tl.dot``) x
    ``subs`` sorted positions per tile."""
    if grad.shape[:-1] != ids.shape:
        raise ValueError(f"embedding backward needs grad [..., H] over ids [...]; got "
                         f"{tuple(grad.shape)} and {tuple(ids.shape)}")
    h, n = grad.shape[-1], ids.numel()
    if n == 0 or h == 0 or num_rows == 0:
        return torch.zeros(num_rows, h, dtype=grad.dtype, device=grad.device)
    if n >= 2**31 or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"the Triton embedding backward takes < 2**31 ids (not {n}) and "
                         f"block_n a power of two >= 16 (not {block_n})")
    g, d1, stride0, stride1 = _grad_rows(grad)
    keys = ids.reshape(-1).to(_key_dtype(num_rows))
    keys, perm = torch.sort(keys, stable=True)
    starts = torch.searchsorted(keys, torch.arange(num_rows, device=keys.device,
                                                   dtype=keys.dtype), out_int32=True)
    tile = block_n * subs
    tiles = triton.cdiv(n, tile)
    gw = torch.empty(num_rows, h, dtype=grad.dtype, device=grad.device)
    partial = torch.empty(tiles, 2, h, dtype=torch.float32, device=grad.device)
    block_h = min(128, max(16, triton.next_power_of_2(h)))  # tl.dot: >= 16
    _run_sums_kernel[(tiles, triton.cdiv(h, block_h))](
        keys, perm, g, gw, partial, n, h, d1, stride0, stride1, BLOCK_N=block_n,
        BLOCK_H=block_h, SUBS=subs, WIDEN=_WIDEN, num_warps=4)
    block_h = min(256, triton.next_power_of_2(h))
    block_v = max(1, 2048 // block_h)
    _fill_rows_kernel[(triton.cdiv(num_rows, block_v), triton.cdiv(h, block_h))](
        starts, partial, gw, num_rows, n, h, TILE=tile, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=4)
    return gw


# ---- autograd + registry -------------------------------------------------------------------


class _TritonEmbedding(torch.autograd.Function):
    """``F.embedding`` forward (saves only ``ids``), :func:`embedding_backward_triton`."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        return None, embedding_backward_triton(grad, ids, ctx.num_rows)


def embedding_triton(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`embedding_torch`, the Triton backward (no availability check)."""
    return _TritonEmbedding.apply(ids, weight)


def _check(device: torch.device) -> None:
    """The backward against the fp64 reference: repeated ids, a run across tiles, rows
    without ids, H not a power of two, a transposed grad."""
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, 50, (3, 100), device=device, generator=gen)
    ids[1:] = 7  # >= 200 of the 300 sorted positions: a run over several 128-position tiles
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        grad = torch.randn(100, 3, 96, device=device, generator=gen).to(dtype).transpose(0, 1)
        want = embedding_backward_reference(grad.double(), ids, 64)
        assert_close_rel(embedding_backward_triton(grad, ids, 64), want, tol,
                         f"embedding grad_weight ({dtype})")


def triton_available(device=None, dtype=None, **ctx) -> tuple[bool, str]:
    """``(ok, reason)`` of the ``triton`` backend on ``device`` for a ``dtype`` weight: CUDA,
    Triton, self-check passed there."""
    ok, reason = checked_triton_available("embedding", _check, device, dtype)
    return ok, reason if ok else f"{reason} ({FLAG} torch or auto runs F.embedding)"


EMBEDDING = BackendRegistry("embedding", flag=FLAG)
EMBEDDING.register(Backend("triton", triton_available, embedding_triton,
                           description="F.embedding forward, deterministic Triton backward"))
EMBEDDING.register(Backend("torch", always_available, embedding_torch,
                           description="F.embedding"))


def select_embedding(device: torch.device, dtype: torch.dtype, requested: str = AUTO) -> Backend:
    """The backend for a ``dtype`` weight on ``device`` under ``requested`` (``auto``,
    ``triton`` or ``torch``); resolved once per (device, dtype, request), logged once."""
    return EMBEDDING.resolve(requested, device=torch.device(device), dtype=dtype)


def embedding(ids: torch.Tensor, weight: torch.Tensor, backend: str = AUTO) -> torch.Tensor:
    """ids [...] (int64/int32 in [0, V)), weight [V, H] -> [..., H] through ``backend`` (a
    name or ``auto``, see :func:`select_embedding`)."""
    return select_embedding(weight.device, weight.dtype, backend).fn(ids, weight)
