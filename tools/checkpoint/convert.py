"""Convert checkpoints: Hugging Face Mixtral / DeepSeek-V3 <-> moecore, and moecore between
TP/PP/EP layouts.

    # Hugging Face -> moecore at TP=2, EP=4 (prints the pretrain_gpt.py model flags on stdout)
    python tools/checkpoint/convert.py --loader hf --saver moecore \\
        --load-dir Mixtral-8x7B-v0.1 --save-dir ckpt/mixtral-tp2-ep4 \\
        --target-tensor-parallel-size 2 --target-expert-parallel-size 4 --dtype bf16
    # moecore -> moecore at another layout
    python tools/checkpoint/convert.py --loader moecore --saver moecore \\
        --load-dir ckpt/mixtral-tp2-ep4 --save-dir ckpt/mixtral-tp1-ep8 \\
        --target-tensor-parallel-size 1 --target-expert-parallel-size 8
    # moecore -> Hugging Face (config.json + safetensors, sharded above --max-shard-size)
    python tools/checkpoint/convert.py --loader moecore --saver hf \\
        --load-dir ckpt/mixtral-tp2-ep4 --save-dir Mixtral-continued
    # DeepSeek-V3 / R1 / Kimi-K2 / Moonlight (DeepseekV3ForCausalLM, bf16 weights): the same
    # commands; config.json's model_type picks the family, MLA models are written back as it
    python tools/checkpoint/convert.py --loader hf --saver moecore \\
        --load-dir Moonlight-16B-A3B --save-dir ckpt/moonlight-tp2-ep8 \\
        --target-tensor-parallel-size 2 --target-expert-parallel-size 8
    # Qwen3-MoE / Qwen2-MoE (Qwen3MoeForCausalLM, Qwen2MoeForCausalLM): the same commands
    python tools/checkpoint/convert.py --loader hf --saver moecore \\
        --load-dir Qwen3-30B-A3B --save-dir ckpt/qwen3-30b-tp2-ep8 \\
        --target-tensor-parallel-size 2 --target-expert-parallel-size 8

Tokenizer files beside the weights are copied with them. Progress goes to stderr, one line per
layer. See docs/checkpoint_conversion.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from moecore.convert import convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--loader", required=True, choices=["hf", "moecore"])
    p.add_argument("--saver", required=True, choices=["hf", "moecore"])
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=None, metavar="N")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None, metavar="N")
    p.add_argument("--target-expert-parallel-size", type=int, default=None, metavar="N")
    p.add_argument("--target-expert-tensor-parallel-size", type=int, default=None, metavar="N",
                   help="Default: the target tensor parallel size (moecore's default).")
    p.add_argument("--target-num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   metavar="N",
                   help="Model chunks per pipeline rank (interleaved schedule); default 1.")
    p.add_argument("--target-decoder-first-pipeline-num-layers", type=int, default=None,
                   metavar="N",
                   help="Layers of the first pipeline stage (uneven stages); default even.")
    p.add_argument("--target-decoder-last-pipeline-num-layers", type=int, default=None,
                   metavar="N",
                   help="Layers of the last pipeline stage (uneven stages); default even.")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="Parameter dtype written (default: the source's).")
    p.add_argument("--max-shard-size", default="5GB",
                   help="Hugging Face saver: largest safetensors file (e.g. 5GB, 500MB).")
    grouped = p.add_mutually_exclusive_group()
    grouped.add_argument("--moe-grouped-gemm", dest="grouped_gemm", action="store_true",
                         default=None, help="Write GroupedMLP expert weights (the default "
                         "from Hugging Face; pretrain_gpt.py --moe-grouped-gemm).")
    grouped.add_argument("--no-moe-grouped-gemm", dest="grouped_gemm", action="store_false",
                         help="Write SequentialMLP expert weights (pretrain_gpt.py without "
                         "--moe-grouped-gemm).")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None, metavar="N",
                   help="Vocabulary padding of the moecore checkpoint (default: the largest "
                   "power of two <= 128 that pads no more than the TP size requires).")
    p.add_argument("--overwrite", action="store_true",
                   help="moecore saver: write into a --save-dir that already holds moecore "
                   "checkpoints (replacing the converted iteration and moving the tracker to "
                   "it); refused otherwise.")
    p.add_argument("--true-vocab-size", type=int, default=None, metavar="N",
                   help="moecore loader: the tokenizer's vocabulary when the checkpoint's args "
                   "do not record it (padding rows beyond it are dropped).")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    target = {"tp": a.target_tensor_parallel_size, "pp": a.target_pipeline_parallel_size,
              "ep": a.target_expert_parallel_size, "etp": a.target_expert_tensor_parallel_size,
              "vp": a.target_num_virtual_stages_per_pipeline_rank,
              "first": a.target_decoder_first_pipeline_num_layers,
              "last": a.target_decoder_last_pipeline_num_layers}
    try:
        result = convert(a.loader, a.saver, a.load_dir, a.save_dir, target=target,
                         dtype=a.dtype, max_shard_size=a.max_shard_size,
                         grouped_gemm=a.grouped_gemm,
                         make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                         true_vocab_size=a.true_vocab_size, overwrite=a.overwrite)
    except ValueError as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    if a.saver == "moecore":
        print(f"[convert] vocabulary: {result.vocab_size} tokens, padded to "
              f"{result.padded_vocab_size}; give pretrain_gpt.py a tokenizer of that size, or "
              f"--mock-data --vocab-size {result.vocab_size - 1} (the mock tokenizer adds the "
              "EOD token). Model flags (stdout):",
              file=sys.stderr)
        flags = result.flags + ["--load", a.save_dir, "--no-load-optim", "--no-load-rng"]
        print(shlex.join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
