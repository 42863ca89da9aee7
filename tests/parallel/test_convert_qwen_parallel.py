"""Converted Hugging Face Qwen3-MoE and Qwen2-MoE at TP=2 x EP=2 on 4 gloo ranks give
transformers' logits and gradients.

The tiny random models of ``tests/unit/test_convert_qwen.py`` (Qwen3: per-head QK norm, a dense
layer, top-k renormalised; Qwen2: q/k/v biases, the gated shared expert, no renormalisation) are
converted to TP=2 x EP=2 (sequence parallel, expert TP = 2) and run through ``pretrain`` with the
flags the converter prints. Logits (gathered over the vocab-parallel group) must match
transformers'; after one backward of the same loss, each rank's gradient shards must match
transformers' gradients, sharded by the converter's own table.
"""

from __future__ import annotations

import pytest

from tests import convert_harness as harness
from tests.unit.test_convert_qwen import (
    CASES,
    V,
    checked_names,
    hf_grads_as_global,
    hf_model,
)


@pytest.mark.parametrize("case", ["qwen3", "qwen2"])
def test_qwen_tp2_ep2_logits_and_grads_on_four_ranks(tmp_path, case):
    hf = hf_model(case)
    ids, labels = harness.ids_and_labels(V)
    ref = harness.saved_reference(hf, tmp_path, ids, labels, V)
    names = checked_names(case)
    grads = hf_grads_as_global(hf, names)
    res, per_rank = harness.run_converted_on_four_ranks(
        tmp_path, {"tp": 2, "ep": 2}, V, ids, labels, ref, grads, CASES[case][1]["num_experts"])
    assert "--sequence-parallel" in res.flags
    bad = harness.errors_over(per_rank, 1e-4)
    assert not bad, bad
    assert all(len(errs) == len(names) + 1 for errs in per_rank)
