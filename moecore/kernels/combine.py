"""Top-k combine: ``out[t] = sum_j probs[t, j] * rows[slot_rows[t*k + j]]`` and its backward.

Two implementations behind the ``moe_combine`` backend registry:

- ``torch``: one gather and one batched matmul ``[T, 1, k] @ [T, k, H]`` (any device, any
  dtype); the reference.
- ``triton``: one fused pass each way on CUDA. Forward reads each routed row once and
  accumulates in fp32; backward, per token, reads ``grad_out[t]`` once and writes its k rows'
  ``grad_rows = probs * grad_out[t]`` and the dot products ``<rows, grad_out[t]>`` (the
  probability gradient) in the same pass, so neither [T*k, H] tensor is gathered twice.

Both take and return the same tensors; ``tests/gpu/test_combine_kernel.py`` checks them against
each other on random shapes.
"""

from __future__ import annotations

import torch

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import HAVE_TRITON, triton_on_cuda

if HAVE_TRITON:  # optional: CPU installs and CI run the torch reference
    import triton
    import triton.language as tl


# ---- torch reference -----------------------------------------------------------------------


def combine_forward_torch(rows: torch.Tensor, slot_rows: torch.Tensor, probs: torch.Tensor):
    """rows [N, H], slot_rows [T*k], probs [T, k] -> out [T, H] (rows' dtype)."""
    t, k = probs.shape
    gathered = rows.index_select(0, slot_rows).view(t, k, rows.shape[-1])
    return torch.bmm(probs.to(rows.dtype).unsqueeze(1), gathered).squeeze(1)


def combine_backward_torch(grad_out, rows, slot_rows, probs, need_probs_grad: bool):
    """grad_out [T, H], rows [N = T*k, H] (read only when ``need_probs_grad``), slot_rows [T*k]
    (row of token t's j-th copy), probs [T, k] -> (grad_rows [N, H], grad_probs [T, k] fp32 or
    None)."""
    t, k = probs.shape
    g = grad_out.unsqueeze(1) * probs.to(grad_out.dtype).unsqueeze(2)  # [T, k, H]
    grad_rows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device).index_copy_(
        0, slot_rows, g.reshape(t * k, g.shape[-1]))
    grad_probs = None
    if need_probs_grad:
        picked = rows.index_select(0, slot_rows).view(t, k, rows.shape[-1])
        grad_probs = torch.bmm(picked, grad_out.unsqueeze(2)).view(t, k).float()
    return grad_rows, grad_probs


# ---- triton --------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _combine_fwd_kernel(rows_ptr, slot_ptr, probs_ptr, out_ptr, H, K: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        hb = tl.program_id(1)
        offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(slot_ptr + t * K + j).to(tl.int64)
            p = tl.load(probs_ptr + t * K + j).to(tl.float32)
            x = tl.load(rows_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
            acc += p * x
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _combine_bwd_kernel(grad_out_ptr, rows_ptr, slot_ptr, probs_ptr, grad_rows_ptr,
                            part_ptr, H, NHB, K: tl.constexpr, NEED_PROBS: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        # Program (t, hb): columns hb*BLOCK_H... of token t's k rows; the partial dot products
        # go to part[t*K + j, hb] (summed over hb outside when H spans several blocks).
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        g = tl.load(grad_out_ptr + t * H + offs, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(slot_ptr + t * K + j).to(tl.int64)
            p = tl.load(probs_ptr + t * K + j).to(tl.float32)
            tl.store(grad_rows_ptr + row * H + offs, (p * g).to(grad_rows_ptr.dtype.element_ty),
                     mask=mask)
            if NEED_PROBS:
                x = tl.load(rows_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(part_ptr + (t * K + j) * NHB + hb, tl.sum(x * g, axis=0))


def combine_forward_triton(rows, slot_rows, probs):
    t, k = probs.shape
    h = rows.shape[-1]
    out = torch.empty(t, h, dtype=rows.dtype, device=rows.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(h))
    grid = (t, triton.cdiv(h, block))
    _combine_fwd_kernel[grid](rows.contiguous(), slot_rows.contiguous(),
                              probs.float().contiguous(), out, h, K=k, BLOCK_H=block)
    return out


def combine_backward_triton(grad_out, rows, slot_rows, probs, need_probs_grad: bool):
    t, k = probs.shape
    h = rows.shape[-1]
    grad_rows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    block = min(2048, triton.next_power_of_2(max(h, 1)))
    nhb = triton.cdiv(h, block)
    part = torch.empty(t * k * nhb if need_probs_grad else 1, dtype=torch.float32,
                       device=rows.device)
    if t and h:
        # rows are read only for the probabilities' gradient (else they may be a stand-in)
        _combine_bwd_kernel[(t, nhb)](grad_out.contiguous(),
                                      rows.contiguous() if need_probs_grad else grad_rows,
                                      slot_rows.contiguous(), probs.float().contiguous(),
                                      grad_rows, part, h, nhb, K=k, NEED_PROBS=need_probs_grad,
                                      BLOCK_H=block, num_warps=8 if block >= 2048 else 4)
    if not need_probs_grad:
        return grad_rows, None
    if not h:
        return grad_rows, torch.zeros(t, k, dtype=torch.float32, device=rows.device)
    return grad_rows, part.view(t, k, nhb).sum(-1) if nhb > 1 else part.view(t, k)


# ---- registry ------------------------------------------------------------------------------


COMBINE = BackendRegistry("moe_combine", flag="--moe-permute-fusion")
COMBINE.register(Backend("triton", triton_on_cuda("combine"),
                         (combine_forward_triton, combine_backward_triton),
                         description="fused gather-weight-sum and its backward"))
COMBINE.register(Backend("torch", always_available,
                         (combine_forward_torch, combine_backward_torch),
                         description="gather + batched matmul"))

