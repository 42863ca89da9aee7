"""Fused AdamW (clipping folded into its grad_scale), lazily reset fp32 main grads, and
checkpoints moving between fused and unfused optimizers. CPU runs the fused kernel too
(``torch.optim.AdamW(fused=True)`` supports CPU tensors), so this covers the CUDA code path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moecore.optimizer import MegatronOptimizer, finalize_model_grads, get_param_groups
from moecore.optimizer import optimizer as opt_mod
from moecore.optimizer.grad_sync import model_grad


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16),
                         nn.Linear(16, 4, bias=False)).to(torch.bfloat16)


def _optimizer(model, fused: bool, monkeypatch, clip: float = 0.5):
    opt = MegatronOptimizer(get_param_groups(model), lr=1e-2, weight_decay=0.1,
                            clip_grad=clip, adamw_backend="torch_fused" if fused else "torch")
    assert opt_mod.is_fused(opt.optimizer) == fused
    return opt


def _steps(model, opt, n, seed=1):
    torch.manual_seed(seed)
    norms = []
    for _ in range(n):
        opt.zero_grad()
        (model(torch.randn(8, 16, dtype=torch.bfloat16)).float().pow(2).mean() * 10).backward()
        finalize_model_grads(model)
        norms.append(opt.step()[1])
    return norms


@pytest.mark.parametrize("clip", [0.5, 0.0, 1e6])
def test_fused_adamw_with_folded_clipping_matches_foreach(monkeypatch, clip):
    runs = []
    for fused in (False, True):
        model = _model()
        opt = _optimizer(model, fused, monkeypatch, clip)
        runs.append((_steps(model, opt, 5), [m.clone() for m in opt.main_params]))
    (norms_a, mains_a), (norms_b, mains_b) = runs
    assert norms_a[0] > 0.5  # the clipped case really clips
    assert norms_a == pytest.approx(norms_b, rel=1e-5)
    for a, b in zip(mains_a, mains_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_default_is_cuda_only_and_flag_switch():
    p = nn.Parameter(torch.zeros(3))
    assert not opt_mod.is_fused(opt_mod.make_adamw([{"params": [p]}], lr=1.0, betas=(0.9, 0.9),
                                                   eps=1e-8, weight_decay=0.0))
    if torch.cuda.is_available():
        q = nn.Parameter(torch.zeros(3, device="cuda"))
        kw = dict(lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)
        assert opt_mod.is_fused(opt_mod.make_adamw([{"params": [q]}], **kw))
        # --adamw-backend torch
        assert not opt_mod.is_fused(opt_mod.make_adamw([{"params": [q]}], backend="torch", **kw))


def test_main_grads_reset_lazily_and_accumulate_exactly(monkeypatch):
    model = _model()
    opt = _optimizer(model, False, monkeypatch)
    unused = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))  # never gets a gradient
    opt2 = MegatronOptimizer([{"params": [unused]}], lr=1e-2, weight_decay=0.0)
    xs = [torch.randn(3, 16, dtype=torch.bfloat16) for _ in range(3)]
    for _ in range(2):  # the second round must not see the first round's gradients
        opt.zero_grad()
        opt2.zero_grad()
        expected = [torch.zeros(p.shape) for p in model.parameters()]
        for x in xs:
            model.zero_grad(set_to_none=True)
            grads = torch.autograd.grad(model(x).float().pow(2).mean(), list(model.parameters()))
            for e, g in zip(expected, grads):
                e += g.float()
        for x in xs:
            model(x).float().pow(2).mean().backward()
        for e, p in zip(expected, model.parameters()):
            assert torch.equal(model_grad(p), e)
        unused.main_grad.fill_(7.0)  # stale values in a buffer nobody wrote this round
        opt2.zero_grad()
        assert torch.equal(model_grad(unused), torch.zeros(4))
        opt.step()


def test_checkpoint_moves_between_fused_and_unfused(monkeypatch):
    model = _model()
    fused = _optimizer(model, True, monkeypatch)
    _steps(model, fused, 2)
    state = copy.deepcopy(fused.state_dict())  # as from disk: no tensors shared
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    plain = _optimizer(model2, False, monkeypatch)
    plain.load_state_dict(state)
    assert not opt_mod.is_fused(plain.optimizer)
    assert all(s["step"].device.type == "cpu" for s in plain.optimizer.state.values())
    back = _optimizer(_model(), True, monkeypatch)
    back.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert opt_mod.is_fused(back.optimizer)
    n1, n2 = _steps(model, fused, 2, seed=3), _steps(model2, plain, 2, seed=3)
    assert n1 == pytest.approx(n2, rel=1e-4)
