"""Chaos: SIGKILL one of 4 gloo ranks (DP=4, EP=2) mid-step, then another mid-save of an
``--async-save``; each time the others are killed as torchrun does, and the run resumes. The
resumed curve and final checkpoint equal the uninterrupted run's bit for bit; no published
checkpoint is lost; iterations only move forward across restarts; every step consumes one
global batch."""

from __future__ import annotations

import os

import pytest
import torch

from moecore.checkpointing import read_tracker
from tests.chaos.harness import TINY, launch, same_state

pytestmark = pytest.mark.chaos

ARGS = TINY + ["--expert-model-parallel-size", "2", "--train-iters", "8", "--save-interval",
               "2"]
GLOBAL_BATCH = 8


def _shards(root: str, iteration: int) -> dict:
    d = os.path.join(root, f"iter_{iteration:07d}")
    out = {}
    for shard in sorted(os.listdir(d)):
        state = torch.load(os.path.join(d, shard, "model_optim_rng.pt"), weights_only=True)
        state.pop("args")  # holds --save/--load, which differ between the two runs
        out[shard] = state
    return out


def test_sigkill_mid_step_and_mid_save_resume_bit_identically(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    _, straight = launch(tmp_path, "straight", "none", ARGS + ["--save", ref])
    expected = {r["it"]: r["loss"] for r in straight}
    assert sorted(expected) == list(range(1, 9))

    resume = ARGS + ["--save", run, "--load", run]
    trackers, records = [], []
    codes, rec = launch(tmp_path, "kill_step", "kill-step:2:5", resume)
    assert codes[2] == -9, codes
    trackers.append(read_tracker(run))
    records.append(rec)
    assert trackers[-1] == 4  # iterations 2 and 4 were published before the kill

    codes, rec = launch(tmp_path, "kill_save", "kill-save:1:6", resume + ["--async-save"])
    assert codes[1] == -9, codes
    trackers.append(read_tracker(run))
    records.append(rec)
    assert trackers[-1] == 4  # rank 1 died writing iteration 6 (after 2 more steps): unpublished
    assert os.path.isdir(os.path.join(run, "iter_0000006.tmp"))

    _, rec = launch(tmp_path, "resume", "none", resume)
    trackers.append(read_tracker(run))
    records.append(rec)
    assert trackers[-1] == 8

    starts = [0] + trackers[:-1]
    for start, rec in zip(starts, records):
        its = [r["it"] for r in rec]
        assert its == list(range(start + 1, start + 1 + len(its))), its  # monotonic, no gaps
        for r in rec:
            assert r["loss"] == expected[r["it"]], r  # bitwise-identical curve
            assert r["consumed"] == r["it"] * GLOBAL_BATCH, r  # one global batch per step
    assert [r["it"] for r in records[-1]] == [5, 6, 7, 8]
    assert not same_state(_shards(ref, 8), _shards(run, 8))
