"""Every accelerated op: one module per op with its kernel(s), the torch reference and the
backend registry (:class:`moecore.backends.BackendRegistry`) that chooses between them.

Ops, as ``module`` (REGISTRY): what it computes; the config field / flag that requests it:

- ``grouped_gemm`` (GROUPED_GEMM): per-expert GEMMs; ``moe_grouped_gemm_backend``
  / ``--moe-grouped-gemm-backend``.
- ``permute`` (PERMUTE): dropless top-k gather into expert order; ``moe_permute_fusion`` /
  ``--moe-permute-fusion``.
- ``combine`` (COMBINE): top-k weighted sum back to token order; ``moe_permute_fusion`` /
  ``--moe-permute-fusion`` (as Megatron's, it covers the unpermute).
- ``swiglu`` (SWIGLU): the gated activation of the experts; ``bias_swiglu_fusion`` /
  ``--no-bias-swiglu-fusion``.
- ``router`` (ROUTER): score function, top-k, normalisation, counts; ``moe_router_fusion`` /
  ``--moe-router-fusion``.
- ``router_gating`` (GATING): the router's logits GEMM; ``moe_router_fusion``.
- ``norm`` (RMS_NORM_BACKENDS, LAYER_NORM_BACKENDS): RMSNorm and LayerNorm, with the Triton
  RMSNorm of ``rmsnorm``; ``norm_backend`` / ``--norm-backend``.
- ``rope`` (ROPE): rotary position embedding; ``apply_rope_fusion`` / ``--no-rope-fusion``.
- ``cross_entropy`` (CROSS_ENTROPY): vocab-parallel cross entropy;
  ``cross_entropy_loss_fusion`` / ``--cross-entropy-loss-fusion``.
- ``embedding`` (EMBEDDING): embedding lookup with a deterministic backward;
  ``embedding_backend`` / ``--embedding-backend``.
- ``optim`` (ADAMW): the AdamW step (``--adamw-backend``, an optimizer setting) and the fp32
  main-grad accumulation.
- ``peer_copy`` (PEER_COPY): the ipc dispatcher's copies to and from peers;
  ``moe_peer_copy_backend`` / ``--moe-peer-copy-backend``.
- ``attention`` (ATTENTION): the SDPA kernel of core attention; ``attention_backend`` /
  ``--attention-backend``.

A fusion flag maps to a request by :func:`fusion_request` (unset: ``auto``, on: ``triton``
required, off: ``torch``). ``auto`` takes ``triton`` on CUDA once the kernel has passed a small
self-check there; CPU runs take the torch references. The kernels import nothing from the
layers above them (``moe``, ``transformer``, ``tensor_parallel``).

This file holds what the kernel modules share: the Triton import, the fusion-flag -> request
mapping, the cached self-check, and :func:`triton_kernel_ready` for a kernel that is not a
registry backend of its own (it logs its choice once, as a registry does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moecore.backends import log_choice

try:  # Triton is optional: CPU installs and CI run the torch paths.
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fusion_request(flag: bool | None) -> str:
    """A config fusion flag as a registry request: ``None`` (default) -> ``"auto"`` (fused on
    CUDA when it passes its self-check), ``True`` -> ``"triton"`` (required: raises where it
    cannot run), ``False`` -> ``"torch"`` (the reference)."""
    if flag is None:
        return "auto"
    return "triton" if flag else "torch"


def cuda_triton_available(op: str, device=None, dtype=None) -> tuple[bool, str]:
    """``(ok, reason)``: Triton installed, ``device`` a CUDA device, ``dtype`` (if given) one the
    kernels take."""
    if device is None or torch.device(device).type != "cuda":
        return False, f"the Triton {op} kernels run on CUDA tensors only"
    if not HAVE_TRITON:
        return False, "Triton is not installed (pip install triton)"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return False, f"the Triton {op} kernels take {TRITON_DTYPES}, not {dtype}"
    return True, ""


def triton_on_cuda(op: str) -> Callable[..., tuple[bool, str]]:
    """``is_available`` of a Triton backend that needs only Triton and a CUDA ``device``."""
    return lambda device=None, **ctx: cuda_triton_available(op, device)


@functools.cache
def self_check(op: str, device: torch.device, check: Callable[[torch.device], None]) -> str:
    """Run ``check(device)`` once per process (it compares a kernel with its torch reference on
    a small random input and raises on a mismatch); return ``""`` or the failure text."""
    try:
        check(device)
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this kernel"
        text = str(exc).strip().splitlines()
        return f"self-check of the Triton {op} kernel failed: {text[0] if text else repr(exc)}"
    return ""


def checked_triton_available(op: str, check: Callable[[torch.device], None], device=None,
                             dtype=None) -> tuple[bool, str]:
    """``(ok, reason)`` of a Triton backend: :func:`cuda_triton_available`, then the
    once-per-process :func:`self_check` of ``check`` on ``device``."""
    ok, reason = cuda_triton_available(op, device, dtype)
    if not ok:
        return ok, reason
    failure = self_check(op, torch.device(device), check)
    return not failure, failure


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Raise ``AssertionError`` unless ``||got - ref|| / ||ref|| <= tol`` (and no NaN)."""
    got, ref = got.double(), ref.double()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol}")


@functools.cache
def triton_kernel_ready(op: str, check: Callable[[torch.device], None], device: torch.device,
                        log: bool = True) -> bool:
    """Whether ``op``'s Triton kernel runs on ``device`` (Triton, CUDA, ``check`` passed once);
    the choice (``triton``, or ``torch`` with the reason) is logged once per CUDA device unless
    ``log`` is off (a registry that logs the op itself)."""
    ok, reason = checked_triton_available(op, check, device)
    if log and torch.device(device).type != "cpu":
        log_choice(op, "triton" if ok else "torch", "auto",
                   {"device": device} if ok else {"device": device, "why": reason})
    return ok
