"""Generation (moecore.inference) against transformers' ``generate`` and a no-cache recompute.

A tiny random Hugging Face Mixtral is converted to moecore; greedy decoding must give exactly
transformers' tokens (fp32, CPU), batched prompts of different lengths what each gives alone,
and the KV-cache path what a full forward over the whole sequence gives at each step.
"""

from __future__ import annotations

import pytest
import torch

from moecore.inference import InferenceEngine, SamplingParams
from tests.convert_harness import convert_saved, random_hf_model
from tests.unit.test_convert import BASE_CONFIG

transformers = pytest.importorskip("transformers")

HF_KEYS = ("architectures", "model_type", "transformers_version", "torch_dtype")
PROMPTS = [[5, 6, 7, 8, 9, 40, 41], [3, 4], [10, 11, 12, 70]]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    cfg = {k: v for k, v in BASE_CONFIG.items() if k not in HF_KEYS}
    hf, _ = random_hf_model("Mixtral", cfg, seed=0)
    return convert_saved(hf, tmp_path_factory.mktemp("mixtral"))


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def recompute_greedy(model, prompt: list[int], n: int):
    """Greedy tokens and their log-probs from a full forward over the whole sequence per step."""
    seq, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), dim=-1)
            t = int(logp.argmax())
            seq.append(t)
            tokens.append(t)
            logprobs.append(float(logp[t]))
    return tokens, logprobs


def test_greedy_equals_transformers_generate_and_batched_equals_alone(mixtral):
    engine = InferenceEngine(mixtral["moecore"])
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    batched = engine.generate(PROMPTS, params)
    for prompt, completion in zip(PROMPTS, batched):
        assert completion.prompt_tokens == prompt and completion.finish_reason == "length"
        assert completion.tokens == hf_greedy(mixtral["hf"], prompt, 8)
        assert engine.generate([prompt], params)[0].tokens == completion.tokens


def test_cache_equals_recompute_logprobs_and_stop_tokens(mixtral):
    model = mixtral["moecore"]
    engine = InferenceEngine(model)
    prompt = PROMPTS[2]
    ref_tokens, ref_logprobs = recompute_greedy(model, prompt, 8)
    got = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0,
                                                   return_logprobs=True))[0]
    assert got.tokens == ref_tokens
    assert got.logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    stop = ref_tokens[3]
    first = ref_tokens.index(stop)
    cut = engine.generate([prompt, PROMPTS[1]], SamplingParams(
        max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,)))
    assert cut[0].tokens == ref_tokens[:first + 1] and cut[0].finish_reason == "stop"
    assert cut[0].logprobs is None


def test_dropless_whatever_the_training_capacity(mixtral):
    model = mixtral["moecore"]
    engine = InferenceEngine(model)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    want = engine.generate(PROMPTS, params)
    model.config.moe_expert_capacity_factor = 0.25  # would drop most tokens in training
    try:
        assert [c.tokens for c in engine.generate(PROMPTS, params)] == [c.tokens for c in want]
        assert model.config.moe_expert_capacity_factor == 0.25  # restored after generation
    finally:
        model.config.moe_expert_capacity_factor = None


def test_seeded_sampling_is_reproducible(mixtral):
    engine = InferenceEngine(mixtral["moecore"])
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.5, seed=8))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_from_checkpoint_uses_the_saved_args(mixtral):
    # A converted checkpoint carries no tokenizer: token ids through the NullTokenizer.
    engine = InferenceEngine.from_checkpoint(str(mixtral["root"] / "m"), [
        "--vocab-size", str(BASE_CONFIG["vocab_size"] - 1)], device="cpu")
    try:
        got = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0.0))
        assert got[0].tokens == hf_greedy(mixtral["hf"], PROMPTS[0], 8)
    finally:
        engine.close()


def test_request_errors_name_the_field(mixtral):
    engine = InferenceEngine(mixtral["moecore"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 1000]], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
