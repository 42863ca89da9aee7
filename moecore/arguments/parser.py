"""Argparse parser of ``pretrain_gpt.py``: Megatron-LM's flag names, defaults and groups.

Three kinds of Megatron flags exist here:

* supported flags behave as in Megatron-LM;
* :data:`NOOP_FLAGS` are accepted and harmless: they select a Megatron kernel or fusion that has
  no counterpart here (or is always on), so the run is the same with or without them. They are
  listed in ``--help`` with ``[no effect in moecore]`` and reported once at start-up;
* :data:`UNSUPPORTED_FLAGS` are Megatron features we do not implement: using one stops parsing
  with a message naming the flag. Any other unknown flag fails as argparse does.
"""

from __future__ import annotations

import argparse
import os
import sys

from moecore.arguments.config_flags import ConfigFieldError, field_flags, name_flags_in_error
from moecore.arguments.validation import _moe_freq_type, validate_args
from moecore.config import (
    ATTENTION_BACKENDS,
    DISPATCHER_TYPES,
    FP8_AMAX_COMPUTE_ALGOS,
    FP8_CAST_BACKENDS,
    FP8_FORMATS,
    FP8_GEMM_BACKENDS,
    FP8_RECIPES,
    GROUPED_GEMM_BACKENDS,
    KERNEL_BACKENDS,
    NORM_BACKENDS,
)
from moecore.kernels.optim import ADAMW_BACKENDS

UNSUPPORTED_FLAGS: dict[str, str] = {
    "--fp8-param-gather": "FP8 parameters in the all-gather (moecore keeps bf16 weights and "
                          "casts them per GEMM)", "--fp4-format": "FP4 training",
    "--tp-comm-overlap": "TP communication/GEMM overlap (Transformer Engine userbuffers)",
    "--moe-extended-tp": "deprecated in Megatron; use --expert-tensor-parallel-size",
    "--moe-enable-deepep": "DeepEP dispatch", "--moe-use-upcycling": "dense-to-MoE upcycling",
    "--moe-router-padding-for-fp8": "padding the routing map for FP8 (moecore's FP8 grouped "
                                    "GEMMs take any token counts)",
    "--overlap-moe-expert-parallel-comm": "batch-level EP overlap",
    "--delay-wgrad-compute": "delayed wgrad",
    "--use-torch-fsdp2": "FSDP", "--use-megatron-fsdp": "FSDP",
    "--yaml-cfg": "YAML configs", "--spec": "custom module specs",
    "--retro-project-dir": "Retro", "--cpu-offloading-num-layers": "activation CPU offload",
    "--optimizer-cpu-offload": "optimizer CPU offload",
    "--external-cuda-graph": "Transformer Engine CUDA graphs; use --cuda-graph-impl local",
    "--use-legacy-models": "legacy (non-core) models",
    "--is-hybrid-model": "hybrid Mamba models", "--hybrid-override-pattern": "hybrid models",
    "--heterogeneous-layers-config-path": "heterogeneous layers",
    "--data-parallel-random-init": "per-DP-rank random init",
    "--init-method-xavier-uniform": "Xavier init",
    "--apply-query-key-layer-scaling": "QK layer scaling",
    "--fp32-residual-connection": "fp32 residual stream",
    "--reset-position-ids": "per-document position ids",
    "--reset-attention-mask": "per-document attention masks",
    "--use-rope-scaling": "llama3 rope scaling", "--rotary-interleaved": "interleaved rope",
    "--rotary-seq-len-interpolation-factor": "rope interpolation",
    "--no-rope-freq": "per-layer no-rope patterns", "--sgd-momentum": "the SGD optimizer",
    "--dist-ckpt-strictness": "lenient checkpoint loading (moecore loads strictly and stops at "
                              "any missing or unexpected key)",
}

NOOP_FLAGS: list[str] = []  # filled by _noop(); each is accepted and changes nothing here

# Megatron's choices for --tokenizer-type; the ones moecore builds are in data.tokenizers.
_MEGATRON_TOKENIZERS = ("BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer",
                        "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                        "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                        "MultimodalTokenizer", "NullTokenizer", "CharacterTokenizer")


