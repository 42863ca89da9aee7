"""Cross entropy over vocabulary-parallel logits: the torch reference, fused Triton kernels and
the ``cross_entropy`` registry that chooses between them.

Each rank holds ``logits [..., V/tp]`` (vocabulary columns ``[r V/tp, (r+1) V/tp)``); only
per-token scalars (the row max, the target logit, the sum of exponentials and, with label
smoothing, the sum of logits) cross the TP group, as in Megatron-Core.

The reference (:class:`_VocabParallelCrossEntropy`) materialises ``[tokens, V/tp]`` fp32
tensors several times (upcast, ``z - max``, ``exp``, the softmax it saves for backward): at
8192 tokens x 32k vocabulary (``benchmarks/e2e.py``) that is ~4.5 ms of an H200's time per
step and ~3 GB of transient memory. The Triton kernels:

* forward: one pass over each row of the (bf16) logits computes, in fp32 with an online
  softmax, the row max ``m``, ``sum exp(x - m)``, the target logit and (for label smoothing)
  the row sum; only these per-token scalars are exchanged over the TP group;
* backward: one pass recomputes ``p = exp(x - m - lse)`` and writes
  ``(p - (1 - s)[j == target] - s / V) * grad_loss`` in the logits' dtype.

They save the logits themselves (their dtype, usually bf16) and two floats per token, instead
of an fp32 softmax. Same function as the reference; the fp32 rounding differs (one-pass sums).

Registry ``CROSS_ENTROPY`` (request from ``cross_entropy_loss_fusion``,
``--cross-entropy-loss-fusion``): ``triton`` (CUDA, self-check passed) and ``torch``; each
backend's ``fn(logits, target, label_smoothing, group) -> loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moecore.backends import AUTO, Backend, BackendRegistry, always_available
from moecore.collectives import group_rank, group_size
from moecore.kernels import HAVE_TRITON, assert_close_rel, checked_triton_available

if HAVE_TRITON:  # optional: CPU installs and CI run the torch reference
    import triton
    import triton.language as tl

_BLOCK = 4096


# ---- torch reference -----------------------------------------------------------------------


def loss_from_partial_stats(stats: list, group, world: int, vocab: int, label_smoothing: float):
    """Per-token CE from this rank's partial sums over its vocab shard.

    ``stats``: [target_logit, sum_exp] (+ [sum of shifted logits] with label smoothing), each
    [tokens], shifted by the global row max; summed over the TP ``group`` in one all-reduce.
    Returns (loss [tokens], sum_exp [tokens], log_sum_exp [tokens], smoothing factor).
    """
    stats = torch.stack(stats)  # one all-reduce for every per-token sum
    if world > 1:
        dist.all_reduce(stats, group=group)
    target_logit, sum_exp = stats[0], stats[1]
    log_sum_exp = sum_exp.log()
    loss = log_sum_exp - target_logit
    smoothing = 0.0
    if label_smoothing > 0:
        # Megatron/NeMo: mass 1 - a on the target and a / (V - 1) on every other token
        # equals (1 - s) * nll - s * mean_i log p_i with s = a * V / (V - 1).
        smoothing = label_smoothing * vocab / (vocab - 1)
        mean_log_probs = stats[2] / vocab - log_sum_exp
        loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
    return loss, sum_exp, log_sum_exp, smoothing


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, group):
        world, rank = group_size(group), group_rank(group)
        # fp32 math at least: bf16 exp/log sums lose the loss's low bits.
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        part = z.shape[-1]
        vocab = part * world
        z_max = z.amax(dim=-1)
        if world > 1:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        z = z - z_max.unsqueeze(-1)  # fresh tensor: the caller's logits stay untouched

        start = rank * part
        outside = (target < start) | (target >= start + part)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        exp = z.exp()
        stats = [target_logit, exp.sum(dim=-1)]
        if label_smoothing > 0:
            stats.append(z.sum(dim=-1))
        loss, sum_exp, _, smoothing = loss_from_partial_stats(
            stats, group, world, vocab, label_smoothing)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        ctx.smoothing, ctx.vocab, ctx.in_dtype, ctx.used = smoothing, vocab, logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy's backward reuses its saved softmax "
                               "buffer and can run only once; recompute the loss instead of "
                               "retain_graph=True")
        ctx.used = True
        softmax, outside, local_target = ctx.saved_tensors
        # d loss / d z_j = p_j - (1 - s) [j == target] - s / V; written into the softmax buffer
        # because it is the size of the logits.
        grad = softmax
        hit = (~outside).to(grad.dtype) * (1.0 - ctx.smoothing)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        if ctx.smoothing > 0:
            grad.sub_(ctx.smoothing / ctx.vocab)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None



# ---- Triton kernels ------------------------------------------------------------------------


if HAVE_TRITON:

    @triton.jit
    def _ce_fwd_kernel(x_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, sum_ptr, stride_row, start,
                       V: tl.constexpr, NEED_SUM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride_row
        offs = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            mask = v0 + offs < V
            x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # exp(-inf - -inf) is NaN: lanes that have seen nothing yet keep acc = 0.
            scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            acc = acc * scale + tl.where(mask, tl.exp(x - m_new), 0.0)
            m = m_new
            if NEED_SUM:
                total += tl.where(mask, x, 0.0)
        row_max = tl.max(m, axis=0)
        lane = tl.where(m == float("-inf"), 0.0, tl.exp(m - row_max))
        tl.store(m_ptr + row, row_max)
        tl.store(s_ptr + row, tl.sum(acc * lane, axis=0))
        if NEED_SUM:
            tl.store(sum_ptr + row, tl.sum(total, axis=0))
        tgt = tl.load(tgt_ptr + row) - start
        inside = (tgt >= 0) & (tgt < V)
        t = tl.load(base + tl.where(inside, tgt, 0)).to(tl.float32)
        tl.store(t_ptr + row, tl.where(inside, t, 0.0))

    @triton.jit
    def _ce_bwd_kernel(x_ptr, tgt_ptr, shift_ptr, gl_ptr, out_ptr, stride_row, start,
                       on_target, off_target, V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride_row
        out = out_ptr + row * V
        shift = tl.load(shift_ptr + row)  # row max + log(sum exp): p = exp(x - shift)
        gl = tl.load(gl_ptr + row)
        tgt = tl.load(tgt_ptr + row) - start
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - shift) - off_target - tl.where(cols == tgt, on_target, 0.0)
            tl.store(out + cols, (g * gl).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    x = logits.reshape(-1, logits.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


class FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """Same contract as the reference ``_VocabParallelCrossEntropy`` (loss fp32, gradient in
    the logits' dtype); ``group`` None or of size 1 means unsplit logits."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing, group):
        world, rank = group_size(group), group_rank(group)
        x = _rows(logits)
        n, part = x.shape
        vocab = part * world
        tgt = target.reshape(-1).contiguous()
        f32 = dict(dtype=torch.float32, device=x.device)
        m, s, t = (torch.empty(n, **f32) for _ in range(3))
        total = torch.empty(n, **f32) if label_smoothing > 0 else m
        if n:
            # V constexpr: one compilation per vocabulary shard size (one per run).
            _ce_fwd_kernel[(n,)](x, tgt, m, s, t, total, x.stride(0), rank * part, V=part,
                                 NEED_SUM=label_smoothing > 0, BLOCK=_BLOCK, num_warps=8)
        outside = (tgt < rank * part) | (tgt >= (rank + 1) * part)
        if world > 1:
            row_max = m.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            s = s * torch.exp(m - row_max)
            m = row_max
        stats = [torch.where(outside, 0.0, t - m), s]
        if label_smoothing > 0:
            stats.append(total - part * m)
        loss, _, log_sum_exp, smoothing = loss_from_partial_stats(
            stats, group, world, vocab, label_smoothing)
        ctx.save_for_backward(x, tgt, m + log_sum_exp)
        ctx.smoothing, ctx.vocab, ctx.start = smoothing, vocab, rank * part
        ctx.shape = logits.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, tgt, shift = ctx.saved_tensors
        n, part = x.shape
        grad = torch.empty((n, part), dtype=x.dtype, device=x.device)
        if n:
            gl = grad_loss.reshape(-1).float().contiguous()
            _ce_bwd_kernel[(n,)](x, tgt, shift, gl, grad, x.stride(0), ctx.start,
                                 1.0 - ctx.smoothing, ctx.smoothing / ctx.vocab, V=part,
                                 BLOCK=_BLOCK, num_warps=8)
        return grad.view(ctx.shape), None, None, None


def _check(device: torch.device) -> None:
    """Loss and gradient agree with the reference on a small random case."""
    g = torch.Generator(device=device).manual_seed(0)
    with torch.enable_grad():
        for dtype, smooth, v in ((torch.bfloat16, 0.0, 5000), (torch.float32, 0.1, 257)):
            logits = (4 * torch.randn(3, 7, v, device=device, generator=g)).to(dtype)
            target = torch.randint(0, v, (3, 7), device=device, generator=g)
            gy = torch.rand(3, 7, device=device, generator=g)
            a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            ref = _VocabParallelCrossEntropy.apply(a, target, smooth, None)
            out = FusedVocabParallelCrossEntropy.apply(b, target, smooth, None)
            ref.backward(gy)
            out.backward(gy)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            for got, want, what in ((out, ref, "loss"), (b.grad, a.grad, "grad")):
                assert_close_rel(got, want, tol, f"fused cross entropy {what} ({dtype})")


def _triton_available(device=None, dtype=None, **ctx) -> tuple[bool, str]:
    return checked_triton_available("cross entropy", _check, device, dtype)


def cross_entropy_torch(logits, target, label_smoothing: float, group) -> torch.Tensor:
    """The reference: ``logits [..., V/tp]``, ``target [...]`` -> loss ``[...]`` (fp32+)."""
    return _VocabParallelCrossEntropy.apply(logits, target, label_smoothing, group)


def cross_entropy_triton(logits, target, label_smoothing: float, group) -> torch.Tensor:
    """:func:`cross_entropy_torch`'s contract through the fused kernels (fp32 loss)."""
    return FusedVocabParallelCrossEntropy.apply(logits, target, label_smoothing, group)


CROSS_ENTROPY = BackendRegistry("cross_entropy", flag="--cross-entropy-loss-fusion")
CROSS_ENTROPY.register(Backend("triton", _triton_available, cross_entropy_triton,
                               description="one Triton pass forward, one backward"))
CROSS_ENTROPY.register(Backend("torch", always_available, cross_entropy_torch,
                               description="fp32 torch ops"))


def select_cross_entropy(logits: torch.Tensor, requested: str = AUTO) -> Backend:
    """The ``cross_entropy`` backend for ``logits``; resolved once per device, dtype and
    request."""
    return CROSS_ENTROPY.resolve(requested, device=logits.device, dtype=logits.dtype)
