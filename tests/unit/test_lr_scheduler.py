"""OptimizerParamScheduler against Megatron's formulas, written out independently here."""

from __future__ import annotations

import math

import pytest

from moecore.arguments import parse_args
from moecore.optimizer import OptimizerParamScheduler, build_scheduler


class _Opt:
    def __init__(self):
        self.param_groups = [{"wd_mult": 1.0, "lr_mult": 1.0}, {"wd_mult": 0.0, "lr_mult": 0.5}]


def _sched(style="cosine", warm=10, decay=110, max_lr=1.0, min_lr=0.1, init=0.0, **kw):
    kw.setdefault("start_wd", 0.1)
    kw.setdefault("end_wd", 0.1)
    kw.setdefault("wd_incr_steps", decay)
    kw.setdefault("wd_incr_style", "constant")
    return OptimizerParamScheduler(_Opt(), init_lr=init, max_lr=max_lr, min_lr=min_lr,
                                   lr_warmup_steps=warm, lr_decay_steps=decay,
                                   lr_decay_style=style, **kw)


def _at(s, n):
    s.num_steps = 0
    s.step(n)
    return s.optimizer.param_groups[0]["lr"]


def test_warmup_is_linear_from_init_lr_and_first_step_uses_it():
    s = _sched(init=0.05)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # set at construction
    for n in (0, 1, 5, 10):
        assert _at(s, n) == pytest.approx(0.05 + (1.0 - 0.05) * n / 10)


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_decay_formula_and_floor(style):
    s = _sched(style)
    for n in (11, 20, 60, 100, 110):
        r = (n - 10) / 100
        coeff = 0.5 * (math.cos(math.pi * r) + 1) if style == "cosine" else 1 - r
        assert _at(s, n) == pytest.approx(0.1 + coeff * 0.9, rel=1e-12)
    assert _at(s, 111) == 0.1 and _at(s, 10_000) == 0.1
    assert _at(s, 60) == pytest.approx(0.55)  # half way: both styles give the midpoint


def test_constant_inverse_sqrt_and_wsd():
    s = _sched("constant")
    assert _at(s, 5) == pytest.approx(0.5) and _at(s, 50) == 1.0 and _at(s, 500) == 1.0
    s = _sched("inverse-square-root", min_lr=0.0)
    assert _at(s, 40) == pytest.approx(math.sqrt(10) / math.sqrt(40))
    for wsd_style, f in [("linear", lambda r: 1 - r),
                         ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1)),
                         ("exponential", lambda r: 2 * 0.5 ** r - 1),
                         ("minus_sqrt", lambda r: 1 - math.sqrt(r))]:
        s = _sched("WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
        assert _at(s, 50) == 1.0 and _at(s, 90) == 1.0
        assert _at(s, 95) == pytest.approx(0.1 + f(0.25) * 0.9), wsd_style


def test_group_multipliers_and_weight_decay_increment():
    s = _sched("linear", start_wd=0.0, end_wd=0.2, wd_incr_style="linear")
    _at(s, 55)
    g0, g1 = s.optimizer.param_groups
    assert g1["lr"] == pytest.approx(0.5 * g0["lr"])
    assert g0["weight_decay"] == pytest.approx(0.2 * 55 / 110) and g1["weight_decay"] == 0.0
    s = _sched("linear", start_wd=0.0, end_wd=0.2, wd_incr_style="cosine")
    _at(s, 55)
    assert s.optimizer.param_groups[0]["weight_decay"] == pytest.approx(
        0.2 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    _at(s, 111)
    assert s.optimizer.param_groups[0]["weight_decay"] == 0.2


def test_state_dict_round_trip_and_mismatch_rules():
    s = _sched()
    s.step(37)
    t = _sched()
    t.load_state_dict(s.state_dict())
    assert t.num_steps == 37 and t.optimizer.param_groups[0]["lr"] == s.optimizer.param_groups[0][
        "lr"]
    other = _sched(decay=220)
    with pytest.raises(ValueError, match="lr_decay_steps: the run asks for 220 but the "
                                         "checkpoint has 110"):
        other.load_state_dict(s.state_dict())
    over = _sched(decay=220, override_opt_param_scheduler=True)
    over.load_state_dict(s.state_dict())
    assert over.lr_decay_steps == 220 and over.num_steps == 37
    keep = _sched(decay=220, use_checkpoint_opt_param_scheduler=True)
    keep.load_state_dict(s.state_dict())
    assert keep.lr_decay_steps == 110


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="must end before the decay horizon"):
        _sched(warm=200, decay=100)
    with pytest.raises(ValueError, match="min_lr"):
        _sched(min_lr=2.0)
    with pytest.raises(ValueError, match="WSD needs"):
        _sched("WSD")


BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --min-lr 1e-4 --mock-data "
        "--vocab-size 100 --device cpu --lr-decay-style cosine").split()


def test_build_scheduler_counts_samples_like_megatron():
    args = parse_args(BASE + ["--train-iters", "100", "--lr-warmup-iters", "10",
                              "--lr-decay-iters", "80"])
    s = build_scheduler(_Opt(), args)
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == (80, 640, 800)
    s.step(8 * 5)  # after 5 iterations
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 5 / 10)
    args = parse_args(BASE + ["--train-iters", "100", "--lr-warmup-fraction", "0.25"])
    assert build_scheduler(_Opt(), args).lr_warmup_steps == 200
    args = parse_args(BASE + ["--train-samples", "1000", "--lr-warmup-samples", "40"])
    s = build_scheduler(_Opt(), args)
    assert (s.lr_warmup_steps, s.lr_decay_steps) == (40, 1000)


@pytest.mark.parametrize("n", [0, 11, 27, 55, 83, 99, 110])
def test_cosine_weight_decay_increment_rises_from_start_to_end(n):
    """The cosine increment is ``start + (end - start) * (1 - cos(pi r)) / 2``: start_wd at
    r = 0, end_wd at r = 1, below the midpoint before r = 0.5 (the reversed curve agrees with it
    only at r = 0.5)."""
    s = _sched("linear", start_wd=0.01, end_wd=0.2, wd_incr_style="cosine")
    s.num_steps = n
    r = n / 110
    assert s.get_wd() == pytest.approx(0.01 + 0.19 * (1 - math.cos(math.pi * r)) / 2,
                                       rel=1e-12, abs=1e-15)
    if r < 0.5:
        assert s.get_wd() < (0.01 + 0.2) / 2


def test_build_scheduler_converts_wsd_iters_to_samples():
    """``--lr-wsd-decay-iters`` counts iterations: 20 of them are 160 samples at global batch
    8, and the schedule equals the one given in samples."""
    wsd = ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear"]
    by_iters = build_scheduler(_Opt(), parse_args(
        BASE + wsd + ["--train-iters", "100", "--lr-decay-iters", "80",
                      "--lr-wsd-decay-iters", "20"]))
    by_samples = build_scheduler(_Opt(), parse_args(
        BASE + wsd + ["--train-samples", "800", "--lr-decay-samples", "640",
                      "--lr-wsd-decay-samples", "160"]))
    assert (by_iters.lr_decay_steps, by_iters.wsd_decay_steps) == (640, 160)
    for sample in (0, 400, 480, 520, 560, 600, 640, 700):
        lr = _at(by_iters, sample)
        r = min(max(sample - 480, 0) / 160, 1.0)  # annealing over the last 160 samples
        assert lr == pytest.approx(1e-4 + (1 - r) * 9e-4, rel=1e-12), sample
        assert lr == _at(by_samples, sample)
