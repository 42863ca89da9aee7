"""Attention of one query block against one key/value block, returning the log-sum-exp, and its
backward given the *merged* output and log-sum-exp: the building block of ring attention
(context parallelism, ``--cp-comm-type p2p``).

Shapes: ``q [B, h, Sq, d]``, ``k [B, hk, Sk, d]``, ``v [B, hk, Sk, dv]`` with ``h % hk == 0``
(query head ``i`` uses kv head ``i // (h // hk)``); ``out [B, h, Sq, dv]`` in ``q``'s dtype,
``lse [B, h, Sq]`` fp32 (natural log). ``causal`` means top-left aligned with ``Sq == Sk``
(query ``i`` sees keys ``0..i``); otherwise every key is visible.

Partial results over disjoint key blocks merge exactly by their log-sum-exps
(:func:`merge_partial`): ``lse = logaddexp(lse_1, lse_2)``, ``out = out_1 exp(lse_1 - lse) +
out_2 exp(lse_2 - lse)`` (on CUDA one Triton pass over the fp32 accumulator after a self-check
against :func:`merge_partial_torch`). The backward of one block needs only the final
``out``/``lse``: ``P = exp(q k^T s - lse)``, ``dv = P^T do``, ``dS = P (do v^T - rowsum(do *
out))``, ``dq = dS k s``, ``dk = dS^T q s``.

Registry ``BLOCK_ATTENTION``, in ``auto`` order: ``fused`` (cuDNN's fused attention ops, CUDA,
fp16/bf16, ``d == dv <= 128``), ``flash`` (PyTorch's FlashAttention-2 ops, ``d == dv <= 256``),
``torch`` (the fp32 reference above, any device); ``--attention-backend`` picks among them by
the same names (``unfused``/``local``: the reference). A fused backend is offered only after a
self-check against the reference on this GPU (once per device, dtype and head dim). Fused
backwards return gradients in ``q``'s dtype; the ring accumulates them in fp32.
"""

from __future__ import annotations

import functools
import math

import torch

from moecore.backends import Backend, BackendRegistry, always_available
from moecore.kernels import (
    HAVE_TRITON,
    TRITON_DTYPES,
    assert_close_rel,
    triton_kernel_ready,
)

