"""Optimizer kernels: fp32 main-grad accumulation, and an AdamW step that also writes the
low-precision model copy.

- ``accumulate_main_grad_(main, grad, overwrite)``: ``main = grad`` or ``main += grad`` for an
  fp32 ``main`` and a ``grad`` of the same shape (fp32/bf16/fp16): the post-accumulate-grad hook
  of mixed-precision training. Reference ``main.copy_(grad)`` / ``main.add_(grad)``; the Triton
  kernel is one flat pass, bitwise equal to it (``fp32(grad)`` is exact, then one fp32 add).
- ``adamw_step_triton(param, grad, exp_avg, exp_avg_sq, model_param, *, step, lr, ...)``: one
  ``torch.optim.AdamW`` update of one tensor (gradient first divided by an optional device-side
  ``grad_scale``, as torch's fused AdamW does) and ``model_param <- param`` in the same pass.
  Reference: the ops of ``torch.optim.AdamW(foreach=False)``; the Triton kernel reads the four
  fp32 tensors once and writes three plus the model copy, equal up to fp32 rounding
  (IEEE division and square root; the bf16 copy rounds to nearest even like ``Tensor.to``).
- :class:`TritonAdamW`: ``torch.optim.AdamW`` stepping large fp32 tensors with the Triton
  kernel (one launch each) and the others with torch's own implementation; same state and
  state dict as torch's non-fused AdamW.

The Triton kernels run on a device once their once-per-process self-check passed there
(decision cached per device) for tensors that fit (contiguous, fp32 main) and hold at least
``TRITON_MIN_NUMEL`` elements; the rest takes the torch path. :func:`benchmark` times both.

Registry ``ADAMW`` (``--adamw-backend``, an optimizer setting): ``triton`` (:class:`TritonAdamW`),
``torch_fused`` (``torch.optim.AdamW(fused=True)``), ``torch`` (its ``foreach`` path);
:func:`select_adamw` resolves a request for a list of parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adamw import adamw as torch_adamw

from moecore.backends import AUTO, Backend, BackendRegistry, always_available
from moecore.kernels import (
    HAVE_TRITON,
    TRITON_DTYPES,
    assert_close_rel,
    checked_triton_available,
    triton_kernel_ready,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

# Elements per program and warps (16-byte accesses; on an H200 larger blocks, up to 16384,
# measured the same or up to 3% slower).
_ACC_BLOCK, _ACC_WARPS = 2048, 4
_ADAM_BLOCK, _ADAM_WARPS = 1024, 4
# Smaller tensors take torch's ops (add_/copy_; AdamW's multi-tensor ops in one batch): a
# Triton launch costs ~15-20 us of host time, while an H200 saves ~1.2 us per million elements
# accumulated (add_ 0.95 vs 0.63 ms for 2^28) and ~2.7 per million AdamW-updated.
TRITON_MIN_NUMEL = 1 << 20


# ---- torch reference -----------------------------------------------------------------------


def accumulate_main_grad_torch(main: torch.Tensor, grad: torch.Tensor,
                               overwrite: bool = False) -> None:
    """main [*] fp32 <- grad [*] (``overwrite``) or main + grad, in place."""
    if overwrite:
        main.copy_(grad)
    else:
        main.add_(grad)


def _adam_scalars(step: float, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """``(step_size, sqrt(bias_correction2))`` in double, as ``_single_tensor_adam`` has them."""
    return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


def adamw_step_torch(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_sq: torch.Tensor, model_param: torch.Tensor | None = None, *,
                     step: float, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update in place: param, exp_avg, exp_avg_sq [*] (param's dtype, or bf16
    moments: updated in param's dtype and rounded back), grad [*] (divided by the 0-dim
    ``grad_scale`` first when given; not written), ``step`` the count including this update;
    then ``model_param [*] <- param`` (its dtype). The ops of
    ``torch.optim.AdamW(foreach=False)``."""
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    if grad_scale is not None:
        grad = grad / grad_scale.to(grad.device)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    m, v = (t if t.dtype == param.dtype else t.to(param.dtype) for t in (exp_avg, exp_avg_sq))
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    param.addcdiv_(m, denom, value=-step_size)
    for low, full in ((exp_avg, m), (exp_avg_sq, v)):
        if low is not full:  # low-precision moments: the update in param's dtype, rounded once
            low.copy_(full)
    if model_param is not None:
        model_param.copy_(param)


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _accumulate_kernel(main_ptr, grad_ptr, n, OVERWRITE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if not OVERWRITE:
            g = tl.load(main_ptr + offs, mask=mask) + g
        tl.store(main_ptr + offs, g, mask=mask)

    @triton.jit
    def _to_bf16_rne(x):
        # c10::BFloat16's rounding (nearest even; NaN -> 0x7FC0) in integer ops: the same on
        # GPUs and in the interpreter, whose own fp32 -> bf16 cast truncates.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _store_fp32_or_bf16(ptr, offs, x, mask, BF16: tl.constexpr):
        if BF16:
            tl.store(ptr + offs, _to_bf16_rne(x), mask=mask)
        else:
            tl.store(ptr + offs, x, mask=mask)

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, scale_ptr, n, decay, w1, beta2, w2,
                      neg_step_size, bc2_sqrt, eps, HAS_OUT: tl.constexpr,
                      OUT_BF16: tl.constexpr, HAS_SCALE: tl.constexpr, SMALL_W1: tl.constexpr,
                      M_BF16: tl.constexpr, V_BF16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(scale_ptr))
        p = p * decay
        if SMALL_W1:  # torch's lerp(m, g, w1)
            m = m + w1 * (g - m)
        else:
            m = g - (g - m) * (1.0 - w1)
        v = v * beta2 + w2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)
        tl.store(p_ptr + offs, p, mask=mask)
        _store_fp32_or_bf16(m_ptr, offs, m, mask, M_BF16)
        _store_fp32_or_bf16(v_ptr, offs, v, mask, V_BF16)
        if HAS_OUT:
            if OUT_BF16:
                tl.store(out_ptr + offs, _to_bf16_rne(p), mask=mask)
            else:
                tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def _fits(fp32: tuple, other: tuple) -> bool:
    """The kernels' layout: ``fp32`` tensors fp32, ``other`` (None skipped) fp32/bf16/fp16; all
    contiguous, of one numel and device."""
    ts = [t for t in fp32 + other if t is not None]
    return (all(t.dtype == torch.float32 for t in fp32)
            and all(t.dtype in TRITON_DTYPES for t in ts)
            and all(t.is_contiguous() and t.numel() == ts[0].numel()
                    and t.device == ts[0].device for t in ts))


