"""``pretrain`` on CPU with FP8 (emulated GEMMs): checkpoints are precision-independent, a run
saved under FP8 resumes under full precision and the reverse, continuing the iteration count
with the saved weights (its first resumed loss is near the saving run's last one)."""

from __future__ import annotations

import math

import pytest

from moecore.training import pretrain
from tests.e2e.test_pretrain import TINY

FP8 = "--fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 4 " \
      "--fp8-gemm-backend emulated".split()
COMMON = TINY + ("--moe-grouped-gemm --train-iters 4 --log-interval 1 --eval-interval 100 "
                 "--eval-iters 0").split()


def _run(argv):
    summary = pretrain(argv, log=lambda _: None)
    return summary["iterations"], summary["lm_loss"]


@pytest.mark.parametrize("first,second", [("fp8", "full"), ("full", "fp8")])
def test_checkpoint_resumes_across_precisions(tmp_path, first, second):
    flags = {"fp8": FP8, "full": []}
    ckpt = str(tmp_path / "ckpt")
    its, losses = _run(COMMON + flags[first] + ["--save", ckpt, "--save-interval", "100",
                                                "--exit-interval", "2"])
    assert its == [1, 2]
    its2, losses2 = _run(COMMON + flags[second] + ["--load", ckpt])
    assert its2 == [3, 4] and all(math.isfinite(x) for x in losses2)
    assert abs(losses2[0] - losses[-1]) < 0.5  # the saved weights, not a fresh init


def test_weights_quantised_once_per_step_give_the_same_run(monkeypatch):
    """The loop's per-step FP8 weight cache (reused across micro-batches, renewed after each
    optimizer step) trains exactly as quantising every micro-batch: a stale cache after a step
    would change every later loss."""
    from moecore.fp8.scaling import WeightCache  # noqa: PLC0415

    argv = COMMON + "--fp8-format hybrid --fp8-recipe tensorwise --fp8-gemm-backend emulated " \
        "--micro-batch-size 1 --global-batch-size 4 --use-distributed-optimizer --bf16".split()
    _, cached = _run(argv)
    monkeypatch.setattr(WeightCache, "enable", classmethod(lambda cls, on=True: None))
    _, uncached = _run(argv)
    assert WeightCache.enabled is False and cached == uncached and len(cached) == 4
    assert len(set(cached)) == 4  # the weights did change between steps
