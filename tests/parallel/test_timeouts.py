"""``--distributed-timeout-minutes`` reaches every process group: with one rank stalled, the
others fail within the timeout with one line naming the collective, its group and the flag
(before: the model-parallel groups kept torch's 30-minute default and the others hung)."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist

from moecore import parallel_state
from moecore.arguments import parse_args
from moecore.collectives import CollectiveTimeoutError, collective_failure
from moecore.parallel_state import GROUP_KINDS
from moecore.training import loop, pretrain
from tests.dist_harness import run_distributed

TIMEOUT_MIN = 0.05  # 3 s
SLACK_S = 4.0  # exit within timeout + this (spawned gloo ranks on 2 shared cores)


def _failure(fn) -> tuple[str, float]:
    """(message of the collective failure ``fn()`` raises, seconds it took)."""
    start = time.monotonic()
    try:
        fn()
    except RuntimeError as exc:
        err = collective_failure(exc, TIMEOUT_MIN)
        assert err is not None, f"not recognised as a collective failure: {exc!r}"
        return str(err), time.monotonic() - start
    raise AssertionError("the collective returned although a rank of its group stalled")


def _stall_on_subgroup(rank: int) -> tuple[dict, str | None, float | None]:
    """EP=2 on 2 ranks; rank 1 sleeps past the timeout instead of the expert-parallel
    all-reduce. Rank 0 returns (group names, message, seconds to fail)."""
    ps = parallel_state.initialize_model_parallel(
        expert_model_parallel_size=2, distributed_timeout_minutes=TIMEOUT_MIN)
    names = {kind: getattr(ps.group(kind), "group_desc", None) for kind in GROUP_KINDS}
    msg = elapsed = None
    if rank == 0:
        msg, elapsed = _failure(lambda: dist.all_reduce(torch.ones(4), group=ps.ep_group))
    else:
        time.sleep(TIMEOUT_MIN * 60 + 1)
    dist.barrier()  # the world group (the harness's, 30 min) is intact
    parallel_state.destroy_model_parallel()
    return names, msg, elapsed


ARGV = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", "8", "--max-position-embeddings", "8", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "4", "--mock-data",
        "--vocab-size", "32", "--device", "cpu", "--eval-iters", "0", "--num-workers", "0",
        "--num-experts", "2", "--expert-model-parallel-size", "2", "--disable-bias-linear",
        "--distributed-timeout-minutes", str(TIMEOUT_MIN)]


def _stall_in_step(rank: int) -> tuple[str, float, int]:
    """DP=EP=2 training; at iteration 2, rank 1's step sleeps before it starts. Returns
    (message, seconds from the start of iteration 2 to the error, iterations started)."""
    step, started = loop.train_step, {}

    def train_step(*args, **kwargs):
        started.setdefault(len(started) + 1, time.monotonic())
        if rank == 1 and len(started) == 2:
            time.sleep(TIMEOUT_MIN * 60 + 2)
        return step(*args, **kwargs)

    loop.train_step = train_step
    try:
        pretrain(ARGV)
    except CollectiveTimeoutError as err:
        return str(err), time.monotonic() - started[2], len(started)
    finally:
        loop.train_step = step
    raise AssertionError("training finished although rank 1 stalled")


def _worker(rank, world_size):
    return _stall_on_subgroup(rank), _stall_in_step(rank)


@pytest.fixture(scope="module")
def stalled():
    """Both scenarios in one spawn of 2 gloo ranks (starting processes costs seconds)."""
    return run_distributed(_worker, 2, timeout=120)


@pytest.mark.chaos
def test_stalled_rank_times_out_subgroup_collective(stalled):
    (names, msg, elapsed), _ = stalled[0]
    assert names == {kind: kind for kind in GROUP_KINDS}  # named groups (NCCL's errors show it)
    assert elapsed < TIMEOUT_MIN * 60 + SLACK_S, elapsed
    assert re.fullmatch(
        r"collective all_reduce over the expert_model_parallel group \(ranks \[0, 1\]\) at "
        r"\S+test_timeouts\.py:\d+ \(<lambda>\) timed out after 0\.05 min "
        r"\(--distributed-timeout-minutes\): a rank of the group stalled or died; check the "
        r"other ranks' logs, or raise --distributed-timeout-minutes if the step is just slow",
        msg), msg


@pytest.mark.chaos
def test_stalled_rank_ends_training_within_timeout(stalled):
    (_, (msg0, elapsed0, iters0)), (_, (msg1, _, _)) = stalled
    assert iters0 == 2 and elapsed0 < TIMEOUT_MIN * 60 + SLACK_S, (iters0, elapsed0)
    assert re.fullmatch(r"collective \w+ over the \w+ group \(ranks \[0, 1\]\) at "
                        r"moecore/\S+\.py:\d+ \(\w+\) timed out after 0\.05 min "
                        r"\(--distributed-timeout-minutes\): .*", msg0), msg0
    # The stalled rank, waking up, finds its partner gone: one line too.
    assert re.fullmatch(r"collective \w+ over the \w+ group .* failed because a rank of the "
                        r"group exited or crashed \(connection closed\); .*", msg1), msg1


def test_timeout_flag_takes_fractions(capsys):
    """Megatron's flag takes whole minutes; moecore also takes fractions (a superset)."""
    one_rank = ARGV[: ARGV.index("--num-experts")]
    assert parse_args(one_rank + ["--distributed-timeout-minutes", "0.05"]
                      ).distributed_timeout_minutes == 0.05
    with pytest.raises(SystemExit):
        parse_args(one_rank + ["--distributed-timeout-minutes", "0"])
    assert "--distributed-timeout-minutes 0.0 must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="distributed_timeout_minutes=-1 must be > 0"):
        parallel_state.initialize_model_parallel(distributed_timeout_minutes=-1)
    # A timeout that is no collective's (e.g. a DataLoader's) is left alone.
    assert collective_failure(RuntimeError("DataLoader timed out after 5 seconds"), 1) is None
