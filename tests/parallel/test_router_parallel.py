"""TopKRouter on 2 gloo ranks equals the single-process router on the full token set:
TP=2 with sequence parallel (aux / seq-aux / global-aux / z-loss values, summed router-weight
grads, token counts, expert-bias updates) and data parallel (global aux loss), one spawn."""

import torch
import torch.distributed as dist

from moecore.config import TransformerConfig
from moecore.moe.losses import LOAD_BALANCING_LOSS_NAMES, MoELossTracker
from moecore.moe.router import TopKRouter, update_expert_bias
from moecore.parallel_state import ParallelSizes, ParallelState
from tests.dist_harness import run_distributed

S, B, H, E = 8, 3, 8, 8
TOL = 1e-5

VARIANTS = [
    dict(moe_router_load_balancing_type="aux_loss"),
    dict(moe_router_load_balancing_type="seq_aux_loss", moe_router_pre_softmax=True),
    dict(moe_router_load_balancing_type="global_aux_loss", moe_router_score_function="sigmoid",
         moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk=3,
         moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.0),
    # Dropping is per rank, so only the losses (taken before dropping) must match.
    dict(moe_router_load_balancing_type="aux_loss", moe_expert_capacity_factor=0.5),
    # DeepSeek-V3 style: two balance losses with their own coefficients, sigmoid with the
    # (ignored) pre-softmax flag, groups and expert bias.
    dict(moe_router_load_balancing_type=["seq_aux_loss", "global_aux_loss"],
         moe_aux_loss_coeff=[0.1, 0.05], moe_router_score_function="sigmoid",
         moe_router_pre_softmax=True, moe_router_num_groups=4, moe_router_group_topk=2,
         moe_router_topk=3, moe_router_enable_expert_bias=True,
         moe_router_topk_scaling_factor=2.5),
]


def _cfg(**over):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=2, num_moe_experts=E,
                moe_router_topk=2, init_method_std=0.5, moe_aux_loss_coeff=0.1,
                moe_z_loss_coeff=0.01)
    base.update(over)
    return TransformerConfig(**base)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sum(t, group):
    dist.all_reduce(t, group=group)
    return t


def _pair(over, ps, rank, **par):
    """(parallel router, single-process reference) with identical weights and bias."""
    torch.manual_seed(11)
    router = TopKRouter(_cfg(**over, **par), layer_number=1, parallel_state=ps)
    torch.manual_seed(11)
    ref = TopKRouter(_cfg(**over), layer_number=1, parallel_state=ParallelState.single())
    if router.expert_bias is not None:
        bias = torch.linspace(-0.2, 0.2, E)
        router.expert_bias.copy_(bias)
        ref.expert_bias.copy_(bias)
    return router, ref


def _run(router, x, upstream):
    MoELossTracker.clear()
    probs, rmap = router(x)
    (probs * upstream).sum().backward()
    return probs.detach(), rmap


def _check_tp2_sp(rank, ps, over):
    router, ref = _pair(over, ps, rank, tensor_model_parallel_size=2, sequence_parallel=True)
    assert router.weight.sequence_parallel is True and router.shard_size == 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, B, H, generator=g)
    dropping = over.get("moe_expert_capacity_factor") is not None
    # With dropping the downstream grads differ by design; isolate the losses' grads.
    upstream = torch.randn(S, B, E, generator=g) * (0.0 if dropping else 1.0)
    ref_probs, _ = _run(ref, x, upstream.view(-1, E))
    ref_vals = MoELossTracker.reduce()
    local = slice(rank * S // 2, (rank + 1) * S // 2)
    probs, _ = _run(router, x[local], upstream[local].reshape(-1, E))
    vals = MoELossTracker.reduce()  # sums each layer's shares over the TP (shard) group
    tag = str(over)
    types = over["moe_router_load_balancing_type"]
    names = {LOAD_BALANCING_LOSS_NAMES[t] for t in ([types] if isinstance(types, str) else types)}
    assert set(vals) == names | {"z_loss"}, tag
    for name, want in ref_vals.items():
        assert _rel(vals[name], want) < TOL, (name, vals[name], want, tag)
    # Per-rank shares add up to the reference too (what the trainer logs per layer).
    for name in sorted(names):  # the same all-reduce order on every rank
        share = _sum(router.last_stats[name].clone(), ps.tp_group)
        assert _rel(share, ref.last_stats[name]) < TOL, (name, tag)
    assert torch.equal(router.last_stats["tokens_per_expert"],
                       ref.last_stats["tokens_per_expert"]), tag
    if not dropping:
        assert _rel(probs, ref_probs.view(S, B, E)[local].reshape(-1, E)) < TOL, tag
    grad = _sum(router.weight.grad.clone(), ps.tp_group)
    assert _rel(grad, ref.weight.grad) < TOL, (_rel(grad, ref.weight.grad), tag)
    if router.expert_bias is not None:
        update_expert_bias([router])
        update_expert_bias([ref])
        assert torch.equal(router.expert_bias, ref.expert_bias), tag
        assert not torch.equal(router.expert_bias, torch.linspace(-0.2, 0.2, E)), tag


def _check_dp2_global(rank, ps):
    """Global aux loss across data-parallel ranks equals the aux loss of the joint batch."""
    over = dict(moe_router_load_balancing_type="global_aux_loss", moe_z_loss_coeff=None)
    router, _ = _pair(over, ps, rank)
    torch.manual_seed(11)
    ref = TopKRouter(_cfg(moe_z_loss_coeff=None), layer_number=1,
                     parallel_state=ParallelState.single())
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(S, B, H, generator=g) for _ in range(2)]
    zero = torch.zeros(S * B, E)
    _run(ref, torch.cat(xs, dim=1), torch.zeros(2 * S * B, E))
    ref_val = MoELossTracker.values()["load_balancing_loss"]
    _run(router, xs[rank], zero)
    vals = MoELossTracker.reduce()  # averages over data parallel for the global loss
    assert _rel(vals["global_load_balancing_loss"], ref_val) < TOL, (vals, ref_val)
    grad = _sum(router.weight.grad.clone(), ps.dp_group) / 2  # the DP gradient mean
    assert _rel(grad, ref.weight.grad) < TOL, _rel(grad, ref.weight.grad)

    # reduce(group=...) unions names and sizes over the group (pipeline stages differ).
    MoELossTracker.clear()
    if rank == 0:
        MoELossTracker.save("a", 1, torch.tensor(1.5))
    else:
        MoELossTracker.save("b", 2, torch.tensor(2.0), num_layers=3)
    out = MoELossTracker.reduce(group=ps.dp_group)
    assert out["a"].tolist() == [1.5] and out["b"].tolist() == [0.0, 2.0, 0.0], out
    MoELossTracker.clear()


def _world2(rank, world):
    tp_state = ParallelState.build(ParallelSizes(world_size=2, tp=2))
    dp_state = ParallelState.build(ParallelSizes(world_size=2))
    for over in VARIANTS:
        _check_tp2_sp(rank, tp_state, over)
    _check_dp2_global(rank, dp_state)
    return True


def test_router_tp2_sp_and_dp2_match_single_process():
    assert all(run_distributed(_world2, 2, timeout=240))
