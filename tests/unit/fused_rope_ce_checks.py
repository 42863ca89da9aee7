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
    from moecore.kernels import rope as K
    from moecore.kernels.rope import apply_rotary_pos_emb_torch
    from moecore.transformer.rope import RotaryEmbedding

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
    from moecore.kernels.cross_entropy import (
        FusedVocabParallelCrossEntropy,
        _VocabParallelCrossEntropy,
    )

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


def check_qkv_rope() -> None:
    """fused_qkv_rope vs split + the torch rotation: values and the QKV gradient, with GQA,
    partial rotation, per-sequence positions, and outputs that get no gradient."""
    from moecore.kernels import rope as K
    from moecore.kernels.rope import apply_rotary_pos_emb_torch
    from moecore.transformer.rope import RotaryEmbedding

    torch.manual_seed(0)
    cases = [(7, 2, 3, 2, 16, 1.0, False), (4, 3, 1, 1, 64, 0.25, True),
             (9, 1, 5, 3, 8, 1.0, False), (0, 2, 1, 1, 8, 1.0, False)]
    for dtype in (torch.float32, torch.bfloat16):
        for s, b, ng, hpg, d, rot, pos in cases:
            mixed = torch.randn(s, b, ng, (hpg + 2) * d).to(dtype)
            freqs = RotaryEmbedding(d, rot)(s, torch.randint(0, 100, (b, s)) if pos else None)
            grads = [torch.randn(s, b, n, d).to(dtype) for n in (ng * hpg, ng, ng)]
            for used in ((0, 1, 2), (0, 1), (1, 2)):  # which of q, k, v reach the loss
                a, f = mixed.clone().requires_grad_(), mixed.clone().requires_grad_()
                q, k, v = torch.split(a, [hpg * d, d, d], dim=3)
                ref = (apply_rotary_pos_emb_torch(q.reshape(s, b, ng * hpg, d), freqs),
                       apply_rotary_pos_emb_torch(k, freqs), v)
                out = K.fused_qkv_rope(f, freqs.cos(), freqs.sin(), hpg, d)
                for i in range(3):
                    assert out[i].shape == ref[i].shape and out[i].dtype == dtype
                assert out[2]._base is f  # v is a view, not a copy
                sum(((r * grads[i]).sum() for i, r in enumerate(ref) if i in used),
                    torch.zeros(())).backward()
                sum(((o * grads[i]).sum() for i, o in enumerate(out) if i in used),
                    torch.zeros(())).backward()
                if dtype == torch.float32:
                    assert all(torch.equal(o, r) for o, r in zip(out, ref)), (s, b, d)
                    assert torch.equal(f.grad, a.grad), (s, b, d, used)
                else:
                    for o, r in zip(out, ref):
                        torch.testing.assert_close(o, r, rtol=1e-2, atol=1e-2)
                    torch.testing.assert_close(f.grad, a.grad, rtol=1e-2, atol=1e-2)


def check_attention_qkv_rope() -> None:
    """SelfAttention (GQA, RoPE) with the fused split + rotation vs the unfused path: output
    and every gradient bit for bit in fp32."""
    import moecore.kernels as MK
    from moecore.config import TransformerConfig
    from moecore.parallel_state import ParallelState
    from moecore.transformer.attention import SelfAttention
    from moecore.transformer.rope import RotaryEmbedding

    MK.cuda_triton_available = lambda *a, **kw: (True, "")  # let CPU tensors take the kernel
    results = []
    for fusion in (True, False):
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                num_query_groups=2, apply_rope_fusion=fusion)
        torch.manual_seed(0)
        attn = SelfAttention(cfg, 1, parallel_state=ParallelState.single())
        x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        freqs = RotaryEmbedding(cfg.kv_channels)(6)
        assert attn._fuse_split_and_rope(torch.zeros(6, 2, 64), freqs) == fusion
        out, _ = attn(x, rotary_pos_emb=freqs)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out.detach(), x.grad] + [p.grad for p in attn.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def check_copy_heads() -> None:
    """copy_heads: a permuted ([B, H, S, D] as [S, B, H, D]) source into the v slot of a QKV
    gradient, bit for bit; shape / stride mismatches raise."""
    from moecore.kernels import rope as K

    for dtype in (torch.float32, torch.bfloat16):
        src = torch.randn(3, 4, 5, 24).to(dtype).permute(2, 0, 1, 3)  # [S=5, B=3, H=4, D=24]
        slot = torch.zeros(5, 3, 4, 72, dtype=dtype)[..., 48:]
        K.copy_heads(src, slot)
        assert torch.equal(slot, src)
    for bad in (torch.zeros(5, 3, 4, 23), torch.zeros(5, 3, 4, 48)[..., ::2]):
        try:
            K.copy_heads(torch.zeros(5, 3, 4, 24), bad)
        except ValueError as exc:
            assert "copy_heads" in str(exc)
        else:
            raise AssertionError("no error for a mismatched copy_heads output")


CHECKS = {"rope": check_rope, "qkv_rope": check_qkv_rope, "copy_heads": check_copy_heads,
          "attention_qkv_rope": check_attention_qkv_rope, "cross_entropy": check_cross_entropy}


if __name__ == "__main__":
    sys.exit(run_checks(CHECKS, sys.argv[1:]))
