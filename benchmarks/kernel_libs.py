"""moecore's Triton kernels against Liger-Kernel's and ``torch.compile`` of the torch reference:
RMSNorm, RoPE, SwiGLU and cross-entropy, forward + backward, at the e2e model's shapes, in one run.

    python benchmarks/kernel_libs.py                          # CUDA: every op, e2e + larger shapes
    python benchmarks/kernel_libs.py --ops rmsnorm,rope --repeats 50 --json kernel_libs.json
    TRITON_INTERPRET=1 python benchmarks/kernel_libs.py --smoke --device cpu --no-compile

Implementations per case (rows): ``moecore triton`` (our kernel), ``liger`` (Liger-Kernel, imported
only here; its rows are skipped with the reason when it is not installed), ``torch.compile`` of
moecore's torch reference forward (default mode, ``dynamic=False``; AOTAutograd derives the
backward; compilation excluded from the timings), ``eager ref`` (moecore's torch reference as the
``torch`` backend runs it: the baseline of "vs eager"), and where one exists a ``torch`` native op.
Each case pairs like with like: where our kernel fuses more (residual add + RMSNorm, QKV split +
RoPE, per-token vocab-parallel CE), every side runs that same fused computation.

Before timing, every implementation's outputs and input gradients are compared with the eager
reference run in fp32 on the same values (``||got - ref|| / ||ref||``, the largest over outputs and
gradients is the table's "max rel err"; above ``--tol`` the row is marked FAIL). Timing: CUDA
events around one forward + backward (``torch.autograd.grad``), after a device sync; ``--warmup``
untimed calls, then the median of ``--repeats``; inputs are reused (Liger writes some gradients
into its inputs: its rows time that, on values that stay finite).

Shapes (e2e.py's model: hidden 1024, 16 heads x 64, seq 2048, micro-batch 16 -> 32768 tokens,
expert FFN 2816 with top-2 -> SwiGLU on [65536, 5632], vocab 32000, bf16) and one larger case per
op (hidden 4096; 32 query heads of 128 in 8 groups; FFN 14336; vocab 128256).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms  # noqa: E402

# ---- adapter: moecore's kernels and torch references (the one place to change imports) --------
from moecore.kernels import cross_entropy as _ce_kernel  # noqa: E402
from moecore.kernels import rmsnorm as _rmsnorm  # noqa: E402
from moecore.kernels import rope as _rope_kernel  # noqa: E402
from moecore.kernels import swiglu as _swiglu  # noqa: E402
from moecore.kernels.cross_entropy import _VocabParallelCrossEntropy  # noqa: E402
from moecore.kernels.rope import (  # noqa: E402
    _rotate_half,
    apply_rotary_pos_emb_torch,
    rope_cos_sin,
)
from moecore.transformer.rope import RotaryEmbedding  # noqa: E402

EPS = 1e-5


def moe_rms_norm(x, w):
    return _rmsnorm.rms_norm(x, w, EPS)


def ref_rms_norm(x, w):
    return _rmsnorm.rms_norm_torch(x, w, EPS)


def math_rms_norm(x, w):  # plain torch ops (autograd backward): what torch.compile gets
    return _rmsnorm.rms_norm_forward_torch(x, w, EPS)[0]


def moe_add_rms_norm(r, o, w):
    return _rmsnorm.add_rms_norm(r, o, w, EPS)


def ref_add_rms_norm(r, o, w):
    return _rmsnorm.add_rms_norm_torch(r, o, w, EPS)


def math_add_rms_norm(r, o, w):
    return _rmsnorm.add_rms_norm_forward_torch(r, o, w, EPS)[:2]


moe_rope = _rope_kernel.fused_rope  # (t [S, B, H, D], cos, sin [S, 1, 1, D]) -> rotated t
moe_qkv_rope = _rope_kernel.fused_qkv_rope  # (mixed [S, B, G, (J+2) D], cos, sin, J, D) -> q, k, v
ref_rope = apply_rotary_pos_emb_torch  # (t, freqs [S, 1, 1, D])


def math_rope(t, cos, sin):
    """apply_rotary_pos_emb_torch's math (every channel rotated) on precomputed cos/sin."""
    x = t.float()
    return (x * cos + _rotate_half(x) * sin).to(t.dtype)


def moe_swiglu(x):  # the Triton backend through the op's autograd function (no device probe)
    fns = (_swiglu.swiglu_forward_triton, _swiglu.swiglu_backward_triton)
    return _swiglu._SwiGLU.apply(x, None, fns)


