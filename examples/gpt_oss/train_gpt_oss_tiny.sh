#!/bin/bash
# gpt-oss (train_gpt_oss_20b.sh) scaled down to run on one machine's CPUs: the same flags
# (sinks, alternating sliding windows, biases, clamped quick-GeGLU, YaRN), tiny sizes, mock data,
# 4 ranks (TP=2 x DP=2 with sequence parallel, EP=2, expert TP 1). Extra arguments go to
# pretrain_gpt.py.
#   bash examples/gpt_oss/train_gpt_oss_tiny.sh [--train-iters 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python}
MODEL_ARGS=(--use-mcore-models --seq-length 32 --max-position-embeddings 128
            --num-layers 4 --hidden-size 64 --ffn-hidden-size 32
            --num-attention-heads 8 --group-query-attention --num-query-groups 2
            --kv-channels 16 --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-5
            --quick-geglu --glu-linear-offset 1.0 --activation-func-clamp-value 7.0
            --softmax-type learnable --window-size 7,0 --window-attn-skip-freq 2
            --position-embedding-type rope --rotary-base 150000 --rope-type yarn
            --rotary-scaling-factor 4 --original-max-position-embeddings 32
            --no-yarn-correction-range-round-to-int --no-position-embedding
            --untie-embeddings-and-output-weights)
MOE_ARGS=(--num-experts 8 --moe-ffn-hidden-size 32 --moe-router-topk 2
          --moe-router-score-function softmax --moe-router-dtype fp32
          --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
          --moe-grouped-gemm --moe-token-dispatcher-type alltoall)
DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 510 --split 98,1,1)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 8 --lr 1e-3 --train-iters 20
               --lr-decay-iters 20 --lr-decay-style cosine --min-lr 1.0e-4 --weight-decay 0.1
               --adam-beta1 0.9 --adam-beta2 0.95 --lr-warmup-iters 2 --clip-grad 1.0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 2 --sequence-parallel
                     --expert-model-parallel-size 2 --expert-tensor-parallel-size 1
                     --use-distributed-optimizer)
LOGGING_ARGS=(--log-interval 5 --eval-interval 10 --eval-iters 2)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
