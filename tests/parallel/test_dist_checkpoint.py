"""``--ckpt-format torch_dist``: one checkpoint, any layout on load (gloo, spawned ranks), and
``--auto-detect-ckpt-format``.

A tiny MoE GPT trains 3 iterations and saves under TP=2 x EP=2 with the distributed optimizer
(4 ranks, DP=2), then resumes for 3 more under PP=2 x EP=2 (plain optimizer, 4 ranks) and under
TP=1/EP=1/PP=1 in one process. The resumed losses equal the uninterrupted single-process run's
(fp32; only float summation order differs between layouts), and a model loaded in one process
holds bitwise the tensors in the checkpoint. The single-process run saves in the ``torch``
format: each format loads under the other's --ckpt-format with --auto-detect-ckpt-format and
is refused in one line without it.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moecore.checkpointing import CheckpointError
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
TP2_EP2_DISTOPT = ("--tensor-model-parallel-size 2 --expert-model-parallel-size 2 "
                   "--sequence-parallel --use-distributed-optimizer")
PP2_EP2 = "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2"
MODEL_ONLY = ["--finetune", "--skip-train"]  # load the model, train nothing

_MODELS: list = []


def _recording_provider(config, args, ps, **stage):
    model = builders.default_model_provider(config, args, ps, **stage)
    _MODELS.append((model, ps))
    return model


def _run(argv: list[str]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The run's losses and its model's tensors at the end, by global key (one process: each
    slice is its whole global tensor)."""
    _MODELS.clear()
    s = pretrain(TINY + argv, model_provider=_recording_provider, log=lambda _: None)
    chunks, ps = [m for m, _ in _MODELS], _MODELS[0][1]
    return s["lm_loss"], {k: v.local.clone() for k, v in model_slices(chunks, ps).items()}


def _four_rank_runs(rank, world_size, ckpt):
    first = "--exit-interval 3 --save-interval 3".split()
    saved = pretrain(TINY + TP2_EP2_DISTOPT.split() + first + ["--save", ckpt], log=lambda _: None)
    resumed = pretrain(TINY + PP2_EP2.split() + ["--load", ckpt], log=lambda _: None)
    return {"saved": saved["lm_loss"], "resumed": resumed["lm_loss"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_ckpt")
    dist_ckpt, torch_ckpt = str(tmp / "dist"), str(tmp / "torch")
    straight, final = _run(["--ckpt-format", "torch", "--save", torch_ckpt,
                            "--save-interval", "6"])
    four = run_distributed(_four_rank_runs, 4, dist_ckpt, timeout=240)[0]
    dcp_to_torch_save(os.path.join(dist_ckpt, "iter_0000003"), str(tmp / "global.pt"))
    saved = torch.load(str(tmp / "global.pt"), weights_only=True)
    return {"straight": straight, "final": final, "four": four, "dist": dist_ckpt,
            "torch": torch_ckpt, "saved": {k: v for k, v in saved.items()
                                           if k.startswith("model.")}}


def test_resumes_under_other_layouts_continue_the_single_process_curve(runs):
    ref = runs["straight"]
    assert ref[-1] < ref[0]
    four = runs["four"]
    assert four["saved"] == pytest.approx(ref[:3], rel=1e-5)
    assert four["resumed"] == pytest.approx(ref[3:], rel=1e-5)  # TP2xEP2+dist-opt -> PP2xEP2
    one, _ = _run(["--load", runs["dist"]])  # -> TP=1/EP=1/PP=1, plain optimizer
    assert one == pytest.approx(ref[3:], rel=1e-5)


def test_one_process_load_holds_the_saved_tensors_bitwise(runs):
    _, loaded = _run(["--load", runs["dist"], *MODEL_ONLY])
    assert runs["saved"] and set(loaded) == set(runs["saved"])  # every tensor, [gate; up] too
    for key, t in loaded.items():
        assert torch.equal(t, runs["saved"][key]), key


def test_auto_detect_loads_either_format(runs):
    _, from_torch = _run(["--load", runs["torch"], "--auto-detect-ckpt-format", *MODEL_ONLY])
    assert from_torch.keys() == runs["final"].keys()
    for key, t in from_torch.items():
        assert torch.equal(t, runs["final"][key]), key
    _, from_dist = _run(["--ckpt-format", "torch", "--load", runs["dist"],
                         "--auto-detect-ckpt-format", *MODEL_ONLY])
    for key, t in from_dist.items():
        assert torch.equal(t, runs["saved"][key]), key


@pytest.mark.parametrize("fmt, found, ckpt", [("torch_dist", "torch", "torch"),
                                              ("torch", "torch_dist", "dist")])
def test_other_format_without_auto_detect_is_refused_in_one_line(runs, fmt, found, ckpt):
    with pytest.raises(CheckpointError) as e:
        _run(["--ckpt-format", fmt, "--load", runs[ckpt], *MODEL_ONLY])
    msg = str(e.value)
    assert "\n" not in msg and f"holds a '{found}' checkpoint" in msg
    assert f"--ckpt-format {found}" in msg and "--auto-detect-ckpt-format" in msg


def test_resume_with_another_model_flag_is_refused(runs):
    # top-k keeps every parameter's shape: only the saved args can tell
    with pytest.raises(CheckpointError, match=r"--moe-router-topk 1 \(checkpoint: 2\)"):
        _run(["--load", runs["dist"], "--moe-router-topk", "1", *MODEL_ONLY])
