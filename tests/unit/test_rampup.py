"""``--rampup-batch-size START INCREMENT SAMPLES``: Megatron's global batch ramp, as a function
of consumed samples, through training and a resume in the middle of the ramp."""

from __future__ import annotations

import pytest

from moecore.arguments import parse_args
from moecore.batch_rampup import BatchSizeRampup
from moecore.training import pretrain
from tests.cli import BASE, parse_error


def test_sizes_follow_consumed_samples():
    ramp = BatchSizeRampup(start=4, increment=4, samples=30, global_batch_size=16, unit=2)
    # 3 increments over 30 samples: one every 10 consumed samples
    assert [ramp.global_batch_size_at(c) for c in (0, 9, 10, 19, 20, 29, 30, 31, 1000)] == \
        [4, 4, 8, 8, 12, 12, 16, 16, 16]
    assert ramp.sizes() == [4, 8, 12, 16]
    # steps: 4 (0->4), 4 (->8), 4 (->12: 12 >= 10 -> 8), 8 (->20), 12 (->32 > 30): 5 ramp steps
    # then (100 - 32) // 16 = 4 full ones
    assert ramp.train_iters(100) == 5 + 4
    with pytest.raises(ValueError, match="not a multiple of the increment"):
        BatchSizeRampup(4, 5, 30, 16, 2)
    with pytest.raises(ValueError, match="multiples of --micro-batch-size"):
        BatchSizeRampup(3, 3, 30, 15, 2)


SAMPLES = BASE + ["--global-batch-size", "8", "--micro-batch-size", "2",
                  "--rampup-batch-size", "2", "2", "12", "--train-samples", "40",
                  "--lr-warmup-samples", "0", "--eval-iters", "0", "--log-interval", "1"]
SAMPLES = [a for a in SAMPLES if a not in ("--train-iters", "10")]


def test_training_ramps_the_batch_and_resumes_mid_ramp(tmp_path):
    lines = []
    full = pretrain(SAMPLES, log=lines.append)
    sizes = [int(line.split("global batch size:")[1].split("|")[0])
             for line in lines if "global batch size:" in line]
    # 3 increments over 12 samples (one per 4): 2, 2, 4 (consumed 4 -> 8), 6 (8 -> 14), 8 ...
    assert sizes[:5] == [2, 2, 4, 6, 8] and set(sizes[4:]) == {8}
    assert len(full["lm_loss"]) == parse_args(SAMPLES).train_iters == 4 + (40 - 14) // 8
    first = pretrain(SAMPLES + ["--exit-interval", "3", "--save", str(tmp_path)])
    assert len(first["lm_loss"]) == 3
    resumed = pretrain(SAMPLES + ["--load", str(tmp_path)])
    assert resumed["lm_loss"] == full["lm_loss"][3:]


def test_rampup_flag_errors(capsys):
    assert "needs sample-based training" in parse_error(
        BASE + ["--rampup-batch-size", "2", "2", "8", "--global-batch-size", "8"], capsys)
    assert "multiple of the increment" in parse_error(
        SAMPLES + ["--rampup-batch-size", "2", "4", "12"], capsys)
