"""``torchrun pretrain_gpt.py`` over NCCL on 2 GPUs (skipped with fewer): pipeline parallel,
the distributed optimizer with overlapped grad-reduce / param-gather, and expert parallel with
the all-to-all and the IPC dispatcher all reproduce the one-GPU run of the same global batches
(fp32, so only summation order differs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = (
    "--num-layers 2 --hidden-size 128 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --ffn-hidden-size 256 --seq-length 64 --max-position-embeddings 64 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --num-experts 4 --moe-router-topk 2 "
    "--moe-aux-loss-coeff 1e-2 --moe-ffn-hidden-size 128 --moe-grouped-gemm --mock-data "
    "--vocab-size 256 --micro-batch-size 4 --global-batch-size 16 --lr 1e-3 --min-lr 1e-4 "
    "--lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0 --train-iters 8 "
    "--log-interval 4 --eval-interval 8 --eval-iters 1 --hidden-dropout 0 "
    "--attention-dropout 0 --device cuda --seed 1234 --moe-token-dispatcher-type alltoall"
).split()
LAYOUTS = {
    "pp2": "--pipeline-model-parallel-size 2",
    "dp2_dist_opt_overlap": "--use-distributed-optimizer --overlap-grad-reduce "
                            "--overlap-param-gather --ddp-bucket-size 20000",
    "ep2_alltoall": "--expert-model-parallel-size 2",
    "ep2_ipc": "--expert-model-parallel-size 2 --moe-token-dispatcher-type ipc",
}
DRIVER = ("import json, sys, torch.distributed as dist; from moecore.training import pretrain; "
          "s = pretrain(sys.argv[1:]); "
          "r = dist.get_rank() if dist.is_initialized() else 0; "
          "r == 0 and print('SUMMARY ' + json.dumps({'lm_loss': s['lm_loss'], "
          "'grad_norm': s['grad_norm']}), flush=True)")


def _run(tmp_path, nproc: int, extra: list[str]) -> dict:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(script), *MODEL, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def test_two_gpu_layouts_match_one_gpu(tmp_path):
    ref = _run(tmp_path, 1, [])
    assert ref["lm_loss"][-1] < ref["lm_loss"][0]
    for name, extra in LAYOUTS.items():
        got = _run(tmp_path, 2, extra.split())
        print(f"{name}: lm_loss {got['lm_loss']} (1 GPU: {ref['lm_loss']})")
        assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=2e-4), name
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-3), name
