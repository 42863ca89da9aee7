"""The KV-cache path equals a no-cache full recompute for every attention variant moecore has:
GQA with QK-norm and YaRN, sliding windows with learnable sinks (gpt-oss), and multi-latent
attention (q LoRA, YaRN). Random weights, built through ``InferenceEngine.from_args``."""

from __future__ import annotations

import pytest
import torch

from moecore.inference import InferenceEngine, SamplingParams
from moecore.inference.moe import dropless, moe_layers, static_moe_forward

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--ffn-hidden-size", "64",
        "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--vocab-size", "63",
        "--make-vocab-size-divisible-by", "1", "--init-method-std", "0.3", "--device", "cpu",
        "--moe-grouped-gemm", "--moe-expert-capacity-factor", "0.5"]
VARIANTS = {
    "gqa_qknorm_yarn": ["--group-query-attention", "--num-query-groups", "2", "--qk-layernorm",
                        "--rope-type", "yarn", "--rotary-scaling-factor", "4",
                        "--original-max-position-embeddings", "8"],
    "window_sinks": ["--window-size", "3,0", "--window-attn-skip-freq", "2",
                     "--softmax-type", "learnable", "--group-query-attention",
                     "--num-query-groups", "2"],
    "mla": ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
            "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8",
            "--rotary-scaling-factor", "4", "--original-max-position-embeddings", "8",
            "--qk-layernorm"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cache_equals_full_recompute(variant):
    engine = InferenceEngine.from_args(BASE + VARIANTS[variant])
    try:
        model = engine.model
        if variant == "window_sinks":  # non-zero sinks so that they matter
            for layer in model.decoder.layers:
                layer.self_attention.sinks.data.normal_(0, 1)
        prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
        params = SamplingParams(max_new_tokens=10, temperature=0.0, return_logprobs=True)
        got = engine.generate(prompts, params)
        for prompt, completion in zip(prompts, got):
            seq = list(prompt)
            with torch.no_grad():
                for t, lp in zip(completion.tokens, completion.logprobs):
                    logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), -1)
                    assert int(logp.argmax()) == t
                    assert float(logp[t]) == pytest.approx(lp, abs=1e-4)
                    seq.append(t)
    finally:
        engine.close()


def test_fixed_shape_moe_equals_the_moe_layer():
    """The graph-capturable MoE forward (run eagerly here) computes the MoE layer's function,
    shared experts included."""
    engine = InferenceEngine.from_args(BASE + ["--moe-shared-expert-intermediate-size", "32"])
    try:
        layer = moe_layers(engine.model)[0]
        hidden = torch.randn(5, 3, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), dropless(layer.config):
            want, _ = layer(hidden)
            got, _ = static_moe_forward(layer, hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        engine.close()
