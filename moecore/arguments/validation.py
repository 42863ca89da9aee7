"""Validation of parsed flags (Megatron's ``validate_args``) and the mapping to
:class:`~moecore.config.TransformerConfig`; ``--moe-layer-freq`` pattern parsing.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re

import torch

from moecore.arguments.checkpoint_args import apply_checkpoint_args
from moecore.arguments.config_flags import ConfigFieldError, transformer_config_from_args
from moecore.batch_rampup import rampup_from_args
from moecore.config import DEFAULT_RECOMPUTE_MODULES, check_recompute_modules
from moecore.data.tokenizers import TOKENIZER_TYPES, check_tokenizer_args
from moecore.pipeline_parallel.layout import pipeline_layer_layout
from moecore.transformer.recompute import DISCARD_RECOMPUTE_MODULES

# ---- --moe-layer-freq ------------------------------------------------------------------------
_MAX_PATTERN_LEN = 100_000


def _eval_pattern_node(node, text: str):
    if isinstance(node, ast.Expression):
        return _eval_pattern_node(node.body, text)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        return [_check_int(_eval_pattern_node(e, text), text) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_pattern_node(node.left, text), _eval_pattern_node(node.right, text)
        if isinstance(node.op, ast.Add):
            if isinstance(left, list) != isinstance(right, list):
                raise ValueError(f"moe-layer-freq pattern {text!r}: '+' joins two lists or two "
                                 "integers, not a list and an integer")
            out = left + right
        else:
            if isinstance(left, list) and isinstance(right, list):
                raise ValueError(f"moe-layer-freq pattern {text!r}: cannot multiply two lists")
            if isinstance(left, list) or isinstance(right, list):
                seq, n = (left, right) if isinstance(left, list) else (right, left)
                if len(seq) * n > _MAX_PATTERN_LEN:  # checked before building the list
                    raise ValueError(f"moe-layer-freq pattern {text!r} expands to "
                                     f"{len(seq) * n} entries (limit {_MAX_PATTERN_LEN})")
            out = left * right
        return out
    raise ValueError(
        f"moe-layer-freq pattern {text!r} may only contain integer lists, integers, '+', '*' "
        f"and parentheses (found {type(node).__name__}); e.g. '([0]*1+[1]*3)*4'")


def _check_int(v, text):
    if not isinstance(v, int) or v not in (0, 1):
        raise ValueError(f"moe-layer-freq pattern {text!r}: list entries must be 0 (dense) or "
                         f"1 (MoE), got {v!r}")
    return v


def parse_moe_layer_freq(value: int | str) -> int | list[int]:
    """Megatron's ``--moe-layer-freq``: an int ``N`` (every N-th layer is MoE, from layer 0) or a
    list expression such as ``([0]*1+[1]*3)*4`` giving 0/1 per layer.

    The expression is parsed with :mod:`ast` and only integer lists, integers, ``+`` and ``*``
    are evaluated (never ``eval``).
    """
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"moe-layer-freq {text!r} is neither an integer nor a list "
                             "pattern like '([0]*1+[1]*3)*4'") from None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"moe-layer-freq pattern {text!r} is not a valid expression: {e.msg}") \
            from None
    out = _eval_pattern_node(tree, text)
    if not isinstance(out, list):
        raise ValueError(f"moe-layer-freq pattern {text!r} must evaluate to a list")
    return out


def _moe_freq_type(value: str):
    try:
        return parse_moe_layer_freq(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- validation --------------------------------------------------------------------------------
def _not_supported_yet(args) -> None:
    if args.moe_token_dispatcher_type == "flex":
        raise ValueError("--moe-token-dispatcher-type flex (DeepEP) is not supported; use "
                         "alltoall, allgather or ipc")
    if args.tokenizer_type is not None and args.tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} is not supported; choose one "
                         f"of {list(TOKENIZER_TYPES)}")


# ---- value ranges ------------------------------------------------------------------------------
# Numeric flags where zero or negative values mean nothing (and crash later, or silently train
# something else: --num-layers 0 builds a model without layers); checked when set.
_AT_LEAST_1 = (
    "num_layers", "hidden_size", "num_attention_heads", "seq_length", "ffn_hidden_size",
    "kv_channels", "num_query_groups", "max_position_embeddings", "vocab_size",
    "make_vocab_size_divisible_by", "micro_batch_size", "global_batch_size", "train_iters",
    "train_samples", "log_interval", "save_interval", "eval_interval", "exit_interval",
    "exit_duration_in_mins", "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters",
    "lr_wsd_decay_samples", "num_experts", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_shared_expert_intermediate_size", "moe_router_num_groups", "moe_router_group_topk",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "distributed_timeout_minutes",
    "num_virtual_stages_per_pipeline_rank", "recompute_num_layers", "q_lora_rank",
    "kv_lora_rank", "qk_head_dim", "v_head_dim", "original_max_position_embeddings",
    "tensorboard_queue_size", "hysteresis",
)
_AT_LEAST_0 = (
    "eval_iters", "seed", "num_workers", "lr", "min_lr", "lr_warmup_init", "lr_warmup_iters",
    "lr_warmup_samples", "weight_decay", "start_weight_decay", "end_weight_decay", "clip_grad",
    "tensorboard_log_interval", "qk_pos_emb_head_dim", "mscale_all_dim",
    "tiktoken_num_special_tokens", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_input_jitter_eps", "moe_router_bias_update_rate", "profile_ranks",
)
_ABOVE_0 = (
    "norm_epsilon", "adam_eps", "init_method_std", "embedding_init_method_std", "rotary_base",
    "rotary_scaling_factor", "mscale", "loss_scale", "initial_loss_scale", "min_loss_scale",
    "loss_scale_window", "moe_expert_capacity_factor", "moe_router_topk_scaling_factor",
    "moe_ipc_buffer_max_mb", "peak_tflops", "activation_func_clamp_value",
)
# dest -> (low, high, low included, high included)
_INTERVALS = {"attention_dropout": (0, 1, True, False), "hidden_dropout": (0, 1, True, False),
              "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False),
              "rotary_percent": (0, 1, False, True), "lr_warmup_fraction": (0, 1, True, True)}


def _interval_text(low, high, low_in, high_in) -> str:
    return f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _range_problem(dest: str, value) -> str | None:
    """Why ``value`` is out of ``dest``'s range (None when it is fine)."""
    if not math.isfinite(value):
        return "must be a finite number"
    if dest in _AT_LEAST_1 and value < 1:
        return "must be >= 1"
    if dest in _AT_LEAST_0 and value < 0:
        return "must be >= 0"
    if dest in _ABOVE_0 and value <= 0:
        return "must be > 0"
    if dest in _INTERVALS:
        low, high, low_in, high_in = _INTERVALS[dest]
        if value < low or value > high or (value == low and not low_in) or \
                (value == high and not high_in):
            return f"must be in {_interval_text(*_INTERVALS[dest])}"
    return None


