"""The static KV cache of generation and the attention over it.

Slot ``j`` of row ``b`` holds the key/value of the token at *position* ``j`` of sequence ``b``
(slot = position), so rows of different lengths share one cache without left padding: a prompt
shorter than the batch's longest is padded on the right, its padding slots are overwritten by
the tokens it generates, and a query at position ``p`` sees the slots ``j <= p`` only (and
``p - j <= window`` under a sliding window). Every tensor keeps a fixed shape from step to step,
so a decode step can be captured in a CUDA graph (:mod:`moecore.inference.graphs`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value buffers ``[B, L, kv_heads, d]`` (``d_v`` for values) and the
    positions of the tokens of the current forward.

    ``positions [B, S]`` (int64, on the cache's device) must be set before each forward
    (:meth:`set_positions`); ``kv_len`` (host int, ``<= L``) bounds the slots attention reads
    (eager steps pass the batch's current length; graphed steps the whole cache).
    Layers are keyed by their global ``layer_number``; buffers are allocated at the first
    forward, from the shapes of that layer's ``k`` and ``v``.
    """

    def __init__(self, batch_size: int, max_length: int, device: torch.device,
                 dtype: torch.dtype):
        self.batch_size, self.max_length = batch_size, max_length
        self.device, self.dtype = torch.device(device), dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self.kv_len = max_length
        self._rows = torch.arange(batch_size, device=self.device)[:, None]  # [B, 1]
        self._slots = torch.arange(max_length, device=self.device)  # [L]

    def set_positions(self, positions: torch.Tensor, kv_len: int | None = None) -> None:
        """``positions [B, S]``: each token's position (= its cache slot) in this forward."""
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"positions are for {positions.shape[0]} rows; the cache has "
                             f"{self.batch_size}")
        self.positions = positions
        self.kv_len = self.max_length if kv_len is None else min(int(kv_len), self.max_length)

    def _buffers(self, layer_number: int, k: torch.Tensor, v: torch.Tensor):
        if layer_number not in self.keys:
            shape = (self.batch_size, self.max_length)
            self.keys[layer_number] = torch.zeros(*shape, *k.shape[2:], device=self.device,
                                                  dtype=self.dtype)
            self.values[layer_number] = torch.zeros(*shape, *v.shape[2:], device=self.device,
                                                    dtype=self.dtype)
        return self.keys[layer_number], self.values[layer_number]

    def attend(self, layer_number: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None, sinks: torch.Tensor | None = None,
               softmax_scale: float | None = None) -> torch.Tensor:
        """Store ``k [S, B, kv_heads, d]``, ``v [S, B, kv_heads, d_v]`` at this forward's
        positions, then attend with ``q [S, B, heads, d]`` over the cached slots.
        Returns ``[S, B, heads * d_v]``."""
        k_cache, v_cache = self._buffers(layer_number, k, v)
        pos = self.positions  # [B, S]
        k_cache.index_put_((self._rows, pos), k.transpose(0, 1).to(self.dtype))
        v_cache.index_put_((self._rows, pos), v.transpose(0, 1).to(self.dtype))
        n = self.kv_len
        return cached_attention(q, k_cache[:, :n], v_cache[:, :n], pos, self._slots[:n],
                                window, sinks, softmax_scale)


def visible_slots(positions: torch.Tensor, slots: torch.Tensor,
                  window: int | None) -> torch.Tensor:
    """``[B, 1, S, L]`` bool, True where query ``positions [B, S]`` may read slot ``j``:
    ``j <= p`` (causal) and, with a ``window``, ``p - j <= window``."""
    offset = positions[:, None, :, None] - slots[None, None, None, :]
    visible = offset >= 0
    if window is not None:
        visible = visible & (offset <= window)
    return visible


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, window: int | None = None,
                     sinks: torch.Tensor | None = None,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """``q [S, B, heads, d]`` over ``k_cache [B, L, kv_heads, d]``, ``v_cache [B, L, kv_heads,
    d_v]``; query ``i`` of row ``b`` sits at ``positions[b, i]``. -> ``[S, B, heads * d_v]``.

    Without sinks: SDPA with a boolean mask. With sinks (gpt-oss): fp32 scores with one extra
    logit per head in the softmax denominator, as the training reference
    (:func:`moecore.kernels.attention.sink_window_attention`) does."""
    S, B, nh, d = q.shape
    rep = nh // k_cache.shape[2]
    qb = q.permute(1, 2, 0, 3)  # [B, heads, S, d]
    kb, vb = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B, kv_heads, L, d]
    visible = visible_slots(positions, slots, window)
    if sinks is None:
        out = F.scaled_dot_product_attention(qb, kb.to(q.dtype), vb.to(q.dtype),
                                             attn_mask=visible, scale=softmax_scale,
                                             enable_gqa=rep > 1)
    else:
        kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
        scores = torch.matmul(qb.float(), kb.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.float().view(1, nh, 1, 1).expand(B, nh, S, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        out = torch.matmul(probs.to(vb.dtype), vb).to(q.dtype)
    return out.permute(2, 0, 1, 3).reshape(S, B, nh * v_cache.shape[-1])
