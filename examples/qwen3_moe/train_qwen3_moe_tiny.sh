#!/bin/bash
# Qwen3-30B-A3B (train_qwen3_30b_a3b.sh) scaled down to run on one machine's CPUs in about a
# minute: the same flags (GQA with head_dim twice hidden / heads, per-head QK RMSNorm, many small
# experts top-k with fp32 routing), tiny sizes, mock data, 4 ranks: TP=2 with sequence parallel
# (each rank normalises its own heads) x DP=2, EP=2. Extra arguments go to pretrain_gpt.py.
#   bash examples/qwen3_moe/train_qwen3_moe_tiny.sh [--train-iters 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python}  # the interpreter to use (tests pass their own)
MODEL_ARGS=(--use-mcore-models --disable-bias-linear --seq-length 64
            --max-position-embeddings 256 --num-layers 4 --hidden-size 64
            --ffn-hidden-size 192 --num-attention-heads 4
            --group-query-attention --num-query-groups 2 --kv-channels 32 --qk-layernorm
            --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
            --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0
            --no-position-embedding --untie-embeddings-and-output-weights)
MOE_ARGS=(--num-experts 16 --moe-ffn-hidden-size 32 --moe-router-topk 4
          --moe-router-score-function softmax --moe-router-dtype fp32
          --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
          --moe-grouped-gemm --moe-token-dispatcher-type alltoall
          --expert-model-parallel-size 2)
DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 510 --split 98,1,1)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 8 --lr 1e-3 --train-iters 20
               --lr-decay-iters 20 --lr-decay-style cosine --min-lr 1.0e-4 --weight-decay 0.1
               --adam-beta1 0.9 --adam-beta2 0.95 --lr-warmup-iters 2 --clip-grad 1.0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 2 --sequence-parallel
                     --pipeline-model-parallel-size 1 --use-distributed-optimizer)
LOGGING_ARGS=(--log-interval 5 --eval-interval 10 --eval-iters 2)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
