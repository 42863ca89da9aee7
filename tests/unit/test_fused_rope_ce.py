"""Fused RoPE and cross-entropy kernels: the Triton kernels under the interpreter (CPU) against
the torch references, and the dispatch that keeps CPU tensors on the references."""

from __future__ import annotations

import torch

from moecore.kernels.rope import apply_rotary_pos_emb_torch
from moecore.tensor_parallel import vocab_parallel_cross_entropy
from moecore.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb
from tests.triton_interpret import assert_checks_pass

CHECKS = ("rope", "qkv_rope", "copy_heads", "attention_qkv_rope", "cross_entropy")


def test_fused_kernels_under_interpreter():
    assert_checks_pass("tests.unit.fused_rope_ce_checks", CHECKS)


def test_cpu_tensors_use_the_references_and_cos_sin_are_cached():
    freqs = RotaryEmbedding(16)(6)
    t = torch.randn(6, 2, 3, 16, requires_grad=True)
    out = apply_rotary_pos_emb(t, freqs)
    assert torch.equal(out, apply_rotary_pos_emb_torch(t, freqs))
    cached = freqs._moecore_cos_sin
    apply_rotary_pos_emb(t, freqs)
    assert freqs._moecore_cos_sin is cached  # one cos/sin per angle tensor, not per layer
    logits = torch.randn(4, 10, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.randint(0, 10, (4,)), group=None)
    assert "Fused" not in type(loss.grad_fn).__name__
