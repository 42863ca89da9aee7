#!/bin/bash
# Qwen3-30B-A3B (30.5B total, 3.3B active per token) in Megatron-LM's flags, on 2 nodes of 8
# GPUs. Shape as Hugging Face's Qwen/Qwen3-30B-A3B config.json: 48 layers, all MoE; hidden 2048;
# 32 query heads and 4 key/value groups of head_dim 128 (q projection 4096 wide, twice the hidden
# size) with per-head QK RMSNorm; RoPE base 1e6, 40960 positions; 128 experts top-8 of width 768,
# softmax routing renormalised over the chosen 8 (norm_topk_prob, moecore's default softmax
# router), no shared expert, aux loss 1e-3; untied embeddings, vocabulary 151936.
#
# Parallel layout: 16 GPUs (80 GB), TP=1, PP=2 (24 layers per stage), EP=8 inside DP=8: 16
#   experts per GPU (~1.8B routed-expert parameters per GPU, whose optimizer state is not
#   sharded: expert DP = 1), ~0.8B other parameters per stage replicated over DP with their
#   optimizer state sharded by the distributed optimizer; ~45 GB of state per GPU, the rest for
#   activations of 4096-token sequences with selective recompute of the experts' activation and
#   the norms. For more nodes raise DP (NNODES), keeping EP=8 inside a node.
# Routing runs in fp32 (--moe-router-dtype fp32), as Hugging Face's softmax does.
#
# Usage:  MASTER_ADDR=<node 0> NNODES=2 NODE_RANK=<node> \
#           bash examples/qwen3_moe/train_qwen3_30b_a3b.sh CKPT_DIR TOKENIZER DATA_PREFIX
# TOKENIZER: a local copy of Qwen/Qwen3-30B-A3B's tokenizer files (or the hub name).
# DRY_RUN=1 prints pretrain_gpt.py's arguments, one a line, instead of launching.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-2}
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
            --max-position-embeddings 40960 --num-layers 48 --hidden-size 2048
            --ffn-hidden-size 6144 --num-attention-heads 32
            --group-query-attention --num-query-groups 4 --kv-channels 128 --qk-layernorm
            --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
            --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0
            --no-position-embedding --untie-embeddings-and-output-weights
            --make-vocab-size-divisible-by 128)  # 151936 = 1187 x 128: the HF weights' rows
MOE_ARGS=(--num-experts 128 --moe-ffn-hidden-size 768 --moe-router-topk 8
          --moe-router-score-function softmax --moe-router-dtype fp32
          --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
          --moe-grouped-gemm --moe-token-dispatcher-type alltoall --moe-permute-fusion)
DATA_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
           --data-path "$DATA_PATH" --split 99990,8,2)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 512  # 2M tokens per step
               --train-iters 500000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine
               --lr-warmup-iters 2000 --lr-decay-iters 500000
               --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
               --bf16 --cross-entropy-loss-fusion
               --recompute-granularity selective --recompute-modules moe_act layernorm)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2
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
