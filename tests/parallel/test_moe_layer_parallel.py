"""MoELayer at EP=2/4, ETP=2 and TP=2+SP equals the single-process layer: outputs, input grads,
every parameter's grad (shard by shard), and the aux-loss value; allgather == alltoall."""

import torch
import torch.distributed as dist

from moecore.moe.layer import MoELayer
from moecore.moe.losses import MoELossTracker
from moecore.parallel_state import ParallelState
from tests.dist_harness import run_distributed
from tests.moe_reference import build_state, reference_shard, rel_err, tiny_moe_config

TOL = 2e-5
S, B = 6, 2


def _sum(t, group):
    if group is not None:  # None would mean the whole world to torch.distributed
        dist.all_reduce(t, group=group)


def _inputs(world, tp, sp, seed):
    """Per-rank inputs [S_local, B, H] and upstream grads, identical on every rank.

    Ranks in one TP group share a sequence (split along S under SP); other ranks hold
    different sequences (data parallel).
    """
    g = torch.Generator().manual_seed(seed)
    n_seq = world // tp
    xs = [torch.randn(S, B, 16, generator=g) for _ in range(n_seq)]
    gs = [torch.randn(S, B, 16, generator=g) for _ in range(n_seq)]
    return xs, gs


def _local(t, rank, tp, sp):
    if not sp or tp == 1:
        return t
    return t.chunk(tp, dim=0)[rank % tp]


def _run_case(rank, world, layout, dispatcher, cfg_over):
    tp, ep, etp, sp = layout["tp"], layout["ep"], layout.get("etp"), layout.get("sp", False)
    cfg = tiny_moe_config(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp, sequence_parallel=sp,
                          moe_token_dispatcher_type=dispatcher, **cfg_over)
    ref_cfg = tiny_moe_config(moe_token_dispatcher_type=dispatcher, **cfg_over)
    ps = build_state(world, tp=tp, ep=ep, etp=etp)
    torch.manual_seed(1234)
    layer = MoELayer(cfg, layer_number=1, parallel_state=ps)
    torch.manual_seed(1234)
    ref = MoELayer(ref_cfg, layer_number=1, parallel_state=ParallelState.single())
    xs, gs = _inputs(world, tp, sp, seed=7)

    # Reference: every sequence separately (one micro-batch per data-parallel replica).
    ref_outs, ref_xgrads, ref_aux = [], [], []
    for x, gout in zip(xs, gs):
        MoELossTracker.clear()
        x = x.clone().requires_grad_(True)
        out, _ = ref(x)
        (out * gout).sum().backward()
        ref_outs.append(out.detach())
        ref_xgrads.append(x.grad)
        ref_aux.append(MoELossTracker.values()["load_balancing_loss"].sum().item())

    seq = rank // tp
    MoELossTracker.clear()
    x = _local(xs[seq], rank, tp, sp).clone().requires_grad_(True)
    out, _ = layer(x)
    (out * _local(gs[seq], rank, tp, sp)).sum().backward()
    tag = f"{layout} {dispatcher} {cfg_over}"
    assert rel_err(out.detach(), _local(ref_outs[seq], rank, tp, sp)) < TOL, f"output {tag}"
    assert rel_err(x.grad, _local(ref_xgrads[seq], rank, tp, sp)) < TOL, f"input grad {tag}"

    # Aux loss: the per-rank shares of a TP group add up to the reference value of its sequence.
    aux = torch.tensor([MoELossTracker.values()["load_balancing_loss"].sum().item()])
    _sum(aux, ps.tp_group)
    assert abs(aux.item() - ref_aux[seq]) <= 1e-5 * abs(ref_aux[seq]) + 1e-9, f"aux {tag}"

    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        grad = p.grad.clone()
        expert = name.startswith("experts.")
        if not expert:
            # Dense grads: sum over data-parallel replicas; replicated params under SP also
            # sum over TP (each rank saw a slice of the tokens).
            _sum(grad, ps.dp_group)
            if getattr(p, "sequence_parallel", False):
                _sum(grad, ps.tp_group)
        else:
            # Expert grads sum over the expert-data-parallel replicas.
            _sum(grad, ps.edp_group)
        want = reference_shard(name, ref_params[name].grad, cfg, ps)
        assert grad.shape == want.shape, (name, grad.shape, want.shape, tag)
        assert rel_err(grad, want) < TOL, f"grad of {name}: {rel_err(grad, want)} {tag}"
    return out.detach()


def _world2(rank, world):
    layouts = [dict(tp=1, ep=2), dict(tp=1, ep=1, etp=2), dict(tp=2, ep=1, sp=True),
               dict(tp=2, ep=2, etp=1, sp=True)]
    extra = [{}, dict(moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True)]
    for layout in layouts:
        outs = {}
        for dispatcher in ("alltoall", "allgather"):
            for over in extra:
                outs[(dispatcher, len(over))] = _run_case(rank, world, layout, dispatcher, over)
        assert torch.equal(outs[("alltoall", 0)], outs[("allgather", 0)]) or rel_err(
            outs[("alltoall", 0)], outs[("allgather", 0)]) < 1e-6
    # Token dropping with a capacity: each data-parallel rank drops on its own tokens.
    for over in (dict(moe_expert_capacity_factor=1.0),
                 dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
                      moe_token_drop_policy="position")):
        for dispatcher in ("alltoall", "allgather"):
            _run_case(rank, world, dict(tp=1, ep=2), dispatcher, over)
    return True


def _world4(rank, world):
    for layout in (dict(tp=1, ep=4), dict(tp=1, ep=2, etp=2), dict(tp=2, ep=2, sp=True),
                   dict(tp=2, ep=4, etp=1, sp=True)):
        for dispatcher in ("alltoall", "allgather"):
            _run_case(rank, world, layout, dispatcher, {})
    return True


def test_moe_layer_world2_matches_reference():
    assert all(run_distributed(_world2, 2, timeout=400))


def test_moe_layer_world4_matches_reference():
    assert all(run_distributed(_world4, 4, timeout=400))
