"""The ``rms_norm`` and ``layer_norm`` registries: which kernel normalises ``x [..., hidden]``.

Backends, in ``auto`` preference order: ``te`` (Transformer Engine), ``apex`` (apex fused
norms), ``triton`` (RMSNorm only: :mod:`moecore.kernels.rmsnorm`, once it passed its self-check
on the device), ``torch`` (``torch.nn.functional.rms_norm`` / ``layer_norm``, always available).
The request is the config's ``norm_backend`` (``--norm-backend``); :func:`select_norm` resolves
it once per device, dtype, hidden size and request (the fused ones need CUDA tensors, so CPU
tensors resolve to ``torch`` under ``auto``). Probes see ``device`` (a ``torch.device`` or a
device-type string), ``dtype`` and ``hidden``.

Every backend's function is ``fn(norm, x) -> y``: ``norm`` is the module holding ``weight``
(and LayerNorm's ``bias``), ``eps`` and ``hidden_size``; a backend only computes with them, so
checkpoints and optimizers see the same parameters whichever backend runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecore.backends import AUTO, Backend, BackendRegistry, always_available
from moecore.kernels import rmsnorm

FLAG = "--norm-backend"


def _torch_rms_norm(norm, x):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    xf = x.float()  # torch < 2.4 has no F.rms_norm: same math, fp32 statistics
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (y * norm.weight.float()).to(x.dtype)


def _torch_layer_norm(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _cuda_ctx(device="cpu", **_) -> tuple[bool, str]:
    if torch.device(device).type != "cuda":
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
    """Run a TE norm module that computes with ``norm``'s own parameters (built on first use;
    a norm without ``bias`` is an RMSNorm)."""
    te_mod = norm.__dict__.get("_te_module")
    if te_mod is None:
        import transformer_engine.pytorch as te

        bias = getattr(norm, "bias", None)
        cls = te.RMSNorm if bias is None else te.LayerNorm
        te_mod = cls(norm.hidden_size, eps=norm.eps, params_dtype=norm.weight.dtype,
                     device=norm.weight.device)
        # Swap in our parameters so the optimizer and checkpoints keep seeing norm.weight/bias.
        te_mod.weight = norm.weight
        if bias is not None:
            te_mod.bias = bias
        norm.__dict__["_te_module"] = te_mod  # not a submodule: no duplicate parameter names
    return te_mod(x)


def _triton_available(device="cpu", **ctx) -> tuple[bool, str]:
    return rmsnorm.triton_available(device, **ctx)


def _triton_rms_norm(norm, x):
    return rmsnorm.rms_norm(x, norm.weight, norm.eps)


RMS_NORM_BACKENDS = BackendRegistry("rms_norm", flag=FLAG)
LAYER_NORM_BACKENDS = BackendRegistry("layer_norm", flag=FLAG)
for _reg, _apex_fn, _torch_fn in ((RMS_NORM_BACKENDS, _apex_rms_norm, _torch_rms_norm),
                                  (LAYER_NORM_BACKENDS, _apex_layer_norm, _torch_layer_norm)):
    _reg.register(Backend("te", _te_available, _te_norm, description="Transformer Engine"))
    _reg.register(Backend("apex", _apex_available, _apex_fn, description="apex fused norm"))
    if _reg is RMS_NORM_BACKENDS:
        _reg.register(Backend("triton", _triton_available, _triton_rms_norm,
                              description="one-pass Triton forward and backward"))
    _reg.register(Backend("torch", always_available, _torch_fn,
                          description="torch.nn.functional"))


def select_norm(registry: BackendRegistry, x: torch.Tensor, requested: str = AUTO) -> Backend:
    """The backend of ``registry`` for ``x [..., hidden]`` under ``requested`` (``auto`` or a
    backend name; ``triton`` is RMSNorm only, LayerNorm then raises ``ValueError``)."""
    return registry.resolve(requested, device=x.device, dtype=x.dtype, hidden=x.shape[-1])
