"""``cp_attention`` on gloo at CP=2 and CP=4, every comm type, equals full causal attention of
the whole sequence on one rank: outputs and the gradients of q, k and v (fp64 inputs; the
reference computes in fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moecore.kernels.attention import sink_window_attention
from moecore.transformer.context_parallel import cp_attention, zigzag_split
from tests.dist_harness import run_distributed

CASES = [  # (comm_type, kv heads, window, sinks)
    ("p2p", 4, None, False), ("p2p", 2, None, False), ("all_gather", 2, None, False),
    ("a2a", 4, None, False), ("a2a", 2, None, False), ("a2a", 4, 5, True),
]


def _worker(rank, world):
    group = dist.group.WORLD
    out = {}
    for i, (comm, hk, window, with_sinks) in enumerate(CASES):
        torch.manual_seed(100 + i)  # the same full tensors on every rank
        S, B, h, d, dv = 8 * world, 2, 4, 8, 6
        q = torch.randn(S, B, h, d, dtype=torch.float64)
        k = torch.randn(S, B, hk, d, dtype=torch.float64)
        v = torch.randn(S, B, hk, dv, dtype=torch.float64)
        sinks = torch.randn(h, dtype=torch.float64) if with_sinks else None
        dout = torch.randn(S, B, h * dv, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = sink_window_attention(*full, window=window, sinks=sinks)
        ref.backward(dout)
        local = [zigzag_split(t, world, rank, dim=0).requires_grad_() for t in (q, k, v)]
        got = cp_attention(*local, group, comm, window=window, sinks=sinks)
        got.backward(zigzag_split(dout, world, rank, dim=0))
        split = [zigzag_split(t.grad, world, rank, dim=0) for t in full]
        out[(comm, hk, window)] = (
            (got - zigzag_split(ref, world, rank, dim=0)).abs().max().item(),
            max((a.grad - b).abs().max().item() for a, b in zip(local, split)))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def errors(request):
    return run_distributed(_worker, request.param, timeout=180)


@pytest.mark.parametrize("comm, hk, window", [c[:3] for c in CASES])
def test_cp_attention_equals_full_attention_forward_and_backward(errors, comm, hk, window):
    for rank_errors in errors:
        fwd, bwd = rank_errors[(comm, hk, window)]
        assert fwd < 5e-6 and bwd < 5e-6, (comm, hk, window, fwd, bwd)
