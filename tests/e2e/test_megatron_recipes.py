"""Megatron's DeepSeek-V3 recipe, scaled down, parses with Megatron's meanings and trains on CPU.

The recipe is Megatron-MoE-ModelZoo's ``model_configs/benchmarking/DeepSeek-V3.yaml`` (flags in
its order, ``${...}`` filled in) plus ``--moe-router-pre-softmax``, which Megatron-LM's
``examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-R1.sh`` passes with the sigmoid
router. Sizes are scaled down (``# scaled``). The flags in :data:`LEFT_OUT` stay out of the CPU
run; ``docs/megatron_recipes.md`` lists each of them with the reason.
"""

from __future__ import annotations

import os
import shlex

import pytest

from moecore.arguments import NOOP_FLAGS, build_parser, parse_args, transformer_config_from_args
from moecore.training import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEEPSEEK_V3 = """
    --distributed-timeout-minutes 60
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    --expert-model-parallel-size 1 --context-parallel-size 1 --expert-tensor-parallel-size 1
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --use-mcore-models --sequence-parallel --use-flash-attn --disable-bias-linear
    --micro-batch-size 1 --global-batch-size 4                               # scaled
    --train-samples 12 --exit-duration-in-mins 220                           # scaled
    --no-save-optim --no-check-for-nan-in-loss-and-grad
    --cross-entropy-loss-fusion --cross-entropy-fusion-impl native
    --manual-gc --manual-gc-interval 10
    --transformer-impl transformer_engine
    --seq-length 32                                                          # scaled
    --data-cache-path /tmp/moecore_data_cache
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model unsloth/DeepSeek-V3
    --data-path /data/dsv3_text_document --split 99,1,0
    --no-mmap-bin-files --no-create-attention-mask-in-dataloader --num-workers 0  # scaled
    --num-layers 3 --hidden-size 64 --ffn-hidden-size 128                    # scaled
    --num-attention-heads 4 --kv-channels 16                                 # scaled
    --max-position-embeddings 32                                             # scaled
    --position-embedding-type rope --rotary-base 10000
    --make-vocab-size-divisible-by 3232
    --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
    --untie-embeddings-and-output-weights
    --multi-latent-attention
    --attention-dropout 0.0 --hidden-dropout 0.0 --clip-grad 1.0 --weight-decay 0.1
    --qk-layernorm
    --lr-decay-samples 12 --lr-warmup-samples 4                              # scaled
    --lr-warmup-init 3.9e-7 --lr 3.9e-6 --min-lr 3.9e-7 --lr-decay-style cosine
    --adam-beta1 0.9 --adam-beta2 0.95
    --num-experts 32 --moe-layer-freq ([0]*1+[1]*2)                          # scaled
    --moe-ffn-hidden-size 16 --moe-shared-expert-intermediate-size 16       # scaled
    --moe-router-load-balancing-type seq_aux_loss --moe-router-topk 8 --moe-grouped-gemm
    --moe-aux-loss-coeff 1e-4 --moe-router-group-topk 4 --moe-router-num-groups 8
    --moe-router-topk-scaling-factor 2.5 --moe-router-score-function sigmoid
    --moe-router-pre-softmax
    --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 --moe-router-dtype fp32
    --moe-permute-fusion --moe-router-fusion
    --q-lora-rank 32 --kv-lora-rank 16 --qk-head-dim 16 --qk-pos-emb-head-dim 8  # scaled
    --v-head-dim 16 --rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0  # scaled
    --mtp-num-layers 1 --mtp-loss-scaling-factor 0.1
    --eval-iters 1 --eval-interval 2                                         # scaled
    --no-load-optim --no-load-rng --auto-detect-ckpt-format
    --load /ckpt/dsv3 --save /ckpt/dsv3 --save-interval 500 --dist-ckpt-strictness log_all
    --init-method-std 0.02
    --log-timers-to-tensorboard --log-memory-to-tensorboard --log-validation-ppl-to-tensorboard
    --log-throughput --log-interval 1 --logging-level 40
    --tensorboard-dir /out/tensorboard --wandb-project dsv3 --wandb-exp-name dsv3-cpu
    --bf16 --enable-experimental
"""

# Flag -> why the CPU run leaves it out (docs/megatron_recipes.md says the same).
LEFT_OUT = {
    "--data-path": "--mock-data here", "--split": "--mock-data here",
    "--cross-entropy-loss-fusion": "requires the Triton kernel, which needs CUDA",
    "--moe-permute-fusion": "requires the Triton kernels, which need CUDA",
    "--moe-router-fusion": "requires the Triton kernels, which need CUDA",
    "--dist-ckpt-strictness": "refused: moecore loads checkpoints strictly",
    "--wandb-project": "wandb is not installed here", "--wandb-exp-name": "wandb",
}
CPU = ["--mock-data", "--device", "cpu", "--seed", "1234"]
# The recipe names a hub tokenizer; the CPU run gets a tiny local one (no downloads), or, where
# transformers is not installed, none (mock data over --vocab-size ids).
HUB_TOKENIZER = "unsloth/DeepSeek-V3"
NO_TOKENIZER = ["--tokenizer-type", "--tokenizer-model"]


