"""Megatron-Core's contender for ``benchmarks/e2e_compare.py``: its ``GPTModel`` with the local
(non-Transformer-Engine) layer spec and an MoE layer at the shared shape, trained the way
Megatron-LM's ``pretrain_gpt.py`` does: ``Float16Module`` (bf16 weights), its
``DistributedDataParallel`` (fp32 gradient buffer) and distributed optimizer (fp32 main params,
AdamW), ``forward_backward_no_pipelining`` over the micro-batches (which also scales the MoE
aux loss). Without Transformer Engine, Megatron-Core 0.19's local spec runs the experts as
``SequentialMLP`` (a loop over experts: its legacy ``grouped_gemm`` ``GroupedMLP`` is gone)
and attention as the unfused ``DotProductAttention``; those are its best settings here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from benchmarks.compare_common import (
    IntervalTimer,
    Recipe,
    Shape,
    init_single_process_group,
    micro_batches,
    result,
)


def config(shape: Shape, device: torch.device) -> TransformerConfig:
    """Megatron-Core's config of the shared shape (moecore's e2e flags, Megatron names)."""
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        ffn_hidden_size=shape.expert_ffn, moe_ffn_hidden_size=shape.expert_ffn,
        num_moe_experts=shape.experts, moe_router_topk=shape.topk,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        # alltoall (moecore's choice) makes a torch.cuda.Stream: the CPU smoke run all-gathers
        moe_token_dispatcher_type="alltoall" if device.type == "cuda" else "allgather",
        moe_grouped_gemm=False,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=True,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16, apply_rope_fusion=False, masked_softmax_fusion=False,
        use_cpu_initialization=device.type == "cpu", init_method_std=0.02)


def build(shape: Shape, recipe: Recipe, device: torch.device):
    """(model, optimizer): bf16 ``GPTModel`` in Megatron's DDP, its distributed optimizer. On
    CPU (the smoke run) the bare ``Float16Module`` and no optimizer (its DDP needs CUDA)."""
    init_single_process_group(device)
    parallel_state.initialize_model_parallel()
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = config(shape, device)
    spec = get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False,
                                    normalization="RMSNorm")
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=shape.padded_vocab,
                     max_sequence_length=shape.seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).to(device)
    model = Float16Module(cfg, model)
    if device.type == "cpu":  # its DDP buffers live on torch.cuda.current_device()
        return model, None
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(cfg, ddp, model)
    opt = OptimizerConfig(optimizer="adam", lr=recipe.lr, min_lr=recipe.min_lr,
                          weight_decay=recipe.weight_decay, adam_beta1=recipe.betas[0],
                          adam_beta2=recipe.betas[1], adam_eps=recipe.eps, bf16=True,
                          use_distributed_optimizer=True, clip_grad=recipe.clip_grad)
    return model, get_megatron_optimizer(opt, [model])


def _forward_step(data_iterator, model):
    """Megatron's ``forward_step_func``: per-token loss ``[B, S]`` and its mean."""
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    losses = model(tokens, position_ids, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        # a copy: the schedule divides the returned loss by the micro-batch count in place
        return loss, {"lm loss": loss.detach().clone()}

    return losses, loss_func


def run(shape: Shape, recipe: Recipe, device: torch.device, micro_batch: int) -> dict:
    """Train ``recipe.steps`` steps; the record of ``compare_common.result``. On CPU only
    builds the model (its forward needs CUDA) and says so in ``status``."""
    torch.manual_seed(0)
    model, optimizer = build(shape, recipe, device)
    if optimizer is None:
        n = sum(p.numel() for p in model.parameters())
        return {"name": "megatron-core", "status": f"built only ({n} params): its forward "
                "(rotary embedding), schedule and DDP buffers need CUDA"}
    forward_backward = get_forward_backward_func()
    n_micro = recipe.global_batch // micro_batch
    losses, timer = [], IntervalTimer(device, recipe.log_interval)
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        batches = iter([(t.to(device, non_blocking=True), y.to(device, non_blocking=True))
                        for t, y in micro_batches(shape, recipe, micro_batch, step)])
        out = forward_backward(forward_step_func=_forward_step, data_iterator=batches,
                               model=[model], num_microbatches=n_micro, seq_length=shape.seq,
                               micro_batch_size=micro_batch, forward_only=False)
        optimizer.step()
        losses.append(torch.stack([o["lm loss"] for o in out]).mean())
        timer.step_done(step)
    return result("megatron-core", shape, recipe, timer.seconds, [x.item() for x in losses],
                  device, micro_batch, experts_impl="SequentialMLP",
                  attention="DotProductAttention (unfused)")
