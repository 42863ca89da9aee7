"""Context parallelism's single-process pieces: the zig-zag split and the log-sum-exp merge of
block attention (forward and backward) against full attention."""

from __future__ import annotations

import math

import pytest
import torch

from moecore.kernels.attention import sink_window_attention
from moecore.kernels.block_attention import (
    block_attention_backward_torch,
    block_attention_forward_torch,
    merge_partial,
)
from moecore.transformer.context_parallel import (
    check_cp_attention,
    gathered_to_natural,
    zigzag_index,
    zigzag_split,
)


def test_zigzag_index_balances_causal_work_and_covers_the_sequence():
    seq, cp = 16, 4
    parts = [zigzag_index(seq, cp, r) for r in range(cp)]
    assert parts[0].tolist() == [0, 1, 14, 15] and parts[3].tolist() == [6, 7, 8, 9]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    work = [int((p + 1).sum()) for p in parts]  # keys seen by each rank's causal queries
    assert len(set(work)) == 1
    gathered = torch.cat(parts)
    assert gathered[gathered_to_natural(seq, cp)].tolist() == list(range(seq))


def test_zigzag_split_takes_positions_along_dim_and_refuses_uneven_lengths():
    x = torch.arange(2 * 12).view(2, 12)
    assert zigzag_split(x, 3, 1).tolist() == [[2, 3, 8, 9], [14, 15, 20, 21]]
    assert zigzag_split(x, 1, 0) is x
    with pytest.raises(ValueError, match="--seq-length 12 must be divisible by 2 x "
                                         "--context-parallel-size = 8"):
        zigzag_split(x, 4, 0)


def _full(q, k, v):
    """[B, h, S, d] causal attention via the project's fp32 reference."""
    out = sink_window_attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v)))
    S, B = out.shape[:2]
    return out.view(S, B, q.shape[1], -1).permute(1, 2, 0, 3)


@pytest.mark.parametrize("hk", [4, 2])
def test_blocks_merged_by_lse_equal_full_causal_attention_and_its_gradients(hk):
    torch.manual_seed(0)
    B, h, S, d, dv = 2, 4, 8, 8, 6
    q = torch.randn(B, h, S, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hk, S, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hk, S, dv, dtype=torch.float64, requires_grad=True)
    ref = _full(q, k, v)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    c, scale = S // 2, 1 / math.sqrt(d)
    # Rows c.. see keys 0..c-1 whole and c.. causally; rows ..c see keys ..c causally.
    lo_o, lo_l = block_attention_forward_torch(q[:, :, :c], k[:, :, :c], v[:, :, :c], True)
    a_o, a_l = block_attention_forward_torch(q[:, :, c:], k[:, :, :c], v[:, :, :c], False)
    b_o, b_l = block_attention_forward_torch(q[:, :, c:], k[:, :, c:], v[:, :, c:], True)
    hi_o, hi_l = merge_partial(*merge_partial(None, None, a_o, a_l), b_o, b_l)
    out, lse = torch.cat([lo_o.double(), hi_o.double()], 2), torch.cat([lo_l, hi_l], 2)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
    # Backward per block with the merged out/lse, summed, equals autograd of the full call.
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for qs, ks, causal in ((slice(0, c), slice(0, c), True), (slice(c, S), slice(0, c), False),
                           (slice(c, S), slice(c, S), True)):
        dq, dk, dv_ = block_attention_backward_torch(
            dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
            lse[:, :, qs], causal, scale)
        grads[0][:, :, qs] += dq.double()
        grads[1][:, :, ks] += dk.double()
        grads[2][:, :, ks] += dv_.double()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-6, atol=1e-6)


def test_merge_keeps_rows_that_saw_no_key_at_zero_weight():
    out = torch.ones(1, 1, 2, 3)
    lse = torch.tensor([[[0.0, float("-inf")]]])
    merged, new = merge_partial(out, lse, torch.full((1, 1, 2, 3), 2.0),
                                torch.tensor([[[float("-inf"), float("-inf")]]]))
    assert merged[0, 0, 0].tolist() == [1.0, 1.0, 1.0] and torch.isfinite(merged).all()
    assert new[0, 0, 1] == float("-inf")


@pytest.mark.parametrize("kwargs, match", [
    (dict(comm_type="ring"), "--cp-comm-type 'ring': choose one of"),
    (dict(comm_type="p2p", window=4), "use --cp-comm-type a2a"),
    (dict(comm_type="all_gather", sinks=torch.zeros(2)), "use --cp-comm-type a2a"),
    (dict(comm_type="p2p", dropout_p=0.1), "--attention-dropout"),
    (dict(comm_type="a2a", num_heads=6, cp_size=4), "divisible by --context-parallel-size 4"),
])
def test_cp_attention_refuses_what_a_comm_type_cannot_compute(kwargs, match):
    comm = kwargs.pop("comm_type")
    with pytest.raises(ValueError, match=match):
        check_cp_attention(comm, **kwargs)


def test_ring_blocks_follow_the_attention_backend_flag():
    from moecore.backends import BackendUnavailableError  # noqa: PLC0415
    from moecore.kernels.block_attention import (  # noqa: PLC0415
        block_attention_forward_torch,
        select_block_attention,
    )

    q = torch.zeros(1, 2, 8, 16)
    for name in ("auto", "unfused", "local"):
        assert select_block_attention(q, q, name)[0] is block_attention_forward_torch
    for name in ("flash", "fused"):
        with pytest.raises(BackendUnavailableError, match="--attention-backend"):
            select_block_attention(q, q, name)
