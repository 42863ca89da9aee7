"""RMSNorm and LayerNorm over the last dimension, with a fused-kernel backend when one exists.

Each norm runs the backend its ``backend`` request (the config's ``norm_backend``,
``--norm-backend``) resolves to in the ``rms_norm`` / ``layer_norm`` registries of
:mod:`moecore.kernels.norm` (``auto``: ``te``, ``apex``, ``triton`` (RMSNorm only), ``torch``;
CPU tensors take ``torch``).

``norm.add_and_norm(residual, out) -> (residual + out, norm(residual + out))`` is a residual add
and the norm after it; under the ``triton`` RMSNorm backend it is one fused kernel each way
(:func:`moecore.kernels.rmsnorm.add_rms_norm`), under every other backend the two ops.

Each norm owns its ``weight`` (and LayerNorm's ``bias``); a backend only computes with them, so
checkpoints and optimizers see the same parameters whichever backend runs.
"""

from __future__ import annotations

import torch
from torch import nn

from moecore.backends import AUTO
from moecore.kernels import rmsnorm
from moecore.kernels.norm import LAYER_NORM_BACKENDS, RMS_NORM_BACKENDS, select_norm


class _NormBase(nn.Module):
    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype,
                 sequence_parallel: bool, backend: str):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.backend = backend  # the registry request (``norm_backend``)
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
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                 backend: str = AUTO):
        super().__init__(hidden_size, eps, params_dtype, sequence_parallel, backend)

    def forward(self, x: torch.Tensor, fused_add: torch.Tensor | None = None):
        """``x [..., hidden] -> y``. ``fused_add`` is for :meth:`add_and_norm` only (it checked
        the ``triton`` backend): ``(x + fused_add, y of that sum)`` by the fused Triton op."""
        if fused_add is not None:
            return rmsnorm.add_rms_norm(x, fused_add, self.weight, self.eps)
        return select_norm(RMS_NORM_BACKENDS, x, self.backend).fn(self, x)

    def add_and_norm(self, residual: torch.Tensor,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, y)`` = ``(residual + out, self(residual + out))``, ``residual, out`` ``[...,
        hidden]``. When ``residual`` resolves to the ``triton`` backend and ``out`` has its shape
        and dtype: one Triton kernel each way (:func:`rmsnorm.add_rms_norm`: the same ``hidden``
        and ``y``, the summed grad of ``hidden`` rounded once instead of twice); otherwise the
        add and then this norm, as before."""
        if (out.shape == residual.shape and out.dtype == residual.dtype
                and select_norm(RMS_NORM_BACKENDS, residual, self.backend).name == "triton"):
            # through __call__, so the module's hooks (the param all-gather wait) still run
            return self(residual, fused_add=out)
        return super().add_and_norm(residual, out)


    def recompute_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if out.is_contiguous() and select_norm(RMS_NORM_BACKENDS, x, self.backend).name == "triton":
            rmsnorm.rms_norm_into(x, self.weight, self.eps, out)  # no temporary, no copy
        else:
            super().recompute_into(x, out)


class LayerNorm(_NormBase):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim."""

    def __init__(self, hidden_size: int, eps: float = 1e-5,
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                 backend: str = AUTO):
        super().__init__(hidden_size, eps, params_dtype, sequence_parallel, backend)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype))
        self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_norm(LAYER_NORM_BACKENDS, x, self.backend).fn(self, x)


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
               sequence_parallel=sp, backend=config.norm_backend)