def ref_swiglu(x):
    fns = (_swiglu.swiglu_forward_torch, _swiglu.swiglu_backward_torch)
    return _swiglu._SwiGLU.apply(x, None, fns)


math_swiglu = _swiglu.swiglu_forward_torch


def moe_cross_entropy(logits, target):  # per-token loss [S, B] fp32, unsplit vocabulary
    return _ce_kernel.FusedVocabParallelCrossEntropy.apply(logits, target, 0.0, None)


def ref_cross_entropy(logits, target):
    return _VocabParallelCrossEntropy.apply(logits, target, 0.0, None)


def math_cross_entropy(logits, target):
    """The reference's forward math in plain ops (fp32, max-shifted log-sum-exp)."""
    z = logits.float()
    z = z - z.amax(-1, keepdim=True).detach()
    return z.exp().sum(-1).log() - z.gather(-1, target.unsqueeze(-1)).squeeze(-1)


# ---- Liger-Kernel (optional) -------------------------------------------------------------------


def load_liger():
    """``(liger namespace, version, "")`` or ``(None, None, reason)``."""
    try:
        import importlib.metadata

        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction, LigerSiLUMulFunction
        from liger_kernel.ops.vocab_parallel_cross_entropy import LigerVocabParallelCEFunction
    except Exception as exc:  # noqa: BLE001 - any import failure means "no Liger rows"
        return None, None, f"{type(exc).__name__}: {exc} (pip install liger-kernel)"
    ns = dict(rms=LigerRMSNormFunction, add_rms=LigerFusedAddRMSNormFunction,
              rope=LigerRopeFunction, gate_up=LigerFusedGateUpSiLUMulFunction,
              silu_mul=LigerSiLUMulFunction, ce=LigerCrossEntropyFunction,
              vp_ce=LigerVocabParallelCEFunction)
    return ns, importlib.metadata.version("liger-kernel"), ""


def interpreter_compat() -> None:
    """CPU smoke runs only (``TRITON_INTERPRET=1``, Triton 3.6): let Liger's kernels run under the
    interpreter as they do compiled. Python float kernel args become fp32 scalars (compiled
    Triton's; Liger calls ``eps.to(...)``), runtime loop bounds convert under numpy >= 2.4, and
    libdevice ``rsqrt`` (not interpreted) is ``tl.rsqrt``. Not used on CUDA. The interpreter still
    multiplies bf16 by bf16 wrongly (Liger's SwiGLU and fused add do): CPU smoke runs are fp32."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    cvt, patch = ti._implicit_cvt, ti._patch_lang_tensor

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(ti.TensorHandle(np.array([arg], np.float32), tl.float32), tl.float32)
        return cvt(arg)

    def patch_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._implicit_cvt, ti._patch_lang_tensor = implicit_cvt, patch_tensor
    for name in ("rms_norm", "fused_add_rms_norm"):
        module = sys.modules.get(f"liger_kernel.ops.{name}")
        if module is not None:
            module.rsqrt = lambda x: tl.rsqrt(x)  # looked up when run: the interpreted one


def liger_rope_qk(lg, q, k, cos_sbd, sin_sbd):
    """Rotate ``q [S, B, Hq, D]``, ``k [S, B, Hk, D]`` with LigerRopeFunction, which takes HF's
    ``[bsz, heads, seq, D]`` over ``[bsz, seq, heads, D]`` storage: our S is its bsz and our B its
    seq, so ``cos/sin`` are ``[S, B, D]`` (its per-batch layout). It rotates in place when that
    storage is contiguous."""
    q2, k2 = lg["rope"].apply(q.transpose(1, 2), k.transpose(1, 2), cos_sbd, sin_sbd)
    return q2.transpose(1, 2), k2.transpose(1, 2)


def split_qkv(mixed, j, d):
    """moecore's split_qkv: ``[S, B, G, (J+2) D]`` -> q ``[S, B, G*J, D]``, k, v ``[S, B, G,
    D]``."""
    s, b, g = mixed.shape[:3]
    q, k, v = torch.split(mixed, [j * d, d, d], dim=3)
    return q.reshape(s, b, g * j, d), k, v


# ---- cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One computation at one shape: every impl maps ``args`` to the same outputs (``names``: the
    outputs, then the grads of ``args[grad_idx]``)."""

    op: str
    includes: str
    shape: str
    args: tuple
    grad_idx: tuple  # indices of args that get gradients
    grad_outputs: tuple
    names: tuple  # outputs then grads, for the check printout
    impls: dict = field(default_factory=dict)  # name -> (fn(*args) -> tuple, note)
    baseline: str = "eager ref"


