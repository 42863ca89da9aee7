"""IPC dispatcher on CUDA (symmetric memory over NVLink/PCIe P2P), one process per GPU, NCCL.

Against the all-to-all dispatcher: dispatched rows bit-identical (both copy kernels), combine
identical, MoELayer in bf16 (two stacked layers, so the shared buffers are reused between
layers and in backward) with the output within bf16 tolerance and gradients close.
Skipped without 2 GPUs. Never uses NVLink multicast.
"""

import os

import pytest
import torch

from moecore.config import TransformerConfig
from moecore.moe.dispatcher import MoEAlltoAllTokenDispatcher, MoEIPCTokenDispatcher, ipc
from moecore.moe.dispatcher.peer_buffers import destroy_peer_buffers
from moecore.parallel_state import ParallelSizes, ParallelState
from tests.dist_harness import run_distributed
from tests.moe_reference import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA GPUs"),
]

H, E, K, T = 1024, 8, 2, 2048


def _config(dispatcher: str, world: int, **over) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=8, num_moe_experts=E,
                moe_ffn_hidden_size=512, moe_router_topk=K, moe_grouped_gemm=True,
                moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=world,
                expert_tensor_parallel_size=1, bf16=True, params_dtype=torch.bfloat16,
                moe_aux_loss_coeff=1e-2, init_method_std=0.02)
    base.update(over)
    return TransformerConfig(**base)


def _inputs(rank: int, device):
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    hidden = torch.randn(T, H, device=device, generator=gen).bfloat16()
    scores = torch.rand(T, E, device=device, generator=gen)
    scores[:, 3] = -1.0  # expert 3 never chosen: an owner with an empty expert
    top = scores.topk(K, dim=1).indices
    routing = torch.zeros(T, E, dtype=torch.bool, device=device).scatter(1, top, True)
    probs = torch.softmax(scores, dim=1) * routing
    return hidden, probs, routing


def _check_dispatch(rank, world, ps, device):
    hidden, probs, routing = _inputs(rank, device)
    a2a = MoEAlltoAllTokenDispatcher(_config("alltoall", world), parallel_state=ps)
    ref_tokens, ref_tpe, ref_probs, ref_handle = a2a.dispatch(hidden, probs, routing)
    ref_out = a2a.combine(ref_tokens * 2, ref_handle)
    for copy in ("triton", "torch"):
        disp = MoEIPCTokenDispatcher(_config("ipc", world), parallel_state=ps)
        disp.options = ipc.ExchangeOptions(limit=disp.options.limit, copy=copy)
        tokens, tpe, probs_N, handle = disp.dispatch(hidden, probs, routing)
        assert torch.equal(tokens, ref_tokens), f"dispatched rows differ ({copy})"
        assert torch.equal(probs_N, ref_probs), f"dispatched probabilities differ ({copy})"
        assert torch.equal(tpe.cpu(), ref_tpe.cpu())
        assert torch.equal(disp.combine(tokens * 2, handle), ref_out), (
            f"combine differs ({copy})")
    return tokens.shape[0]


def _check_layers(rank, world, ps, device):
    from moecore.moe.layer import MoELayer

    results = []
    for dispatcher in ("ipc", "alltoall"):
        cfg = _config(dispatcher, world)
        torch.manual_seed(1234)
        with torch.device(device):
            layers = [MoELayer(cfg, layer_number=i + 1, parallel_state=ps) for i in range(2)]
        gen = torch.Generator(device=device).manual_seed(7 + rank)
        x = torch.randn(T // 2, 2, H, device=device, generator=gen).bfloat16()
        x.requires_grad_(True)
        out = x
        for layer in layers:
            out = layer(out)[0]
        out.backward(torch.randn(out.shape, device=device, generator=gen).bfloat16())
        grads = {f"{i}.{n}": p.grad.float() for i, layer in enumerate(layers)
                 for n, p in layer.named_parameters()}
        results.append((out.detach().float(), x.grad.float(), grads))
    (out, xg, grads), (ref_out, ref_xg, ref_grads) = results
    errs = {"output": rel_err(out, ref_out), "input_grad": rel_err(xg, ref_xg)}
    errs["param_grad"] = max(rel_err(g, ref_grads[n]) for n, g in grads.items())
    assert errs["output"] < 1e-2 and errs["input_grad"] < 2e-2 and errs["param_grad"] < 2e-2, errs
    return errs


def _gpu_world(rank, world):
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    ps = ParallelState.build(ParallelSizes(world_size=world, ep=world, etp=1), backend="nccl")
    rows = _check_dispatch(rank, world, ps, device)
    errs = _check_layers(rank, world, ps, device)
    backend = getattr(symm_mem, "get_backend", lambda d: "?")(device)
    torch.cuda.synchronize()
    dist.barrier()  # no peer still reads our buffers
    destroy_peer_buffers()
    return {"rows": rows, "symm_mem_backend": str(backend), **errs}


def test_ipc_dispatcher_matches_alltoall_on_gpus():
    world = min(torch.cuda.device_count(), 4)
    results = run_distributed(_gpu_world, world, timeout=300)
    print("ipc gpu:", results)