if HAVE_TRITON:  # optional: CPU installs and CI run the torch reference
    import triton
    import triton.language as tl


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial result ``(out_b [B, h, S, dv], lse_b [B, h, S])`` into the running one
    **in place** (``out``/``lse`` may be views of a larger accumulator); at first (``None``)
    returns fp32 copies (fp64 for fp64 inputs) to accumulate into. On CUDA one Triton pass
    (:func:`merge_partial_triton`, after its self-check) where the layouts fit, else
    :func:`merge_partial_torch`."""
    if out is None:
        return to_acc(out_b, copy=True), to_acc(lse_b, copy=True)
    if _merge_fits(out, lse, out_b, lse_b) and _merge_triton_ready(out.device):
        merge_partial_triton(out, lse, out_b, lse_b)
    else:
        merge_partial_torch(out, lse, out_b, lse_b)
    return out, lse


def merge_partial_torch(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                        lse_b: torch.Tensor) -> None:
    """The reference merge, in place: ``lse = logaddexp(lse, lse_b)``, ``out = out w_a + out_b
    w_b`` with ``w = exp(lse_part - lse)`` (zero for a row that has seen no key on either
    side: lse = -inf there)."""
    new = torch.logaddexp(lse, lse_b)
    w_a = torch.exp(lse - new).nan_to_num_(0.0).unsqueeze(-1)
    w_b = torch.exp(lse_b - new).nan_to_num_(0.0).unsqueeze(-1)
    out.mul_(w_a).addcmul_(out_b, w_b)
    lse.copy_(new)


if HAVE_TRITON:

    @triton.jit
    def _merge_kernel(out_ptr, lse_ptr, ob_ptr, lb_ptr, S, H, so_b, so_h, so_s, sl_b, sl_h, sl_s,
                      sob_b, sob_h, sob_s, slb_b, slb_h, slb_s, DV: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (b*H + h, row block): a [BLOCK_S, BLOCK_D >= DV] tile of one head, the
        # log-sum-exps loaded as [BLOCK_S, 1] columns.
        bh = tl.program_id(0)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        rows = (tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S))[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        rmask = rows < S
        lse_ptrs = lse_ptr + b * sl_b + h * sl_h + rows * sl_s
        la = tl.load(lse_ptrs, mask=rmask, other=float("-inf"))
        lb = tl.load(lb_ptr + b * slb_b + h * slb_h + rows * slb_s, mask=rmask,
                     other=float("-inf")).to(tl.float32)
        m = tl.maximum(la, lb)
        empty = m == float("-inf")  # no key on either side yet: weights 0, lse stays -inf
        m = tl.where(empty, 0.0, m)
        ea, eb = tl.exp(la - m), tl.exp(lb - m)
        total = ea + eb
        w_a = tl.where(empty, 0.0, ea / total)
        w_b = tl.where(empty, 0.0, eb / total)
        mask = rmask & (cols < DV)
        o_ptrs = out_ptr + b * so_b + h * so_h + rows * so_s + cols
        ob = tl.load(ob_ptr + b * sob_b + h * sob_h + rows * sob_s + cols, mask=mask,
                     other=0.0).to(tl.float32)
        o = tl.load(o_ptrs, mask=mask, other=0.0)
        tl.store(o_ptrs, o * w_a + ob * w_b, mask=mask)
        # Every thread of the program has read the old lse (the compiler may re-load it in the
        # tile's layout instead of moving it between threads) before any thread overwrites it.
        tl.debug_barrier()
        tl.store(lse_ptrs, tl.where(empty, float("-inf"), m + tl.log(total)), mask=rmask)


MERGE_MAX_DV = 1024  # the kernel holds a whole row of the head dim in one tile


def _merge_layout_ok(out, lse, out_b, lse_b) -> bool:
    """The kernel's layout: fp32 ``out [B, h, S, dv]`` / ``lse [B, h, S]`` (any strides but a
    unit last one for ``out`` and ``out_b``), ``out_b`` fp32/bf16/fp16 and fp32 ``lse_b`` of the
    same shapes, ``dv <= MERGE_MAX_DV``."""
    return (out.dim() == 4 and out.shape[-1] <= MERGE_MAX_DV and out.dtype == torch.float32
            and lse.dtype == torch.float32
            and out_b.shape == out.shape and lse.shape == lse_b.shape == out.shape[:3]
            and out_b.dtype in TRITON_DTYPES
            and lse_b.dtype == torch.float32 and out.stride(-1) == 1 and out_b.stride(-1) == 1)


def _merge_fits(out, lse, out_b, lse_b) -> bool:
    return HAVE_TRITON and out.is_cuda and _merge_layout_ok(out, lse, out_b, lse_b)


def merge_partial_triton(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                         lse_b: torch.Tensor) -> None:
    """:func:`merge_partial_torch` in one pass: reads ``out`` (fp32) and ``out_b`` once, writes
    ``out`` and ``lse``; equal to the reference up to fp32 rounding of the weights."""
    if not _merge_layout_ok(out, lse, out_b, lse_b):
        raise ValueError("merge_partial_triton needs fp32 out [B, h, S, dv] / lse [B, h, S] and "
                         f"a partial of the same shape, unit-stride rows, dv <= {MERGE_MAX_DV}")
    B, H, S, DV = out.shape
    if not out.numel():
        return
    block_d = triton.next_power_of_2(DV)
    block_s = max(1, 4096 // block_d)
    _merge_kernel[(B * H, triton.cdiv(S, block_s))](
        out, lse, out_b, lse_b, S, H, *out.stride()[:3], *lse.stride(), *out_b.stride()[:3],
        *lse_b.stride(), DV=DV, BLOCK_S=block_s, BLOCK_D=block_d)


def _check_merge(device: torch.device) -> None:
    """The fused merge against the reference: strided views with empty rows; on CUDA also
    [2, 8, 4096, 64], enough programs at once that a kernel letting one thread read a
    log-sum-exp another had overwritten gave 10% wrong elements on an H100 (a small input,
    e.g. [1, 2, 1024, 128], did not show it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    cases = [((2, 3, 20, 24), True)] + ([((2, 8, 4096, 64), False)] if device.type == "cuda"
                                        else [])
    for (b, h, s, dv), empty in cases:
        acc = torch.randn(b, h, 2 * s, dv, device=device, generator=gen)
        acc_lse = torch.randn(b, h, 2 * s, device=device, generator=gen)
        part = torch.randn(b, h, s, dv, device=device, generator=gen).bfloat16()
        part_lse = torch.randn(b, h, s, device=device, generator=gen)
        if empty:
            acc_lse[:, :, :3] = float("-inf")  # rows that have seen no key yet
            part_lse[:, :, 1] = float("-inf")
        got, want = (acc.clone(), acc_lse.clone()), (acc.clone(), acc_lse.clone())
        merge_partial_triton(got[0][:, :, s:], got[1][:, :, s:], part, part_lse)
        merge_partial_torch(want[0][:, :, s:], want[1][:, :, s:], part, part_lse)
        assert_close_rel(got[0], want[0], 1e-5, "cp merge out")
        if not torch.equal(torch.isinf(got[1]), torch.isinf(want[1])):
            raise AssertionError("cp merge: rows without keys differ")
        finite = torch.isfinite(want[1])
        assert_close_rel(got[1][finite], want[1][finite], 1e-5, "cp merge lse")
        if not torch.equal(got[0][:, :, :s], acc[:, :, :s]):
            raise AssertionError("cp merge wrote outside its view")


def _merge_triton_ready(device: torch.device) -> bool:
    """Whether the fused merge runs on ``device`` (self-checked once; the choice logged once)."""
    return triton_kernel_ready("cp_merge", _check_merge, device)


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _fold_kv_grad(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, h, S, d]`` gradient of repeated kv heads -> ``[B, hk, S, d]`` (summed per group in
    fp32; unchanged without GQA)."""
    B, h, S, d = g.shape
    return g if h == kv_heads else to_acc(g).view(B, kv_heads, h // kv_heads, S, d).sum(2)


def to_acc(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """``t`` in the reference's accumulation precision: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32), copy=copy)


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    s = torch.matmul(to_acc(q), to_acc(_expand_kv(k, q.shape[1])).transpose(-1, -2)) * scale
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
    out = torch.matmul(p, to_acc(_expand_kv(v, q.shape[1])))
    return out.to(q.dtype), lse


def block_attention_backward_torch(dout, q, k, v, out, lse, causal: bool,
                                   scale: float | None = None):
    """Reference backward of one block given the merged ``out``/``lse`` of its query rows:
    ``(dq, dk, dv)`` in fp32 (fp64 for fp64 inputs), shaped like ``q, k, v``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    hk = k.shape[1]
    p = torch.exp(_scores(q, k, causal, scale) - to_acc(lse).unsqueeze(-1))
    do = to_acc(dout)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, to_acc(_expand_kv(v, q.shape[1])).transpose(-1, -2))
    delta = (do * to_acc(out)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, to_acc(_expand_kv(k, q.shape[1])))
    dk = torch.matmul(ds.transpose(-1, -2), to_acc(q))
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
    the merged ``out``/``lse``; gradients in ``q``'s dtype (kv heads folded in fp32 under GQA)."""
    h, hk = q.shape[1], k.shape[1]
    Sq, Sk = q.shape[2], k.shape[2]
    # No cumulative sequence lengths (None: dense batch; a defined tensor selects the varlen
    # kernel); the philox seed/offset are unread without dropout.
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype).contiguous(), q, _expand_kv(k, h), _expand_kv(v, h),
        out.to(q.dtype).contiguous(), lse.float().contiguous(), None, None, Sq, Sk, 0.0,
        causal, zero, zero, scale=scale)
    return dq, _fold_kv_grad(dk, hk), _fold_kv_grad(dv, hk)