def _randn(shape, dtype, device, gen, scale=1.0):
    return (scale * torch.randn(shape, device=device, generator=gen)).to(dtype)


def rmsnorm_cases(shape, dtype, device, gen, lg, compile_fn):
    out = []
    t, h = shape
    x, o = (_randn((t, h), dtype, device, gen) for _ in range(2))
    w = _randn((h,), dtype, device, gen, 0.1) + 1
    dy, dh = (_randn((t, h), dtype, device, gen) for _ in range(2))
    c = Case("rmsnorm", "y = rmsnorm(x) * w; grads x, w", f"{t}x{h}", (x, w), (0, 1), (dy,),
             ("y", "dx", "dw"))
    c.impls["moecore triton"] = (lambda x, w: (moe_rms_norm(x, w),), "")
    if lg:
        c.impls["liger"] = (lambda x, w: (lg["rms"].apply(x, w, EPS, 0.0, "gemma", True),),
                            "LigerRMSNormFunction, casting_mode='gemma' (fp32 math, as ours), "
                            "in_place=True (dX written into dY)")
    if compile_fn:
        c.impls["torch.compile(ref)"] = (_compiled(compile_fn, math_rms_norm), "")
    c.impls["eager ref"] = (lambda x, w: (ref_rms_norm(x, w),), "")
    c.impls["torch F.rms_norm"] = (lambda x, w: (F.rms_norm(x, (h,), w, EPS),), "")
    out.append(c)
    c = Case("rmsnorm", "h = r + o, y = rmsnorm(h) * w; grads r, o, w", f"{t}x{h}",
             (x, o, w), (0, 1, 2), (dh, dy), ("h", "y", "dr", "do", "dw"))
    c.impls["moecore triton"] = (moe_add_rms_norm, "add_rms_norm: one kernel each way")
    if lg:
        c.impls["liger"] = (
            lambda r, o, w: lg["add_rms"].apply(o, r, w, EPS, 0.0, "gemma", True)[::-1],
            "LigerFusedAddRMSNormFunction(X=o, R=r), casting_mode='gemma', in_place=True")
    if compile_fn:
        c.impls["torch.compile(ref)"] = (_compiled(compile_fn, math_add_rms_norm), "")
    c.impls["eager ref"] = (ref_add_rms_norm, "")
    c.impls["torch add + F.rms_norm"] = (
        lambda r, o, w: (r + o, F.rms_norm(r + o, (h,), w, EPS)), "")
    out.append(c)
    return out


