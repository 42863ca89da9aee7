"""IPC dispatcher on CPU (gloo + POSIX shared memory) at EP=2 and EP=4.

Per world size, one spawn runs every check:
- check_dispatch: every routed row arrives exactly once, in its [local_expert, src_rank] slot,
  bit-identical to the all-to-all dispatcher (ranks with different and zero token counts,
  experts and a whole rank that receive nothing);
- check_combine: the pull returns exactly what the experts produced; combine = weighted sum;
- MoELayer(ipc) == MoELayer(alltoall): outputs and grads of the input and every parameter,
  dropless, with empty experts, with capacity (drop and pad), two stacked layers sharing the
  buffers; and the single-process reference at TP=2+SP;
- buffer growth, overflow raised before anything is written, cross-host refusal, and no
  /dev/shm segment or mapping left after destroy.
"""

import gc
import os
import time

import pytest
import torch
import torch.distributed as dist

from moecore.moe.dispatcher import (
    MoEAlltoAllTokenDispatcher,
    MoEIPCTokenDispatcher,
    ipc,
    peer_buffers,
)
from moecore.moe.layer import MoELayer
from tests.dist_harness import run_distributed
from tests.moe_reference import build_state, rel_err, tiny_moe_config
from tests.parallel.test_moe_layer_parallel import _run_case

H, E, K = 16, 8, 2


def _routing(num_tokens, excluded, gen):
    """routing_map [T, E] with exactly K experts per token, never one of ``excluded``;
    probs [T, E] positive on the chosen experts."""
    allowed = torch.tensor([e for e in range(E) if e not in excluded])
    routing = torch.zeros(num_tokens, E, dtype=torch.bool)
    for t in range(num_tokens):
        routing[t, allowed[torch.randperm(len(allowed), generator=gen)[:K]]] = True
    probs = torch.rand(num_tokens, E, generator=gen) * routing
    return routing, probs


def _tagged_inputs(rank, world, excluded, seed):
    """Different token counts per rank (the last rank of EP=4 has none); column 0 holds the
    source rank and column 1 the token index, so every row says where it came from."""
    gen = torch.Generator().manual_seed(seed + rank)
    num_tokens = 0 if (world == 4 and rank == world - 1) else 5 + 3 * rank
    hidden = torch.randn(num_tokens, H, generator=gen)
    hidden[:, 0] = rank
    hidden[:, 1] = torch.arange(num_tokens)
    routing, probs = _routing(num_tokens, excluded, gen)
    return hidden, probs, routing  # dispatch's argument order


def _gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_dispatch(tokens, tokens_per_expert, rank, world, everyone):
    """The owner holds, for each local expert then each source rank, exactly that source's
    rows routed to the expert, in token order; each (src, token, expert) arrives once."""
    e_local = E // world
    expected, counts, triples = [], [], []
    for le in range(e_local):
        e = rank * e_local + le
        for hidden, _, routing in everyone:
            rows = hidden[routing[:, e]]
            expected.append(rows)
            triples += [(int(r[0]), int(r[1]), e) for r in rows]
        counts.append(sum(int(r[:, e].sum()) for _, _, r in everyone))
    assert torch.equal(tokens, torch.cat(expected)), "dispatched rows differ"
    assert tokens_per_expert.tolist() == counts, (tokens_per_expert, counts)
    expert_of_row = torch.repeat_interleave(torch.arange(e_local), tokens_per_expert)
    got = [(int(r[0]), int(r[1]), rank * e_local + int(le)) for r, le in zip(tokens,
                                                                            expert_of_row)]
    assert len(set(got)) == len(got) and sorted(got) == sorted(triples)


