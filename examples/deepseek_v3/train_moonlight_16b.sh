#!/bin/bash
# A Moonlight-16B-A3B-shaped model (16B total, 3B active per token: the DeepSeek-V3 architecture
# at small scale) in Megatron-LM's flags, on one node of 8 GPUs. Shape as Hugging Face's
# moonshotai/Moonlight-16B-A3B config.json: 27 layers (the first dense), hidden 2048, 16 heads of
# Multi-Latent Attention without a query LoRA (kv latent 512, qk 128 + rope 64, v 128), plain
# RoPE (base 50000, 8192 positions), 64 routed experts top-6 plus 2 shared, sigmoid routing with
# expert bias and scaling factor 2.446, no expert groups, sequence aux loss, no MTP, untied
# embeddings, vocabulary 163840.
#
# Parallel layout: 8 GPUs (80 GB), TP=1, PP=1, EP=8 inside DP=8: 8 experts per GPU
#   (~1.8B routed-expert parameters per GPU, ~1.6B others (embeddings included) replicated, their optimizer state
#   sharded over DP by the distributed optimizer). Selective recompute of MLA's
#   up-projections, the experts' activation and the norms keeps sequences of 8192 in memory.
#   For more nodes raise DP (NNODES), keeping EP=8 inside a node.
# Moonlight itself was trained with the Muon optimizer; moecore's optimizer is AdamW.
#
# Usage:  NNODES=1 bash examples/deepseek_v3/train_moonlight_16b.sh CKPT_DIR TOKENIZER DATA_PREFIX
# TOKENIZER: a local copy of moonshotai/Moonlight-16B-A3B's tokenizer files (tiktoken-based,
# whose code transformers runs: hence --trust-remote-code; it needs `pip install tiktoken`) or
# the hub name.
# DRY_RUN=1 prints pretrain_gpt.py's arguments, one a line, instead of launching.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

CHECKPOINT_PATH=${1:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
TOKENIZER_MODEL=${2:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
DATA_PATH=${3:?usage: $0 CKPT_DIR TOKENIZER DATA_PREFIX}
shift 3

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
MODEL_ARGS=(--use-mcore-models --disable-bias-linear --seq-length 8192
            --max-position-embeddings 8192 --num-layers 27 --hidden-size 2048
            --ffn-hidden-size 11264 --num-attention-heads 16 --init-method-std 0.02
            --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
            --qk-layernorm  # MLA: RMSNorm on the kv latent
            --position-embedding-type rope --rotary-base 50000 --no-position-embedding
            --untie-embeddings-and-output-weights
            --make-vocab-size-divisible-by 128)  # 163840 tokens, the HF weights' rows
MLA_ARGS=(--multi-latent-attention --kv-lora-rank 512 --qk-head-dim 128
          --qk-pos-emb-head-dim 64 --v-head-dim 128 --rope-type rope)
MOE_ARGS=(--num-experts 64 --moe-layer-freq '([0]*1+[1]*26)' --moe-ffn-hidden-size 1408
          --moe-shared-expert-intermediate-size 2816 --moe-router-topk 6  # 2 shared x 1408
          --moe-router-score-function sigmoid --moe-router-topk-scaling-factor 2.446
          --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
          --moe-router-dtype fp32 --moe-router-load-balancing-type seq_aux_loss
          --moe-aux-loss-coeff 1e-3 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
          --moe-permute-fusion)
DATA_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
           --trust-remote-code --data-path "$DATA_PATH" --split 99990,8,2)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 512  # 4M tokens per step
               --train-iters 500000 --lr 4.2e-4 --min-lr 4.2e-5 --lr-decay-style cosine
               --lr-warmup-iters 2000 --lr-decay-iters 500000
               --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
               --bf16 --cross-entropy-loss-fusion
               --recompute-granularity selective
               --recompute-modules mla_up_proj moe_act layernorm)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
                     --expert-model-parallel-size 8 --expert-tensor-parallel-size 1
                     --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
LOGGING_ARGS=(--log-interval 1 --save-interval 1000 --eval-interval 1000 --eval-iters 10
              --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
              --tensorboard-dir "$CHECKPOINT_PATH/tensorboard")
ARGS=("${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}"
      "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py "${ARGS[@]}"