def block_attention_forward_cudnn(q, k, v, causal: bool, scale: float | None = None):
    """cuDNN's fused attention forward (``aten._scaled_dot_product_cudnn_attention``)."""
    h = q.shape[1]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, _expand_kv(k, h), _expand_kv(v, h), None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3])  # cuDNN's stats are [B, h, Sq, 1]


def block_attention_backward_cudnn(dout, q, k, v, out, lse, causal: bool,
                                   scale: float | None = None):
    """cuDNN's fused attention backward given the merged ``out``/``lse``; gradients in ``q``'s
    dtype (kv heads folded in fp32 under GQA)."""
    h, hk = q.shape[1], k.shape[1]
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    # Strided views (a chunk of the local sequence) go in as they are: cuDNN takes strides,
    # and PyTorch matches dout's layout to out's.
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.to(q.dtype), q, _expand_kv(k, h), _expand_kv(v, h), out.to(q.dtype),
        lse.float().reshape(B, h, Sq, 1).contiguous(), zero, zero, None, None, None, Sq, Sk,
        0.0, causal, scale=scale)
    return dq, _fold_kv_grad(dk, hk), _fold_kv_grad(dv, hk)


def _fused_ok(name: str, device, dtype, head_dims, max_head_dim: int) -> tuple[bool, str]:
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False, f"{name} block attention needs a CUDA device"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"{name} takes fp16/bf16, not {dtype}"
    if head_dims is not None and (head_dims[0] != head_dims[1] or head_dims[0] > max_head_dim):
        return False, f"{name} needs equal q/v head dims <= {max_head_dim}, got {head_dims}"
    return True, ""


