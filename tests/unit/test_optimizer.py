"""Optimizer pieces on one process: loss scaler dynamics and skip-on-overflow, fp32 main params
for bf16 models, weight-decay groups, global-norm clipping vs torch, NaN detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moecore.optimizer import (
    ConstantGradScaler,
    DynamicGradScaler,
    MegatronOptimizer,
    clip_grad_norm,
    finalize_model_grads,
    get_param_groups,
)


def test_dynamic_scaler_hysteresis_backoff_and_growth():
    s = DynamicGradScaler(initial_scale=1024, min_scale=256, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale.item() == 1024  # first overflow only uses up hysteresis
    s.update(True)
    assert s.scale.item() == 512
    s.update(True)
    assert s.scale.item() == 256
    s.update(True)
    assert s.scale.item() == 256  # floor
    for _ in range(2):
        s.update(False)
    assert s.scale.item() == 256
    s.update(False)
    assert s.scale.item() == 512  # third clean step in a row
    state = s.state_dict()
    t = DynamicGradScaler(initial_scale=8, min_scale=1, growth_interval=3, hysteresis=2)
    t.load_state_dict(state)
    assert t.scale.item() == 512 and t.state_dict()["hysteresis_tracker"] == 2
    with pytest.raises(ValueError, match="min loss scale"):
        DynamicGradScaler(initial_scale=1, min_scale=2)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4, dtype=dtype), nn.LayerNorm(4, dtype=dtype),
                         nn.Linear(4, 2, bias=False, dtype=dtype))


def test_param_groups_exclude_biases_and_norms_from_decay():
    groups = {g["name"]: g for g in get_param_groups(_model())}
    assert [tuple(p.shape) for p in groups["decay"]["params"]] == [(4, 4), (2, 4)]
    assert [tuple(p.shape) for p in groups["no_decay"]["params"]] == [(4,), (4,), (4,)]
    assert groups["no_decay"]["wd_mult"] == 0.0


def test_overflow_skips_step_and_backs_off_scale():
    model = _model()
    scaler = DynamicGradScaler(initial_scale=2.0**10, min_scale=1.0, hysteresis=1)
    opt = MegatronOptimizer(get_param_groups(model), lr=0.1, weight_decay=0.0,
                            grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 4)).pow(2).mean()
    opt.scale_loss(loss).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    assert opt.step() == (False, None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.scale.item() == 2.0**9
    opt.zero_grad()
    opt.scale_loss(model(torch.randn(3, 4)).pow(2).mean()).backward()
    grads_scaled = [p.grad.clone() for p in model.parameters()]
    updated, norm = opt.step()
    assert updated and norm == pytest.approx(
        torch.stack([g.norm() for g in grads_scaled]).norm().item() / 2.0**9, rel=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    constant = ConstantGradScaler(8.0)
    constant.update(True)
    assert constant.scale.item() == 8.0


def test_bf16_model_accumulates_fp32_main_grads_and_steps_on_fp32_copies():
    model = _model(torch.bfloat16)
    opt = MegatronOptimizer(get_param_groups(model), lr=1e-3, weight_decay=0.0)
    xs = [torch.randn(3, 4, dtype=torch.bfloat16) for _ in range(3)]
    expected = [torch.zeros(p.shape) for p in model.parameters()]
    for x in xs:  # reference: each micro-batch's bf16 grads, summed in fp32
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.main_grad.zero_()
        model(x).float().pow(2).mean().backward()
        for e, p in zip(expected, model.parameters()):
            e += p.main_grad
    opt.zero_grad()
    for x in xs:
        model(x).float().pow(2).mean().backward()
    for e, p in zip(expected, model.parameters()):
        assert p.grad is None and p.main_grad.dtype == torch.float32
        assert torch.equal(p.main_grad, e)
    finalize_model_grads(model)
    mains_before = [m.clone() for m in opt.main_params]
    assert opt.step()[0]
    assert opt.state_bytes()["main_params"] == 4 * sum(p.numel() for p in model.parameters())
    for m, m0, p in zip(opt.main_params, mains_before, opt.model_params):
        assert m.dtype == torch.float32 and not torch.equal(m, m0)
        assert torch.equal(p, m.to(torch.bfloat16))  # model params are the rounded mains


def test_clip_grad_norm_matches_torch():
    model, ref = _model(), _model()
    for m in (model, ref):
        m(torch.ones(2, 4)).pow(2).sum().backward()
    norm = clip_grad_norm(list(model.parameters()), 0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert clip_grad_norm(list(model.parameters()), 0.0) == pytest.approx(0.05, rel=1e-4)


def test_clip_grad_norm_leaves_gradients_under_the_limit_alone():
    """A norm below ``max_norm`` is no reason to scale: the gradients stay as they are (only
    ever scaled down, as torch's ``clip_grad_norm_``)."""
    model = _model()
    model(torch.ones(2, 4)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(list(model.parameters()), 1e6)
    assert norm == pytest.approx(torch.cat([g.reshape(-1) for g in before]).norm().item(),
                                 rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert clip_grad_norm(list(model.parameters()), 2 * norm) == pytest.approx(norm, rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_nan_gradients_raise_unless_disabled():
    model = _model()
    opt = MegatronOptimizer(get_param_groups(model), lr=0.1, weight_decay=0.0)
    model(torch.randn(2, 4)).sum().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="gradient norm is nan"):
        opt.step()
    opt = MegatronOptimizer(get_param_groups(model), lr=0.1, weight_decay=0.0,
                            check_for_nan=False)
    assert opt.step()[0]
