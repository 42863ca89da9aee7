"""IPC dispatcher: inside one node, every rank writes its routed rows straight into the owning
rank's buffer (no NCCL all-to-all on the expert path); results come back the same way.

Per layer, over the expert-parallel (EP) group of ``W`` ranks, ``E`` experts, ``E_l = E / W``:

1. permute the local tokens by global expert (``MoETokenDispatcher.permute_local``, as the
   all-to-all dispatcher: ``permute_topk`` when dropless, ``permute`` with a capacity);
2. all-gather the per-expert counts ``[W, E]`` (tiny; the one host sync of the layer);
3. every rank derives the same layout: owner ``p``'s buffer holds its rows ordered
   ``[local_expert, src_rank]`` (expert-contiguous for the grouped GEMM, the all-to-all
   dispatcher's order); each row's destination slot comes from a prefix sum of the counts;
4. **push** (dispatch): one kernel writes each row into its owner's buffer, barrier, the owner
   copies its rows out (the experts save their input for backward, and later exchanges reuse
   the buffer, so they must not alias it);
5. **pull** (combine): owners copy expert outputs into their own buffer, barrier, each source
   gathers its rows back from every owner; then ``unpermute`` (each token's rows summed; the
   experts weighted them by their probabilities, pushed with the rows as a [N, 1] fp32 column
   in an exchange of their own).

One barrier per exchange: successive exchanges alternate between two halves of the buffers
(see ``peer_buffers``), so an exchange never overwrites rows a peer may still be reading.

Backward is the mirror: the gradient of a push is a pull and vice versa (``_PushRows`` /
``_PullRows``). Buffers are shared by all MoE layers of the group, grown collectively when a
step needs more rows (``PeerBuffers.ensure``) and bounded by ``moe_ipc_buffer_max_mb``: a step
that needs more raises on every rank *before* any row is written.

Supports EP with ``expert_tensor_parallel_size == 1`` inside one node (attention TP/SP is
fine); CUDA through PyTorch symmetric memory, CPU through POSIX shared memory (tests, gloo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecore.config import TransformerConfig
from moecore.kernels.peer_copy import select_peer_copy
from moecore.moe.dispatcher.base import MoETokenDispatcher, check_dispatch_inputs
from moecore.moe.dispatcher.peer_buffers import PeerBuffers, check_launch_nodes, get_peer_buffers
from moecore.moe.permute import PermutePlan, unpermute_tokens
from moecore.parallel_state import ParallelState
from moecore.tensor_parallel.utils import all_gather_no_grad


class IPCBufferOverflowError(ValueError):
    """A step needs more symmetric-buffer memory than ``moe_ipc_buffer_max_mb`` allows."""


@dataclass(frozen=True)
class ExchangeOptions:
    """``limit``: most buffer bytes per rank; ``copy``: ``peer_copy`` backend (``auto``,
    ``triton``, ``torch``)."""

    limit: int
    copy: str = "auto"


@dataclass(frozen=True)
class Route:
    """Layout of one exchange over the EP group (identical arithmetic on every rank).

    ``slot`` [n] int64 and ``owner`` [n] int32 (device): for each of this rank's ``n`` permuted
    rows, its owner rank and its row in the owner's buffer; ``send_splits`` [W]: rows per owner
    (contiguous in permuted order); ``recv_rows``: rows this rank receives; ``max_recv_rows``:
    the most any rank receives (sizes the buffers); ``tokens_per_local_expert`` [E_l] (CPU).
    """

    slot: torch.Tensor
    owner: torch.Tensor
    send_splits: list[int]
    recv_rows: int
    max_recv_rows: int
    max_recv_rank: int
    tokens_per_local_expert: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.slot.numel())


def build_route(tokens_per_expert: torch.Tensor, group, rank: int, world: int) -> Route:
    """``tokens_per_expert`` [E] (this rank's permuted rows per global expert, on the rows'
    device) -> :class:`Route`. All-gathers the counts over ``group`` (one host sync)."""
    num_experts = tokens_per_expert.numel()
    local_e = num_experts // world
    device = tokens_per_expert.device
    counts = all_gather_no_grad(tokens_per_expert.reshape(1, -1).long(), group).cpu()  # [W, E]
    blocks = counts.view(world, world, local_e).permute(1, 2, 0)  # [owner, local_e, src]
    flat = blocks.reshape(world, -1)
    starts_in_owner = (flat.cumsum(1) - flat).view(world, local_e, world)[:, :, rank]
    mine = counts[rank]  # [E]
    starts_in_mine = mine.cumsum(0) - mine
    # slot of row i (expert e, i-th row of e here) = start of our chunk in e's block + offset
    shift = (starts_in_owner.reshape(-1) - starts_in_mine).to(device)
    n = int(mine.sum())
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=device),
                                         tokens_per_expert.long(), output_size=n)
    slot = torch.arange(n, device=device) + shift[row_expert]
    recv = blocks.sum((1, 2))  # [owner]
    return Route(slot=slot, owner=torch.div(row_expert, local_e, rounding_mode="floor").int(),
                 send_splits=mine.view(world, local_e).sum(1).tolist(),
                 recv_rows=int(recv[rank]), max_recv_rows=int(recv.max()),
                 max_recv_rank=int(recv.argmax()),
                 tokens_per_local_expert=blocks[rank].sum(1))


def _reserve(bufs: PeerBuffers, route: Route, dtype: torch.dtype, cols: int,
             limit: int) -> None:
    """Check the bound, then grow the buffers (collective) -- before anything is written."""
    half = route.max_recv_rows * cols * dtype.itemsize
    need = 2 * half  # two alternating halves
    if need > limit:
        raise IPCBufferOverflowError(
            f"the IPC dispatcher needs {need / 2**20:.1f} MiB of buffer on EP rank "
            f"{route.max_recv_rank} (2 halves x {route.max_recv_rows} rows x {cols} x {dtype}) "
            f"but moe_ipc_buffer_max_mb allows {limit / 2**20:.1f} MiB. Raise "
            "--moe-ipc-buffer-max-mb, bound the rows per expert with "
            "--moe-expert-capacity-factor, or use --moe-token-dispatcher-type alltoall")
    bufs.ensure(half, limit)


def _next_buffers(rows: torch.Tensor, route: Route, bufs: PeerBuffers, opts: ExchangeOptions):
    """Check the bound and grow (collective), then take the next half of the buffers for rows
    like ``rows`` [*, H]: ``(views, ptr_table)`` of that half on every rank."""
    h = rows.shape[1]
    _reserve(bufs, route, rows.dtype, h, opts.limit)
    half = bufs.next_half()
    return bufs.views(rows.dtype, h, half), bufs.ptr_table(rows.dtype, h, half)


def push_rows(rows: torch.Tensor, route: Route, bufs: PeerBuffers,
              opts: ExchangeOptions) -> torch.Tensor:
    """Scatter this rank's permuted rows ``[n, H]`` into their owners' buffers (over the EP
    group); return the rows this rank owns, ``[recv_rows, H]`` ordered [local_expert, src]."""
    views, table = _next_buffers(rows, route, bufs, opts)
    push, _ = select_peer_copy(rows.device.type, opts.copy).fn
    push(rows.contiguous(), route.slot, route.owner, route.send_splits, views, table)
    bufs.barrier()  # every row has landed
    # A copy: the experts save their input for backward and later exchanges reuse the buffer.
    return views[bufs.rank][:route.recv_rows].clone()


def pull_rows(owned: torch.Tensor, route: Route, bufs: PeerBuffers,
              opts: ExchangeOptions) -> torch.Tensor:
    """Inverse of :func:`push_rows`: owners publish ``owned`` ``[recv_rows, H]``; every rank
    gathers its own rows back, ``[n, H]`` in its permuted order (over the EP group)."""
    views, table = _next_buffers(owned, route, bufs, opts)
    _, pull = select_peer_copy(owned.device.type, opts.copy).fn
    views[bufs.rank][:route.recv_rows].copy_(owned)
    bufs.barrier()  # every owner's rows are published
    out = owned.new_empty(route.num_rows, owned.shape[1])
    pull(out, route.slot, route.owner, route.send_splits, views, table)
    return out


class _PushRows(torch.autograd.Function):
    """Dispatch exchange: forward pushes, backward pulls the gradients back."""

    @staticmethod
    def forward(ctx, rows, route: Route, bufs: PeerBuffers, opts: ExchangeOptions):
        ctx.route, ctx.bufs, ctx.opts = route, bufs, opts
        return push_rows(rows, route, bufs, opts)

    @staticmethod
    def backward(ctx, grad):
        return pull_rows(grad.contiguous(), ctx.route, ctx.bufs, ctx.opts), None, None, None


class _PullRows(torch.autograd.Function):
    """Combine exchange: forward pulls, backward pushes the gradients to the owners."""

    @staticmethod
    def forward(ctx, owned, route: Route, bufs: PeerBuffers, opts: ExchangeOptions):
        ctx.route, ctx.bufs, ctx.opts = route, bufs, opts
        return pull_rows(owned, route, bufs, opts)

    @staticmethod
    def backward(ctx, grad):
        return push_rows(grad.contiguous(), ctx.route, ctx.bufs, ctx.opts), None, None, None


@dataclass(frozen=True)
class IPCHandle:
    """One IPC dispatch: ``plan`` maps this rank's permuted rows back to its tokens; with an
    exchange (EP > 1, else None) the ``route`` of the rows and the ``bufs`` they went through."""

    plan: PermutePlan
    route: Route | None = None
    bufs: PeerBuffers | None = None


class MoEIPCTokenDispatcher(MoETokenDispatcher):
    """Direct writes into peers' buffers instead of an all-to-all (see the module docstring).

    Same permutation, row order and outputs as :class:`MoEAlltoAllTokenDispatcher`; only the
    exchange differs. ``dispatch(hidden [T, H], probs [T, E], routing_map [T, E]) ->
    (tokens [N, H], tokens_per_expert [E_l], probs [N], IPCHandle)``, ``combine(expert_out
    [N, H], handle) -> [T, H]``.
    """

    def __init__(self, config: TransformerConfig, parallel_state: ParallelState | None = None):
        super().__init__(config, parallel_state)
        if self.etp_size > 1:
            raise ValueError(
                f"moe_token_dispatcher_type='ipc' supports expert_tensor_parallel_size=1 only "
                f"(got {self.etp_size}); set --expert-tensor-parallel-size 1 or use "
                "--moe-token-dispatcher-type alltoall")
        self.options = ExchangeOptions(limit=int(config.moe_ipc_buffer_max_mb * 2**20),
                                       copy=config.moe_peer_copy_backend)
        if self.ep_size > 1:
            check_launch_nodes(self.ep_group)  # the full host check runs at the first exchange

    @property
    def local_only(self) -> bool:
        """No exchange at EP = 1."""
        return self.ep_size == 1

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, IPCHandle]:
        """``hidden`` [T, H], ``probs`` / ``routing_map`` [T, E] -> ``(tokens [N, H],
        tokens_per_expert [E_l], probs [N], handle)``; pushes rows (and their probabilities)
        to their owners over the EP group."""
        check_dispatch_inputs(hidden, probs, routing_map)
        permuted, tokens_per_expert, probs_N, plan = self.permute_local(hidden, probs,
                                                                        routing_map)
        if self.local_only:
            return permuted, tokens_per_expert, probs_N, IPCHandle(plan)
        route = build_route(tokens_per_expert, self.ep_group, self.ep_rank, self.ep_size)
        bufs = get_peer_buffers(self.ep_group, hidden.device)
        tokens = _PushRows.apply(permuted, route, bufs, self.options)
        probs_N1 = _PushRows.apply(probs_N.unsqueeze(1), route, bufs, self.options)
        return (tokens, route.tokens_per_local_expert, probs_N1.squeeze(1),
                IPCHandle(plan, route, bufs))

    def combine(self, expert_output: torch.Tensor, handle: IPCHandle) -> torch.Tensor:
        """``expert_output`` [N, H] (weighted rows) -> ``[T, H]``: pulls this rank's rows back
        from their owners (EP group), then the sum of each token's rows."""
        if not self.local_only:
            expert_output = _PullRows.apply(expert_output.contiguous(), handle.route,
                                            handle.bufs, self.options)
        return unpermute_tokens(expert_output, handle.plan)
