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
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
LOAD_BALANCING_TYPES = AUX_LOSS_TYPES + ("sinkhorn", "none")
DISPATCHER_TYPES = ("allgather", "alltoall", "ipc")
DROP_POLICIES = ("probs", "position")
GROUPED_GEMM_BACKENDS = ("auto", "torch", "grouped_gemm", "bmm", "loop")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
# Megatron's --recompute-modules (see moecore.transformer.recompute for what each one does).
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts",
                     "mla_up_proj")
UNSUPPORTED_RECOMPUTE_MODULES: dict[str, str] = {}
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
    """Transformer layers in the whole model (all pipeline stages together)."""
    hidden_size: int = 64
    """Width of the residual stream ``H``."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); None: ``num_attention_heads``."""
    ffn_hidden_size: int | None = None
    """Inner width of the dense MLP (of each projection when gated); None:
    ``4 * hidden_size``."""
    kv_channels: int | None = None
    """Per-head dimension of queries, keys and values; None: ``hidden_size //
    num_attention_heads``."""
    hidden_dropout: float = 0.0
    """Dropout probability of the attention and MLP outputs before the residual add."""
    attention_dropout: float = 0.0
    """Dropout probability of the attention weights."""
    normalization: str = "RMSNorm"
    """``RMSNorm`` or ``LayerNorm``: the pre-norms of each layer and the final norm."""
    layernorm_epsilon: float = 1e-5
    """Epsilon added to the variance in every norm."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head (over ``kv_channels``) before attention; under
    multi-latent attention: normalise the q and kv latents (``q_layernorm``, ``kv_layernorm``),
    as Megatron's MLA spec does."""
    qk_layernorm_hidden_dim: bool = False
    """With ``qk_layernorm``: normalise the whole q and k projections (``nh*d`` and ``ng*d``
    wide, one RMS over all heads, as OLMoE does) instead of each head; the weights are split
    over TP with the heads and the sum of squares is all-reduced over TP."""
    gated_linear_unit: bool = True
    """Gated MLPs: ``act(x W_gate) * (x W_up)`` (SwiGLU with silu); the first
    projection is ``[H, 2 * ffn]``."""
    activation_func: Callable = F.silu
    """The MLP activation (silu for SwiGLU; Megatron's flags default to gelu)."""
    bias_swiglu_fusion: bool = True
    """Fused SwiGLU (silu, gated) in the expert MLPs (Megatron's name): a Triton kernel on
    CUDA, see moecore.kernels.swiglu. False: the unfused torch ops."""
    apply_rope_fusion: bool = True
    """Fused RoPE (a Triton kernel on CUDA); False: the torch ops."""
    attention_backend: str = "auto"
    """SDPA kernel (Megatron's --attention-backend): auto (PyTorch's pick), flash, fused
    (cuDNN), unfused / local (the math reference); see
    moecore.kernels.attention."""
    add_bias_linear: bool = False
    """Biases on the attention and dense MLP projections (MoE experts never have one)."""
    add_qkv_bias: bool = False
    """A bias on the QKV projection only (when ``add_bias_linear`` is False)."""
    init_method_std: float = 0.02
    """Std of the normal init of the weight matrices."""
    embedding_init_method_std: float | None = None
    """Std of the word and position embeddings' normal init (None: init_method_std)."""
    apply_residual_connection_post_layernorm: bool = False
    """The residual adds the normalised input instead of the layer's input."""
    rotary_base: float = 10000.0
    """RoPE base ``theta`` of the rotation frequencies."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimension that RoPE rotates."""
    position_embedding_type: str = "rope"
    """``rope``, ``learned_absolute`` or ``none``."""
    seq_length: int = 128
    """Tokens per sequence ``S``."""
    vocab_size: int | None = None
    """Padded vocabulary (rows of the embedding and output layer; a multiple of TP); None:
    the model is given it."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer's weight to the word embedding."""
    params_dtype: torch.dtype = torch.float32
    """dtype the parameters are created in (the optimizer keeps fp32 main copies of
    bf16/fp16 ones)."""
    bf16: bool = False
    """Compute in bfloat16."""
    fp16: bool = False
    """Compute in float16 (the optimizer scales the loss)."""
    recompute_granularity: str | None = None
    """Activation recompute in backward: ``full`` (whole layers), ``selective`` (the
    ``recompute_modules``) or None."""
    recompute_method: str | None = None
    """Under ``full``: ``uniform`` (chunks of ``recompute_num_layers`` layers, the default)
    or ``block`` (the first ``recompute_num_layers`` layers of each stage)."""
    recompute_num_layers: int | None = None
    """Layers per recomputed chunk (``uniform``) or per stage (``block``); None: 1."""
    recompute_modules: tuple[str, ...] | None = None
    """Under 'selective' granularity: the submodules to recompute (None:
    DEFAULT_RECOMPUTE_MODULES)."""
    mtp_num_layers: int | None = None
    """Multi-token prediction depths ``D`` on the last pipeline stage (each one transformer
    layer of the model's last layer's kind; see moecore.models.mtp); None: no MTP."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP losses: the objective adds ``factor / D`` times the sum of the
    depths' masked mean cross entropies."""
    calculate_per_token_loss: bool = False
    """The trainer's loss is the token sum over the global batch divided by its token count
    (--calculate-per-token-loss), not a mean of micro-batch means; the MTP losses follow."""
    multi_latent_attention: bool = False
    """Multi-Latent Attention (DeepSeek-V2/V3) instead of GQA: see
    moecore.transformer.mla."""
    q_lora_rank: int | None = None
    """MLA: rank of the query's low-rank latent (``linear_q_down_proj``); None: a plain
    query projection ``linear_q_proj``."""
    kv_lora_rank: int | None = None
    """MLA: rank of the shared key/value latent (``linear_kv_down_proj``); required with
    multi_latent_attention."""
    qk_head_dim: int = 128
    """MLA: per-head dimension of the query/key part without position embedding."""
    qk_pos_emb_head_dim: int = 64
    """MLA: per-head dimension of the rotated (decoupled RoPE) query/key part; the key's
    is one vector per token shared by all heads."""
    v_head_dim: int = 128
    """MLA: per-head dimension of the values."""
    rope_type: str | None = None
    """``rope`` or ``yarn``; None: ``yarn`` under multi_latent_attention (as Megatron; a
    rotary_scaling_factor of 1 makes it plain RoPE), ``rope`` otherwise."""
    rotary_scaling_factor: float = 1.0
    """YaRN: context extension factor ``s`` (positions interpolated by ``s`` where the
    wavelength is long)."""
    mscale: float = 1.0
    """YaRN: ``m`` of the rotary magnitude ``(0.1 m ln s + 1) / (0.1 m_all ln s + 1)``."""
    mscale_all_dim: float = 0.0
    """YaRN: ``m_all`` of the rotary magnitude; the softmax scale is multiplied by
    ``(0.1 m_all ln s + 1) ** 2`` (0: by 1)."""
    original_max_position_embeddings: int = 4096
    """YaRN: the context length the model was pretrained with (sets which frequencies are
    interpolated)."""
    beta_fast: float = 32.0
    """YaRN: rotations above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """YaRN: rotations below which a frequency is interpolated."""
    yarn_correction_range_round_to_int: bool = True
    """YaRN: round the ramp bounds to integers (floor/ceil), as Megatron and Hugging Face do by
    default; gpt-oss does not (its ``rope_scaling.truncate`` is false)."""
    softmax_type: str = "vanilla"
    """Attention softmax: ``vanilla``; ``off-by-one`` (an extra zero logit in every softmax
    denominator); ``learnable`` (one learned logit per head there: gpt-oss's attention
    sinks, parameter ``self_attention.sinks [heads]``)."""
    window_size: tuple[int, int] | None = None
    """Sliding-window attention ``(left, right)``: query ``i`` sees keys ``i - left .. i``
    (``right`` must be 0: causal); None: full causal attention on every layer."""
    window_attn_skip_freq: int | list[int] | None = None
    """Which layers keep full attention under ``window_size``: an int ``N`` makes every
    ``N``-th layer (1-based numbers divisible by ``N``) full, the rest windowed; a list gives
    one entry per layer, 1 = windowed, 0 = full; None: every layer windowed."""
    activation_func_clamp_value: float | None = None
    """Gated MLPs: clamp the gate input to ``<= c`` and the linear input to ``[-c, c]`` before
    the activation (gpt-oss: 7)."""
    glu_linear_offset: float = 0.0
    """Gated MLPs: ``act(gate) * (up + offset)`` (gpt-oss: 1)."""

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
        if self.qk_layernorm_hidden_dim and (not self.qk_layernorm or self.normalization
                                             != "RMSNorm" or self.multi_latent_attention):
            raise ValueError("qk_layernorm_hidden_dim needs qk_layernorm, RMSNorm and "
                             "grouped-query attention (not multi_latent_attention)")
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
        if self.mtp_num_layers is not None and self.mtp_num_layers < 1:
            raise ValueError(f"mtp_num_layers={self.mtp_num_layers} must be >= 1 (or None for "
                             "no multi-token prediction)")
        self._validate_attention_variants()
        self._validate_mla()

    def _validate_attention_variants(self) -> None:
        _check_choice("softmax_type", self.softmax_type, ("vanilla", "off-by-one", "learnable"))
        if self.window_size is not None:
            self.window_size = tuple(int(w) for w in self.window_size)
            if len(self.window_size) != 2 or self.window_size[0] < 0 or self.window_size[1]:
                raise ValueError(f"window_size={self.window_size} must be (left >= 0, 0): "
                                 "attention is causal (--window-size LEFT,0)")
        freq = self.window_attn_skip_freq
        if isinstance(freq, list | tuple) and len(freq) != self.num_layers:
            raise ValueError(f"window_attn_skip_freq has {len(freq)} entries for num_layers="
                             f"{self.num_layers}; give one 1/0 per layer")
        if self.activation_func_clamp_value is not None and self.activation_func_clamp_value <= 0:
            raise ValueError(f"activation_func_clamp_value={self.activation_func_clamp_value} "
                             "must be > 0 (--activation-func-clamp-value)")
        if self.multi_latent_attention and (self.window_size is not None
                                            or self.softmax_type != "vanilla"):
            raise ValueError("sliding windows and --softmax-type other than vanilla are "
                             "implemented for grouped-query attention only: drop "
                             "--multi-latent-attention or --window-size / --softmax-type")

    def _validate_mla(self) -> None:
        rope = self.rope_type or ("yarn" if self.multi_latent_attention else "rope")
        _check_choice("rope_type", rope, ("rope", "yarn"))
        if not self.multi_latent_attention:
            if rope == "yarn" and self.rotary_percent != 1.0:
                raise ValueError("YaRN rotates whole heads: drop --rotary-percent "
                                 f"{self.rotary_percent} or --rope-type yarn")
            if "mla_up_proj" in (self.recompute_modules or ()):
                raise ValueError("recompute module 'mla_up_proj' needs multi-latent attention: "
                                 "add --multi-latent-attention or drop it from --recompute-modules")
            return
        if self.kv_lora_rank is None:
            raise ValueError("multi-latent attention needs kv_lora_rank: pass --kv-lora-rank")
        for name in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "v_head_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (--"
                                 f"{name.replace('_', '-')})")
        if self.qk_pos_emb_head_dim < 2 or self.qk_pos_emb_head_dim % 2:
            raise ValueError(f"qk_pos_emb_head_dim={self.qk_pos_emb_head_dim} must be even and "
                             ">= 2 (--qk-pos-emb-head-dim)")
        if self.num_query_groups != self.num_attention_heads:
            raise ValueError(f"multi-latent attention has one key/value head per query head; "
                             f"drop --group-query-attention / --num-query-groups "
                             f"{self.num_query_groups}")
        for name, bad, flag in (("position_embedding_type", self.position_embedding_type != "rope",
                                 "--position-embedding-type rope"),
                                ("rotary_percent", self.rotary_percent != 1.0,
                                 "--rotary-percent 1.0"),
                                ("add_qkv_bias", self.add_qkv_bias, "no --add-qkv-bias")):
            if bad:
                raise ValueError(f"multi-latent attention needs {flag} (got {name}="
                                 f"{getattr(self, name)!r})")


@dataclass
class MoEConfig:
    num_moe_experts: int | None = None
    """Routed experts per MoE layer ``E``; None: a dense model."""
    moe_ffn_hidden_size: int | None = None
    """Inner width of each routed expert's MLP; None: ``ffn_hidden_size``."""
    moe_router_topk: int = 2
    """Experts each token is routed to ``k``."""
    moe_router_score_function: str = "softmax"
    """``softmax`` or ``sigmoid`` of the router logits ``[T, E]`` (computed in
    ``moe_router_dtype``)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k (else over the k selected logits); ignored
    with the sigmoid score function, as in Megatron-Core."""
    moe_router_topk_scaling_factor: float | None = None
    """Multiplier of the selected probabilities; None: 1."""
    moe_router_num_groups: int | None = None
    """Group-limited routing: the experts form this many groups (None: off)."""
    moe_router_group_topk: int | None = None
    """Groups each token's experts may come from (with ``moe_router_num_groups``)."""
    moe_router_load_balancing_type: str | list[str] = "aux_loss"
    """``aux_loss`` (per micro-batch), ``seq_aux_loss`` (per sequence),
    ``global_aux_loss`` (over data parallel), ``sinkhorn`` or ``none``; or a list of the aux
    loss types, each weighted by its own entry of ``moe_aux_loss_coeff``."""
    moe_aux_loss_coeff: float | list[float] = 0.0
    """Weight of the load-balancing loss (0 turns it off); a list (one per type) when
    ``moe_router_load_balancing_type`` is a list."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router z-loss (mean squared logsumexp of the logits); None: off."""
    moe_input_jitter_eps: float | None = None
    """Training only: multiply the router input by uniform noise in ``[1 - eps,
    1 + eps]``; None: off."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias, added to the scores for the
    top-k choice only, moved after each step towards equal expert loads."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of that per-step expert-bias update."""
    moe_router_dtype: str = "fp32"
    """Router compute dtype: ``fp32`` or ``fp64``."""
    moe_token_dispatcher_type: str = "allgather"
    """How tokens reach their experts across EP ranks: ``allgather``, ``alltoall``
    or ``ipc`` (direct writes into peer GPUs' buffers)."""
    moe_ipc_buffer_max_mb: float = 4096.0
    """ipc dispatcher: upper bound of the symmetric buffer per rank in MiB (grown on
    demand up to it)."""
    moe_grouped_gemm: bool = False
    """One grouped GEMM per projection over all local experts (``GroupedMLP``); False:
    one MLP per expert (``SequentialMLP``)."""
    moe_grouped_gemm_backend: str = "auto"
    """Grouped GEMM implementation, one of ``GROUPED_GEMM_BACKENDS`` (``auto``: chosen by
    what runs here)."""
    moe_expert_capacity_factor: float | None = None
    """Expert capacity as a multiple of the balanced load ``T * k / E``; tokens
    over it are dropped. None: dropless."""
    moe_pad_expert_input_to_capacity: bool = False
    """Pad every expert's input to its capacity (static shapes)."""
    moe_token_drop_policy: str = "probs"
    """Over capacity, drop the lowest-``probs`` tokens or the latest by ``position``."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total inner width of the shared experts that every token passes
    through; None: none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared experts' output per token by ``sigmoid(hidden @ w)``
    (``w``: ``[1, H]``)."""
    moe_shared_expert_overlap: bool = False
    """Run the shared experts on a side CUDA stream, overlapping the routed path
    (bit-identical)."""
    moe_layer_freq: int | list[int] = 1
    """Which layers are MoE: an int ``N`` (every N-th from layer 0) or a 0/1 list of
    ``num_layers`` entries."""
    moe_permute_fusion: bool | None = None
    """Fused Triton dropless top-k permute (moecore.kernels): None = on where it runs
    (CUDA, after a self-check), True = required (raise where it cannot run), False = the torch
    reference. The top-k combine kernel is always auto."""
    moe_router_fusion: bool | None = None
    """Fused Triton router (score function, top-k, normalisation); None / True /
    False as ``moe_permute_fusion``."""
    moe_router_force_load_balancing: bool = False
    """Benchmarking only: route on random logits (straight-through gradient),
    balanced load."""
    moe_apply_probs_on_input: bool = False
    """Llama-4 style (top-1): scale each token by its routing probability before the
    experts and combine unweighted, instead of weighting the expert output."""
    moe_layer_recompute: bool = False
    """Recompute each MoE layer in backward instead of keeping its activations."""

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
        self._validate_load_balancing()
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

    def _validate_load_balancing(self) -> None:
        types, coeffs = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        if not isinstance(types, (list, tuple)):
            _check_choice("moe_router_load_balancing_type", types, LOAD_BALANCING_TYPES)
            if isinstance(coeffs, (list, tuple)):
                raise ValueError(f"moe_aux_loss_coeff has {len(coeffs)} values but "
                                 "moe_router_load_balancing_type names one type; give one of each")
            return
        for name in types:
            _check_choice("moe_router_load_balancing_type", name, AUX_LOSS_TYPES + ("none",))
        if len(set(types)) != len(types):
            raise ValueError(f"moe_router_load_balancing_type={list(types)} repeats a type")
        n = len(coeffs) if isinstance(coeffs, (list, tuple)) else 1
        if n != len(types):
            raise ValueError(f"moe_router_load_balancing_type has {len(types)} types but "
                             f"moe_aux_loss_coeff has {n} value{'s' if n > 1 else ''}; give "
                             "one coefficient per type")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP): heads and MLP columns are split over it."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP): the layers are split into this many stages."""
    context_parallel_size: int = 1
    """Context-parallel size (CP): each sequence is split over it in ``2 CP`` chunks, rank
    ``r`` holding chunks ``r`` and ``2 CP - 1 - r`` (load-balanced causal work);
    ``seq_length`` must be divisible by ``2 CP``."""
    cp_comm_type: str = "p2p"
    """How attention crosses the CP group: ``p2p`` (ring attention, K/V blocks passed
    around and merged by log-sum-exp), ``all_gather`` (K/V gathered per layer) or ``a2a``
    (heads exchanged for sequence, DeepSpeed-Ulysses; the only one with sliding windows
    and sinks; needs heads per TP rank divisible by CP)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (EP): the routed experts are split over it."""
    expert_tensor_parallel_size: int | None = None
    """Tensor-parallel size inside each expert (ETP); None:
    ``tensor_model_parallel_size``."""
    sequence_parallel: bool = False
    """Split the activations outside the TP regions along the sequence over TP (needed
    for MoE at TP > 1; off at TP = 1)."""

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


