"""FP8 (emulated GEMMs) at TP=2 with sequence parallel equals TP=1, for every recipe.

A ColumnParallelLinear -> gelu -> RowParallelLinear MLP in FP8 on 2 gloo ranks against the same
MLP built in one process from the same seed: outputs and every gradient, shard by shard, over
two steps (the second one uses the delayed recipe's amax history). Equality up to fp32 sums
holds because whole-tensor amaxes are all-reduced over TP (each rank quantises exactly as TP=1)
and the 128x128 blocks / 1x128 tiles lie inside the shards.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moecore.config import TransformerConfig
from moecore.fp8 import Fp8Recipe
from moecore.parallel_state import ParallelState, destroy_model_parallel, initialize_model_parallel
from moecore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from tests.dist_harness import run_distributed

S, B, H, FFN = 16, 2, 128, 512
RECIPES = ("tensorwise", "delayed", "blockwise")


def _mlp(ps, recipe):
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4,
                            ffn_hidden_size=FFN, init_method_std=0.05,
                            tensor_model_parallel_size=ps.tp_size, sequence_parallel=True,
                            fp8="hybrid", fp8_recipe=recipe, fp8_amax_history_len=2,
                            fp8_gemm_backend="emulated")
    torch.manual_seed(7)
    fc1 = ColumnParallelLinear(H, FFN, config=cfg, parallel_state=ps)
    fc2 = RowParallelLinear(FFN, H, config=cfg, parallel_state=ps)
    for layer in (fc1, fc2):
        layer.enable_fp8(Fp8Recipe.from_config(cfg))
    return fc1, fc2


def _steps(fc1, fc2, xs, gs):
    """Two forward/backward steps; ``(outputs, input grads, [fc1 grads, fc2 grads])``."""
    outs, dxs = [], []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        y = fc2(F.gelu(fc1(x)[0]))[0]
        y.backward(g)
        outs.append(y.detach()), dxs.append(x.grad)
    return outs, dxs, [fc1.weight.grad, fc2.weight.grad]


def _check(name, got, want, tol=2e-5):
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"


def _worker(rank, world):
    ps = initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        g = torch.Generator().manual_seed(3)
        xs = [torch.randn(S, B, H, generator=g) * s for s in (1.0, 4.0)]
        gs = [torch.randn(S, B, H, generator=g) for _ in xs]
        for recipe in RECIPES:
            ref = _steps(*_mlp(ParallelState.single(), recipe), xs, gs)
            shard = [t.chunk(world, 0)[rank] for t in xs], [t.chunk(world, 0)[rank] for t in gs]
            got = _steps(*_mlp(ps, recipe), *shard)
            for i in range(len(xs)):
                _check(f"{recipe} out {i}", got[0][i], ref[0][i].chunk(world, 0)[rank])
                _check(f"{recipe} dx {i}", got[1][i], ref[1][i].chunk(world, 0)[rank])
            _check(f"{recipe} fc1 dw", got[2][0], ref[2][0].chunk(world, 0)[rank])
            _check(f"{recipe} fc2 dw", got[2][1], ref[2][1].chunk(world, 1)[rank])
        dist.barrier()
    finally:
        destroy_model_parallel()
    return True


@pytest.mark.parametrize("world", [2])
def test_fp8_tp2_sequence_parallel_matches_tp1(world):
    assert run_distributed(_worker, world, timeout=180) == [True] * world
