#!/bin/bash
# OLMoE (train_olmoe_1b_7b.sh) scaled down to run on one machine's CPUs in about a minute: the
# same model flags (QK RMSNorm over the whole projections, 64 experts top-8 of a softmax over
# all experts, aux + z loss), tiny sizes, mock data, 4 ranks as TP=2 x EP=2 with sequence
# parallel, so the QK norm's sum of squares is all-reduced over TP. Extra arguments go to
# pretrain_gpt.py.
#   bash examples/olmoe/train_olmoe_tiny.sh [--train-iters 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python}  # the interpreter to use (tests pass their own)
MODEL_ARGS=(--use-mcore-models --disable-bias-linear --seq-length 64
            --max-position-embeddings 64 --num-layers 2 --hidden-size 64
            --ffn-hidden-size 32 --num-attention-heads 4 --init-method-std 0.02
            --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
            --qk-layernorm --qk-layernorm-hidden-dim
            --position-embedding-type rope --rotary-base 10000 --no-position-embedding
            --untie-embeddings-and-output-weights)
MOE_ARGS=(--num-experts 64 --moe-ffn-hidden-size 32 --moe-router-topk 8
          --moe-router-score-function softmax --moe-router-pre-softmax
          --moe-router-dtype fp32 --moe-router-load-balancing-type aux_loss
          --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --moe-grouped-gemm
          --moe-token-dispatcher-type alltoall --expert-model-parallel-size 2)
DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 510 --split 98,1,1)
TRAINING_ARGS=(--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 20
               --lr-decay-iters 20 --lr-decay-style cosine --min-lr 1.0e-4 --weight-decay 0.1
               --adam-beta1 0.9 --adam-beta2 0.95 --lr-warmup-iters 2 --clip-grad 1.0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1
                     --sequence-parallel --use-distributed-optimizer)
LOGGING_ARGS=(--log-interval 5 --eval-interval 10 --eval-iters 2)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
