#!/bin/bash
# DeepSeek-V3 (671B total, 37B active per token) pretraining at real size in Megatron-LM's flags.
# Shape as Hugging Face's deepseek-ai/DeepSeek-V3 config.json: 61 layers (the first 3 dense),
# hidden 7168, 128 heads of Multi-Latent Attention, 256 routed experts top-8 (8 groups, 4
# picked) plus 1 shared, sigmoid routing with expert bias, one multi-token-prediction depth.
#
# Parallel layout: 1024 GPUs = 128 nodes x 8 (H100/H200 80+ GB):
#   TP=1   MLA's down-projections are replicated over TP (Megatron's split), and at TP=1 the
#          128 heads need no all-reduce per layer; the model fits without it (below).
#   PP=16  61 layers as 4 + 14 x 4 + 1: the first stage also holds the embedding, the last
#          stage also holds the MTP block and the output head, so they take fewer layers.
#   EP=64  256 experts, 4 per GPU; expert parallel spans 8 nodes (alltoall dispatcher), inside
#          data parallel (DP = 1024 / (TP x PP) = 64), so every GPU holds 4 of each MoE
#          layer's experts: ~0.7B routed-expert parameters per GPU, ~1B others.
#   Distributed optimizer: the non-expert weights' fp32 master copy and Adam moments are sharded
#          over DP=64 (the experts' expert-data-parallel size is 1: they keep their own).
#   Full recompute of each layer: 1F1B keeps up to 16 micro-batches in flight on the first
#          stage, and one MLA + MoE layer's activations at 4096 tokens (128 heads of q/k 192,
#          8 experts per token) are several GB; with recompute only each layer's input stays
#          (4096 x 7168 bf16, 56 MiB). On 141 GB H200s try instead
#          --recompute-granularity selective --recompute-modules mla_up_proj moe_act layernorm.
# Batch: DeepSeek-V3's ramp from 3072 to 15360 sequences of 4096 over the first 469B tokens,
# 14.8T tokens in all (samples below); lr 2.2e-4 with a cosine decay to 2.2e-5.
#
# Usage (on every node):
#   MASTER_ADDR=<node 0> NNODES=128 NODE_RANK=<this node> \
#     bash examples/deepseek_v3/train_deepseek_v3_671b.sh CKPT_DIR TOKENIZER DATA_PREFIX
# TOKENIZER: a local copy of deepseek-ai/DeepSeek-V3's tokenizer files (or the hub name);
# DATA_PREFIX: tools/preprocess_data.py output made with the same tokenizer. To start from the
# released weights, convert them first (tools/checkpoint/convert.py, see
# docs/checkpoint_conversion.md) and pass --finetune.
# DRY_RUN=1 prints pretrain_gpt.py's arguments, one a line, instead of launching.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-128}
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
            --max-position-embeddings 163840  # = 40 x 4096 (YaRN)
            --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432
            --num-attention-heads 128 --init-method-std 0.006
            --attention-dropout 0.0 --hidden-dropout 0.0
            --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
            --qk-layernorm  # MLA: RMSNorm on the q and kv latents
            --position-embedding-type rope --rotary-base 10000 --no-position-embedding
            --untie-embeddings-and-output-weights
            --make-vocab-size-divisible-by 3232)  # 128815 tokens -> 129280, the HF weights' rows
MLA_ARGS=(--multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128
          --qk-pos-emb-head-dim 64 --v-head-dim 128
          --rope-type yarn --rotary-scaling-factor 40 --original-max-position-embeddings 4096
          --mscale 1.0 --mscale-all-dim 1.0)
MOE_ARGS=(--num-experts 256 --moe-layer-freq '([0]*3+[1]*58)' --moe-ffn-hidden-size 2048
          --moe-shared-expert-intermediate-size 2048 --moe-router-topk 8
          --moe-router-num-groups 8 --moe-router-group-topk 4
          --moe-router-score-function sigmoid --moe-router-topk-scaling-factor 2.5
          --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
          --moe-router-dtype fp32 --moe-router-load-balancing-type seq_aux_loss
          --moe-aux-loss-coeff 1e-4 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
          --moe-permute-fusion)
MTP_ARGS=(--mtp-num-layers 1 --mtp-loss-scaling-factor 0.1)
DATA_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
           --data-path "$DATA_PATH" --split 99990,8,2)
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 15360
               --rampup-batch-size 3072 768 114500000  # 469B tokens / 4096
               --train-samples 3613281250              # 14.8T tokens / 4096
               --lr 2.2e-4 --min-lr 2.2e-5 --lr-decay-style cosine
               --lr-warmup-samples 6144000 --lr-decay-samples 3613281250
               --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
               --bf16 --cross-entropy-loss-fusion
               --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 16
                     --decoder-first-pipeline-num-layers 4 --decoder-last-pipeline-num-layers 1
                     --expert-model-parallel-size 64 --expert-tensor-parallel-size 1
                     --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
                     --distributed-timeout-minutes 60)
LOGGING_ARGS=(--log-interval 1 --save-interval 1000 --eval-interval 1000 --eval-iters 10
              --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
              --tensorboard-dir "$CHECKPOINT_PATH/tensorboard")
ARGS=("${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${MTP_ARGS[@]}" "${DATA_ARGS[@]}"
      "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
cd "$(dirname "$0")/../.."
exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py "${ARGS[@]}"
