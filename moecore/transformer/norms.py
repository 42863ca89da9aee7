"""RMSNorm and LayerNorm over the last dimension, with a fused-kernel backend when one exists.

Backends (registries ``RMS_NORM_BACKENDS`` / ``LAYER_NORM_BACKENDS`` in :mod:`moecore.backends`),
in ``auto`` preference order: ``te`` (Transformer Engine), ``apex`` (apex fused norms), ``triton``
(RMSNorm only: :mod:`moecore.kernels.rmsnorm`, used once it passed its self-check on the device),
``torch`` (``torch.nn.functional.rms_norm`` / ``layer_norm``, always available). The name comes
from :func:`set_norm_backend` or ``MOECORE_NORM_BACKEND`` (``auto`` by default); the backend is
resolved once per process, device, dtype and hidden size (the fused ones need CUDA tensors, so
CPU tensors resolve to ``torch`` under ``auto``) and logged once. Probes see ``device`` (the
device type, a str), ``device_obj`` (the ``torch.device``), ``dtype`` and ``hidden``.

``norm.add_and_norm(residual, out) -> (residual + out, norm(residual + out))`` is a residual add
and the norm after it; under the ``triton`` RMSNorm backend it is one fused kernel each way
(:func:`moecore.kernels.rmsnorm.add_rms_norm`), under every other backend the two ops.

Each norm owns its ``weight`` (and LayerNorm's ``bias``); a backend only computes with them, so
checkpoints and optimizers see the same parameters whichever backend runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecore.backends import AUTO, Backend, BackendRegistry, ProcessChoice, always_available
from moecore.kernels import rmsnorm

NORM_BACKENDS = (AUTO, "te", "apex", "triton", "torch")


def _torch_rms_norm(norm, x):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    xf = x.float()  # torch < 2.4 has no F.rms_norm: same math, fp32 statistics
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (y * norm.weight.float()).to(x.dtype)


def _torch_layer_norm(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _cuda_ctx(device: str = "cpu", **_) -> tuple[bool, str]:
    if device != "cuda":
        return False, f"the fused kernels run CUDA tensors only (this tensor is on {device})"
    return True, ""


def _apex_available(**ctx) -> tuple[bool, str]:
    ok, why = _cuda_ctx(**ctx)
    if not ok:
        return ok, why
    try:
        import apex.normalization.fused_layer_norm  # noqa: F401
    except ImportError as e:
        return False, f"apex is not installed ({e}); build NVIDIA apex with --cuda_ext"
    return True, ""


def _apex_rms_norm(norm, x):
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine(x, norm.weight, (x.shape[-1],), norm.eps)


def _apex_layer_norm(norm, x):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    return fused_layer_norm_affine(x, norm.weight, norm.bias, (x.shape[-1],), norm.eps)


def _te_available(**ctx) -> tuple[bool, str]:
    ok, why = _cuda_ctx(**ctx)
    if not ok:
        return ok, why
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        return False, f"transformer_engine is not installed ({e}); pip install transformer-engine"
    return True, ""


def _te_norm(norm, x):
    """Run a TE norm module that computes with ``norm``'s own parameters (built on first use)."""
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
    return te_mod(x)


def _triton_available(device: str = "cpu", device_obj=None, **ctx) -> tuple[bool, str]:
    return rmsnorm.triton_available(device if device_obj is None else device_obj, **ctx)


def _triton_rms_norm(norm, x):
    return rmsnorm.rms_norm(x, norm.weight, norm.eps)


RMS_NORM_BACKENDS = BackendRegistry("rms_norm")
LAYER_NORM_BACKENDS = BackendRegistry("layer_norm")
for _reg, _apex_fn, _torch_fn in ((RMS_NORM_BACKENDS, _apex_rms_norm, _torch_rms_norm),
                                  (LAYER_NORM_BACKENDS, _apex_layer_norm, _torch_layer_norm)):
    _reg.register(Backend("te", _te_available, _te_norm, description="Transformer Engine"))
    _reg.register(Backend("apex", _apex_available, _apex_fn, description="apex fused norm"))
    if _reg is RMS_NORM_BACKENDS:
        _reg.register(Backend("triton", _triton_available, _triton_rms_norm,
                              description="one-pass Triton forward and backward"))
    _reg.register(Backend("torch", always_available, _torch_fn,
                          description="torch.nn.functional"))

_CHOICE = ProcessChoice("norm", "MOECORE_NORM_BACKEND", NORM_BACKENDS)
_RESOLVED = _CHOICE.resolved  # (op, device, dtype, hidden, request) -> Backend


def set_norm_backend(name: str) -> None:
    """Choose the norm backend for this process: ``auto``, ``te``, ``apex``, ``triton`` (RMSNorm
    only: LayerNorm then raises ``ValueError``) or ``torch``.

    A named backend that cannot run a tensor raises ``BackendUnavailableError`` (a
    ``ValueError``) with the reason at that tensor's first norm.
    """
    _CHOICE.set(name)


def _resolve(registry: BackendRegistry, x: torch.Tensor) -> Backend:
    return _CHOICE.resolve(
        (registry.op, x.device, x.dtype, x.shape[-1]),
        lambda name: registry.select(name, device=x.device.type, device_obj=x.device,
                                     dtype=x.dtype, hidden=x.shape[-1]))


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

    def add_and_norm(self, residual: torch.Tensor,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, y)`` = ``(residual + out, self(residual + out))`` for ``[..., hidden]``
        inputs: the residual add and this norm (RMSNorm fuses them where it can)."""
        hidden = residual + out
        return hidden, self(hidden)

    def recompute_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``self(x)``'s values into ``out`` without autograd or module hooks (the
        recompute of a freed norm output): the same kernel, so the same values."""
        out.copy_(self.forward(x))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNorm(_NormBase):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim; ``x`` ``[..., hidden]``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5,
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps, params_dtype, sequence_parallel)

    def forward(self, x: torch.Tensor, fused_add: torch.Tensor | None = None):
        """``x [..., hidden] -> y``. ``fused_add`` is for :meth:`add_and_norm` only (it checked
        the ``triton`` backend): ``(x + fused_add, y of that sum)`` by the fused Triton op."""
        if fused_add is not None:
            return rmsnorm.add_rms_norm(x, fused_add, self.weight, self.eps)
        return _resolve(RMS_NORM_BACKENDS, x).fn(self, x)

    def add_and_norm(self, residual: torch.Tensor,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, y)`` = ``(residual + out, self(residual + out))``, ``residual, out`` ``[...,
        hidden]``. When ``residual`` resolves to the ``triton`` backend and ``out`` has its shape
        and dtype: one Triton kernel each way (:func:`rmsnorm.add_rms_norm`: the same ``hidden``
        and ``y``, the summed grad of ``hidden`` rounded once instead of twice); otherwise the
        add and then this norm, as before."""
        if (out.shape == residual.shape and out.dtype == residual.dtype
                and _resolve(RMS_NORM_BACKENDS, residual).name == "triton"):
            # through __call__, so the module's hooks (the param all-gather wait) still run
            return self(residual, fused_add=out)
        return super().add_and_norm(residual, out)


    def recompute_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if out.is_contiguous() and _resolve(RMS_NORM_BACKENDS, x).name == "triton":
            rmsnorm.rms_norm_into(x, self.weight, self.eps, out)  # no temporary, no copy
        else:
            super().recompute_into(x, out)


class LayerNorm(_NormBase):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim."""

    def __init__(self, hidden_size: int, eps: float = 1e-5,
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps, params_dtype, sequence_parallel)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype))
        self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resolve(LAYER_NORM_BACKENDS, x).fn(self, x)


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
