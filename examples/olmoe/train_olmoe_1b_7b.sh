#!/bin/bash
# OLMoE-1B-7B (6.9B total, 1.3B active per token) pretraining at real size in Megatron-LM's flags.
# Shape as Hugging Face's allenai/OLMoE-1B-7B-0924 config.json: 16 layers, hidden 2048, 16 heads
# of 128 (no GQA), 64 experts of FFN 1024 top-8 in every layer, no shared expert; RMSNorm over
# the whole q and k projections before the split into heads (--qk-layernorm
# --qk-layernorm-hidden-dim, a moecore flag named as in FlagScale's Megatron fork); routing
# weights are the softmax over all 64 experts at the top-8, not renormalised
# (--moe-router-pre-softmax); the load-balancing aux loss (0.01) and router z-loss (0.001).
# Training as the OLMoE paper: sequences of 4096, 1024 per batch (4M tokens), lr 4e-4 with
# 10k warmup steps and cosine decay, AdamW betas (0.9, 0.95), weight decay 0.1, 5T tokens.
#
# Parallel layout: 32 GPUs = 4 nodes x 8 (H100/H200 80+ GB):
#   TP=1   1.3B active parameters per token: a layer's matmuls are small enough that TP's
#          all-reduces would cost more than they save.
#   EP=8   64 experts, 8 per GPU inside each node (alltoall dispatcher over NVLink), inside
#          data parallel (DP = 32): ~0.8B expert parameters and ~0.5B others per GPU.
#   Distributed optimizer: the non-expert fp32 master weights and Adam moments are sharded over
#          DP=32, the experts' over their expert-data-parallel group (32 / 8 = 4).
#   Selective recompute of the expert activations and norms keeps micro-batches of 2 x 4096.
#
# Usage (on every node):
#   MASTER_ADDR=<node 0> NNODES=4 NODE_RANK=<this node> \
#     bash examples/olmoe/train_olmoe_1b_7b.sh CKPT_DIR TOKENIZER DATA_PREFIX
# TOKENIZER: a local copy of allenai/OLMoE-1B-7B-0924's tokenizer files (or the hub name);
# DATA_PREFIX: tools/preprocess_data.py output made with the same tokenizer. To start from the
# released weights, convert them first (tools/checkpoint/convert.py --target-expert-parallel-size
# 8, see docs/checkpoint_conversion.md) and pass --finetune.
# DRY_RUN=1 prints pretrain_gpt.py's arguments, one a line, instead of launching.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-4}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

CHECKPOINT_PATH=${1:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
TOKENIZER_MODEL=${2:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
DATA_PATH=${3:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
shift 3

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
MODEL_ARGS=(--use-mcore-models --disable-bias-linear --seq-length 4096
            --max-position-embeddings 4096
            --num-layers 16 --hidden-size 2048 --ffn-hidden-size 1024
            --num-attention-heads 16 --init-method-std 0.02
            --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
            --qk-layernorm --qk-layernorm-hidden-dim  # one RMSNorm over all heads' q (and k)
            --position-embedding-type rope --rotary-base 10000 --no-position-embedding
            --untie-embeddings-and-output-weights
            --make-vocab-size-divisible-by 128)  # 50280 tokens -> 50304, the HF weights' rows
MOE_ARGS=(--num-experts 64 --moe-ffn-hidden-size 1024 --moe-router-topk 8
          --moe-router-score-function softmax --moe-router-pre-softmax
          --moe-router-dtype fp32 --moe-router-load-balancing-type aux_loss
          --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --moe-grouped-gemm
          --moe-token-dispatcher-type alltoall --moe-permute-fusion)
DATA_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
           --data-path "$DATA_PATH" --split 99990,8,2)
TRAINING_ARGS=(--micro-batch-size 2 --global-batch-size 1024
               --train-samples 1220703125  # 5T tokens / 4096
               --lr 4e-4 --min-lr 4e-5 --lr-decay-style cosine
               --lr-warmup-samples 10240000 --lr-decay-samples 1220703125  # 10k steps warmup
               --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8
               --clip-grad 1.0 --bf16 --cross-entropy-loss-fusion
               --recompute-granularity selective --recompute-modules moe_act layernorm)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
                     --expert-model-parallel-size 8 --expert-tensor-parallel-size 1
                     --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
LOGGING_ARGS=(--log-interval 1 --save-interval 1000 --eval-interval 1000 --eval-iters 10
              --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
              --tensorboard-dir "$CHECKPOINT_PATH/tensorboard")
ARGS=("${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
      "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py "${ARGS[@]}"
