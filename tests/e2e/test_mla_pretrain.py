"""End-to-end ``pretrain`` on CPU of a tiny MoE GPT with multi-latent attention (q LoRA, YaRN,
``mla_up_proj`` and ``core_attn`` recompute) on --mock-data: the loss falls."""

from moecore.training import pretrain

MLA_FLAGS = ("--multi-latent-attention --q-lora-rank 12 --kv-lora-rank 10 --qk-head-dim 8 "
             "--qk-pos-emb-head-dim 4 --v-head-dim 6 --qk-layernorm --position-embedding-type "
             "rope").split()


def test_gpt_model_with_mla_trains_on_cpu():
    argv = MLA_FLAGS + ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 "
            "--ffn-hidden-size 64 --seq-length 16 --max-position-embeddings 16 "
            "--normalization RMSNorm --swiglu --disable-bias-linear "
            "--untie-embeddings-and-output-weights --num-experts 4 --moe-router-topk 2 "
            "--moe-ffn-hidden-size 32 --mock-data --vocab-size 15 --micro-batch-size 2 "
            "--global-batch-size 8 --lr 1e-2 --lr-warmup-iters 1 --train-iters 10 "
            "--log-interval 5 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 "
            "--rope-type yarn --rotary-scaling-factor 4 --mscale-all-dim 0.7 "
            "--original-max-position-embeddings 8 --recompute-granularity selective "
            "--recompute-modules mla_up_proj core_attn --device cpu --num-workers 0 "
            "--seed 1234").split()
    s = pretrain(argv, log=lambda _: None)
    assert s["final_iteration"] == 10
    assert sum(s["lm_loss"][-3:]) / 3 < s["lm_loss"][0] - 0.3, s["lm_loss"]
