"""The optimizer kernels of ``moecore.kernels.optim`` against their torch references, on CPU
tensors under the Triton interpreter. Run as ``TRITON_INTERPRET=1 python -m
tests.unit.optim_kernel_checks [name ...]`` (``test_optim_kernels.py`` does, in one
subprocess). Prints ``PASS name`` or ``FAIL name`` and a traceback per check; exits 1 if any
failed.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from tests.triton_interpret import run_checks

SIZES = (1, 1000, 4097, 3 * 8192 + 5)
HALF = (torch.bfloat16, torch.float16)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _force_triton_on_cpu():
    """Make the dispatchers take the (interpreted) Triton kernels for CPU tensors."""
    import moecore.kernels as K
    from moecore.kernels import optim as O

    K.cuda_triton_available = lambda *a, **kw: (True, "")  # looked up at call time
    O.TRITON_MIN_NUMEL = 1  # small tensors too


def check_accumulate(gen):
    from moecore.kernels import optim as O

    for n in SIZES:
        for dtype in (torch.float32,) + HALF:
            base = torch.randn(n + 3, generator=gen)
            main = base[3:]  # an unaligned view, as main grads in a flat buffer
            grad = torch.randn(n, generator=gen).to(dtype)
            grad[: min(n, 2)] = -0.0
            for overwrite in (True, False):
                got, want = main.clone(), main.clone()
                O.accumulate_main_grad_triton(got, grad, overwrite)
                O.accumulate_main_grad_torch(want, grad, overwrite)
                assert torch.equal(got, want), (n, dtype, overwrite)
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # signs of 0
    _force_triton_on_cpu()
    main = torch.zeros(10, 3)
    O.accumulate_main_grad_(main.t(), torch.ones(3, 10))  # not contiguous: the reference
    assert torch.equal(main, torch.ones(10, 3))
    O.accumulate_main_grad_(main, torch.ones(10, 3, dtype=torch.bfloat16))
    assert torch.equal(main, torch.full((10, 3), 2.0))
    assert O._triton_ready("main_grad_accumulate", torch.device("cpu"))


def _adamw_case(gen, n, *, weight_decay, scaled, out_dtype, betas=(0.9, 0.999), steps=5):
    """``steps`` updates of one tensor by the Triton kernel and by torch.optim.AdamW."""
    from moecore.kernels import optim as O

    param = torch.randn(n, generator=gen)
    ref = param.clone().requires_grad_()
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=betas, weight_decay=weight_decay,
                                  foreach=False)
    m, v = torch.zeros(n), torch.zeros(n)
    model = None if out_dtype is None else param.to(out_dtype)
    for step in range(1, steps + 1):
        lr = 1e-2 * (1 + step) / 2  # the scheduler moves lr between steps
        torch_opt.param_groups[0]["lr"] = lr
        grad = torch.randn(n, generator=gen) * 3
        scale = torch.full((), 0.5 + step, dtype=torch.float32) if scaled else None
        ref.grad = grad if scale is None else grad / scale
        grad_before = grad.clone()
        torch_opt.step()
        O.adamw_step_triton(param, grad, m, v, model, step=step, lr=lr, beta1=betas[0],
                            beta2=betas[1], eps=1e-8, weight_decay=weight_decay,
                            grad_scale=scale)
        state = torch_opt.state[ref]
        what = (n, weight_decay, scaled, out_dtype, betas, step)
        assert _rel(param, ref.detach()) < 1e-6, (what, _rel(param, ref.detach()))
        # FMA-contracted lerp in torch: ulps apart; one element (n = 1) may cancel a little
        assert _rel(m, state["exp_avg"]) < 2e-6, what
        assert _rel(v, state["exp_avg_sq"]) < 2e-6, what
        if model is not None:
            assert torch.equal(model, param.to(out_dtype)), what
        assert torch.equal(grad, grad_before)  # read, not unscaled in place


def check_adamw(gen):
    for n in SIZES[:3]:
        for weight_decay in (0.0, 0.1):
            for scaled in (False, True):
                _adamw_case(gen, n, weight_decay=weight_decay, scaled=scaled,
                            out_dtype=torch.bfloat16 if scaled else None)
    for out_dtype in HALF + (torch.float32,):
        _adamw_case(gen, SIZES[3], weight_decay=0.1, scaled=True, out_dtype=out_dtype, steps=2)
    _adamw_case(gen, 1000, weight_decay=0.1, scaled=False, out_dtype=torch.bfloat16,
                betas=(0.3, 0.99))  # torch's lerp takes its other branch for weight >= 0.5


def check_self_checks(gen):
    from moecore.kernels import optim as O

    cpu = torch.device("cpu")
    O._check_accumulate(cpu)
    O._check_adamw(cpu)


def check_triton_adamw(gen):
    """The class with its kernel (forced on CPU) vs torch's AdamW, and checkpoints both ways."""
    from moecore.kernels import optim as O

    _force_triton_on_cpu()
    O.TRITON_MIN_NUMEL = 2  # the (1,) tensors take torch's AdamW
    assert O.triton_adamw_available("cpu")
    shapes = [(37, 29), (1,), (4097,), (1,)]
    mains = [torch.randn(s, generator=gen) for s in shapes]
    ours = [m.clone() for m in mains]
    refs = [m.clone().requires_grad_() for m in mains]
    models = [m.to(torch.bfloat16) for m in ours[:3]]  # the last one has no model copy
    kw = dict(lr=1e-2, weight_decay=0.1)
    opt = O.TritonAdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], **kw)
    opt.set_model_copies(zip(ours[:3], models))
    ref = torch.optim.AdamW([{"params": refs[:2]}, {"params": refs[2:], "weight_decay": 0.0}],
                            fused=True, **kw)
    for step in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, r, g in zip(ours, refs, grads):
            p.grad, r.grad = g, g.clone()  # torch's fused AdamW unscales its grads in place
        scale = torch.full((), 2.0) if step % 2 else None
        for o in (opt, ref):
            if scale is not None:
                o.grad_scale = scale
            o.step()
            if scale is not None:
                del o.grad_scale
        assert opt.model_copies_written == {id(p) for p in ours[:3]}
        for p, r in zip(ours, refs):
            assert _rel(p, r.detach()) < 1e-6, step
        for p, m in zip(ours, models):
            assert torch.equal(m, p.to(torch.bfloat16))
    # checkpoint: ours -> torch (foreach) -> ours; one more step each equals
    from moecore.optimizer.optimizer import keep_implementation

    sd = copy.deepcopy(opt.state_dict())  # as from disk: no tensors shared
    assert all(s["step"].device.type == "cpu" and float(s["step"]) == 4
               for s in sd["state"].values())
    plain_params = [p.detach().clone() for p in ours]
    plain = torch.optim.AdamW([{"params": plain_params[:2]},
                               {"params": plain_params[2:], "weight_decay": 0.0}], **kw)
    plain.load_state_dict(sd)
    keep_implementation(plain)
    back_params = [p.detach().clone() for p in ours]
    back = O.TritonAdamW([{"params": back_params[:2]},
                          {"params": back_params[2:], "weight_decay": 0.0}], **kw)
    back.load_state_dict(copy.deepcopy(plain.state_dict()))
    keep_implementation(back)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    for o, ps in ((opt, ours), (plain, plain_params), (back, back_params)):
        for p, g in zip(ps, grads):
            p.grad = g
        o.step()
    for a, b, c in zip(ours, plain_params, back_params):
        assert torch.equal(a, c) and _rel(b, a) < 1e-6


