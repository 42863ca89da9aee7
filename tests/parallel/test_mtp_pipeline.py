"""Multi-token prediction under pipeline parallelism (2 gloo ranks) against the one-stage model.

The MTP block lives on the last stage, which keeps its own copy of the embedding (the MTP depths
embed the shifted tokens), synchronised with the first stage's at construction and summed over
the embedding group after backward. Same comparison as ``test_pipeline``: per-micro-batch losses
(also ``forward_only``), the recorded MTP (and MoE) losses per depth, and every gradient
(fp32 rel err <= 1e-5), with a loss scale of 8 so a wrong MTP scaling shows.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.parallel.test_pipeline import DENSE, MOE, _check_layout

MTP2 = " --mtp-num-layers 2 --mtp-loss-scaling-factor 0.5"
LAYOUTS = {
    # tied head, learned positions (both embedding tables are shared with the last stage)
    "1f1b_pp2_dense_tied_mtp2": (DENSE + MTP2, 2, 3, "--pipeline-model-parallel-size 2"),
    # untied head, MoE last layer: the MTP layers are MoE with their own aux losses
    "1f1b_pp2_moe_mtp1": (MOE.replace("--moe-layer-freq 2", "--moe-layer-freq [0,1,0,1]")
                          + " --mtp-num-layers 1", 4, 4, "--pipeline-model-parallel-size 2"),
    "interleaved_pp2_vp2_dense_mtp2": (DENSE + MTP2, 4, 4, "--pipeline-model-parallel-size 2 "
                                                           "--num-layers-per-virtual-pipeline-"
                                                           "stage 1"),
}


def _worker(rank, world_size):
    torch.use_deterministic_algorithms(True)
    errors = []
    for name, (flags, layers, n_mb, parallel) in LAYOUTS.items():
        errors += _check_layout(name, flags, layers, n_mb, parallel, world_size)
    return errors


@pytest.fixture(scope="module")
def rel_errors():
    per_rank = run_distributed(_worker, 2, timeout=240)
    return [e for errors in per_rank for e in errors]


def test_mtp_pipeline_matches_one_stage_model(rel_errors):
    names = {n.split(" ")[0] for n, _ in rel_errors}
    assert names == set(LAYOUTS), sorted(set(LAYOUTS) - names)
    for layout in LAYOUTS:
        checks = [n for n, _ in rel_errors if n.startswith(layout + " ")]
        assert any(" moe mtp loss" in n for n in checks), layout  # recorded per depth
        assert any(" grad mtp.layers.0.eh_proj.weight" in n for n in checks), layout
        assert any(" grad embedding.word_embeddings.weight" in n for n in checks), layout
        assert any(" loss" in n for n in checks), layout
    bad = [(n, e) for n, e in rel_errors if not e <= 1e-5]
    assert not bad, bad