@functools.cache
def _self_check(name: str, device: str, dtype: torch.dtype, d: int) -> str:
    """Run backend ``name`` on a small causal and a small full block (forward and backward
    given the merged out/lse) against the fp32 reference; '' when it agrees, else why not."""
    fwd, bwd = BLOCK_ATTENTION.get(name).fn
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(2, 2, 256, d, device=device, generator=g).to(dtype)
                     for _ in range(4))
    try:  # a causal block, a full one, and a full one of strided chunk views (as the ring)
        for causal, qs, ks in ((True, slice(0, 256), slice(0, 256)),
                               (False, slice(0, 256), slice(0, 128)),
                               (False, slice(128, 256), slice(0, 256))):
            qb, kb, vb, db = q[:, :, qs], k[:, :, ks], v[:, :, ks], dout[:, :, qs]
            out, lse = fwd(qb, kb, vb, causal, None)
            ref_out, ref_lse = block_attention_forward_torch(qb, kb, vb, causal)
            ref_out = torch.cat([ref_out, ref_out], 2)[:, :, :qb.shape[2]]  # a strided view
            got = [out, lse, *bwd(db, qb, kb, vb, ref_out, ref_lse, causal)]
            ref = [ref_out, ref_lse, *block_attention_backward_torch(
                db, qb, kb, vb, ref_out, ref_lse, causal)]
            for a, b in zip(got, ref):
                err = (a.float() - b.float()).abs().max().item()
                if not err <= 5e-2 * max(1.0, b.float().abs().max().item()):
                    return f"{name} disagrees with the fp32 reference here (max error {err:.3g})"
    except RuntimeError as e:
        return f"{name} failed on this GPU: {str(e).strip().splitlines()[0]}"
    return ""


def _fused_available(name: str, max_head_dim: int):
    def probe(device=None, dtype=None, head_dims=None, **ctx) -> tuple[bool, str]:
        ok, why = _fused_ok(name, device, dtype, head_dims, max_head_dim)
        if ok and dtype is not None and head_dims is not None:
            why = _self_check(name, str(torch.device(device)), dtype, head_dims[0])
            ok = not why
        return ok, why
    return probe


BLOCK_ATTENTION = BackendRegistry("block_attention", flag="--attention-backend")
BLOCK_ATTENTION.register(Backend(
    "fused", _fused_available("fused", 128),
    (block_attention_forward_cudnn, block_attention_backward_cudnn),
    description="cuDNN's fused attention forward/backward ops (CUDA, fp16/bf16)"))
BLOCK_ATTENTION.register(Backend(
    "flash", _fused_available("flash", 256),
    (block_attention_forward_flash, block_attention_backward_flash),
    description="PyTorch's FlashAttention-2 forward/backward ops (CUDA, fp16/bf16)"))
BLOCK_ATTENTION.register(Backend(
    "torch", always_available, (block_attention_forward_torch, block_attention_backward_torch),
    description="fp32 reference"))


# --attention-backend value -> block-attention backend (the same kernels by the same names)
_FROM_ATTENTION_BACKEND = {"auto": "auto", "sdpa": "auto", "flash": "flash", "fused": "fused",
                           "unfused": "torch", "local": "torch"}


def select_block_attention(q: torch.Tensor, v: torch.Tensor, backend: str = "auto"):
    """``(forward, backward)`` of the block-attention backend for these inputs: ``backend`` is
    an ``--attention-backend`` value (``auto``: the first of the registry that runs here)."""
    return BLOCK_ATTENTION.resolve(_FROM_ATTENTION_BACKEND.get(backend, backend),
                                   device=q.device, dtype=q.dtype,
                                   head_dims=(q.shape[-1], v.shape[-1])).fn
