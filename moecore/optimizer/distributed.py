"""Distributed optimizer (ZeRO-1, Megatron-Core's ``DistributedOptimizer``).

Gradients live in the contiguous buffers of :class:`~moecore.optimizer.grad_buffer.
DataParallelGradSync` (``shard=True``): each bucket is reduce-scattered over its data-parallel
group (dense: ``data_parallel_with_cp``, experts: ``expert_data_parallel``), so data-parallel
rank ``r`` ends with the reduced ``r``-th slice of every bucket. The optimizer owns only those
slices: for each parameter overlapping them a *piece* - an fp32 main copy of that range (a view
of the parameter itself for fp32 models) and its two Adam moments. A step updates the pieces,
writes low-precision params back into the parameter buffer, and all-gathers every bucket
(optionally in the background until the next forward needs the parameters).

Optimizer state per rank is therefore ``1/DP`` of AdamW's (plus bucket padding). The global
gradient norm adds the squared norms of the pieces over the data-parallel groups, then over the
model-parallel groups (:func:`~moecore.optimizer.clip_grads.get_grad_norm_fp32`).

Checkpoints hold the state in a data-parallel-independent form: for every parameter (in
``model_params`` order) its full fp32 main value and both moments, gathered over the
data-parallel group. Loading re-slices them for the current data-parallel size, so a run saved
at DP=4 resumes at DP=2. Plain-optimizer checkpoints load too (and vice versa, see
:mod:`moecore.optimizer.full_state`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moecore.backends import AUTO
from moecore.optimizer.clip_grads import get_grad_norm_fp32
from moecore.optimizer.full_state import (
    FULL_STATE_FORMAT,
    HALF_DTYPES,
    MOMENTS,
    check_full_state,
    group_hparams,
    plain_state_to_full,
)
from moecore.optimizer.grad_buffer import DataParallelGradSync, GradBuffer, _all_gather
from moecore.optimizer.grad_scaler import ConstantGradScaler
from moecore.optimizer.optimizer import _PARAM_ATTRS, MegatronOptimizer, is_fused, make_adamw
from moecore.parallel_state import ParallelState, get_parallel_state


@dataclass(eq=False)
class _Piece:
    """The part ``[lo, hi)`` (buffer coordinates) of ``param`` this rank optimises."""

    param: nn.Parameter
    index: int  # position in model_params
    buffer: GradBuffer
    lo: int
    hi: int
    offset: int  # where the piece starts inside the flattened parameter
    main: torch.Tensor

    @property
    def half(self) -> bool:
        return self.param.dtype in HALF_DTYPES

    def grad(self) -> torch.Tensor:
        return self.buffer.grad_data[self.lo:self.hi]

    def slice_of(self, full: torch.Tensor) -> torch.Tensor:
        """This piece's range of a full ``[param shape]`` tensor, on the piece's device."""
        n = self.hi - self.lo
        return full.reshape(-1)[self.offset:self.offset + n].to(self.main.device)

    def param_slice(self) -> torch.Tensor:
        return self.buffer.param_data[self.lo:self.hi]


class DistributedOptimizer(MegatronOptimizer):
    """AdamW over this rank's slices of the fp32 main parameters (see module docstring).

    Same interface as :class:`MegatronOptimizer`; ``param_groups`` hold the pieces, so the LR
    scheduler works unchanged. ``grad_sync`` must have been built with ``shard=True`` over the
    same parameters.
    """

    def __init__(self, param_groups: list[dict], grad_sync: DataParallelGradSync, *, lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, clip_grad: float = 0.0,
                 grad_scaler: ConstantGradScaler | None = None,
                 parallel_state: ParallelState | None = None, check_for_nan: bool = True,
                 moment_dtypes: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
                 log_num_zeros_in_grad: bool = False, adamw_backend: str = AUTO):
        if not grad_sync.shard:
            raise ValueError("the distributed optimizer needs a DataParallelGradSync built with "
                             "shard=True")
        self.ps = parallel_state or get_parallel_state()
        self.clip_grad, self.grad_scaler, self.check_for_nan = clip_grad, grad_scaler, \
            check_for_nan
        self.grad_sync = grad_sync
        self.model_params = [p for g in param_groups for p in g["params"]]
        index = self._index_of = {id(p): i for i, p in enumerate(self.model_params)}
        group_of = {id(p): gi for gi, g in enumerate(param_groups) for p in g["params"]}
        synced = {id(p) for p in grad_sync.params()}
        if synced != set(index):
            raise ValueError(f"the optimizer's {len(index)} parameters and the gradient "
                             f"buffers' {len(synced)} parameters differ; build both from the "
                             "same model chunks")
        self.pieces: list[_Piece] = []
        torch_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [],
                         "weight_decay": weight_decay * g.get("wd_mult", 1.0)}
                        for g in param_groups]
        for buf in grad_sync.buffers:
            for bucket in buf.buckets:
                for piece in self._bucket_pieces(buf, bucket, index):
                    self.pieces.append(piece)
                    torch_groups[group_of[id(piece.param)]]["params"].append(piece.main)
        self.moment_dtypes = moment_dtypes
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        self.num_zeros_in_grad = None
        self.optimizer = make_adamw(torch_groups, lr=lr, betas=betas, eps=eps,
                                    weight_decay=weight_decay, backend=adamw_backend,
                                    sharded=True, moment_dtypes=moment_dtypes)

    @staticmethod
    def _bucket_pieces(buf: GradBuffer, bucket, index: dict) -> list[_Piece]:
        shard_lo, shard_hi = bucket.shard_range(buf.dp_rank)
        out = []
        for p in bucket.params:
            p_lo, p_hi = buf.offsets[id(p)]
            lo, hi = max(p_lo, shard_lo), min(p_hi, shard_hi)
            if lo >= hi:
                continue
            if p.dtype == torch.float32:
                main = buf.param_data[lo:hi]  # the parameter itself: updated in place
            elif p.dtype in HALF_DTYPES:
                main = buf.param_data[lo:hi].detach().float()
            else:
                raise ValueError(f"cannot optimise a parameter of dtype {p.dtype} with the "
                                 "distributed optimizer (fp32, bf16 or fp16 only)")
            for attr in _PARAM_ATTRS + ("shared_embedding",):
                if hasattr(p, attr):
                    setattr(main, attr, getattr(p, attr))
            out.append(_Piece(p, index[id(p)], buf, lo, hi, lo - p_lo, main))
        return out

    # ---- views --------------------------------------------------------------------------------
    @property
    def main_params(self) -> list[torch.Tensor]:
        return [pc.main for pc in self.pieces]

    @property
    def is_mixed_precision(self) -> bool:
        return any(p.dtype in HALF_DTYPES for p in self.model_params)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state on this rank: fp32 main slices of low-precision params, fp32
        main grads of low-precision params (the full gradient buffer, as in ZeRO-1) and Adam's
        two moments (fp32, or bf16 under the precision-aware optimizer) of this rank's
        slices."""
        n_main = sum(pc.hi - pc.lo for pc in self.pieces if pc.half)
        n_grad = sum(p.numel() for p in self.model_params if p.dtype in HALF_DTYPES)
        n_all = sum(pc.hi - pc.lo for pc in self.pieces)
        moments = self._moment_bytes()
        out = {"main_params": 4 * n_main, "main_grads": 4 * n_grad,
               "adam_moments": moments * n_all}
        out["total"] = sum(out.values())
        # What MegatronOptimizer (replicated AdamW) would hold on this rank, for comparison.
        n_params = sum(p.numel() for p in self.model_params)
        out["replicated_total"] = 4 * n_grad + 4 * n_grad + moments * n_params
        return out

    # ---- stepping -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.grad_sync.zero_grad()
        for pc in self.pieces:
            pc.main.grad = None

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None]:
        """Step on the reduce-scattered slices, then all-gather the updated parameters.

        Call after the gradients were reduced (``finalize_model_grads`` with this optimizer's
        ``grad_sync``). Returns ``(updated, grad_norm)``.
        """
        self.grad_sync.finish_param_sync()
        for pc in self.pieces:
            pc.main.grad = pc.grad()
        grads = [pc.main.grad for pc in self.pieces]
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check_inf(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None
        mains = self.main_params
        grad_norm = get_grad_norm_fp32(mains, self.ps, data_parallel_sharded=True)
        self._check_norm(grad_norm)
        self._count_zeros(mains, data_parallel_sharded=True)
        self._clip_and_step(mains, grad_norm)
        half = [pc for pc in self.pieces if pc.half]
        if half:
            torch._foreach_copy_([pc.param_slice() for pc in half], [pc.main for pc in half])
        self.grad_sync.start_param_sync()
        return True, grad_norm

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 main slices from the model (after loading model weights only)."""
        for pc in self.pieces:
            if pc.half:
                pc.main.copy_(pc.param_slice().float())

    # ---- checkpoints --------------------------------------------------------------------------
    def _local_full(self, pc: _Piece) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(pc.main, {})
        return {"main": pc.main.detach(),
                **{k: state[k] if k in state else torch.zeros_like(pc.main) for k in MOMENTS}}

    @torch.no_grad()
    def state_dict(self, keep: bool = True) -> dict | None:
        """Per-parameter full fp32 main values and Adam moments.

        Collective over the data-parallel groups: every rank must call it. ``keep=False``
        takes part in the gathers without assembling the result (returns None), so only the
        rank that writes the checkpoint holds the whole state (one bucket at a time elsewhere).
        """
        fields = ("main",) + MOMENTS
        full = [dict.fromkeys(fields) for _ in self.model_params]
        for buf in self.grad_sync.buffers:
            for bucket in buf.buckets:
                lo, hi = bucket.shard_range(buf.dp_rank)
                local = torch.zeros(len(fields), hi - lo, dtype=torch.float32,
                                    device=buf.grad_data.device)
                for pc in self.pieces:
                    if pc.buffer is buf and lo <= pc.lo < hi:
                        vals = self._local_full(pc)
                        for j, f in enumerate(fields):
                            local[j, pc.lo - lo:pc.hi - lo] = vals[f]
                gathered = torch.empty(buf.dp_size, *local.shape, dtype=local.dtype,
                                       device=local.device)
                if buf.dp_size > 1 and buf.group is not None:
                    _all_gather(gathered.view(-1), local.view(-1), buf.group).wait()
                else:
                    gathered[0] = local
                if not keep:
                    continue
                whole = gathered.transpose(0, 1).reshape(len(fields), -1)  # [fields, bucket]
                for p in bucket.params:
                    p_lo, p_hi = buf.offsets[id(p)]
                    i = self._index_of[id(p)]
                    for j, f in enumerate(fields):
                        full[i][f] = whole[j, p_lo - bucket.start:p_hi - bucket.start] \
                            .reshape(p.shape).cpu().clone()
        if not keep:
            return None
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return {"format": FULL_STATE_FORMAT, "step": int(max(steps)) if steps else 0,
                "param_groups": [group_hparams(g) for g in self.optimizer.param_groups],
                "params": full,
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a per-parameter state (any data-parallel size) or a plain optimizer's state."""
        if state.get("format") != FULL_STATE_FORMAT:
            state = plain_state_to_full(state, self.model_params)
        check_full_state(state, self.model_params)
        for g, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            g.update({k: v for k, v in saved.items() if k in ("lr", "weight_decay", "betas",
                                                               "eps")})
        step = int(state["step"])
        dtypes = {k: d or torch.float32 for k, d in zip(MOMENTS, self.moment_dtypes)}
        for pc in self.pieces:
            saved = {k: pc.slice_of(t) for k, t in state["params"][pc.index].items()}
            pc.main.copy_(saved["main"])
            if pc.half:
                pc.param_slice().copy_(pc.main)
            self.optimizer.state.pop(pc.main, None)
            if step > 0:
                # The fused AdamW keeps its step counters on the parameters' device.
                self.optimizer.state[pc.main] = {
                    "step": torch.tensor(float(step), device=pc.main.device
                                         if is_fused(self.optimizer) else "cpu"),
                    **{k: saved[k].to(dtypes[k], copy=True) for k in MOMENTS}}
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.grad_sync.start_param_sync()
        self.grad_sync.finish_param_sync()
