"""Core attention (scaled dot-product, causal or masked) and the ``attention`` registry of the
SDPA kernel it runs: Megatron's ``--attention-backend`` names.

``core_attention(q [S, B, heads, d], k [S, B, kv_heads, d], v [S, B, kv_heads, d_v], mask,
dropout_p, backend, softmax_scale) -> [S, B, heads * d_v]`` runs
``torch.nn.functional.scaled_dot_product_attention`` (GQA through ``enable_gqa`` on torch >= 2.5,
else explicitly repeated k/v heads). Backends: ``sdpa``
(PyTorch picks among its kernels; what ``auto`` resolves to), ``flash`` (FlashAttention-2),
``fused`` (cuDNN), ``unfused`` / ``local`` (the math reference). A pinned kernel that cannot take
an input raises ``RuntimeError`` naming ``--attention-backend`` (PyTorch decides per call, so
the probes accept every device). ``d_v`` may differ from ``d`` (multi-latent attention: 192
and 128); SDPA picks a kernel that takes it.

Sliding windows and attention sinks (gpt-oss) go through the ``sink_attention`` registry
instead: FlexAttention on CUDA under ``auto`` (no mask, no dropout), else
:func:`sink_window_attention`, the materialised fp32 reference.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moecore.backends import AUTO, Backend, BackendRegistry, always_available

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
# SDPA learned ``enable_gqa`` in torch 2.5; older versions get explicitly repeated k/v heads.
SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


# Megatron's --attention-backend names -> the SDPA kernel they pin ("auto": PyTorch's choice).
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "fused": SDPBackend.CUDNN_ATTENTION,
                 "unfused": SDPBackend.MATH, "local": SDPBackend.MATH}


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, backend: str = AUTO,
                   softmax_scale: float | None = None, window: int | None = None,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, causal unless a mask is given.

    Args:
        q: ``[S, B, heads, d]``; k: ``[S, B, kv_heads, d]``, v: ``[S, B, kv_heads, d_v]``
            with ``heads % kv_heads == 0`` (query head ``i`` uses kv head
            ``i // (heads // kv_heads)``).
        attention_mask: ``None`` for causal attention, or a bool mask broadcastable to
            ``[B, heads, S, S]`` where ``True`` means *masked out* (Megatron's convention).
        backend: ``auto`` (PyTorch's pick) or a key of :data:`SDPA_BACKENDS` (that SDPA
            kernel only; an input it cannot take raises, naming ``--attention-backend``).
        softmax_scale: multiplier of ``q k^T`` before the softmax; None: ``1 / sqrt(d)``.
        window: sliding window: query ``i`` sees keys ``i - window .. i`` only; None: all.
        sinks: ``[heads]`` logits added to each softmax denominator (attention sinks).
            With a window or sinks :func:`sink_window_attention` runs (whatever ``backend``).
    Returns:
        ``[S, B, heads * d_v]``.
    """
    if window is not None or sinks is not None:
        fn = sink_window_attention
        if backend == AUTO and attention_mask is None and dropout_p == 0.0:
            fn = SINK_ATTENTION.resolve(AUTO, device=q.device).fn
        return fn(q, k, v, attention_mask, dropout_p, softmax_scale, window, sinks)
    fn = ATTENTION.resolve(backend, device=q.device).fn
    if softmax_scale is None:  # the registry's original call, for backends without the argument
        return fn(q, k, v, attention_mask, dropout_p)
    return fn(q, k, v, attention_mask, dropout_p, scale=softmax_scale)


def _sdpa(q, k, v, attention_mask, dropout_p, scale=None):
    S, B, nh = q.shape[:3]
    rep = nh // k.shape[2]
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, heads, S, d]
    kwargs = {} if scale is None else {"scale": scale}
    if rep > 1:
        if SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            kb = kb.repeat_interleave(rep, dim=1)
            vb = vb.repeat_interleave(rep, dim=1)
    if attention_mask is None:
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=True,
                                             **kwargs)
    else:
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=~attention_mask.bool(),
                                             dropout_p=dropout_p, **kwargs)
    return out.permute(2, 0, 1, 3).reshape(S, B, nh * v.shape[-1])