class _Unsupported(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        kw.pop("nargs", None)
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is a Megatron-LM flag that moecore does not support "
                     f"({UNSUPPORTED_FLAGS[option_string]}); remove it from the command line")


class _OneOrList(argparse.Action):
    """``nargs="+"`` that keeps Megatron's single-value form: one value is stored as itself,
    several as a list (``--moe-router-load-balancing-type``, ``--moe-aux-loss-coeff``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def _noop(group, flag: str, why: str, **kw) -> None:
    NOOP_FLAGS.append(flag) if flag not in NOOP_FLAGS else None
    kw.setdefault("action", "store_true")
    group.add_argument(flag, help=f"[no effect in moecore] {why}", **kw)


# ---- parser ------------------------------------------------------------------------------------
def _add_network_size_args(p):
    g = p.add_argument_group(title="network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="FFN hidden size; 4*hidden (or Megatron's 8/3 rule with --swiglu).")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None,
                   help="Per-head dimension; hidden_size // num_attention_heads if unset.")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Deprecated alias of --position-embedding-type rope.")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding",
                   help="Disable learned absolute position embeddings (rope is unaffected).")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--qk-layernorm-hidden-dim", action="store_true",
                   help="moecore (FlagScale's Megatron fork's name): with --qk-layernorm, one "
                        "RMSNorm over the whole q and k projections instead of per head "
                        "(OLMoE).")
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="tanh-approximated GeLU.")
    g.add_argument("--squared-relu", action="store_true")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--quick-geglu", action="store_true",
                   help="Gated MLP with x * sigmoid(1.702 x) (gpt-oss's experts).")
    g.add_argument("--activation-func-clamp-value", type=float, default=None,
                   help="Gated MLPs: clamp the gate input to <= c and the linear input to "
                   "[-c, c] (gpt-oss: 7).")
    g.add_argument("--glu-linear-offset", type=float, default=0.0,
                   help="Gated MLPs: act(gate) * (up + offset) (gpt-oss: 1).")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                   help="SDPA kernel: auto (PyTorch's pick: cuDNN on Hopper), flash "
                   "(FlashAttention-2), fused (cuDNN fused attention, TE's 'fused'), unfused / "
                   "local (the math reference, any device).")
    _noop(g, "--apply-layernorm-1p", "(accepted for scripts; LayerNorm is standard here)")
    g.add_argument("--mtp-num-layers", type=int, default=None,
                   help="Multi-token prediction depths (DeepSeek-V3): each adds one transformer "
                        "layer on the last pipeline stage predicting one token further ahead.")
    g.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1,
                   help="Weight of the MTP losses: the objective adds factor / mtp-num-layers "
                        "times their sum; they are logged apart as 'mtp_<k> loss'.")
    _add_mla_args(p)
    _add_attention_variant_args(p)


def _window_size(value: str) -> tuple[int, int]:
    parts = value.strip("()[] ").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--window-size {value!r}: give LEFT,RIGHT (e.g. 128,0)")
    return int(parts[0]), int(parts[1])


def _add_attention_variant_args(p):
    g = p.add_argument_group(title="attention variants (gpt-oss)")
    g.add_argument("--softmax-type", default="vanilla",
                   choices=["vanilla", "off-by-one", "learnable"],
                   help="learnable: one learned logit per head in the softmax denominator "
                   "(attention sinks); off-by-one: a fixed zero logit there.")
    g.add_argument("--window-size", type=_window_size, default=None,
                   help="Sliding-window attention LEFT,0: query i sees keys i-LEFT..i.")
    g.add_argument("--window-attn-skip-freq", type=_moe_freq_type, default=None,
                   help="Under --window-size: every N-th layer keeps full attention, or a "
                   "per-layer pattern like [1,0]*12 (1 = windowed).")
    g.add_argument("--no-yarn-correction-range-round-to-int", action="store_false",
                   dest="yarn_correction_range_round_to_int",
                   help="YaRN: keep the ramp bounds fractional (gpt-oss).")
    _noop(g, "--enable-gpt-oss", "gpt-oss's layers are set by their own flags (--softmax-type, "
          "--window-size, --quick-geglu, ...)")
    _noop(g, "--export-force-local-attention", "there is no Transformer Engine attention to "
          "force off")


def _add_mla_args(p):
    g = p.add_argument_group(title="multi-latent attention")
    g.add_argument("--multi-latent-attention", action="store_true",
                   help="Multi-Latent Attention (DeepSeek-V2/V3) instead of GQA; needs "
                   "--kv-lora-rank and --position-embedding-type rope.")
    g.add_argument("--q-lora-rank", type=int, default=None,
                   help="Rank of the query latent; unset: a plain query projection.")
    g.add_argument("--kv-lora-rank", type=int, default=None,
                   help="Rank of the key/value latent (required with MLA; Megatron defaults "
                   "it to 32).")
    g.add_argument("--qk-head-dim", type=int, default=128,
                   help="Per-head query/key dimension without position embedding.")
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=64,
                   help="Per-head query/key dimension that RoPE rotates (decoupled RoPE).")
    g.add_argument("--v-head-dim", type=int, default=128, help="Per-head value dimension.")
    g.add_argument("--rope-type", default=None, choices=["rope", "yarn"],
                   help="RoPE variant; unset: yarn under MLA (plain RoPE at "
                   "--rotary-scaling-factor 1), rope otherwise.")
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0,
                   help="YaRN context extension factor.")
    g.add_argument("--mscale", type=float, default=1.0, help="YaRN mscale (rotary magnitude).")
    g.add_argument("--mscale-all-dim", type=float, default=0.0,
                   help="YaRN mscale_all_dim (rotary magnitude divisor, softmax scale).")
    g.add_argument("--original-max-position-embeddings", type=int, default=None,
                   help="YaRN: the pretraining context length (default 4096, as Megatron's "
                   "MLA config).")


def _add_regularization_args(p):
    g = p.add_argument_group(title="regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="Clip the global L2 gradient norm to this value (0 disables).")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)


def _add_training_args(p):
    g = p.add_argument_group(title="training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "SAMPLES"),
                   help="Grow the global batch from START by INCREMENT over SAMPLES consumed "
                        "samples up to --global-batch-size (needs --train-samples).")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Multiple of micro-batch-size x data-parallel size; defaults to their "
                        "product (one micro-batch per step).")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="The loss is the sum over the global batch's unmasked tokens divided by "
                        "their number (all micro-batches and data-parallel ranks), not the mean "
                        "of per-micro-batch means; the MoE aux losses are scaled the same way, "
                        "as in Megatron.")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Shorthand for --recompute-granularity selective.")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None, metavar="MODULE",
                   help="Under --recompute-granularity selective: the submodules to recompute "
                        "(default core_attn): core_attn, moe_act (the experts' activation "
                        "output), layernorm (the two norm outputs of each layer), mlp (dense "
                        "MLPs), moe (the MoE MLP), shared_experts, mla_up_proj (MLA's "
                        "up-projections and RoPE, freed after attention). moe_act and "
                        "layernorm free one tensor and recompute it bit-identically (CUDA-graph "
                        "safe); the others checkpoint the module.")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Exit after an iteration divisible by this value (saving first).")
    g.add_argument("--exit-duration-in-mins", type=int, default=None)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--optimizer", default="adam", choices=["adam"])
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad")
    g.add_argument("--empty-unused-memory-level", type=int, default=0, choices=[0, 1, 2])
    g.add_argument("--deterministic-mode", action="store_true",
                   help="torch.use_deterministic_algorithms(True).")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="(moecore) Where to train; cuda when available.")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="(moecore) Peak TFLOP/s per device for MFU; a table by GPU name if unset.")
    g.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion",
                   help="Unfused SwiGLU in the expert MLPs (default: a fused Triton kernel on "
                   "CUDA).")
    g.add_argument("--no-rope-fusion", action="store_false", dest="apply_rope_fusion",
                   help="Unfused RoPE (default: a fused Triton kernel on CUDA).")
    g.add_argument("--cuda-graph-impl", default="none",
                   choices=["none", "local", "transformer_engine"],
                   help="local: capture each training micro-batch's forward-backward (and the "
                   "evaluation forward) in a CUDA graph after the warm-up iterations and replay "
                   "it (one GPU or data parallel; see moecore.training.cuda_graph).")
    g.add_argument("--enable-cuda-graph", action="store_true",
                   help="Megatron's older spelling of --cuda-graph-impl local.")
    g.add_argument("--cuda-graph-scope", default="full_iteration",
                   choices=["full", "attn", "full_iteration"],
                   help="What one graph holds; moecore captures whole micro-batches "
                   "(full_iteration) only.")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="Eager training iterations before the first capture.")
    for flag, why in [
        ("--use-mcore-models", "moecore models are the Megatron-Core ones"),
        ("--no-masked-softmax-fusion", "attention uses torch SDPA, no masked-softmax kernel"),
        ("--no-bias-gelu-fusion", "no fused bias-gelu kernel here"),
        ("--no-bias-dropout-fusion", "no fused bias-dropout kernel here"),
        ("--no-gradient-accumulation-fusion", "grads always accumulate in fp32 main grads"),
        ("--no-async-tensor-model-parallel-allreduce", "deprecated in Megatron too"),
        ("--no-persist-layer-norm", "no persistent layer-norm kernel here"),
        ("--use-flash-attn", "SDPA picks its fastest kernel (cuDNN on Hopper); "
         "--attention-backend flash pins FlashAttention-2"),
        ("--manual-gc", "Python's default GC is used"),
        ("--use-cpu-initialization", "weights are always drawn as full master tensors first"),
        ("--distribute-saved-activations", "recompute keeps whole activations"),
    ]:
        _noop(g, flag, why)
    _noop(g, "--dataloader-type", "the Megatron 'single' sampler is always used",
          action="store", default=None, choices=["single", "cyclic", "external"])
    _noop(g, "--train-sync-interval", "no CPU/GPU sync throttling", action="store", type=int,
          default=None)
    _noop(g, "--manual-gc-interval", "see --manual-gc", action="store", type=int, default=0)
    _noop(g, "--transformer-impl", "moecore's own modules serve every choice (no Transformer "
          "Engine layers)", action="store", default="transformer_engine",
          choices=["local", "transformer_engine", "inference_optimized"])
    _noop(g, "--enable-experimental", "moecore gates no feature behind it")


def _add_initialization_args(p):
    g = p.add_argument_group(title="initialization")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--embedding-init-method-std", type=float, default=None,
                   help="Std of the word (and learned position) embeddings' normal init; "
                        "default: --init-method-std.")


def _add_learning_rate_args(p):
    g = p.add_argument_group(title="learning rate")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="Peak learning rate of the embedding and output-layer weights (their "
                        "own param groups, same schedule); default: --lr.")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="Their minimum learning rate; default: --min-lr.")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   action="store_true", dest="override_opt_param_scheduler")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler")


def _add_checkpointing_args(p):
    g = p.add_argument_group(title="checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="Take the model's shape and parallel layout from the args saved with "
                        "--load's latest checkpoint (overriding these flags); sequence length "
                        "and tokenizer only where not given.")
    g.add_argument("--async-save", action="store_true",
                   help="Copy the state to host memory and write checkpoint files in the "
                        "background while training goes on; a save becomes the latest as soon "
                        "as every rank's write has finished (checked each iteration).")
    g.add_argument("--no-save-optim", action="store_true", default=None)
    g.add_argument("--no-save-rng", action="store_true", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--no-load-optim", action="store_true", default=None)
    g.add_argument("--no-load-rng", action="store_true", default=None)
    g.add_argument("--finetune", action="store_true",
                   help="Load the model only (no optimizer/RNG) and restart at iteration 0.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="(moecore) Let this run replace the checkpoints in --save after its "
                        "start iteration (and move the tracker back); without it such a run "
                        "(e.g. nothing loaded, over existing iter_* directories) is refused at "
                        "start-up.")
    g.add_argument("--ckpt-fallback-to-previous", action="store_true",
                   help="When --load's newest checkpoint is corrupt on any rank (fails its "
                        "checksum or does not unpickle), load the newest earlier intact one "
                        "instead of stopping with an error naming the file.")
    g.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dist"],
                   help="torch: per-rank files (Megatron's 'torch' layout), resumable at the "
                        "same TP/PP/EP (any DP). torch_dist: torch.distributed.checkpoint, one "
                        "checkpoint that loads under any TP/PP/EP/DP layout (see "
                        "docs/checkpoints.md).")
    g.add_argument("--auto-detect-ckpt-format", action="store_true",
                   help="Load whichever format --load holds (saves still use --ckpt-format).")
    _noop(g, "--no-initialization", "initialisation is cheap at the sizes run here",
          dest="perform_initialization", action="store_false")


def _add_mixed_precision_args(p):
    g = p.add_argument_group(title="mixed precision")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="Static loss scale for fp16; dynamic scaling when unset.")
    g.add_argument("--initial-loss-scale", type=float, default=2**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="Keep Adam's moments in the dtypes --exp-avg-dtype / --exp-avg-sq-dtype "
                        "name (bf16 saves 2 bytes per parameter each; updated in fp32, rounded "
                        "to nearest even). Main params and main grads stay fp32.")
    g.add_argument("--exp-avg-dtype", default="fp32", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="Adam's first moment under --use-precision-aware-optimizer: fp32 or "
                        "bf16 (fp16/fp8 are Megatron's choices too, refused here).")
    g.add_argument("--exp-avg-sq-dtype", default="fp32", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="Adam's second moment; as --exp-avg-dtype.")
    g.add_argument("--main-grads-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="Only fp32: gradients accumulate and reduce in fp32 main grads.")
    g.add_argument("--main-params-dtype", default="fp32", choices=["fp32", "fp16"],
                   help="Only fp32: the optimizer steps on fp32 main params.")
    for flag, why in [
        ("--accumulate-allreduce-grads-in-fp32", "grads are always accumulated and reduced in "
         "fp32"),
        ("--attention-softmax-in-fp32", "SDPA handles softmax precision"),
        ("--fp16-lm-cross-entropy", "cross entropy always runs in fp32"),
        ("--grad-reduce-in-bf16", "grads are always reduced in fp32 (more precise)"),
    ]:
        _noop(g, flag, why)


def _add_distributed_args(p):
    g = p.add_argument_group(title="distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", default="p2p", choices=["p2p", "all_gather", "a2a"])
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="nccl on CUDA, gloo on CPU when unset.")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="Timeout of every process group (world, TP, DP, EP, PP, ...): a "
                        "collective a rank waits on longer fails the job. Fractions allowed "
                        "(Megatron takes an integer).")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per virtual pipeline stage (interleaved 1F1B schedule).")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="Model chunks per pipeline rank (interleaved 1F1B schedule).")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="Layers on the first pipeline stage (uneven split).")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="Layers on the last pipeline stage (uneven split).")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard fp32 main params and Adam states over data parallel (ZeRO-1).")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Reduce gradient buckets during backward.")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="All-gather updated params in the background until the next forward "
                        "needs them (needs --use-distributed-optimizer).")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="Elements per gradient bucket with --overlap-grad-reduce; "
                        "max(40M, 1M x data-parallel size) when unset.")
    g.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                   help="Rank order tp-cp-ep-pp-dp instead of tp-cp-ep-dp-pp.")
    g.add_argument("--local-rank", type=int, default=int(os.getenv("LOCAL_RANK", "0")))
    _noop(g, "--ddp-average-in-collective", "the averaging result is identical")
    _noop(g, "--no-overlap-p2p-communication", "pipeline sends/receives are never overlapped "
          "with compute here", dest="overlap_p2p_comm",
          action="store_false")


def _add_validation_args(p):
    g = p.add_argument_group(title="validation")
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--skip-train", action="store_true")


def _add_data_args(p):
    g = p.add_argument_group(title="data and dataloader")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="A prefix, or weight/prefix pairs 'w1 p1 w2 p2'.")
    g.add_argument("--split", default=None, help="train,valid,test proportions; '969,30,1'.")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=None,
                       help=f"The {split} split from its own prefix or weight/prefix pairs (all "
                            "of their documents; instead of --data-path and --split).")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers.")
    _noop(g, "--data-cache-path", "index caches live beside the data", action="store",
          default=None)
    _noop(g, "--no-mmap-bin-files", ".bin files are always memory-mapped",
          dest="mmap_bin_files", action="store_false")
    _noop(g, "--no-create-attention-mask-in-dataloader", "attention is causal by construction",
          dest="create_attention_mask_in_dataloader", action="store_false")


def _add_tokenizer_args(p):
    g = p.add_argument_group(title="tokenizer")
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-type", default=None, choices=list(_MEGATRON_TOKENIZERS))
    g.add_argument("--tokenizer-model", default=None,
                   help="Sentencepiece .model (SentencePieceTokenizer, Llama2Tokenizer), local "
                        "directory or hub name (HuggingFaceTokenizer, needs transformers), or "
                        "BPE rank file (TikTokenizer: Megatron's .json or a .tiktoken file).")
    g.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                   help="HuggingFaceTokenizer: tokenizing adds the tokenizer's own special "
                        "tokens (e.g. a BOS before each document), as Megatron's flag.")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="HuggingFaceTokenizer: let transformers run the tokenizer code a hub "
                        "repository ships (e.g. Kimi-K2's).")
    _noop(g, "--tokenizer-hf-use-fast", "the fast (tokenizers) backend is used whenever the "
          "tokenizer has one")
    g.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"],
                   help="TikTokenizer's pre-tokenisation regex (Megatron's v1 or v2).")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                   help="TikTokenizer: ids 0 .. N-1 are special tokens (the BPE ranks follow).")
    g.add_argument("--tiktoken-special-tokens", nargs="+", default=None,
                   help="TikTokenizer's named special tokens, in id order; must include "
                        "`<unk> <s> </s>` (the default; `</s>` is EOD); `<SPECIAL_i>` fill the "
                        "rest.")


def _add_moe_args(p):
    g = p.add_argument_group(title="moe")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=_moe_freq_type, default=1,
                   help="Int N (every N-th layer is MoE) or a pattern like '([0]*1+[1]*3)*4'.")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="Scale the shared experts' output per token by a sigmoid gate "
                        "(needs --moe-shared-expert-intermediate-size).")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="Run the shared experts on a side CUDA stream, overlapping the routed "
                   "path (dispatch, experts, combine) forward and backward; bit-identical.")
    g.add_argument("--moe-grouped-gemm", action="store_true")
    g.add_argument("--moe-grouped-gemm-backend", default="auto",
                   choices=list(GROUPED_GEMM_BACKENDS), help="(moecore) grouped GEMM backend.")
    g.add_argument("--moe-layer-recompute", action="store_true")
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss", nargs="+",
                   action=_OneOrList,
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
                   help="One type, or several aux loss types (e.g. seq_aux_loss "
                   "global_aux_loss) with one --moe-aux-loss-coeff each.")
    g.add_argument("--moe-router-dtype", default=None, choices=["fp32", "fp64"])
    g.add_argument("--moe-apply-probs-on-input", action="store_true",
                   help="Scale each token by its routing probability before the experts and "
                        "combine unweighted (Llama 4; needs --moe-router-topk 1).")
    g.add_argument("--moe-router-force-load-balancing", action="store_true",
                   help="Benchmarking only: route on random normal logits (gradients pass "
                        "straight through to the router), so every expert gets ~T*k/E tokens "
                        "whatever the model learned. Changes training; never for real runs.")
    g.add_argument("--moe-router-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="Fused Triton router (score function, top-k, normalisation); default: "
                   "on where it runs (CUDA), --no-moe-router-fusion for the torch path.")
    g.add_argument("--moe-router-score-function", default="softmax",
                   choices=["softmax", "sigmoid"])
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--moe-router-num-groups", type=int, default=None)
    g.add_argument("--moe-router-group-topk", type=int, default=None)
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, nargs="+",
                   action=_OneOrList,
                   help="One coefficient per --moe-router-load-balancing-type.")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-input-jitter-eps", type=float, default=None)
    g.add_argument("--moe-per-layer-logging", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", default="allgather",
                   choices=list(DISPATCHER_TYPES) + ["flex"])
    g.add_argument("--moe-ipc-buffer-max-mb", type=float, default=4096.0,
                   help="(moecore) ipc dispatcher: most MiB of symmetric buffer per rank.")
    g.add_argument("--moe-permute-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="Fused Triton dropless top-k permute; default: on where it runs (CUDA), "
                   "--no-moe-permute-fusion for the torch path.")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-token-drop-policy", default="probs", choices=["probs", "position"])
    _noop(g, "--moe-use-legacy-grouped-gemm", "one GroupedMLP; pick the kernel with "
          "--moe-grouped-gemm-backend")


def _add_logging_args(p):
    g = p.add_argument_group(title="logging")
    g.add_argument("--log-params-norm", action="store_true")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="Log the number of zero gradient entries (each replica counted once).")
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000)
    g.add_argument("--no-log-loss-scale-to-tensorboard", action="store_false",
                   dest="log_loss_scale_to_tensorboard")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--wandb-project", default="")
    g.add_argument("--wandb-entity", default="")
    g.add_argument("--wandb-exp-name", default="")
    g.add_argument("--wandb-save-dir", default="")
    g.add_argument("--logging-level", type=int, default=None,
                   help="Level of Python's root logger (e.g. 20 = INFO).")
    g.add_argument("--profile", action="store_true",
                   help="Profile iterations --profile-step-start .. --profile-step-end - 1 on "
                        "--profile-ranks: under nsys (cudaProfilerStart/Stop and NVTX ranges; "
                        "run with nsys profile -c cudaProfilerApi) or, with "
                        "--use-pytorch-profiler, with torch.profiler (a trace per profiled rank "
                        "in --profile-dir, else --tensorboard-dir).")
    g.add_argument("--use-pytorch-profiler", action="store_true")
    g.add_argument("--profile-dir", default=None,
                   help="Where --use-pytorch-profiler writes its traces (moecore's; Megatron "
                        "writes them to --tensorboard-dir, the default here, which needs the "
                        "tensorboard package for its other logs).")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--record-memory-history", action="store_true",
                   help="Record CUDA allocations (torch.cuda.memory._record_memory_history) "
                        "and write a snapshot to --memory-snapshot-path after "
                        "--profile-step-end - 1 (or at the end of training), on the "
                        "--profile-ranks; view it at pytorch.org/memory_viz.")
    g.add_argument("--memory-snapshot-path", default="snapshot.pickle")
    _noop(g, "--log-throughput", "tokens/s and MFU are always logged")
    _noop(g, "--timing-log-level", "only the iteration time is measured", action="store",
          type=int, default=0)
    for flag in ("--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
                 "--log-world-size-to-tensorboard"):
        _noop(g, flag, "not recorded")


def _add_kernel_args(p):
    """Kernel choices without a Megatron fusion flag (see moecore.config.KernelConfig), plus
    Megatron's --cross-entropy-loss-fusion. Each picks a backend of a moecore.kernels registry;
    the backends ``auto`` picked are saved in checkpoints' args (``kernel_backends``)."""
    g = p.add_argument_group(title="kernels")
    g.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction,
                   default=None, help="Fused Triton vocab-parallel cross entropy; default: on "
                   "where it runs (CUDA), --no-cross-entropy-loss-fusion for the torch path.")
    _noop(g, "--cross-entropy-fusion-impl", "--cross-entropy-loss-fusion picks moecore's "
          "kernel", action="store", default="native", choices=["native", "te"])
    g.add_argument("--norm-backend", default="auto", choices=list(NORM_BACKENDS),
                   help="(moecore) RMSNorm/LayerNorm kernel; auto: te, apex, triton (RMSNorm "
                   "only), torch, the first that runs.")
    g.add_argument("--embedding-backend", default="auto", choices=list(KERNEL_BACKENDS),
                   help="(moecore) Word-embedding backward; triton: deterministic kernel "
                   "(CUDA), torch: F.embedding's.")
    g.add_argument("--moe-peer-copy-backend", default="auto", choices=list(KERNEL_BACKENDS),
                   help="(moecore) Peer copies of the ipc dispatcher.")
    g.add_argument("--adamw-backend", default="auto", choices=list(ADAMW_BACKENDS),
                   help="(moecore) AdamW step: triton (one kernel that also writes the bf16 "
                   "model copy), torch_fused (torch.optim.AdamW(fused=True)), torch (foreach); "
                   "auto: the first that runs for CUDA parameters, torch on CPU.")