def _validate_ranges(args) -> None:
    """One-line errors for the numeric flags of the tables above (before anything divides by
    them)."""
    for dest in (*_AT_LEAST_1, *_AT_LEAST_0, *_ABOVE_0, *_INTERVALS):
        value = getattr(args, dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or isinstance(v, bool):
                continue
            problem = _range_problem(dest, v)
            if problem:
                raise ValueError(f"--{dest.replace('_', '-')} {v} {problem}")


def _validate_split(args) -> None:
    """``--split`` as 1 to 3 non-negative numbers (signs kept), and a validation share when
    ``--eval-iters`` asks for evaluation on ``--data-path`` data."""
    text = args.split
    try:
        values = [float(part) for part in re.split(r"[,/]", text)]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v >= 0 for v in values) \
            or sum(values) <= 0:
        raise ValueError(f"--split {text!r} must be 1 to 3 non-negative numbers "
                         "(train,valid,test) with a positive sum, e.g. 969,30,1")
    valid = values[1] if len(values) > 1 else 0.0
    if args.data_path and not args.mock_data and args.eval_iters > 0 and valid == 0:
        raise ValueError(f"--split {text!r} leaves the validation set empty but --eval-iters "
                         f"{args.eval_iters} asks for evaluation; give validation a share "
                         "(e.g. 969,30,1) or pass --eval-iters 0")


