"""Multi-Latent Attention (MLA, DeepSeek-V2/V3) with Megatron-Core's parameter names.

``nh`` heads, ``dn = qk_head_dim`` (query/key part without position), ``dr =
qk_pos_emb_head_dim`` (decoupled RoPE part), ``dv = v_head_dim``, ``rq = q_lora_rank``, ``rkv =
kv_lora_rank``, ``H`` hidden. Weights (full master shapes; ``[out, in]``)::

    linear_q_proj        [nh*(dn+dr), H]      without q LoRA (column-parallel)
    linear_q_down_proj   [rq, H]              with q LoRA (replicated over TP)
    q_layernorm          [rq]                 with q LoRA and qk_layernorm (replicated)
    linear_q_up_proj     [nh*(dn+dr), rq]     with q LoRA (column-parallel)
    linear_kv_down_proj  [rkv+dr, H]          rows: the kv latent, then k_pe (replicated)
    kv_layernorm         [rkv]                with qk_layernorm (replicated)
    linear_kv_up_proj    [nh*(dn+dv), rkv]    per head: k_nope (dn rows), v (dv rows) (column)
    linear_proj          [H, nh*dv]           (row-parallel)

Per head the query is ``[q_nope (dn), q_pe (dr)]``, the key ``[k_nope (dn), k_pe (dr)]`` with
one ``k_pe`` per token shared by all heads. ``q_pe`` and ``k_pe`` are rotated in DeepSeek's
interleaved layout: channels ``(0, 1), (2, 3), ...`` rotate together, done as Megatron and
Hugging Face's DeepseekV3 do: de-interleave (even channels, then odd), then the ``rotate_half``
RoPE. These are Hugging Face's ``q_proj``/``q_a_proj``/``q_a_layernorm``/``q_b_proj``/
``kv_a_proj_with_mqa``/``kv_a_layernorm``/``kv_b_proj``/``o_proj`` unchanged.

Tensor parallel (Megatron's split): heads are split over TP (the up-projections column-parallel,
``linear_proj`` row-parallel); the down-projections and latent norms are replicated and run on
this rank's tokens (``[S/tp]`` under sequence parallel, whose latents the up-projections
all-gather: the latents are narrower than ``H``), so their grads are partial over TP under
sequence parallel (marked ``sequence_parallel``). ``k_pe`` joins the TP region by a gather
(SP) or a copy (gradients summed over TP).

YaRN: the rotated parts are scaled by the embedding's ``mscale`` (as cos/sin are in Megatron and
HF) and the softmax scale is ``yarn_get_mscale(s, mscale_all_dim) ** 2 / sqrt(dn + dr)``.
``--recompute-modules mla_up_proj`` runs the up-projections and RoPE without keeping their
outputs (q, k, v) after core attention; backward recomputes them, bit-identically
(:class:`UpProjCheckpoint`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from moecore.parallel_state import ParallelState, get_parallel_state
from moecore.tensor_parallel import random as tp_random
from moecore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from moecore.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from moecore.transformer.context_parallel import context_attention
from moecore.transformer.norms import build_norm
from moecore.transformer.recompute import discard_until_backward
from moecore.transformer.rope import apply_rotary_pos_emb, yarn_get_mscale
from moecore.transformer.utils import (
    check_attention_layout,
    init_method_normal,
    scaled_init_method_normal,
)


class ReplicatedLinear(nn.Module):
    """``y = x W^T`` with ``W [out, in]`` whole on every TP rank (Megatron's "duplicated"
    linear). Drawn like the parallel layers' master weights (fp32, default generator), so a
    model is the same at every TP size. ``sequence_parallel``: each rank sees other tokens, so
    the weight's grad is partial over TP (summed by the optimizer's grad sync)."""

    def __init__(self, input_size: int, output_size: int, config, init_method,
                 sequence_parallel: bool):
        super().__init__()
        master = torch.empty(output_size, input_size, dtype=torch.float32)
        with torch.no_grad():
            init_method(master)
        self.weight = nn.Parameter(master.to(config.params_dtype))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class UpProjCheckpoint(torch.autograd.Function):
    """Runs ``fn(*inputs) -> (q, k, v)`` without a graph and keeps only the inputs. After the
    outputs' last forward use, :meth:`discard` frees their memory until backward reaches the
    anchor; there ``fn`` reruns with grad, its outputs refill the freed storage (the tensors
    autograd saved keep their identity) and its graph takes the outputs' gradients."""

    @staticmethod
    def forward(ctx, fn, state: dict, *inputs):
        state["fn"], state["inputs"] = fn, inputs
        ctx.state = state
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        state = ctx.state
        if "outputs" not in state:  # nothing was discarded: recompute here
            _recompute(state)
        inputs, outputs = state.pop("detached"), state.pop("outputs")
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(x.grad if x.requires_grad else None for x in inputs)

    @staticmethod
    def discard(outputs: tuple[torch.Tensor, ...], anchor: torch.Tensor, state: dict) -> None:
        """Free ``outputs`` of ``apply(fn, state, ...)`` until backward reaches
        ``anchor.grad_fn``."""

        def refill(index):
            def fill(dst):
                if "outputs" not in state:
                    _recompute(state)
                dst.copy_(state["outputs"][index])
            return fill

        for i, out in enumerate(outputs):
            discard_until_backward(out, anchor, refill(i))


