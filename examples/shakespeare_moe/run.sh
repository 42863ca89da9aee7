#!/usr/bin/env bash
# Character-level Shakespeare MoE (nanoGPT's shakespeare_char, with 8 experts, top-2).
# Full size (~9.8M active parameters) on a GPU; a small, quick version on CPU.
# Extra arguments are passed to pretrain_gpt.py (e.g. --train-iters 100). At the end the model
# writes a short sample (tools/generate.py on the saved checkpoint, kept in $SHAKESPEARE_CKPT
# when set, else in a temporary directory removed on exit).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}  # the interpreter to use (tests pass their own)
DATA=$("$PYTHON" examples/shakespeare_moe/prepare.py ${SHAKESPEARE_INPUT:+--input "$SHAKESPEARE_INPUT"} | tail -n 1)
if [ -n "${SHAKESPEARE_CKPT:-}" ]; then
  CKPT=$SHAKESPEARE_CKPT
else
  CKPT=$(mktemp -d)
  trap 'rm -rf "$CKPT"' EXIT
fi
if [ "$DATA" = "MOCK" ]; then
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 66)
  PROMPT="1 2 3"  # the NullTokenizer reads space-separated ids
else
  PROMPT="ROMEO:"
  DATA_ARGS=(--data-path "$DATA" --split 90,10,0 --tokenizer-type CharacterTokenizer
             --vocab-file "$(dirname "$DATA")/vocab.json")
fi
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  SIZE=(--num-layers 6 --hidden-size 384 --num-attention-heads 6 --seq-length 256
        --max-position-embeddings 256 --ffn-hidden-size 1536 --moe-ffn-hidden-size 448
        --micro-batch-size 64 --global-batch-size 64 --train-iters 1000
        --lr-warmup-iters 100 --lr-decay-iters 1000 --eval-interval 50 --eval-iters 100
        --hidden-dropout 0.2 --attention-dropout 0.2 --bf16 --moe-grouped-gemm)
  # This model is too small to keep a GPU busy from Python: replay each step as a CUDA graph
  # (~4x faster, same numbers) where it can be captured (torch._grouped_mm on sm90+, Triton).
  if "$PYTHON" -c "import importlib.util as u, sys, torch
sys.exit(0 if torch.cuda.get_device_capability()[0] >= 9 and u.find_spec('triton') else 1)"; then
    SIZE+=(--cuda-graph-impl local)
  fi
else
  SIZE=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64
        --max-position-embeddings 64 --ffn-hidden-size 256 --moe-ffn-hidden-size 64
        --micro-batch-size 16 --global-batch-size 16 --train-iters 300
        --lr-warmup-iters 20 --lr-decay-iters 300 --eval-interval 100 --eval-iters 8
        --hidden-dropout 0.0 --attention-dropout 0.0 --moe-grouped-gemm)
fi
"$PYTHON" pretrain_gpt.py "${SIZE[@]}" "${DATA_ARGS[@]}" \
  --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss \
  --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall \
  --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
  --untie-embeddings-and-output-weights --init-method-std 0.02 \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --weight-decay 0.1 \
  --adam-beta1 0.9 --adam-beta2 0.99 --clip-grad 1.0 --log-interval 10 --seed 1337 \
  --make-vocab-size-divisible-by 1 "$@" --save "$CKPT"
echo "----- sample (python tools/generate.py --load CKPT --use-checkpoint-args --prompt ...)"
"$PYTHON" tools/generate.py --load "$CKPT" --use-checkpoint-args "${DATA_ARGS[@]}" \
  --prompt "$PROMPT" --max-new-tokens 56 --temperature 0.8 --top-k 20 --sample-seed 1337