def _add_fp8_args(p):
    """Megatron's FP8 flags (moecore.config.Fp8Config, docs/fp8.md)."""
    g = p.add_argument_group(title="fp8")
    g.add_argument("--fp8-format", dest="fp8", default=None, choices=list(FP8_FORMATS),
                   help="FP8 GEMMs in the transformer layers: e4m3, or hybrid (e4m3 forward, "
                   "e5m2 gradients). Needs a GPU of compute capability >= 8.9.")
    g.add_argument("--fp8-recipe", default="delayed", choices=list(FP8_RECIPES),
                   help="Scaling: tensorwise (current amax), delayed (amax history) or "
                   "blockwise (1x128 activation tiles, 128x128 weight blocks).")
    g.add_argument("--fp8-margin", type=int, default=0,
                   help="Scales are divided by 2**margin.")
    g.add_argument("--fp8-amax-history-len", type=int, default=1,
                   help="Delayed scaling: amaxes kept per tensor.")
    g.add_argument("--fp8-amax-compute-algo", default="most_recent",
                   choices=list(FP8_AMAX_COMPUTE_ALGOS),
                   help="Delayed scaling: use the max of the history or its most recent.")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="Keep the first/last layers (counts below) out of FP8.")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    g.add_argument("--no-fp8-wgrad", dest="fp8_wgrad", action="store_false",
                   help="Run the weight gradients in higher precision (bf16) even in FP8 runs.")
    g.add_argument("--fp8-gemm-backend", default="auto", choices=list(FP8_GEMM_BACKENDS),
                   help="(moecore) FP8 GEMMs: torch (torch._scaled_mm / _scaled_grouped_mm), "
                   "triton (torch's, and one Triton grouped GEMM for blockwise experts instead "
                   "of a loop over experts), emulated (dequantise + fp32 matmul: the slow CPU "
                   "reference); auto: triton for blockwise experts, torch elsewhere.")
    g.add_argument("--fp8-cast-backend", default="auto", choices=list(FP8_CAST_BACKENDS),
                   help="(moecore) FP8 casts: triton (one fused pass, CUDA), torch (reference); "
                   "auto: triton where it runs.")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, grouped as Megatron-LM's (``--help`` shows the groups)."""
    refused = ", ".join(UNSUPPORTED_FLAGS)
    p = argparse.ArgumentParser(description="moecore GPT pretraining (Megatron-LM flags)",
                                usage="%(prog)s [flags]  (--help lists them by group)",
                                epilog=f"Megatron-LM flags refused with an error: {refused}.",
                                allow_abbrev=False)
    for add in (_add_network_size_args, _add_regularization_args, _add_training_args,
                _add_initialization_args, _add_learning_rate_args, _add_checkpointing_args,
                _add_mixed_precision_args, _add_distributed_args, _add_validation_args,
                _add_data_args, _add_tokenizer_args, _add_moe_args, _add_kernel_args,
                _add_fp8_args,
                _add_logging_args):
        add(p)
    for flag in UNSUPPORTED_FLAGS:
        p.add_argument(flag, action=_Unsupported, help=argparse.SUPPRESS)
    return p


def _noop_flags_given(argv: list[str]) -> list[str]:
    given = []
    for a in argv:
        name = a.split("=", 1)[0]
        if name in NOOP_FLAGS and name not in given:
            given.append(name)
    return given


def parse_args(argv: list[str] | None = None, validate: bool = True,
               world_size: int | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None) and, with ``validate``, check and complete it.

    Errors (unknown or unsupported flags, inconsistent values) exit through ``parser.error``
    with a message naming the flag, as argparse does. ``world_size`` defaults to the
    ``WORLD_SIZE`` environment variable (torchrun), else 1.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.noop_flags_given = _noop_flags_given(argv)
    if validate:
        try:
            validate_args(args, world_size=world_size)
        except ConfigFieldError as e:
            # TransformerConfig's checks name fields; command-line users see the flags.
            parser.error(name_flags_in_error(str(e), field_flags(parser)))
        except ValueError as e:
            parser.error(str(e))
    return args
