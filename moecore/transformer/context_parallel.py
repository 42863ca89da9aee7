"""Context parallelism: one sequence split over the ranks of the CP group, attention across them.

**Load-balanced split.** A sequence of ``S`` tokens is cut into ``2 N`` chunks of ``C = S / 2N``
(``N`` = CP size); CP rank ``r`` holds chunks ``r`` and ``2N - 1 - r``, in that order, so each rank
does the same causal work (:func:`zigzag_index`). Everything per token (embeddings, MLP, MoE,
loss) runs on the local ``S / N`` tokens; RoPE takes their global positions.

**Attention** (``--cp-comm-type``), q ``[S/N, B, h, d]``, k ``[S/N, B, hk, d]``, v ``[S/N, B, hk,
dv]`` -> ``[S/N, B, h * dv]``:

- ``p2p``: ring attention (:class:`RingAttention`). K/V blocks travel around the ring while each
  rank attends its queries to the block in hand; partial outputs merge by their log-sum-exp.
  With the zig-zag layout the block from a lower rank is seen whole by both local chunks but
  only its first chunk is visible, the block from a higher rank is seen by the second local
  chunk only, and the own block is plain causal. The backward passes the K/V gradients around
  the ring with the blocks and home in a last step.
- ``all_gather``: K/V gathered over the group (Llama 3), queries attend with a mask built from
  the global positions; the backward reduce-scatters the K/V gradients.
- ``a2a``: heads exchanged for sequence (DeepSpeed-Ulysses): each rank attends a ``1/N`` share
  of the heads over the whole sequence, so any attention variant (windows, sinks) works;
  needs ``h`` divisible by ``N`` (kv heads are repeated when ``hk`` is not).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moecore.kernels.attention import core_attention
from moecore.kernels.block_attention import merge_partial, select_block_attention, to_acc

CP_COMM_TYPES = ("p2p", "all_gather", "a2a")


# ---------------------------------------------------------------- the load-balanced split

def zigzag_index(seq_len: int, cp_size: int, cp_rank: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions ``[seq_len / cp_size]`` of CP rank ``cp_rank``'s tokens, in local order."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"--seq-length {seq_len} must be divisible by 2 x "
                         f"--context-parallel-size = {2 * cp_size}")
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c,
                          device=device)
    return torch.cat([first, second])


def zigzag_split(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """The tokens of ``x`` (sequence along ``dim``) that CP rank ``cp_rank`` holds."""
    if cp_size == 1:
        return x
    return x.index_select(dim, zigzag_index(x.shape[dim], cp_size, cp_rank, x.device))


def gathered_to_natural(seq_len: int, cp_size: int, device=None) -> torch.Tensor:
    """Index ``[seq_len]`` that reorders the rank-major concatenation of every rank's local
    tokens into natural order: ``natural = gathered[index]``."""
    order = torch.cat([zigzag_index(seq_len, cp_size, r, device) for r in range(cp_size)])
    return torch.argsort(order)


# ---------------------------------------------------------------- differentiable collectives

def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


class _AllGatherSeq(torch.autograd.Function):
    """``[s, ...]`` per rank -> ``[N s, ...]`` in rank order; backward sums the gradients over
    the group and returns this rank's slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        if _is_gloo(group):
            dist.all_gather(list(out.chunk(n)), x.contiguous(), group=group)
        else:
            dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        n, r = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if _is_gloo(group):  # gloo has no reduce-scatter
            dist.all_reduce(grad, group=group)
            return grad.chunk(n)[r].clone(), None
        out = torch.empty((grad.shape[0] // n, *grad.shape[1:]), dtype=grad.dtype,
                          device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


class _AllToAll(torch.autograd.Function):
    """Split ``x`` in ``N`` along ``scatter_dim``, send part ``j`` to rank ``j``, concatenate what
    arrives along ``gather_dim`` in rank order; backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        n = dist.get_world_size(group)
        send = [t.contiguous() for t in x.chunk(n, dim=scatter_dim)]
        recv = [torch.empty_like(send[0]) for _ in range(n)]
        dist.all_to_all(recv, send, group=group)
        return torch.cat(recv, dim=gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _AllToAll.apply(grad, ctx.group, gather_dim, scatter_dim), None, None, None


# ---------------------------------------------------------------- ring attention (p2p)

def _ring_exchange(tensors: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list]:
    """Start sending ``tensors`` to the next rank of the ring and receiving the previous rank's;
    returns the receive buffers and the requests to wait on."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (r + 1) % n), dist.get_global_rank(group, (r - 1) % n)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prv, group) for b in recv]
    return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def ring_step_forward(fwd, q, kv, src: int, rank: int, out, lse, scale: float):
    """Merge the attention of ``q`` (this rank's chunks) to ``kv`` = rank ``src``'s ``[k, v]``
    into ``(out, lse)`` in place (``None`` before the first step, which must be
    ``src == rank`` and returns the fp32 accumulators)."""
    c = q.shape[2] // 2
    if src == rank:  # our own chunks: plain causal over the local layout
        return merge_partial(None, None, *fwd(q, kv[0], kv[1], True, scale))
    if src < rank:  # its first chunk precedes both of ours, its second follows both
        return merge_partial(out, lse, *fwd(q, kv[0][:, :, :c], kv[1][:, :, :c], False, scale))
    # both of its chunks precede our second chunk and follow our first
    merge_partial(out[:, :, c:], lse[:, :, c:], *fwd(q[:, :, c:], kv[0], kv[1], False, scale))
    return out, lse


def ring_step_backward(bwd, dout, q, kv, out, lse, src: int, rank: int, grads, scale: float):
    """Add the gradients of :func:`ring_step_forward`'s step with rank ``src``'s ``kv`` to
    ``grads = [dq, dk, dv]`` in place (fp32; ``dk``/``dv`` of that block; ``None`` at the first
    step, which must be ``src == rank`` and returns new fp32 accumulators); returns the list."""
    c = q.shape[2] // 2
    if src == rank:
        return [to_acc(g, copy=True) for g in bwd(dout, q, kv[0], kv[1], out, lse, True, scale)]
    dq, dk, dv = grads
    if src < rank:
        gq, gk, gv = bwd(dout, q, kv[0][:, :, :c], kv[1][:, :, :c], out, lse, False, scale)
        dq.add_(gq)
        dk[:, :, :c].add_(gk)
        dv[:, :, :c].add_(gv)
    else:
        gq, gk, gv = bwd(dout[:, :, c:], q[:, :, c:], kv[0], kv[1], out[:, :, c:],
                         lse[:, :, c:], False, scale)
        dq[:, :, c:].add_(gq)
        dk.add_(gk)
        dv.add_(gv)
    return grads


class RingAttention(torch.autograd.Function):
    """Causal ring attention over the zig-zag layout: ``q [B, h, 2C, d]``, ``k [B, hk, 2C, d]``,
    ``v [B, hk, 2C, dv]`` (this rank's chunks ``r`` and ``2N-1-r``) -> ``[B, h, 2C, dv]``."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale, backend="auto"):
        fwd, bwd = select_block_attention(q, v, backend)
        n, r = dist.get_world_size(group), dist.get_rank(group)
        out = lse = None
        kv = [k, v]
        for step in range(n):
            if step < n - 1:  # the next block travels while this one is attended
                nxt, reqs = _ring_exchange(kv, group)
            out, lse = ring_step_forward(fwd, q, kv, (r - step) % n, r, out, lse, scale)
            if step < n - 1:
                _wait(reqs)
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.bwd = group, scale, bwd
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, bwd = ctx.group, ctx.scale, ctx.bwd
        n, r = dist.get_world_size(group), dist.get_rank(group)
        grads = None
        kv = [k, v]
        for step in range(n):
            if step < n - 1:  # the next block travels while this one's gradients are computed
                nxt, reqs = _ring_exchange(kv, group)
            grads = ring_step_backward(bwd, dout, q, kv, out, lse, (r - step) % n, r, grads,
                                       scale)
            if n > 1:  # the block's gradients go where the block goes (home after the last)
                grads[1:], dreqs = _ring_exchange(grads[1:], group)
                _wait(dreqs)
            if step < n - 1:
                _wait(reqs)
                kv = nxt
        dq, dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ---------------------------------------------------------------- the three comm types

def check_cp_attention(comm_type: str, *, window=None, sinks=None, dropout_p: float = 0.0,
                       num_heads: int | None = None, cp_size: int = 1) -> None:
    """Refuse, with the flags to change, what ``comm_type`` cannot compute."""
    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type {comm_type!r}: choose one of {list(CP_COMM_TYPES)}")
    if comm_type != "a2a" and (window is not None or sinks is not None):
        raise ValueError(f"--cp-comm-type {comm_type} does not support sliding windows or "
                         "attention sinks (--window-size, --softmax-type); use "
                         "--cp-comm-type a2a")
    if comm_type == "p2p" and dropout_p > 0:
        raise ValueError("--cp-comm-type p2p does not support --attention-dropout > 0; use "
                         "--attention-dropout 0 or --cp-comm-type all_gather / a2a")
    if comm_type == "a2a" and num_heads is not None and num_heads % cp_size:
        raise ValueError(f"--cp-comm-type a2a needs the attention heads per tensor-parallel rank "
                         f"({num_heads}) divisible by --context-parallel-size {cp_size}; use "
                         "--cp-comm-type p2p or all_gather")


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, comm_type: str,
                 *, dropout_p: float = 0.0, backend: str = "auto",
                 softmax_scale: float | None = None, window: int | None = None,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this rank's zig-zag tokens over the whole sequence of the CP group.

    ``q [S/N, B, h, d]``, ``k [S/N, B, hk, d]``, ``v [S/N, B, hk, dv]`` -> ``[S/N, B, h * dv]``.
    ``sinks``: ``[h]`` logits of this rank's heads (``a2a`` only, as ``window``).
    """
    n = dist.get_world_size(group)
    check_cp_attention(comm_type, window=window, sinks=sinks, dropout_p=dropout_p,
                       num_heads=q.shape[2], cp_size=n)
    s_local, b, h = q.shape[:3]
    if comm_type == "p2p":
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        qb, kb, vb = (t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v))
        out = RingAttention.apply(qb, kb, vb, group, scale, backend)  # [B, h, S/N, dv]
        return out.permute(2, 0, 1, 3).reshape(s_local, b, -1)
    seq = s_local * n
    to_natural = gathered_to_natural(seq, n, q.device)
    if comm_type == "all_gather":
        k_all = _AllGatherSeq.apply(k, group).index_select(0, to_natural)
        v_all = _AllGatherSeq.apply(v, group).index_select(0, to_natural)
        q_pos = zigzag_index(seq, n, dist.get_rank(group), q.device)
        mask = torch.arange(seq, device=q.device)[None, :] > q_pos[:, None]  # True = masked
        return core_attention(q, k_all, v_all, mask, dropout_p, backend, softmax_scale)
    # a2a: [S/N, B, h, d] -> [S, B, h/N, d] (rank-major sequence) -> natural order
    if k.shape[2] % n:
        k, v = (t.repeat_interleave(h // t.shape[2], dim=2) for t in (k, v))
    qs, ks, vs = (_AllToAll.apply(t, group, 2, 0).index_select(0, to_natural) for t in (q, k, v))
    if sinks is not None:
        sinks = sinks.chunk(n)[dist.get_rank(group)]
    ctx = core_attention(qs, ks, vs, None, dropout_p, backend, softmax_scale, window, sinks)
    ctx = ctx.view(seq, b, h // n, -1).index_select(0, torch.argsort(to_natural))
    return _AllToAll.apply(ctx, group, 0, 2).reshape(s_local, b, -1)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout_p: float, backend: str, *,
                      cp_group=None, cp_comm_type: str = "p2p",
                      softmax_scale: float | None = None, window: int | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~moecore.kernels.attention.core_attention` of the local sequence, or with a CP
    group of more than one rank, :func:`cp_attention` over the whole sequence (causal only)."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return core_attention(q, k, v, attention_mask, dropout_p, backend, softmax_scale,
                              window, sinks)
    if attention_mask is not None:
        raise ValueError("context parallelism computes causal attention only; an explicit "
                         "attention mask needs --context-parallel-size 1")
    return cp_attention(q, k, v, cp_group, cp_comm_type, dropout_p=dropout_p, backend=backend,
                        softmax_scale=softmax_scale, window=window, sinks=sinks)
