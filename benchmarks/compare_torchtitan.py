"""torchtitan's contender for ``benchmarks/e2e_compare.py``: its Llama-4 MoE model class
(``torchtitan.models.llama4``: token-choice MoE on ``torch._grouped_mm``) at the shared shape,
trained by a plain loop built from torchtitan's own single-GPU pieces (its trainer CLI needs a
tokenizer and HF dataset on disk): ``apply_compile`` (``torch.compile`` per block, as its
``--compile.enable``), bf16 autocast (its mixed precision without FSDP), its summed
cross-entropy (compiled), and ``build_optimizers_with_moe_load_balancing`` (fused AdamW plus its
auxiliary-loss-free expert-bias update). Every layer is MoE (``interleave_moe_layer_step=1``),
no shared expert, softmax router without top-k renormalisation (as moecore's default).
"""
# ruff: noqa: E402 - torchtitan is imported after the placeholders below

from __future__ import annotations

import importlib.util
import sys
import types

import torch


def _stand_in_for_unused_imports() -> None:
    """torchtitan imports its HF-dataset loader (``datasets``, which needs pyarrow) and its
    TensorBoard logger at package import; this contender uses neither (synthetic tokens, no
    logging). Where those packages are missing, placeholder modules that raise when used let
    the model and optimizer import."""
    def placeholder(name: str, **attrs) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module

    def unavailable(what: str):
        def fail(*_a, **_k):
            raise RuntimeError(f"{what} is not installed (placeholder in compare_torchtitan)")
        return fail

    if importlib.util.find_spec("datasets") is None:
        fail = unavailable("datasets")
        placeholder("datasets", Dataset=object, IterableDataset=object, load_dataset=fail)
        placeholder("datasets.distributed", split_dataset_by_node=fail)
    if importlib.util.find_spec("tensorboard") is None:
        placeholder("torch.utils.tensorboard", SummaryWriter=unavailable("tensorboard"))


_stand_in_for_unused_imports()

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
from torchtitan.config import JobConfig
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama4.infra.parallelize import apply_compile
from torchtitan.models.llama4.model.args import TransformerModelArgs
from torchtitan.models.llama4.model.model import Transformer
from torchtitan.models.moe import MoEArgs

from benchmarks.compare_common import (
    IntervalTimer,
    Recipe,
    Shape,
    init_single_process_group,
    micro_batches,
    result,
)


def model_args(shape: Shape, grouped_mm: bool) -> TransformerModelArgs:
    """Llama-4 args whose every layer is an MoE of ``shape.experts`` SwiGLU experts of
    ``shape.expert_ffn``: torchtitan derives the expert width from ``dim`` as
    ``round_up(int(ffn_dim_multiplier * int(8 * dim / 3)), multiple_of)``."""
    base = int(8 * shape.hidden / 3)
    moe = MoEArgs(num_experts=shape.experts, num_shared_experts=0, score_func="softmax",
                  route_norm=False, top_k=shape.topk, use_grouped_mm=grouped_mm,
                  load_balance_coeff=1e-3)
    return TransformerModelArgs(
        dim=shape.hidden, n_layers=shape.layers, n_heads=shape.heads,
        vocab_size=shape.padded_vocab, multiple_of=shape.expert_ffn,
        ffn_dim_multiplier=shape.expert_ffn / base, max_seq_len=shape.seq, rope_theta=10000,
        moe_args=moe, auto_scale_hidden_dim=False, interleave_moe_layer_step=1)


def _count_experts_on_cpu() -> None:
    """CPU smoke runs only: torchtitan's router counts tokens per expert with ``torch.histc``
    on int64 ids, which has no CPU kernel; count them with ``bincount`` (the same exact
    counts). This process runs only this contender, so the patch stays here."""
    histc = torch.histc

    def histc_ids(x, bins=100, min=0, max=0):  # noqa: A002 (torch.histc's names)
        if x.dtype.is_floating_point:
            return histc(x, bins=bins, min=min, max=max)
        return torch.bincount(x, minlength=bins)[:bins]

    torch.histc = histc_ids


def build(shape: Shape, device: torch.device, compile_model: bool):
    """(model, loss_fn, optimizers): fp32 parameters on ``device``, blocks compiled."""
    grouped_mm = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    args = model_args(shape, grouped_mm)
    with torch.device(device):
        model = Transformer(args)
    with torch.no_grad():  # as torchtitan's trainer
        model.init_weights(buffer_device=device)
    width = model.layers["0"].moe.experts.w1.shape[1]
    if width != shape.expert_ffn:
        raise RuntimeError(f"torchtitan expert width {width} != {shape.expert_ffn}")
    job = JobConfig()
    job.compile.enable = compile_model
    job.compile.components = ["model", "loss"]
    if compile_model:
        apply_compile(model, job.compile, ep_enabled=False)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1,
                        world_size=1)
    impl = "fused" if device.type == "cuda" else "foreach"
    opt = OptimizerConfig(name="AdamW", implementation=impl)
    optimizers = build_optimizers_with_moe_load_balancing([model], opt, dims)
    return model, build_cross_entropy_loss(job), optimizers


def run(shape: Shape, recipe: Recipe, device: torch.device, micro_batch: int,
        compile_model: bool = True) -> dict:
    """Train ``recipe.steps`` steps; the record of ``compare_common.result``."""
    torch.manual_seed(0)
    init_single_process_group(device)  # its MoE load-balancing hook asks for a mesh
    if device.type == "cpu":
        _count_experts_on_cpu()
    model, loss_fn, optimizers = build(shape, device, compile_model)
    for group in optimizers.optimizers[0].param_groups:
        group.update(betas=recipe.betas, eps=recipe.eps, weight_decay=recipe.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = recipe.global_batch * shape.seq
    losses, timer = [], IntervalTimer(device, recipe.log_interval)
    for step in range(recipe.steps):
        for group in optimizers.optimizers[0].param_groups:
            group["lr"] = recipe.lr_at(step)
        optimizers.zero_grad()
        step_loss = torch.zeros((), device=device)
        for tokens, labels in micro_batches(shape, recipe, micro_batch, step):
            tokens = tokens.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model(tokens), labels) / tokens_per_step
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad, foreach=True)
        optimizers.step()
        losses.append(step_loss)
        timer.step_done(step)
    return result("torchtitan", shape, recipe, timer.seconds, [x.item() for x in losses],
                  device, micro_batch, compile=compile_model,
                  experts_impl="grouped_mm" if model.model_args.moe_args.use_grouped_mm
                  else "for-loop")
