"""CUDA: the graphed decode step equals the eager one (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moecore.inference import InferenceEngine, SamplingParams
from moecore.inference.moe import static_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "8",
         "--seq-length", "512", "--max-position-embeddings", "512", "--ffn-hidden-size", "256",
         "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--position-embedding-type", "rope", "--vocab-size", "255", "--bf16",
         "--moe-grouped-gemm", "--device", "cuda", "--init-method-std", "0.2"]


def test_graphed_decode_equals_eager():
    engine = InferenceEngine.from_args(FLAGS, cuda_graphs=True)
    try:
        assert engine.graphs.reason == ""
        prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
        params = SamplingParams(max_new_tokens=24, temperature=0.0, return_logprobs=True)
        plain = engine.generate(prompts, params)  # captures; prefill on the training path
        assert engine.graphs._graphs  # a graph was captured and replayed
        graphs = engine.graphs
        with static_moe(engine.model):  # prefill runs the same MoE function as the graph
            graphed = engine.generate(prompts, params)
            engine.graphs = None
            eager = engine.generate(prompts, params)
        engine.graphs = graphs
        for g, e in zip(graphed, eager):
            assert g.tokens == e.tokens
            assert g.logprobs == pytest.approx(e.logprobs, abs=2e-2)
        agree = sum(a == b for g, p in zip(graphed, plain) for a, b in zip(g.tokens, p.tokens))
        assert agree >= 0.9 * sum(len(g.tokens) for g in graphed)
    finally:
        engine.close()
