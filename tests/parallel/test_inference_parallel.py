"""Greedy generation at TP=2 x EP=2 on 4 gloo ranks equals transformers' ``generate``.

A tiny random Hugging Face Mixtral is converted to TP=2 x EP=2 (expert TP 2); every rank builds
its shard with ``InferenceEngine.from_args`` (the converter's flags); rank 0 serves two requests
while the others follow, then releases them.
"""

from __future__ import annotations

import io

import pytest
import torch

from moecore.convert import convert
from moecore.inference import InferenceEngine, SamplingParams
from tests.convert_harness import random_hf_model, save_hub
from tests.dist_harness import run_distributed
from tests.unit.test_convert import BASE_CONFIG

pytest.importorskip("transformers")

HF_KEYS = ("architectures", "model_type", "transformers_version", "torch_dtype")
PROMPTS = [[5, 6, 7, 8, 9, 40, 41], [3, 4], [10, 11, 12, 70]]
N = 8


def _worker(rank, world_size, flags):
    engine = InferenceEngine.from_args(flags)
    try:
        if rank != 0:
            engine.serve_forever()
            return None
        params = SamplingParams(max_new_tokens=N, temperature=0.0)
        batched = [c.tokens for c in engine.generate(PROMPTS, params)]
        alone = engine.generate([PROMPTS[1]], params)[0].tokens
        return batched, alone
    finally:
        engine.close()


def test_tp2_ep2_greedy_equals_transformers(tmp_path):
    cfg = {k: v for k, v in BASE_CONFIG.items() if k not in HF_KEYS}
    hf, _ = random_hf_model("Mixtral", cfg, seed=0)
    save_hub(hf, str(tmp_path / "hf"))
    out = str(tmp_path / "tp2ep2")
    res = convert("hf", "moecore", str(tmp_path / "hf"), out, target={"tp": 2, "ep": 2},
                  log=io.StringIO())
    flags = res.flags + ["--load", out, "--device", "cpu", "--vocab-size",
                         str(cfg["vocab_size"] - 1)]
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, pad_token_id=0,
                       eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    results = run_distributed(_worker, 4, flags, timeout=300)
    batched, alone = results[0]
    assert batched == ref
    assert alone == ref[1]
    assert results[1:] == [None] * 3
