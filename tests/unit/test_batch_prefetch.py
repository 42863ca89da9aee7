"""``BatchPrefetcher``: the training loop fetches the next iteration's micro-batches while the
GPU runs this one; running out of data is an error only for an iteration that needs them."""

from __future__ import annotations

import pytest
import torch

from moecore.training.loop import BatchPrefetcher, DataRanOut


def _ids(batches):
    return [int(b["tokens"][0, 0]) for b in batches]


def test_prefetch_keeps_order_and_reports_running_out_when_needed():
    data = iter([{"tokens": torch.full((2, 3), i)} for i in range(5)])
    pf = BatchPrefetcher(data, torch.device("cpu"))
    assert _ids(pf.take(2)) == [0, 1]
    pf.prefetch(2)
    pf.prefetch(2)  # already holds the next iteration: fetches nothing more
    assert _ids(pf.take(2)) == [2, 3]
    pf.prefetch(2)  # one batch left: the data ran out, but no iteration needs it yet
    with pytest.raises(DataRanOut, match="training data ran out"):
        pf.take(2)


def test_prefetch_does_not_hide_other_data_errors():
    def broken():
        yield {"tokens": torch.zeros(2, 3)}
        raise OSError("corrupt shard")

    pf = BatchPrefetcher(broken(), torch.device("cpu"))
    with pytest.raises(OSError, match="corrupt shard"):
        pf.prefetch(2)


def test_take_serves_a_changing_count_in_data_order():
    """A batch-size ramp-up asks for more (or fewer) micro-batches than were prefetched: the
    stream stays in order."""
    data = iter([{"tokens": torch.full((2, 3), i)} for i in range(8)])
    pf = BatchPrefetcher(data, torch.device("cpu"))
    pf.prefetch(2)
    assert _ids(pf.take(3)) == [0, 1, 2]  # two prefetched, one more fetched now
    pf.prefetch(3)
    assert _ids(pf.take(1)) == [3]  # the other two stay for the next step
    pf.prefetch(3)  # still holds batches: fetches nothing
    assert _ids(pf.take(4)) == [4, 5, 6, 7]
    with pytest.raises(DataRanOut, match="training data ran out"):
        pf.take(1)
