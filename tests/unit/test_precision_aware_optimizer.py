"""``--use-precision-aware-optimizer`` with bf16 Adam moments: the update is AdamW's in fp32 with
each moment rounded to bf16 once per step, through the plain and the distributed optimizer,
checkpoints in and out, and the flags' errors."""

from __future__ import annotations

import copy

import pytest
import torch

from moecore.arguments import parse_args
from moecore.kernels.optim import TritonAdamW
from moecore.optimizer import MegatronOptimizer, OptimizerConfig, get_param_groups
from moecore.optimizer.distributed import DistributedOptimizer
from moecore.optimizer.grad_buffer import DataParallelGradSync
from moecore.parallel_state import ParallelState
from tests.cli import BASE, parse_error
from tests.unit.test_optimizer_fused import _model, _steps

BF16 = (torch.bfloat16, torch.bfloat16)
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _reference_step(p, g, m, v, step):
    """torch.optim.AdamW's own step in fp32 from the bf16 moments, which are then rounded to
    bf16 for the next step: what Megatron's precision-aware optimizer does."""
    ref = p.detach().clone().requires_grad_()
    ref.grad = g.clone()
    adam = torch.optim.AdamW([ref], foreach=False, **HP)
    adam.state[ref] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.float(),
                       "exp_avg_sq": v.float()}
    adam.step()
    p.copy_(ref.detach())
    return adam.state[ref]["exp_avg"].bfloat16(), adam.state[ref]["exp_avg_sq"].bfloat16()


def test_bf16_moments_follow_adamw_with_moments_rounded_each_step():
    gen = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (5,)]
    ours = [torch.randn(s, generator=gen) for s in shapes]
    refs = [p.clone() for p in ours]
    fp32 = [p.clone() for p in ours]
    opt = TritonAdamW(ours, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16, **HP)
    opt32 = TritonAdamW(fp32, **HP)
    moments = [(torch.zeros(s, dtype=torch.bfloat16),) * 2 for s in shapes]
    for step in range(1, 7):
        for i, (p, q, r) in enumerate(zip(ours, fp32, refs)):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
            moments[i] = _reference_step(r, p.grad, *moments[i], step)
        opt.step()
        opt32.step()
    for p, r, (m, v) in zip(ours, refs, moments):
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        torch.testing.assert_close(p, r, rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg"], m, rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], v, rtol=0, atol=0)
    assert all(opt32.state[q]["exp_avg"].dtype == torch.float32 for q in fp32)
    assert any(not torch.equal(p, q) for p, q in zip(ours, fp32))  # bf16 moments did round


def test_moment_dtype_errors():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="exp_avg_dtype=torch.float16.*fp32 or bf16"):
        TritonAdamW([p], exp_avg_dtype=torch.float16)


def _optimizers(distributed: bool, moment_dtypes):
    model = _model()
    groups = get_param_groups(model)
    kw = dict(lr=1e-2, weight_decay=0.1, clip_grad=0.5, moment_dtypes=moment_dtypes)
    if distributed:
        sync = DataParallelGradSync([model], ParallelState.single(), shard=True)
        return model, DistributedOptimizer(groups, sync, **kw)
    return model, MegatronOptimizer(groups, **kw)


def test_plain_and_distributed_optimizers_keep_bf16_moments_and_agree():
    runs = {}
    for distributed in (False, True):
        model, opt = _optimizers(distributed, BF16)
        assert isinstance(opt.optimizer, TritonAdamW)
        norms = _steps(model, opt, 4)
        states = list(opt.optimizer.state.values())
        assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
        n = sum(m.numel() for m in opt.main_params)
        assert opt.state_bytes()["adam_moments"] == 4 * n  # two bf16 moments
        runs[distributed] = (norms, [p.detach().clone() for p in model.parameters()])
    assert runs[False][0] == pytest.approx(runs[True][0], rel=1e-6)
    for a, b in zip(runs[False][1], runs[True][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("distributed", [False, True])
def test_checkpoint_resumes_bit_for_bit_and_loads_into_fp32_moments(distributed):
    model, opt = _optimizers(distributed, BF16)
    _steps(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())  # the plain one hands out its live tensors
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(model, opt, 2, seed=5)
    want = [m.detach().clone() for m in opt.main_params]
    for moment_dtypes in (BF16, (None, None)):
        resumed, opt2 = _optimizers(distributed, moment_dtypes)
        resumed.load_state_dict(weights)
        opt2.reload_model_params()
        opt2.load_state_dict(copy.deepcopy(state))  # loading aliases the step counters
        loaded = [s for s in opt2.optimizer.state.values() if "exp_avg" in s]
        assert loaded and {s["exp_avg"].dtype for s in loaded} == {
            torch.bfloat16 if moment_dtypes == BF16 else torch.float32}  # cast at load
        _steps(resumed, opt2, 2, seed=5)
        got = [m.detach() for m in opt2.main_params]
        if moment_dtypes == BF16:  # the saved bf16 moments come back exactly
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert all(s["exp_avg_sq"].dtype == torch.bfloat16
                       for s in opt2.optimizer.state.values())
        else:  # fp32 moments from the same values: close, not equal
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # <1% of a step
            assert any(not torch.equal(a, b) for a, b in zip(got, want))


def test_flags(capsys):
    args = parse_args(BASE + ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16",
                              "--exp-avg-sq-dtype", "bf16"])
    assert OptimizerConfig.from_args(args).moment_dtypes == BF16
    args = parse_args(BASE + ["--use-precision-aware-optimizer", "--exp-avg-sq-dtype", "bf16"])
    assert OptimizerConfig.from_args(args).moment_dtypes == (None, torch.bfloat16)
    assert OptimizerConfig.from_args(parse_args(BASE)).moment_dtypes == (None, None)
    assert "--use-precision-aware-optimizer" in parse_error(
        BASE + ["--exp-avg-dtype", "bf16"], capsys)
    assert "use bf16 or fp32" in parse_error(
        BASE + ["--use-precision-aware-optimizer", "--exp-avg-dtype", "fp8"], capsys)
    assert "fp32 main grads" in parse_error(
        BASE + ["--use-precision-aware-optimizer", "--main-grads-dtype", "bf16"], capsys)


def test_pretrain_builds_the_optimizer_with_bf16_moments(monkeypatch):
    from moecore.training import loop

    built = []
    real = loop.get_megatron_optimizer
    monkeypatch.setattr(loop, "get_megatron_optimizer",
                        lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    out = loop.pretrain(BASE + ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16",
                                "--exp-avg-sq-dtype", "bf16", "--eval-iters", "0"])
    assert out["iterations"] and all(torch.isfinite(torch.tensor(out["lm_loss"])))
    states = list(built[0].optimizer.state.values())
    assert states and {s["exp_avg"].dtype for s in states} == {torch.bfloat16}
