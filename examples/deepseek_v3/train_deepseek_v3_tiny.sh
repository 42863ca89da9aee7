#!/bin/bash
# DeepSeek-V3 (train_deepseek_v3_671b.sh) scaled down to run on one machine's CPUs in about a
# minute: the same flags and the same kinds of parallelism (pipeline with an uneven split and
# the MTP block on the last stage, expert parallel over data parallel), tiny sizes, mock data,
# 4 ranks (PP=2 x DP=2, EP=2). Extra arguments go to pretrain_gpt.py.
#   bash examples/deepseek_v3/train_deepseek_v3_tiny.sh [--train-iters 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python}  # the interpreter to use (tests pass their own)
MODEL_ARGS=(--use-mcore-models --disable-bias-linear --seq-length 64
            --max-position-embeddings 256  # = --rotary-scaling-factor x original 64, as 40 x 4096
            --num-layers 4 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 4
            --init-method-std 0.006 --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --qk-layernorm
            --position-embedding-type rope --rotary-base 10000 --no-position-embedding
            --untie-embeddings-and-output-weights)
MLA_ARGS=(--multi-latent-attention --q-lora-rank 32 --kv-lora-rank 16 --qk-head-dim 16
          --qk-pos-emb-head-dim 8 --v-head-dim 16
          --rope-type yarn --rotary-scaling-factor 4 --original-max-position-embeddings 64
          --mscale 1.0 --mscale-all-dim 1.0)
MOE_ARGS=(--num-experts 32 --moe-layer-freq '([0]*1+[1]*3)' --moe-ffn-hidden-size 16
          --moe-shared-expert-intermediate-size 16 --moe-router-topk 8
          --moe-router-num-groups 8 --moe-router-group-topk 4
          --moe-router-score-function sigmoid --moe-router-topk-scaling-factor 2.5
          --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
          --moe-router-dtype fp32 --moe-router-load-balancing-type seq_aux_loss
          --moe-aux-loss-coeff 1e-4 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
          --expert-model-parallel-size 2)
MTP_ARGS=(--mtp-num-layers 1 --mtp-loss-scaling-factor 0.1)
DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 510 --split 98,1,1)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 8 --lr 1e-3 --train-iters 20
               --lr-decay-iters 20 --lr-decay-style cosine --min-lr 1.0e-4 --weight-decay 0.1
               --adam-beta1 0.9 --adam-beta2 0.95 --lr-warmup-iters 2 --clip-grad 1.0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2
                     --decoder-last-pipeline-num-layers 1  # the last stage also holds MTP
                     --use-distributed-optimizer)
LOGGING_ARGS=(--log-interval 5 --eval-interval 10 --eval-iters 2)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
  "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${MTP_ARGS[@]}" "${DATA_ARGS[@]}" \
  "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