def _recompute(state: dict) -> None:
    detached = tuple(x.detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x
                     for x in state["inputs"])
    with torch.enable_grad():
        state["outputs"] = state["fn"](*detached)
    state["detached"] = detached


class MultiLatentAttention(nn.Module):
    """``forward(hidden [S, B, H], attention_mask=None, rotary_pos_emb) -> (out, bias)``, as
    :class:`~moecore.transformer.attention.SelfAttention` (``[S/tp, B, H]`` in and out under
    sequence parallel). ``rotary_pos_emb``: ``[S, B or 1, 1, dr]`` angles of the model's
    :func:`~moecore.transformer.rope.build_rotary_embedding`. ``inference_context``: as
    :class:`~moecore.transformer.attention.SelfAttention`'s (the cache holds the up-projected
    ``k [S, B, nh_l, dn+dr]`` and ``v [S, B, nh_l, dv]``)."""

    def __init__(self, config, layer_number: int, parallel_state: ParallelState | None = None):
        super().__init__()
        ps = parallel_state or get_parallel_state()
        check_attention_layout(config, ps)
        self.config, self.layer_number, self.tp_group = config, layer_number, ps.tp_group
        self.cp_group = ps.cp_group
        tp, nh, H = ps.tp_size, config.num_attention_heads, config.hidden_size
        if nh % tp:
            raise ValueError(f"num_attention_heads={nh} is not divisible by the tensor parallel "
                             f"size {tp}")
        self.num_heads_local = nh // tp
        dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
        self.dims = (dn, dr, dv)
        self.sequence_parallel = bool(config.sequence_parallel) and tp > 1
        init = init_method_normal(config.init_method_std)
        col = dict(config=config, init_method=init, bias=False, gather_output=False,
                   parallel_state=ps)
        rq, rkv = config.q_lora_rank, config.kv_lora_rank
        self.q_layernorm = self.kv_layernorm = None
        if rq is None:
            self.linear_q_proj = ColumnParallelLinear(H, nh * (dn + dr), **col)
        else:
            self.linear_q_down_proj = ReplicatedLinear(H, rq, config, init, self.sequence_parallel)
            if config.qk_layernorm:
                self.q_layernorm = build_norm(config, rq, sequence_parallel=self.sequence_parallel)
            self.linear_q_up_proj = ColumnParallelLinear(rq, nh * (dn + dr), **col)
        self.linear_kv_down_proj = ReplicatedLinear(H, rkv + dr, config, init,
                                                    self.sequence_parallel)
        if config.qk_layernorm:
            self.kv_layernorm = build_norm(config, rkv, sequence_parallel=self.sequence_parallel)
        self.linear_kv_up_proj = ColumnParallelLinear(rkv, nh * (dn + dv), **col)
        self.linear_proj = RowParallelLinear(
            nh * dv, H, config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            parallel_state=ps)
        yarn = config.rope_type != "rope"  # Megatron: MLA takes YaRN unless told otherwise
        s = config.rotary_scaling_factor
        self.rope_mscale = (yarn_get_mscale(s, config.mscale)
                            / yarn_get_mscale(s, config.mscale_all_dim)) if yarn else 1.0
        m_all = yarn_get_mscale(s, config.mscale_all_dim) if yarn else 1.0
        self.softmax_scale = m_all * m_all / math.sqrt(dn + dr)

    def down_proj(self, hidden: torch.Tensor):
        """This rank's tokens ``[S_l, B, H]`` -> (the q up-projection's input: the normed q
        latent ``[S_l, B, rq]`` or ``hidden``, the normed kv latent ``[S_l, B, rkv]``,
        ``k_pe [S, B, 1, dr]`` over the whole sequence in the TP region)."""
        q_in = hidden
        if self.config.q_lora_rank is not None:
            q_in = self.linear_q_down_proj(hidden)
            if self.q_layernorm is not None:
                q_in = self.q_layernorm(q_in)
        kv = self.linear_kv_down_proj(hidden)
        kv_latent, k_pe = torch.split(kv, [self.config.kv_lora_rank, self.dims[1]], dim=-1)
        if self.kv_layernorm is not None:
            kv_latent = self.kv_layernorm(kv_latent)
        k_pe = k_pe.unsqueeze(2)
        if self.sequence_parallel:
            k_pe = gather_from_sequence_parallel_region(k_pe, True, group=self.tp_group)
        else:  # every head's gradient reaches the one shared k_pe: sum it over TP
            k_pe = copy_to_tensor_model_parallel_region(k_pe, group=self.tp_group)
        return q_in, kv_latent, k_pe

    def _rope(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of ``x [S, B, heads, dr]``; the result is de-interleaved
        (the same layout for q and k, so ``q . k`` is unchanged)."""
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        out = apply_rotary_pos_emb(x, freqs, fused=self.config.apply_rope_fusion)
        return out * self.rope_mscale if self.rope_mscale != 1.0 else out

    def up_proj_and_rope(self, freqs: torch.Tensor, q_in: torch.Tensor,
                         kv_latent: torch.Tensor, k_pe: torch.Tensor):
        """-> q, k ``[S, B, nh_l, dn+dr]``, v ``[S, B, nh_l, dv]`` (each owning its memory)."""
        dn, dr, dv = self.dims
        lora = self.config.q_lora_rank is not None
        q, _ = (self.linear_q_up_proj if lora else self.linear_q_proj)(q_in)
        kv, _ = self.linear_kv_up_proj(kv_latent)
        S, B = q.shape[:2]
        q_nope, q_pe = torch.split(q.view(S, B, self.num_heads_local, dn + dr), [dn, dr], dim=-1)
        k_nope, v = torch.split(kv.view(S, B, self.num_heads_local, dn + dv), [dn, dv], dim=-1)
        q = torch.cat((q_nope, self._rope(q_pe, freqs)), dim=-1)
        k_pe = self._rope(k_pe, freqs).expand(-1, -1, self.num_heads_local, -1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        return q, k, v.contiguous()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None, inference_context=None):
        if rotary_pos_emb is None:
            raise ValueError("multi-latent attention needs rotary angles: build the model with "
                             "--position-embedding-type rope")
        q_in, kv_latent, k_pe = self.down_proj(hidden)
        if inference_context is not None:
            q, k, v = self.up_proj_and_rope(rotary_pos_emb, q_in, kv_latent, k_pe)
            return self.linear_proj(inference_context.attend(
                self.layer_number, q, k, v, window=None, sinks=None,
                softmax_scale=self.softmax_scale))
        recompute_up = self.config.recomputes("mla_up_proj") and torch.is_grad_enabled()
        state: dict = {}
        if recompute_up:
            qkv = UpProjCheckpoint.apply(lambda *a: self.up_proj_and_rope(rotary_pos_emb, *a),
                                         state, q_in, kv_latent, k_pe)
        else:
            qkv = self.up_proj_and_rope(rotary_pos_emb, q_in, kv_latent, k_pe)
        context = self._attend(*qkv, attention_mask)
        if recompute_up:
            UpProjCheckpoint.discard(qkv, context, state)
        return self.linear_proj(context)

    def _attend(self, q, k, v, attention_mask):
        dropout_p = self.config.attention_dropout if self.training else 0.0

        def attend(q_, k_, v_):
            # Heads differ across TP ranks, so their dropout masks come from the TP-rank RNG.
            rng = tp_random.get_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
            with rng:
                return context_attention(q_, k_, v_, attention_mask, dropout_p,
                                         self.config.attention_backend, cp_group=self.cp_group,
                                         cp_comm_type=self.config.cp_comm_type,
                                         softmax_scale=self.softmax_scale)

        if self.config.recomputes("core_attn") and torch.is_grad_enabled():
            return tp_random.checkpoint(attend, False, q, k, v, group=self.tp_group)
        return attend(q, k, v)
