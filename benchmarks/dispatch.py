"""Dispatch + combine time and bandwidth per GPU: NCCL all-to-all vs the IPC dispatcher.

One process per GPU, the expert-parallel group = all of them (ETP=1):

    torchrun --nproc-per-node 2 benchmarks/dispatch.py --json dispatch.json
    torchrun --nproc-per-node 4 benchmarks/dispatch.py --experts 8 64 --layer

For each expert count it times, per dispatcher (``alltoall``, ``ipc``; ``--ipc-torch-copy``
adds ``ipc`` with the per-peer torch copies instead of the Triton kernel):

- ``fwd``: ``dispatch`` + ``combine`` of bf16 tokens ``[T, H]`` routed top-k (identity
  experts: the dispatched rows go straight back), including permute, the count exchange (one
  host sync), the exchange itself and the weighted unpermute;
- ``fwd+bwd``: the same plus the backward of both exchanges (grads of tokens and probs);
- with ``--layer``: a whole ``MoELayer`` forward+backward (router, grouped-GEMM SwiGLU experts
  of ``--ffn``) with each dispatcher.

Routing: uniform random top-k per token (balanced in expectation). Bandwidth per GPU = bytes
of routed rows that leave this GPU (rows for other ranks x H x 2 bytes) per exchange, summed
over the exchanges of the step (2 forward, 4 forward+backward), divided by the time. Timing:
CUDA events, warm-up first, median of the repeats of the slowest rank. NVLink multicast stays
off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set if unset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import elapsed_ms  # noqa: E402
from moecore.config import TransformerConfig  # noqa: E402
from moecore.moe.dispatcher import DISPATCHERS, ipc  # noqa: E402
from moecore.moe.dispatcher.peer_buffers import (  # noqa: E402
    destroy_peer_buffers,
    get_peer_buffers,
)
from moecore.parallel_state import ParallelSizes, ParallelState  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GPU")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--ipc-torch-copy", action="store_true",
                   help="also time ipc with the per-peer torch copies")
    p.add_argument("--layer", action="store_true", help="also time a whole MoELayer fwd+bwd")
    p.add_argument("--ffn", type=int, default=2048, help="expert FFN size for --layer")
    p.add_argument("--shared-expert", type=int, default=0, metavar="FFN",
                   help="with --layer: also time the layer with a shared expert of this FFN "
                   "size, with and without --moe-shared-expert-overlap")
    p.add_argument("--copy-configs", nargs="*", default=[], metavar="BLOCKxWARPS",
                   help="also time the bare ipc exchange with these Triton launch configs "
                        "(e.g. 1024x4 2048x8 4096x16)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run over gloo + shared memory (tiny sizes advised)")
    return p.parse_args(argv)


def make_config(args, experts: int, dispatcher: str, world: int, shared: int = 0,
                overlap: bool = False) -> TransformerConfig:
    return TransformerConfig(
        moe_shared_expert_intermediate_size=shared or None, moe_shared_expert_overlap=overlap,
        num_layers=1, hidden_size=args.hidden, num_attention_heads=32, num_moe_experts=experts,
        moe_ffn_hidden_size=args.ffn, moe_router_topk=args.topk, moe_grouped_gemm=True,
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, gated_linear_unit=True, activation_func=F.silu, bf16=True,
        params_dtype=torch.bfloat16, expert_model_parallel_size=world,
        expert_tensor_parallel_size=1)


def random_routing(args, experts: int, device, gen):
    """probs [T, E] fp32 (softmax over the chosen k) and routing_map [T, E] bool."""
    scores = torch.rand(args.tokens, experts, device=device, generator=gen)
    top = scores.topk(args.topk, dim=1)
    routing = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros_like(scores).scatter(1, top.indices, torch.softmax(top.values, dim=1))
    return probs, routing


def median_ms(step, args) -> float:
    """Median ms of ``step()`` over the repeats, the slowest rank's (ranks start together)."""
    times = []
    for i in range(args.warmup + args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        elapsed = elapsed_ms(step, args.device)
        if i >= args.warmup:
            times.append(elapsed)
    t = torch.tensor([statistics.median(times)], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def remote_bytes(routing, experts: int, rank: int, world: int, hidden: int) -> int:
    """Bytes of this rank's routed rows bound for other ranks (bf16), one exchange."""
    per_owner = routing.sum(0).view(world, experts // world).sum(1)
    return int(per_owner.sum() - per_owner[rank]) * hidden * 2


def time_exchange(args, experts, name, ps, world, rank, gen):
    """fwd and fwd+bwd ms of dispatch+combine with identity experts."""
    kind, _, copy = name.partition(":")
    disp = DISPATCHERS[kind](make_config(args, experts, kind, world), parallel_state=ps)
    if copy:
        disp.options = ipc.ExchangeOptions(limit=disp.options.limit, copy=copy)
    x = torch.randn(args.tokens, args.hidden, device=args.device, generator=gen).bfloat16()
    dy = torch.randn_like(x)
    probs, routing = random_routing(args, experts, args.device, gen)

    def fwd():
        tokens, _, probs_N, handle = disp.dispatch(x, probs, routing)
        return disp.combine(tokens, handle)

    def fwd_bwd():  # the rows' probabilities travel too (forward only: unused here)
        xg, pg = x.detach().requires_grad_(True), probs.detach().requires_grad_(True)
        tokens, _, probs_N, handle = disp.dispatch(xg, pg, routing)
        disp.combine(tokens, handle).backward(dy)

    with torch.no_grad():
        fwd_ms = median_ms(fwd, args)
    return fwd_ms, median_ms(fwd_bwd, args), remote_bytes(routing, experts, rank, world,
                                                          args.hidden)


def time_raw_exchange(args, experts, name, ps, world, rank, gen) -> float:
    """ms of the bare exchange there and back of already-permuted rows with fixed splits:
    two ``all_to_all_single`` (alltoall) or ``push_rows`` + ``pull_rows`` (ipc)."""
    _, routing = random_routing(args, experts, args.device, gen)
    counts = routing.sum(0)
    rows = torch.randn(int(counts.sum()), args.hidden, device=args.device,
                       generator=gen).bfloat16()
    kind, _, copy = name.partition(":")
    group = ps.ep_group
    if kind == "alltoall":
        every = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(every, counts, group=group)
        send = counts.view(world, -1).sum(1).tolist()
        recv = [int(c.view(world, -1)[rank].sum()) for c in every]

        def step():
            out = rows.new_empty(sum(recv), args.hidden)
            dist.all_to_all_single(out, rows, recv, send, group=group)
            dist.all_to_all_single(torch.empty_like(rows), out, send, recv, group=group)
    else:
        route = ipc.build_route(counts, group, rank, world)
        bufs = get_peer_buffers(group, rows.device)
        opts = ipc.ExchangeOptions(limit=64 << 30, copy=copy or "auto")

        def step():
            ipc.pull_rows(ipc.push_rows(rows, route, bufs, opts), route, bufs, opts)

    return median_ms(step, args)


def time_layer(args, experts, kind, ps, world, gen, shared: int = 0, overlap: bool = False):
    from moecore.moe.layer import MoELayer

    torch.manual_seed(0)
    with torch.device(args.device):
        layer = MoELayer(make_config(args, experts, kind, world, shared, overlap),
                         parallel_state=ps)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, args.hidden ** -0.5)
    x = torch.randn(args.tokens, 1, args.hidden, device=args.device, generator=gen).bfloat16()
    dy = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x.detach().requires_grad_(True))
        out.backward(dy)

    return median_ms(step, args)


def run(args) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = "nccl" if args.device == "cuda" else "gloo"
    ps = ParallelState.build(ParallelSizes(world_size=world, ep=world, etp=1), backend=backend)
    names = ["alltoall", "ipc"] + (["ipc:torch"] if args.ipc_torch_copy else [])
    rows = []
    for experts in args.experts:
        base = None
        for name in names:
            gen = torch.Generator(device=args.device).manual_seed(1000 + rank)
            fwd, fwd_bwd, nbytes = time_exchange(args, experts, name, ps, world, rank, gen)
            row = dict(world=world, experts=experts, dispatcher=name, fwd_ms=fwd,
                       fwd_bwd_ms=fwd_bwd, fwd_gbps=2 * nbytes / fwd / 1e6,
                       fwd_bwd_gbps=4 * nbytes / fwd_bwd / 1e6, remote_mib=nbytes / 2**20)
            raw = time_raw_exchange(args, experts, name, ps, world, rank, gen)
            row.update(exchange_ms=raw, exchange_gbps=2 * nbytes / raw / 1e6)
            if args.layer and ":" not in name:
                row["layer_ms"] = time_layer(args, experts, name, ps, world, gen)
                if args.shared_expert:
                    for key, overlap in (("shared_ms", False), ("shared_overlap_ms", True)):
                        row[key] = time_layer(args, experts, name, ps, world, gen,
                                              args.shared_expert, overlap)
            base = base or row
            row["fwd_bwd_vs_alltoall"] = fwd_bwd / base["fwd_bwd_ms"]
            row["fwd_vs_alltoall"] = fwd / base["fwd_ms"]
            rows.append(row)
        if args.copy_configs and args.device == "cuda":
            rows[-1]["copy_configs"] = sweep_copy_configs(args, experts, ps, world, rank)
    return rows


def sweep_copy_configs(args, experts, ps, world, rank) -> dict:
    """Bare ipc exchange ms per Triton launch config of the peer-copy kernel."""
    from moecore.kernels import peer_copy

    default, out = peer_copy.LAUNCH_CONFIG, {}
    try:
        for cfg in args.copy_configs:
            block, warps = (int(v) for v in cfg.split("x"))
            peer_copy.LAUNCH_CONFIG = (block, warps)
            gen = torch.Generator(device=args.device).manual_seed(1000 + rank)
            out[cfg] = time_raw_exchange(args, experts, "ipc:triton", ps, world, rank, gen)
    finally:
        peer_copy.LAUNCH_CONFIG = default
    return out


def print_table(rows: list[dict]) -> None:
    head = (f"{'EP':>3} {'E':>4} {'dispatcher':<10} {'fwd ms':>8} {'GB/s':>7} {'f+b ms':>8} "
            f"{'GB/s':>7} {'x a2a fwd':>9} {'x a2a f+b':>9} {'xchg ms':>8} {'GB/s':>7} "
            f"{'layer ms':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        layer = f"{r['layer_ms']:9.3f}" if "layer_ms" in r else f"{'-':>9}"
        print(f"{r['world']:>3} {r['experts']:>4} {r['dispatcher']:<10} {r['fwd_ms']:8.3f} "
              f"{r['fwd_gbps']:7.1f} {r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_gbps']:7.1f} "
              f"{r['fwd_vs_alltoall']:9.2f} {r['fwd_bwd_vs_alltoall']:9.2f} "
              f"{r['exchange_ms']:8.3f} {r['exchange_gbps']:7.1f} {layer}")
    shared = [r for r in rows if "shared_ms" in r]
    if shared:
        print(f"\n{'EP':>3} {'E':>4} {'dispatcher':<10} {'+shared ms':>10} {'overlap ms':>10} "
              f"{'ratio':>6}")
        for r in shared:
            print(f"{r['world']:>3} {r['experts']:>4} {r['dispatcher']:<10} "
                  f"{r['shared_ms']:10.3f} {r['shared_overlap_ms']:10.3f} "
                  f"{r['shared_overlap_ms'] / r['shared_ms']:6.2f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    try:
        rows = run(args)
        if dist.get_rank() == 0:
            print(f"hidden {args.hidden}, {args.tokens} tokens/GPU, top-{args.topk}, bf16; "
                  "GB/s = bytes leaving each GPU / time; x a2a = time / all-to-all's; "
                  "xchg = bare exchange there and back (no permute, no count exchange)")
            print_table(rows)
            for r in rows:
                if "copy_configs" in r:
                    print(f"E={r['experts']} bare ipc exchange ms by Triton launch config: "
                          + ", ".join(f"{k}: {v:.3f}" for k, v in r["copy_configs"].items()))
            if args.json:
                Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows),
                                                      indent=2))
    finally:
        if args.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        destroy_peer_buffers()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
