"""AdamW over fp32 main parameters, with fp16 loss scaling and global-norm clipping.

Mixed precision (Megatron's ``Float16OptimizerWithFloat16Params``): model parameters stay in
bf16/fp16 for compute; the optimizer keeps an fp32 *main* copy of each, steps on it with the
fp32 gradients accumulated in ``param.main_grad``, and copies the result back. fp32 models step
on their own parameters. One ``step``:

1. main grads <- model grads (fp32; aliases, no copy);
2. fp16 only: unscale by the loss scale, find inf/NaN (max over the world), update the scaler
   and skip the step on overflow;
3. global grad norm over TP/EP shards (:mod:`moecore.optimizer.clip_grads`), clip;
4. AdamW (decoupled weight decay; per-group ``lr``/``weight_decay`` set by the scheduler);
5. model params <- main params.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moecore.backends import AUTO
from moecore.kernels import optim as kernels_optim
from moecore.kernels.optim import TritonAdamW
from moecore.optimizer.clip_grads import clip_grad_norm, count_zeros_fp32, get_grad_norm_fp32
from moecore.optimizer.full_state import FULL_STATE_FORMAT, HALF_DTYPES, full_state_to_plain
from moecore.optimizer.grad_scaler import ConstantGradScaler
from moecore.optimizer.grad_sync import attach_main_grad, model_grad, reset_main_grad
from moecore.parallel_state import ParallelState, get_parallel_state

# Attributes the norm/sync code reads; main copies must carry them.
_PARAM_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride",
                "sequence_parallel", "allreduce", "expert_parallel")
_HALF = HALF_DTYPES


def get_param_groups(model: nn.Module | list[nn.Module], decoupled_lr: float | None = None,
                     decoupled_min_lr: float | None = None) -> list[dict]:
    """Megatron's groups: weight decay on matrices, none on biases and norm weights.

    A parameter gets no decay when its name ends in ``.bias`` or it is 1-D. Each group has
    ``wd_mult`` (1 or 0) and ``lr_mult`` (1) read by :class:`OptimizerParamScheduler`. With
    ``decoupled_lr`` (``--decoupled-lr``) the embedding and output-layer weights
    (``is_embedding_or_output_parameter``) form their own groups, scheduled from that peak to
    ``decoupled_min_lr`` (default: the scheduler's ``min_lr``) instead (``max_lr``/``min_lr``
    keys); the other groups come first.
    """
    modules = model if isinstance(model, (list, tuple)) else [model]
    buckets: dict[tuple[bool, bool], list] = {}
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            decoupled = decoupled_lr is not None and getattr(
                p, "is_embedding_or_output_parameter", False)
            no_decay = name.endswith(".bias") or p.dim() == 1
            buckets.setdefault((decoupled, no_decay), []).append(p)
    groups = []
    for decoupled in (False, True):
        for no_decay in (False, True):
            params = buckets.get((decoupled, no_decay))
            if not params:
                continue
            group = {"params": params, "wd_mult": 0.0 if no_decay else 1.0, "lr_mult": 1.0,
                     "name": ("no_decay" if no_decay else "decay")
                     + ("_decoupled" if decoupled else "")}
            if decoupled:
                group["max_lr"] = decoupled_lr
                if decoupled_min_lr is not None:
                    group["min_lr"] = decoupled_min_lr
            groups.append(group)
    return groups


def make_adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, backend: str = AUTO, sharded: bool = False,
               moment_dtypes: tuple[torch.dtype | None, torch.dtype | None] = (None, None)
               ) -> torch.optim.AdamW:
    """AdamW over ``groups`` through the ``adamw`` registry (:mod:`moecore.kernels.optim`,
    ``--adamw-backend``): ``auto`` takes :class:`~moecore.kernels.optim.TritonAdamW` (one pass
    over each fp32 tensor that can also write the low-precision model copies) when every
    parameter is on one CUDA device where its kernel passed its self-check, else
    ``torch.optim.AdamW(fused=True)`` on CUDA, else torch's default (``foreach``: ~8 passes over
    every fp32 tensor instead of one, tens of milliseconds per step for a 2B-parameter MoE).
    ``sharded`` (the distributed optimizer) rules out ``triton``. All compute the same update up
    to floating-point rounding; CPU runs keep the default implementation.

    ``moment_dtypes``: ``(exp_avg, exp_avg_sq)`` dtypes, None for the parameter's. A bf16 one
    (``--use-precision-aware-optimizer``) always takes :class:`TritonAdamW`, which keeps
    low-precision moments (its torch path included); torch's AdamW cannot.
    """
    if any(d not in (None, torch.float32) for d in moment_dtypes):
        return TritonAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           exp_avg_dtype=moment_dtypes[0], exp_avg_sq_dtype=moment_dtypes[1])
    params = [p for g in groups for p in g["params"]]
    chosen = kernels_optim.select_adamw(params, backend, sharded)
    return chosen.fn(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` is one fused pass that divides by ``optimizer.grad_scale``
    (torch's fused AdamW or :class:`TritonAdamW`)."""
    if isinstance(optimizer, TritonAdamW):
        return True
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict``: the loaded groups carry the saving run's
    ``fused``/``foreach`` choice; restore this run's, with the step counters where it keeps them
    (on the parameters' device for torch's fused AdamW, on the host otherwise, TritonAdamW
    included)."""
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults.get("fused"), \
            optimizer.defaults.get("foreach")
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                step = state["step"]
                state["step"] = step.to(device=p.device if fused else "cpu",
                                        dtype=torch.float32 if fused else step.dtype)


def _main_copy(p: nn.Parameter) -> torch.Tensor:
    main = p.detach().clone().float()
    for attr in _PARAM_ATTRS:
        if hasattr(p, attr):
            setattr(main, attr, getattr(p, attr))
    return main


class MegatronOptimizer:
    """AdamW on fp32 main params (see module docstring). ``param_groups`` are the inner torch
    optimizer's, so a scheduler sets ``lr``/``weight_decay`` on them directly."""

    def __init__(self, param_groups: list[dict], *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip_grad: float = 0.0, grad_scaler: ConstantGradScaler | None = None,
                 parallel_state: ParallelState | None = None, check_for_nan: bool = True,
                 grad_sync=None,
                 moment_dtypes: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
                 log_num_zeros_in_grad: bool = False, adamw_backend: str = AUTO):
        self.ps = parallel_state or get_parallel_state()
        self.moment_dtypes = moment_dtypes
        # --log-num-zeros-in-grad: each step counts the zero main-grad entries (a device tensor)
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        self.num_zeros_in_grad: torch.Tensor | None = None
        # Optional DataParallelGradSync (--overlap-grad-reduce): main grads live in its buffers.
        self.grad_sync = grad_sync
        self.clip_grad = clip_grad
        self.grad_scaler = grad_scaler
        self.check_for_nan = check_for_nan
        self.model_params: list[nn.Parameter] = []
        self.main_params: list[torch.Tensor] = []
        torch_groups = []
        for group in param_groups:
            mains = []
            for p in group["params"]:
                if p.dtype in _HALF:
                    attach_main_grad(p)
                    mains.append(_main_copy(p))
                elif p.dtype == torch.float32 or p.dtype == torch.float64:
                    mains.append(p)
                else:
                    raise ValueError(f"cannot optimise a parameter of dtype {p.dtype}")
                self.model_params.append(p)
            self.main_params.extend(mains)
            torch_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": mains,
                                 "weight_decay": weight_decay * group.get("wd_mult", 1.0)})
        self.optimizer = make_adamw(torch_groups, lr=lr, betas=betas, eps=eps,
                                    weight_decay=weight_decay, backend=adamw_backend,
                                    moment_dtypes=moment_dtypes)
        if isinstance(self.optimizer, TritonAdamW):  # model copies written in the AdamW pass
            self.optimizer.set_model_copies(
                (m, p) for p, m in zip(self.model_params, self.main_params) if m is not p)

    # ---- views --------------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def is_mixed_precision(self) -> bool:
        return any(m is not p for m, p in zip(self.main_params, self.model_params))

    def get_loss_scale(self) -> torch.Tensor:
        return self.grad_scaler.scale if self.grad_scaler is not None else torch.ones(1)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` (identity without a scaler); call before ``backward``."""
        if self.grad_scaler is None:
            return loss
        return loss * self.grad_scaler.scale.to(loss.device)

    def _moment_bytes(self) -> int:
        """Bytes per element of Adam's two moments (fp32 each, 2 for a bf16 one)."""
        return sum(4 if d in (None, torch.float32) else d.itemsize for d in self.moment_dtypes)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state on this rank (allocated lazily by the first step): fp32 main
        copies of low-precision params, fp32 main grads, and Adam's two moments."""
        n_main = sum(m.numel() for m, p in zip(self.main_params, self.model_params)
                     if m is not p)
        n_all = sum(m.numel() for m in self.main_params)
        out = {"main_params": 4 * n_main, "main_grads": 4 * n_main,
               "adam_moments": self._moment_bytes() * n_all}
        out["total"] = sum(out.values())
        return out

    # ---- stepping ------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.zero_grad()
        for p, m in zip(self.model_params, self.main_params):
            p.grad = None
            if hasattr(p, "main_grad") and self.grad_sync is None:
                reset_main_grad(p)
            if m is not p:
                m.grad = None

    def sync_params(self) -> None:
        """Wait for background parameter all-gathers (distributed optimizer); call before
        reading the parameters outside a forward (checkpoints, norms)."""
        if self.grad_sync is not None:
            self.grad_sync.finish_param_sync()

    def _check_norm(self, grad_norm: float) -> None:
        if not math.isfinite(grad_norm) and self.check_for_nan:
            raise RuntimeError(
                f"gradient norm is {grad_norm} on rank {self.ps.rank}: the loss or gradients "
                "hold NaN/inf (lower --lr, use --fp16 loss scaling or --bf16, or pass "
                "--no-check-for-nan-in-loss-and-grad to continue anyway)")

    def _collect_main_grads(self) -> list[torch.Tensor]:
        grads = []
        for p, m in zip(self.model_params, self.main_params):
            g = model_grad(p)
            if m is not p or m.grad is not g:  # fp32 params with buffer-backed main grads too
                m.grad = g if g.dtype == m.dtype else g.to(m.dtype)
            grads.append(m.grad)
        return grads

    def _unscale_and_check_inf(self, grads: list[torch.Tensor]) -> bool:
        device = grads[0].device if grads else torch.device("cpu")
        found = torch.zeros(1, device=device)
        if grads:  # one fused kernel: multiply by 1/scale and flag any inf/NaN
            torch._amp_foreach_non_finite_check_and_unscale_(
                grads, found, self.grad_scaler.inv_scale.to(device))
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must skip together: expert ranks hold different gradients.
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item() > 0)

    def _clip_and_step(self, mains: list[torch.Tensor], grad_norm: float) -> None:
        """Clip the main grads to ``clip_grad`` (global norm ``grad_norm``) and run AdamW.

        A fused AdamW (torch's or TritonAdamW) divides each gradient by ``grad_scale`` as it
        reads it, so clipping costs no pass over the gradients of its own there (``1 / coeff``
        instead of ``coeff``: equal up to rounding).
        """
        coeff = self.clip_grad / (grad_norm + 1e-6) if self.clip_grad > 0 else 1.0
        if coeff < 1.0 and is_fused(self.optimizer) and mains:
            self.optimizer.grad_scale = torch.full((), 1.0 / coeff, dtype=torch.float32,
                                                   device=mains[0].device)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
            return
        clip_grad_norm(mains, self.clip_grad, self.ps, total_norm=grad_norm)
        self.optimizer.step()

    def _count_zeros(self, mains: list[torch.Tensor], data_parallel_sharded: bool) -> None:
        if self.log_num_zeros_in_grad:
            self.num_zeros_in_grad = count_zeros_fp32(mains, self.ps, data_parallel_sharded)

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None]:
        """Apply one update. Returns ``(updated, grad_norm)``; ``(False, None)`` when an fp16
        overflow skipped the step."""
        grads = self._collect_main_grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check_inf(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None
        grad_norm = get_grad_norm_fp32(self.main_params, self.ps)
        self._check_norm(grad_norm)
        self._count_zeros(self.main_params, data_parallel_sharded=False)
        self._clip_and_step(self.main_params, grad_norm)
        written = getattr(self.optimizer, "model_copies_written", ())  # by TritonAdamW's pass
        pairs = [(p, m) for p, m in zip(self.model_params, self.main_params)
                 if m is not p and id(m) not in written]
        if pairs:  # one fused launch instead of one copy per parameter
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        return True, grad_norm

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 main copies from the model (after loading model weights only)."""
        for p, m in zip(self.model_params, self.main_params):
            if m is not p:
                m.copy_(p.float())

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        mains = [m for m, p in zip(self.main_params, self.model_params) if m is not p]
        return {"optimizer": self.optimizer.state_dict(),
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
                "fp32_from_fp16_params": [m.detach().clone() for m in mains]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load optimizer state (also a distributed optimizer's per-parameter state); raises
        ``ValueError`` when the parameter layout differs."""
        if state.get("format") == FULL_STATE_FORMAT:
            state = full_state_to_plain(state, self)
        self.optimizer.load_state_dict(state["optimizer"])
        keep_implementation(self.optimizer)
        if isinstance(self.optimizer, TritonAdamW):  # torch's load cast them to fp32
            self.optimizer.cast_moments()
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        mains = [m for m, p in zip(self.main_params, self.model_params) if m is not p]
        saved = state.get("fp32_from_fp16_params") or []
        if mains and len(saved) != len(mains):
            raise ValueError(f"checkpoint has {len(saved)} fp32 main params but this model has "
                             f"{len(mains)} low-precision params (different precision or model)")
        for i, (m, s) in enumerate(zip(mains, saved)):
            if m.shape != s.shape:
                raise ValueError(f"fp32 main param #{i}: checkpoint shape {tuple(s.shape)} != "
                                 f"model shape {tuple(m.shape)}")
            m.copy_(s)
        if mains and not saved:
            self.reload_model_params()
