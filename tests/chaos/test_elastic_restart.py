"""Elastic restart: under ``torchrun --max-restarts 1`` a job whose rank dies mid-training
restarts by itself, resumes from the newest published ``torch_dist`` checkpoint in ``--load``
(= ``--save``, empty at the first start) and finishes with the losses of an uninterrupted run.

Rank 1 kills itself (SIGKILL) at the first micro-batch of iteration 4 of the first attempt
(tests/chaos/elastic_worker.py); the last checkpoint is iteration 2 (``--save-interval 2``).
The restarted workers rendezvous through torchrun's store, which still holds the dead
attempt's keys (:func:`moecore.training.initialize.torchelastic_attempt_store`), and rank 0
takes the ``--save`` run lock its killed predecessor held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "chaos", "elastic_worker.py")
ARGS = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
    "--seq-length 16 --max-position-embeddings 16 --position-embedding-type rope "
    "--normalization RMSNorm --swiglu --disable-bias-linear --num-experts 4 "
    "--moe-router-topk 2 --moe-ffn-hidden-size 32 --expert-model-parallel-size 2 "
    "--moe-token-dispatcher-type alltoall --mock-data --vocab-size 15 --micro-batch-size 2 "
    "--global-batch-size 8 --lr 1e-2 --lr-decay-style cosine --lr-warmup-iters 1 "
    "--device cpu --num-workers 0 --seed 1234 --train-iters 6 --eval-iters 0 "
    "--eval-interval 1000 --log-interval 1 --ckpt-format torch_dist --save-interval 2"
).split()
KILL_AT = 7  # 2 micro-batches per iteration per rank: the first of iteration 4


def _torchrun(kill_at: int, out: str, ckpt: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", "1", "--monitor-interval", "0.2", WORKER, str(kill_at), out,
           *ARGS, "--load", ckpt, "--save", ckpt]
    # Own session: a hung job is ended whole (torchrun and its workers), not left orphaned.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("torchrun hung (120 s):\n" + out[-4000:])
    assert proc.returncode == 0, out[-4000:]
    return out


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.mark.chaos
def test_rank_death_restarts_and_resumes_with_uninterrupted_losses(tmp_path):
    straight = tmp_path / "straight"
    _torchrun(0, str(straight), str(tmp_path / "ckpt_straight"))
    ref = _read(f"{straight}.0.json")
    assert ref["iterations"] == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    ckpt = tmp_path / "ckpt"
    _torchrun(KILL_AT, str(killed), str(ckpt))
    assert not os.path.exists(f"{killed}.0.json")  # the first attempt died
    again = _read(f"{killed}.1.json")
    assert again["iterations"] == [3, 4, 5, 6]  # resumed from the iteration-2 checkpoint
    assert again["lm_loss"] == ref["lm_loss"][2:]  # bit for bit
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"
    # (.moecore-run.lock is the --save run lock, taken again by the restarted rank 0)
    assert sorted(f for f in os.listdir(ckpt) if not f.startswith(".")) == [
        "iter_0000002", "iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
