"""Decode throughput: moecore's InferenceEngine against transformers' ``generate`` on the same
weights, at batch 1 and batch 32.

    python benchmarks/generate.py                 # the benchmarks/e2e.py model, bf16, CUDA
    python benchmarks/generate.py --smoke         # tiny shapes on CPU (what the unit test runs)

A random Hugging Face Mixtral of the ``benchmarks/e2e.py`` shape (hidden 1024, 16 layers,
16 heads, 16 experts top-2, expert FFN 2816, vocab 32000) is saved, converted to moecore
(``moecore.convert``) and both run greedy decoding of ``--new-tokens`` tokens after a
``--prompt-len``-token prompt. Tokens/s = batch * new tokens / wall time of one ``generate``
call (prefill included, after a warm-up call). Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moecore.convert import convert  # noqa: E402
from moecore.inference import InferenceEngine, SamplingParams  # noqa: E402

FULL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, num_local_experts=16,
            num_experts_per_tok=2, max_position_embeddings=2048)
SMOKE = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
             num_experts_per_tok=2, max_position_embeddings=128)


def build(shape: dict, directory: str, dtype: torch.dtype, device: str, graphs: bool):
    """(transformers model, moecore engine) on the same random weights."""
    import transformers

    cfg = transformers.MixtralConfig(**shape, tie_word_embeddings=False, rope_theta=1e6)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).to(dtype).eval()
    hf.save_pretrained(f"{directory}/hf")
    res = convert("hf", "moecore", f"{directory}/hf", f"{directory}/m", log=io.StringIO())
    flags = res.flags + ["--load", f"{directory}/m", "--device", device,
                         "--vocab-size", str(shape["vocab_size"] - 1), "--moe-grouped-gemm"]
    engine = InferenceEngine.from_args(flags, cuda_graphs=graphs)
    return hf.to(device), engine


def timed(fn, device: str) -> float:
    fn()  # warm-up (graph capture, kernel selection)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(hf, engine, batch: int, prompt_len: int, new: int, device: str) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), generator=g)
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    ours = timed(lambda: engine.generate(ids.tolist(), params), device)
    hf_ids = ids.to(device)
    theirs = timed(lambda: hf.generate(hf_ids, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0, eos_token_id=None),
                   device)
    return {"batch": batch, "moecore_tok_s": batch * new / ours,
            "transformers_tok_s": batch * new / theirs, "speedup": theirs / ours}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if a.smoke:
        a.new_tokens, a.prompt_len, a.batches = min(a.new_tokens, 8), min(a.prompt_len, 8), [1, 4]
    with tempfile.TemporaryDirectory() as d:
        hf, engine = build(SMOKE if a.smoke else FULL, d, dtype, device,
                           graphs=device == "cuda" and not a.no_cuda_graphs)
        try:
            rows = [bench(hf, engine, b, a.prompt_len, a.new_tokens, device)
                    for b in a.batches]
        finally:
            engine.close()
    print(f"decode, {a.prompt_len}-token prompts, {a.new_tokens} new tokens, {device} {dtype}")
    print(f"{'batch':>6} {'moecore tok/s':>14} {'transformers tok/s':>19} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['moecore_tok_s']:>14.1f} {r['transformers_tok_s']:>19.1f} "
              f"{r['speedup']:>7.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
