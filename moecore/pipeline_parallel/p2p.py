"""Point-to-point exchange of activations and their gradients between pipeline stages.

Every message between two neighbouring stages has one shape known in advance: the hidden
states of one micro-batch, ``[S, B, H]`` (``S/tp`` under sequence parallel), in the model's
``params_dtype`` (:func:`get_tensor_shape`). Forward activations go to the *next* stage and
gradients to the *previous* one; in the interleaved schedule the last rank's "next" is rank 0
(the next model chunk), so with two stages both directions join the same pair of ranks.

All sends and receives of one schedule step are posted together (``batch_isend_irecv``) and
then waited on, so two stages exchanging in both directions cannot deadlock. Between one pair of
ranks, sends are posted in the order (next, prev) and receives in the order (prev, next): NCCL
matches the messages of a pair in posting order, and this order pairs a forward activation with
a forward receive on the other side. Gloo additionally gets distinct tags per direction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moecore.parallel_state import ParallelState, get_parallel_state

_FORWARD_TAG, _BACKWARD_TAG = 1, 2
_WARMED_GROUPS: set[int] = set()


def _warm_up_nccl(group, device) -> None:
    """One collective over the pipeline group before its first ``batch_isend_irecv``: NCCL
    creates the communicator lazily, and a first p2p batch that not every rank of the group
    joins at once may hang (torch's documented requirement)."""
    if id(group) in _WARMED_GROUPS:
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    _WARMED_GROUPS.add(id(group))


def get_tensor_shape(config, seq_length: int, micro_batch_size: int,
                     parallel_state: ParallelState | None = None) -> tuple[int, int, int]:
    """``(S, B, H)`` of the hidden states one stage hands to the next (``S/tp`` under sequence
    parallel, ``S/cp`` with context parallelism)."""
    ps = parallel_state or get_parallel_state()
    seq = seq_length // ps.cp_size
    if config.sequence_parallel and ps.tp_size > 1:
        if seq % ps.tp_size:
            raise ValueError(f"sequence length {seq} is not divisible by the tensor parallel "
                             f"size {ps.tp_size} (sequence parallel splits it)")
        seq //= ps.tp_size
    return (seq, micro_batch_size, config.hidden_size)


class P2PCommunicator:
    """Sends and receives between the neighbours of this rank in its pipeline group.

    ``tensor_shape``/``dtype`` describe every message; a tensor of another shape or dtype is a
    ``ValueError`` (both sides must agree, or the receiver would read garbage). Received
    activations are fresh leaves; the schedule turns on ``requires_grad`` when it will
    back-propagate into them.
    """

    def __init__(self, tensor_shape: tuple[int, ...], dtype: torch.dtype, device,
                 parallel_state: ParallelState | None = None):
        ps = parallel_state or get_parallel_state()
        self.ps = ps
        self.shape = tuple(int(s) for s in tensor_shape)
        self.dtype, self.device = dtype, torch.device(device)
        ranks = ps.ranks["pipeline_model_parallel"]
        i, n = ps.pp_rank, len(ranks)
        self.next_rank, self.prev_rank = ranks[(i + 1) % n], ranks[(i - 1) % n]
        self.group = ps.pp_group
        nccl = self.group is not None and dist.get_backend(self.group) == "nccl"
        self.use_tags = self.group is not None and not nccl
        if nccl:  # every rank of the group builds its communicator at the schedule's start
            _warm_up_nccl(self.group, self.device)

    # ---- core ------------------------------------------------------------------------------
    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(
                f"pipeline stage {self.ps.pp_rank} sends {what} of shape {tuple(t.shape)} and "
                f"dtype {t.dtype}, but the pipeline exchanges {self.shape} {self.dtype} "
                "([seq (/tp under sequence parallel), micro-batch, hidden] in params_dtype); "
                "check --seq-length, --micro-batch-size and the model's output")
        return t.contiguous()

    def _op(self, fn, tensor, peer, tag):
        if self.use_tags:
            return dist.P2POp(fn, tensor, peer, group=self.group, tag=tag)
        return dist.P2POp(fn, tensor, peer, group=self.group)

    def communicate(self, send_next: torch.Tensor | None = None,
                    send_prev: torch.Tensor | None = None, recv_prev: bool = False,
                    recv_next: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Post every requested transfer, wait for all; returns ``(from_prev, from_next)``.

        ``send_next``: forward activation for the next stage; ``send_prev``: gradient for the
        previous stage; ``recv_prev``: receive an activation from the previous stage;
        ``recv_next``: receive a gradient from the next stage.
        """
        from_prev = from_next = None
        ops = []
        if send_next is not None:
            ops.append(self._op(dist.isend, self._check(send_next, "an activation"),
                                self.next_rank, _FORWARD_TAG))
        if send_prev is not None:
            ops.append(self._op(dist.isend, self._check(send_prev, "a gradient"),
                                self.prev_rank, _BACKWARD_TAG))
        if recv_prev:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(self._op(dist.irecv, from_prev, self.prev_rank, _FORWARD_TAG))
        if recv_next:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(self._op(dist.irecv, from_next, self.next_rank, _BACKWARD_TAG))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            if self.device.type == "cuda":
                # batch_isend_irecv's work may run on a side stream; order later kernels.
                torch.cuda.current_stream().synchronize()
        return from_prev, from_next

    # ---- the 1F1B vocabulary (Megatron's p2p_communication names) -----------------------------
    @property
    def is_first(self) -> bool:
        return self.ps.is_pipeline_first_stage()

    @property
    def is_last(self) -> bool:
        return self.ps.is_pipeline_last_stage()

    def recv_forward(self) -> torch.Tensor | None:
        """The previous stage's activation; None on the first stage."""
        return None if self.is_first else self.communicate(recv_prev=True)[0]

    def recv_backward(self) -> torch.Tensor | None:
        """The next stage's gradient of our output; None on the last stage."""
        return None if self.is_last else self.communicate(recv_next=True)[1]

    def send_forward(self, output: torch.Tensor | None) -> None:
        if not self.is_last:
            self.communicate(send_next=output)

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        if not self.is_first:
            self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor | None) -> torch.Tensor | None:
        if self.is_last:
            return None
        return self.communicate(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        if self.is_first:
            return None
        return self.communicate(send_prev=input_grad, recv_prev=True)[0]