def _validate_model_shape(args) -> None:
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag.replace('_', '-')} is required")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if not args.add_position_embedding and args.position_embedding_type == "learned_absolute":
        args.position_embedding_type = "none"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and \
            args.max_position_embeddings < args.seq_length:
        raise ValueError(f"--max-position-embeddings {args.max_position_embeddings} is smaller "
                         f"than --seq-length {args.seq_length}")
    if args.ffn_hidden_size is None:
        # Megatron keeps SwiGLU's parameter count near 4h*h*2 with two input projections.
        args.ffn_hidden_size = (int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu
                                else 4 * args.hidden_size)
        if args.ffn_hidden_size == 0:
            raise ValueError(f"--swiglu with --hidden-size {args.hidden_size} gives "
                             "ffn_hidden_size 0 by Megatron's rule; pass --ffn-hidden-size")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by "
                         f"--num-attention-heads {args.num_attention_heads}; pass --kv-channels")
    if sum([args.swiglu, args.quick_geglu, args.squared_relu, args.openai_gelu]) > 1:
        raise ValueError("--swiglu, --quick-geglu, --squared-relu and --openai-gelu are "
                         "mutually exclusive")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.recompute_modules is not None:
        if args.recompute_granularity != "selective":
            raise ValueError("--recompute-modules applies only under --recompute-granularity "
                             "selective; pass it, or drop --recompute-modules")
        check_recompute_modules(args.recompute_modules)
    if args.mtp_num_layers is not None and args.mtp_num_layers < 1:
        raise ValueError(f"--mtp-num-layers {args.mtp_num_layers} must be >= 1; omit the flag "
                         "for no multi-token prediction")
    if args.mtp_num_layers is not None and args.mtp_loss_scaling_factor < 0:
        raise ValueError(f"--mtp-loss-scaling-factor {args.mtp_loss_scaling_factor} must be "
                         ">= 0")


def _validate_parallel(args, world_size: int) -> None:
    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline "
                         f"({pp}) x context ({cp}) parallel sizes = {tp * pp * cp}")
    if world_size % (etp * ep * pp):
        raise ValueError(f"world size {world_size} is not divisible by expert-tensor ({etp}) x "
                         f"expert-model ({ep}) x pipeline ({pp}) parallel sizes = "
                         f"{etp * ep * pp}; change --expert-model-parallel-size or the ranks")
    if ep > 1 and args.num_experts is None:
        raise ValueError(f"--expert-model-parallel-size {ep} needs --num-experts")
    if not args.distributed_timeout_minutes > 0:
        raise ValueError(f"--distributed-timeout-minutes {args.distributed_timeout_minutes} "
                         "must be > 0 (fractions such as 0.5 are allowed)")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # Megatron does the same: SP is a no-op at TP=1
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp * cp)
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if args.device == "cuda" else "gloo"


def _validate_context_parallel(args) -> None:
    """What context parallelism (:mod:`moecore.transformer.context_parallel`) can split."""
    cp = args.context_parallel_size
    if cp == 1:
        return
    if args.seq_length % (2 * cp):
        raise ValueError(f"--seq-length {args.seq_length} must be divisible by 2 x "
                         f"--context-parallel-size = {2 * cp} (the load-balanced split)")
    comm = args.cp_comm_type
    windowed = args.window_size is not None or args.softmax_type != "vanilla"
    if windowed and comm != "a2a":
        raise ValueError(f"--cp-comm-type {comm} does not support sliding windows or attention "
                         "sinks (--window-size, --softmax-type); use --cp-comm-type a2a")
    if comm == "p2p" and args.attention_dropout > 0:
        raise ValueError("--cp-comm-type p2p does not support --attention-dropout > 0; use "
                         "--attention-dropout 0 or --cp-comm-type all_gather / a2a")
    heads_per_tp = args.num_attention_heads // args.tensor_model_parallel_size
    if comm == "a2a" and heads_per_tp % cp:
        raise ValueError(f"--cp-comm-type a2a needs the attention heads per tensor-parallel rank "
                         f"({heads_per_tp}) divisible by --context-parallel-size {cp}; use "
                         "--cp-comm-type p2p or all_gather")
    if args.mtp_num_layers:
        raise ValueError("--mtp-num-layers with --context-parallel-size > 1 is not supported "
                         "(multi-token prediction shifts the whole sequence); use one of them")
    if args.cuda_graph_impl != "none":
        raise ValueError("--cuda-graph-impl with --context-parallel-size > 1 is not supported "
                         "(the ring's exchanges are not captured); drop one of them")