def sink_window_attention(q, k, v, attention_mask=None, dropout_p: float = 0.0,
                          scale: float | None = None, window: int | None = None,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with an optional sliding window and attention sinks, materialising the
    ``[B, heads, S, S]`` scores (the reference; shapes as :func:`core_attention`).

    ``softmax([scores_i, sink_h])`` over the visible keys and one extra logit per head whose
    probability is dropped (Hugging Face's ``GptOssAttention``): the sink only enlarges the
    denominator. Scores and softmax are computed in fp32.
    """
    S, B, nh, d = q.shape
    rep = nh // k.shape[2]
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, heads, S, d]
    kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.matmul(qb.float(), kb.float().transpose(-1, -2)) * scale
    i = torch.arange(S, device=q.device)
    offset = i[:, None] - i[None, :]  # query - key
    masked = offset < 0
    if window is not None:
        masked = masked | (offset > window)
    if attention_mask is not None:
        masked = masked | attention_mask.bool()
    scores = scores.masked_fill(masked, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, nh, 1, 1).expand(B, nh, S, 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.matmul(probs.to(vb.dtype), vb)  # [B, heads, S, d_v]
    return out.permute(2, 0, 1, 3).reshape(S, B, nh * v.shape[-1])


def _flex_available(device=None, **ctx) -> tuple[bool, str]:
    if device is None or torch.device(device).type != "cuda":
        return False, "FlexAttention runs forward and backward on CUDA only"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return False, "torch.nn.attention.flex_attention is missing (torch >= 2.5)"
    return True, ""


@functools.lru_cache(maxsize=32)
def _flex_block_mask(seq_len: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window is not None:
            visible = visible & (q_idx - kv_idx <= window)
        return visible

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_sink_window_attention(q, k, v, attention_mask=None, dropout_p: float = 0.0,
                               scale: float | None = None, window: int | None = None,
                               sinks: torch.Tensor | None = None, compiled: bool = True):
    """:func:`sink_window_attention` through FlexAttention (no ``[S, S]`` scores; blocks
    outside the window are skipped). The sink enters through the log-sum-exp ``L`` of the
    visible scores: ``out_with_sink = out * sigmoid(L - sink)``. No mask argument, no dropout."""
    if attention_mask is not None or dropout_p > 0:
        raise ValueError("FlexAttention sink/window attention takes no mask and no dropout")
    S, B, nh = q.shape[:3]
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    mask = _flex_block_mask(S, window, str(q.device))
    out, lse = _compiled_flex(compiled)(qb, kb, vb, block_mask=mask, scale=scale,
                                        enable_gqa=nh != k.shape[2], return_lse=True)
    if sinks is not None:
        keep = torch.sigmoid(lse.float() - sinks.float().view(1, nh, 1))
        out = out * keep.unsqueeze(-1).to(out.dtype)
    return out.permute(2, 0, 1, 3).reshape(S, B, nh * v.shape[-1])


# Sliding-window / sink attention: FlexAttention on CUDA under --attention-backend auto (no
# mask, no dropout), else the materialised reference.
SINK_ATTENTION = BackendRegistry("sink_attention", flag="--attention-backend")
SINK_ATTENTION.register(Backend("flex", _flex_available, flex_sink_window_attention,
                                description="FlexAttention (torch.compile), CUDA"))
SINK_ATTENTION.register(Backend("torch", always_available, sink_window_attention,
                                description="materialised [B, heads, S, S] scores"))


def _pinned(name: str, q, k, v, attention_mask, dropout_p, scale=None):
    """:func:`_sdpa` under ``sdpa_kernel([SDPA_BACKENDS[name]])``; a refusal names the flag."""
    try:
        with sdpa_kernel([SDPA_BACKENDS[name]]):
            return _sdpa(q, k, v, attention_mask, dropout_p, scale)
    except RuntimeError as e:
        if not any(m in str(e) for m in ("No available kernel", "No viable backend")):
            raise
        raise RuntimeError(f"--attention-backend {name} cannot run this attention "
                           f"(q {tuple(q.shape)} {q.dtype} on {q.device}, dropout {dropout_p}, "
                           f"mask {attention_mask is not None}); use --attention-backend auto. "
                           f"PyTorch said: {str(e).strip().splitlines()[0]}") from e


ATTENTION = BackendRegistry("attention", flag="--attention-backend")
ATTENTION.register(Backend("sdpa", always_available, _sdpa,
                           description="PyTorch's pick among its SDPA kernels"))
for _name in SDPA_BACKENDS:
    ATTENTION.register(Backend(_name, always_available, functools.partial(_pinned, _name),
                               auto_ok=lambda **ctx: False,
                               description=f"SDPA pinned to {SDPA_BACKENDS[_name].name}"))
