"""Optimizer kernels (moecore.kernels.optim): the torch references against torch's own ops and
AdamW over several steps (weight decay, grad_scale, bias correction, lr changes), TritonAdamW
(its reference path on CPU) against torch's AdamW with checkpoints moving both ways, optimizer
selection and the model-copy hand-off in MegatronOptimizer; and, where Triton is installed,
the Triton kernels under the interpreter (one subprocess, see optim_kernel_checks.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moecore.backends import BackendUnavailableError
from moecore.kernels import optim as O
from moecore.optimizer import MegatronOptimizer, get_param_groups
from moecore.optimizer import optimizer as opt_mod
from tests.triton_interpret import assert_checks_pass
from tests.unit.test_optimizer_fused import _model, _steps

CPU = torch.device("cpu")
HP = dict(beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.mark.parametrize("n", [0, 1, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_is_copy_or_add(n, dtype):
    gen = torch.Generator().manual_seed(n)
    main = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen).to(dtype)
    for overwrite, ref in ((True, main.clone().copy_(grad)), (False, main.clone().add_(grad))):
        got = main.clone()
        O.accumulate_main_grad_(got, grad, overwrite)
        assert torch.equal(got, ref)
    assert not O._triton_ready("main_grad_accumulate", CPU)  # CPU keeps the torch path


@pytest.mark.parametrize("n", [1, 1000, 4097])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("scaled", [False, True])
def test_adamw_reference_is_torch_adamw(n, weight_decay, scaled):
    gen = torch.Generator().manual_seed(n)
    param = torch.randn(n, generator=gen)
    ref = param.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=weight_decay, foreach=False)
    fused = param.clone().requires_grad_()  # torch's fused AdamW takes grad_scale itself
    fused_opt = torch.optim.AdamW([fused], lr=1e-2, weight_decay=weight_decay, fused=True)
    m, v, model = torch.zeros(n), torch.zeros(n), param.to(torch.bfloat16)
    for step in range(1, 6):
        lr = 1e-2 / step  # changed between steps, as by the scheduler
        for o in (ref_opt, fused_opt):
            o.param_groups[0]["lr"] = lr
        grad = torch.randn(n, generator=gen)
        scale = torch.full((), 1.0 + step) if scaled else None
        ref.grad = grad if scale is None else grad / scale
        ref_opt.step()
        fused.grad = grad.clone()
        if scale is not None:
            fused_opt.grad_scale = scale
        fused_opt.step()
        O.adamw_step_torch(param, grad, m, v, model, step=step, lr=lr,
                           weight_decay=weight_decay, grad_scale=scale, **HP)
        # The same ops in the same order as torch's single-tensor AdamW: bitwise equal.
        state = ref_opt.state[ref]
        assert torch.equal(param, ref.detach())
        assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])
        assert torch.equal(model, param.to(torch.bfloat16))
        torch.testing.assert_close(param, fused.detach(), rtol=1e-6, atol=1e-7)


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]


def _run(opt, params, grads, scale=None):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if scale is not None:
        opt.grad_scale = scale
    opt.step()
    if scale is not None:
        del opt.grad_scale


def test_triton_adamw_matches_torch_and_checkpoints_move_both_ways():
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (33,), (1,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours = [t.clone() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]
    opt = O.TritonAdamW(_groups(ours), **kw)
    ref = torch.optim.AdamW(_groups(theirs), fused=True, **kw)
    assert opt_mod.is_fused(opt) and opt.defaults == {**ref.defaults, "fused": None}
    for step in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        scale = torch.full((), 3.0) if step % 2 else None
        _run(opt, ours, grads, scale)
        _run(ref, theirs, grads, scale)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert sd["param_groups"] == [{**g, "fused": None} for g in ref_sd["param_groups"]]
    for s, r in zip(sd["state"].values(), ref_sd["state"].values()):
        assert s.keys() == r.keys() and s["step"].device == CPU and float(s["step"]) == 4
    # ours -> torch fused -> ours, as from disk; one more step each agrees
    fused_params = [t.detach().clone() for t in ours]
    fused = torch.optim.AdamW(_groups(fused_params), fused=True, **kw)
    fused.load_state_dict(copy.deepcopy(sd))
    opt_mod.keep_implementation(fused)
    assert all(s["step"].dtype == torch.float32 for s in fused.state.values())
    back_params = [t.detach().clone() for t in ours]
    back = O.TritonAdamW(_groups(back_params), **kw)
    back.load_state_dict(copy.deepcopy(fused.state_dict()))
    opt_mod.keep_implementation(back)
    assert all(s["step"].device == CPU for s in back.state.values())
    grads = [torch.randn(s, generator=gen) for s in shapes]
    for o, ps in ((opt, ours), (fused, fused_params), (back, back_params)):
        _run(o, ps, grads, torch.full((), 2.0))
    for a, b, c in zip(ours, fused_params, back_params):
        assert torch.equal(a, c)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_triton_adamw_rejects_what_it_does_not_implement():
    p = nn.Parameter(torch.zeros(3))
    for kw in ({"amsgrad": True}, {"maximize": True}):
        with pytest.raises(ValueError, match="amsgrad nor maximize"):
            O.TritonAdamW([p], **kw)
    opt = O.TritonAdamW([p])
    p.grad = torch.ones(3)
    opt.found_inf = torch.zeros(())
    with pytest.raises(NotImplementedError, match="found_inf"):
        opt.step()


def test_make_adamw_selection(monkeypatch):
    p = nn.Parameter(torch.zeros(3))
    kw = dict(lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)

    def make(**extra):
        return opt_mod.make_adamw([{"params": [p]}], **kw, **extra)

    assert type(make()) is torch.optim.AdamW and not opt_mod.is_fused(make())
    assert type(make(backend="torch_fused")) is torch.optim.AdamW  # no Triton kernel on CPU
    assert isinstance(make(backend="triton"), O.TritonAdamW)
    monkeypatch.setattr(O, "triton_adamw_available", lambda device: True)  # as on a GPU
    monkeypatch.setattr(O, "params_device", lambda params: torch.device("cuda"))
    assert isinstance(make(), O.TritonAdamW)
    assert type(make(sharded=True)) is torch.optim.AdamW  # the ZeRO-1 optimizer
    with pytest.raises(BackendUnavailableError, match="--adamw-backend"):
        make(sharded=True, backend="triton")
    assert type(make(backend="torch_fused")) is torch.optim.AdamW  # --adamw-backend torch_fused
    assert opt_mod.is_fused(make(backend="torch_fused"))


def _train(monkeypatch, triton: bool, steps=3, state=None):
    model = _model()
    opt = MegatronOptimizer(get_param_groups(model), lr=1e-2, weight_decay=0.1, clip_grad=0.5,
                            adamw_backend="triton" if triton else "torch_fused")
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(copy.deepcopy(state[1]))
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (copies.append(len(dst)),
                                                                   real_copy(dst, src)))
    norms = _steps(model, opt, steps)
    monkeypatch.setattr(torch, "_foreach_copy_", real_copy)
    for p, m in zip(opt.model_params, opt.main_params):
        assert torch.equal(p.detach(), m.to(torch.bfloat16))
    return model, opt, norms, copies


def test_megatron_optimizer_hands_model_copies_to_triton_adamw(monkeypatch):
    _, ref, ref_norms, ref_copies = _train(monkeypatch, triton=False)
    model, opt, norms, copies = _train(monkeypatch, triton=True)
    assert isinstance(opt.optimizer, O.TritonAdamW) and opt_mod.is_fused(opt.optimizer)
    # Each bf16 param copied once a step: by TritonAdamW (its torch path here: one
    # _foreach_copy_; in the kernel's pass on a GPU), MegatronOptimizer's own copy skipped.
    assert ref_copies == [5] * 3 and copies == [5] * 3
    assert opt.optimizer.model_copies_written == {id(m) for m in opt.main_params}
    assert ref_norms[0] > 0.5  # clipping (folded into grad_scale) really clips
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    for a, b in zip(opt.main_params, ref.main_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Checkpoints: TritonAdamW -> torch fused -> TritonAdamW.
    state = (model.state_dict(), opt.state_dict())
    _, fused, n_fused, _ = _train(monkeypatch, triton=False, steps=2, state=state)
    assert not isinstance(fused.optimizer, O.TritonAdamW)
    assert all(s["step"].dtype == torch.float32 for s in fused.optimizer.state.values())
    _, back, n_back, _ = _train(monkeypatch, triton=True, steps=2, state=state)
    assert all(s["step"].device == CPU for s in back.optimizer.state.values())
    assert n_back == pytest.approx(n_fused, rel=1e-5)


# ---- Triton kernels under the interpreter ---------------------------------------------------

CHECKS = ("accumulate", "adamw", "self_checks", "triton_adamw", "megatron_optimizer")


def test_optim_kernels_under_interpreter():
    assert_checks_pass("tests.unit.optim_kernel_checks", CHECKS)
