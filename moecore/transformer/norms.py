"""RMSNorm and LayerNorm over the last dimension, with a fused-kernel backend when one exists.

Backends, in ``auto`` preference order: ``te`` (Transformer Engine), ``apex`` (apex fused norms),
``torch`` (``torch.nn.functional.rms_norm`` / ``layer_norm``, always available). The choice is made
once per process from ``MOECORE_NORM_BACKEND`` (``auto`` by default) or :func:`set_norm_backend`,
and logged once. The fused backends only run CUDA tensors; a CPU tensor always takes the torch path
(the fused kernels have no CPU implementation), which keeps CPU tests and GPU runs on one module.

Each norm owns its ``weight`` (and LayerNorm's ``bias``); a backend only computes with them, so
checkpoints and optimizers see the same parameters whichever backend runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NORM_BACKENDS = ("auto", "te", "apex", "torch")


def _torch_rms_norm(x, weight, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()  # torch < 2.4 has no F.rms_norm: same math, fp32 statistics
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _torch_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _apex_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "apex fused norms need CUDA"
    try:
        import apex.normalization.fused_layer_norm  # noqa: F401
    except ImportError as e:
        return False, f"apex is not installed ({e})"
    return True, ""


def _apex_rms_norm(x, weight, eps):
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine(x, weight, (x.shape[-1],), eps)


def _apex_layer_norm(x, weight, bias, eps):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    return fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)


def _te_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "Transformer Engine norms need CUDA"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        return False, f"transformer_engine is not installed ({e})"
    return True, ""


def _te_module(norm: _NormBase):
    """A TE norm module computing with ``norm``'s own parameters (built once, on first use)."""
    te_mod = norm.__dict__.get("_te_module")
    if te_mod is None:
        import transformer_engine.pytorch as te

        cls = te.RMSNorm if isinstance(norm, RMSNorm) else te.LayerNorm
        te_mod = cls(norm.hidden_size, eps=norm.eps, params_dtype=norm.weight.dtype,
                     device=norm.weight.device)
        # Swap in our parameters so the optimizer and checkpoints keep seeing norm.weight/bias.
        te_mod.weight = norm.weight
        if getattr(norm, "bias", None) is not None:
            te_mod.bias = norm.bias
        norm.__dict__["_te_module"] = te_mod  # not a submodule: no duplicate parameter names
    return te_mod


def _te_rms_norm(x, weight, eps, norm=None):
    return _te_module(norm)(x)


def _te_layer_norm(x, weight, bias, eps, norm=None):
    return _te_module(norm)(x)


@dataclass(frozen=True)
class NormBackend:
    name: str
    is_available: Callable[[], tuple[bool, str]]
    rms_norm: Callable
    layer_norm: Callable
    needs_module: bool = False  # TE computes through a module object, not a pure function


_BACKENDS = {
    "te": NormBackend("te", _te_available, _te_rms_norm, _te_layer_norm, needs_module=True),
    "apex": NormBackend("apex", _apex_available, _apex_rms_norm, _apex_layer_norm),
    "torch": NormBackend("torch", lambda: (True, ""), _torch_rms_norm, _torch_layer_norm),
}
_SELECTED: NormBackend | None = None


def set_norm_backend(name: str) -> NormBackend:
    """Choose the norm backend for this process (``auto``, ``te``, ``apex`` or ``torch``).

    An explicit name that is not available raises ``ValueError`` with the reason.
    """
    global _SELECTED
    if name not in NORM_BACKENDS:
        raise ValueError(f"norm backend {name!r} is unknown; choose one of {list(NORM_BACKENDS)}")
    if name == "auto":
        reasons = []
        for cand in ("te", "apex", "torch"):
            ok, why = _BACKENDS[cand].is_available()
            if ok:
                chosen = _BACKENDS[cand]
                break
            reasons.append(f"{cand}: {why}")
        logger.info("norm backend: %s (auto; skipped %s)", chosen.name, "; ".join(reasons) or "-")
    else:
        chosen = _BACKENDS[name]
        ok, why = chosen.is_available()
        if not ok:
            raise ValueError(f"norm backend {name!r} is not available: {why}; use 'torch' or "
                             "'auto'")
        logger.info("norm backend: %s", name)
    _SELECTED = chosen
    return chosen


def get_norm_backend() -> NormBackend:
    """The selected backend, chosen (and logged) on the first call."""
    if _SELECTED is None:
        return set_norm_backend(os.environ.get("MOECORE_NORM_BACKEND", "auto"))
    return _SELECTED


class _NormBase(nn.Module):
    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype,
                 sequence_parallel: bool):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))
        # Under sequence parallel each TP rank normalises only its S/tp tokens, so the weight grad
        # is a partial sum that the trainer must all-reduce over the TP group.
        self.weight.sequence_parallel = sequence_parallel

    def _backend(self, x: torch.Tensor) -> NormBackend:
        backend = get_norm_backend()
        return backend if x.is_cuda else _BACKENDS["torch"]

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNorm(_NormBase):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim; ``x`` ``[..., hidden]``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5,
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps, params_dtype, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._backend(x)
        if b.needs_module:
            return b.rms_norm(x, self.weight, self.eps, norm=self)
        return b.rms_norm(x, self.weight, self.eps)


class LayerNorm(_NormBase):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim."""

    def __init__(self, hidden_size: int, eps: float = 1e-5,
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps, params_dtype, sequence_parallel)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype))
        self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._backend(x)
        if b.needs_module:
            return b.layer_norm(x, self.weight, self.bias, self.eps, norm=self)
        return b.layer_norm(x, self.weight, self.bias, self.eps)


def build_norm(config, hidden_size: int, sequence_parallel: bool | None = None) -> _NormBase:
    """The norm ``config.normalization`` names, over ``hidden_size`` channels.

    ``sequence_parallel`` marks the weights' grads as partial over TP (default:
    ``config.sequence_parallel``); QK-norm passes ``True`` at TP > 1 because heads are split.
    """
    sp = config.sequence_parallel if sequence_parallel is None else sequence_parallel
    cls = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}.get(config.normalization)
    if cls is None:
        raise ValueError(f"normalization={config.normalization!r} is not supported; choose "
                         "'RMSNorm' or 'LayerNorm'")
    return cls(hidden_size, eps=config.layernorm_epsilon, params_dtype=config.params_dtype,
               sequence_parallel=sp)
