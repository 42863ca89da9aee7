"""Attention of one query block against one key/value block, returning the log-sum-exp, and its
backward given the *merged* output and log-sum-exp: the building block of ring attention
(context parallelism, ``--cp-comm-type p2p``).

Shapes: ``q [B, h, Sq, d]``, ``k [B, hk, Sk, d]``, ``v [B, hk, Sk, dv]`` with ``h % hk == 0``
(query head ``i`` uses kv head ``i // (h // hk)``); ``out [B, h, Sq, dv]`` in ``q``'s dtype,
``lse [B, h, Sq]`` fp32 (natural log). ``causal`` means top-left aligned with ``Sq == Sk``
(query ``i`` sees keys ``0..i``); otherwise every key is visible.

Partial results over disjoint key blocks merge exactly by their log-sum-exps
(:func:`merge_partial`): ``lse = logaddexp(lse_1, lse_2)``, ``out = out_1 exp(lse_1 - lse) +
out_2 exp(lse_2 - lse)``. The backward of one block needs only the final ``out``/``lse``:
``P = exp(q k^T s - lse)``, ``dv = P^T do``, ``dS = P (do v^T - rowsum(do * out))``,
``dq = dS k s``, ``dk = dS^T q s``.

Registry ``BLOCK_ATTENTION``: ``flash`` (PyTorch's FlashAttention-2 forward/backward ops, CUDA,
fp16/bf16, ``d == dv``), ``torch`` (the fp32 reference above, any device).
"""

from __future__ import annotations

import math

import torch

from moecore.backends import Backend, BackendRegistry, always_available


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial result ``(out_b [B, h, S, dv], lse_b [B, h, S])`` into the running one
    (``None`` at first); returns ``(out, lse)`` in fp32 (fp64 for fp64 inputs)."""
    out_b, lse_b = _acc(out_b), _acc(lse_b)
    if out is None:
        return out_b, lse_b
    new = torch.logaddexp(lse, lse_b)
    # A row that has seen no key yet has lse = -inf on both sides: keep it at zero weight.
    w_a = torch.exp(lse - new).nan_to_num(0.0).unsqueeze(-1)
    w_b = torch.exp(lse_b - new).nan_to_num(0.0).unsqueeze(-1)
    return out * w_a + out_b * w_b, new


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _fold_kv_grad(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, h, S, d]`` gradient of repeated kv heads -> ``[B, hk, S, d]`` (summed per group)."""
    B, h, S, d = g.shape
    return g if h == kv_heads else g.view(B, kv_heads, h // kv_heads, S, d).sum(2)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the reference's accumulation precision: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    s = torch.matmul(_acc(q), _acc(_expand_kv(k, q.shape[1])).transpose(-1, -2)) * scale
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    return s


def block_attention_forward_torch(q, k, v, causal: bool, scale: float | None = None):
    """Reference forward: ``(out [B, h, Sq, dv] in q's dtype, lse [B, h, Sq] fp32 (fp64 for
    fp64 inputs))``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, _acc(_expand_kv(v, q.shape[1])))
    return out.to(q.dtype), lse


def block_attention_backward_torch(dout, q, k, v, out, lse, causal: bool,
                                   scale: float | None = None):
    """Reference backward of one block given the merged ``out``/``lse`` of its query rows:
    ``(dq, dk, dv)`` in fp32 (fp64 for fp64 inputs), shaped like ``q, k, v``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    hk = k.shape[1]
    p = torch.exp(_scores(q, k, causal, scale) - _acc(lse).unsqueeze(-1))
    do = _acc(dout)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, _acc(_expand_kv(v, q.shape[1])).transpose(-1, -2))
    delta = (do * _acc(out)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, _acc(_expand_kv(k, q.shape[1])))
    dk = torch.matmul(ds.transpose(-1, -2), _acc(q))
    return dq, _fold_kv_grad(dk, hk), _fold_kv_grad(dv, hk)


def block_attention_forward_flash(q, k, v, causal: bool, scale: float | None = None):
    """FlashAttention-2 forward (``aten._scaled_dot_product_flash_attention``)."""
    h = q.shape[1]
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, False, scale=scale)
    return res[0], res[1]


def block_attention_backward_flash(dout, q, k, v, out, lse, causal: bool,
                                   scale: float | None = None):
    """FlashAttention-2 backward (``aten._scaled_dot_product_flash_attention_backward``) given
    the merged ``out``/``lse``; kv-head gradients summed per group, all fp32."""
    h, hk = q.shape[1], k.shape[1]
    Sq, Sk = q.shape[2], k.shape[2]
    # No cumulative sequence lengths (None: dense batch; a defined tensor selects the varlen
    # kernel); the philox seed/offset are unread without dropout.
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype).contiguous(), q, _expand_kv(k, h), _expand_kv(v, h),
        out.to(q.dtype).contiguous(), lse.float().contiguous(), None, None, Sq, Sk, 0.0,
        causal, zero, zero, scale=scale)
    return dq.float(), _fold_kv_grad(dk.float(), hk), _fold_kv_grad(dv.float(), hk)


def _flash_available(device=None, dtype=None, head_dims=None, **ctx) -> tuple[bool, str]:
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False, "FlashAttention-2 block attention needs a CUDA device"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"FlashAttention-2 takes fp16/bf16, not {dtype}"
    if head_dims is not None and (head_dims[0] != head_dims[1] or head_dims[0] > 256):
        return False, f"FlashAttention-2 needs equal q/v head dims <= 256, got {head_dims}"
    return True, ""


BLOCK_ATTENTION = BackendRegistry("block_attention", flag="--attention-backend")
BLOCK_ATTENTION.register(Backend(
    "flash", _flash_available, (block_attention_forward_flash, block_attention_backward_flash),
    description="PyTorch's FlashAttention-2 forward/backward ops (CUDA, fp16/bf16)"))
BLOCK_ATTENTION.register(Backend(
    "torch", always_available, (block_attention_forward_torch, block_attention_backward_torch),
    description="fp32 reference"))


def select_block_attention(q: torch.Tensor, v: torch.Tensor):
    """``(forward, backward)`` of the fastest block-attention backend for these inputs."""
    return BLOCK_ATTENTION.resolve("auto", device=q.device, dtype=q.dtype,
                                   head_dims=(q.shape[-1], v.shape[-1])).fn
