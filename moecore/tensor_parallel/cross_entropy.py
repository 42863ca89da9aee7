"""Cross entropy over logits whose vocabulary is split across the tensor-parallel group.

Never materialises the full ``[..., V]`` logits: each rank works on its ``[..., V/tp]`` slice and
the group exchanges only per-token scalars (the max, the target logit, the sum of exponentials
and, with label smoothing, the sum of logits), as in Megatron-Core.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moecore.tensor_parallel.utils import TP_GROUP, group_rank, group_size, resolve_group


def loss_from_partial_stats(stats: list, group, world: int, vocab: int, label_smoothing: float):
    """Per-token CE from this rank's partial sums over its vocab shard.

    ``stats``: [target_logit, sum_exp] (+ [sum of shifted logits] with label smoothing), each
    [tokens], shifted by the global row max; summed over the TP ``group`` in one all-reduce.
    Returns (loss [tokens], sum_exp [tokens], log_sum_exp [tokens], smoothing factor).
    """
    stats = torch.stack(stats)  # one all-reduce for every per-token sum
    if world > 1:
        dist.all_reduce(stats, group=group)
    target_logit, sum_exp = stats[0], stats[1]
    log_sum_exp = sum_exp.log()
    loss = log_sum_exp - target_logit
    smoothing = 0.0
    if label_smoothing > 0:
        # Megatron/NeMo: mass 1 - a on the target and a / (V - 1) on every other token
        # equals (1 - s) * nll - s * mean_i log p_i with s = a * V / (V - 1).
        smoothing = label_smoothing * vocab / (vocab - 1)
        mean_log_probs = stats[2] / vocab - log_sum_exp
        loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
    return loss, sum_exp, log_sum_exp, smoothing

class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, group):
        world, rank = group_size(group), group_rank(group)
        # fp32 math at least: bf16 exp/log sums lose the loss's low bits.
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        part = z.shape[-1]
        vocab = part * world
        z_max = z.amax(dim=-1)
        if world > 1:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        z = z - z_max.unsqueeze(-1)  # fresh tensor: the caller's logits stay untouched

        start = rank * part
        outside = (target < start) | (target >= start + part)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        exp = z.exp()
        stats = [target_logit, exp.sum(dim=-1)]
        if label_smoothing > 0:
            stats.append(z.sum(dim=-1))
        loss, sum_exp, _, smoothing = loss_from_partial_stats(
            stats, group, world, vocab, label_smoothing)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        ctx.smoothing, ctx.vocab, ctx.in_dtype, ctx.used = smoothing, vocab, logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy's backward reuses its saved softmax "
                               "buffer and can run only once; recompute the loss instead of "
                               "retain_graph=True")
        ctx.used = True
        softmax, outside, local_target = ctx.saved_tensors
        # d loss / d z_j = p_j - (1 - s) [j == target] - s / V; written into the softmax buffer
        # because it is the size of the logits.
        grad = softmax
        hit = (~outside).to(grad.dtype) * (1.0 - ctx.smoothing)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        if ctx.smoothing > 0:
            grad.sub_(ctx.smoothing / ctx.vocab)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, group=TP_GROUP) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` of ``vocab_parallel_logits [..., V/tp]`` (rank r holds
    vocabulary columns ``[r V/tp, (r+1) V/tp)``) against ``target [...]`` (global token ids).

    Collectives run over ``group`` (default: the TP group; ``None`` = unsplit logits). The loss
    is computed in at least fp32 and returned in that precision; the gradient comes back in the
    logits' dtype. ``label_smoothing`` ``a`` puts ``1 - a`` on the target and ``a / (V - 1)`` on
    every other token (Megatron's definition, not ``torch.nn.functional.cross_entropy``'s).
    On CUDA a fused Triton kernel computes it in one pass each way
    (:mod:`moecore.tensor_parallel.cross_entropy_kernel`): pass the logits in the model's dtype,
    not upcast.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on every dimension but the last")
    group = resolve_group(group)
    if label_smoothing > 0 and vocab_parallel_logits.shape[-1] * group_size(group) < 2:
        raise ValueError("label smoothing needs a vocabulary of at least 2 tokens")
    if vocab_parallel_logits.is_cuda:
        from moecore.tensor_parallel import cross_entropy_kernel as fused

        if fused.use_fused(vocab_parallel_logits):
            return fused.FusedVocabParallelCrossEntropy.apply(vocab_parallel_logits, target,
                                                              label_smoothing, group)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, group)
