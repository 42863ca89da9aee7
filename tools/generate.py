"""Generate text from a moecore checkpoint.

    python tools/generate.py --load CKPT --use-checkpoint-args --prompt "ROMEO:" --prompt "To be"
    python tools/generate.py --load CKPT [model flags] --prompt "..." --temperature 0.8 --top-p 0.9
    torchrun --nproc_per_node 4 tools/generate.py --load CKPT --use-checkpoint-args --prompt ...

Every other flag is ``pretrain_gpt.py``'s (the model, its parallel layout, the tokenizer,
``--device``). Prints one completion per prompt (rank 0); the other ranks compute with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecore.inference import InferenceEngine, SamplingParams  # noqa: E402


def generation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (repeat for several prompts, run as one batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop-token-id", type=int, action="append", default=[],
                   help="stop a sequence after this token (repeatable)")
    p.add_argument("--stop-at-eod", action="store_true", help="stop at the tokenizer's EOD")
    p.add_argument("--logprobs", action="store_true", help="print each token's log-prob")
    p.add_argument("--sample-seed", type=int, default=None, help="seed of the sampling")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    return p


def main(argv: list[str] | None = None) -> list:
    gen, rest = generation_parser().parse_known_args(argv)
    try:
        params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                top_k=gen.top_k, top_p=gen.top_p,
                                stop_token_ids=tuple(gen.stop_token_id),
                                return_logprobs=gen.logprobs, seed=gen.sample_seed)
    except ValueError as e:
        sys.exit(f"tools/generate.py: error: {e} (flag --{str(e).split('=')[0]})")
    engine = InferenceEngine.from_args(rest, cuda_graphs=False if gen.no_cuda_graphs else None)
    try:
        if engine.rank != 0:
            engine.serve_forever()
            return []
        tok = engine.tokenizer
        if gen.stop_at_eod:
            params = SamplingParams(**{**params.__dict__,
                                       "stop_token_ids": (*params.stop_token_ids, tok.eod)})
        try:
            prompts = [tok.tokenize(p) for p in gen.prompt]
            completions = engine.generate(prompts, params)
        except ValueError as e:
            sys.exit(f"tools/generate.py: error: {e}")
        for text, c in zip(gen.prompt, completions):
            print(f"----- prompt: {text!r} ({c.finish_reason})")
            print(text + tok.detokenize(c.tokens), flush=True)
            if c.logprobs is not None:
                print("logprobs:", " ".join(f"{x:.3f}" for x in c.logprobs))
        return completions
    finally:
        engine.close()


if __name__ == "__main__":
    main()
