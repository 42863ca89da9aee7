"""Two micro-batches in flight through one dispatcher: both dispatches run before either combine
(combines in the opposite order, backwards last-in first-out) and give bit-identical outputs,
input grads, probability grads and expert-weight grads to running them one after the other.

For the all-gather, all-to-all and IPC dispatchers, dropless (top-k path), with a capacity
(drop only) and padded to capacity; in one process (EP=1) and on gloo at EP=2 (IPC through
POSIX shared memory), and at ETP=2 (all-gather, all-to-all). Also checks that the handles are
frozen and that dispatch leaves the dispatcher as it was.
"""

import dataclasses

import torch

from moecore.moe.dispatcher import peer_buffers
from moecore.moe.layer import MoELayer
from moecore.parallel_state import ParallelState
from tests.dist_harness import run_distributed
from tests.moe_reference import build_state, tiny_moe_config

H, E, K = 16, 8, 2
TOKENS = (6, 10)  # per micro-batch (equal on every rank: the all-gather needs it)
CAPACITY = dict(moe_expert_capacity_factor=1.0)
PADDED = dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
              moe_token_drop_policy="position")


def _micro_batch(rank: int, mb: int):
    """hidden [T, H], probs [T, E] (nonzero on the K chosen experts), routing_map [T, E],
    and the output gradient [T, H]."""
    gen = torch.Generator().manual_seed(1000 * mb + rank)
    t = TOKENS[mb]
    hidden = torch.randn(t, H, generator=gen)
    scores = torch.rand(t, E, generator=gen)
    routing = torch.zeros(t, E, dtype=torch.bool).scatter(1, scores.topk(K, dim=1).indices, True)
    probs = torch.softmax(scores, dim=1) * routing
    return hidden, probs, routing, torch.randn(t, H, generator=gen)


def _leaves(batch):
    hidden, probs, routing, grad = batch
    return hidden.clone().requires_grad_(True), probs.clone().requires_grad_(True), routing, grad


def _result(x, p, out):
    return out.detach(), x.grad, p.grad


def _one_after_the_other(layer, batches):
    disp, experts = layer.token_dispatcher, layer.experts
    results = []
    for batch in batches:
        x, p, routing, grad = _leaves(batch)
        tokens, tpe, probs_N, handle = disp.dispatch(x, p, routing)
        out = disp.combine(experts(tokens, tpe, probs_N)[0], handle)
        (out * grad).sum().backward()
        results.append(_result(x, p, out))
    return results


def _in_flight(layer, batches):
    """Dispatch 0, dispatch 1, experts 1, experts 0, combine 1, combine 0, backward 1, 0."""
    disp, experts = layer.token_dispatcher, layer.experts
    state = {k: id(v) for k, v in vars(disp).items()}
    leaves = [_leaves(b) for b in batches]
    dispatched = [disp.dispatch(x, p, routing) for x, p, routing, _ in leaves]
    assert {k: id(v) for k, v in vars(disp).items()} == state, "dispatch changed the dispatcher"
    for *_, handle in dispatched:
        assert dataclasses.is_dataclass(handle) and handle.__dataclass_params__.frozen
    expert_out = [None, None]
    for i in (1, 0):
        tokens, tpe, probs_N, _ = dispatched[i]
        expert_out[i] = experts(tokens, tpe, probs_N)[0]
    outs = [None, None]
    for i in (1, 0):
        outs[i] = disp.combine(expert_out[i], dispatched[i][3])
    for i in (1, 0):
        (outs[i] * leaves[i][3]).sum().backward()
    return [_result(x, p, out) for (x, p, _, _), out in zip(leaves, outs)]


def _param_grads(layer):
    return {n: p.grad.clone() for n, p in layer.experts.named_parameters()}


def _check_case(rank: int, ps: ParallelState, kind: str, overrides: dict):
    cfg = tiny_moe_config(expert_model_parallel_size=ps.ep_size,
                          expert_tensor_parallel_size=ps.etp_size,
                          moe_token_dispatcher_type=kind, hidden_size=H, num_moe_experts=E,
                          moe_router_topk=K, **overrides)
    torch.manual_seed(7)
    layer = MoELayer(cfg, parallel_state=ps)
    batches = [_micro_batch(rank, mb) for mb in range(len(TOKENS))]
    want = _one_after_the_other(layer, batches)
    want_params = _param_grads(layer)
    layer.zero_grad(set_to_none=True)
    got = _in_flight(layer, batches)
    tag = f"{kind} EP={ps.ep_size} ETP={ps.etp_size} {overrides}"
    for mb, (a, b) in enumerate(zip(got, want)):
        for name, x, y in zip(("output", "hidden grad", "probs grad"), a, b):
            assert torch.equal(x, y), f"{name} of micro-batch {mb} differs ({tag})"
    for name, g in _param_grads(layer).items():
        assert torch.equal(g, want_params[name]), f"grad of {name} differs ({tag})"


def _check_all(rank: int, ps: ParallelState, kinds=("allgather", "alltoall", "ipc")) -> bool:
    for kind in kinds:
        for overrides in ({}, CAPACITY, PADDED):
            _check_case(rank, ps, kind, overrides)
    peer_buffers.destroy_peer_buffers()
    return True


def test_two_micro_batches_in_flight_ep1():
    assert _check_all(0, ParallelState.single())


def _world(rank, world):
    return (_check_all(rank, build_state(world, tp=1, ep=world, etp=1))
            and _check_all(rank, build_state(world, tp=1, ep=1, etp=world),
                           kinds=("allgather", "alltoall")))


def test_two_micro_batches_in_flight_ep2_and_etp2():
    assert all(run_distributed(_world, 2, timeout=300))
