"""``--use-checkpoint-args``: the flags that describe a model and its layout
(:data:`MODEL_DESTS`, :data:`PARALLEL_DESTS`, also the flags ``tools/checkpoint`` prints for a
converted model) taken from the args saved with ``--load``'s latest checkpoint; and the resume
check (:func:`check_checkpoint_args`, Megatron's) that the model flags match that checkpoint."""

from __future__ import annotations

import argparse

from moecore.checkpointing import CheckpointError, args_to_dict, read_checkpoint_args

# Flags printed for a converted model, in this order: the model, then its layout and precision.
MODEL_DESTS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
    "group_query_attention", "num_query_groups", "max_position_embeddings",
    "position_embedding_type", "rotary_base", "rotary_percent", "normalization", "norm_epsilon",
    "qk_layernorm", "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
    "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor", "mscale",
    "mscale_all_dim", "original_max_position_embeddings",
    "swiglu", "squared_relu", "openai_gelu", "add_bias_linear", "add_qkv_bias",
    "quick_geglu", "glu_linear_offset", "activation_func_clamp_value", "softmax_type",
    "window_size", "window_attn_skip_freq", "yarn_correction_range_round_to_int",
    "untie_embeddings_and_output_weights", "apply_residual_connection_post_layernorm",
    "make_vocab_size_divisible_by", "init_method_std", "attention_dropout", "hidden_dropout",
    "num_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_topk",
    "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
    "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_input_jitter_eps", "moe_grouped_gemm", "mtp_num_layers",
    "qk_layernorm_hidden_dim",
)
PARALLEL_DESTS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "num_virtual_stages_per_pipeline_rank", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "sequence_parallel", "use_tp_pp_dp_mapping", "bf16", "fp16",
)

# Filled from the checkpoint only where the command line left them unset (None).
_CHECKPOINT_DEFAULTS = ("seq_length", "tokenizer_type", "tokenizer_model", "vocab_file",
                        "merge_file", "vocab_size", "tiktoken_pattern", "tiktoken_special_tokens")


def apply_checkpoint_args(args: argparse.Namespace) -> dict:
    """``--use-checkpoint-args`` (Megatron's): the model's shape and layout come from the args
    saved with ``--load``'s latest checkpoint, overriding the command line (the flags
    ``tools/checkpoint`` prints for a model, :data:`MODEL_DESTS` and
    ``PARALLEL_DESTS``); sequence length and tokenizer fill in only where unset. Returns the
    values taken."""
    if not args.load:
        raise ValueError("--use-checkpoint-args reads the checkpoint in --load; pass --load DIR")
    saved = read_checkpoint_args(args.load)
    taken = {}
    for dest in MODEL_DESTS + PARALLEL_DESTS + _CHECKPOINT_DEFAULTS:
        if dest not in saved:
            continue
        if dest in _CHECKPOINT_DEFAULTS and getattr(args, dest) is not None:
            continue
        setattr(args, dest, saved[dest])
        taken[dest] = saved[dest]
    args.checkpoint_args_taken = taken
    return taken


# Model flags that may change on resume: training hyperparameters, not the model's structure.
_RESUME_MAY_CHANGE = ("init_method_std", "attention_dropout", "hidden_dropout",
                      "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                      "moe_input_jitter_eps")
# ... and, under --finetune, the context-extension ones (longer positions, rescaled RoPE).
_FINETUNE_MAY_CHANGE = ("max_position_embeddings", "rotary_base", "rotary_scaling_factor",
                        "mscale", "mscale_all_dim", "original_max_position_embeddings")
RESUME_CHECKED_DESTS = tuple(d for d in MODEL_DESTS if d not in _RESUME_MAY_CHANGE) + (
    "padded_vocab_size",)
_FLAG_OF = {"add_position_embedding": "--no-position-embedding (add_position_embedding)",
            "add_bias_linear": "--disable-bias-linear (add_bias_linear)",
            "yarn_correction_range_round_to_int":
                "--no-yarn-correction-range-round-to-int (yarn_correction_range_round_to_int)",
            "padded_vocab_size": "the padded vocabulary (--vocab-size / tokenizer and "
                                 "--make-vocab-size-divisible-by)"}


def _flag(dest: str) -> str:
    return _FLAG_OF.get(dest, "--" + dest.replace("_", "-"))


def checkpoint_args_mismatch(args: argparse.Namespace, saved: dict) -> list[str]:
    """``"--flag this-run (checkpoint: saved)"`` for each :data:`RESUME_CHECKED_DESTS` value of
    ``args`` that differs from the checkpoint's ``saved`` args (dests the checkpoint does not
    record are skipped; ``--finetune`` may change the context-extension flags)."""
    skip = _FINETUNE_MAY_CHANGE if getattr(args, "finetune", False) else ()
    dests = [d for d in RESUME_CHECKED_DESTS if d in saved and d not in skip and hasattr(args, d)]
    ours = args_to_dict(argparse.Namespace(**{d: getattr(args, d) for d in dests}))
    return [f"{_flag(d)} {ours[d]} (checkpoint: {saved[d]})" for d in dests
            if ours[d] != saved[d]]


def check_checkpoint_args(args: argparse.Namespace, saved: dict | None, load: str) -> None:
    """Megatron's ``check_checkpoint_args``: raise ``CheckpointError`` when the model flags
    differ from those saved with ``--load``'s checkpoint (``saved``: its args, None to skip),
    naming each flag with both values. A changed head count or expert count keeps parameter
    shapes but changes the model, so loading would silently give another network."""
    if not saved:
        return
    diffs = checkpoint_args_mismatch(args, saved)
    if diffs:
        raise CheckpointError(f"the model flags differ from the checkpoint in --load {load}: "
                              f"{'; '.join(diffs)}; pass --use-checkpoint-args to take the "
                              "checkpoint's, or the checkpoint's values")