def check_megatron_optimizer(gen):
    """MegatronOptimizer (bf16 model, clipping folded into grad_scale) with TritonAdamW and the
    accumulate kernel in the main-grad hooks, against torch's fused AdamW."""
    from moecore.kernels import optim as O
    from moecore.optimizer import MegatronOptimizer, finalize_model_grads, get_param_groups
    from moecore.optimizer import optimizer as opt_mod
    from moecore.optimizer.grad_buffer import DataParallelGradSync
    from moecore.parallel_state import ParallelState

    _force_triton_on_cpu()
    cpu = torch.device("cpu")
    assert O._triton_ready("main_grad_accumulate", cpu) and O._triton_ready("adamw", cpu)
    launches = {"_launch_accumulate": 0, "_launch_adamw": 0}  # (self-checks done above)

    def counted(name, fn):
        def launch(*a, **kw):
            launches[name] += 1
            return fn(*a, **kw)
        return launch

    for name in launches:
        setattr(O, name, counted(name, getattr(O, name)))
    runs = []
    for triton, buffers in ((False, False), (None, False), (None, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33),
                              nn.Linear(33, 4, bias=False)).to(torch.bfloat16)
        sync = DataParallelGradSync([model], ParallelState.single()) if buffers else None
        opt = MegatronOptimizer(get_param_groups(model), lr=1e-2, weight_decay=0.1,
                                clip_grad=0.5, grad_sync=sync,
                                adamw_backend="torch_fused" if triton is False else "triton")
        assert opt_mod.is_fused(opt.optimizer)
        assert isinstance(opt.optimizer, opt_mod.TritonAdamW) == (triton is None)
        torch.manual_seed(1)
        norms = []
        for _ in range(3):
            opt.zero_grad()
            for _ in range(2):  # two micro-batches: overwrite, then add
                x = torch.randn(8, 16, dtype=torch.bfloat16)
                (model(x).float().pow(2).mean() * 10).backward()
            finalize_model_grads(model)
            norms.append(opt.step()[1])
        if triton is None:
            assert opt.optimizer.model_copies_written == {id(m) for m in opt.main_params}
        for p, m in zip(opt.model_params, opt.main_params):
            assert torch.equal(p.detach(), m.to(torch.bfloat16))
        runs.append((norms, [m.clone() for m in opt.main_params]))
    # 5 params: 3 runs x 3 steps x 2 micro-batches of hooks; 2 runs x 3 steps of TritonAdamW
    assert launches == {"_launch_accumulate": 90, "_launch_adamw": 30}, launches
    (norms_ref, mains_ref), *others = runs
    assert norms_ref[0] > 0.5  # the clip really clips
    for norms, mains in others:
        assert max(abs(a - b) / b for a, b in zip(norms, norms_ref)) < 1e-5
        for a, b in zip(mains, mains_ref):
            assert _rel(a, b) < 1e-5


