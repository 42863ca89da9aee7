#!/bin/bash
# gpt-oss-20b (20.9B total, 3.6B active per token) training at real size in Megatron-LM's flags.
# Shape as Hugging Face's openai/gpt-oss-20b config.json: 24 layers, hidden 2880, 64 query heads
# and 8 key/value heads of dim 64 with learned attention sinks, sliding window of 128 tokens on
# every other layer (from the first), biases on q/k/v/o, router and experts, 32 experts top-4
# (softmax over the 4 selected logits), clamped quick-GeGLU experts ((up + 1) * g * sigmoid(1.702
# g), both clamped at 7), YaRN x32 over 4096 (fractional ramp bounds), vocabulary 201088.
# Hugging Face's sliding_window 128 lets query i see keys i-127..i: --window-size 127,0.
#
# Parallel layout: one node of 8 GPUs (H100/H200 80+ GB): TP=1, EP=8 (4 experts per GPU,
# alltoall dispatcher over NVLink), DP=8 with the distributed optimizer sharding the non-expert
# fp32 state; expert biases are not split over expert TP, so --expert-tensor-parallel-size 1.
# Per GPU: ~2.4B expert and ~1.8B other parameters (~52 GB of weights, grads and Adam state) plus
# activations; full recompute keeps 4096-token micro-batches well inside 80 GB.
#
# Usage: bash examples/gpt_oss/train_gpt_oss_20b.sh CKPT_DIR TOKENIZER DATA_PREFIX
# TOKENIZER: a local copy of openai/gpt-oss-20b's tokenizer files; DATA_PREFIX: made by
# tools/preprocess_data.py with it. To start from the released weights (MXFP4 experts are
# dequantised on import) convert them first (docs/checkpoint_conversion.md) and pass --finetune.
# DRY_RUN=1 prints pretrain_gpt.py's arguments, one a line, instead of launching.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

CHECKPOINT_PATH=${1:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
TOKENIZER_MODEL=${2:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
DATA_PATH=${3:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
shift 3

MODEL_ARGS=(--use-mcore-models --seq-length 4096 --max-position-embeddings 131072
            --num-layers 24 --hidden-size 2880 --ffn-hidden-size 2880
            --num-attention-heads 64 --group-query-attention --num-query-groups 8
            --kv-channels 64 --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-5
            --quick-geglu --glu-linear-offset 1.0 --activation-func-clamp-value 7.0
            --softmax-type learnable --window-size 127,0 --window-attn-skip-freq 2
            --position-embedding-type rope --rotary-base 150000 --rope-type yarn
            --rotary-scaling-factor 32 --original-max-position-embeddings 4096
            --no-yarn-correction-range-round-to-int --no-position-embedding
            --untie-embeddings-and-output-weights)  # biases on: no --disable-bias-linear
MOE_ARGS=(--num-experts 32 --moe-ffn-hidden-size 2880 --moe-router-topk 4
          --moe-router-score-function softmax --moe-router-dtype fp32
          --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
          --moe-grouped-gemm --moe-token-dispatcher-type alltoall)
DATA_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
           --data-path "$DATA_PATH" --split 99990,8,2)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 512 --train-iters 100000
               --lr 3e-5 --min-lr 3e-6 --lr-decay-style cosine --lr-warmup-iters 200
               --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
               --bf16 --cross-entropy-loss-fusion
               --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
                     --expert-model-parallel-size 8 --expert-tensor-parallel-size 1
                     --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
LOGGING_ARGS=(--log-interval 1 --save-interval 1000 --eval-interval 1000 --eval-iters 10
              --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH")
ARGS=("${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
      "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS_PER_NODE" \
  pretrain_gpt.py "${ARGS[@]}"