def check_combine(ipc_disp, a2a_disp, handles, tokens, tokens_per_expert, probs_N, rank,
                  world, mine):
    """Experts scale each row by (global expert + 1) and by its dispatched probability; combine
    returns exactly the sum of what they produced: the probability-weighted sum."""
    e_local = E // world
    ipc_handle, a2a_handle = handles
    expert_of_row = rank * e_local + torch.repeat_interleave(torch.arange(e_local),
                                                             tokens_per_expert)
    expert_out = tokens * ((expert_of_row + 1).float() * probs_N).unsqueeze(1)
    out = ipc_disp.combine(expert_out, ipc_handle)
    hidden, probs, _ = mine
    want = hidden * (probs * torch.arange(1, E + 1).float()).sum(1, keepdim=True)
    assert out.shape == want.shape and (want.numel() == 0 or rel_err(out, want) < 1e-6), (
        rel_err(out, want), out[:2], want[:2])
    assert torch.equal(out, a2a_disp.combine(expert_out, a2a_handle))


def _check_exchanges(rank, world, ps):
    """Dispatch/combine validators, ipc vs alltoall, and forward/backward equality."""
    cfg = tiny_moe_config(expert_model_parallel_size=world, expert_tensor_parallel_size=1,
                          moe_token_dispatcher_type="ipc", hidden_size=H, num_moe_experts=E)
    # A whole rank's experts (EP=4: rank 1's experts 2 and 3) and single experts get no rows.
    excluded = {2, 3, 7} if world == 4 else {3, 6}
    for seed in (0, 1):
        mine = _tagged_inputs(rank, world, excluded, seed * 100)
        everyone = _gather(mine, ps.ep_group)
        ipc_disp = MoEIPCTokenDispatcher(cfg, parallel_state=ps)
        a2a_disp = MoEAlltoAllTokenDispatcher(cfg, parallel_state=ps)
        tokens, tpe, probs_N, ipc_handle = ipc_disp.dispatch(*mine)
        ref_tokens, ref_tpe, ref_probs, a2a_handle = a2a_disp.dispatch(*mine)
        assert torch.equal(tokens, ref_tokens) and torch.equal(tpe, ref_tpe)
        assert torch.equal(probs_N, ref_probs)
        check_dispatch(tokens, tpe, rank, world, everyone)
        check_combine(ipc_disp, a2a_disp, (ipc_handle, a2a_handle), tokens, tpe, probs_N, rank,
                      world, mine)

    # Gradients of the pure exchange: identical to the all-to-all's.
    hidden, probs, routing = mine
    gen = torch.Generator().manual_seed(5 + rank)
    grads = []
    for disp in (MoEIPCTokenDispatcher(cfg, parallel_state=ps),
                 MoEAlltoAllTokenDispatcher(cfg, parallel_state=ps)):
        x = hidden.clone().requires_grad_(True)
        p = probs.clone().requires_grad_(True)
        tokens, _, probs_N, handle = disp.dispatch(x, p, routing)
        out = disp.combine((tokens * 2.0 + 1.0) * probs_N.unsqueeze(1), handle)
        gen.manual_seed(5 + rank)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        grads.append((x.grad, p.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _layer_pair(rank, world, ps, overrides, stacked=False):
    """MoELayer(ipc) vs MoELayer(alltoall): output, input grad and every parameter grad."""
    results = []
    for dispatcher in ("ipc", "alltoall"):
        cfg = tiny_moe_config(expert_model_parallel_size=world, expert_tensor_parallel_size=1,
                              moe_token_dispatcher_type=dispatcher, **overrides)
        torch.manual_seed(1234)
        layers = [MoELayer(cfg, layer_number=i + 1, parallel_state=ps)
                  for i in range(2 if stacked else 1)]
        if cfg.moe_router_enable_expert_bias:  # experts 1 and 5 never chosen
            for layer in layers:
                layer.router.expert_bias[[1, 5]] = -1e4
        gen = torch.Generator().manual_seed(77 + rank)
        x = torch.randn(6, 2, cfg.hidden_size, generator=gen).requires_grad_(True)
        out = x
        for layer in layers:
            out = layer(out)[0]
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        grads = {f"{i}.{n}": p.grad for i, layer in enumerate(layers)
                 for n, p in layer.named_parameters()}
        results.append((out.detach(), x.grad, grads))
    (out, xg, grads), (ref_out, ref_xg, ref_grads) = results
    tag = f"EP={world} {overrides} stacked={stacked}"
    assert rel_err(out, ref_out) < 1e-6, f"output {tag}"
    assert rel_err(xg, ref_xg) < 1e-6, f"input grad {tag}"
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-6, f"grad of {name} {tag}"


def _check_layers(rank, world, ps):
    for overrides, stacked in (({}, True),
                               (dict(moe_router_enable_expert_bias=True), False),
                               (dict(moe_expert_capacity_factor=1.0), False),
                               (dict(moe_expert_capacity_factor=1.0,
                                     moe_pad_expert_input_to_capacity=True,
                                     moe_token_drop_policy="position"), False)):
        _layer_pair(rank, world, ps, overrides, stacked)
    # Against the single-process layer, with attention TP + sequence parallel around it.
    _run_case(rank, world, dict(tp=2, ep=world, etp=1, sp=True), "ipc", {})
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=1"):
        MoEIPCTokenDispatcher(tiny_moe_config(tensor_model_parallel_size=1,
                                              expert_model_parallel_size=1,
                                              expert_tensor_parallel_size=world,
                                              moe_token_dispatcher_type="ipc"),
                              parallel_state=build_state(world, tp=1, ep=1, etp=world))


def _shm_names():
    mine = f"{peer_buffers.SHM_PREFIX}{os.getpid()}_"
    return [n for n in os.listdir("/dev/shm") if n.startswith(mine)]


def _shm_mappings():
    with open("/proc/self/maps") as f:
        return [line for line in f if f"/{peer_buffers.SHM_PREFIX}" in line]


def _route_for(rank, world, group, rows_per_expert):
    tpe = torch.full((E,), rows_per_expert, dtype=torch.int64)
    return ipc.build_route(tpe, group, rank, world)


def _stress_alternating_halves(rank, bufs, route, opts):
    """Back-to-back exchanges while one rank dawdles after each barrier (before reading):
    the others run ahead into the next exchange, which must not touch rows still being read."""
    barrier = bufs.barrier
    bufs.barrier = lambda: (barrier(), time.sleep(0.02 if rank == 0 else 0))
    try:
        for step in range(4):
            rows = torch.full((route.num_rows, 2048), float(10 * step + rank))
            owned = ipc.push_rows(rows, route, bufs, opts)
            assert torch.equal(ipc.pull_rows(owned + 1, route, bufs, opts), rows + 1), step
    finally:
        bufs.barrier = barrier


def _check_buffers(rank, world, ps):
    """Growth, overflow before any write, no leaks."""
    group = ps.ep_group
    bufs = peer_buffers.PeerBuffers(group, torch.device("cpu"))
    opts = ipc.ExchangeOptions(limit=64 << 20)
    for rows_per_expert, cols in ((1, 16), (40, 2048)):  # halves of 1 MiB, then 4 MiB
        route = _route_for(rank, world, group, rows_per_expert)
        rows = torch.randn(route.num_rows, cols)
        owned = ipc.push_rows(rows, route, bufs, opts)
        back = ipc.pull_rows(owned * 3, route, bufs, opts)
        assert torch.equal(back, rows * 3)
        assert not _shm_names(), "segment names must be unlinked once mapped"
    assert bufs.allocations == 2 and bufs.nbytes >= route.max_recv_rows * 2048 * 4
    _stress_alternating_halves(rank, bufs, route, opts)
    # Overflow: raised on every rank before anything is written.
    own = [bufs.views(torch.float32, 2048, half)[rank] for half in (0, 1)]
    bufs.barrier()  # peers may still be pulling from our buffer
    for o in own:
        o.fill_(7.0)
    before = bufs.nbytes
    route = _route_for(rank, world, group, 100)
    with pytest.raises(ipc.IPCBufferOverflowError, match="--moe-ipc-buffer-max-mb"):
        ipc.push_rows(torch.randn(route.num_rows, 2048), route, bufs,
                      ipc.ExchangeOptions(limit=2 << 20))
    assert bufs.nbytes == before, "overflow reallocated"
    assert all(bool((o == 7.0).all()) for o in own), "overflow wrote into a buffer"
    del own
    # The config bound reaches the layer.
    cfg = tiny_moe_config(expert_model_parallel_size=world, expert_tensor_parallel_size=1,
                          moe_token_dispatcher_type="ipc", moe_ipc_buffer_max_mb=1e-4)
    with pytest.raises(ipc.IPCBufferOverflowError):
        MoELayer(cfg, parallel_state=ps)(torch.randn(6, 2, cfg.hidden_size))
    bufs.release()
    peer_buffers.destroy_peer_buffers()
    gc.collect()
    assert not _shm_names() and not _shm_mappings(), _shm_mappings()


def _check_cross_host(rank, world, ps):
    real = peer_buffers._host_id
    peer_buffers._host_id = lambda: f"node{rank % 2}/boot{rank % 2}"
    try:
        cfg = tiny_moe_config(expert_model_parallel_size=world, expert_tensor_parallel_size=1,
                              moe_token_dispatcher_type="ipc")
        layer = MoELayer(cfg, parallel_state=ps)
        peer_buffers.destroy_peer_buffers()  # a fresh start: the check runs at allocation
        with pytest.raises(ValueError, match="spans 2 hosts.*alltoall"):
            layer(torch.randn(6, 2, cfg.hidden_size))
    finally:
        peer_buffers._host_id = real
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # torchrun's placement: one rank per node
    try:
        with pytest.raises(ValueError, match="spans .* nodes"):
            MoEIPCTokenDispatcher(cfg, parallel_state=ps)
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]


def _world(rank, world):
    ps = build_state(world, tp=1, ep=world, etp=1)
    _check_exchanges(rank, world, ps)
    _check_layers(rank, world, ps)
    _check_buffers(rank, world, ps)
    _check_cross_host(rank, world, ps)
    peer_buffers.destroy_peer_buffers()
    gc.collect()
    assert not _shm_names() and not _shm_mappings()
    return True


def test_ipc_dispatcher_ep2():
    assert all(run_distributed(_world, 2, timeout=300))


def test_ipc_dispatcher_ep4():
    assert all(run_distributed(_world, 4, timeout=300))


def test_peer_copy_triton_kernel_matches_torch():
    """The Triton push/pull kernel (interpreted on CPU) against the per-peer torch reference."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from moecore.kernels import peer_copy

    kernel = peer_copy._peer_copy_kernel
    peer_copy._peer_copy_kernel = InterpretedFunction(kernel.fn)
    try:
        gen = torch.Generator().manual_seed(0)
        for splits, cols in (([3, 0, 5], 13), ([0, 0, 0], 8), ([4, 2], 1030)):
            n, cap = sum(splits), 12
            rows = torch.randn(n, cols, generator=gen)
            owner = torch.repeat_interleave(torch.arange(len(splits)),
                                            torch.tensor(splits)).int()
            slot = torch.cat([torch.randperm(cap, generator=gen)[:s] for s in splits])
            peers = [torch.zeros(cap, cols) for _ in splits]
            ref = [torch.zeros(cap, cols) for _ in splits]
            table = torch.tensor([p.data_ptr() for p in peers], dtype=torch.int64)
            peer_copy.push_triton(rows, slot, owner, splits, peers, table)
            peer_copy.push_torch(rows, slot, owner, splits, ref, None)
            assert all(torch.equal(a, b) for a, b in zip(peers, ref))
            out = torch.empty(n, cols)
            peer_copy.pull_triton(out, slot, owner, splits, peers, table)
            assert torch.equal(out, rows)
        del triton
    finally:
        peer_copy._peer_copy_kernel = kernel


def test_ipc_flags_reach_the_config():
    from moecore.arguments import parse_args, transformer_config_from_args

    argv = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
            "--micro-batch-size 2 --lr 1e-3 --train-iters 10 --mock-data --vocab-size 100 "
            "--device cpu --num-experts 4 --disable-bias-linear --moe-token-dispatcher-type ipc "
            "--moe-ipc-buffer-max-mb 512").split()
    cfg = transformer_config_from_args(parse_args(argv))
    assert cfg.moe_token_dispatcher_type == "ipc" and cfg.moe_ipc_buffer_max_mb == 512
    with pytest.raises(ValueError, match="moe_ipc_buffer_max_mb"):
        tiny_moe_config(moe_ipc_buffer_max_mb=0)