def _validate_pipeline_and_ddp(args) -> None:
    """Virtual/uneven pipeline stages and the distributed-optimizer flags."""
    pp = args.pipeline_model_parallel_size
    per_stage, chunks = (args.num_layers_per_virtual_pipeline_stage,
                         args.num_virtual_stages_per_pipeline_rank)
    if per_stage is not None and chunks is not None:
        raise ValueError("pass only one of --num-layers-per-virtual-pipeline-stage and "
                         "--num-virtual-stages-per-pipeline-rank")
    vp = chunks
    if per_stage is not None:
        uneven = (args.decoder_first_pipeline_num_layers is not None or
                  args.decoder_last_pipeline_num_layers is not None)
        if uneven:
            raise ValueError("with --decoder-first/last-pipeline-num-layers give the virtual "
                             "stages as --num-virtual-stages-per-pipeline-rank")
        if per_stage < 1 or args.num_layers % (pp * per_stage):
            raise ValueError(
                f"--num-layers {args.num_layers} must be a multiple of "
                f"--pipeline-model-parallel-size {pp} x --num-layers-per-virtual-pipeline-stage "
                f"{per_stage} = {pp * per_stage}")
        vp = args.num_layers // (pp * per_stage)
    if vp is not None and vp > 1 and pp < 2:
        raise ValueError("virtual pipeline stages (interleaved schedule) need "
                         "--pipeline-model-parallel-size >= 2")
    args.virtual_pipeline_model_parallel_size = vp if vp and vp > 1 else None
    pipeline_layer_layout(args.num_layers, pp, vp or 1, args.decoder_first_pipeline_num_layers,
                          args.decoder_last_pipeline_num_layers)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer (only the "
                         "distributed optimizer gathers parameters)")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ValueError(f"--ddp-bucket-size {args.ddp_bucket_size} must be >= 1")


def _validate_decoupled_lr(args) -> None:
    if args.decoupled_lr is None:
        if args.decoupled_min_lr is not None:
            raise ValueError("--decoupled-min-lr needs --decoupled-lr (the embedding and "
                             "output-layer peak learning rate); pass it or drop the flag")
        return
    low = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
    if not 0.0 <= low <= args.decoupled_lr or args.lr_warmup_init > args.decoupled_lr:
        raise ValueError(f"--decoupled-lr {args.decoupled_lr} must be >= its minimum ({low}, "
                         "--decoupled-min-lr or --min-lr) and the warmup start "
                         f"(--lr-warmup-init {args.lr_warmup_init}), all >= 0")