def rope_cases(shape, dtype, device, gen, lg, compile_fn):
    out = []
    s, b, g, j, d = shape
    freqs = RotaryEmbedding(d).to(device)(s)  # [S, 1, 1, D] fp32
    cos, sin = rope_cos_sin(freqs)
    cos_sbd, sin_sbd = (t.reshape(s, 1, d).expand(s, b, d).contiguous() for t in (cos, sin))
    q = _randn((s, b, g * j, d), dtype, device, gen)
    k = _randn((s, b, g, d), dtype, device, gen)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    shape = f"S{s} B{b} H{g * j}/{g} D{d}"
    c = Case("rope", "rotate q [S,B,Hq,D] and k [S,B,Hk,D]; grads q, k", shape,
             (q, k, cos, sin, freqs, cos_sbd, sin_sbd), (0, 1), (dq, dk),
             ("q", "k", "dq", "dk"))
    c.impls["moecore triton"] = (
        lambda q, k, cos, sin, *_: (moe_rope(q, cos, sin), moe_rope(k, cos, sin)),
        "fused_rope on q, then on k")
    if lg:
        c.impls["liger"] = (
            lambda q, k, cos, sin, freqs, cs, sn: liger_rope_qk(lg, q, k, cs, sn),
            "LigerRopeFunction (q and k in one launch, in place); cos/sin expanded to "
            "[S, B, D] once, outside timing")
    if compile_fn:
        c.impls["torch.compile(ref)"] = (_compiled(
            compile_fn, lambda q, k, cos, sin: (math_rope(q, cos, sin), math_rope(k, cos, sin)),
            n_args=4), "")
    c.impls["eager ref"] = (
        lambda q, k, cos, sin, freqs, *_: (ref_rope(q, freqs), ref_rope(k, freqs)), "")
    out.append(c)

    mixed = _randn((s, b, g, (j + 2) * d), dtype, device, gen)
    dv = torch.randn_like(k)
    c = Case("rope", "split fused QKV [S,B,G,(J+2)D], rotate q, k; grad QKV", shape,
             (mixed, cos, sin, freqs, cos_sbd, sin_sbd), (0,), (dq, dk, dv),
             ("q", "k", "v", "dqkv"))
    c.impls["moecore triton"] = (
        lambda m, cos, sin, *_: moe_qkv_rope(m, cos, sin, j, d),
        "fused_qkv_rope: backward writes the QKV grad in place (no cat)")
    if lg:
        def liger_qkv(m, cos, sin, freqs, cs, sn):
            q, k, v = split_qkv(m, j, d)
            return (*liger_rope_qk(lg, q, k, cs, sn), v)

        c.impls["liger"] = (liger_qkv, "torch.split + LigerRopeFunction (copies q, k "
                            "contiguous; autograd cats the QKV grad)")
    if compile_fn:
        def math_qkv(m, cos, sin):
            q, k, v = split_qkv(m, j, d)
            return math_rope(q, cos, sin), math_rope(k, cos, sin), v

        c.impls["torch.compile(ref)"] = (_compiled(compile_fn, math_qkv, n_args=3), "")

    def ref_qkv(m, cos, sin, freqs, *_):
        q, k, v = split_qkv(m, j, d)
        return ref_rope(q, freqs), ref_rope(k, freqs), v

    c.impls["eager ref"] = (ref_qkv, "")
    out.append(c)
    return out


def swiglu_cases(shape, dtype, device, gen, lg, compile_fn):
    out = []
    n, f = shape
    x = _randn((n, 2 * f), dtype, device, gen)
    dy = _randn((n, f), dtype, device, gen)
    c = Case("swiglu", "silu(x[:, :F]) * x[:, F:] on x [N, 2F]; grad x", f"{n}x2x{f}", (x,),
             (0,), (dy,), ("y", "dx"))
    c.impls["moecore triton"] = (lambda x: (moe_swiglu(x),), "")
    if lg:
        c.impls["liger"] = (lambda x: (lg["gate_up"].apply(x, False),),
                            "LigerFusedGateUpSiLUMulFunction on [N, 2F] (in_place=False)")
        c.impls["liger silu_mul"] = (
            lambda x: (lg["silu_mul"].apply(*torch.chunk(x, 2, -1)),),
            "LigerSiLUMulFunction(gate, up) on chunks of x (it copies them contiguous)")
    if compile_fn:
        c.impls["torch.compile(ref)"] = (_compiled(compile_fn, math_swiglu), "")
    c.impls["eager ref"] = (lambda x: (ref_swiglu(x),), "")
    out.append(c)
    return out


def cross_entropy_cases(shape, dtype, device, gen, lg, compile_fn):
    out = []
    s, b, v = shape
    logits = _randn((s, b, v), dtype, device, gen, 2.0)
    target = torch.randint(0, v, (s, b), device=device, generator=gen)
    g = torch.rand(s, b, device=device, generator=gen)
    c = Case("cross_entropy", "per-token loss [S,B] fp32 (vocab-parallel, TP=1); grad logits",
             f"{s * b}x{v}", (logits, target), (0,), (g,), ("loss", "dlogits"))
    c.impls["moecore triton"] = (lambda x, t: (moe_cross_entropy(x, t),), "")
    if lg:
        c.impls["liger"] = (
            lambda x, t: (lg["vp_ce"].apply(x, t, None, -100, 0.0, "megatron", "global"),),
            "LigerVocabParallelCEFunction(tp_group=None): saves an fp32 exp buffer")
    if compile_fn:
        c.impls["torch.compile(ref)"] = (_compiled(compile_fn, math_cross_entropy), "")
    c.impls["eager ref"] = (lambda x, t: (ref_cross_entropy(x, t),), "")
    out.append(c)

    one = torch.ones((), device=device)
    c = Case("cross_entropy", "mean loss over tokens; grad logits", f"{s * b}x{v}",
             (logits, target), (0,), (one,), ("loss", "dlogits"))
    c.impls["moecore triton"] = (lambda x, t: (moe_cross_entropy(x, t).mean(),), "")
    if lg:
        c.impls["liger"] = (
            lambda x, t: (lg["ce"].apply(x.flatten(0, 1), t.flatten(), None, -100, 0.0, 0.0,
                                         "mean", None, False, False, False)[0],),
            "LigerCrossEntropyFunction(reduction='mean'): gradient computed in forward, "
            "written into the logits; bf16 per-token losses; host syncs (.item())")
    if compile_fn:
        c.impls["torch.compile(ref)"] = (
            _compiled(compile_fn, lambda x, t: math_cross_entropy(x, t).mean()), "")
    c.impls["eager ref"] = (lambda x, t: (ref_cross_entropy(x, t).mean(),), "")
    c.impls["torch F.cross_entropy"] = (
        lambda x, t: (F.cross_entropy(x.flatten(0, 1).float(), t.flatten()),),
        "F.cross_entropy on logits upcast to fp32 (as HF models call it)")
    out.append(c)
    return out


