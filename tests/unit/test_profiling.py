"""``--profile --use-pytorch-profiler`` writes a trace of exactly the profiled iterations, on
the profiled ranks only; the profiling flags' errors name the fix."""

from __future__ import annotations

import json

import pytest

from moecore.arguments import parse_args
from moecore.training import pretrain

BASE = ("--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2 --lr 1e-3 --train-iters 5 "
        "--mock-data --vocab-size 64 --device cpu --eval-iters 0").split()


def _profiled_steps(trace_dir) -> tuple[int, set[str]]:
    traces = list(trace_dir.glob("*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    return len(events), steps


@pytest.mark.parametrize("start, end, steps", [(2, 4, 2), (1, 3, 2), (4, 9, 2)])
def test_torch_profiler_traces_the_window(tmp_path, start, end, steps):
    """Iterations start .. end - 1 (end past the last iteration: up to the last one)."""
    pretrain(BASE + ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(start),
                     "--profile-step-end", str(end), "--profile-dir", str(tmp_path)])
    n_events, names = _profiled_steps(tmp_path)
    assert n_events > 100 and len(names) == steps, names


def test_ranks_outside_profile_ranks_write_nothing(tmp_path):
    pretrain(BASE + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
                     "--profile-step-end", "3", "--profile-ranks", "1",
                     "--profile-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, match", [
    (["--use-pytorch-profiler"], "only with --profile"),
    (["--profile"], "add --use-pytorch-profiler"),
    (["--profile", "--use-pytorch-profiler"], "--profile-dir"),
    (["--profile", "--use-pytorch-profiler", "--profile-dir", "x", "--profile-step-start", "3",
      "--profile-step-end", "3"], "0 <= start < end"),
    (["--record-memory-history"], "needs --device cuda"),
])
def test_bad_profiling_flags(capsys, extra, match):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert match in capsys.readouterr().err