def tiny_hf_tokenizer(root) -> str | None:
    """A byte-level BPE of ~300 tokens saved with ``transformers`` in ``root``; None when
    ``tokenizers`` or ``transformers`` is missing."""
    try:
        import tokenizers
        import transformers
    except ImportError:
        return None
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                         eos_token="</s>").save_pretrained(str(root))
    return str(root)


def recipe_argv(text: str = DEEPSEEK_V3) -> list[str]:
    return shlex.split(text, comments=True)


def _drop(argv: list[str], flags) -> list[str]:
    """``argv`` without ``flags`` and their values."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a in flags
        if not skipping:
            out.append(a)
    return out


def cpu_argv(ckpt: str = "/ckpt/dsv3", extra=(), tokenizer: str | None = HUB_TOKENIZER,
             out: str = "/out") -> list[str]:
    """The recipe's CPU run, its checkpoints in ``ckpt``, TensorBoard under ``out``, the
    Hugging Face ``tokenizer`` (None: no tokenizer, mock data over 100 ids)."""
    argv = _drop(recipe_argv(), LEFT_OUT)
    if tokenizer is None:
        argv = _drop(argv, NO_TOKENIZER) + ["--vocab-size", "100"]
    swap = {"/ckpt/dsv3": ckpt, HUB_TOKENIZER: tokenizer, "/out/tensorboard": f"{out}/tensorboard"}
    return [swap.get(a, a) for a in argv] + CPU + list(extra)


def test_every_recipe_flag_is_accepted_or_documented():
    known = {o for a in build_parser()._actions for o in a.option_strings}
    flags = [a for a in recipe_argv() if a.startswith("--")]
    unknown = [f for f in flags if f not in known and f not in LEFT_OUT]
    assert not unknown, unknown
    assert set(LEFT_OUT) <= set(flags), set(LEFT_OUT) - set(flags)
    with open(os.path.join(REPO, "docs", "megatron_recipes.md")) as f:
        doc = f.read()
    missing = [f for f in [*LEFT_OUT, *(f for f in flags if f in NOOP_FLAGS)]
               if f"`{f}`" not in doc]
    assert not missing, f"docs/megatron_recipes.md does not list {missing}"


def test_recipe_parses_with_megatron_meanings():
    cfg = transformer_config_from_args(parse_args(cpu_argv()))
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_layer_freq) == (32, 8, [0, 1, 1])
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_pre_softmax
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (8, 4)
    assert cfg.moe_router_topk_scaling_factor == 2.5 and cfg.moe_router_enable_expert_bias
    assert cfg.moe_router_bias_update_rate == 1e-3 and cfg.moe_router_dtype == "fp32"
    assert cfg.moe_router_load_balancing_type == "seq_aux_loss"
    assert cfg.moe_aux_loss_coeff == 1e-4
    assert cfg.moe_shared_expert_intermediate_size == 16 and cfg.qk_layernorm
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.bf16
    assert cfg.multi_latent_attention and (cfg.q_lora_rank, cfg.kv_lora_rank) == (32, 16)
    assert (cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (16, 8, 16)
    # No --rope-type: YaRN, the default under MLA, at Megatron's original 4096 positions.
    assert (cfg.rope_type, cfg.rotary_scaling_factor) == (None, 40.0)
    assert (cfg.mscale, cfg.mscale_all_dim, cfg.original_max_position_embeddings) == \
        (1.0, 1.0, 4096)
    assert (cfg.mtp_num_layers, cfg.mtp_loss_scaling_factor) == (1, 0.1)


@pytest.mark.parametrize("extra,names", [
    ((), {"seq_load_balancing_loss"}),
    # Megatron-Core's list form: each type's loss with its own coefficient and name.
    (("--moe-router-load-balancing-type", "seq_aux_loss", "global_aux_loss",
      "--moe-aux-loss-coeff", "1e-4", "1e-3"),
     {"seq_load_balancing_loss", "global_load_balancing_loss"}),
])
def test_recipe_trains_on_cpu(extra, names, tmp_path):
    lines: list[str] = []
    tokenizer = tiny_hf_tokenizer(tmp_path / "tokenizer")
    s = pretrain(cpu_argv(str(tmp_path / "ckpt"), extra, tokenizer, str(tmp_path / "out")),
                 log=lines.append)
    assert s["iterations"] == [1, 2, 3], s["iterations"]
    assert all(0.0 < loss < 10.0 for loss in s["lm_loss"]), s["lm_loss"]
    assert 2 in s["val_loss"]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    for m in s["moe_losses"]:
        assert set(m) == names | {"mtp_1 loss"}, m
        # Near-balanced random routing: every balance loss is about 1 (its minimum value).
        assert all(0.5 < m[n] < 3.0 for n in names), m
        assert 0.0 < m["mtp_1 loss"] < 10.0, m  # the MTP depth's cross entropy, logged apart
    assert any("| seq_load_balancing_loss: " in line for line in lines)
    assert any("| mtp_1 loss: " in line for line in lines)
    if tokenizer is not None:  # the vocabulary is the tokenizer's, padded as the recipe asks
        assert any("tokenizer HuggingFaceTokenizer" in line and "padded to 3232" in line
                   for line in lines), [line for line in lines if "tokenizer" in line]