def _compiled(compile_fn, fn, n_args=None):
    """An impl running ``compile_fn(fn)`` on the case's first ``n_args`` args (all by default)."""
    cfn = compile_fn(fn)

    def run(*args):
        res = cfn(*(args if n_args is None else args[:n_args]))
        return res if isinstance(res, tuple) else (res,)

    return run


SHAPES = {  # e2e.py's model, then one larger case; --smoke: tiny, odd sizes
    "rmsnorm": ([(32768, 1024)], [(32768, 4096)], [(37, 80)]),
    "rope": ([(2048, 16, 16, 1, 64)], [(4096, 4, 8, 4, 128)], [(6, 3, 2, 2, 16)]),
    "swiglu": ([(65536, 2816)], [(16384, 14336)], [(37, 24)]),
    "cross_entropy": ([(2048, 16, 32000)], [(4096, 2, 128256)], [(5, 3, 300)]),
}
BUILDERS = {"rmsnorm": rmsnorm_cases, "rope": rope_cases, "swiglu": swiglu_cases,
            "cross_entropy": cross_entropy_cases}


# ---- check, time, report -----------------------------------------------------------------------


def _fwd_bwd(fn, args, grad_idx, grad_outputs):
    """``(outputs, input grads)`` of one forward + backward of ``fn(*args)``."""
    outs = fn(*args)
    grads = torch.autograd.grad(outs, [args[i] for i in grad_idx], grad_outputs)
    return outs, grads


def _fresh(case: Case, dtype=None):
    """The case's args and grad outputs as new tensors (in ``dtype`` when given: the fp32
    reference), grad-requiring where the case says; other tensors (cos/sin, targets) shared."""
    def conv(t):
        return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t

    args = tuple(conv(a).clone().requires_grad_() if i in case.grad_idx else conv(a)
                 for i, a in enumerate(case.args))
    return args, tuple(conv(g).clone() for g in case.grad_outputs)


