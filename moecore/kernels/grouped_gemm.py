"""Grouped GEMM: ``out[rows of expert e] = x[rows of expert e] @ w[e]`` for all experts at once.

``grouped_mm(x [N, K], w [E, K, M], tokens_per_expert [E]) -> [N, M]``, rows of ``x`` grouped
by expert in order (expert 0's rows first). Backends (see :data:`GROUPED_GEMM`):

- ``torch``: ``torch._grouped_mm`` (PyTorch >= 2.8; CUTLASS kernel on sm90+, bf16).
- ``grouped_gemm``: the ``grouped_gemm`` package's ``ops.gmm`` (CUDA, bf16), as Megatron-Core.
- ``bmm``: pads every expert to the largest count and runs one ``torch.bmm``; any device/dtype.
- ``loop``: one matmul per expert; the readable reference.

``auto`` picks ``torch`` on sm90+ with bf16, else ``grouped_gemm`` when installed (CUDA, bf16),
else ``bmm``. Every backend supports experts with zero rows and ``N = 0``, forward and backward.
The request is the config's ``moe_grouped_gemm_backend`` (``--moe-grouped-gemm-backend``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moecore.backends import AUTO, Backend, BackendRegistry
from moecore.kernels.swiglu import select_swiglu

GROUPED_GEMM = BackendRegistry("grouped_gemm", flag="--moe-grouped-gemm-backend")
AUTO_ORDER = ("torch", "grouped_gemm", "bmm")
GROUPED_GEMM_INSTALL = "pip install git+https://github.com/fanshiqing/grouped_gemm@v1.1.4"


def default_compute_device() -> torch.device:
    """The device modules will most likely run on: the default device if it is an accelerator,
    else the current CUDA device when there is one (models are usually built, then moved)."""
    device = torch.get_default_device()
    if device.type != "cpu":
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------------------------
# torch._grouped_mm
# --------------------------------------------------------------------------------------------
@functools.cache
def _probe_torch_grouped_mm(device: torch.device, dtype: torch.dtype) -> str:
    """Run a tiny aligned ``torch._grouped_mm``; return the error text, empty when it works."""
    try:
        x = torch.ones(4, 16, device=device, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)
        offs = torch.tensor([1, 4], device=device, dtype=torch.int32)
        torch._grouped_mm(x, w, offs=offs)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run here"
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ""


def _torch_available(device=None, dtype=None, **_) -> tuple[bool, str]:
    if not hasattr(torch, "_grouped_mm"):
        return False, (f"PyTorch {torch.__version__} has no torch._grouped_mm; "
                       "install PyTorch >= 2.8")
    device, dtype = _device(device), dtype or torch.float32
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        if dtype != torch.bfloat16:
            return False, (f"torch._grouped_mm on CUDA takes bf16 only, got {dtype}; train with "
                           "bf16=True (params_dtype=torch.bfloat16) or use backend 'bmm'")
    err = _probe_torch_grouped_mm(device, dtype)
    if err:
        return False, (f"torch._grouped_mm fails on {device} with {dtype} ({err}); needs "
                       "PyTorch >= 2.8 and, on CUDA, bf16 on a GPU of compute capability >= 8.0")
    return True, ""


def _torch_auto_ok(device=None, dtype=None, **_) -> bool:
    # Below sm90 (and on CPU) PyTorch runs a per-group fallback: correct but not a fast default.
    device = _device(device)
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] >= 9)


@functools.cache
def _empty_groups_write_zeros(device: torch.device) -> bool:
    """Whether the weight-gradient kernel writes zeros for groups with no rows by itself.

    True on Hopper (sm90; tests/gpu checks it on recycled, NaN-filled memory). Elsewhere
    (Blackwell: pytorch#172439; CPU and pre-sm90 fallbacks: unverified) we zero them ourselves,
    which costs one pass over the weight gradient.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


class _TorchGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with our own backward.

    PyTorch's built-in backward rejects the stride-0 gradients of ``y.sum()``-style losses and
    (on some GPUs, pytorch#172439) leaves garbage in the weight gradient of experts with no rows;
    here the gradient is made contiguous and, where needed, empty experts' gradients are zeroed.
    """

    @staticmethod
    def forward(ctx, x, w, offs, empty):
        ctx.save_for_backward(x, w, offs, empty)
        ctx.zero_empty = not _empty_groups_write_zeros(x.device)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs, empty = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _torch_dgrad(dy, w, offs) if ctx.needs_input_grad[0] else None
        dw = _torch_wgrad(x, dy, offs, empty, ctx.zero_empty) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def _torch_dgrad(dy, w, offs):
    """``dy [N, M]``, ``w [E, K, M]`` -> ``dx [N, K]``."""
    return torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs)


def _torch_wgrad(x, dy, offs, empty, zero_empty: bool):
    """``x [N, K]``, ``dy [N, M]`` -> ``dw [E, K, M]`` (2D x 2D with groups along the token
    dim); empty experts zeroed where the kernel leaves them unwritten."""
    dw = torch._grouped_mm(x.t(), dy, offs=offs)
    if zero_empty:
        dw.masked_fill_(empty[:, None, None], 0)
    return dw


def _offsets(tokens_per_expert, device):
    """``(offs [E] int32 cumulative row ends, empty [E] bool)`` on ``device``."""
    counts = tokens_per_expert.to(torch.int64)
    # offs[-1] == N: the kernel leaves rows past offs[-1] uninitialised, so there must be none.
    offs = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32, non_blocking=True)
    return offs, (counts == 0).to(device, non_blocking=True)


def _aligned(t: torch.Tensor, *sizes: int) -> bool:
    # The kernel needs 16-byte-aligned row strides.
    return all(size % (16 // t.element_size()) == 0 for size in sizes)


def _torch_grouped_mm(x, w, tokens_per_expert):
    # Misaligned K or M are zero-padded (zeros change no result). Real model sizes are
    # multiples of 8 already, so this costs nothing there.
    align = 16 // x.element_size()
    k, m = x.shape[1], w.shape[2]
    pad_k, pad_m = -k % align, -m % align
    if pad_k or pad_m:
        x = F.pad(x, (0, pad_k))
        w = F.pad(w, (0, pad_m, 0, pad_k))
    offs, empty = _offsets(tokens_per_expert, x.device)
    out = _TorchGroupedMM.apply(x.contiguous(), w.contiguous(), offs, empty)
    return out[:, :m] if pad_m else out


class _TorchSwiGLUGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm(swiglu(h, probs), w)`` keeping only ``h``, ``probs`` and ``w`` for
    backward.

    Backward: ``d_act = dy @ w^T``, then one SwiGLU backward pass that also rewrites the
    activation (bit-identical to the forward's), then the weight gradient from it. So
    ``--recompute-modules moe_act`` costs one extra ``[N, F]`` write, not a forward pass.
    """

    @staticmethod
    def forward(ctx, h, w, offs, empty, probs, fns):
        forward_fn, _, ctx.backward_and_forward = fns
        ctx.save_for_backward(h, w, offs, empty, probs)
        ctx.zero_empty = not _empty_groups_write_zeros(h.device)
        return torch._grouped_mm(forward_fn(h, probs=probs), w, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        h, w, offs, empty, probs = ctx.saved_tensors
        dy = dy.contiguous()
        dh, act, dprobs = ctx.backward_and_forward(h, _torch_dgrad(dy, w, offs), probs=probs)
        dw = _torch_wgrad(act, dy, offs, empty, ctx.zero_empty) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, dprobs, None


def swiglu_grouped_mm(h: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
                      backend: Backend, probs: torch.Tensor | None = None
                      ) -> torch.Tensor | None:
    """``grouped_mm(swiglu(h, probs=probs), w, tokens_per_expert)`` for ``h [N, 2F]``
    (``[gate | up]``), ``w [E, F, M]``, ``probs [N]`` (row weights, or None), without keeping
    ``swiglu(h)`` for backward (:class:`_TorchSwiGLUGroupedMM`).
    None where that path does not apply (another backend, no rows, sizes the kernel would need
    padded): the caller then runs the activation and ``grouped_mm`` itself."""
    if (backend.name != "torch" or h.dim() != 2 or h.shape[0] == 0
            or h.shape[1] != 2 * w.shape[1] or not _aligned(h, w.shape[1], w.shape[2])):
        return None
    _check_inputs(h[:, : w.shape[1]], w, tokens_per_expert)
    offs, empty = _offsets(tokens_per_expert, h.device)
    fns = select_swiglu(h.device, h.dtype).fn
    return _TorchSwiGLUGroupedMM.apply(h.contiguous(), w.contiguous(), offs, empty, probs, fns)


# --------------------------------------------------------------------------------------------
# grouped_gemm package (Megatron-Core's default)
# --------------------------------------------------------------------------------------------
@functools.cache
def _import_grouped_gemm() -> str:
    try:
        import grouped_gemm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken build is as good as missing
        return f"{type(exc).__name__}: {exc}"
    return ""


def _gg_available(device=None, dtype=None, **_) -> tuple[bool, str]:
    err = _import_grouped_gemm()
    if err:
        return False, f"the grouped_gemm package cannot be imported ({err}); {GROUPED_GEMM_INSTALL}"
    if _device(device).type != "cuda":
        return False, "the grouped_gemm package runs on CUDA only; use backend 'bmm' elsewhere"
    if dtype != torch.bfloat16:
        return False, f"the grouped_gemm package takes bf16 only, got {dtype}; set bf16=True"
    return True, ""


def _gg_grouped_mm(x, w, tokens_per_expert):
    from grouped_gemm import ops

    batch_sizes = tokens_per_expert.to("cpu", torch.int64)  # the kernel reads them on the host
    return ops.gmm(x.contiguous(), w.contiguous(), batch_sizes, trans_b=False)


# --------------------------------------------------------------------------------------------
# Portable backends
# --------------------------------------------------------------------------------------------
def _bmm_grouped_mm(x, w, tokens_per_expert):
    """Scatter rows into ``[E, max_rows, K]`` (zero padded), one ``bmm``, gather rows back."""
    num_experts, k = w.shape[0], x.shape[1]
    max_rows = int(tokens_per_expert.max())  # host sync unless the counts live on the host
    counts = tokens_per_expert.to(x.device, torch.int64)
    n = x.shape[0]
    expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts,
                                     output_size=n)
    starts = torch.cumsum(counts, 0) - counts
    row = torch.arange(n, device=x.device) - starts[expert]
    padded = x.new_zeros(num_experts, max_rows, k).index_put((expert, row), x)
    return torch.bmm(padded, w)[expert, row]


def _loop_grouped_mm(x, w, tokens_per_expert):
    outs, start = [], 0
    for e, rows in enumerate(tokens_per_expert.tolist()):
        outs.append(x[start:start + rows] @ w[e])
        start += rows
    return torch.cat(outs)


def _always_available(**_) -> tuple[bool, str]:
    return True, ""


GROUPED_GEMM.register(Backend("torch", _torch_available, _torch_grouped_mm, _torch_auto_ok,
                              "torch._grouped_mm (CUTLASS on sm90+)"))
GROUPED_GEMM.register(Backend("grouped_gemm", _gg_available, _gg_grouped_mm,
                              description="grouped_gemm package (ops.gmm)"))
GROUPED_GEMM.register(Backend("bmm", _always_available, _bmm_grouped_mm,
                              description="padded torch.bmm, any device/dtype"))
GROUPED_GEMM.register(Backend("loop", _always_available, _loop_grouped_mm,
                              description="per-expert matmul reference"))


def select_backend(requested: str = AUTO, device=None, dtype: torch.dtype | None = None,
                   log: bool = True) -> Backend:
    """Resolve a ``moe_grouped_gemm_backend`` value for ``device``/``dtype``.

    Raises ``ValueError`` for an unknown name and ``BackendUnavailableError`` (a ``ValueError``
    and ``ImportError``) when the named backend cannot run here; the message says what to install.
    """
    return GROUPED_GEMM.select(requested, auto_order=AUTO_ORDER, log=log,
                               device=_device(device), dtype=dtype or torch.float32)


def _check_inputs(x, w, tokens_per_expert) -> None:
    if x.dim() != 2 or w.dim() != 3 or tokens_per_expert.dim() != 1:
        raise ValueError(f"grouped_mm needs x [N, K], w [E, K, M], tokens_per_expert [E]; got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(tokens_per_expert.shape)}")
    if x.shape[1] != w.shape[1] or w.shape[0] != tokens_per_expert.shape[0]:
        raise ValueError(f"grouped_mm shapes disagree: x {tuple(x.shape)}, w {tuple(w.shape)}, "
                         f"tokens_per_expert {tuple(tokens_per_expert.shape)}; x's K must equal "
                         "w's dim 1 and w's dim 0 must equal the number of counts")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x is {x.dtype} but w is {w.dtype}; cast one to the other")
    if tokens_per_expert.device.type == "cpu":  # checking device counts would sync
        total = int(tokens_per_expert.sum())
        if total != x.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {total} but x has {x.shape[0]} rows")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               backend: str | Backend = AUTO) -> torch.Tensor:
    """``[N, K] x [E, K, M] -> [N, M]``, row block ``e`` (``tokens_per_expert[e]`` rows,
    int64, host or device) multiplied by ``w[e]``. Differentiable in ``x`` and ``w``."""
    _check_inputs(x, w, tokens_per_expert)
    if isinstance(backend, str):
        backend = select_backend(backend, device=x.device, dtype=x.dtype)
    if x.shape[0] == 0:
        # Kernels reject a zero-length contraction in the weight gradient; this keeps w in the
        # graph (zero gradient) so data-parallel gradient hooks still fire on this rank.
        return x @ w[0]
    return backend.fn(x, w, tokens_per_expert)


def grouped_wgrad(x: torch.Tensor, dy: torch.Tensor,
                  tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The weight gradient of :func:`grouped_mm` alone: ``x [N, K]``, ``dy [N, M]`` grouped by
    ``tokens_per_expert [E]`` -> ``dw [E, K, M]`` (``x_e^T dy_e``; zeros for an expert without
    rows). ``torch._grouped_mm`` on sm90+ in bf16, else one matmul per expert."""
    fast = hasattr(torch, "_grouped_mm") and _torch_auto_ok(device=x.device, dtype=x.dtype)
    if fast and _aligned(x, x.shape[1]) and _aligned(dy, dy.shape[1]) and x.shape[0]:
        offs, empty = _offsets(tokens_per_expert, x.device)
        return _torch_wgrad(x.contiguous(), dy.contiguous(), offs, empty,
                            not _empty_groups_write_zeros(x.device))
    counts = [int(c) for c in tokens_per_expert.tolist()]
    return torch.stack([a.t() @ b for a, b in zip(x.split(counts), dy.split(counts))])
