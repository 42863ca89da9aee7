"""Fused RoPE and cross-entropy Triton kernels vs their torch references, run by
``tests/unit/test_fused_rope_ce.py`` in a subprocess with ``TRITON_INTERPRET=1`` (CPU).

The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest), so fp32 is
compared bit for bit and 16-bit dtypes within rounding. Prints ``PASS <name>`` per check.
"""

from __future__ import annotations

import sys

import torch

from tests.triton_interpret import run_checks


def check_rope() -> None:
    from moecore.transformer import rope_kernel as K
    from moecore.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb_torch

    torch.manual_seed(0)
    cases = [(7, 2, 3, 2, 16, 1.0, False), (4, 3, 1, 1, 64, 0.25, True),
             (9, 1, 5, 3, 8, 1.0, False), (3, 2, 2, 1, 12, 1.0, True), (0, 2, 1, 1, 8, 1.0, False)]
    for dtype in (torch.float32, torch.bfloat16):
        for s, b, ng, hpg, d, rot, pos in cases:
            # q and k as split_qkv makes them: strided views of the fused QKV output.
            mixed = torch.randn(s, b, ng * (hpg + 2) * d).to(dtype)
            q, k, _ = torch.split(mixed.view(s, b, ng, (hpg + 2) * d), [hpg * d, d, d], dim=3)
            freqs = RotaryEmbedding(d, rot)(s, torch.randint(0, 100, (b, s)) if pos else None)
            for t in (q.reshape(s, b, ng * hpg, d), k):
                a, f = t.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
                ref = apply_rotary_pos_emb_torch(a, freqs)
                out = K.fused_rope(f, freqs.cos(), freqs.sin())
                gy = torch.randn_like(ref)
                ref.backward(gy)
                out.backward(gy)
                assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
                if dtype == torch.float32:
                    assert torch.equal(out, ref) and torch.equal(f.grad, a.grad), (s, b, d)
                else:
                    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
                    torch.testing.assert_close(f.grad, a.grad, rtol=1e-2, atol=1e-2)


def check_cross_entropy() -> None:
    from moecore.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy
    from moecore.tensor_parallel.cross_entropy_kernel import FusedVocabParallelCrossEntropy

    torch.manual_seed(0)
    cases = [(torch.float32, 0.0, (5, 3), 300), (torch.bfloat16, 0.2, (2, 4), 9000),
             (torch.float32, 0.1, (0, 3), 50), (torch.float32, 0.0, (3,), 4097)]
    for dtype, smoothing, shape, v in cases:
        logits = (3 * torch.randn(*shape, v)).to(dtype)
        target = torch.randint(0, v, shape)
        a, f = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ref = _VocabParallelCrossEntropy.apply(a, target, smoothing, None)
        out = FusedVocabParallelCrossEntropy.apply(f, target, smoothing, None)
        gy = torch.rand(shape)
        ref.backward(gy)
        out.backward(gy)
        assert out.dtype == torch.float32 and out.shape == shape and f.grad.dtype == dtype
        if ref.numel():
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(f.grad, a.grad, rtol=tol, atol=1e-5)


CHECKS = {"rope": check_rope, "cross_entropy": check_cross_entropy}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