# ---- FP8 training (moecore.fp8, docs/fp8.md) -------------------------------------------------
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "delayed", "blockwise")
FP8_AMAX_COMPUTE_ALGOS = ("max", "most_recent")
FP8_GEMM_BACKENDS = ("auto", "triton", "torch", "emulated")
FP8_CAST_BACKENDS = ("auto", "triton", "torch")


@dataclass
class Fp8Config:
    fp8: str | None = None
    """FP8 GEMMs in the transformer layers' projections and experts (--fp8-format):
    ``e4m3`` everywhere, or ``hybrid`` (e4m3 forward, e5m2 gradients); None: off."""
    fp8_recipe: str = "delayed"
    """Scaling recipe: ``tensorwise`` (current amax per tensor), ``delayed`` (amax
    history) or ``blockwise`` (1x128 activation tiles, 128x128 weight blocks)."""
    fp8_margin: int = 0
    """Scales are divided by ``2**fp8_margin`` (headroom below the FP8 maximum)."""
    fp8_amax_history_len: int = 1
    """Delayed scaling: amaxes of this many previous calls are kept per tensor."""
    fp8_amax_compute_algo: str = "most_recent"
    """Delayed scaling: the scale uses the ``max`` of the history or its ``most_recent``."""
    first_last_layers_bf16: bool = False
    """Keep the first ``num_layers_at_start_in_bf16`` and last
    ``num_layers_at_end_in_bf16`` transformer layers out of FP8."""
    num_layers_at_start_in_bf16: int = 1
    """Leading layers kept in bf16 under ``first_last_layers_bf16``."""
    num_layers_at_end_in_bf16: int = 1
    """Trailing layers kept in bf16 under ``first_last_layers_bf16``."""
    fp8_gemm_backend: str = "auto"
    """FP8 GEMM implementation (moecore.kernels.fp8_gemm): ``torch`` (torch._scaled_mm,
    sm89+), ``triton`` (torch's, and one Triton kernel per blockwise expert GEMM instead of a
    loop over experts), ``emulated`` (dequantise + fp32 matmul, the CPU reference); ``auto``:
    triton for blockwise experts, torch elsewhere."""
    fp8_cast_backend: str = "auto"
    """FP8 casts (moecore.kernels.fp8_quant): ``triton`` (one fused pass, CUDA), ``torch``
    (the reference); ``auto``: triton where it runs."""
    fp8_wgrad: bool = True
    """Weight gradients in FP8 too; False (--no-fp8-wgrad): they run in the activations'
    precision (bf16), from the unquantised input and output gradient."""

    def _validate_fp8(self) -> None:
        _check_choice("fp8_gemm_backend", self.fp8_gemm_backend, FP8_GEMM_BACKENDS)
        _check_choice("fp8_cast_backend", self.fp8_cast_backend, FP8_CAST_BACKENDS)
        if self.fp8 is None:
            return
        _check_choice("fp8", self.fp8, FP8_FORMATS)
        _check_choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _check_choice("fp8_amax_compute_algo", self.fp8_amax_compute_algo,
                      FP8_AMAX_COMPUTE_ALGOS)
        if self.fp8_margin < 0 or self.fp8_amax_history_len < 1:
            raise ValueError(f"fp8_margin={self.fp8_margin} must be >= 0 and "
                             f"fp8_amax_history_len={self.fp8_amax_history_len} >= 1")
        if self.num_layers_at_start_in_bf16 < 0 or self.num_layers_at_end_in_bf16 < 0:
            raise ValueError("num_layers_at_start_in_bf16 and num_layers_at_end_in_bf16 must "
                             "be >= 0")
        if self.num_moe_experts is not None and not self.moe_grouped_gemm:
            raise ValueError("fp8 runs the experts as FP8 grouped GEMMs: add moe_grouped_gemm "
                             "(sequential experts have no FP8 path)")
# ---- end of FP8 training ---------------------------------------------------------------------


@dataclass
class TransformerConfig(ModelConfig, MoEConfig, ParallelConfig, KernelConfig, Fp8Config):
    """All model, MoE and parallel settings, validated at construction."""

    def __post_init__(self):
        self._validate_model()
        self._validate_parallel()
        self._validate_moe()
        self._validate_kernels()
        self._validate_fp8()
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
