"""Triton kernels, each beside a pure-torch reference and behind a backend registry.

Ops: ``combine`` (top-k weighted sum), ``swiglu`` (gated activation), ``router`` (score
function + top-k + normalisation), ``permute`` (dropless top-k gather into expert order).
Every registry has a ``torch`` backend (any device, the reference) and a ``triton`` one (CUDA);
``auto`` takes ``triton`` on CUDA once the kernel has passed a small self-check there.

This file holds what the kernel modules share: the Triton import, the config-flag -> request
mapping and the cached self-check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

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
