"""Sampling masks against a per-row reference, and SamplingParams validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moecore.inference import SamplingParams, select_tokens
from moecore.inference.sampling import top_k_mask, top_p_mask


def reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Top-k, then the nucleus of the renormalised rest, one row in plain Python."""
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))
    kept = order[:k] if k else order
    probs = torch.softmax(row[kept], dim=0).tolist()
    out, mass = [], 0.0
    for i, q in zip(kept, probs):
        if mass >= p:
            break
        out.append(i)
        mass += q
    return set(out)


@pytest.mark.parametrize("k,p", [(0, 0.5), (5, 1.0), (7, 0.8), (1, 0.3), (0, 1.0)])
def test_top_k_top_p_masks_match_reference(k, p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(k))
    masked = logits.masked_fill(top_k_mask(logits, k), float("-inf"))
    masked = masked.masked_fill(top_p_mask(masked, p), float("-inf"))
    for b in range(logits.shape[0]):
        got = set(torch.nonzero(masked[b] > float("-inf")).flatten().tolist())
        assert got == reference_keep(logits[b], k, p)


def test_samples_stay_in_the_nucleus_and_logprobs_are_the_models():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens, logprobs = select_tokens(logits, params, g)
        for b, t in enumerate(tokens.tolist()):
            assert t in reference_keep(logits[b] / 0.7, 4, 0.9)
        assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(
            -1, tokens[:, None]).squeeze(-1))
    greedy, _ = select_tokens(logits, SamplingParams(temperature=0.0), None)
    assert greedy.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0),
                                         ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
                                         ("stop_token_ids", (-1,)), ("seed", -3)])
def test_params_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_generate_benchmark_smoke_runs(tmp_path):
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", "--json", str(tmp_path / "r.json")])
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["moecore_tok_s"] > 0 and r["transformers_tok_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "r.json").read_text()) == rows
