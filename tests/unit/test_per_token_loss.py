"""``--calculate-per-token-loss``: the loss (and its gradient) is the sum over the global
batch's unmasked tokens divided by their count, micro-batches weighted by their tokens; the MoE
aux losses take the same 1/N factor, as in Megatron. Data parallelism: tests/parallel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.moe.losses import MoEAuxLossAutoScaler
from moecore.optimizer import MegatronOptimizer, get_param_groups
from moecore.optimizer.grad_sync import model_grad
from moecore.parallel_state import ParallelState
from moecore.training import loop, pretrain
from tests.cli import BASE

V, S, B = 40, 12, 2


def model_and_batches(moe: bool, seed: int = 0, n: int = 3, offset: int = 0, ps=None):
    """A small GPT and ``n`` micro-batches whose loss masks keep different token counts
    (micro-batch ``i + offset`` keeps ``3 * (i + offset) + 2`` tokens of each sequence)."""
    kw = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
              moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-2) if moe else {}
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=48, vocab_size=V, init_method_std=0.05, **kw)
    model = GPTModel(cfg, vocab_size=V, max_sequence_length=S,
                     parallel_state=ps or ParallelState.single())
    g = torch.Generator().manual_seed(100 + seed)
    batches = []
    for i in range(offset + n):  # draw the skipped ones too: micro-batch i is always the same
        tokens = torch.randint(0, V, (B, S), generator=g)
        mask = torch.zeros(B, S)
        mask[:, : 3 * i + 2] = 1.0
        batches.append({"tokens": tokens, "labels": torch.randint(0, V, (B, S), generator=g),
                        "loss_mask": mask, "position_ids": torch.arange(S).expand(B, S)})
    return model, batches[offset:]


def schedule_grads(model, batches, ps=None):
    """One ``--calculate-per-token-loss`` forward-backward through ``pretrain``'s schedule."""
    ps = ps or ParallelState.single()
    args = SimpleNamespace(calculate_per_token_loss=True, seq_length=S, micro_batch_size=B,
                           virtual_pipeline_model_parallel_size=None)
    opt = MegatronOptimizer(get_param_groups(model), lr=1e-3, weight_decay=0.0,
                            parallel_state=ps)
    opt.zero_grad()
    store = loop._run_schedule([model], batches, args, ps, False, opt)
    return store, opt


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_gradients_are_the_token_weighted_loss_gradients(moe):
    model, batches = model_and_batches(moe)
    store, _ = schedule_grads(model, batches)
    got = {n: model_grad(p).clone() for n, p in model.named_parameters()}
    loss = loop._reported_loss(store, ParallelState.single(), torch.device("cpu"), True)

    ref, _ = model_and_batches(moe)  # the same weights
    tokens = sum(b["loss_mask"].sum() for b in batches)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / tokens)  # Megatron: aux grads / N too
    total = 0.0
    for b in batches:
        per_token = loop.model_output(ref, b)
        masked = (per_token.float() * b["loss_mask"]).sum()
        (masked / tokens).backward()
        total += masked.detach()
    MoEAuxLossAutoScaler.set_loss_scale(1.0)
    torch.testing.assert_close(loss, total / tokens, rtol=1e-6, atol=0)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # not the mean of per-micro-batch means: the masks differ, so the losses differ
    means = torch.stack([(loop.model_output(ref, b) * b["loss_mask"]).sum() / b["loss_mask"].sum()
                         for b in batches]).mean()
    assert abs(means.item() - loss.item()) > 1e-3


def test_full_masks_train_exactly_like_the_mean_loss():
    """Equal token counts in every micro-batch: the same losses and gradient norms."""
    dense = BASE + ["--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "0"]
    mean = pretrain(dense)
    per_token = pretrain(dense + ["--calculate-per-token-loss"])
    torch.testing.assert_close(torch.tensor(per_token["lm_loss"]), torch.tensor(mean["lm_loss"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(per_token["grad_norm"]),
                               torch.tensor(mean["grad_norm"]), rtol=1e-4, atol=0)