def rel_err(got: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 25) -> float:
    """``||got - ref|| / ||ref||`` in fp64, over chunks (the logits' grads are GBs)."""
    g, r = got.detach().reshape(-1), ref.detach().reshape(-1)
    num = den = 0.0
    for i in range(0, r.numel(), chunk):
        gi, ri = g[i:i + chunk].double(), r[i:i + chunk].double()
        num += (gi - ri).square().sum().item()
        den += ri.square().sum().item()
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def run_case(case: Case, device, args) -> list[dict]:
    """Check every impl of ``case`` against the fp32 eager reference, then time it."""
    ref_args, ref_gout = _fresh(case, torch.float32)
    ref = [t.detach() for part in _fwd_bwd(case.impls["eager ref"][0], ref_args, case.grad_idx,
                                           ref_gout) for t in part]
    del ref_args, ref_gout
    rows = []
    for name, (fn, note) in case.impls.items():
        row = dict(op=case.op, includes=case.includes, shape=case.shape, impl=name, note=note,
                   ms=None, max_rel_err=None, error="")
        try:
            fargs, gout = _fresh(case)
            got = [t for part in _fwd_bwd(fn, fargs, case.grad_idx, gout) for t in part]
            errs = [rel_err(a, b) for a, b in zip(got, ref)]
            del got
            row["rel_errs"] = dict(zip(case.names, errs))
            row["max_rel_err"] = max(errs)
            print(f"check {case.op} [{case.includes}] {case.shape} {name}: "
                  + ", ".join(f"{n} {e:.2e}" for n, e in zip(case.names, errs)), flush=True)
            if not row["max_rel_err"] <= args.tol:  # also NaN
                row["error"] = f"FAIL: rel err {row['max_rel_err']:.2e} > {args.tol}"
            row["ms"] = median_ms(
                lambda f=fn, fa=fargs, g=gout: _fwd_bwd(f, fa, case.grad_idx, g), device,
                args.warmup, args.repeats)
        except Exception as exc:  # noqa: BLE001 - one impl failing must not end the run
            row["error"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"[:200]
        if row["error"]:
            print(f"  {name}: {row['error']}", flush=True)
        fargs = gout = None
        rows.append(row)
    base = next((r["ms"] for r in rows if r["impl"] == case.baseline), None)
    for r in rows:
        r["speedup_vs_eager"] = base / r["ms"] if base and r["ms"] else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| op | includes | shape | impl | fwd+bwd ms | vs eager | max rel err |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        sp = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        if r["error"]:
            err = f"{err} {r['error'].split(':')[0]}"
        lines.append(f"| {r['op']} | {r['includes']} | {r['shape']} | {r['impl']} | {ms} | {sp} "
                     f"| {err} |")
    return "\n".join(lines)


def environment(device, liger_version, liger_reason) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return dict(device=dev or device.type, torch=torch.__version__, triton=triton_version,
                liger_kernel=liger_version or f"not used ({liger_reason})")


def write_json(args, env: dict, rows: list[dict]) -> None:
    """The rows so far (rewritten after every case: a run cut short keeps what it measured)."""
    if args.json:
        args.json.write_text(json.dumps(dict(env=env, dtype=str(args.dtype), repeats=args.repeats,
                                             warmup=args.warmup, rows=rows), indent=1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(BUILDERS),
                   help=f"comma-separated subset of {','.join(BUILDERS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 30; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 5; smoke 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16; float32 for --smoke on CPU (see interpreter_compat)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-large", action="store_true", help="only e2e.py's shapes")
    p.add_argument("--tol", type=float, default=None,
                   help="max rel err vs the fp32 reference (default 2e-2 for 16-bit, 1e-4 fp32)")
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in args.ops if o not in BUILDERS]
    if bad:
        p.error(f"--ops: unknown {bad}; choose from {','.join(BUILDERS)}")
    args.repeats = args.repeats or (2 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    cpu_smoke = args.smoke and torch.device(args.device).type == "cpu"
    args.dtype = getattr(torch, args.dtype or ("float32" if cpu_smoke else "bfloat16"))
    if args.tol is None:
        args.tol = 1e-4 if args.dtype == torch.float32 else 2e-2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu (with TRITON_INTERPRET=1) for a smoke run")
    lg, liger_version, liger_reason = load_liger()
    if lg is None:
        print(f"Liger-Kernel rows skipped: {liger_reason}", flush=True)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        interpreter_compat()
    compile_fn = None if args.no_compile else (lambda fn: torch.compile(fn, dynamic=False))
    gen = torch.Generator(device=device).manual_seed(0)
    env = environment(device, liger_version, liger_reason)
    rows, notes = [], {}
    for op in args.ops:
        e2e, large, smoke = SHAPES[op]
        for shape in smoke if args.smoke else e2e + ([] if args.no_large else large):
            for case in BUILDERS[op](shape, args.dtype, device, gen, lg, compile_fn):
                t0 = time.perf_counter()
                rows += run_case(case, device, args)
                print(f"-- {case.op} {case.shape} [{case.includes}] took "
                      f"{time.perf_counter() - t0:.0f} s (checks, compiles, timing)", flush=True)
                notes.update({(case.op, case.includes, n): note
                              for n, (_, note) in case.impls.items() if note})
                write_json(args, env, rows)
            case = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    failed = [r for r in rows if r["error"]]
    print("\n" + ", ".join(f"{k} {v}" for k, v in env.items())
          + f", {args.dtype}, median of {args.repeats} after {args.warmup} warm-up")
    for (op, includes, name), note in notes.items():
        print(f"- {op} [{includes}] {name}: {note}")
    print("- torch.compile(ref): torch.compile(dynamic=False) of moecore's reference forward "
          "math; compilation not timed")
    for r in failed:
        print(f"- FAILED {r['op']} {r['shape']} {r['impl']}: {r['error']}")
    print("\n" + markdown_table(rows))
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