def _validate_rampup(args):
    """The ramp of ``--rampup-batch-size`` (None without it); every size it passes through
    must split into micro-batches the schedule takes."""
    ramp = rampup_from_args(args)
    if ramp is not None and args.virtual_pipeline_model_parallel_size:
        pp = args.pipeline_model_parallel_size
        bad = [size for size in ramp.sizes() if (size // ramp.unit) % pp]
        if bad:
            raise ValueError(f"--rampup-batch-size passes through global batches {bad}, whose "
                             "micro-batch counts are not multiples of "
                             f"--pipeline-model-parallel-size {pp} (interleaved schedule)")
    return ramp


def _validate_batch_and_schedule(args) -> None:
    _validate_decoupled_lr(args)
    if args.micro_batch_size is None:
        raise ValueError("--micro-batch-size is required")
    dp, mbs = args.data_parallel_size, args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    if args.global_batch_size % (mbs * dp):
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {mbs} x data-parallel size {dp} = {mbs * dp}; use a multiple "
            f"of {mbs * dp}")
    args.num_microbatches = args.global_batch_size // (mbs * dp)
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        raise ValueError(
            f"the interleaved pipeline schedule needs the number of micro-batches "
            f"(--global-batch-size {args.global_batch_size} / (--micro-batch-size {mbs} x "
            f"data-parallel size {dp}) = {args.num_microbatches}) to be a multiple of "
            f"--pipeline-model-parallel-size {pp}")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ValueError("pass exactly one of --train-iters and --train-samples")
    args.final_global_batch_size = args.global_batch_size
    if args.rampup_batch_size and args.train_samples is None:
        raise ValueError("--rampup-batch-size needs sample-based training (--train-samples "
                         "instead of --train-iters), as in Megatron")
    if args.lr is None:
        raise ValueError("--lr is required")
    if args.train_iters is not None:
        if args.lr_decay_iters is None:
            args.lr_decay_iters = args.train_iters
        if args.lr_warmup_samples:
            raise ValueError("--lr-warmup-samples goes with --train-samples; use "
                             "--lr-warmup-iters with --train-iters")
        if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
            raise ValueError("pass only one of --lr-warmup-fraction and --lr-warmup-iters")
    elif args.train_samples is not None:
        if args.lr_decay_samples is None:
            args.lr_decay_samples = args.train_samples
        if args.lr_warmup_iters:
            raise ValueError("--lr-warmup-iters goes with --train-iters; use "
                             "--lr-warmup-samples with --train-samples")
        if args.lr_warmup_fraction is not None and args.lr_warmup_samples:
            raise ValueError("pass only one of --lr-warmup-fraction and --lr-warmup-samples")
        args.train_iters = args.train_samples // args.global_batch_size  # Megatron floors
        ramp = _validate_rampup(args)
        if ramp is not None:
            args.train_iters = ramp.train_iters(args.train_samples)
        if args.train_iters < 1:
            raise ValueError(f"--train-samples {args.train_samples} is less than one global "
                             f"batch ({args.global_batch_size})")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay
    if args.weight_decay_incr_style == "constant" and \
            args.start_weight_decay != args.end_weight_decay:
        raise ValueError("--start-weight-decay and --end-weight-decay differ but "
                         "--weight-decay-incr-style is constant")
    if args.eval_interval is not None and args.eval_interval <= 0:
        raise ValueError(f"--eval-interval {args.eval_interval} must be > 0")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save DIR")


def _validate_precision_and_data(args) -> None:
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive")
    if args.loss_scale is not None and not args.fp16:
        raise ValueError("--loss-scale only applies with --fp16")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.attention_backend in ("flash", "fused") and args.device != "cuda":
        raise ValueError(f"--attention-backend {args.attention_backend} needs a CUDA GPU "
                         f"(--device {args.device}); use auto or unfused")
    if args.fp16 and args.device == "cpu":
        raise ValueError("--fp16 needs a GPU (fp16 matmuls on CPU are very slow and lossy); "
                         "use --bf16 or fp32 on CPU")
    _validate_precision_aware_optimizer(args)
    _validate_profiling(args)
    per_split = [f"--{s}-data-path" for s in ("train", "valid", "test")
                 if getattr(args, f"{s}_data_path")]
    if per_split and (args.data_path or args.mock_data):
        raise ValueError(f"{' / '.join(per_split)} replace --data-path and --split (and "
                         "--mock-data); pass one or the other")
    if per_split and not args.train_data_path:
        raise ValueError(f"{' / '.join(per_split)} given without --train-data-path; pass the "
                         "training data too")
    if not args.mock_data and not args.data_path and not per_split:
        raise ValueError("pass --data-path PREFIX (or weight/prefix pairs), --train-data-path "
                         "(with --valid-data-path / --test-data-path), or --mock-data")
    if args.tokenizer_type is None and not (args.mock_data and args.vocab_size):
        raise ValueError("pass --tokenizer-type (with --tokenizer-model/--vocab-file) or, with "
                         "--mock-data, --vocab-size")
    if args.tokenizer_type is not None:
        check_tokenizer_args(args)
    if args.split is None:
        args.split = "969, 30, 1"


def _validate_profiling(args) -> None:
    if args.use_pytorch_profiler and not args.profile:
        raise ValueError("--use-pytorch-profiler takes effect only with --profile; pass both")
    if args.profile or args.record_memory_history:
        if not 0 <= args.profile_step_start < args.profile_step_end:
            raise ValueError(f"--profile-step-start {args.profile_step_start} and "
                             f"--profile-step-end {args.profile_step_end}: need 0 <= start < end "
                             "(iterations start .. end - 1 are profiled)")
    if args.profile and args.use_pytorch_profiler and not (args.profile_dir
                                                           or args.tensorboard_dir):
        raise ValueError("--use-pytorch-profiler writes its traces to --profile-dir (or "
                         "--tensorboard-dir); pass one")
    if args.profile and not args.use_pytorch_profiler and args.device != "cuda":
        raise ValueError("--profile without --use-pytorch-profiler drives nsys through CUDA "
                         f"(--device {args.device}); add --use-pytorch-profiler")
    if args.record_memory_history and args.device != "cuda":
        raise ValueError("--record-memory-history records CUDA allocations; it needs "
                         f"--device cuda (got {args.device})")


def _validate_precision_aware_optimizer(args) -> None:
    dtype_flags = {"--exp-avg-dtype": args.exp_avg_dtype,
                   "--exp-avg-sq-dtype": args.exp_avg_sq_dtype,
                   "--main-grads-dtype": args.main_grads_dtype,
                   "--main-params-dtype": args.main_params_dtype}
    if not args.use_precision_aware_optimizer:
        changed = [f"{flag} {value}" for flag, value in dtype_flags.items() if value != "fp32"]
        if changed:
            raise ValueError(f"{', '.join(changed)} takes effect only with "
                             "--use-precision-aware-optimizer; pass it, or drop the flag")
        return
    for flag in ("--main-grads-dtype", "--main-params-dtype"):
        if dtype_flags[flag] != "fp32":
            raise ValueError(f"{flag} {dtype_flags[flag]} is not supported: moecore keeps fp32 "
                             "main params and accumulates fp32 main grads; use fp32 (the "
                             "default)")
    for flag in ("--exp-avg-dtype", "--exp-avg-sq-dtype"):
        if dtype_flags[flag] not in ("fp32", "bf16"):
            raise ValueError(f"{flag} {dtype_flags[flag]} is not supported (no scaled fp16/fp8 "
                             "moments here); use bf16 or fp32")


def _balancing_types(args) -> list[str]:
    """``--moe-router-load-balancing-type`` as a list (one type or several)."""
    types = args.moe_router_load_balancing_type
    return list(types) if isinstance(types, (list, tuple)) else [types]


def _validate_cuda_graph(args) -> None:
    """``--enable-cuda-graph`` / ``--cuda-graph-impl``: only ``local`` with the
    ``full_iteration`` scope (``moecore.training.cuda_graph``), and only for configurations
    whose training step it can capture."""
    if args.enable_cuda_graph and args.cuda_graph_impl == "none":
        args.cuda_graph_impl = "local"  # Megatron's deprecated spelling of the same
    if args.cuda_graph_impl == "transformer_engine":
        raise ValueError("--cuda-graph-impl transformer_engine (Transformer Engine's "
                         "make_graphed_callables) is not supported; use --cuda-graph-impl local")
    if args.cuda_graph_impl != "local":
        return
    flag = "--cuda-graph-impl local"
    if args.cuda_graph_scope != "full_iteration":
        raise ValueError(f"--cuda-graph-scope {args.cuda_graph_scope} (per-layer graphs) is not "
                         "supported: moecore captures whole micro-batches; use "
                         "--cuda-graph-scope full_iteration (the default)")
    if args.device != "cuda":
        raise ValueError(f"{flag} needs a CUDA device (--device {args.device}); drop the flag")
    sizes = {"--tensor-model-parallel-size": args.tensor_model_parallel_size,
             "--pipeline-model-parallel-size": args.pipeline_model_parallel_size,
             "--expert-model-parallel-size": args.expert_model_parallel_size,
             "--expert-tensor-parallel-size": args.expert_tensor_parallel_size or 1,
             "--context-parallel-size": args.context_parallel_size}
    for name, size in sizes.items():
        if size != 1:
            raise ValueError(f"{flag} supports data parallelism only so far: {name} {size} "
                             "(its collectives and host-side split sizes are not captured); "
                             f"drop {flag} or use {name} 1")
    problems = {
        "--fp16": (args.fp16, "its dynamic loss scale changes between steps; use --bf16"),
        "--recompute-granularity / --moe-layer-recompute": (
            args.moe_layer_recompute or args.recompute_granularity == "full" or (
                args.recompute_granularity == "selective" and not set(
                    DEFAULT_RECOMPUTE_MODULES if args.recompute_modules is None
                    else args.recompute_modules) <= set(DISCARD_RECOMPUTE_MODULES)),
            "checkpoint-style recompute saves and restores the CUDA RNG state; under "
            "--recompute-granularity selective only --recompute-modules "
            + " / ".join(DISCARD_RECOMPUTE_MODULES) + " are capturable"),
        "--calculate-per-token-loss": (
            args.calculate_per_token_loss,
            "its token count, which scales the loss, changes every step"),
        "--overlap-grad-reduce / --overlap-param-gather": (
            args.overlap_grad_reduce or args.overlap_param_gather,
            "their collectives start from Python hooks"),
        "--moe-expert-capacity-factor": (
            args.num_experts is not None and args.moe_expert_capacity_factor is not None,
            "token dropping sizes its buffers on the host; use dropless routing"),
        "--moe-router-load-balancing-type global_aux_loss and data parallelism": (
            args.num_experts is not None and "global_aux_loss" in _balancing_types(args)
            and args.data_parallel_size > 1,
            "it all-reduces the token counts over data parallel inside the forward; use "
            "aux_loss or seq_aux_loss"),
        "--moe-router-load-balancing-type sinkhorn": (
            args.num_experts is not None and "sinkhorn" in _balancing_types(args),
            "Sinkhorn iterates until a host-side convergence test"),
        "MoE without --moe-grouped-gemm": (
            args.num_experts is not None and not args.moe_grouped_gemm,
            "per-expert MLPs split tokens by host-side counts; pass --moe-grouped-gemm"),
        "MoE experts outside torch._grouped_mm (bf16 only)": (
            args.num_experts is not None and (
                not args.bf16 or args.moe_grouped_gemm_backend not in ("auto", "torch")),
            "the other grouped-GEMM backends size their GEMMs on the host; pass --bf16 and "
            "--moe-grouped-gemm-backend auto or torch"),
    }
    for what, (bad, why) in problems.items():
        if bad:
            raise ValueError(f"{flag} cannot capture the training step with {what}: {why}")
    if args.cuda_graph_warmup_steps < 1:
        raise ValueError(f"--cuda-graph-warmup-steps {args.cuda_graph_warmup_steps} must be >= 1 "
                         "(Triton kernels compile and self-check eagerly before a capture)")


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> argparse.Namespace:
    """Check cross-flag consistency and fill derived values, as Megatron's ``validate_args``.

    Sets ``world_size``, ``data_parallel_size``, ``num_microbatches``, default
    ``global_batch_size``, ``ffn_hidden_size``, ``max_position_embeddings``, ``lr_decay_*``,
    ``device``. Raises ``ValueError`` naming the flags and the fix.
    """
    if world_size is None:
        world_size = int(os.getenv("WORLD_SIZE", "1"))
    if args.use_checkpoint_args:
        apply_checkpoint_args(args)
    _validate_ranges(args)
    _not_supported_yet(args)
    _validate_model_shape(args)
    _validate_precision_and_data(args)
    _validate_split(args)
    _validate_parallel(args, world_size)
    _validate_context_parallel(args)
    _validate_pipeline_and_ddp(args)
    _validate_batch_and_schedule(args)
    _validate_cuda_graph(args)
    if args.num_experts is not None:
        if args.add_bias_linear and not args.moe_grouped_gemm:
            raise ValueError("expert biases (MoE without --disable-bias-linear) need "
                             "--moe-grouped-gemm; add it or pass --disable-bias-linear")
        pattern = args.moe_layer_freq
        if isinstance(pattern, list) and len(pattern) != args.num_layers:
            raise ValueError(f"--moe-layer-freq pattern has {len(pattern)} entries but "
                             f"--num-layers is {args.num_layers}")
    try:  # the config validates shapes against parallel sizes
        transformer_config_from_args(args)
    except ValueError as e:
        raise ConfigFieldError(str(e)) from e
    return args
