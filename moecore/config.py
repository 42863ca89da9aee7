"""``TransformerConfig`` with Megatron-Core's field names, composed from per-concern parts.

``ModelConfig`` (shapes, norms, activations, init), ``MoEConfig`` (router, dispatcher, experts)
and ``ParallelConfig`` (TP/PP/EP/CP sizes, sequence parallel, precision) each validate their own
fields; ``TransformerConfig`` inherits all three, so every field is a flat attribute as in
Megatron (``config.num_moe_experts``, ``config.moe_router_topk``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
DISPATCHER_TYPES = ("allgather", "alltoall", "ipc")
DROP_POLICIES = ("probs", "position")
GROUPED_GEMM_BACKENDS = ("auto", "torch", "grouped_gemm", "bmm", "loop")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
# Megatron's --recompute-modules (see moecore.transformer.recompute for what each one does).
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")
UNSUPPORTED_RECOMPUTE_MODULES = {"mla_up_proj": "moecore has no multi-latent attention"}
DEFAULT_RECOMPUTE_MODULES = ("core_attn",)


def check_recompute_modules(modules) -> tuple[str, ...]:
    """``modules`` as a tuple of known names, or ``ValueError`` naming the bad one."""
    out = tuple(modules)
    for name in out:
        why = UNSUPPORTED_RECOMPUTE_MODULES.get(name)
        if why is not None or name not in RECOMPUTE_MODULES:
            raise ValueError(f"recompute module {name!r} is "
                             f"{'not supported: ' + why if why else 'unknown'}; choose from "
                             f"{', '.join(RECOMPUTE_MODULES)}")
    return out


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    kv_channels: int | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    # Megatron's name; here it fuses SwiGLU (silu, gated) in the expert MLPs (a Triton kernel
    # on CUDA, see moecore.kernels.swiglu). False: the unfused torch ops.
    bias_swiglu_fusion: bool = True
    apply_rope_fusion: bool = True
    # SDPA kernel (Megatron's --attention-backend): auto (PyTorch's pick), flash, fused (cuDNN),
    # unfused / local (the math reference); see moecore.kernels.attention.
    attention_backend: str = "auto"
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    init_method_std: float = 0.02
    # Std of the word and position embeddings' normal init (None: init_method_std).
    embedding_init_method_std: float | None = None
    apply_residual_connection_post_layernorm: bool = False
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    position_embedding_type: str = "rope"
    seq_length: int = 128
    vocab_size: int | None = None
    share_embeddings_and_output_weights: bool = False
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    fp16: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # Under 'selective' granularity: the submodules to recompute (None: DEFAULT_RECOMPUTE_MODULES).
    recompute_modules: tuple[str, ...] | None = None

    def _validate_model(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels explicitly or change the sizes")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_query_groups={self.num_query_groups}")
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("position_embedding_type", self.position_embedding_type,
                      ("rope", "learned_absolute", "none"))
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are mutually exclusive; pick one")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"recompute_granularity={self.recompute_granularity!r} must be "
                             "'full', 'selective' or None")
        if self.recompute_modules is not None:
            if self.recompute_granularity != "selective":
                raise ValueError(
                    f"recompute_modules={tuple(self.recompute_modules)} apply only under "
                    f"recompute_granularity='selective' (got {self.recompute_granularity!r}); "
                    "set it (--recompute-granularity selective) or drop the modules")
            self.recompute_modules = check_recompute_modules(self.recompute_modules)


@dataclass
class MoEConfig:
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_input_jitter_eps: float | None = None
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_dtype: str = "fp32"
    moe_token_dispatcher_type: str = "allgather"
    # ipc dispatcher: upper bound of the symmetric buffer per rank (grown on demand up to it).
    moe_ipc_buffer_max_mb: float = 4096.0
    moe_grouped_gemm: bool = False
    moe_grouped_gemm_backend: str = "auto"
    moe_expert_capacity_factor: float | None = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_token_drop_policy: str = "probs"
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_shared_expert_overlap: bool = False
    moe_layer_freq: int | list[int] = 1
    # Fused Triton kernels (moecore.kernels): None = on where they run (CUDA, after a self-check),
    # True = required (raise where they cannot run), False = the torch reference. The permute
    # flag covers the dropless top-k gather; the top-k combine kernel is always auto.
    moe_permute_fusion: bool | None = None
    moe_router_fusion: bool | None = None
    # Benchmarking only: route on random logits (straight-through gradient), balanced load.
    moe_router_force_load_balancing: bool = False
    # Llama-4 style (top-1): scale each token by its routing probability before the experts
    # and combine unweighted, instead of weighting the expert output.
    moe_apply_probs_on_input: bool = False
    moe_layer_recompute: bool = False

    def _validate_moe(self) -> None:
        if self.num_moe_experts is None:
            return
        if self.num_moe_experts < 1:
            raise ValueError(f"num_moe_experts={self.num_moe_experts} must be >= 1")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ValueError(
                f"moe_router_topk={self.moe_router_topk} must be between 1 and num_moe_experts="
                f"{self.num_moe_experts}")
        _check_choice("moe_router_score_function", self.moe_router_score_function,
                      ROUTER_SCORE_FUNCTIONS)
        _check_choice("moe_router_load_balancing_type", self.moe_router_load_balancing_type,
                      LOAD_BALANCING_TYPES)
        _check_choice("moe_token_dispatcher_type", self.moe_token_dispatcher_type,
                      DISPATCHER_TYPES)
        if not self.moe_ipc_buffer_max_mb > 0:
            raise ValueError(f"moe_ipc_buffer_max_mb={self.moe_ipc_buffer_max_mb} must be > 0")
        _check_choice("moe_token_drop_policy", self.moe_token_drop_policy, DROP_POLICIES)
        _check_choice("moe_grouped_gemm_backend", self.moe_grouped_gemm_backend,
                      GROUPED_GEMM_BACKENDS)
        if self.moe_shared_expert_overlap and not self.moe_shared_expert_intermediate_size:
            raise ValueError("moe_shared_expert_overlap needs shared experts: set "
                             "moe_shared_expert_intermediate_size (--moe-shared-expert-"
                             "intermediate-size) or drop --moe-shared-expert-overlap")
        if self.moe_apply_probs_on_input and self.moe_router_topk != 1:
            raise ValueError(f"moe_apply_probs_on_input needs moe_router_topk=1 (got "
                             f"{self.moe_router_topk}): one probability scales each token")
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise ValueError("moe_router_pre_softmax needs moe_router_score_function='softmax'")
        if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
            raise ValueError("set both moe_router_num_groups and moe_router_group_topk, or neither")
        if self.moe_router_num_groups is not None:
            g, gk = self.moe_router_num_groups, self.moe_router_group_topk
            if self.num_moe_experts % g:
                raise ValueError(f"num_moe_experts={self.num_moe_experts} must be divisible by "
                                 f"moe_router_num_groups={g}")
            if not 1 <= gk <= g:
                raise ValueError(f"moe_router_group_topk={gk} must be in [1, {g}]")
            if self.moe_router_topk > gk * (self.num_moe_experts // g):
                raise ValueError(
                    f"moe_router_topk={self.moe_router_topk} exceeds the experts in the "
                    f"{gk} selected groups ({gk * (self.num_moe_experts // g)})")
        if self.moe_expert_capacity_factor is not None:
            if self.moe_expert_capacity_factor <= 0:
                raise ValueError("moe_expert_capacity_factor must be > 0 (or None for dropless)")
        elif self.moe_pad_expert_input_to_capacity:
            raise ValueError("moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor")
        if self.moe_router_load_balancing_type == "sinkhorn" and self.moe_router_topk != 1 \
                and self.moe_router_score_function != "softmax":
            raise ValueError("sinkhorn load balancing needs the softmax score function")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool = False

    def _validate_parallel(self) -> None:
        tp = self.tensor_model_parallel_size
        if self.sequence_parallel and tp == 1:
            # Megatron silently turns SP off at TP=1; we do the same (numerics are unchanged).
            self.sequence_parallel = False
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = tp


# ---- kernel choices ------------------------------------------------------------------------
# Requests to the backend registries of moecore.kernels that no Megatron fusion flag covers
# (those are apply_rope_fusion, bias_swiglu_fusion, moe_permute_fusion, moe_router_fusion,
# moe_grouped_gemm_backend and attention_backend above). The AdamW choice (--adamw-backend) is
# an optimizer setting, passed to the optimizer instead.
NORM_BACKENDS = ("auto", "te", "apex", "triton", "torch")
KERNEL_BACKENDS = ("auto", "triton", "torch")


@dataclass
class KernelConfig:
    # --cross-entropy-loss-fusion: None = the Triton CE on CUDA (auto), True = required, False =
    # the torch reference.
    cross_entropy_loss_fusion: bool | None = None
    # --norm-backend: RMSNorm/LayerNorm kernel (moecore.kernels.norm); triton is RMSNorm only.
    norm_backend: str = "auto"
    # --embedding-backend: word-embedding backward (moecore.kernels.embedding).
    embedding_backend: str = "auto"
    # --moe-peer-copy-backend: the ipc dispatcher's copies to/from peers (kernels.peer_copy).
    moe_peer_copy_backend: str = "auto"

    def _validate_kernels(self) -> None:
        _check_choice("norm_backend", self.norm_backend, NORM_BACKENDS)
        if self.norm_backend == "triton" and self.normalization != "RMSNorm":
            raise ValueError("norm_backend='triton' is RMSNorm only; use --norm-backend auto "
                             "with --normalization LayerNorm")
        _check_choice("embedding_backend", self.embedding_backend, KERNEL_BACKENDS)
        _check_choice("moe_peer_copy_backend", self.moe_peer_copy_backend, KERNEL_BACKENDS)
# ---- end of kernel choices -----------------------------------------------------------------


@dataclass
class TransformerConfig(ModelConfig, MoEConfig, ParallelConfig, KernelConfig):
    """All model, MoE and parallel settings, validated at construction."""

    def __post_init__(self):
        self._validate_model()
        self._validate_parallel()
        self._validate_moe()
        self._validate_kernels()
        self._validate_divisibility()

    def _validate_divisibility(self) -> None:
        tp = self.tensor_model_parallel_size
        checks = [("num_attention_heads", self.num_attention_heads, tp),
                  ("num_query_groups", self.num_query_groups, tp),
                  ("ffn_hidden_size", self.ffn_hidden_size, tp)]
        if self.num_moe_experts is not None:
            checks.append(("num_moe_experts", self.num_moe_experts,
                           self.expert_model_parallel_size))
            checks.append(("moe_ffn_hidden_size", self.moe_ffn_hidden_size,
                           self.expert_tensor_parallel_size))
            if self.moe_shared_expert_intermediate_size:
                checks.append(("moe_shared_expert_intermediate_size",
                               self.moe_shared_expert_intermediate_size, tp))
        if self.vocab_size is not None:
            checks.append(("vocab_size", self.vocab_size, tp))
        for name, value, div in checks:
            if value % div:
                raise ValueError(f"{name}={value} is not divisible by the parallel size {div}; "
                                 f"choose a {name} that is a multiple of {div}")
        if self.num_moe_experts is not None and tp > 1 and not self.sequence_parallel:
            # Without SP every TP rank holds the same tokens; the MoE layer would count each
            # token's expert gradient once per TP rank.
            raise ValueError("MoE with tensor_model_parallel_size > 1 needs sequence_parallel "
                             "(as in Megatron-Core): pass --sequence-parallel")

    def recomputes(self, module: str) -> bool:
        """Whether the submodule ``module`` (a :data:`RECOMPUTE_MODULES` name) is recomputed in
        backward: selective granularity with it in ``recompute_modules``; ``moe`` also under
        ``moe_layer_recompute``."""
        if module == "moe" and self.moe_layer_recompute:
            return True
        if self.recompute_granularity != "selective":
            return False
        modules = self.recompute_modules
        return module in (DEFAULT_RECOMPUTE_MODULES if modules is None else modules)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def moe_layer_pattern(self) -> list[bool]:
        """``[num_layers]`` booleans: which layers use the MoE MLP (from ``moe_layer_freq``)."""
        if not self.is_moe:
            return [False] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            if freq < 1:
                raise ValueError(f"moe_layer_freq={freq} must be >= 1")
            return [i % freq == 0 for i in range(self.num_layers)]
        if len(freq) != self.num_layers:
            raise ValueError(f"moe_layer_freq lists {len(freq)} layers but num_layers="
                             f"{self.num_layers}")
        return [bool(x) for x in freq]

    def replace(self, **changes) -> TransformerConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return TransformerConfig(**values)