MOMENT_DTYPES = (torch.float32, torch.bfloat16)


def _adamw_fits(param, grad, exp_avg, exp_avg_sq, model_param) -> bool:
    """The AdamW kernel's layout: :func:`_fits` with fp32 ``param`` and fp32/bf16 moments."""
    return (exp_avg.dtype in MOMENT_DTYPES and exp_avg_sq.dtype in MOMENT_DTYPES
            and _fits((param,), (grad, exp_avg, exp_avg_sq, model_param)))


def _launch_accumulate(main, grad, overwrite):
    n = main.numel()
    if n:
        _accumulate_kernel[(triton.cdiv(n, _ACC_BLOCK),)](main, grad, n, OVERWRITE=overwrite,
                                                          BLOCK=_ACC_BLOCK, num_warps=_ACC_WARPS)


def _launch_adamw(param, grad, exp_avg, exp_avg_sq, model_param, *, step, lr, beta1, beta2,
                  eps, weight_decay, grad_scale):
    n = param.numel()
    if n == 0:
        return
    step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=param.device, dtype=torch.float32)
    out = param if model_param is None else model_param
    w1 = 1 - beta1
    _adamw_kernel[(triton.cdiv(n, _ADAM_BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, out, param if grad_scale is None else grad_scale, n,
        1 - lr * weight_decay, w1, beta2, 1 - beta2, -step_size, bc2_sqrt, eps,
        HAS_OUT=model_param is not None, OUT_BF16=out.dtype == torch.bfloat16,
        HAS_SCALE=grad_scale is not None, SMALL_W1=abs(w1) < 0.5,
        M_BF16=exp_avg.dtype == torch.bfloat16, V_BF16=exp_avg_sq.dtype == torch.bfloat16,
        BLOCK=_ADAM_BLOCK, num_warps=_ADAM_WARPS)


def accumulate_main_grad_triton(main: torch.Tensor, grad: torch.Tensor,
                                overwrite: bool = False) -> None:
    """Same contract as :func:`accumulate_main_grad_torch` for contiguous tensors (one pass)."""
    if not _fits((main,), (grad,)):
        raise ValueError("accumulate_main_grad_triton needs a contiguous fp32 main and a "
                         "contiguous fp32/bf16/fp16 grad of the same numel")
    _launch_accumulate(main, grad, overwrite)


def adamw_step_triton(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, model_param: torch.Tensor | None = None, *,
                      step: float, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, grad_scale: torch.Tensor | None = None) -> None:
    """Same contract as :func:`adamw_step_torch` for contiguous fp32 param, fp32/bf16
    exp_avg/exp_avg_sq, fp32/bf16/fp16 grad and model_param: one pass over all of them (bf16
    moments are read, updated in fp32 and rounded to nearest even)."""
    if not _adamw_fits(param, grad, exp_avg, exp_avg_sq, model_param):
        raise ValueError("adamw_step_triton needs contiguous fp32 param, fp32/bf16 moments and "
                         "fp32/bf16/fp16 grad and model_param, all of one numel and device")
    _launch_adamw(param, grad, exp_avg, exp_avg_sq, model_param, step=step, lr=lr, beta1=beta1,
                  beta2=beta2, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)


# ---- self-checks and dispatch --------------------------------------------------------------


def _check_accumulate(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in TRITON_DTYPES:
        main = torch.randn(8192 + 37, device=device, generator=gen)
        grad = torch.randn(main.shape, device=device, generator=gen).to(dtype)
        for overwrite in (True, False):
            got, want = main.clone(), main.clone()
            accumulate_main_grad_triton(got, grad, overwrite)
            accumulate_main_grad_torch(want, grad, overwrite)
            if not torch.equal(got, want):
                raise AssertionError(f"accumulate ({dtype}, overwrite={overwrite}) differs")


def _check_adamw(device: torch.device) -> None:
    """Three steps (weight decay, grad_scale on the last) against torch.optim.AdamW."""
    gen = torch.Generator(device=device).manual_seed(0)
    param = torch.randn(4096 + 37, device=device, generator=gen)
    ref = param.clone().requires_grad_()
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    model = param.to(torch.bfloat16)
    for step in (1, 2, 3):
        grad = torch.randn(param.shape, device=device, generator=gen)
        scale = torch.full((), 1.5, device=device) if step == 3 else None
        ref.grad = grad if scale is None else grad / scale
        torch_opt.step()
        adamw_step_triton(param, grad, m, v, model, step=step, lr=1e-2, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.1, grad_scale=scale)
    assert_close_rel(param, ref.detach(), 1e-5, "adamw param")
    assert_close_rel(v, torch_opt.state[ref]["exp_avg_sq"], 1e-5, "adamw exp_avg_sq")
    if not torch.equal(model, param.to(torch.bfloat16)):
        raise AssertionError("adamw: the bf16 model copy is not param.to(bf16)")
    # bf16 moments (--exp-avg-dtype / --exp-avg-sq-dtype bf16) against the reference
    want = [param.clone(), m.bfloat16(), v.bfloat16()]
    got = [t.clone() for t in want]
    grad = torch.randn(param.shape, device=device, generator=gen)
    hp = dict(step=4, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    adamw_step_torch(*want[:1], grad, *want[1:], **hp)
    adamw_step_triton(*got[:1], grad, *got[1:], **hp)
    for a, b, what in zip(got, want, ("param", "exp_avg", "exp_avg_sq")):
        assert_close_rel(a, b, 1e-5 if what == "param" else 1e-2, f"adamw bf16-moment {what}")


_CHECKS = {"main_grad_accumulate": _check_accumulate, "adamw": _check_adamw}


def _triton_ready(op: str, device: torch.device) -> bool:
    """Whether ``op``'s Triton kernel runs on ``device`` (Triton, CUDA, self-check passed)."""
    # the adamw registry logs its own choice
    return triton_kernel_ready(op, _CHECKS[op], device, log=op != "adamw")


def triton_adamw_available(device) -> bool:
    """Whether :class:`TritonAdamW` runs its kernel for fp32 tensors on ``device``."""
    return _triton_ready("adamw", torch.device(device))


def accumulate_main_grad_(main: torch.Tensor, grad: torch.Tensor, overwrite: bool = False) -> None:
    """main [*] fp32 <- grad [*] (``overwrite``) or main + grad, in place: the Triton kernel
    where it runs, the tensors fit and hold at least ``TRITON_MIN_NUMEL`` elements, else the
    torch reference (bitwise the same)."""
    if HAVE_TRITON and main.numel() >= TRITON_MIN_NUMEL \
            and _triton_ready("main_grad_accumulate", main.device) and _fits((main,), (grad,)):
        _launch_accumulate(main, grad, overwrite)
    else:
        accumulate_main_grad_torch(main, grad, overwrite)


# ---- optimizer -----------------------------------------------------------------------------


class TritonAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step`` runs the Triton kernel (one launch per tensor) for
    fp32 tensors of at least ``TRITON_MIN_NUMEL`` elements on a device where it passed its
    self-check, and torch's own AdamW functional, batched per device, for the others.

    State and state dict are exactly torch's non-fused AdamW's (``state[p]`` = ``step`` (0-dim
    fp32 CPU tensor), ``exp_avg``, ``exp_avg_sq``; the same ``param_groups`` keys), so
    checkpoints load both ways; a ``step`` loaded onto a device (from a fused AdamW) moves to
    the host on the next step. ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` ``torch.bfloat16`` keep
    that moment in bf16 (Megatron's precision-aware optimizer: updated in fp32, rounded to
    nearest even, in the kernel or the per-tensor reference; loaded moments of another dtype
    are cast at the next step). ``grad_scale`` (attribute, 0-dim fp32 tensor): every gradient is
    divided by it, as in torch's fused AdamW (the gradients themselves are left unscaled).
    :meth:`set_model_copies` names low-precision copies written by the step (in the kernel's
    pass, else one ``_foreach_copy_``); the last step's are in ``model_copies_written`` (ids of
    the mains). No amsgrad, maximize, found_inf.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, exp_avg_dtype: torch.dtype | None = None,
                 exp_avg_sq_dtype: torch.dtype | None = None):
        if amsgrad or maximize:
            raise ValueError("TritonAdamW supports neither amsgrad nor maximize")
        for name, dtype in (("exp_avg_dtype", exp_avg_dtype),
                            ("exp_avg_sq_dtype", exp_avg_sq_dtype)):
            if dtype is not None and dtype not in MOMENT_DTYPES:
                raise ValueError(f"TritonAdamW {name}={dtype}: the moments are kept in fp32 "
                                 "or bf16")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # None: the parameter's dtype (torch's AdamW); bf16: the precision-aware optimizer.
        self.moment_dtypes = {"exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype}
        self._model_of: dict[int, torch.Tensor] = {}
        self.model_copies_written: set[int] = set()

    def _moments(self, p: torch.Tensor, state: dict) -> None:
        """Create ``state``'s moments (zeros) or bring loaded ones to the configured dtype."""
        for key, dtype in self.moment_dtypes.items():
            dtype = dtype or p.dtype
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            elif state[key].dtype != dtype:  # e.g. torch's load_state_dict cast them to p's
                state[key] = state[key].to(dtype)

    def cast_moments(self) -> None:
        """Bring every existing moment to its configured dtype now (after loading a state)."""
        for group in self.param_groups:
            for p in group["params"]:
                if self.state.get(p):
                    self._moments(p, self.state[p])

    def set_model_copies(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``(main, model)`` pairs: each step writes ``model <- main`` (model's dtype)."""
        self._model_of = {id(main): model for main, model in pairs}

    @staticmethod
    def _kernel_takes(p, grad, exp_avg, exp_avg_sq, model) -> bool:
        return (HAVE_TRITON and p.numel() >= TRITON_MIN_NUMEL and _triton_ready("adamw", p.device)
                and p.dtype == torch.float32 and _adamw_fits(p, grad, exp_avg, exp_avg_sq, model))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "found_inf", None) is not None:
            raise NotImplementedError("TritonAdamW does not take found_inf")
        grad_scale = getattr(self, "grad_scale", None)
        model_of = getattr(self, "_model_of", {})
        written = set()
        copies: list[list] = [[], []]  # [models, mains] written by torch's path
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("TritonAdamW supports neither amsgrad nor maximize")
            hparams = dict(lr=float(group["lr"]), beta1=float(group["betas"][0]),
                           beta2=float(group["betas"][1]), eps=group["eps"],
                           weight_decay=group["weight_decay"])
            rest: dict[torch.device, list[list]] = {}  # device -> [params, grads, m, v, steps]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("TritonAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 \
                        else torch.float32  # torch's _get_scalar_dtype()
                    state["step"] = torch.tensor(0.0, dtype=dtype)
                elif state["step"].device.type != "cpu":
                    state["step"] = state["step"].cpu()
                self._moments(p, state)
                model = model_of.get(id(p))
                tensors = (p.grad, state["exp_avg"], state["exp_avg_sq"], model)
                if self._kernel_takes(p, *tensors):
                    state["step"] += 1
                    _launch_adamw(p, *tensors, step=state["step"].item(), grad_scale=grad_scale,
                                  **hparams)
                elif state["exp_avg"].dtype != p.dtype or state["exp_avg_sq"].dtype != p.dtype:
                    # low-precision moments outside the kernel: the per-tensor reference
                    state["step"] += 1
                    adamw_step_torch(p, *tensors, step=state["step"].item(),
                                     grad_scale=grad_scale, **hparams)
                else:
                    lists = rest.setdefault(p.device, [[], [], [], [], []])
                    for lst, t in zip(lists, (p,) + tensors[:3] + (state["step"],)):
                        lst.append(t)
                    if model is not None:
                        copies[0].append(model)
                        copies[1].append(p)
                if model is not None:
                    written.add(id(p))
            for device, (params, grads, exp_avgs, exp_avg_sqs, steps) in rest.items():
                if grad_scale is not None:
                    grads = torch._foreach_div(grads, grad_scale.to(device))
                torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                            maximize=False, **hparams)
        if copies[0]:
            torch._foreach_copy_(*copies)
        self.model_copies_written = written
        return loss


# ---- the adamw registry --------------------------------------------------------------------

ADAMW_BACKENDS = (AUTO, "triton", "torch_fused", "torch")


def _on_cuda(device=None, **ctx) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _triton_adamw_available(sharded: bool = False, **ctx) -> tuple[bool, str]:
    # TritonAdamW runs anywhere (its torch path for tensors the kernel cannot take).
    if sharded:
        return False, "the distributed optimizer steps shard views with torch's AdamW"
    return True, ""


def _triton_adamw_auto_ok(device=None, sharded: bool = False, **ctx) -> bool:
    return not sharded and _on_cuda(device) and triton_adamw_available(device)


def _fused_adamw(groups, **kwargs):
    return torch.optim.AdamW(groups, **kwargs, fused=True)


ADAMW = BackendRegistry("adamw", flag="--adamw-backend")
ADAMW.register(Backend("triton", _triton_adamw_available, TritonAdamW, _triton_adamw_auto_ok,
                       "TritonAdamW: one kernel per fp32 tensor, model copies included"))
ADAMW.register(Backend("torch_fused", always_available, _fused_adamw, _on_cuda,
                       "torch.optim.AdamW(fused=True)"))
ADAMW.register(Backend("torch", always_available, torch.optim.AdamW,
                       description="torch.optim.AdamW (foreach)"))


def params_device(params: list[torch.Tensor]) -> torch.device | None:
    """The one device of ``params`` when all are floating-point tensors there, else None."""
    devices = {p.device for p in params}
    if len(devices) != 1 or not all(p.is_floating_point() for p in params):
        return None
    return devices.pop()


def select_adamw(params: list[torch.Tensor], requested: str = AUTO,
                 sharded: bool = False) -> Backend:
    """The ``adamw`` backend for ``params`` (``sharded``: the distributed optimizer's shards);
    its ``fn(groups, lr=, betas=, eps=, weight_decay=)`` builds the optimizer. ``auto`` takes
    ``triton`` where its kernel passed its self-check on the parameters' CUDA device, else
    ``torch_fused`` on CUDA, else ``torch`` (CPU parameters, or none)."""
    return ADAMW.select(requested, device=params_device(params), sharded=sharded)


def benchmark(numel: int = 2 ** 28, device="cuda") -> dict[str, float]:
    """Milliseconds (median, ``triton.testing.do_bench``) on one tensor of ``numel`` elements:
    fp32 main += bf16 grad (torch ``add_`` vs Triton), main = grad (``copy_`` vs Triton), and an
    AdamW step writing a bf16 model copy (torch fused + ``_foreach_copy_`` vs Triton)."""
    from triton.testing import do_bench

    for op, check in _CHECKS.items():  # time the kernels, not a silent fallback
        ok, reason = checked_triton_available(op, check, device)
        if not ok:
            raise RuntimeError(reason)

    def bench(fn):
        return do_bench(fn, return_mode="median")

    main = torch.randn(numel, device=device)
    grad = torch.randn(numel, device=device).to(torch.bfloat16)
    out = {"torch_add_ms": bench(lambda: main.add_(grad)),
           "triton_add_ms": bench(lambda: accumulate_main_grad_triton(main, grad)),
           "torch_copy_ms": bench(lambda: main.copy_(grad)),
           "triton_copy_ms": bench(lambda: accumulate_main_grad_triton(main, grad, True))}
    model = main.to(torch.bfloat16)
    main.grad = torch.randn_like(main)
    fused = torch.optim.AdamW([main], lr=1e-4, weight_decay=0.1, fused=True)
    out["torch_fused_adamw_ms"] = bench(fused.step)
    out["torch_fused_adamw_plus_copy_ms"] = bench(
        lambda: (fused.step(), torch._foreach_copy_([model], [main])))
    ours = TritonAdamW([main], lr=1e-4, weight_decay=0.1)
    ours.set_model_copies([(main, model)])
    out["triton_adamw_with_copy_ms"] = bench(ours.step)
    return out
