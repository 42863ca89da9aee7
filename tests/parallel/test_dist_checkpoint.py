"""``--ckpt-format torch_dist``: one checkpoint, any layout on load (gloo, spawned ranks).

A tiny MoE GPT trains 3 iterations and saves under TP=2 x EP=2 (plain optimizer) and under
PP=2 x EP=2 x DP=2 (distributed optimizer), then resumes for 3 more under other layouts:
TP=1/EP=1/PP=1 in one process, and PP=2 x TP=2 on 4 ranks. The resumed losses equal the
uninterrupted single-process run's (fp32; only float summation order differs between layouts),
and a model loaded in one process holds bitwise the tensors in the checkpoint. A torch-format
checkpoint loads with --auto-detect-ckpt-format and is refused without it.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moecore.checkpointing.dist_slices import model_slices
from moecore.training import builders, pretrain
from tests.dist_harness import run_distributed

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --ffn-hidden-size 64 --seq-length 16 --max-position-embeddings 16 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --num-experts 4 --moe-router-topk 2 "
    "--moe-aux-loss-coeff 1e-2 --moe-ffn-hidden-size 32 --mock-data --vocab-size 100 "
    "--make-vocab-size-divisible-by 64 --micro-batch-size 2 --global-batch-size 8 --lr 1e-2 "
    "--min-lr 1e-3 --lr-decay-style cosine --lr-warmup-iters 1 --clip-grad 1.0 "
    "--weight-decay 0.01 --device cpu --num-workers 0 --seed 1234 --train-iters 6 "
    "--log-interval 3 --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 "
    "--attention-dropout 0 --moe-token-dispatcher-type alltoall --ckpt-format torch_dist"
).split()
# vocab 100 pads to 128 rows at TP=1 and TP=2 alike (the padded vocabulary must not change).
TP2_EP2 = "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 --sequence-parallel"
PP2_EP2 = ("--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 "
           "--use-distributed-optimizer")
PP2_TP2 = "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel"

_MODELS: list = []


def _recording_provider(config, args, ps, **stage):
    model = builders.default_model_provider(config, args, ps, **stage)
    _MODELS.append((model, ps))
    return model


def _run(argv: list[str], record: bool = False) -> list[float]:
    _MODELS.clear()
    s = pretrain(TINY + argv, model_provider=_recording_provider if record else None,
                 log=lambda _: None)
    return s["lm_loss"]


def _four_rank_runs(rank, world_size, ckpt_a, ckpt_b):
    first = "--exit-interval 3 --save-interval 3".split()
    return {"saved_a": _run(TP2_EP2.split() + first + ["--save", ckpt_a]),
            "saved_b": _run(PP2_EP2.split() + first + ["--save", ckpt_b]),
            "resumed_a": _run(PP2_TP2.split() + ["--load", ckpt_a]),
            "resumed_b": _run(TP2_EP2.split() + ["--load", ckpt_b])}


def _global_tensors(ckpt: str, tmp: str) -> dict[str, torch.Tensor]:
    out = os.path.join(tmp, "global.pt")
    dcp_to_torch_save(os.path.join(ckpt, "iter_0000003"), out)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_ckpt")
    ckpt_a, ckpt_b = str(tmp / "a"), str(tmp / "b")
    straight = _run([])
    four = run_distributed(_four_rank_runs, 4, ckpt_a, ckpt_b, timeout=240)[0]
    # One process, TP=1/EP=1/PP=1, model only and no training: the loaded model itself.
    _run(["--load", ckpt_a, "--finetune", "--skip-train"], record=True)
    chunks, ps = [m for m, _ in _MODELS], _MODELS[0][1]
    loaded = {k: s.local.clone() for k, s in model_slices(chunks, ps).items()}
    return {"straight": straight, "four": four, "tmp": str(tmp),
            "a": ckpt_a, "b": ckpt_b, "loaded": loaded}


def test_one_process_load_holds_the_saved_tensors_bitwise(runs):
    saved = _global_tensors(runs["a"], runs["tmp"])
    loaded = runs["loaded"]
    assert loaded and set(loaded) <= set(saved)
    for key, t in loaded.items():  # at TP=EP=PP=1 every slice is its whole global tensor
        assert torch.equal(t, saved[key]), key
    # every saved model tensor was loaded ([gate; up] halves and all)
    assert {k for k in saved if k.startswith("model.")} == set(loaded)


def test_resumes_under_other_layouts_continue_the_single_process_curve(runs):
    ref = runs["straight"]
    four = runs["four"]
    assert four["saved_a"] == pytest.approx(ref[:3], rel=1e-5)
    assert four["saved_b"] == pytest.approx(ref[:3], rel=1e-5)
    assert four["resumed_a"] == pytest.approx(ref[3:], rel=1e-5)  # TP2xEP2 -> PP2xTP2
    assert four["resumed_b"] == pytest.approx(ref[3:], rel=1e-5)  # PP2xEP2 -> TP2xEP2
    one_a = _run(["--load", runs["a"]])  # TP2xEP2 -> one process
    one_b = _run(["--load", runs["b"]])  # PP2xEP2 (distributed optimizer) -> one process
    assert one_a == pytest.approx(ref[3:], rel=1e-5)
    assert one_b == pytest.approx(ref[3:], rel=1e-5)
    assert ref[-1] < ref[0]
