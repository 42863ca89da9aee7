"""The ring's block attention on CUDA: the fused forward/backward ops (cuDNN, FlashAttention-2;
backward given the merged out/lse) equal the fp32 reference, for causal and full blocks, GQA
and a merge of two blocks; ``auto`` picks a fused backend."""

import pytest
import torch

from moecore.kernels.block_attention import (
    BLOCK_ATTENTION,
    _merge_triton_ready,
    block_attention_backward_torch,
    block_attention_forward_torch,
    merge_partial,
    merge_partial_torch,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_picks_a_fused_backend_that_passed_its_self_check():
    ctx = dict(device=torch.device("cuda"), dtype=torch.bfloat16, head_dims=(128, 128))
    availability = BLOCK_ATTENTION.availability(**ctx)
    assert availability["flash"] == (True, ""), availability
    assert BLOCK_ATTENTION.select("auto", **ctx).name in ("fused", "flash"), availability


@pytest.mark.parametrize("name", ["fused", "flash"])
@pytest.mark.parametrize("hk", [8, 2])
def test_fused_block_attention_matches_the_reference(name, hk):
    fwd, bwd = BLOCK_ATTENTION.get(name).fn
    g = torch.Generator(device="cuda").manual_seed(0)
    B, h, S, d = 2, 8, 256, 128
    q = torch.randn(B, h, 2 * S, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(B, hk, 2 * S, d, device="cuda", generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    dout = torch.randn(B, h, S, d, device="cuda", generator=g, dtype=torch.bfloat16)
    qs = q[:, :, S:]  # the second chunk sees the first whole and itself causally
    for f in (fwd, block_attention_forward_torch):
        o1, l1 = f(qs, k[:, :, :S], v[:, :, :S], False, None)
        o2, l2 = f(qs, k[:, :, S:], v[:, :, S:], True, None)
        out, lse = merge_partial(*merge_partial(None, None, o1, l1), o2, l2)
        if f is fwd:
            fused_out, fused_lse = out.clone(), lse.clone()
    torch.testing.assert_close(fused_out, out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_lse, lse, rtol=1e-3, atol=1e-3)
    out = out.to(torch.bfloat16)
    for causal, ks in ((False, slice(0, S)), (True, slice(S, 2 * S))):
        got = bwd(dout, qs, k[:, :, ks], v[:, :, ks], out, lse, causal, None)
        ref = block_attention_backward_torch(dout, qs, k[:, :, ks], v[:, :, ks], out, lse,
                                             causal, None)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


def test_fused_merge_passes_its_self_check_and_matches_the_reference():
    assert _merge_triton_ready(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    B, h, C, d = 1, 16, 4096, 128  # CP=4's block shapes of benchmarks/cp_attention.py
    acc = torch.randn(B, h, 2 * C, d, device="cuda", generator=g)
    acc_lse = torch.randn(B, h, 2 * C, device="cuda", generator=g)
    part = torch.randn(B, h, C, d, device="cuda", generator=g).bfloat16()
    part_lse = torch.randn(B, h, C, device="cuda", generator=g)
    got, want = (acc.clone(), acc_lse.clone()), (acc.clone(), acc_lse.clone())
    merge_partial(got[0][:, :, C:], got[1][:, :, C:], part, part_lse)  # the fused path
    merge_partial_torch(want[0][:, :, C:], want[1][:, :, C:], part, part_lse)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
