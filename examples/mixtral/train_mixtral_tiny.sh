#!/bin/bash
# The Mixtral 8x7B recipe scaled down to run on one machine's CPUs (or a few GPUs):
# same flags and parallel shape (TP=2 x EP=2 with sequence parallel, GQA, RoPE, SwiGLU, 8
# experts top-2), tiny sizes, mock data, 4 ranks. Extra arguments go to pretrain_gpt.py.
#   bash examples/mixtral/train_mixtral_tiny.sh [--train-iters 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python}  # the interpreter to use (tests pass their own)
MODEL_ARGS=(--use-mcore-models --disable-bias-linear --seq-length 64
            --max-position-embeddings 256 --num-layers 2 --hidden-size 64
            --ffn-hidden-size 224 --num-attention-heads 8 --init-method-std 0.01
            --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm
            --position-embedding-type rope --rotary-base 1000000 --swiglu
            --untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2
            --no-masked-softmax-fusion --no-position-embedding)
MOE_ARGS=(--num-experts 8 --expert-model-parallel-size 2 --moe-router-load-balancing-type aux_loss
          --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm
          --moe-token-dispatcher-type alltoall)
DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 510 --split 98,1,1)
TRAINING_ARGS=(--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 20
               --lr-decay-iters 20 --lr-decay-style cosine --min-lr 1.0e-4 --weight-decay 0.1
               --lr-warmup-iters 2 --clip-grad 1.0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1
                     --sequence-parallel)
LOGGING_ARGS=(--log-interval 5 --eval-interval 10 --eval-iters 2)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py ${MODEL_ARGS[@]} \
  ${MOE_ARGS[@]} ${DATA_ARGS[@]} ${TRAINING_ARGS[@]} ${MODEL_PARALLEL_ARGS[@]} \
  ${LOGGING_ARGS[@]} "$@"