def check_bf16_moments(gen):
    """bf16 Adam moments (the precision-aware optimizer): the kernel against the reference one
    step at a time, then TritonAdamW with its kernel against its torch path over steps."""
    from moecore.kernels import optim as O

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for n in SIZES:
        param = torch.randn(n, generator=gen)
        m = (torch.randn(n, generator=gen) * 0.1).bfloat16()
        v = (torch.rand(n, generator=gen) * 0.01).bfloat16()
        grad = torch.randn(n, generator=gen)
        got, want = [param.clone(), m.clone(), v.clone()], [param.clone(), m.clone(), v.clone()]
        O.adamw_step_triton(got[0], grad, got[1], got[2], step=3, **hp)
        O.adamw_step_torch(want[0], grad, want[1], want[2], step=3, **hp)
        assert _rel(got[0], want[0]) < 1e-6, n
        for a, b in zip(got[1:], want[1:]):  # fp32 ulps apart may round to neighbouring bf16
            assert a.dtype == torch.bfloat16 and _rel(a, b) < 1e-3, (n, _rel(a, b))
    _force_triton_on_cpu()
    runs = []
    for kernel_min in (1, 1 << 40):  # every tensor through the kernel, then none
        O.TRITON_MIN_NUMEL = kernel_min
        g = torch.Generator().manual_seed(3)
        mains = [torch.randn(s, generator=g) for s in ((37, 29), (4097,))]
        opt = O.TritonAdamW(mains, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                            exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
        for _ in range(4):
            for p in mains:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append((mains, [opt.state[p]["exp_avg_sq"] for p in mains]))
    for a, b in zip(*(r[0] for r in runs)):
        assert _rel(a, b) < 1e-5
    for a, b in zip(*(r[1] for r in runs)):
        assert a.dtype == b.dtype == torch.bfloat16 and _rel(a, b) < 1e-3


CHECKS = {"accumulate": check_accumulate, "adamw": check_adamw,
          "self_checks": check_self_checks, "triton_adamw": check_triton_adamw,
          "megatron_optimizer": check_megatron_optimizer, "bf16_moments": check_bf16_moments}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
